"""The shared low-rank engine: every `svd` mode against NumPy float64 on planted spectra.

Matrices are built with a known spectrum (``U diag(s) Vᵀ`` with random
orthonormal ``U``, ``V``), so whether a spectral gap exists at the cut, and
therefore whether the randomized path can be certified, is known in advance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import reference as ref
import torch

from mergekit_lox import linalg
from mergekit_lox.methods.lox import extrapolate
from mergekit_lox.methods.lssf import fuse
from mergekit_lox.methods.safelora import project

MODES = ["exact", "auto", "randomized"]
# docs/methods.md "Agreement": exact decompositions 1e-4 on the output; a faster one
# at most 1e-3 on the low-rank term.
EXACT_TOL, FAST_TOL = 1e-4, 1e-3


def spectrum(kind: str, r: int, k: int) -> np.ndarray:
    j = np.arange(1, r + 1, dtype=np.float64)
    if kind == "fast":  # geometric decay: every cut has a gap (ratio 1/0.6)
        return 0.6 ** (j - 1)
    if kind == "slow":  # j^-1/2 tail under a planted top-k part standing 5x above it
        s = j**-0.5
        s[:k] = 5.0 * np.linspace(1.0, 0.55, k)
        return s
    if kind.startswith("power"):  # s_i = i^-b: no gap anywhere
        return j ** -float(kind[len("power") :])
    if kind == "flat":  # no gap anywhere near k: the top-k subspace is not determined
        s = np.ones(r)
        s[3 * k :] = 0.5 * (j[3 * k :] / (3 * k)) ** -0.5
        return s
    raise ValueError(kind)


def random_matrices(shape, seed: int, singular_values, floor: float = 0.0, k: int = 1) -> torch.Tensor:
    """float32 ``U diag(s) Vᵀ`` (or a stack) with random orthonormal U, V; with ``floor``,
    plus a dense i.i.d. noise floor whose Frobenius norm is ``floor`` times ``s_k``."""
    rng = np.random.default_rng(seed)
    *batch, m, n = shape
    r = min(m, n)
    s = singular_values(r)
    out = np.empty((int(np.prod(batch, dtype=int)), m, n))
    for i in range(out.shape[0]):
        U = np.linalg.qr(rng.standard_normal((m, r)))[0]
        V = np.linalg.qr(rng.standard_normal((n, r)))[0]
        out[i] = (U * s) @ V.T
        if floor:
            noise = rng.standard_normal((m, n))
            out[i] += noise * (floor * s[k - 1] / np.linalg.norm(noise))
    return torch.from_numpy(out.reshape(shape)).float()


def planted(shape, kind: str, k: int, seed: int = 0) -> torch.Tensor:
    """float32 matrix (or stack) with singular values ``spectrum(kind)``."""
    return random_matrices(shape, seed, lambda r: spectrum(kind, r, k))


def lowrank64(M: torch.Tensor, k: int) -> np.ndarray:
    return ref.lowrank(ref.f64(M), k)


SHAPES = [(160, 96), (96, 160), (3, 120, 80)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=["tall", "wide", "stack"])
@pytest.mark.parametrize("kind", ["fast", "slow"])
def test_lowrank_agrees_with_float64(kind, shape, mode):
    k = 5
    M = planted(shape, kind, k, seed=len(shape) + shape[-1])
    expected = lowrank64(M, k)
    out = linalg.lowrank(M, k, mode)
    assert out.shape == M.shape and out.dtype == torch.float32
    assert ref.rel_err(ref.f64(out), expected) < (EXACT_TOL if mode == "exact" else FAST_TOL)

    guarded = linalg.guarded_top_k(M, k, mode)
    # 4 * (5 + 10) <= 80: auto and randomized really sketch these matrices, and
    # with a gap at k the guard certifies every one of them.
    assert bool(guarded.randomized.all()) == (mode != "exact")
    if mode != "exact":
        # The certificate is honest: each matrix's bound covers its true error.
        U, S, Vh = guarded.factors
        for i, bound in enumerate(guarded.bound.reshape(-1).tolist()):
            matrix = ref.f64(M).reshape(-1, *M.shape[-2:])[i]
            got = ((U * S.unsqueeze(-2)) @ Vh).double().reshape(-1, *M.shape[-2:])[i].numpy()
            assert ref.rel_err(got, ref.lowrank(matrix, k)) <= bound <= FAST_TOL


@pytest.mark.parametrize("mode", MODES)
def test_rank_at_or_above_matrix_size(mode):
    M = planted((3, 24, 40), "slow", 4, seed=1)
    for k in (24, 25, 1000, 0):
        assert torch.equal(linalg.lowrank(M, k, mode), M)
    # top_k clamps the rank and then takes the exact path (a full-width sketch is no sketch).
    guarded = linalg.guarded_top_k(M, 1000, mode)
    assert guarded.factors.S.shape == (3, 24) and not guarded.randomized.any()
    assert ref.rel_err(ref.f64(linalg.compose(guarded.factors)), ref.f64(M)) < EXACT_TOL


def test_auto_takes_exact_path_for_small_matrices_and_wide_sketches():
    assert not linalg.uses_randomized((32, 32), 2, "auto")  # 4 * 12 > 32
    assert not linalg.uses_randomized((4096, 64), 8, "auto")  # k close to min(m, n)
    assert linalg.uses_randomized((4096, 64), 6, "auto")
    assert linalg.uses_randomized((32, 32), 2, "randomized")
    assert not linalg.uses_randomized((32, 32), 30, "randomized")
    assert not linalg.uses_randomized((4096, 4096), 6, "exact")
    with pytest.raises(ValueError, match="svd must be one of auto, exact, randomized, got 'fast'"):
        linalg.lowrank(torch.zeros(8, 8), 2, "fast")


@pytest.mark.parametrize("mode", ["auto", "randomized"])
def test_guard_falls_back_without_a_spectral_gap(mode):
    """k inside a cluster of equal singular values: no bound can be shown, so exact SVD."""
    k = 5
    M = planted((160, 96), "flat", k, seed=3)
    linalg.reset_svd_counts()
    guarded = linalg.guarded_top_k(M, k, mode)
    assert not guarded.randomized.any()
    # No gap at k for the Gram path either: LAPACK's SVD.
    assert linalg.svd_counts() == {"exact": 0, "randomized": 0, "fallback": 1, "gram": 0}
    exact = linalg.top_k(M, k, "exact")
    for got, want in zip(guarded.factors, exact, strict=True):
        assert torch.allclose(got, want, rtol=0, atol=1e-6)


def test_guard_falls_back_per_matrix_of_a_stack():
    k = 5
    stack = torch.stack(
        [planted((120, 80), "slow", k, 4), planted((120, 80), "flat", k, 5), planted((120, 80), "fast", k, 6)]
    )
    linalg.reset_svd_counts()
    guarded = linalg.guarded_top_k(stack, k, "randomized")
    assert guarded.randomized.tolist() == [True, False, True]
    assert linalg.svd_counts() == {"exact": 0, "randomized": 2, "fallback": 1, "gram": 0}
    # The fallen-back matrix holds the exact factors; the others their certified ones.
    exact_middle = linalg.top_k(stack[1], k, "exact")
    assert torch.allclose(guarded.factors.U[1], exact_middle.U, atol=1e-6)
    out = linalg.compose(guarded.factors)
    for i in (0, 2):
        assert ref.rel_err(ref.f64(out[i]), lowrank64(stack[i], k)) < FAST_TOL


def test_more_power_iterations_before_falling_back():
    """A gap shown, but a residual too large after one power iteration (bound ~3e-2):
    the guard iterates (one more suffices here) instead of falling back."""
    k = 5
    M = planted((300, 200), "slow", k, seed=7)
    no_retry = linalg.RandomizedSettings(power_iterations=1, max_power_iterations=1, oversample=2)
    retry = linalg.RandomizedSettings(power_iterations=1, max_power_iterations=6, oversample=2)
    once = linalg.guarded_top_k(M, k, "randomized", no_retry)
    assert not once.randomized.item()
    guarded = linalg.guarded_top_k(M, k, "randomized", retry)
    assert guarded.randomized.item()
    assert ref.rel_err(ref.f64(linalg.compose(guarded.factors)), lowrank64(M, k)) < FAST_TOL


@pytest.mark.parametrize("shape", [(160, 96), (3, 120, 80)], ids=["matrix", "stack"])
def test_blocked_passes_agree_with_whole_matrix_passes(shape, monkeypatch):
    """On CPU, MᵀM Z and the residual pass go by blocks of rows; blocks as small as
    10 rows (and a last, shorter one) must give the result of whole-matrix passes."""
    k = 5
    M = planted(shape, "slow", k, seed=12)
    whole = linalg.guarded_top_k(M, k, "randomized")
    monkeypatch.setattr(linalg.passes, "_BLOCK_ELEMENTS", 10 * shape[-1] + 3)
    assert len(linalg.passes.row_blocks(M)) > 5
    blocked = linalg.guarded_top_k(M, k, "randomized")
    assert blocked.randomized.all()
    # The residuals are at rounding level here: the bounds agree to rounding's few percent.
    torch.testing.assert_close(blocked.bound, whole.bound, rtol=5e-2, atol=1e-7)
    out = linalg.compose(blocked.factors)
    torch.testing.assert_close(out, linalg.compose(whole.factors), rtol=0, atol=1e-5)
    assert ref.rel_err(ref.f64(out), lowrank64(M, k)) < FAST_TOL


def test_zero_matrix_is_certified_and_zero():
    guarded = linalg.guarded_top_k(torch.zeros(2, 96, 64), 3, "randomized")
    assert guarded.randomized.all() and torch.equal(guarded.bound, torch.zeros(2))
    assert torch.equal(linalg.compose(guarded.factors), torch.zeros(2, 96, 64))


def test_randomized_path_is_deterministic():
    M = planted((160, 96), "slow", 5, seed=8)
    assert torch.equal(linalg.lowrank(M, 5, "randomized"), linalg.lowrank(M, 5, "randomized"))


def test_float64_inputs_stay_float64():
    M = planted((160, 96), "fast", 5, seed=9).double()
    out = linalg.lowrank(M, 5, "randomized")
    assert out.dtype == torch.float64
    assert ref.rel_err(ref.f64(out), lowrank64(M, 5)) < 1e-8


# --- The certificate on realistic spectra -------------------------------------


def noise_floor(shape, k: int, floor: float, seed: int, decay: float = 1.0) -> torch.Tensor:
    """A planted top-k part (1 down to 0.55), a power-law tail ``0.25 j^-decay`` and a
    dense i.i.d. floor whose Frobenius norm is ``floor`` times s_k of the rest: what a
    fine-tuning delta looks like. float32; exact spectrum unknown (float64 SVD is the truth)."""

    def values(r):
        s = 0.25 * np.arange(1, r + 1, dtype=np.float64) ** -decay
        s[:k] = np.linspace(1.0, 0.55, k)
        return s

    return random_matrices(shape, seed, values, floor, k)


def true_errors(M: torch.Tensor, factors, k: int):
    """Per matrix: relative Frobenius error of the factors' low-rank term against float64."""
    got = linalg.compose(factors).double().reshape(-1, *M.shape[-2:]).numpy()
    return [ref.rel_err(g, ref.lowrank(m, k)) for g, m in zip(got, ref.f64(M).reshape(got.shape), strict=True)]


