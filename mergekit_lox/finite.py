"""Refuse NaN or Inf input weights, naming the tensor and the model.

A single NaN in an input spreads through an SVD into a whole output matrix, or
makes ``torch.linalg.svd`` fail with a message that names neither the tensor
nor the model. Every kernel (through ``roles.role_tensors``) and safelora-select's cosines
call `require_finite` on their tensor group first.

Cost: one float32 sum per input tensor and one host synchronisation per
tensor group; only when a sum is not finite does the elementwise check run,
and only when it fails are the bad values counted, to say how many.
"""

from __future__ import annotations

import torch


class NonFiniteInputError(ValueError):
    """An input tensor holds NaN or Inf."""


def nonfinite_message(tensor: torch.Tensor, name, model, kind: str = "model") -> str:
    nan = int(torch.isnan(tensor).sum())
    inf = int(torch.isinf(tensor).sum())
    counts = " and ".join(f"{n} {what}" for n, what in ((nan, "NaN"), (inf, "Inf")) if n)
    return (
        f"input tensor {name} of {kind} {model} holds {counts} value(s) "
        f"(of {tensor.numel()}, as {str(tensor.dtype).removeprefix('torch.')}): "
        f"that {kind}'s weights are damaged, or overflow the recipe's dtype; repair or replace that {kind}"
    )


def require_finite(group) -> None:
    """Raise NonFiniteInputError naming the first input tensor of ``group``
    (a mergekit TensorGroup) that holds NaN or Inf."""
    entries = [e for e in group.entries if e.tensor.is_floating_point()]
    if not entries:
        return
    # Screen with one float32 sum per tensor (a NaN or Inf anywhere makes it
    # non-finite): about 25x cheaper than an elementwise isfinite pass. Only a
    # non-finite sum (bad values, or finite values whose sum overflows) pays for
    # the exact check.
    sums = torch.stack([e.tensor.sum(dtype=torch.float32) for e in entries])
    if bool(torch.isfinite(sums).all()):
        return
    flags = torch.stack([torch.isfinite(e.tensor).all() for e in entries])
    if bool(flags.all()):
        return
    for entry, ok in zip(entries, flags.tolist()):
        if not ok:
            raise NonFiniteInputError(nonfinite_message(entry.tensor, group.metadata.name, entry.id))


def require_finite_tensor(tensor: torch.Tensor, name, model, kind: str = "model") -> None:
    """The same check for one tensor outside a merge (safelora-adapter's inputs)."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise NonFiniteInputError(nonfinite_message(tensor, name, model, kind))

