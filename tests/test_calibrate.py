"""lssf-calibrate and lssf_fusion's calibrated mode, on the tiny local family.

The subspace is compared with a float64 evaluation of the paper's Eq. 4 from the
activations themselves (captured sample by sample, unpadded, in a float64 copy of the
model); the calibrated merge with ref.lssf on the stored bases; memory is checked
through the accumulator's state; subspaces of other models are refused.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import reference as ref
import torch
import yaml
from conftest import run_cli
from safelora_helpers import lora_scaling

from mergekit_lox.calibrate import calibrate, linear_layers
from mergekit_lox.calibrate.gram import GramAccumulator
from mergekit_lox.demo.synthetic import FamilySpec, build_family, load_state_dict
from mergekit_lox.methods import lssf, subspace

TOL = 1e-4
ROWS = [
    {"prompt": "w1 w2 w3", "response": "w4 w5 w6 w7"},
    {"prompt": "w8 w9 w10 w11 w12", "response": "w13 w14"},
    {"prompt": "w15 w16", "response": "w17 w18 w19 w20 w21 w22"},
    {"prompt": "w23 w24 w25 w26", "response": "w27"},
    {"prompt": "w28 w29 w30", "response": "w31 w32 w33"},
]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "harmful.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return str(path)


@pytest.fixture(scope="module")
def calibrated(family, prompts, tmp_path_factory):
    """A subspace of the family's aligned model, responses from the file, batches of 2."""
    out = str(tmp_path_factory.mktemp("subspaces") / "aligned-subspace")
    calibrate(family.aligned, prompts, out, response_column="response", batch_size=2, max_rank=24)
    return out


def stored(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, subspace.TENSORS_NAME))