def test_noise_floor_is_certified_with_the_defaults():
    """A separated top-k under a dense floor whose Frobenius mass is several times s_k:
    the spectral-norm certificate takes the fast path (the Frobenius one could not)."""
    k = 6
    M = noise_floor((2, 300, 700), k, floor=6.0, seed=21)
    S = np.linalg.svd(ref.f64(M), compute_uv=False)
    tail = np.sqrt((S[:, k:] ** 2).sum(axis=-1))
    assert (tail > 4 * S[:, k - 1]).all()  # |E|_F >= |M - lowrank_k(M)|_F: far above s_k
    linalg.reset_svd_counts()
    guarded = linalg.guarded_top_k(M, k, "auto")
    assert linalg.svd_counts() == {"exact": 0, "randomized": 2, "fallback": 0, "gram": 0}
    for error, bound in zip(true_errors(M, guarded.factors, k), guarded.bound.tolist(), strict=True):
        assert error <= bound <= FAST_TOL


WEAK = [
    # (power_iterations, oversample, probes, probe_steps): far weaker than the defaults.
    (0, 8, 16, 4),
    (1, 2, 16, 2),
    (1, 6, 16, 4),
    (2, 2, 16, 3),
]


@pytest.mark.parametrize("kind", ["planted", "noise-floor"])
@pytest.mark.parametrize("weak", WEAK, ids=[f"q{w[0]}-o{w[1]}-p{w[3]}" for w in WEAK])
def test_certificate_bounds_the_true_error(kind, weak):
    """Per matrix, over many seeds and deliberately weak settings: wherever a bound is
    returned (tolerance raised to 1, so loose bounds are kept and checked too), the
    float64 error of the low-rank term is below it."""
    q, oversample, probes, steps = weak
    settings = linalg.RandomizedSettings(
        power_iterations=q,
        max_power_iterations=q,
        oversample=oversample,
        probes=probes,
        probe_steps=steps,
        tolerance=1.0,
        min_relative_gap=0.0,
    )
    rng = np.random.default_rng(q * 100 + oversample * 10 + steps)
    checked = 0
    for seed in range(20):
        k = int(rng.integers(1, 7))
        shape = (int(rng.integers(60, 160)), int(rng.integers(60, 160)))
        if kind == "planted":
            M = planted(shape, "slow", k, seed=seed)
        else:
            M = noise_floor(shape, k, floor=float(rng.uniform(0.5, 3)), seed=seed, decay=float(rng.uniform(0.3, 1.5)))
        guarded = linalg.guarded_top_k(M, k, "randomized", settings)
        if guarded.randomized.item():
            checked += 1
            assert true_errors(M, guarded.factors, k)[0] <= guarded.bound.item(), (seed, k, shape)
    assert checked >= 3  # the bound was really exercised


