"""A kernel's inputs: which is the aligned model and which the fine-tune (the `role`
parameter), and none of them NaN or Inf.

One function serves both places where roles are checked: the planner (while
mergekit plans the merge, before any tensor is computed; see
``methods.check_planned_parameters``) and the kernels themselves (for library
callers of ``merge_tensors`` / ``merge_state_dicts``, which skip the planner).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Dict, Hashable, Mapping, Optional, Tuple

import torch

ALIGNED = "aligned"
FINETUNED = "finetuned"


class RoleError(ValueError):
    """The recipe's `role` parameters do not describe the inputs a method needs."""


@dataclass(frozen=True)
class RoleRequirement:
    """The roles a method's non-base models must carry.

    ``lone_may_omit``: a single non-base model may leave its role unset (LoX
    needs one aligned model and nothing else, so there is nothing to tell apart).
    """

    method: str
    required: Tuple[str, ...]
    lone_may_omit: bool = False

    def text(self) -> str:
        wanted = " and ".join(f"one with `parameters: {{role: {r}}}`" for r in self.required)
        return f"{self.method} needs base_model plus exactly {len(self.required)} model(s) under `models:`: {wanted}"

    def resolve(
        self,
        roles: Mapping[Hashable, Optional[str]],
        *,
        where: Optional[str] = None,
    ) -> Dict[str, Hashable]:
        """Map each required role to the input carrying it, or raise a RoleError.

        ``roles`` maps every non-base input to its `role` value (None when unset).
        """
        required = self.required
        problems = []
        for model, role in roles.items():
            if role is not None and role not in required:
                problems.append(f"model {model} has role {role!r}, expected one of {', '.join(required)}")
        if len(roles) != len(required):
            problems.append(f"got {len(roles)} non-base model(s)")
        if not problems:
            if self.lone_may_omit and len(roles) == 1:
                return {required[0]: next(iter(roles))}
            found: Dict[str, Hashable] = {}
            for model, role in roles.items():
                if role is None:
                    problems.append(f"model {model} has no role")
                elif role in found:
                    problems.append(f"role {role!r} is given to both {found[role]} and {model}")
                else:
                    found[role] = model
            missing = [r for r in required if r not in found]
            if missing and not problems:
                problems.append(f"no model has role {', '.join(missing)}")
            if not problems:
                return found
        location = f" (tensor {where})" if where else ""
        raise RoleError(f"{self.text()}; {'; '.join(problems)}{location}")


class RoleTensors(dict):
    """``{"base": W_b, "aligned": W_a[, "finetuned": W_f]}``; ``transposed``: the weight is
    stored ``[in, out]`` (a transformers Conv1D) and these are its ``[out, in]`` views
    (layout.py), which ``owned_result`` writes back transposed."""

    transposed: bool = False
    models: Dict[str, Hashable] = {}  # role -> the input (mergekit model reference) holding it


def role_tensors(requirement: RoleRequirement, group, role) -> RoleTensors:
    """A kernel's inputs, checked: ``{"base": W_b, "aligned": W_a[, "finetuned": W_f]}``.

    Refuses NaN/Inf inputs and bad roles (naming the tensor and the model)
    before any arithmetic; ``role`` is the kernel's per-model `role` values.
    A weight stored transposed (Conv1D) comes as the linear map ``W [out, in]``, so that
    every method's one-sided formula acts on the layer's output space (layout.py).
    """
    from mergekit_lox.layout import stored_transposed

    require_finite(group)
    roles = requirement.resolve(dict(role), where=group.metadata.name)
    by_id = {entry.id: entry.tensor for entry in group.non_base}
    tensors = RoleTensors({"base": group.base.tensor, **{name: by_id[model] for name, model in roles.items()}})
    if group.base.tensor.ndim == 2 and stored_transposed(group.base.id, group.metadata.name):
        tensors = RoleTensors({key: tensor.mT for key, tensor in tensors.items()})
        tensors.transposed = True
    tensors.models = {"base": group.base.id, **roles}
    return tensors


