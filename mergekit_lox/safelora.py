"""`safelora_project`: Safe LoRA projection, arXiv 2405.16833.

After fine-tuning, project the fine-tuning update onto the alignment subspace
where it strays from it:

    V   = W_a - W_b,  dW = W_f - W_a
    C   = V Vᵀ / ||V||_F                 (projection: scaled, the reference's)
        = U_k U_kᵀ, U from SVD(V)        (projection: orthogonal)
    cos = <C dW, dW> / (||C dW||_F ||dW||_F)
    out = W_a + C dW  if cos <= threshold, else W_f

Reference implementation: `model.py` in github.com/IBM/SafeLoRA. For a stack
of matrices (>2-D tensor) C acts on each matrix and the cosine, like the
decision, is taken over the whole tensor, as the reference decides per weight.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from mergekit.merge_methods.base import (
    BasePolicy,
    InputContract,
    PerNonBase,
    TensorGroup,
)
from mergekit.merge_methods.easy_define import merge_method
from pydantic import FiniteFloat, PositiveInt

from mergekit_lox import linalg
from mergekit_lox.registration import register_method
from mergekit_lox.roles import ALIGNED, FINETUNED, resolve_roles

NAME = "safelora_project"

Projection = Literal["scaled", "orthogonal"]


def project_update(
    alignment: torch.Tensor, update: torch.Tensor, projection: str, rank: int
) -> torch.Tensor:
    """``C dW`` without ever forming an out x out matrix when in < out."""
    if projection == "scaled":
        return linalg.left_project(alignment, update, scale=linalg.frobenius(alignment))
    k = min(rank, linalg.full_rank_of(alignment))
    return linalg.left_project(linalg.top_k(alignment, k).U, update)


def projection_cosine(
    finetuned: torch.Tensor,
    aligned: torch.Tensor,
    base: torch.Tensor,
    projection: str = "scaled",
    rank: int = 8,
):
    """``(cos, C dW, dW)`` in compute precision; cos is NaN when V or dW is zero."""
    dtype = linalg.compute_dtype(finetuned)
    W_a = aligned.to(dtype)
    alignment = W_a - base.to(dtype)
    update = finetuned.to(dtype) - W_a
    projected = project_update(alignment, update, projection, rank)
    cos = linalg.cosine(projected, update)
    # A zero V has an arbitrary orthogonal basis: never let it decide.
    cos = torch.where(torch.count_nonzero(alignment) > 0, cos, torch.nan)
    return cos, projected, W_a


def project(
    finetuned: torch.Tensor,
    aligned: torch.Tensor,
    base: torch.Tensor,
    threshold: float,
    projection: str,
    rank: int,
) -> torch.Tensor:
    """The pure Safe LoRA rule; returns the result in ``finetuned``'s dtype."""
    if finetuned.ndim < 2:
        return finetuned
    cos, projected, W_a = projection_cosine(finetuned, aligned, base, projection, rank)
    # NaN (dW == 0 or V == 0) compares False: the fine-tuned tensor passes.
    # torch.where keeps the decision on the device (no host synchronisation).
    out = torch.where(cos <= threshold, W_a + projected, finetuned.to(W_a.dtype))
    return out.to(finetuned.dtype)


@merge_method(
    name=NAME,
    pretty_name="Safe LoRA",
    reference_url="https://arxiv.org/abs/2405.16833",
    contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=2, max_non_base=2),
)
def safelora_project(
    group: TensorGroup,
    threshold: FiniteFloat = 0.5,
    projection: Projection = "scaled",
    rank: PositiveInt = 8,
    role: PerNonBase[Optional[str]] = None,
) -> torch.Tensor:
    roles = resolve_roles(NAME, dict(role), where=group.metadata.name)
    entries = {entry.id: entry.tensor for entry in group.non_base}
    return project(
        entries[roles[FINETUNED]],
        entries[roles[ALIGNED]],
        group.base.tensor,
        threshold,
        projection,
        rank,
    )


register_method(safelora_project)