@pytest.mark.parametrize("decay", ["0.3", "0.5", "1.0"])
def test_power_law_without_a_gap_falls_back(decay):
    """s_i ~ i^-b has no gap at k for a sketch: the sketch is not certified, and the float64
    Gram path (whose rounding is ~1e-13 |M|_F², far inside the gap) is, with exact-grade factors."""
    k = 6
    M = planted((240, 200), "power" + decay, k, seed=5)
    linalg.reset_svd_counts()
    guarded = linalg.guarded_top_k(M, k, "randomized")
    assert linalg.svd_counts() == {"exact": 0, "randomized": 0, "fallback": 1, "gram": 1}
    assert not guarded.randomized.item()
    assert true_errors(M, guarded.factors, k)[0] < EXACT_TOL


def test_results_are_the_same_run_to_run():
    """Fixed generators per shape: the same inputs give bit-identical outputs, also in a
    fresh process (no state carried between calls)."""
    M = noise_floor((2, 200, 320), 6, floor=5.0, seed=3)
    first = linalg.guarded_top_k(M, 6, "auto")
    linalg.guarded_top_k(noise_floor((250, 90), 3, floor=2.0, seed=4), 3, "randomized")  # other draws between
    again = linalg.guarded_top_k(M, 6, "auto")
    assert first.randomized.all()
    for a, b in zip(first.factors, again.factors, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(first.bound, again.bound)


# --- LSSF's energy-entropy rank ----------------------------------------------------


SPECTRA = {
    "noise-floor": lambda: noise_floor((3, 180, 260), 6, floor=6.0, seed=31),
    "power-law": lambda: torch.stack([planted((180, 260), "fast", 4, seed=32), planted((180, 260), "slow", 6, 33)]),
}


@pytest.mark.parametrize("eta", [0.5, 0.8, 0.9, 1.0])
@pytest.mark.parametrize("kind", sorted(SPECTRA))
def test_energy_entropy_ranks_match_the_reference(kind, eta):
    """From exact values: the reference's rank, matrix by matrix; from the Gram matrix:
    the same rank wherever it is certified."""
    M = SPECTRA[kind]()
    stack = ref.f64(M).reshape(-1, *M.shape[-2:])
    want = [ref.lssf_rank_of(np.linalg.svd(x, compute_uv=False), x.shape, eta) for x in stack]
    exact = linalg.energy_entropy_ranks(linalg.singular_values(M), M.shape, eta)
    assert exact.reshape(-1).tolist() == want
    gram = linalg.energy_entropy_rank(M, eta, "auto")
    pairs = zip(gram.ranks.reshape(-1).tolist(), gram.certified.reshape(-1).tolist(), want, strict=True)
    for got, certified, expected in pairs:
        assert not certified or got == expected
    # The noise floor's ranks lie far from the eta boundary; a rank the intervals cannot
    # settle (possible anywhere) is not certified, never wrong.
    assert gram.certified.all() if kind == "noise-floor" or eta == 1 else gram.certified.any()
    if eta == 1:  # full rank by definition, whatever rounding does to the small values
        assert set(want) == {min(M.shape[-2:])}


def test_energy_entropy_rank_edge_cases():
    """Zero matrix and rank 1: H = 0, rank 1. A rank-2 matrix: its rounding-level Gram
    eigenvalues cannot be told from zero, so the Gram route does not certify eta = 0.999;
    eta = 1 is full rank by definition, certified on every path."""
    zero = linalg.energy_entropy_rank(torch.zeros(2, 50, 70), 0.9)
    assert zero.ranks.tolist() == [1, 1] and zero.certified.all()
    u, v = torch.randn(50, 1, dtype=torch.float64), torch.randn(1, 70, dtype=torch.float64)
    assert linalg.energy_entropy_ranks(linalg.singular_values((u @ v).float()), (50, 70), 0.9).item() == 1
    M = torch.from_numpy(ref.lowrank(ref.f64(planted((120, 90), "fast", 2, seed=40)), 2)).float()
    assert not linalg.energy_entropy_rank(M, 0.999).certified.item()
    for svd in MODES:
        full = linalg.energy_entropy_rank(M, 1.0, svd)
        assert full.ranks.item() == 90 and full.certified.item()


@pytest.mark.parametrize("mode", MODES)
def test_energy_entropy_top_k(mode):
    """`randomized`: a concentrated spectrum (small ranks, a gap at them) takes the Gram
    eigenvalues and the certified sketch; a noise floor (ranks near full, no gap) the
    exact SVD. `exact` and `auto`: the exact SVD. Always the reference's rank and its
    low-rank term, per matrix."""
    cases = {"fast": planted((2, 400, 300), "fast", 4, seed=41), "noise-floor": noise_floor((300, 200), 6, 6.0, 42)}
    for name, M in cases.items():
        linalg.reset_svd_counts()
        factors, ranks, close = linalg.energy_entropy_top_k(M, 0.9, mode)
        assert not bool(close.any()), name  # ranks well inside the rule's boundaries
        stack = ref.f64(M).reshape(-1, *M.shape[-2:])
        got = linalg.lowrank_per_matrix(factors, ranks).double().reshape(stack.shape).numpy()
        sketched = mode == "randomized" and name == "fast"
        for i, x in enumerate(stack):
            r = ref.lssf_rank_of(np.linalg.svd(x, compute_uv=False), x.shape, 0.9)
            assert ranks.reshape(-1)[i].item() == r, (name, i)
            assert ref.rel_err(got[i], ref.lowrank(x, r)) < (FAST_TOL if sketched else EXACT_TOL), (name, i)
        if sketched:
            paths = {"randomized": len(stack)}
        else:
            paths = {"fallback" if mode == "randomized" else "exact": len(stack)}
            paths["gram"] = 0 if mode == "exact" else len(stack)  # auto and fallbacks: the Gram path
        assert linalg.svd_counts() == {"exact": 0, "randomized": 0, "fallback": 0, "gram": 0, **paths}, name


def test_svd_statistics_file_is_written_lazily(tmp_path):
    """MERGEKIT_LOX_SVD_STATS: nothing registered at import; the first count registers
    the exit hook that writes the counters."""
    script = (
        "import atexit, torch\n"
        "from mergekit_lox import linalg\n"
        "from mergekit_lox.linalg import modes\n"
        "assert not modes._stats_registered\n"
        "linalg.top_k(torch.eye(40)[:, :30], 2, 'exact')\n"
        "assert modes._stats_registered\n"
    )
    stats = tmp_path / "stats.json"
    env = {**os.environ, "MERGEKIT_LOX_SVD_STATS": str(stats)}
    subprocess.run([sys.executable, "-c", script], check=True, env=env)
    assert json.loads(stats.read_text()) == {"exact": 1, "randomized": 0, "fallback": 0, "gram": 0}


# --- The kernels, with every svd mode, against tests/reference.py -------------


def kernel_inputs(shape, seed):
    """Base, aligned (base + a gapped slow-decay delta) and finetuned tensors."""
    g = torch.Generator().manual_seed(seed)
    base = 0.05 * torch.randn(shape, generator=g)
    aligned = base + 0.1 * planted(shape, "slow", 6, seed)
    finetuned = aligned + 0.02 * torch.randn(shape, generator=g)
    return base, aligned, finetuned


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(160, 96), (2, 96, 160)], ids=["matrix", "stack"])
def test_kernels_match_reference(shape, mode):
    base, aligned, finetuned = kernel_inputs(shape, seed=shape[-1])
    W_b, W_a, W_f = ref.f64(base), ref.f64(aligned), ref.f64(finetuned)
    tol = EXACT_TOL if mode == "exact" else FAST_TOL

    out = extrapolate(aligned, base, 1.25, 6, mode)
    # The low-rank term itself, (out - W_a) / alpha, within the mode's bound.
    assert ref.rel_err((ref.f64(out) - W_a) / 1.25, ref.lowrank(W_a - W_b, 6)) < tol
    assert ref.rel_err(ref.f64(out), ref.lox(W_a, W_b, 1.25, 6)) < EXACT_TOL

    for rank in (6, 0):
        out = fuse(finetuned, aligned, base, scale=1.0, rank=rank, svd=mode)
        assert ref.rel_err(ref.f64(out), ref.lssf(W_f, W_a, W_b, 1.0, 0.9, rank)) < EXACT_TOL

    out = project(finetuned, aligned, base, 1.0, "orthogonal", 6, mode)
    expected = ref.safelora(W_f, W_a, W_b, 1.0, "orthogonal", 6)
    assert not np.allclose(expected, W_f)  # threshold 1: the projection is taken
    assert ref.rel_err(ref.f64(out), expected) < EXACT_TOL


