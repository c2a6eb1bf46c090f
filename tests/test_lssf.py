"""lssf_fusion (data-free mode): outputs vs float64, the rank rule and the weights on
planted spectra, the adapter factors, bad values at planning, role errors.

The calibrated mode (`subspace:`) is tested with lssf-calibrate in test_calibrate.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import reference as ref
import torch

from mergekit_lox.demo import safety_retention
from mergekit_lox.methods.lssf import DEFAULT_ETA, fuse, fusion_factors, fusion_terms, spectrum_ranks

TOL = 1e-4
ROLES = {"role": ["aligned", "finetuned"]}  # per non-base input of merge_tensors


def lssf_recipe(family, **parameters):
    return {
        "merge_method": "lssf_fusion",
        "base_model": family.base,
        "models": [
            {"model": family.finetuned, "parameters": {"role": "finetuned"}},
            {"model": family.aligned, "parameters": {"role": "aligned"}},
        ],
        "parameters": parameters,
        "dtype": "float32",
    }


def merge(tensors, **parameters):
    from mergekit.merge_methods import merge_tensors

    return merge_tensors(tensors, "lssf_fusion", base_index=0, parameters={**ROLES, **parameters})


def planted(m, n, S, seed=0):
    """U diag(S) Vh with random orthonormal U, V (float64), and those factors."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, len(S), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, len(S), generator=g, dtype=torch.float64))
    S = torch.as_tensor(S, dtype=torch.float64)
    return (U * S) @ V.T, U, V


@pytest.mark.parametrize(
    "parameters",
    [
        {},  # the defaults: eta 0.9, automatic rank, plain projector
        {"eta": 0.5, "scale": 0.8},
        {"eta": 1.0},
        {"rank": 3, "scale": 1.5},
        {"eta": 0.8, "top_weight": 2.5},
    ],
    ids=["defaults", "eta-0.5", "eta-1", "fixed-rank", "top-weight"],
)
def test_every_tensor_matches_float64_formula(family, states, run_recipe, tmp_path, parameters):
    out = run_recipe(lssf_recipe(family, **parameters), tmp_path / "out")
    full = {"scale": 1.0, "eta": DEFAULT_ETA, "rank": 0, "top_weight": 1.0, **parameters}
    assert set(out) == set(states["finetuned"])
    for name, tensor in out.items():
        W_f, W_a, W_b = (ref.f64(states[r][name]) for r in ("finetuned", "aligned", "base"))
        expected = ref.lssf(W_f, W_a, W_b, full["scale"], full["eta"], full["rank"], full["top_weight"])
        assert ref.rel_err(ref.f64(tensor), expected) < TOL, name
        if tensor.ndim < 2:
            assert torch.equal(tensor, states["finetuned"][name]), name


def test_rank_rule_on_the_issues_spectrum():
    """S_i = 1/i on a 4096-wide matrix: the paper's rule keeps 14 directions at eta 0.8
    and 35 at 0.9 (the exp(H) rule it replaces kept 432)."""
    S = 1 / torch.arange(1, 4097, dtype=torch.float64)
    for eta, expected in ((0.8, 14), (0.9, 35)):
        assert int(spectrum_ranks(S, (4096, 4096), eta)) == expected
        assert ref.lssf_rank_of(S.numpy(), (4096, 4096), eta) == expected


@pytest.mark.parametrize("eta, kept", [(0.85, 9), (0.5, 5), (0.05, 1), (1.0, 10)])
def test_equal_singular_values_keep_ceil_eta_k(eta, kept):
    """Ten equal singular values: h_i = ln(10)/10 each, H_r / H = r / 10, so the rule keeps
    ceil(10 eta) directions and the fusion adds exactly that share of tau's energy."""
    tau, _, _ = planted(30, 20, [1.0] * 10, seed=1)
    g = torch.Generator().manual_seed(2)
    base, finetuned = torch.randn(30, 20, generator=g), torch.randn(30, 20, generator=g)
    out = merge([base, base + tau.float(), finetuned], eta=eta).double()
    added = out - finetuned.double()
    assert math.ceil(10 * eta - 1e-9) == kept
    assert float(added.norm() ** 2 / tau.norm() ** 2) == pytest.approx(kept / 10, abs=1e-4)
    B, A = fusion_factors(base + tau.float(), base, eta=eta)
    width = 20 if eta == 1 else kept  # eta = 1: full rank by definition; the ten zero values add nothing
    assert B.shape == (30, width) and A.shape == (width, 20)


