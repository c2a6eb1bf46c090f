"""Issue 23: a decision at a boundary (LSSF's rank cut, Safe LoRA's and SafeMERGE's
threshold) that rounding may decide is reported, naming the tensor; one away from the
boundary is not. Each boundary is planted from an independent float64 evaluation."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from mergekit.merge_methods import merge_tensors

from mergekit_lox import linalg
from mergekit_lox.adapters.terms import term_factors
from mergekit_lox.methods import safelora
from mergekit_lox.safelora_tools.adapter import select_modules

ROLES = {"role": ["aligned", "finetuned"]}


def power_law(m=48, n=80, seed=5):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, m, generator=g, dtype=torch.float64))
    S = torch.arange(1, m + 1, dtype=torch.float64) ** -1.0
    return ((U * S) @ V.T).float()


def entropy_fractions(M: torch.Tensor) -> np.ndarray:
    """``H_r / H`` for r = 1..n, in float64 from NumPy's SVD of the float32 matrix."""
    S = np.linalg.svd(M.double().numpy(), compute_uv=False)
    p = S**2 / np.sum(S**2)
    h = -p * np.log(p)
    return np.cumsum(h) / np.sum(h)


R = 10  # the planted boundary: between ranks R and R + 1


def test_lssf_rank_on_the_rule_boundary_is_flagged_on_every_path():
    M = power_law()
    fractions = entropy_fractions(M)
    on_edge = float(fractions[R - 1])  # H_R = eta H: R or R + 1 by the last bit
    inside = float((fractions[R - 1] + fractions[R]) / 2)  # half a step from both: R + 1
    for svd in ("exact", "auto", "randomized"):
        _, ranks, close = linalg.energy_entropy_top_k(M, inside, svd)
        assert int(ranks) == R + 1 and not bool(close), svd
        _, ranks, close = linalg.energy_entropy_top_k(M, on_edge, svd)
        assert int(ranks) in (R, R + 1) and bool(close), svd
    _, ranks, close = linalg.energy_entropy_lowrank(M, inside, "auto")
    assert int(ranks) == R + 1 and not bool(close)
    assert bool(linalg.energy_entropy_lowrank(M, on_edge, "auto").close)
    # eta = 1 is full rank by definition: nothing to flag on a full-rank spectrum.
    _, ranks, close = linalg.energy_entropy_top_k(M, 1.0, "auto")
    assert int(ranks) == 48 and not bool(close)
    # A stack: only the matrix on its boundary is flagged.
    stack = torch.stack([M, power_law(seed=6)])
    assert linalg.energy_entropy_top_k(stack, on_edge, "exact").close.tolist()[0] is True


def test_lssf_kernel_names_the_tensor_whose_rank_rounding_decides(caplog):
    M = power_law()
    fractions = entropy_fractions(M)
    base = torch.zeros_like(M)
    finetuned = M + 0.1
    for eta, warned in ((float(fractions[R - 1]), True), (float((fractions[R - 1] + fractions[R]) / 2), False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mergekit_lox"):
            merge_tensors([base, M, finetuned], "lssf_fusion", base_index=0, parameters={**ROLES, "eta": eta})
        lines = [r.getMessage() for r in caplog.records if "within rounding" in r.getMessage()]
        assert len(lines) == int(warned), lines
        if warned:
            assert lines[0].startswith("lssf_fusion: tensor")
            assert f"automatic rank {R} " in lines[0] or f"automatic rank {R + 1} " in lines[0]


def planted(S, m=40, n=56, seed=9, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, len(S), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, len(S), generator=g, dtype=torch.float64))
    return ((U * torch.tensor(S, dtype=torch.float64)) @ V.T).to(dtype)


TIED = [5.0, 4.0, 3.0, 3.0, 2.0, 1.0, 0.5]  # s_3 == s_4: no rank-3 term is the rank-3 term
GAP = [5.0, 4.0, 3.0, 1.5, 1.0, 0.5, 0.25]


def test_a_fixed_rank_on_a_tie_is_flagged_on_every_path_and_named_by_the_kernels(caplog):
    tolerance = linalg.RANDOMIZED.tolerance
    for svd in ("exact", "auto", "randomized"):
        # float64: every path ends at LAPACK, which cannot separate the pair.
        assert bool(linalg.guarded_top_k(planted(TIED, dtype=torch.float64), 3, svd).tied), svd
        # float32: LAPACK's float32 SVD flags it; the float64 Gram path may resolve the
        # float32 input's own tiny gap, and then proves its term (bound <= tolerance).
        guarded = linalg.guarded_top_k(planted(TIED), 3, svd)
        assert bool(guarded.tied) or float(guarded.bound) <= tolerance, svd
        assert not bool(linalg.guarded_top_k(planted(GAP), 3, svd).tied), svd
        # A tie among directions below the Agreement's share of the term is not flagged.
        assert not bool(linalg.guarded_top_k(planted([5.0, 4.0, 1e-5, 1e-5]), 3, svd).tied), svd
    assert bool(linalg.guarded_top_k(planted(TIED), 3, "exact").tied)
    stack = torch.stack([planted(GAP), planted(TIED)])
    assert linalg.guarded_top_k(stack, 3, "exact").tied.tolist() == [False, True]
    orthogonal = {"rank": 3, "svd": "exact", "projection": "orthogonal", "threshold": -0.5}
    safemerge_roles = ["aligned", "finetuned", "safety"]
    for S, warned in ((TIED, True), (GAP, False)):
        aligned = planted(S)
        base = torch.zeros_like(aligned)
        cases = [
            ([base, aligned], "lox_extrapolate", {"rank": 3, "svd": "exact"}),
            ([base, aligned, aligned + 0.1], "lssf_fusion", {**ROLES, "rank": 3, "svd": "exact"}),
            ([base, aligned, aligned + 0.1], "safelora_project", {**ROLES, **orthogonal}),
            ([base, aligned, aligned + 0.1, aligned + 0.2], "safemerge", {"role": safemerge_roles, **orthogonal}),
        ]
        for tensors, method, parameters in cases:
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="mergekit_lox"):
                merge_tensors(tensors, method, base_index=0, parameters=parameters)
            lines = [r.getMessage() for r in caplog.records if "tie within rounding" in r.getMessage()]
            assert len(lines) == int(warned), (method, lines)
            if warned:
                assert lines[0].startswith(f"{method}: tensor") and "values 3 and 4" in lines[0]
        # The adapter path (`mergekit-lox adapter`, api.*_adapter) reports it too.
        lssf = {"scale": 1.0, "eta": 0.9, "rank": 3, "top_weight": 1.0, "svd": "exact", "subspace": None}
        terms = (("lox_extrapolate", {"alpha": 1.25, "rank": 3, "svd": "exact"}), ("lssf_fusion", lssf))
        for method, parameters in terms:
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="mergekit_lox"):
                term_factors(method, {"base": base, "aligned": aligned, "finetuned": aligned}, parameters, "w.weight")
            lines = [r.getMessage() for r in caplog.records if "tie within rounding" in r.getMessage()]
            assert len(lines) == int(warned) and all(f"{method}: tensor w.weight" in line for line in lines)