@pytest.mark.parametrize("mode", MODES)
def test_svd_parameter_reaches_the_kernels_through_mergekit(mode):
    from mergekit.merge_methods import merge_tensors

    import mergekit_lox  # noqa: F401

    base, aligned, finetuned = kernel_inputs((160, 96), seed=11)
    linalg.reset_svd_counts()
    out = merge_tensors([base, aligned], "lox_extrapolate", base_index=0, parameters={"rank": 6, "svd": mode})
    assert ref.rel_err(ref.f64(out), ref.lox(ref.f64(aligned), ref.f64(base), 1.25, 6)) < EXACT_TOL
    path = "exact" if mode == "exact" else "randomized"
    assert linalg.svd_counts()[path] == 1


def test_svd_parameter_in_a_recipe(family, states, run_recipe, tmp_path):
    """`svd: exact` and `svd: randomized` merges of the float32 family, tensor by tensor.

    The family's planted rank is 4 under 1% diffuse noise (a dense floor): at rank 4
    every matrix is certified; at rank 5 the cut falls inside the noise (no gap) and
    every matrix falls back. Either way every tensor must match the float64 formula.
    """
    for mode, rank in (("exact", 4), ("randomized", 4), ("randomized", 5)):
        linalg.reset_svd_counts()
        recipe = {
            "merge_method": "lox_extrapolate",
            "base_model": family.base,
            "models": [{"model": family.aligned}],
            "parameters": {"alpha": 1.25, "rank": rank, "svd": mode},
            "dtype": "float32",
        }
        out = run_recipe(recipe, tmp_path / f"{mode}-{rank}")
        counts = linalg.svd_counts()
        matrices = sum(1 for tensor in out.values() if tensor.ndim >= 2)
        if mode == "exact":
            assert counts == {"exact": matrices, "randomized": 0, "fallback": 0, "gram": 0}
        elif rank == 4:
            assert counts == {"exact": 0, "randomized": matrices, "fallback": 0, "gram": 0}
        else:  # the fallbacks go through the float64 Gram path
            assert counts == {"exact": 0, "randomized": 0, "fallback": matrices, "gram": matrices}
        for name, tensor in out.items():
            W_a, W_b = ref.f64(states["aligned"][name]), ref.f64(states["base"][name])
            assert ref.rel_err(ref.f64(tensor), ref.lox(W_a, W_b, 1.25, rank)) < EXACT_TOL, name