def test_top_weight_scales_each_direction_by_a_squared():
    """S = (4, 3, 2, 1e-3 ...): eta 0.9 keeps 3 directions (checked against the reference);
    with a_1 = 3 the weights are a = (3, 2, 1) and the fusion adds a_i^2 S_i along u_i v_i^T."""
    S = [4.0, 3.0, 2.0] + [1e-3] * 5
    tau, U, V = planted(24, 16, S, seed=3)
    assert ref.lssf_rank_of(np.array(S), (24, 16), 0.9) == 3
    base = torch.zeros(24, 16)
    out = fuse(base, tau.float(), base, eta=0.9, top_weight=3.0, scale=0.5).double()
    coefficients = torch.diagonal(U.T @ out @ V)
    expected = 0.5 * torch.tensor([9 * 4.0, 4 * 3.0, 1 * 2.0, 0, 0, 0, 0, 0], dtype=torch.float64)
    assert torch.allclose(coefficients, expected, atol=1e-4)
    assert (
        ref.rel_err(ref.f64(out), ref.lssf(np.zeros((24, 16)), tau.numpy(), np.zeros((24, 16)), 0.5, 0.9, 0, 3.0)) < TOL
    )


def test_fixed_rank_is_clamped_and_ignores_eta():
    g = torch.Generator().manual_seed(4)
    base, aligned, finetuned = (torch.randn(12, 8, generator=g) for _ in range(3))
    for eta in (0.1, 1.0):
        out = merge([base, aligned, finetuned], rank=1000, eta=eta, scale=0.7).double()
        # rank >= min(m, n): the whole of tau, U U^T = I on its column space.
        assert ref.rel_err(out, finetuned.double() + 0.7 * (aligned.double() - base.double())) < 1e-5
    terms = fusion_terms(aligned, base, rank=1000)
    assert int(terms.ranks) == 8 and terms.B.shape == (12, 8)


def test_zero_safety_vector_and_1d_pass_finetuned_through():
    g = torch.Generator().manual_seed(5)
    base, finetuned = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)
    for top_weight in (1.0, 3.0):
        assert torch.equal(merge([base, base.clone(), finetuned], top_weight=top_weight), finetuned)
    vector = [torch.randn(6, generator=g) for _ in range(3)]
    assert torch.equal(merge(vector), vector[2])


def test_rank_one_tau_has_zero_entropy_and_rank_one():
    """H = 0 (one direction, and float32 rounding noise below the cutoff): r = 1, and
    S_1 == S_r gives a_1 = 1 whatever top_weight, so the whole tau is added once."""
    g = torch.Generator().manual_seed(6)
    u, v = torch.randn(40, 1, generator=g), torch.randn(1, 25, generator=g)
    base, finetuned = torch.randn(40, 25, generator=g), torch.randn(40, 25, generator=g)
    aligned = base + u @ v
    for eta in (0.3, 1.0):
        terms = fusion_terms(aligned, base, eta=eta, top_weight=4.0, scale=2.0)
        assert int(terms.ranks) == 1 and terms.B.shape == (40, 1)
        out = fuse(finetuned, aligned, base, eta=eta, top_weight=4.0, scale=2.0).double()
        expected = ref.lssf(ref.f64(finetuned), ref.f64(aligned), ref.f64(base), 2.0, eta, 0, 4.0)
        assert ref.rel_err(ref.f64(out), expected) < TOL
        assert ref.rel_err(out, finetuned.double() + 2.0 * (aligned.double() - base.double())) < 1e-5


