"""safelora_project: outputs vs float64 (both projections, a PEFT LoRA fine-tune),
the kernel's edge cases, number mode (`safelora-select`) and `run`'s LoRA cache."""

from __future__ import annotations

import os

import pytest
import reference as ref
import torch
from conftest import run_merge_recipe
from safelora_helpers import (
    MIN_GAP,
    TOL,
    check_against_reference,
    f64_state,
    lora_scaling,
    recipe,
    reference_cosines,
    threshold_between,
    write_yaml,
)
from safetensors.torch import load_file

from mergekit_lox.demo.synthetic import load_state_dict
from mergekit_lox.methods import safelora
from mergekit_lox.safelora_tools import SafeLoRAToolError, Scored, read_recipe, safelora_select, select_lowest


@pytest.fixture(scope="module")
def f64(states):
    return {role: f64_state(state) for role, state in states.items()}


@pytest.fixture(scope="module")
def lora_finetuned(f64, lora_adapter):
    """Float64 W_f = W_a + s B A, from the adapter file itself."""
    adapter = {k: ref.f64(v) for k, v in load_file(os.path.join(lora_adapter, "adapter_model.safetensors")).items()}
    return ref.peft_lora_finetuned(f64["aligned"], adapter, lora_scaling)


# --------------------------------------------------------------------------- merges vs float64


@pytest.mark.parametrize("projection,rank", [("scaled", 8), ("orthogonal", 4), ("orthogonal", 8)])
def test_merge_matches_float64_reference(family, f64, tmp_path, projection, rank):
    cosines = reference_cosines(f64["base"], f64["aligned"], f64["finetuned"], projection, rank)
    threshold = threshold_between(cosines)
    parameters = {"threshold": threshold, "projection": projection, "rank": rank}
    out = run_merge_recipe(recipe(family, family.finetuned, **parameters), tmp_path / "out")
    projected = check_against_reference(out, f64["base"], f64["aligned"], f64["finetuned"], threshold, projection, rank)
    assert projected == {name for name, cos in cosines.items() if cos <= threshold}
    assert 0 < len(projected) < len(cosines)


def test_lora_finetune_matches_float64_reference(family, f64, lora_adapter, lora_finetuned, tmp_path):
    """`model: aligned+adapter_dir` as the fine-tune; dW is non-zero only on LoRA modules."""
    cosines = reference_cosines(f64["base"], f64["aligned"], lora_finetuned, "scaled", 8)
    assert len(cosines) == 6  # 2 layers x (q_proj, v_proj, down_proj)
    threshold = threshold_between(cosines)
    out = run_merge_recipe(
        recipe(family, f"{family.aligned}+{lora_adapter}", threshold=threshold),
        tmp_path / "out",
        lora_merge_cache=str(tmp_path / "cache"),
    )
    projected = check_against_reference(out, f64["base"], f64["aligned"], lora_finetuned, threshold, "scaled", 8)
    assert 0 < len(projected) < len(cosines)


# --------------------------------------------------------------------------- kernel edge cases


def random_matrices(shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(3)]


def test_one_dimensional_and_zero_updates_pass_the_finetuned_tensor():
    W_b, W_a, W_f = random_matrices((16,))
    assert torch.equal(safelora.project(W_f, W_a, W_b, 1.0, "scaled", 8), W_f)
    W_b, W_a, _ = random_matrices((12, 10))
    for projection in ("scaled", "orthogonal"):
        # dW == 0: nothing to project even with a threshold every cosine meets.
        assert torch.equal(safelora.project(W_a, W_a, W_b, 1.0, projection, 4), W_a)
        # V == 0: the alignment subspace is empty; the fine-tune passes.
        W_f = W_a + 0.1 * W_b
        assert torch.equal(safelora.project(W_f, W_a, W_a, 1.0, projection, 4), W_f)