def test_unknown_svd_mode_is_rejected(family, run_recipe, tmp_path):
    recipe = {
        "merge_method": "lox_extrapolate",
        "base_model": family.base,
        "models": [{"model": family.aligned}],
        "parameters": {"svd": "fast"},
    }
    with pytest.raises(Exception, match="'auto', 'exact' or 'randomized'"):
        run_recipe(recipe, tmp_path / "out")


# --- The float64 Gram path (linalg/gram.py) -------------------------------------


def gram_term_errors(M: torch.Tensor, spectrum, ranks) -> list:
    """Per matrix: ``(proven part, output)``: the relative error against float64 of the
    rank-k term from the float64 vectors (what the bound covers), and of the float32
    factors the methods use (that part adds float32 products, as the exact path's)."""
    from mergekit_lox.linalg import gram

    stack = ref.f64(M).reshape(-1, *M.shape[-2:])
    width = int(ranks.max())
    got = linalg.lowrank_per_matrix(gram.factors(M, spectrum, width), ranks).double().reshape(stack.shape).numpy()
    vectors = spectrum.vectors.reshape(len(stack), *spectrum.vectors.shape[-2:]).numpy()
    errors = []
    for g, x, W, k in zip(got, stack, vectors, ranks.reshape(-1).tolist(), strict=True):
        W = W[:, :k]
        term = W @ (W.T @ x) if spectrum.left else (x @ W) @ W.T
        truth = ref.lowrank(x, int(k))
        errors.append((ref.rel_err(term, truth), ref.rel_err(g, truth)))
    return errors


