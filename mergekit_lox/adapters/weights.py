"""One weight's term, sorted into the adapter or the left-out list, and the totals.

Shared by `mergekit-lox adapter` (weights streamed through mergekit's planner)
and the Python API (weights from in-memory state dicts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from mergekit_lox import linalg
from mergekit_lox.adapters.lora import (
    CARRIED_KINDS,
    LoraAdapter,
    adapter_kind,
    cap_rank,
    module_of,
    term_norm_squared,
)
from mergekit_lox.adapters.terms import AdapterError

NO_TERM = ""  # the method leaves this weight as it is (1-D, or a zero term)


@dataclass
class ModuleTypes:
    """What the target model's weights are, from its modules (``lora.module_kinds``)."""

    kinds: Dict[str, str]
    tied: List[str]
    arch: str
    embeddings: bool = True  # write embedding LoRA for nn.Embedding weights
    meta_model: Optional[Callable[[], torch.nn.Module]] = None  # the architecture on the meta device, built anew


@dataclass
class WeightTerm:
    """One weight: where its term went, and the squared norms the distance needs."""

    name: str
    kind: str  # LINEAR / CONV1D / EMBEDDING (in the adapter), NO_TERM, or why it is left out
    merged_sq: float  # ||W + term||^2: the full merge of this weight
    term_sq: float = 0.0  # ||term||^2
    missing_sq: float = 0.0  # ||term - adapter's term||^2 (left out: all of it; capped: the dropped part)
    full_rank: int = 0
    factors: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    @property
    def carried(self) -> bool:
        return self.kind in CARRIED_KINDS

    @property
    def left_out(self) -> bool:
        return not self.carried and self.kind != NO_TERM


def weight_term(
    name: str,
    target: torch.Tensor,
    factors: Optional[Tuple[torch.Tensor, torch.Tensor]],
    types: ModuleTypes,
    max_rank: Optional[int] = None,
    require_complete: bool = False,
) -> WeightTerm:
    """Sort the term ``B @ A`` of weight ``name`` (added to ``target``)."""
    dtype = linalg.compute_dtype(target)
    W = target.to(dtype)
    if factors is None:
        return WeightTerm(name, NO_TERM, float(W.double().square().sum()))
    B, A = factors
    merged_sq = float((W + B @ A).double().square().sum())
    term_sq = term_norm_squared(B, A)
    if term_sq == 0.0:
        return WeightTerm(name, NO_TERM, merged_sq)
    kind = adapter_kind(name, tuple(target.shape), types.kinds, types.tied, types.embeddings, types.arch)
    if kind not in CARRIED_KINDS:
        if require_complete:
            raise AdapterError(f"weight {name} cannot be part of the adapter: it is {kind} (--require-complete)")
        return WeightTerm(name, kind, merged_sq, term_sq, term_sq, B.shape[-1])
    dropped = 0.0
    full_rank = B.shape[-1]
    if max_rank is not None:
        B, A, dropped = cap_rank(B, A, max_rank)
    return WeightTerm(name, kind, merged_sq, term_sq, dropped, full_rank, (B.cpu(), A.cpu()))


@dataclass
class AdapterTerms:
    """All weights' terms: the adapter, what it leaves out, how far it is from the full merge."""

    weights: List[WeightTerm] = field(default_factory=list)

    def adapter(self) -> LoraAdapter:
        adapter = LoraAdapter()
        for w in self.weights:
            if w.carried:
                adapter.add(module_of(w.name, w.kind), w.kind, *w.factors)
        if not adapter.factors:
            raise AdapterError("no weight has a non-zero term that a LoRA adapter can carry: there is nothing to write")
        return adapter

    def leave_out(self, names, reason: str) -> None:
        """Take the weights ``names`` out of the adapter, for ``reason`` (their whole term is missing)."""
        for w in self.weights:
            if w.name in names and w.carried:
                w.kind, w.missing_sq, w.factors = reason, w.term_sq, None

    def left_out(self) -> Dict[str, str]:
        return {w.name: w.kind for w in self.weights if w.left_out}

    def capped(self) -> Dict[str, Tuple[int, int]]:
        return {
            w.name: (w.full_rank, w.factors[0].shape[-1])
            for w in self.weights
            if w.carried and w.factors[0].shape[-1] < w.full_rank
        }

    def distance(self) -> float:
        """Relative Frobenius distance of target + adapter to the full merge, over all weights."""
        total = sum(w.merged_sq for w in self.weights)
        missing = sum(w.missing_sq for w in self.weights)
        return math.sqrt(missing / total) if total > 0 else 0.0

    def lines(self) -> List[str]:
        """What was left out or capped and what that changes, for the terminal."""
        lines = []
        left_out = [w for w in self.weights if w.left_out]
        if left_out:
            lines.append(f"left out {len(left_out)} weight(s) whose term the adapter does not carry:")
            for w in left_out:
                share = math.sqrt(w.term_sq / w.merged_sq) if w.merged_sq > 0 else 0.0
                lines.append(f"  {w.name}: {w.kind} (||term|| / ||merged weight|| = {share:.3g})")
        capped = self.capped()
        if capped:
            lines.append(f"capped {len(capped)} module(s) at --max-rank (best approximation of that rank)")
        if left_out or capped:
            lines.append(
                f"relative Frobenius distance of model + adapter to the full merge, over all weights: "
                f"{self.distance():.3g}"
            )
        return lines
