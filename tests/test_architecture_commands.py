"""Issue 26: the commands around the merges, on every causal LM of tests/test_architectures.py
(36 architectures built from transformers' own classes; that file holds them all, encoders
and multimodal models too, to `check` and the merges). Among them:

- GPT-2: Conv1D layers, whose weight is stored transposed ([in, out]);
- GPT-NeoX, Falcon: definitions mergekit_compat fits to current checkpoints;
- Phi-3: fused qkv and gate_up;
- Mixtral, Qwen-MoE, GLM-4-MoE, DeepSeek-V3, ...: MoE models whose expert stacks are 3-D.

For each: `adapter` (LoX) is what PEFT's merge_and_unload makes of it, and equals `run`;
`analyze` matches float64 on the matrices the methods decompose; `eval` answers greedily;
`lssf-calibrate` matches a float64 evaluation of Eq. 4 from the layers' own inputs, and the
calibrated merge and its adapter match float64; `safelora-adapter` on a LoRA trained by
`attack` matches float64. On Conv1D every formula is taken on W = W_storedᵀ [out, in].
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import reference as ref
import torch
import yaml
from conftest import run_cli
from test_architectures import ARCHITECTURES, build, conv1d_weights, linear
from test_architectures import recipe as lox_recipe  # LoX, alpha 1.25, rank 2, exact SVD
from transformers import AutoTokenizer

from mergekit_lox.adapters.command import CONVERTED_BY_PEFT
from mergekit_lox.demo.synthetic import load_state_dict, make_tokenizer

ConvNd = torch.nn.modules.conv._ConvNd

# Every causal LM of the matrix but Qwen2: transformers 5 loads any tokenizer beside a qwen2
# config as its byte-level Qwen2Tokenizer, which cannot read the word-level tokenizer these
# tiny models use (the commands then refuse in one line, naming the tokenizer; test_data).
SUBSET = [name for name, (model, _, _) in ARCHITECTURES.items() if model is None and name != "qwen2"]
PROMPTS = [{"prompt": f"w{i} w{i + 1} w{i + 2}", "response": f"w{i + 3} w{i + 4} w{i + 5}"} for i in range(10, 70, 6)]
_BUILT: dict = {}


def reference_dtype(model) -> torch.dtype:
    """float64, except for MoE models: transformers' grouped expert matmul has no float64
    kernel, so their reference runs in float32 (its SVDs are still float64), well within the
    tolerances below."""
    return torch.float32 if any(p.ndim == 3 for p in model.parameters()) else torch.float64


def lora_targets(model) -> str:
    """The attack's LoRA modules: every linear layer but the output head (GPT-2: its Conv1D
    layers), by name. (PEFT's all-linear on an MoE also targets the expert stacks as
    parameters: safelora-adapter's MoE case, tests/test_moe.py.)"""
    head = model.get_output_embeddings()
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if (isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D") and module is not head
    }
    return ",".join(sorted(names))


@pytest.fixture(params=SUBSET)
def family(request, tmp_path_factory):
    """base / aligned / finetuned of one architecture, with a word-level tokenizer, and a
    prompts file; built once per architecture (per worker)."""
    name = request.param
    if name not in _BUILT:
        root = tmp_path_factory.mktemp(name)
        paths = build(name, root)
        tokenizer = make_tokenizer(128)
        for path in paths.values():
            tokenizer.save_pretrained(path)
        prompts = root / "prompts.jsonl"
        prompts.write_text("".join(json.dumps(row) + "\n" for row in PROMPTS))
        _BUILT[name] = {"name": name, "root": root, "prompts": str(prompts), **paths}
    return _BUILT[name]


def causal_lm(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def states64(family, *roles):
    """Each role's float64 tensors on the layout transformers loads (fused expert stacks)."""
    return {r: {k: ref.f64(v) for k, v in causal_lm(family[r]).state_dict().items()} for r in roles}


def run_ok(args, capsys):
    code, out, err = run_cli(args, capsys)
    assert code == 0, err

    assert "Traceback" not in err and "RuntimeError" not in err
    return out, err


def write_recipe(path, document) -> str:
    path.write_text(yaml.safe_dump(document))
    return str(path)


def peft_merged(model_dir, adapter_dir) -> dict:
    from peft import PeftModel

    return PeftModel.from_pretrained(causal_lm(model_dir), adapter_dir).merge_and_unload().state_dict()


def test_lox_adapter_is_what_peft_merges_and_carries_every_linear_layer(family, tmp_path, capsys):
    recipe = lox_recipe(family, tmp_path)
    run_ok(["adapter", recipe, "-o", str(tmp_path / "adapter")], capsys)
    run_ok(["run", recipe, str(tmp_path / "merged"), "--quiet"], capsys)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    model = causal_lm(family["aligned"])
    conv1d = conv1d_weights(model)
    assert config["fan_in_fan_out"] == bool(conv1d)  # PEFT applies (B A)ᵀ to a Conv1D
    linear_layers = {
        f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"
    } | conv1d
    carried = {f"{module}.weight" for module in config["target_modules"]} | set(config.get("target_parameters") or [])
    left_out = json.loads((tmp_path / "adapter" / "mergekit_lox_adapter.json").read_text())["left_out"]
    converted = {name for name, why in left_out.items() if why == CONVERTED_BY_PEFT}  # see the GLM-4-MoE test
    assert linear_layers <= carried | converted, sorted(linear_layers - carried)  # GPT-2: all 8 Conv1D layers
    merged_names = set(load_state_dict(str(tmp_path / "merged")))
    stacks = {
        n
        for n, p in model.named_parameters()
        if p.ndim == 3 and n in merged_names and not isinstance(model.get_submodule(n.rsplit(".", 1)[0]), ConvNd)
    }
    assert stacks <= carried  # expert stacks the merge writes as stacks, through PEFT's target_parameters
    merged, expected = (
        peft_merged(family["aligned"], str(tmp_path / "adapter")),
        load_state_dict(str(tmp_path / "merged")),
    )
    worst = max(ref.rel_err(ref.f64(merged[n]), ref.f64(expected[n])) for n in carried)
    assert worst < 1e-5, worst


def test_analyze_matches_float64_on_the_matrices_the_methods_decompose(family, tmp_path, capsys):
    k = 2
    run_ok(
        ["analyze", "--base", family["base"], "--aligned", family["aligned"], "--finetuned", family["finetuned"]]
        + ["-o", str(tmp_path / "analysis"), "--k", str(k)],
        capsys,
    )
    rows = {r["name"]: r for r in json.loads((tmp_path / "analysis" / "analysis.json").read_text())["tensors"]}
    # analyze reads the layout mergekit merges (transformers' conversion: Mixtral's router is
    # model.layers.N.mlp.gate, its experts fused stacks), the layout transformers loads.
    stored = {
        r: {**load_state_dict(family[r]), **causal_lm(family[r]).state_dict()} for r in ("base", "aligned", "finetuned")
    }
    conv1d = conv1d_weights(causal_lm(family["aligned"]))
    checked = 0
    for name, row in rows.items():
        if len(row["shape"]) != 2:
            continue
        W_b, W_a, W_f = (linear(name, ref.f64(stored[r][name]), conv1d) for r in ("base", "aligned", "finetuned"))
        assert row["shape"] == list(W_a.shape), name  # [out, in] for a Conv1D
        tau = W_a - W_b
        U, S, _ = np.linalg.svd(tau, full_matrices=False)
        drift = W_f - W_b
        r_ft = np.linalg.norm(U[:, :k].T @ drift) / np.linalg.norm(drift)
        assert abs(row["r_ft"] - r_ft) < 1e-4, name
        assert abs(row["safelora_cos"] - ref.safelora_cosine(W_f, W_a, W_b)) < 1e-4, name
        checked += 1
    assert checked >= 8


def test_eval_answers_are_the_models_greedy_answers(family, tmp_path, capsys):
    """Each answer is the float64 model's greedy continuation, within rounding: at every step
    the answer's next token is within 1e-3 of the top logit (a near-tie may go either way on
    another CPU), or the top token is a special token, which the answer's text leaves out."""
    limit, new_tokens = 4, 3
    run_ok(
        ["eval", family["aligned"], "--safety", family["prompts"], "--limit", str(limit)]
        + ["--max-new-tokens", str(new_tokens), "-o", str(tmp_path / "eval")],
        capsys,
    )
    answers = [json.loads(line) for line in (tmp_path / "eval" / "answers.jsonl").read_text().splitlines()]
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())["models"][0]["safety"]
    assert len(answers) == result["n"] == limit
    assert result["refused"] == sum(a["verdict"] == "refused" for a in answers)
    model = causal_lm(family["aligned"])
    model = model.to(reference_dtype(model))
    tokenizer = AutoTokenizer.from_pretrained(family["aligned"])  # as the commands load it
    special = set(tokenizer.all_special_ids)
    for answer in answers:
        sequence = tokenizer(answer["prompt"], add_special_tokens=True)["input_ids"]
        wanted = tokenizer(answer["answer"], add_special_tokens=False)["input_ids"]
        assert len(wanted) <= new_tokens, answer
        for _ in range(new_tokens):
            if not wanted:
                break
            with torch.no_grad():
                row = model(torch.tensor([sequence])).logits[0, -1]
            if row[wanted[0]] >= row.max() - 1e-3:
                sequence.append(wanted.pop(0))
            else:
                top = int(row.argmax())
                assert top in special, (answer, "not greedy")
                sequence.append(top)
        assert not wanted, answer


def calibration_reference(family, texts):
    """Per linear weight, the SVD of Z = W X^ (float64, every token's input, unpadded)."""
    model = causal_lm(family["aligned"])
    model = model.to(reference_dtype(model))
    tokenizer = AutoTokenizer.from_pretrained(family["aligned"])  # as the commands load it
    conv1d = conv1d_weights(model)
    head = model.get_output_embeddings()
    inputs = {}
    layers = {
        name: module
        for name, module in model.named_modules()
        if (isinstance(module, torch.nn.Linear) or f"{name}.weight" in conv1d) and module is not head
    }
    hooks = [
        module.register_forward_hook(
            lambda m, a, o, name=name: inputs.setdefault(name, []).append(a[0].reshape(-1, a[0].shape[-1]).numpy())
        )
        for name, module in layers.items()
    ]
    with torch.no_grad():
        for text in texts:
            model(**tokenizer(text, return_tensors="pt"))
    for hook in hooks:
        hook.remove()
    spectra = {}
    for name, chunks in inputs.items():
        X = np.concatenate(chunks).astype(np.float64)
        X = X / np.linalg.norm(X, axis=1, keepdims=True)
        W = linear(f"{name}.weight", layers[name].weight.detach().double().numpy(), conv1d)
        U, S, _ = np.linalg.svd(W @ X.T, full_matrices=False)
        spectra[f"{name}.weight"] = (U, S)
    return spectra, conv1d


def test_calibrate_then_the_calibrated_merge_and_its_adapter_match_float64(family, tmp_path, capsys):
    from safetensors.torch import load_file

    subspace = str(tmp_path / "subspace")
    run_ok(
        ["lssf-calibrate", "--aligned", family["aligned"], "--prompts", family["prompts"]]
        + ["--response-column", "response", "--batch-size", "3", "-o", subspace],
        capsys,
    )
    basis = load_file(os.path.join(subspace, "subspace.safetensors"))
    texts = [f"{row['prompt']} {row['response']}" for row in PROMPTS]
    expected, conv1d = calibration_reference(family, texts)
    assert {n[: -len(".U")] for n in basis if n.endswith(".U")} == set(expected)
    for name, (U_ref, S_ref) in expected.items():
        S = ref.f64(basis[f"{name}.S"])
        valid = min(len(S), len(S_ref))
        assert np.abs(S[:valid] - S_ref[:valid]).max() < 1e-4 * S_ref[0], name
        U = ref.f64(basis[f"{name}.U"])
        assert U.shape[0] == U_ref.shape[0], name  # the output space: out rows, also for a Conv1D
        top = U[:, :1] @ U[:, :1].T, U_ref[:, :1] @ U_ref[:, :1].T  # S_1 > S_2 clearly: defined
        gap = S_ref[0] - (S_ref[1] if len(S_ref) > 1 else 0.0)  # a 1-output layer (a gate) has one value
        assert gap > 1e-2 * S_ref[0] and ref.rel_err(*top) < 1e-3, name

    document = {
        "merge_method": "lssf_fusion",
        "base_model": family["base"],
        "models": [
            {"model": family["aligned"], "parameters": {"role": "aligned"}},
            {"model": family["finetuned"], "parameters": {"role": "finetuned"}},
        ],
        "parameters": {"subspace": subspace, "rank": 1},
        "dtype": "float32",
    }
    recipe = write_recipe(tmp_path / "lssf.yml", document)
    run_ok(["run", recipe, str(tmp_path / "merged"), "--quiet"], capsys)
    run_ok(["adapter", recipe, "-o", str(tmp_path / "adapter")], capsys)
    merged = load_state_dict(str(tmp_path / "merged"))
    stored = {r: load_state_dict(family[r]) for r in ("base", "aligned", "finetuned")}
    for name in expected:
        W_b, W_a, W_f = (linear(name, ref.f64(stored[r][name]), conv1d) for r in ("base", "aligned", "finetuned"))
        stored_basis = (ref.f64(basis[f"{name}.U"]), ref.f64(basis[f"{name}.S"]))
        want = linear(name, ref.lssf(W_f, W_a, W_b, rank=1, basis=stored_basis), conv1d)
        assert ref.rel_err(ref.f64(merged[name]), want) < 1e-5, name
    through_peft = peft_merged(family["finetuned"], str(tmp_path / "adapter"))
    left_out = json.loads((tmp_path / "adapter" / "mergekit_lox_adapter.json").read_text())["left_out"]
    # Of the calibrated layers, the adapter leaves out only what PEFT cannot carry (GLM-4-MoE's dense MLP).
    assert all(why == CONVERTED_BY_PEFT for n, why in left_out.items() if n in expected), left_out
    worst = max(ref.rel_err(ref.f64(through_peft[n]), ref.f64(merged[n])) for n in expected if n not in left_out)
    assert worst < 1e-5, worst


def test_safelora_adapter_on_a_lora_trained_by_attack_matches_float64(family, tmp_path, capsys):
    from safetensors.torch import load_file

    attacked = tmp_path / "attack"
    run_ok(
        ["attack", family["aligned"], "--data", family["prompts"], "--answer-column", "response"]
        + ["--lora", "4", "--target-modules", lora_targets(causal_lm(family["aligned"]))]
        + ["--max-steps", "2", "--lr", "0.05", "-o", str(attacked)],
        capsys,
    )
    adapter = str(attacked / "adapter")
    run_ok(
        ["safelora-adapter", "--base", family["base"], "--aligned", family["aligned"], "--adapter", adapter]
        + ["--threshold", "2", "-o", str(tmp_path / "projected")],
        capsys,
    )
    config = json.loads(open(os.path.join(adapter, "adapter_config.json")).read())
    through_peft = peft_merged(family["aligned"], str(tmp_path / "projected"))
    if config.get("target_parameters"):
        # PEFT turned gate_proj / up_proj / down_proj targets into the expert stacks (GLM-4-MoE,
        # DeepSeek-V3, AFMoE): every adapted weight's update by PEFT's layouts (test_moe.lora_updates).
        from test_moe import loaded_state, lora_updates

        base, aligned = loaded_state(family["base"]), loaded_state(family["aligned"])
        updates = lora_updates(adapter, aligned)
        assert any(u.ndim == 3 for u in updates.values())
        for name, update in updates.items():
            want = ref.safelora(aligned[name] + update, aligned[name], base[name], threshold=2.0)
            assert ref.rel_err(ref.f64(through_peft[name]), want) < 1e-5, name
        return
    scaling = config["lora_alpha"] / config["r"]
    lora = {k: ref.f64(v) for k, v in load_file(os.path.join(adapter, "adapter_model.safetensors")).items()}
    stored = {r: load_state_dict(family[r]) for r in ("base", "aligned")}
    conv1d = conv1d_weights(causal_lm(family["aligned"]))
    modules = [k[len("base_model.model.") : -len(".lora_A.weight")] for k in lora if k.endswith(".lora_A.weight")]
    assert modules and (family["name"] != "gpt2" or all(f"{m}.weight" in conv1d for m in modules))
    if family["name"] == "llama":  # --target-modules all-linear: every linear layer but the head
        assert {m.rsplit(".", 1)[1] for m in modules} == {"q_proj", "k_proj", "v_proj", "o_proj"} | {
            "gate_proj",
            "up_proj",
            "down_proj",
        }
    for module in modules:
        name = f"{module}.weight"
        W_b, W_a = (linear(name, ref.f64(stored[r][name]), conv1d) for r in ("base", "aligned"))
        prefix = f"base_model.model.{module}"
        update = scaling * lora[f"{prefix}.lora_B.weight"] @ lora[f"{prefix}.lora_A.weight"]  # [out, in]
        want = ref.safelora(W_a + update, W_a, W_b, threshold=2.0)  # every module projected
        assert ref.rel_err(linear(name, ref.f64(through_peft[name]), conv1d), want) < 1e-5, name


def test_the_python_api_takes_gpt2_modules_as_linear_maps(tmp_path):
    """api.safelora / api.lox_adapter on GPT-2 nn.Modules: the Conv1D weights are projected on
    the output side (float64 on W = W_storedᵀ), and PEFT merges the LoX adapter to api.lox."""
    from peft import PeftModel

    from mergekit_lox import api

    paths = build("gpt2", tmp_path)
    base, aligned, finetuned = (causal_lm(paths[r]) for r in ("base", "aligned", "finetuned"))
    conv1d = conv1d_weights(aligned)
    merged = api.safelora(base, aligned, finetuned, threshold=2.0)
    states = {
        r: {k: ref.f64(v) for k, v in m.state_dict().items()}
        for r, m in (("b", base), ("a", aligned), ("f", finetuned))
    }
    for name in conv1d:
        W_b, W_a, W_f = (linear(name, states[r][name], conv1d) for r in ("b", "a", "f"))
        want = linear(name, ref.safelora(W_f, W_a, W_b, threshold=2.0), conv1d)
        assert ref.rel_err(ref.f64(merged[name]), want) < 1e-5, name
    adapter = api.lox_adapter(base, aligned, alpha=1.25, rank=2, svd="exact", out=str(tmp_path / "adapter"))
    assert adapter.config.fan_in_fan_out and {f"{m}.weight" for m in adapter.config.target_modules} >= conv1d
    through_peft = PeftModel.from_pretrained(aligned, str(tmp_path / "adapter")).merge_and_unload().state_dict()
    expected = api.lox(base, causal_lm(paths["aligned"]), alpha=1.25, rank=2, svd="exact")
    assert max(ref.rel_err(ref.f64(through_peft[n]), ref.f64(expected[n])) for n in conv1d) < 1e-5


def test_a_damaged_checkpoint_is_refused_by_the_generating_commands(tmp_path, capsys):
    """transformers would fill a tensor the checkpoint lacks with random values and go on:
    eval, lssf-calibrate and attack refuse it in one line, naming the tensor, writing nothing."""
    from safetensors.torch import load_file, save_file

    paths = build("llama", tmp_path)
    make_tokenizer(128).save_pretrained(paths["aligned"])
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in PROMPTS))
    shard = os.path.join(paths["aligned"], "model.safetensors")
    tensors = load_file(shard)
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, shard, metadata={"format": "pt"})
    aligned, data = paths["aligned"], str(prompts)
    for command in (
        ["eval", aligned, "--safety", data, "--max-new-tokens", "2", "-o", str(tmp_path / "out")],
        ["lssf-calibrate", "--aligned", aligned, "--prompts", data, "-o", str(tmp_path / "out")],
        ["attack", aligned, "--data", data, "--answer-column", "response", "--full", "-o", str(tmp_path / "out")],
    ):
        code, _, err = run_cli(command, capsys)
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 1 and len(errors) == 1, (command[0], err)
        assert "model.layers.1.mlp.down_proj.weight" in errors[0] and aligned in errors[0], errors[0]
        assert not os.path.exists(tmp_path / "out"), command[0]