# --------------------------------------------------------------------------- no-op merges
# A merge that changes nothing (Safe LoRA with every cosine above the threshold, an aligned
# model identical to its base) runs to the end and looks like a result. Each kernel tallies,
# per method, its weight matrices, those it returned unchanged and those whose safety
# vector W_a - W_b is zero; `mergekit-lox run` reads the tally before it replaces OUT
# (run/safety.py) and warns, or refuses with --strict.


@dataclass
class ChangeTally:
    matrices: int = 0
    unchanged: int = 0
    zero_safety: int = 0


_CHANGES: Dict[str, ChangeTally] = {}
_CHANGES_LOCK = threading.Lock()


def record_change(method: str, result: torch.Tensor, inputs: dict, passed: Hashable) -> None:
    """Tally one tensor of ``method``: changed or equal to its pass-through input ``passed``."""
    if result.ndim < 2:
        return  # 1-D weights pass through by design
    source = inputs[passed]
    unchanged = torch.equal(result, source.to(result.dtype))
    zero = torch.equal(inputs[ALIGNED], inputs["base"])
    with _CHANGES_LOCK:
        tally = _CHANGES.setdefault(method, ChangeTally())
        tally.matrices += 1
        tally.unchanged += int(unchanged)
        tally.zero_safety += int(zero)


def take_changes() -> Dict[str, ChangeTally]:
    """The tally since the last call, per method (and a fresh one started)."""
    with _CHANGES_LOCK:
        taken = dict(_CHANGES)
        _CHANGES.clear()
    return taken


def owned_result(
    result: torch.Tensor, inputs: dict, method: Optional[str] = None, passed: Hashable = None
) -> torch.Tensor:
    """``result``, or a copy of it where it is one of the kernel's ``inputs`` (or a view of one);
    with ``method``, tallied as changed or equal to its pass-through input ``passed``.

    Kernels pass inputs through (1-D weights; Safe LoRA's unprojected W_f), and
    mergekit's writer keeps every result until its output shard is written: a
    kept input tensor keeps its memory-mapped shard mapped, with every page of it
    read so far resident (measured at the 1B shape: LoX held two 1.9 GB shards of
    the aligned model where `linear` held one 0.8 GB shard per model; this copy
    brings it back, as mergekit's own ``--clone-tensors`` would for every tensor).
    """
    if method is not None:
        record_change(method, result, inputs, passed)
    if getattr(inputs, "transposed", False) and result.ndim == 2:
        result = result.mT.contiguous()  # back to the stored [in, out]
    pointer = result.untyped_storage().data_ptr()
    if any(t.untyped_storage().data_ptr() == pointer for t in inputs.values()):
        return result.clone()
    return result


# --------------------------------------------------------------------------- finite inputs
# A single NaN in an input spreads through an SVD into a whole output matrix, or
# makes ``torch.linalg.svd`` fail with a message that names neither the tensor
# nor the model. Every kernel (through ``roles.role_tensors``) and safelora-select's cosines
# call `require_finite` on their tensor group first.
#
# Cost: one float32 sum per input tensor and one host synchronisation per
# tensor group; only when a sum is not finite does the elementwise check run,
# and only when it fails are the bad values counted, to say how many.


class NonFiniteInputError(ValueError):
    """An input tensor holds NaN or Inf."""


def _nonfinite_counts(tensor: torch.Tensor) -> str:
    """``3 NaN and 1 Inf value(s) (of 4096, as float16)``."""
    nan = int(torch.isnan(tensor).sum())
    inf = int(torch.isinf(tensor).sum())
    counts = " and ".join(f"{n} {what}" for n, what in ((nan, "NaN"), (inf, "Inf")) if n)
    return f"{counts} value(s) (of {tensor.numel()}, as {str(tensor.dtype).removeprefix('torch.')})"