def test_3d_stack_gets_a_rank_per_matrix_and_padded_factors():
    g = torch.Generator().manual_seed(7)
    spectrum = torch.stack([torch.linspace(1, 0.9, 10), torch.logspace(0, -4, 10), torch.ones(10) * 1e-3])
    spectrum[2, :2] = 1.0
    tau = torch.randn(3, 16, 10, generator=g) @ torch.diag_embed(spectrum)
    base, finetuned = torch.randn(3, 16, 10, generator=g), torch.randn(3, 16, 10, generator=g)
    aligned = base + tau
    W = [ref.f64(t) for t in (base, aligned, finetuned)]
    wanted = [ref.lssf_rank_of(np.linalg.svd(W[1][i] - W[0][i], compute_uv=False), (16, 10), 0.9) for i in range(3)]
    assert len(set(wanted)) == 3, wanted
    for top_weight in (1.0, 2.0):
        out = merge([base, aligned, finetuned], top_weight=top_weight)
        assert ref.rel_err(ref.f64(out), ref.lssf(W[2], W[1], W[0], 1.0, 0.9, 0, top_weight)) < TOL
    terms = fusion_terms(aligned, base, top_weight=2.0)
    assert terms.ranks.tolist() == wanted
    assert terms.B.shape == (3, 16, max(wanted)) and terms.A.shape == (3, max(wanted), 10)
    for i, r in enumerate(wanted):
        assert not terms.B[i, :, r:].any() and not terms.A[i, r:, :].any()


@pytest.mark.parametrize("svd", ["exact", "randomized", "auto"])
def test_factors_are_the_merge(states, svd):
    """fusion_factors (the adapter's path) times out exactly what the kernel adds."""
    name = "model.layers.1.mlp.down_proj.weight"
    W_b, W_a, W_f = (states[r][name] for r in ("base", "aligned", "finetuned"))
    B, A = fusion_factors(W_a, W_b, scale=0.6, eta=0.8, top_weight=1.5, svd=svd)
    assert B.dtype == A.dtype == torch.float32
    out = fuse(W_f, W_a, W_b, scale=0.6, eta=0.8, top_weight=1.5, svd=svd)
    assert ref.rel_err(ref.f64(W_f) + ref.f64(B @ A), ref.f64(out)) < 1e-6
    expected = ref.lssf(ref.f64(W_f), ref.f64(W_a), ref.f64(W_b), 0.6, 0.8, 0, 1.5)
    assert ref.rel_err(ref.f64(out), expected) < (TOL if svd != "randomized" else 1e-3)


def test_fusion_restores_the_erased_safety_component(family, run_recipe, tmp_path):
    """The fine-tune kept 40% of the planted component; fusing with scale s adds back
    s times the whole component (the default eta keeps the planted rank 4)."""
    eroded = safety_retention(family, family.finetuned)
    for scale in (0.6, 1.0):
        out = tmp_path / f"scale{scale}"
        run_recipe(lssf_recipe(family, scale=scale), out)
        restored = safety_retention(family, str(out))
        for module, before in eroded.items():
            assert abs(before - 0.4) < 0.03, module
            assert abs(restored[module] - (before + scale)) < 0.02, module


