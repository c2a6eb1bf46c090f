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
from mergekit_lox.methods.inputs import ALIGNED, RoleRequirement, owned_result, role_tensors
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
    if aligned.ndim < 2:
        return aligned
    dtype = linalg.compute_dtype(aligned)
    W_a = aligned.to(dtype)
    safety_vector = W_a - base.to(dtype)
    out = linalg.add_lowrank(W_a, safety_vector, rank, alpha, svd)
    return out.to(aligned.dtype)


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
    if aligned.ndim < 2:
        raise ValueError(f"lox_factors needs a matrix or a stack of matrices, got shape {tuple(aligned.shape)}")
    dtype = linalg.compute_dtype(aligned)
    safety_vector = aligned.to(dtype) - base.to(dtype)
    if linalg.truncates(safety_vector, rank):
        U, S, Vh = linalg.top_k(safety_vector, rank, svd)
    else:
        U, S, Vh = linalg.svd(safety_vector)
    root = S.sqrt()
    return U * (alpha * root).unsqueeze(-2), root.unsqueeze(-1) * Vh


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
    return owned_result(extrapolate(inputs[ALIGNED], inputs["base"], alpha, rank, svd), inputs, NAME, ALIGNED)


METHOD = lox_extrapolate
register_method(METHOD, ROLES)
