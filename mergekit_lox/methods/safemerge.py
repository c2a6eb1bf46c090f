"""`safemerge`: SafeMERGE, arXiv 2503.17239 (Djuhera et al.).

Merge a fine-tuned layer toward a safety model only where its update strays
from the alignment subspace, measured by Safe LoRA's projection cosine:

    V   = W_a - W_b,  dW = W_f - W_a
    C   = V Vᵀ / ||V||_F                 (projection: scaled, the reference's)
        = U_k U_kᵀ, U from SVD(V)        (projection: orthogonal)
    cos = <C dW, dW> / (||C dW||_F ||dW||_F)
    out = (1 - w) W_f + w W_s  if cos < threshold, else W_f

W_s is the safety model (the aligned model fine-tuned on safety data) and w
its share (`safety_weight`). With W_f = W_0 + dW_f and W_s = W_0 + dW_s on the
same W_0, ``(1 - w) W_f + w W_s = W_0 + (1 - w) dW_f + w dW_s``: the paper's
linear merge of the two updates, in full weights.

Reference implementation: `utils.py` in github.com/aladinD/SafeMERGE. Where it
and the paper differ, and which one this follows (the comparison is strict,
the cosine is not rounded, the merge is the weights' linear combination rather
than PEFT's factor-wise one, a layer with V == 0 keeps W_f): docs/safemerge.md.
The cosine is Safe LoRA's own (``safelora.projection_cosine``, looked up when
called: the start-up hook may import this module while safelora.py is still
half-imported), so `analyze`, `safelora-select` and both kernels agree on it.
"""

from __future__ import annotations

from typing import Literal, Optional

import annotated_types
import torch
from mergekit.merge_methods.base import BasePolicy, InputContract, PerNonBase, TensorGroup
from mergekit.merge_methods.easy_define import merge_method
from pydantic import PositiveInt
from typing_extensions import Annotated

from mergekit_lox import linalg
from mergekit_lox.methods import safelora
from mergekit_lox.methods.inputs import (
    ALIGNED,
    FINETUNED,
    RoleRequirement,
    owned_result,
    role_tensors,
    warn_low_precision,
)
from mergekit_lox.methods.registration import register_method

NAME = "safemerge"
SAFETY = "safety"
ROLES = RoleRequirement(NAME, (ALIGNED, FINETUNED, SAFETY))

# A cosine lies in [-1, 1]; a threshold outside it merges every layer or none.
Threshold = Annotated[float, annotated_types.Interval(ge=-1, le=1)]
# The safety model's share of a merged layer: 0 keeps W_f, 1 takes W_s.
SafetyWeight = Annotated[float, annotated_types.Interval(ge=0, le=1)]
Projection = Literal["scaled", "orthogonal"]


def merge(
    finetuned: torch.Tensor,
    safety: torch.Tensor,
    aligned: torch.Tensor,
    base: torch.Tensor,
    threshold: float = 0.35,
    safety_weight: float = 0.2,
    projection: str = "scaled",
    rank: int = 8,
    svd: linalg.SvdMode = "auto",
) -> torch.Tensor:
    """The pure SafeMERGE rule for one tensor; returns it in ``finetuned``'s dtype.

    1-D tensors (norms, biases) pass: the reference merges LoRA layers only.
    A NaN cosine (V == 0 or dW == 0: no subspace, or nothing fine-tuned) compares
    False, so W_f passes; the reference's cosine is 0 there (docs/safemerge.md).
    """
    return merge_with_cosine(finetuned, safety, aligned, base, threshold, safety_weight, projection, rank, svd)[0]


def merge_with_cosine(
    finetuned, safety, aligned, base, threshold, safety_weight, projection, rank, svd, report_tie=None
):
    """``(merge(...), cos)``; cos is None for a 1-D tensor (it passes). ``report_tie``:
    safelora.projection_cosine's."""
    if finetuned.ndim < 2:
        return finetuned, None
    cos, _, _ = safelora.projection_cosine(finetuned, aligned, base, projection, rank, svd, report_tie)
    W_f = finetuned.to(linalg.compute_dtype(finetuned))
    merged = W_f + safety_weight * (safety.to(W_f.dtype) - W_f)
    # torch.where keeps the decision on the device (no host synchronisation).
    return torch.where(cos < threshold, merged, W_f).to(finetuned.dtype), cos


@merge_method(
    name=NAME,
    pretty_name="SafeMERGE",
    reference_url="https://arxiv.org/abs/2503.17239",
    contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=3, max_non_base=3),
)
def safemerge(
    group: TensorGroup,
    threshold: Threshold = 0.35,
    safety_weight: SafetyWeight = 0.2,
    projection: Projection = "scaled",
    rank: PositiveInt = 8,
    svd: linalg.SvdMode = "auto",
    role: PerNonBase[Optional[str]] = None,
) -> torch.Tensor:
    inputs = role_tensors(ROLES, group, role)
    warn_low_precision(NAME, inputs[FINETUNED])
    ties = []
    merged, cos = merge_with_cosine(
        inputs[FINETUNED],
        inputs[SAFETY],
        inputs[ALIGNED],
        inputs["base"],
        threshold,
        safety_weight,
        projection,
        rank,
        svd,
        ties,
    )
    safelora.warn_decision(NAME, group.metadata.name, ties, cos, threshold, projection, svd, rank)
    return owned_result(merged, inputs, NAME, FINETUNED)


METHOD = safemerge
register_method(METHOD, ROLES)