@pytest.mark.parametrize("projection", ["scaled", "orthogonal"])
def test_update_outside_the_alignment_subspace_is_removed(projection):
    """C dW == 0 (dW orthogonal to V's columns): cos is 0, its limit, as in the
    reference's cosine_similarity; the tensor is projected, to W_a exactly."""
    W_b, W_a, W_f = random_matrices((12, 10), seed=1)
    W_a = W_b.clone()
    W_a[:3] += torch.randn(3, 10)  # V lives in rows 0..2
    W_f = W_a.clone()
    W_f[5:] += torch.randn(7, 10)  # dW lives in rows 5.. only
    cos, _, _ = safelora.projection_cosine(W_f, W_a, W_b, projection, 2)
    assert float(cos) == pytest.approx(0.0, abs=1e-6)
    expected = ref.safelora(ref.f64(W_f), ref.f64(W_a), ref.f64(W_b), 0.5, projection, 2)
    assert ref.rel_err(ref.f64(safelora.project(W_f, W_a, W_b, 0.5, projection, 2)), expected) < TOL
    assert ref.rel_err(expected, ref.f64(W_a)) < TOL
    assert torch.equal(safelora.project(W_f, W_a, W_b, -0.5, projection, 2), W_f)


def test_orthogonal_projection_ignores_directions_v_does_not_have():
    """rank > rank(V): U's extra columns are an arbitrary null-space basis; not used."""
    generator = torch.Generator().manual_seed(2)
    W_b = torch.randn(20, 16, generator=generator)
    V = torch.randn(20, 2, generator=generator) @ torch.randn(2, 16, generator=generator)
    W_a = W_b + V
    W_f = W_a + torch.randn(20, 16, generator=generator)
    U = torch.linalg.svd(V.double())[0][:, :2]
    expected = ref.f64(W_a) + ref.f64(U @ U.T) @ ref.f64(W_f - W_a)
    out = safelora.project(W_f, W_a, W_b, 1.0, "orthogonal", 8)
    assert ref.rel_err(ref.f64(out), expected) < TOL


@pytest.mark.parametrize("projection", ["scaled", "orthogonal"])
def test_stack_of_matrices_is_projected_per_matrix(projection):
    W_b, W_a, W_f = random_matrices((3, 9, 7), seed=3)
    args = [ref.f64(W_f), ref.f64(W_a), ref.f64(W_b)]
    cos = ref.safelora_cosine(*args, projection, 4)
    for threshold in (cos + 0.01, cos - 0.01):
        expected = ref.safelora(*args, threshold, projection, 4)
        out = safelora.project(W_f, W_a, W_b, threshold, projection, 4)
        assert ref.rel_err(ref.f64(out), expected) < TOL
    assert expected is args[0]  # the last threshold (below cos) keeps W_f


class MatmulShapes(torch.overrides.TorchFunctionMode):
    """Records the shape of every tensor a torch function returns."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for value in result if isinstance(result, tuple) else (result,):
            if isinstance(value, torch.Tensor):
                self.shapes.append(tuple(value.shape))
        return result


@pytest.mark.parametrize("projection", ["scaled", "orthogonal"])
def test_tall_matrix_never_builds_an_out_by_out_matrix(projection):
    out_features, in_features = 96, 8
    W_b, W_a, W_f = random_matrices((out_features, in_features), seed=4)
    with MatmulShapes() as recorder:
        result = safelora.project(W_f, W_a, W_b, 1.0, projection, 4)
    assert recorder.shapes, "the recorder saw no torch call"
    assert (out_features, out_features) not in recorder.shapes
    expected = ref.safelora(ref.f64(W_f), ref.f64(W_a), ref.f64(W_b), 1.0, projection, 4)
    assert ref.rel_err(ref.f64(result), expected) < TOL


def forget_merged_loras():
    """mergekit caches loaders per process (a class-level dict): forget earlier
    tests' LoRA merges so the next call must merge again, into its own cache."""
    from mergekit.io.tasks import LoaderCache

    LoaderCache().loaders.clear()


# --------------------------------------------------------------------------- number mode