def nonfinite_message(tensor: torch.Tensor, name, model, kind: str = "model") -> str:
    return (
        f"input tensor {name} of {kind} {model} holds {_nonfinite_counts(tensor)}: "
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
    for entry, ok in zip(entries, flags.tolist(), strict=True):
        if not ok:
            raise NonFiniteInputError(nonfinite_message(entry.tensor, group.metadata.name, entry.id))


def finite_or_none(value) -> Optional[float]:
    """A computed number (a float or a 0-d tensor) for a report: None when NaN or Inf."""
    value = float(value)
    return value if math.isfinite(value) else None


def require_finite_tensor(tensor: torch.Tensor, name, model, kind: str = "model") -> None:
    """The same check for one tensor outside a merge (safelora-adapter's inputs)."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise NonFiniteInputError(nonfinite_message(tensor, name, model, kind))


class NonFiniteOutputError(ValueError):
    """A merged tensor holds NaN or Inf once cast to the dtype it is stored in."""


def require_finite_output(method: str, name, tensor: torch.Tensor) -> None:
    """Refuse to store a result of ``method`` that holds NaN or Inf (after the cast
    to its storage dtype, ``mergekit_compat.install_output_check``). Finite inputs
    (checked above) with an infinite result mean the result exceeds the storage
    dtype's range. Cost: one float32 sum per output tensor, as for the inputs."""
    if not tensor.is_floating_point() or bool(torch.isfinite(tensor.sum(dtype=torch.float32))):
        return
    if bool(torch.isfinite(tensor).all()):
        return
    dtype = str(tensor.dtype).removeprefix("torch.")
    raise NonFiniteOutputError(
        f"output tensor {name} of {method} holds {_nonfinite_counts(tensor)}: the result exceeds the range "
        f"of {dtype}, the dtype it is stored in (largest finite value {torch.finfo(tensor.dtype).max:.4g}); "
        "compute and store in a wider dtype (`dtype: float32` with `out_dtype: float32` or `bfloat16`), "
        "or use a smaller alpha / scale"
    )


def check_stored_output(method: str, name, tensor) -> None:
    """``mergekit_compat.install_output_check``'s check: our methods' outputs only."""
    from mergekit_lox.methods import role_requirement

    if role_requirement(method) is not None:
        require_finite_output(method, name, tensor)


# --------------------------------------------------------------------------- 16-bit inputs
_WARNED_LOW_PRECISION: set = set()


def warn_low_precision(method: str, tensor: torch.Tensor) -> None:
    """Warn once per process when ``method`` computes from 16-bit inputs: mergekit
    casts inputs to the recipe's ``dtype`` before the kernel, and rounding W_a and
    W_f to 16 bits costs 2-50% of a LoRA-sized update (Safe LoRA's C dW, LSSF's
    tau on a small fine-tune). `check` notes it too (check/parameters.py)."""
    if tensor.dtype not in (torch.float16, torch.bfloat16) or method in _WARNED_LOW_PRECISION:
        return
    _WARNED_LOW_PRECISION.add(method)
    import logging

    logging.getLogger("mergekit_lox").warning(
        "%s computes from %s inputs (the recipe's `dtype`, or the checkpoints' when it has none): "
        "rounding them to 16 bits costs 2-50%% of a small update; set `dtype: float32` and store with "
        "`out_dtype: bfloat16`",
        method,
        str(tensor.dtype).removeprefix("torch."),
    )


# --------------------------------------------------------------------------- ties at a fixed rank


def warn_tied_rank(method: str, name, tied: Optional[torch.Tensor], rank: int) -> None:
    """Warn, naming the tensor, where ``s_k`` ties ``s_{k+1}`` within rounding at a fixed
    ``rank`` (linalg.GuardedTopK.tied): the top-k subspace (LoX's and LSSF's term, Safe
    LoRA's and SafeMERGE's orthogonal projection) is then not determined, and another
    CPU's BLAS path, a GPU or another dtype may use another one."""
    if tied is None or not bool(tied.any()):
        return
    import logging

    where = torch.nonzero(tied.reshape(-1)).squeeze(-1).tolist()
    matrices = "" if tied.ndim == 0 else f" (matrices {where[:4]}{' ...' if len(where) > 4 else ''} of the stack)"
    logging.getLogger("mergekit_lox").warning(
        "%s: tensor %s%s: singular values %d and %d of the safety vector tie within rounding, so its top-%d "
        "subspace is not determined: another CPU's BLAS path, a GPU or another dtype may use another one; "
        "choose a rank where the spectrum has a gap (`mergekit-lox analyze`)",
        method,
        name,
        matrices,
        rank,
        rank + 1,
        rank,
    )