def test_a_capped_adapter_keeps_each_experts_best_approximation(tmp_path, capsys):
    """--max-rank on an expert stack caps every expert's term to its own best rank-1
    approximation (float64 SVD of that expert's term), which PEFT merges back."""

    paths = build("mixtral", tmp_path)
    recipe = lox_recipe(paths, tmp_path)
    run_ok(["adapter", recipe, "--max-rank", "1", "-o", str(tmp_path / "adapter")], capsys)
    run_ok(["run", recipe, str(tmp_path / "merged"), "--quiet"], capsys)
    merged = load_state_dict(str(tmp_path / "merged"))
    aligned = causal_lm(paths["aligned"]).state_dict()
    through_peft = peft_merged(paths["aligned"], str(tmp_path / "adapter"))
    stacks = [n for n, t in aligned.items() if t.ndim == 3]
    assert stacks
    for name in stacks:
        term = ref.f64(merged[name]) - ref.f64(aligned[name])
        capped = np.stack([ref.lowrank(matrix, 1) for matrix in term])
        assert ref.rel_err(ref.f64(through_peft[name]), ref.f64(aligned[name]) + capped) < 1e-5, name


def test_modules_peft_converts_into_expert_stacks_are_left_out_and_named(tmp_path, capsys):
    """On GLM-4-MoE PEFT 0.21 reads a LoRA on any module named gate_proj / up_proj / down_proj
    (the dense first layer's MLP, the shared experts: nn.Linear) as one on the expert stacks,
    with twice the rank. The adapter leaves those modules out, naming them, so that PEFT loads
    it, and merges it to the LoX merge on everything it carries, the stacks included."""
    paths = build("glm4-moe", tmp_path)
    recipe = lox_recipe(paths, tmp_path)
    out, _ = run_ok(["adapter", recipe, "-o", str(tmp_path / "adapter")], capsys)
    run_ok(["run", recipe, str(tmp_path / "merged"), "--quiet"], capsys)
    left_out = json.loads((tmp_path / "adapter" / "mergekit_lox_adapter.json").read_text())["left_out"]
    dense = {f"model.layers.0.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")}
    shared = {f"model.layers.1.mlp.shared_experts.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")}
    assert set(left_out) == dense | shared and all(why == CONVERTED_BY_PEFT for why in left_out.values())
    assert all(name in out for name in left_out)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    carried = {f"{m}.weight" for m in config["target_modules"]} | set(config["target_parameters"])
    assert {"model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"} <= carried
    merged = load_state_dict(str(tmp_path / "merged"))
    through_peft = peft_merged(paths["aligned"], str(tmp_path / "adapter"))  # loads: no size mismatch
    assert max(ref.rel_err(ref.f64(through_peft[n]), ref.f64(merged[n])) for n in carried) < 1e-5