BAD_VALUES = {
    "eta-zero": ({"eta": 0}, "parameter eta"),
    "eta-above-1": ({"eta": 1.5}, "parameter eta"),
    "top-weight-below-1": ({"top_weight": 0.5}, "parameter top_weight"),
    "rank-negative": ({"rank": -1}, "parameter rank"),
    "subspace-missing": ({"subspace": "/nonexistent/subspace"}, "parameter subspace.*no such directory"),
    "rank-scale-gone": ({"rank_scale": 1.0}, "no parameter 'rank_scale'"),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_values_fail_at_planning_in_one_line(family, run_recipe, tmp_path, monkeypatch, case):
    from mergekit.io.tasks import GatherTensors

    loaded = []
    monkeypatch.setattr(GatherTensors, "execute", lambda *a, **k: loaded.append(1))
    parameters, match = BAD_VALUES[case]
    with pytest.raises(ValueError, match=match) as error:
        run_recipe(lssf_recipe(family, **parameters), tmp_path / "out")
    assert "\n" not in str(error.value).strip()
    assert loaded == []


def test_check_names_the_bad_parameter(family, tmp_path):
    import yaml

    from mergekit_lox.check import check_recipe

    recipe = tmp_path / "bad.yml"
    recipe.write_text(yaml.safe_dump(lssf_recipe(family, eta=1.2, top_weight=0.9)))
    problems = [str(p) for p in check_recipe(str(recipe)).problems]
    assert any("parameters.eta" in p and "less than or equal to 1" in p for p in problems), problems
    assert any("parameters.top_weight" in p and "greater than or equal to 1" in p for p in problems), problems


ROLE_CASES = {
    "missing-role": (lambda r: r["models"][0].pop("parameters"), "has no role"),
    "duplicated-role": (lambda r: r["models"][0].update(parameters={"role": "aligned"}), "given to both"),
    "misspelt-role": (lambda r: r["models"][0].update(parameters={"role": "finetune"}), "role 'finetune'"),
    "missing-base": (lambda r: r.pop("base_model"), "requires a base"),
}


@pytest.mark.parametrize("case", ["missing-role", "duplicated-role", "misspelt-role", "missing-base", "one-model"])
def test_configuration_errors_before_any_tensor(family, run_recipe, tmp_path, monkeypatch, case):
    from mergekit.io.tasks import GatherTensors

    loaded = []
    monkeypatch.setattr(GatherTensors, "execute", lambda *a, **k: loaded.append(1))
    recipe = lssf_recipe(family)
    if case == "one-model":
        recipe["models"].pop(0)
        match = "2 non-base inputs"
    else:
        mutate, match = ROLE_CASES[case]
        mutate(recipe)
    with pytest.raises(Exception, match=match) as error:
        run_recipe(recipe, tmp_path / "out")
    if "role" in case:
        # The message says what the recipe must contain.
        assert "`parameters: {role: aligned}`" in str(error.value)
        assert "`parameters: {role: finetuned}`" in str(error.value)
    assert loaded == []


def test_mergekit_lox_run_cli(family, states, tmp_path):
    import yaml

    from mergekit_lox.cli import main
    from mergekit_lox.demo.synthetic import load_state_dict

    recipe = tmp_path / "lssf.yml"
    recipe.write_text(yaml.safe_dump(lssf_recipe(family, rank=2)))
    try:
        main(["run", str(recipe), str(tmp_path / "out"), "--quiet", "--out-shard-size", "40K"])
    except SystemExit as done:
        assert done.code in (0, None)
    shards = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert len(shards) > 1, "--out-shard-size must reach mergekit"
    out = load_state_dict(str(tmp_path / "out"))
    name = "model.layers.1.self_attn.v_proj.weight"
    W_f, W_a, W_b = (ref.f64(states[r][name]) for r in ("finetuned", "aligned", "base"))
    assert ref.rel_err(ref.f64(out[name]), ref.lssf(W_f, W_a, W_b, 1.0, DEFAULT_ETA, 2)) < TOL
    assert np.isfinite(ref.f64(out[name])).all()


def test_16_bit_computation_is_noted_by_check_and_warned_by_the_kernel(family, tmp_path, caplog):
    """Not an error: `check` adds a note, a run logs a warning once per process."""
    import logging

    import yaml

    from mergekit_lox.check import check_recipe
    from mergekit_lox.methods import inputs

    recipe = tmp_path / "bf16.yml"
    recipe.write_text(yaml.safe_dump({**lssf_recipe(family), "dtype": "bfloat16"}))
    report = check_recipe(str(recipe))
    assert report.ok
    assert [n.field for n in report.notes] == ["dtype"] and "computes from bfloat16" in report.notes[0].message
    recipe.write_text(yaml.safe_dump({**lssf_recipe(family), "dtype": "float32", "out_dtype": "bfloat16"}))
    assert check_recipe(str(recipe)).notes == []

    inputs._WARNED_LOW_PRECISION.discard("lssf_fusion")
    g = torch.Generator().manual_seed(8)
    tensors = [torch.randn(6, 4, generator=g).to(torch.bfloat16) for _ in range(3)]
    with caplog.at_level(logging.WARNING, logger="mergekit_lox"):
        merge(tensors)
        merge(tensors)
    warned = [r.getMessage() for r in caplog.records if "computes from bfloat16" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("lssf_fusion")
