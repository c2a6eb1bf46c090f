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
The contract (formula, defaults, agreement): docs/methods.md section 3.
"""

from __future__ import annotations

import logging
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
from mergekit_lox.methods.inputs import (
    ALIGNED,
    FINETUNED,
    RoleRequirement,
    owned_result,
    role_tensors,
    warn_low_precision,
    warn_tied_rank,
)
from mergekit_lox.methods.registration import register_method

NAME = "safelora_project"
ROLES = RoleRequirement(NAME, (ALIGNED, FINETUNED))

Projection = Literal["scaled", "orthogonal"]


def orthogonal_basis(alignment: torch.Tensor, rank: int, svd: linalg.SvdMode = "auto") -> torch.Tensor:
    """``U_k``: the top-``rank`` left singular vectors of V, per matrix of a stack.

    Directions whose singular value is zero at working precision are dropped
    (their column is zeroed): when V has rank below ``k`` those columns of U are
    an arbitrary basis of V's null space, which differs between devices and
    libraries and would project dW onto directions V does not contain.
    """
    return orthogonal_factors(alignment, rank, svd)[0]


def orthogonal_factors(alignment: torch.Tensor, rank: int, svd: linalg.SvdMode = "auto"):
    """``(orthogonal_basis(...), tied)``: ``tied`` (linalg.GuardedTopK.tied) where ``s_k``
    of V ties ``s_{k+1}`` within rounding, so that the basis is not determined."""
    k = min(rank, linalg.full_rank_of(alignment))
    guarded = linalg.guarded_top_k(alignment, k, svd)
    factors = guarded.factors
    # The cutoff is relative to S[0], so the top-k values alone decide it.
    keep = linalg.nonzero_mask(factors.S, alignment.shape)
    return factors.U * keep.unsqueeze(-2).to(factors.U.dtype), guarded.tied


def project_update(
    alignment: torch.Tensor,
    update: torch.Tensor,
    projection: str,
    rank: int,
    svd: linalg.SvdMode = "auto",
    basis: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``C dW`` without ever forming an out x out matrix when in < out.

    ``update`` may have any number of columns: the adapter path projects the
    LoRA factor B (out x r) with the same C, since C (s B A) = s (C B) A.
    ``basis``: ``orthogonal_basis(alignment, rank, svd)`` when already computed.
    """
    if projection == "scaled":
        return linalg.left_project(alignment, update, scale=linalg.frobenius(alignment))
    return linalg.left_project(orthogonal_basis(alignment, rank, svd) if basis is None else basis, update)


# How far the kernel's float32 cosine may sit from the exact one: rounding of its dot
# products (about sqrt(n) u for n ~ 1e7 elements, u = 6e-8), with room to spare; an
# orthogonal projection from a certified sketch or the Gram path adds the Agreement's
# bound on the subspace (linalg.RANDOMIZED.tolerance).
FLOAT32_COSINE_ACCURACY = 1e-5


def cosine_accuracy(projection: str = "scaled", svd: str = "auto") -> float:
    """The margin within which a recomputed cosine (another BLAS path, device or the
    float64 reference) may fall on the other side of a threshold."""
    if projection == "orthogonal" and svd != "exact":
        return max(FLOAT32_COSINE_ACCURACY, linalg.RANDOMIZED.tolerance)
    return FLOAT32_COSINE_ACCURACY


def warn_near_threshold(method: str, name, cos: torch.Tensor, threshold: float, accuracy: float) -> bool:
    """Warn, naming the tensor, when its cosine lies within ``accuracy`` of the threshold:
    the decision (project or not, merge or not) is then one that another CPU's BLAS path,
    a GPU or another dtype may take the other way. A threshold written by
    ``safelora-select`` lies midway between two cosines, away from both; one written by
    hand may not. Returns whether it warned (one host synchronisation per tensor)."""
    value = float(cos)
    if value != value or abs(value - threshold) > accuracy:  # NaN: nothing decided
        return False
    logging.getLogger(__name__).warning(
        "%s: tensor %s: cosine %.8g is within %.0e (the cosine's accuracy) of the threshold %r: "
        "another CPU's BLAS path, a GPU or another dtype may decide this tensor the other way",
        method,
        name,
        value,
        accuracy,
        threshold,
    )
    return True