def cosine_case(seed=3):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(24, 16, generator=g)
    aligned = base + 0.3 * torch.randn(24, 16, generator=g)
    finetuned = aligned + 0.2 * torch.randn(24, 16, generator=g)
    safety = aligned + 0.1 * torch.randn(24, 16, generator=g)
    cos64, _, _ = safelora.projection_cosine(finetuned.double(), aligned.double(), base.double())
    return base, aligned, finetuned, safety, float(cos64)


@pytest.mark.parametrize("method", ["safelora_project", "safemerge"])
def test_a_cosine_within_its_accuracy_of_the_threshold_is_named(method, caplog):
    base, aligned, finetuned, safety, cos = cosine_case()
    tensors = [base, aligned, finetuned] + ([safety] if method == "safemerge" else [])
    roles = {"role": ["aligned", "finetuned"] + (["safety"] if method == "safemerge" else [])}
    accuracy = safelora.cosine_accuracy("scaled", "auto")
    # On the float64 cosine (the float32 kernel's is within its accuracy); 30 accuracies away.
    for threshold, warned in ((cos, True), (cos + 30 * accuracy, False), (cos - 30 * accuracy, False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mergekit_lox"):
            merge_tensors(tensors, method, base_index=0, parameters={**roles, "threshold": threshold})
        lines = [r.getMessage() for r in caplog.records if "of the threshold" in r.getMessage()]
        assert len(lines) == int(warned), (threshold, lines)
        if warned:
            assert lines[0].startswith(f"{method}: tensor") and "may decide this tensor the other way" in lines[0]


def test_safelora_adapter_names_modules_near_a_given_threshold():
    modules = [SimpleNamespace(module=f"m{i}", cos=c, projected=False) for i, c in enumerate([0.2, 0.5000001, 0.7])]
    warnings = []
    threshold, selected = select_modules(modules, 0.5, None, "adapter a", accuracy=1e-5, warn=warnings.append)
    assert threshold == 0.5 and [s.name for s in selected] == ["m0"]
    assert len(warnings) == 1 and "module m1" in warnings[0] and warnings[0].startswith("warning: adapter a")
    warnings.clear()
    select_modules(modules, 0.45, None, "adapter a", accuracy=1e-5, warn=warnings.append)
    assert warnings == []


def test_the_float32_cosine_is_within_its_stated_accuracy_at_llm_sizes():
    """torch's float32 vector_norm lost 1e-4 of a 1024 x 2816 norm (4.5e-4 at 2048 x 5632)
    and moved the cosine by as much: 10 times the accuracy the threshold decisions assume."""
    g = torch.Generator().manual_seed(0)
    base = 0.02 * torch.randn(1024, 2816, generator=g)
    aligned = base + 1e-3 * torch.randn(1024, 2816, generator=g)
    finetuned = aligned + 1e-3 * torch.randn(1024, 2816, generator=g) + 0.5 * (aligned - base)
    norm64 = float(linalg.sum_of_squares(finetuned.double()))
    assert abs(float(linalg.sum_of_squares(finetuned)) / norm64 - 1) < 1e-6
    cos32 = float(safelora.projection_cosine(finetuned, aligned, base)[0])
    cos64 = float(safelora.projection_cosine(finetuned.double(), aligned.double(), base.double())[0])
    assert abs(cos32 - cos64) < safelora.FLOAT32_COSINE_ACCURACY / 10