@pytest.mark.parametrize("kind", ["fast", "slow", "power0.3", "power1.0", "noise-floor", "rank-2"])
@pytest.mark.parametrize("shape", [(3, 90, 200), (3, 200, 90)], ids=["wide", "tall"])
def test_gram_path_matches_float64_within_its_bound(kind, shape):
    """Every rank 1..min(m, n) of planted, power-law, noise-floor and exactly rank-2
    stacks (wide: left vectors; tall: right): the proven bound covers the true error of
    the rank-k term from the float64 vectors, and the float32 factors are exact-grade
    wherever the bound is within 1e-3 (directions past the numerical rank carry
    nothing, so rank 6 of a rank-2 matrix certifies too)."""
    from mergekit_lox.linalg import gram

    if kind == "noise-floor":
        M = noise_floor(shape, 6, 6.0, seed=7)
    elif kind == "rank-2":
        M = torch.from_numpy(ref.lowrank(ref.f64(planted(shape, "fast", 2, seed=8)), 2)).float()
    else:
        M = planted(shape, kind, 6, seed=9)
    spectrum = gram.spectrum(M)
    certified = 0
    for k in (1, 2, 3, 6, 7, 20, 60, 89, 90):
        ranks = torch.full(shape[:1], k)
        bounds = gram.term_bound(spectrum, ranks).tolist()
        for (proven, output), bound in zip(gram_term_errors(M, spectrum, ranks), bounds, strict=True):
            assert proven <= bound or proven < 1e-14, (k, proven, bound)
            if bound <= FAST_TOL:
                certified += 1
                assert output < EXACT_TOL, (k, output)
    assert certified >= 3 * 5


