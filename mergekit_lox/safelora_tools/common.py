"""What the Safe LoRA commands share: scores, the lowest-N selection, errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

ADAPTER_REPORT = "safelora.json"
LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"
# LoraConfig fields that change what a stored (A, B) pair means; the adapter
# path supports plain LoRA on linear layers only and refuses the rest. (``fan_in_fan_out``
# is not among them: PEFT sets it per module type, True exactly on a Conv1D, whose weight is
# then read transposed; layout.py.)
UNSUPPORTED_LORA_OPTIONS = (
    "use_dora",
    "lora_bias",
    "modules_to_save",
    "trainable_token_indices",
    "target_parameters",
    "layer_replication",
    "use_qalora",
    "use_bdlora",
    "alora_invocation_tokens",
)


class SafeLoRAToolError(ValueError):
    """Bad input to safelora-select / safelora-adapter; the message names the culprit."""


@dataclass(frozen=True)
class Scored:
    """One decision unit (a tensor of a recipe, a module of an adapter) and its cosine."""

    name: str
    cos: float


def select_lowest(
    scores: Sequence[Scored], num_layers: int, what: str, *, accuracy: float = 0.0, warn=None
) -> Tuple[float, List[Scored]]:
    """Safe LoRA's number mode: the ``num_layers`` lowest cosines and a threshold that
    selects exactly them.

    The reference takes ``np.sort(cos)[:N][-1]`` and projects ``cos <= thrs``: the N-th
    tensor then sits exactly at the threshold, and a merge that recomputes its cosine
    (another CPU's BLAS path, ``--cuda``, another dtype) projects it or not by the last
    bit. The threshold here is the midpoint between the N-th lowest cosine and the next
    higher one (the N-th plus ``accuracy`` when none is higher), so any recomputation
    within half the gap decides the same. Tensors that tie with the N-th are selected
    too, as in the reference. ``warn(message)`` is called, naming both tensors, when the
    gap is below ``2 accuracy`` (the cosine's accuracy in the kernel's computation).
    Units without a cosine (V == 0, dW == 0, 1-D) never count.
    """
    ranked = sorted(scores, key=lambda s: (s.cos, s.name))
    if num_layers < 1:
        raise SafeLoRAToolError(f"--num-layers must be at least 1, got {num_layers}")
    if num_layers > len(ranked):
        raise SafeLoRAToolError(
            f"--num-layers {num_layers} but {what} has only {len(ranked)} "
            "tensor(s) with a Safe LoRA cosine (2-D or more, V != 0, dW != 0)"
        )
    nth = ranked[num_layers - 1]
    selected = [s for s in ranked if s.cos <= nth.cos]
    following = ranked[len(selected)] if len(selected) < len(ranked) else None
    if following is None:
        return nth.cos + accuracy, selected
    threshold = nth.cos + (following.cos - nth.cos) / 2
    if warn is not None and following.cos - nth.cos < 2 * accuracy:
        warn(
            f"warning: {what}: cosine number {len(selected)} from the lowest ({nth.name}, {nth.cos:.8g}) and the next "
            f"({following.name}, {following.cos:.8g}) differ by {following.cos - nth.cos:.2g}, within the cosine's "
            f"accuracy {accuracy:.0e}: a merge on another CPU, GPU or dtype may project a different set"
        )
    return threshold, selected


def refuse_inside(out: str, inputs: Sequence[Tuple[str, str]], option: str = "output") -> None:
    """Never write into an input model's (or adapter's) directory: (label, path) pairs."""
    from mergekit_lox.files.output import input_holding

    holding = input_holding(out, inputs)
    if holding:
        label, path = holding
        raise SafeLoRAToolError(f"{option} {out} is inside the {label} directory {path}; choose another path")


def echo_selection(selected: Sequence[Scored], num_layers: int, what: str, echo) -> None:
    if len(selected) > num_layers:
        echo(f"{len(selected)} {what}s tie at or below the threshold; all are projected")
    echo(f"{'cosine':>10}  {what}")
    for s in selected:
        echo(f"{s.cos:10.6f}  {s.name}")