def update_cosine(
    alignment: torch.Tensor,
    update: torch.Tensor,
    projection: str,
    rank: int,
    svd: linalg.SvdMode = "auto",
    basis: Optional[torch.Tensor] = None,
):
    """``(cos, C dW)`` for V = ``alignment`` and dW = ``update`` (compute dtype).

    cos is NaN when V == 0 or dW == 0 (nothing to decide: the fine-tuned tensor
    passes). When dW != 0 but C dW == 0 (dW lies wholly outside V's column
    space) cos is 0, its limit: the reference's
    ``torch.nn.functional.cosine_similarity`` also gives 0 there, so the
    tensor is projected (to W_a) whenever the threshold is >= 0.
    """
    projected = project_update(alignment, update, projection, rank, svd, basis)
    # Summations, not vector_norm / BLAS dot, whose float32 accumulation moved the cosine
    # of a 2048 x 5632 tensor by 8e-4 (linalg.sum_of_squares); these keep it within 1e-5.
    everything = tuple(range(update.ndim))
    norms = linalg.sum_of_squares(projected, everything).sqrt() * linalg.sum_of_squares(update, everything).sqrt()
    dot = (projected * update).sum()
    cos = torch.where(norms > 0, dot / torch.where(norms > 0, norms, 1.0), 0.0)
    decidable = (torch.count_nonzero(alignment) > 0) & (torch.count_nonzero(update) > 0)
    return torch.where(decidable, cos, torch.nan), projected


def projection_cosine(
    finetuned: torch.Tensor,
    aligned: torch.Tensor,
    base: torch.Tensor,
    projection: str = "scaled",
    rank: int = 8,
    svd: linalg.SvdMode = "auto",
    report_tie: Optional[list] = None,
):
    """``(cos, C dW, W_a)`` in compute precision; cos is NaN when V or dW is zero.

    The one place the Safe LoRA decision is computed: the kernel, the
    ``safelora-select`` command and ``mergekit-lox analyze`` all call it.
    ``report_tie``: a list that gets the orthogonal projection's ``tied``
    (linalg.GuardedTopK.tied; nothing for the scaled projection).
    """
    dtype = linalg.compute_dtype(finetuned)
    W_a = aligned.to(dtype)
    alignment = W_a - base.to(dtype)
    update = finetuned.to(dtype) - W_a
    basis = None
    if projection == "orthogonal" and report_tie is not None:
        basis, tied = orthogonal_factors(alignment, rank, svd)
        report_tie.append(tied)
    cos, projected = update_cosine(alignment, update, projection, rank, svd, basis)
    return cos, projected, W_a


def project(
    finetuned: torch.Tensor,
    aligned: torch.Tensor,
    base: torch.Tensor,
    threshold: float,
    projection: str,
    rank: int,
    svd: linalg.SvdMode = "auto",
) -> torch.Tensor:
    """The pure Safe LoRA rule; returns the result in ``finetuned``'s dtype.

    ``svd`` matters for ``projection: orthogonal`` only (the scaled
    projection needs no decomposition).
    """
    return project_with_cosine(finetuned, aligned, base, threshold, projection, rank, svd)[0]


def project_with_cosine(
    finetuned, aligned, base, threshold: float, projection: str, rank: int, svd="auto", report_tie=None
):
    """``(project(...), cos)``; cos is None for a 1-D tensor (it passes). ``report_tie``:
    projection_cosine's."""
    if finetuned.ndim < 2:
        return finetuned, None
    cos, projected, W_a = projection_cosine(finetuned, aligned, base, projection, rank, svd, report_tie)
    # NaN (dW == 0 or V == 0) compares False: the fine-tuned tensor passes.
    # torch.where keeps the decision on the device (no host synchronisation).
    out = torch.where(cos <= threshold, W_a + projected, finetuned.to(W_a.dtype))
    return out.to(finetuned.dtype), cos


def warn_decision(method: str, name, ties, cos, threshold: float, projection: str, svd: str, rank: int) -> None:
    """The warnings a kernel that decides by this cosine owes (safelora_project, safemerge):
    a tie at the projection's rank, and a cosine within its accuracy of the threshold."""
    for tied in ties:
        warn_tied_rank(method, name, tied, rank)
    if cos is not None:
        warn_near_threshold(method, name, cos, threshold, cosine_accuracy(projection, svd))


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
    svd: linalg.SvdMode = "auto",
    role: PerNonBase[Optional[str]] = None,
) -> torch.Tensor:
    inputs = role_tensors(ROLES, group, role)
    warn_low_precision(NAME, inputs[FINETUNED])
    ties = []
    merged, cos = project_with_cosine(
        inputs[FINETUNED], inputs[ALIGNED], inputs["base"], threshold, projection, rank, svd, ties
    )
    warn_decision(NAME, group.metadata.name, ties, cos, threshold, projection, svd, rank)
    return owned_result(merged, inputs, NAME, FINETUNED)


METHOD = safelora_project
register_method(METHOD, ROLES)