@pytest.mark.parametrize("kind", ["slow", "power0.3", "noise-floor"])
@pytest.mark.parametrize("shape", [(2, 120, 260), (2, 260, 120)], ids=["wide", "tall"])
def test_gram_top_pairs_match_the_full_spectrum(kind, shape):
    """The Gram product (dsyrk, blocks of columns) is A Aᵀ in float64 to rounding, lower
    triangle; the top-t pairs (dsyevx, what `_exact_top_k` asks for) are the full
    decomposition's top t, and their bound covers the true error of the rank-k term."""
    from mergekit_lox.linalg import gram

    M = noise_floor(shape, 6, 6.0, seed=4) if kind == "noise-floor" else planted(shape, kind, 6, seed=6)
    A = M if shape[-2] <= shape[-1] else M.mT
    G = gram._gram64(A)
    truth = A.double() @ A.double().mT
    assert torch.equal(torch.triu(G, 1), torch.zeros_like(G))
    assert float((torch.tril(truth) - G).abs().max() / truth.abs().max()) < 1e-13
    full = gram.spectrum(M)
    for k in (1, 6, 7, 20):
        top = gram.spectrum(M, top=k + 1)
        assert top.values.shape[-1] == k + 1 and top.size == full.size == 120
        scale = float(full.values[..., 0].max())
        assert float((top.values - full.values[..., : k + 1]).abs().max()) < 1e-12 * scale
        ranks = torch.full(shape[:1], k)
        bounds = gram.term_bound(top, ranks)
        assert torch.allclose(bounds, gram.term_bound(full, ranks), rtol=1e-6, atol=1e-12)
        for (proven, output), bound in zip(gram_term_errors(M, top, ranks), bounds.tolist(), strict=True):
            assert proven <= bound or proven < 1e-14, (k, proven, bound)
            if bound <= FAST_TOL:
                assert output < EXACT_TOL, (k, output)


def test_gram_path_blas_threads_follow_the_side():
    """SciPy's OpenBLAS runs on one thread for a Gram side below `_PARALLEL_SIDE` (its idle
    pool would spin and starve torch's threads), on torch's thread count above, and is
    restored afterwards."""
    from threadpoolctl import threadpool_info

    from mergekit_lox.linalg import gram

    def openblas_threads():
        return {info["num_threads"] for info in threadpool_info() if info["internal_api"] == "openblas"}

    before = openblas_threads()
    assert before
    with gram._blas_threads(gram._PARALLEL_SIDE - 1):
        assert openblas_threads() == {1}
    with gram._blas_threads(gram._PARALLEL_SIDE):
        assert openblas_threads() == {torch.get_num_threads()}
    assert openblas_threads() == before


