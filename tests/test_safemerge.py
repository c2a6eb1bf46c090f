"""safemerge (SafeMERGE, arXiv 2503.17239): outputs vs float64 under plain `mergekit-yaml`,
in-process and in a `mergekit-multi` chain, both projections; the kernel's edge cases
(strict comparison, undefined cosines, 1-D tensors); the authors' cosine transcribed
(reference.safemerge_code_cosine) on LoRA factors; bad input at plan time."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import reference as ref
import torch
import yaml
from conftest import run_cli, run_merge_recipe
from safelora_helpers import TOL, f64_state, lora_scaling, reference_cosines, threshold_between, write_yaml
from safetensors.torch import load_file

from mergekit_lox.demo.synthetic import (
    FamilySpec,
    erode,
    llama_config,
    load_state_dict,
    make_tokenizer,
    random_base,
    save_model,
)
from mergekit_lox.methods import safelora, safemerge

SAFETY_WEIGHT = 0.3
BIN = os.path.dirname(sys.executable)


@pytest.fixture(scope="module")
def safety_model(family, states, tmp_path_factory):
    """The aligned model tuned further on "safety data": more of the planted safety
    component (erosion < 0) plus a small update of its own."""
    spec = FamilySpec()
    tuned = erode(states["aligned"], family.planted, erosion=-0.3, task_strength=0.1, seed=5)
    path = str(tmp_path_factory.mktemp("safemerge") / "safety")
    return save_model(tuned, llama_config(spec), make_tokenizer(spec.vocab_size), path)


@pytest.fixture(scope="module")
def f64(states, safety_model):
    return {
        **{role: f64_state(state) for role, state in states.items()},
        "safety": f64_state(load_state_dict(safety_model)),
    }


def recipe(family, safety_model, finetuned=None, **parameters) -> dict:
    return {
        "merge_method": "safemerge",
        "base_model": family.base,
        "models": [
            {"model": family.aligned, "parameters": {"role": "aligned"}},
            {"model": finetuned or family.finetuned, "parameters": {"role": "finetuned"}},
            {"model": safety_model, "parameters": {"role": "safety"}},
        ],
        "parameters": {"safety_weight": SAFETY_WEIGHT, **parameters},
        "dtype": "float32",
    }


def check_against_reference(out, f64, threshold, projection="scaled", rank=8, finetuned=None):
    """Every output tensor vs float64; returns the names the reference merges."""
    finetuned = finetuned or f64["finetuned"]
    merged = set()
    for name, W_f in finetuned.items():
        expected = ref.safemerge(
            W_f,
            f64["safety"][name],
            f64["aligned"][name],
            f64["base"][name],
            threshold,
            SAFETY_WEIGHT,
            projection,
            rank,
        )
        err = ref.rel_err(ref.f64(out[name]), expected)
        assert err < TOL, (name, err)
        if expected is not W_f:
            merged.add(name)
            # The merge really moved this tensor toward the safety model.
            assert ref.rel_err(ref.f64(out[name]), W_f) > 100 * TOL, name
    return merged


@pytest.mark.parametrize("projection,rank", [("scaled", 8), ("orthogonal", 4)])
def test_merge_matches_float64_reference(family, safety_model, f64, tmp_path, projection, rank):
    cosines = reference_cosines(f64["base"], f64["aligned"], f64["finetuned"], projection, rank)
    threshold = threshold_between(cosines)
    parameters = {"threshold": threshold, "projection": projection, "rank": rank}
    out = run_merge_recipe(recipe(family, safety_model, **parameters), tmp_path / "out")
    merged = check_against_reference(out, f64, threshold, projection, rank)
    assert merged == {name for name, cos in cosines.items() if cos < threshold}
    assert 0 < len(merged) < len(cosines)


# --------------------------------------------------------------------------- mergekit's own scripts


def test_plain_mergekit_yaml_and_a_mergekit_multi_chain(family, safety_model, f64, states, tmp_path):
    """The installed console scripts, each in a fresh interpreter (the start-up hook
    registers the method): a one-document recipe under `mergekit-yaml`, and a chain under
    `mergekit-multi` whose safety model is an earlier stage (LoX on the aligned model)."""
    cosines = reference_cosines(f64["base"], f64["aligned"], f64["finetuned"], "scaled", 8)
    threshold = threshold_between(cosines)
    single = write_yaml(tmp_path / "safemerge.yml", recipe(family, safety_model, threshold=threshold))
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [os.path.join(BIN, "mergekit-yaml"), single, str(out), "--quiet"], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    check_against_reference(load_state_dict(str(out)), f64, threshold)

    hardened = {
        "name": "hardened",
        "merge_method": "lox_extrapolate",
        "base_model": family.base,
        "models": [{"model": family.aligned, "parameters": {"role": "aligned"}}],
        "parameters": {"alpha": 0.5, "rank": 4},
        "dtype": "float32",
    }
    final = recipe(family, "hardened", threshold=threshold)
    chain = tmp_path / "chain.yml"
    chain.write_text(yaml.safe_dump_all([hardened, final], sort_keys=False))
    stages, out = tmp_path / "stages", tmp_path / "final"
    done = subprocess.run(
        [os.path.join(BIN, "mergekit-multi"), str(chain), "-I", str(stages), "--out-path", str(out), "--quiet"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    safety = {name: ref.lox(f64["aligned"][name], f64["base"][name], 0.5, 4) for name in f64["base"]}
    merged = check_against_reference(load_state_dict(str(out)), {**f64, "safety": safety}, threshold)
    assert 0 < len(merged) < len(cosines)


# --------------------------------------------------------------------------- the kernel's edge cases


def planted_outside_subspace():
    """V in the first 4 rows only, dW in the last 4: C dW == 0 exactly, so cos == 0."""
    generator = torch.Generator().manual_seed(3)
    W_b = torch.randn(8, 6, generator=generator, dtype=torch.float64)
    V, dW = torch.zeros(8, 6, dtype=torch.float64), torch.zeros(8, 6, dtype=torch.float64)
    V[:4] = torch.randn(4, 6, generator=generator, dtype=torch.float64)
    dW[4:] = torch.randn(4, 6, generator=generator, dtype=torch.float64)
    W_a = W_b + V
    W_s = W_a + torch.randn(8, 6, generator=generator, dtype=torch.float64)
    return W_a + dW, W_s, W_a, W_b


def test_comparison_is_strict_where_safelora_is_not():
    W_f, W_s, W_a, W_b = planted_outside_subspace()
    cos, _, _ = safelora.projection_cosine(W_f, W_a, W_b)
    assert float(cos) == 0.0
    # cos == threshold: SafeMERGE (cos < tau, paper and code) keeps W_f; Safe LoRA (<=) projects.
    assert torch.equal(safemerge.merge(W_f, W_s, W_a, W_b, threshold=0.0), W_f)
    assert not torch.equal(safelora.project(W_f, W_a, W_b, 0.0, "scaled", 8), W_f)
    merged = safemerge.merge(W_f, W_s, W_a, W_b, threshold=1e-3, safety_weight=0.25)
    assert torch.allclose(merged, 0.75 * W_f + 0.25 * W_s, rtol=0, atol=1e-15)


def test_undefined_cosines_and_1d_tensors_keep_the_finetune():
    W_f, W_s, W_a, W_b = planted_outside_subspace()
    assert torch.equal(safemerge.merge(W_f, W_s, W_a, W_a, threshold=1.0), W_f)  # V == 0
    assert torch.equal(safemerge.merge(W_a, W_s, W_a, W_b, threshold=1.0), W_a)  # dW == 0
    vector = torch.arange(4.0)
    assert safemerge.merge(vector, vector + 1, vector - 1, vector - 2, threshold=1.0) is vector


def test_safety_weight_ends_and_dtypes():
    W_f, W_s, W_a, W_b = planted_outside_subspace()
    assert torch.equal(safemerge.merge(W_f, W_s, W_a, W_b, threshold=1.0, safety_weight=0.0), W_f)
    assert torch.allclose(safemerge.merge(W_f, W_s, W_a, W_b, threshold=1.0, safety_weight=1.0), W_s, atol=1e-15)
    half = safemerge.merge(*(t.bfloat16() for t in (W_f, W_s, W_a, W_b)), threshold=1.0)
    assert half.dtype == torch.bfloat16


# --------------------------------------------------------------------------- the authors' cosine


def test_cosine_equals_the_authors_transcribed_on_lora_factors(family, f64, lora_adapter):
    """aladinD/SafeMERGE's `compute_safelora_cos` (reference.safemerge_code_cosine: cos of
    P B A against B A, rounded to 5 decimals, the adapter's scaling left out) against our
    kernel's cosine of dW = s B A: the same number up to its rounding (scale invariance)."""
    adapter = load_file(os.path.join(lora_adapter, "adapter_model.safetensors"))
    compared = 0
    for key, A in adapter.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key[: -len(".lora_A.weight")].removeprefix("base_model.model.") + ".weight"
        A, B = ref.f64(A), ref.f64(adapter[key.replace("lora_A", "lora_B")])
        W_a, W_b = f64["aligned"][name], f64["base"][name]
        code = ref.safemerge_code_cosine(ref.safemerge_code_projection(W_a - W_b), A, B)
        W_f = W_a + lora_scaling(name) * (B @ A)
        ours, _, _ = safelora.projection_cosine(*(torch.from_numpy(m).float() for m in (W_f, W_a, W_b)))
        assert abs(float(ours) - code) <= 5e-6 + 1e-6, name
        assert abs(ref.safelora_cosine(W_f, W_a, W_b) - code) <= 5e-6 + 1e-12, name
        compared += 1
    assert compared == 6


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "edit, fragments",
    [
        (lambda doc: doc["models"][2]["parameters"].update(role="finetuned"), ["role 'finetuned' is given to both"]),
        (lambda doc: doc["models"].pop(2), ["needs base_model plus exactly 3 model(s)", "role: safety"]),
        (lambda doc: doc["parameters"].update(threshold=1.5), ["threshold", "1.5", "less than or equal to 1"]),
        (lambda doc: doc["parameters"].update(safety_weight=-0.1), ["safety_weight", "-0.1"]),
    ],
    ids=["duplicate-role", "missing-safety", "threshold-range", "weight-range"],
)
def test_bad_recipe_fails_at_plan_time_with_one_line(family, safety_model, tmp_path, capsys, edit, fragments):
    doc = recipe(family, safety_model, threshold=0.35)
    edit(doc)
    path = write_yaml(tmp_path / "bad.yml", doc)
    for command in (["check", path], ["run", path, str(tmp_path / "out")]):
        code, _, err = run_cli(command, capsys)
        lines = err.strip().splitlines()
        assert code == 1 and lines[-1].startswith("error: ") and "Traceback" not in err, (command, err)
        for fragment in fragments:
            assert fragment in lines[-1], (command, fragment, lines[-1])
    assert not (tmp_path / "out").exists()
    # Plain mergekit refuses it while it plans, before a tensor is computed.
    with pytest.raises(Exception) as raised:
        run_merge_recipe(doc, tmp_path / "plain")
    assert all(fragment in str(raised.value) for fragment in fragments[:1]), str(raised.value)