def test_select_threshold_is_the_nth_lowest_cosine(family, states, f64, tmp_path):
    num_layers = 5
    original = recipe(family, family.finetuned, threshold=0.5)
    source = write_yaml(tmp_path / "recipe.yml", original)
    out = str(tmp_path / "selected.yml")
    printed = []
    threshold, selected = safelora_select(source, num_layers, out, echo=printed.append)

    cosines = reference_cosines(f64["base"], f64["aligned"], f64["finetuned"], "scaled", 8)
    ranked = sorted(cosines, key=cosines.get)
    assert cosines[ranked[num_layers]] - cosines[ranked[num_layers - 1]] > MIN_GAP
    # Midway between the N-th and the (N+1)-th cosine, so that no recomputation decides it.
    midway = (cosines[ranked[num_layers - 1]] + cosines[ranked[num_layers]]) / 2
    assert threshold == pytest.approx(midway, abs=1e-5)
    assert [s.name for s in selected] == ranked[:num_layers]
    # The float64 recomputation of every cosine selects the same N tensors.
    assert {n for n, c in cosines.items() if c <= threshold} == set(ranked[:num_layers])
    assert not any(line.startswith("warning:") for line in printed)
    for s in selected:
        assert s.cos == pytest.approx(cosines[s.name], abs=1e-5)
        assert any(s.name in line for line in printed)

    written = read_recipe(out)
    assert written == {**original, "parameters": {"threshold": threshold}}
    # Running the written recipe (float32, this CPU's BLAS path) projects exactly the
    # selected tensors.
    merged = run_merge_recipe(written, tmp_path / "merged")
    projected = check_against_reference(merged, f64["base"], f64["aligned"], f64["finetuned"], threshold, "scaled", 8)
    assert projected == set(ranked[:num_layers])
    changed = {n for n, t in merged.items() if not torch.equal(t, states["finetuned"][n])}
    assert changed == set(ranked[:num_layers])


def test_select_on_a_lora_finetune_with_orthogonal_projection(family, f64, lora_adapter, lora_finetuned, tmp_path):
    """Per-tensor parameters come from the recipe; `aligned+adapter` is merged into
    the default cache beside OUT; only the LoRA modules have a cosine."""
    # svd: exact, so the cosines can be held to 1e-5 (auto's are certified to the
    # Agreement's 1e-3 on the low-rank term: tests/test_linalg.py).
    parameters = {"projection": "orthogonal", "rank": 4, "svd": "exact"}
    source = write_yaml(tmp_path / "recipe.yml", recipe(family, f"{family.aligned}+{lora_adapter}", **parameters))
    out = str(tmp_path / "selected.yml")
    forget_merged_loras()
    threshold, selected = safelora_select(source, 2, out, echo=lambda line: None)

    cosines = reference_cosines(f64["base"], f64["aligned"], lora_finetuned, "orthogonal", 4)
    ranked = sorted(cosines, key=cosines.get)
    assert cosines[ranked[2]] - cosines[ranked[1]] > MIN_GAP
    assert [s.name for s in selected] == ranked[:2]
    assert threshold == pytest.approx((cosines[ranked[1]] + cosines[ranked[2]]) / 2, abs=1e-5)
    assert read_recipe(out)["parameters"] == {**parameters, "threshold": threshold}
    assert os.path.isdir(out + ".lora-cache")


