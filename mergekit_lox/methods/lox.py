"""`lox_extrapolate`: Low-Rank Extrapolation (LoX), arXiv 2506.15606.

Before fine-tuning, push the aligned model further along the top-k directions
of its safety update, so that later fine-tuning cannot wash them out:

    dW  = W_a - W_b
    out = W_a + alpha * lowrank_k(dW)      (ndim >= 2; W_a otherwise)

Reference implementation: `safety/LoX.py` in github.com/VITA-Group/LoX.
The contract (formula, defaults, agreement): docs/methods.md section 1.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from mergekit.merge_methods.base import (
    BasePolicy,
    InputContract,
    PerNonBase,
    TensorGroup,
)
from mergekit.merge_methods.easy_define import merge_method
from pydantic import FiniteFloat, NonNegativeInt

from mergekit_lox import linalg
from mergekit_lox.methods.inputs import ALIGNED, RoleRequirement, owned_result, role_tensors, warn_tied_rank
from mergekit_lox.methods.registration import register_method

NAME = "lox_extrapolate"
ROLES = RoleRequirement(NAME, (ALIGNED,), lone_may_omit=True)
# The term this method adds can be written as a PEFT LoRA adapter (`mergekit-lox adapter`).
ADAPTER = True


def extrapolate(
    aligned: torch.Tensor,
    base: torch.Tensor,
    alpha: float,
    rank: int,
    svd: linalg.SvdMode = "auto",
) -> torch.Tensor:
    """The pure LoX formula on tensors; returns the result in ``aligned``'s dtype.

    ``svd`` picks how the top-``rank`` subspace is found (linalg.SVD_MODES).
    """
    return extrapolate_with_ties(aligned, base, alpha, rank, svd)[0]


def extrapolate_with_ties(aligned, base, alpha: float, rank: int, svd: linalg.SvdMode = "auto"):
    """``(extrapolate(...), tied)``: ``tied`` (linalg.GuardedTopK.tied) where ``s_k`` ties
    ``s_{k+1}`` within rounding, so the rank-k term is not determined; None where nothing
    is truncated. One fused product adds the term (as linalg.add_lowrank)."""
    linalg.check_svd_mode(svd)
    if aligned.ndim < 2:
        return aligned, None
    dtype = linalg.compute_dtype(aligned)
    W_a = aligned.to(dtype)
    safety_vector = W_a - base.to(dtype)
    if not linalg.truncates(safety_vector, rank):
        return torch.add(W_a, safety_vector, alpha=alpha).to(aligned.dtype), None
    guarded = linalg.guarded_top_k(safety_vector, rank, svd)
    U, S, Vh = guarded.factors
    out = linalg.add_product(W_a, U * S.unsqueeze(-2), Vh, alpha=alpha)
    return out.to(aligned.dtype), guarded.tied


def lox_factors(
    aligned: torch.Tensor,
    base: torch.Tensor,
    alpha: float,
    rank: int,
    svd: linalg.SvdMode = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """LoX's added term as two factors: ``B @ A == alpha * lowrank_k(W_a - W_b)``.

    ``B = alpha * U_k S_k^1/2`` (``[..., m, k]``) and ``A = S_k^1/2 Vh_k``
    (``[..., k, n]``) in the compute dtype (float32; float64 for float64
    inputs), from the same top-``k`` subspace ``extrapolate`` adds (same
    ``svd`` path and guard). ``rank`` 0 or at least ``min(m, n)`` is the full
    term (k = min(m, n), from the exact SVD). Tensors need 2 or more dimensions.
    """
    B, A, _ = lox_factors_with_ties(aligned, base, alpha, rank, svd)
    return B, A


def lox_factors_with_ties(aligned, base, alpha: float, rank: int, svd: linalg.SvdMode = "auto"):
    """``(B, A, tied)``: lox_factors' and, where the term is truncated, where ``s_k`` ties
    ``s_{k+1}`` within rounding (linalg.GuardedTopK.tied); None where nothing is truncated."""
    if aligned.ndim < 2:
        raise ValueError(f"lox_factors needs a matrix or a stack of matrices, got shape {tuple(aligned.shape)}")
    dtype = linalg.compute_dtype(aligned)
    safety_vector = aligned.to(dtype) - base.to(dtype)
    tied = None
    if linalg.truncates(safety_vector, rank):
        guarded = linalg.guarded_top_k(safety_vector, rank, svd)
        (U, S, Vh), tied = guarded.factors, guarded.tied
    else:
        U, S, Vh = linalg.svd(safety_vector)
    root = S.sqrt()
    return U * (alpha * root).unsqueeze(-2), root.unsqueeze(-1) * Vh, tied


@merge_method(
    name=NAME,
    pretty_name="LoX (Low-Rank Extrapolation)",
    reference_url="https://arxiv.org/abs/2506.15606",
    contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1, max_non_base=1),
)
def lox_extrapolate(
    group: TensorGroup,
    alpha: FiniteFloat = 1.25,
    rank: NonNegativeInt = 6,
    svd: linalg.SvdMode = "auto",
    role: PerNonBase[Optional[str]] = None,
) -> torch.Tensor:
    inputs = role_tensors(ROLES, group, role)
    merged, tied = extrapolate_with_ties(inputs[ALIGNED], inputs["base"], alpha, rank, svd)
    warn_tied_rank(NAME, group.metadata.name, tied, rank)
    return owned_result(merged, inputs, NAME, ALIGNED)


METHOD = lox_extrapolate
register_method(METHOD, ROLES)