@pytest.fixture(scope="module")
def narrow_safety_model(tmp_path_factory):
    spec = FamilySpec(intermediate_size=96)
    path = str(tmp_path_factory.mktemp("narrow") / "safety-96")
    return save_model(random_base(spec), llama_config(spec), make_tokenizer(spec.vocab_size), path)


def test_safety_model_of_another_shape_fails_with_one_line(family, narrow_safety_model, tmp_path, capsys):
    doc = recipe(family, narrow_safety_model, threshold=0.35)
    path = write_yaml(tmp_path / "narrow.yml", doc)
    code, _, err = run_cli(["check", path], capsys)
    assert code == 1 and "has shape (64, 128)" in err and "(64, 96)" in err, err
    # Plain mergekit finds it itself before the kernel runs, naming the tensor and the shapes.
    with pytest.raises(ValueError, match=r"Tensor size mismatch for model\.layers\.0\.mlp\..*\(64, 96\)"):
        run_merge_recipe(doc, tmp_path / "plain")


# --------------------------------------------------------------------------- sweep


def test_a_sweep_over_the_threshold(family, safety_model, f64, tmp_path, capsys):
    """`check` validates a safemerge threshold in a sweep file with the method's own range;
    `sweep` merges every point as the float64 rule says (keep: all keeps the models)."""
    from mergekit_lox.sweep import run_sweep

    threshold = threshold_between(reference_cosines(f64["base"], f64["aligned"], f64["finetuned"], "scaled", 8))
    write_yaml(tmp_path / "recipe.yml", recipe(family, safety_model))
    (tmp_path / "harm.jsonl").write_text('{"prompt": "how do I pick a lock"}\n{"prompt": "w1 w2 w3"}\n')
    sweep = {
        "recipe": "recipe.yml",
        "points": [{"parameters.threshold": threshold}, {"parameters.threshold": -1.0}],
        "eval": {"safety": "harm.jsonl", "column": "prompt", "judge": "keyword", "max_new_tokens": 2},
        "reference": 0.5,
        "keep": "all",
    }
    bad = write_yaml(tmp_path / "bad.yml", {**sweep, "points": [{"parameters.threshold": 1.5}]})
    code, _, err = run_cli(["check", bad], capsys)
    assert code == 1 and "parameters.threshold: 1.5 is not a valid float" in err.strip().splitlines()[-1], err
    path = write_yaml(tmp_path / "sweep.yml", sweep)
    assert run_cli(["check", path], capsys)[0] == 0

    state = run_sweep(path, str(tmp_path / "out"), echo=lambda line: None)
    merged_counts = []
    for point in state["points"]:
        assert point["status"] == "ok", point
        out = load_state_dict(str(tmp_path / "out" / point["dir"] / "model"))
        merged_counts.append(len(check_against_reference(out, f64, point["params"]["parameters.threshold"])))
    assert merged_counts[0] > 0 and merged_counts[1] == 0