def reference_spectra(model_dir, texts, normalization="token"):
    """Per weight: SVD of Z = W X^ (float64), from every token's input to that layer."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    inputs = {}
    hooks = [
        module.register_forward_hook(lambda m, a, o, name=name: inputs.setdefault(name, []).append(a[0][0].numpy()))
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name != "lm_head"
    ]
    with torch.no_grad():
        for text in texts:  # one at a time: no padding at all
            model(**tokenizer(text, return_tensors="pt"))
    for hook in hooks:
        hook.remove()
    spectra = {}
    for name, chunks in inputs.items():
        X = np.concatenate(chunks)  # [tokens, in]
        if normalization == "token":
            X = X / np.linalg.norm(X, axis=1, keepdims=True)
        W = model.get_submodule(name).weight.detach().numpy()
        U, S, _ = np.linalg.svd(W @ X.T, full_matrices=False)
        spectra[f"{name}.weight"] = (U, S, X.shape[0])
    return spectra


def gapped_rank(S, limit=8):
    """The largest k <= limit after which the spectrum has a clear gap (a defined subspace)."""
    return max(k for k in range(1, limit + 1) if S[k - 1] - S[k] > 1e-2 * S[0])


@pytest.mark.parametrize("normalization", ["token", "none"])
def test_subspace_is_the_svd_of_the_normalised_activations(family, prompts, calibrated, tmp_path, normalization):
    path = calibrated
    if normalization != "token":
        path = str(tmp_path / "raw")
        calibrate(family.aligned, prompts, path, response_column="response", batch_size=3, normalization="none")
    texts = [f"{row['prompt']} {row['response']}" for row in ROWS]  # no chat template: prompt, space, response
    expected = reference_spectra(family.aligned, texts, normalization)
    tensors = stored(path)
    meta = subspace.read_metadata(path)
    assert set(meta["weights"]) == set(expected) and len(expected) == 14  # every nn.Linear but lm_head
    for name, (U_ref, S_ref, tokens) in expected.items():
        U, S = ref.f64(tensors[f"{name}.U"]), ref.f64(tensors[f"{name}.S"])
        m, n = meta["weights"][name]["shape"]
        assert S.shape == (min(m, n),) and U.shape == (m, min(m, n, meta["max_rank"]))
        valid = min(len(S_ref), len(S))
        assert np.abs(S[:valid] - S_ref[:valid]).max() < TOL * S_ref[0], name
        assert np.all(S[valid:] < TOL * S_ref[0]), name  # Z has rank <= tokens
        k = gapped_rank(S_ref)
        P, P_ref = U[:, :k] @ U[:, :k].T, U_ref[:, :k] @ U_ref[:, :k].T
        assert ref.rel_err(P, P_ref) < 1e-3, (name, k)
        assert meta["tokens"] == tokens
    assert meta["samples"] == len(ROWS) and meta["normalization"] == normalization
    assert meta["model"]["path"] == family.aligned
    assert meta["model"]["config_hash"] == subspace.config_hash(family.aligned)


def test_grams_are_bounded_whatever_the_sample_count(family):
    """One min(in, out)^2 Gram per linear layer, the same for 2 or 10 sequences:
    activations are never kept (state_elements counts everything held across batches)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(family.aligned, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(family.aligned)
    layers = linear_layers(model, None)
    expected = sum(min(model.get_submodule(n).weight.shape) ** 2 for n in layers)
    sizes, tokens, fed = [], [], []
    for count in (2, 10):
        with GramAccumulator(model, layers) as accumulator:
            fed.append(0)
            for i in range(count):
                encoded = tokenizer(" ".join(f"w{j}" for j in range(i, i + 12)), return_tensors="pt")
                fed[-1] += encoded["input_ids"].numel()
                with torch.no_grad():
                    model(**encoded)
            sizes.append(accumulator.state_elements())
            tokens.append(accumulator.layers[0].tokens)
            kept = {"weight_name", "module", "side", "gram", "tokens", "transposed"}
            assert all(set(vars(layer)) == kept for layer in accumulator.layers)
    assert sizes == [expected, expected] and tokens == fed and fed[1] == 5 * fed[0]


def realign(family, subspace_dir, finetuned=None, **parameters):
    return {
        "merge_method": "lssf_fusion",
        "base_model": family.base,
        "models": [
            {"model": family.aligned, "parameters": {"role": "aligned"}},
            {"model": finetuned or family.finetuned, "parameters": {"role": "finetuned"}},
        ],
        "parameters": {"subspace": subspace_dir, **parameters},
        "dtype": "float32",
    }


def assert_calibrated_merge(out, states, basis_file, finetuned, **parameters):
    """Covered weights: ref.lssf on the stored basis; the rest data-free; 1-D: W_f."""
    p = {"scale": 1.0, "eta": 0.9, "rank": 0, "top_weight": 1.0, **parameters}
    covered = 0
    for name, tensor in out.items():
        W_f, W_a, W_b = ref.f64(finetuned[name]), ref.f64(states["aligned"][name]), ref.f64(states["base"][name])
        basis = None
        if f"{name}.U" in basis_file:
            basis = (ref.f64(basis_file[f"{name}.U"]), ref.f64(basis_file[f"{name}.S"]))
            covered += 1
            data_free = ref.lssf(W_f, W_a, W_b, p["scale"], p["eta"], p["rank"], p["top_weight"])
            assert ref.rel_err(ref.f64(tensor), data_free) > 1e-2, name  # the subspace was used
        expected = ref.lssf(W_f, W_a, W_b, p["scale"], p["eta"], p["rank"], p["top_weight"], basis)
        assert ref.rel_err(ref.f64(tensor), expected) < TOL, name
    assert covered == 14


@pytest.mark.parametrize("parameters", [{}, {"eta": 0.6, "top_weight": 2.0, "scale": 0.7}, {"rank": 3}])
def test_calibrated_fusion_matches_float64(family, states, calibrated, run_recipe, tmp_path, parameters):
    lssf.reset_subspace_coverage()
    out = run_recipe(realign(family, calibrated, **parameters), tmp_path / "out")
    assert_calibrated_merge(out, states, stored(calibrated), states["finetuned"], **parameters)
    coverage = lssf.subspace_coverage()[calibrated]
    assert len(coverage["calibrated"]) == 14
    assert sorted(coverage["data-free"]) == ["lm_head.weight", "model.embed_tokens.weight"]
    assert "2 in the data-free subspace" in lssf.coverage_lines()[0]


def test_calibrated_fusion_of_an_aligned_plus_adapter_finetune(
    family, states, calibrated, lora_adapter, tmp_path, capsys
):
    from safetensors.torch import load_file

    adapter = {k: ref.f64(v) for k, v in load_file(os.path.join(lora_adapter, "adapter_model.safetensors")).items()}
    aligned64 = {k: ref.f64(v) for k, v in states["aligned"].items()}
    finetuned = {k: torch.from_numpy(v) for k, v in ref.peft_lora_finetuned(aligned64, adapter, lora_scaling).items()}
    recipe = tmp_path / "lora.yml"
    recipe.write_text(yaml.safe_dump(realign(family, calibrated, f"{family.aligned}+{lora_adapter}", eta=0.8)))
    code, _, err = run_cli(["run", str(recipe), str(tmp_path / "out"), "--quiet"], capsys)
    assert code == 0, err
    out = load_state_dict(str(tmp_path / "out"))
    assert_calibrated_merge(out, states, stored(calibrated), finetuned, eta=0.8)


def test_calibration_generates_the_aligned_models_own_responses(family, tmp_path, capsys):
    queries = tmp_path / "queries.txt"
    queries.write_text("w1 w2 w3\nw4 w5\nw6 w7 w8 w9\n")
    out = tmp_path / "sub"
    code, stdout, err = run_cli(
        ["lssf-calibrate", "--aligned", family.aligned, "--prompts", str(queries), "-o", str(out),
         "--samples", "2", "--max-new-tokens", "3", "--batch-size", "2"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "generating the aligned model's responses to 2 queries" in stdout
    meta = subspace.read_metadata(str(out))
    assert meta["samples"] == 2 and meta["responses"].startswith("generated")
    # Query + up to 3 generated tokens each, and the generation really ran (more than the queries).
    assert 3 + 2 < meta["tokens"] <= 3 + 2 + 2 * 3


def test_a_subspace_of_another_model_is_refused(family, calibrated, run_recipe, tmp_path):
    from mergekit_lox.check import check_recipe

    same_config = build_family(str(tmp_path / "other"), FamilySpec(seed=5), finetune=True)
    smaller = build_family(str(tmp_path / "smaller"), FamilySpec(hidden_size=32, intermediate_size=64), finetune=True)
    for other, why in ((same_config, "same config as the aligned model"), (smaller, "config.json differs")):
        recipe = tmp_path / "other.yml"
        document = realign(family, calibrated)
        document["base_model"] = other.base
        document["models"] = [
            {"model": other.aligned, "parameters": {"role": "aligned"}},
            {"model": other.finetuned, "parameters": {"role": "finetuned"}},
        ]
        recipe.write_text(yaml.safe_dump(document))
        problems = [p for p in check_recipe(str(recipe)).problems if p.field == "parameters.subspace"]
        assert len(problems) == 1 and why in problems[0].message, problems
        with pytest.raises(ValueError, match=why):  # the kernel checks too (plain mergekit-yaml has no check)
            run_recipe(document, tmp_path / "out")


def test_a_basis_of_the_wrong_shape_is_refused_naming_the_weight(family, calibrated, run_recipe, tmp_path):
    from safetensors.torch import save_file

    damaged = str(tmp_path / "damaged")
    shutil.copytree(calibrated, damaged)
    tensors = stored(damaged)
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[f"{name}.U"] = tensors[f"{name}.U"][:-1]
    save_file(tensors, os.path.join(damaged, subspace.TENSORS_NAME))
    with pytest.raises(ValueError, match=f"basis of tensor {name} has shape \\(63, 24\\)"):
        run_recipe(realign(family, damaged), tmp_path / "out")


@pytest.mark.parametrize(
    "args, code, fragment",
    [
        (["--prompts", "{tmp}/missing.jsonl"], 1, "missing.jsonl: no such file"),
        (["--column", "nope"], 1, "no column 'nope' (--column)"),
        (["--response-column", "answer"], 1, "no column 'answer' (--response-column)"),
        (["--samples", "0"], 2, "--samples"),
        (["-o", "{aligned}/subspace"], 1, "inside input model directory"),
    ],
    ids=["missing-source", "bad-column", "bad-response-column", "zero-samples", "out-inside-model"],
)
def test_bad_input_is_one_line(family, prompts, tmp_path, capsys, args, code, fragment):
    base = {
        "--aligned": family.aligned,
        "--prompts": prompts,
        "-o": str(tmp_path / "sub"),
        "--response-column": "response",
    }
    given = dict(zip(args[::2], [a.format(tmp=tmp_path, aligned=family.aligned) for a in args[1::2]], strict=True))
    argv = ["lssf-calibrate"] + [x for key, value in {**base, **given}.items() for x in (key, value)]
    result, _, err = run_cli(argv, capsys)
    assert result == code and fragment in err, err
    if code == 1:
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert not os.path.exists(tmp_path / "sub") and not os.path.exists(os.path.join(family.aligned, "subspace"))