def test_select_errors_name_the_problem(family, tmp_path):
    scores = [Scored("a", 0.1), Scored("b", 0.3), Scored("c", 0.2)]
    assert select_lowest(scores, 2, "x") == (pytest.approx(0.25), [Scored("a", 0.1), Scored("c", 0.2)])
    assert select_lowest(scores + [Scored("d", 0.2)], 2, "x")[1][-1] == Scored("d", 0.2)  # ties
    assert select_lowest(scores, 3, "x", accuracy=1e-3) == (pytest.approx(0.301), sorted(scores, key=lambda s: s.cos))
    warnings = []
    close = [Scored("a", 0.1), Scored("b", 0.2), Scored("c", 0.2 + 1e-7)]
    threshold, selected = select_lowest(close, 2, "recipe r.yml", accuracy=1e-5, warn=warnings.append)
    assert [s.name for s in selected] == ["a", "b"] and 0.2 < threshold < 0.2 + 1e-7
    assert len(warnings) == 1 and "(b, 0.2)" in warnings[0] and "(c, 0.2000001)" in warnings[0]
    assert select_lowest(close, 2, "r", accuracy=1e-8, warn=warnings.append) and len(warnings) == 1
    with pytest.raises(SafeLoRAToolError, match="--num-layers 4 but recipe r.yml has only 3"):
        select_lowest(scores, 4, "recipe r.yml")
    lssf = write_yaml(tmp_path / "lssf.yml", {**recipe(family, family.finetuned), "merge_method": "lssf_fusion"})
    with pytest.raises(SafeLoRAToolError, match="has merge_method 'lssf_fusion'"):
        safelora_select(lssf, 1, str(tmp_path / "o.yml"))
    invalid = write_yaml(tmp_path / "invalid.yml", {**recipe(family, family.finetuned), "models": 3})
    with pytest.raises(SafeLoRAToolError, match="(?s)invalid.yml is not a valid mergekit recipe: .*models"):
        safelora_select(invalid, 1, str(tmp_path / "o.yml"))
    chain = tmp_path / "chain.yml"
    chain.write_text("merge_method: safelora_project\n---\nmerge_method: safelora_project\n")
    with pytest.raises(SafeLoRAToolError, match="must be one YAML mapping"):
        safelora_select(str(chain), 1, str(tmp_path / "o.yml"))
    with pytest.raises(SafeLoRAToolError, match="inside the input model directory"):
        safelora_select(
            write_yaml(tmp_path / "ok.yml", recipe(family, family.finetuned)),
            1,
            os.path.join(family.aligned, "selected.yml"),
        )
    assert not os.path.exists(os.path.join(family.aligned, "selected.yml"))


# --------------------------------------------------------------------------- `run` and LoRA


def test_run_supplies_a_lora_merge_cache_beside_out(family, f64, lora_adapter, lora_finetuned, tmp_path):
    from mergekit_lox.cli import default_mergekit_args, main

    out = str(tmp_path / "out")
    assert default_mergekit_args(out, ["--cuda"]) == ["--lora-merge-cache", out + ".lora-cache"]
    assert default_mergekit_args(out, ["--lora-merge-cache", "x"]) == []
    assert default_mergekit_args(out, ["--lora-merge-cache=x"]) == []

    inputs_before = {d: sorted(os.listdir(d)) for d in (family.aligned, lora_adapter)}
    source = write_yaml(tmp_path / "recipe.yml", recipe(family, f"{family.aligned}+{lora_adapter}"))
    forget_merged_loras()
    main(["run", source, out, "--quiet"])
    assert os.listdir(out + ".lora-cache")
    check_against_reference(load_state_dict(out), f64["base"], f64["aligned"], lora_finetuned, 0.5, "scaled", 8)
    assert {d: sorted(os.listdir(d)) for d in inputs_before} == inputs_before


# --------------------------------------------------------------------------- demo step


def test_demo_step_projects_the_eight_lowest_cosines(family, states, f64, tmp_path):
    """The demo's Safe LoRA step (number mode, 8 tensors) on the demo's family:
    projected tensors get their planted safety component back (the scaled C
    shrinks the eroding update to ~10%: retention ~0.94), the rest keep 0.4."""
    from mergekit_lox.demo import demo_steps

    label, folder, build = demo_steps()[-1]
    assert folder == "safelora"
    document = build(family, str(tmp_path))
    assert document["merge_method"] == "safelora_project"
    cosines = reference_cosines(f64["base"], f64["aligned"], f64["finetuned"], "scaled", 8)
    ranked = sorted(cosines, key=cosines.get)
    assert cosines[ranked[8]] - cosines[ranked[7]] > MIN_GAP
    midway = (cosines[ranked[7]] + cosines[ranked[8]]) / 2
    assert document["parameters"]["threshold"] == pytest.approx(midway, abs=1e-5)

    out = run_merge_recipe(document, tmp_path / "out")
    projected = {n for n, t in out.items() if not torch.equal(t, states["finetuned"][n])}
    assert projected == set(ranked[:8])
    for name, component in family.planted.items():
        kept = component.measure(out[name].double() - states["base"][name].double()) / float(component.S.norm())
        if name in projected:
            assert 0.85 < kept < 1.0, name
        else:
            assert kept == pytest.approx(0.4, abs=0.02), name