def test_gram_bound_holds_for_a_large_known_perturbation():
    """The bound's algebra, exercised far from rounding: eigenpairs of ``G + E`` with a
    random symmetric ``|E|_2 = e`` of 1e-7 to 1e-3 ``|M|_F²``, and ``e`` as the error.
    The true error of the rank-k term must stay within the bound at every k and e."""
    from mergekit_lox.linalg import gram

    generator = torch.Generator().manual_seed(5)
    for kind in ("slow", "power0.5", "fast"):
        M = planted((80, 150), kind, 6, seed=12).double()
        total = M.square().sum()
        for scale in (1e-7, 1e-5, 1e-3):
            E = torch.randn(80, 80, generator=generator, dtype=torch.float64)
            E = E + E.T
            E *= scale * total / torch.linalg.matrix_norm(E, ord=2)
            values, vectors = torch.linalg.eigh(M @ M.T + E)
            spectrum = gram.GramSpectrum(values.flip(-1).clamp_min(0), vectors.flip(-1), True, scale * total, total, 80)
            for k in (1, 3, 6, 7, 12, 40):
                W = vectors.flip(-1)[:, :k]
                error = float(torch.linalg.norm(W @ (W.T @ M) - torch.from_numpy(ref.lowrank(M.numpy(), k))))
                error /= float(torch.linalg.norm(torch.from_numpy(ref.lowrank(M.numpy(), k))))
                bound = gram.term_bound(spectrum, torch.tensor(k))
                assert error <= float(bound), (kind, scale, k)
                # The top k + 1 pairs give the same bound (what the subset path computes).
                partial = spectrum._replace(values=spectrum.values[: k + 1], vectors=spectrum.vectors[:, : k + 1])
                assert float(gram.term_bound(partial, torch.tensor(k))) == float(bound), (kind, scale, k)
                with pytest.raises(ValueError, match="top"):
                    gram.term_bound(partial, torch.tensor(k + 1))


def test_gram_path_is_used_where_it_applies():
    """`auto` on float32 CPU matrices: a no-gap power law falls back from the sketch to the
    Gram path; float64 inputs and `svd: exact` keep LAPACK's SVD; a flat cluster at k
    (no gap for any method) goes to LAPACK and returns its factors."""
    M = planted((240, 200), "power0.5", 6, seed=5)
    for matrix, mode, counts in (
        (M, "auto", {"fallback": 1, "gram": 1}),
        (M, "exact", {"exact": 1}),
        (M.double(), "auto", {"fallback": 1}),
    ):
        linalg.reset_svd_counts()
        factors = linalg.top_k(matrix, 6, mode)
        assert linalg.svd_counts() == {"exact": 0, "randomized": 0, "fallback": 0, "gram": 0, **counts}, mode
        assert true_errors(matrix, factors, 6)[0] < EXACT_TOL
    flat = planted((160, 96), "flat", 5, seed=3)
    linalg.reset_svd_counts()
    factors = linalg.top_k(flat, 5, "auto")
    assert linalg.svd_counts()["gram"] == 0
    for got, want in zip(factors, linalg.top_k(flat, 5, "exact"), strict=True):
        assert torch.allclose(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 120, 260), (2, 260, 120)], ids=["wide", "tall"])
def test_energy_entropy_lowrank_through_the_complement(shape, monkeypatch):
    """LSSF's term with its automatic rank: on a noise floor the rule keeps more than half
    the directions and `auto` forms ``M - P_c M`` from the trailing Gram vectors (the top-r
    factors are never built); on a fast-decaying spectrum the ranks are small and the
    factors are used. Either way: the reference's rank and its low-rank term, per matrix."""
    from mergekit_lox.linalg import gram

    cases = {"noise-floor": noise_floor(shape, 6, 6.0, seed=17), "fast": planted(shape, "fast", 4, seed=18)}
    build_factors = gram.factors
    used = []
    monkeypatch.setattr(gram, "factors", lambda *a, **k: used.append(1) or build_factors(*a, **k))
    for name, M in cases.items():
        used.clear()
        linalg.reset_svd_counts()
        term, ranks, close = linalg.energy_entropy_lowrank(M, 0.9, "auto")
        assert not bool(close.any()), name  # ranks well inside the rule's boundaries
        assert linalg.svd_counts() == {"exact": 2, "randomized": 0, "fallback": 0, "gram": 2}, name
        stack = ref.f64(M)
        for i, x in enumerate(stack):
            r = ref.lssf_rank_of(np.linalg.svd(x, compute_uv=False), x.shape, 0.9)
            assert ranks[i].item() == r, (name, i)
            assert ref.rel_err(ref.f64(term[i]), ref.lowrank(x, r)) < EXACT_TOL, (name, i)
        complement = bool((ranks > min(shape[-2:]) // 2).all())
        assert complement == (name == "noise-floor")
        assert bool(used) != complement, name