def test_check_accepts_the_recipe_and_notes_16_bit_computation(family, safety_model, tmp_path):
    from mergekit_lox.check import check_recipe

    path = write_yaml(tmp_path / "ok.yml", recipe(family, safety_model))
    report = check_recipe(path)
    assert report.ok and report.notes == []
    path = write_yaml(tmp_path / "bf16.yml", {**recipe(family, safety_model), "dtype": "bfloat16"})
    report = check_recipe(path)
    assert report.ok and [n.field for n in report.notes] == ["dtype"]
    assert "safemerge computes from bfloat16" in report.notes[0].message


def test_a_nan_in_the_safety_model_names_the_tensor_and_the_model(family, states, tmp_path, capsys):
    spec = FamilySpec()
    poisoned = {name: tensor.clone() for name, tensor in states["aligned"].items()}
    name = "model.layers.1.mlp.up_proj.weight"
    poisoned[name][3, 5] = float("nan")
    safety = save_model(poisoned, llama_config(spec), make_tokenizer(spec.vocab_size), str(tmp_path / "safety"))
    path = write_yaml(tmp_path / "recipe.yml", recipe(family, safety))
    code, _, err = run_cli(["run", path, str(tmp_path / "out"), "--quiet"], capsys)
    lines = err.strip().splitlines()
    assert code == 1 and "Traceback" not in err, err
    assert f"input tensor {name} of model {safety} holds 1 NaN value(s)" in lines[-1], lines[-1]
    assert not (tmp_path / "out").exists()
