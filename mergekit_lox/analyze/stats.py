"""Per-tensor safety-subspace statistics and their per-model summary."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from mergekit_lox import linalg
from mergekit_lox.analyze.names import layer_and_module, module_sort_key
from mergekit_lox.methods.inputs import finite_or_none
from mergekit_lox.methods.lssf import DEFAULT_ETA, spectrum_ranks

TENSOR_KEYS = ("name", "shape", "entropy", "effective_rank", "lssf_rank", "energy_top_k", "r_align")

FINETUNED_KEYS = ("r_ft", "safelora_cos")


SAFELORA_THRESHOLD = 0.5
# safemerge's default threshold (its kernel's `threshold`; tests/test_analyze.py holds them equal):
# the same cosine, compared strictly. Not imported, so that analyze loads no merge method.
SAFEMERGE_THRESHOLD = 0.35


# k = 1..CURVE_RANKS for the r(k) curves and the spectral-gap rank suggestion.
CURVE_RANKS = 32


# Singular values kept per tensor for the report's spectra.
SPECTRUM_LENGTH = 64


REPRESENTATIVE_LIMIT = 9


SUGGESTED_RANK_RULE = (
    "median, over all weight matrices, of the position i <= "
    f"{CURVE_RANKS} of the largest gap S_i / S_(i+1) in the singular values of tau (a spectral heuristic: "
    "LoX's own rank is behavioural, the smallest k that keeps the attack success rate, found by a sweep)"
)

# Which tensors the r_align / r_ft means cover: the weights of nn.Linear modules, as LoX's
# R_metrics.py averages them (embeddings excluded; Llama's lm_head is an nn.Linear). Judged
# by name, without loading the architecture: 2-D weights that are not embeddings, and the
# expert stacks transformers 5 fuses MoE experts into (Mixtral's and Qwen-MoE's
# experts.gate_up_proj / experts.down_proj: one linear weight per expert, in LoX's
# transformers-4 code each its own nn.Linear), one entry per stack.
EMBEDDING_NAMES = ("embed", "wte", "wpe")
LINEAR_RULE = (
    "nn.Linear weights (embeddings excluded, lm_head included; an MoE expert stack counts once), as LoX's R_metrics.py"
)


def is_linear_weight(row: Dict[str, object]) -> bool:
    name, shape = str(row["name"]), row["shape"]
    if any(e in name for e in EMBEDDING_NAMES):
        return False
    return (len(shape) == 2 and name.endswith(".weight")) or (len(shape) == 3 and ".experts." in name)


@dataclass
class TensorStats:
    """One tensor's row plus what the report draws for it."""

    row: Dict[str, object]
    spectrum: List[float]  # top singular values of tau (first matrix of a stack)
    energy_curve: List[float]  # energy share of the top k, k = 1..CURVE_RANKS
    r_ft_curve: Optional[List[float]]  # r_ft at k = 1..CURVE_RANKS
    gap_ranks: List[int]  # largest-gap position, one per matrix


def _cumulative_share(energy_by_direction: torch.Tensor, total: torch.Tensor, length: int) -> List[float]:
    """Cumulative share of ``total`` over directions 1..length (padded past the rank)."""
    share = torch.cumsum(energy_by_direction, dim=0) / total
    values = share.tolist()
    if not values:
        return [math.nan] * length
    return (values + [values[-1]] * length)[:length]


def gap_rank(S: torch.Tensor, shape, limit: int = CURVE_RANKS) -> int:
    """Position i <= limit of the largest ratio S_i / S_(i+1) among non-zero S."""
    nonzero = S[linalg.nonzero_mask(S, shape)]
    usable = nonzero[: limit + 1]
    if usable.numel() < 2:
        return max(int(usable.numel()), 1)
    ratios = usable[:-1] / usable[1:]
    return int(torch.argmax(ratios)) + 1


def tensor_stats(
    name: str,
    base: torch.Tensor,
    aligned: torch.Tensor,
    finetuned: Optional[torch.Tensor],
    k: int,
) -> TensorStats:
    """Every metric of one tensor (ndim >= 2), on the tensors' device."""
    shape = tuple(aligned.shape)
    row: Dict[str, object] = {"name": name, "shape": list(shape)}
    dtype = linalg.compute_dtype(aligned)
    cos = None
    if finetuned is not None:
        from mergekit_lox.methods.safelora import projection_cosine

        cos = float(projection_cosine(finetuned, aligned, base, "scaled")[0])
    tau = aligned.to(dtype) - base.to(dtype)
    # dW + tau = W_f - W_b: the fine-tuned model's whole distance from base.
    drift = finetuned.to(dtype) - base.to(dtype) if finetuned is not None else None
    del base, aligned, finetuned

    U, S, _ = linalg.svd(tau)
    rank = S.shape[-1]
    matrices_S = S.reshape(-1, rank)
    entropy = float(linalg.singular_value_entropy(S, shape).double().mean())
    lssf_rank = int(spectrum_ranks(S, shape, DEFAULT_ETA).max())

    # ||P_k tau||² = sum_{i<=k} S_i² (U_k orthonormal), per matrix, summed over the stack.
    energy = (matrices_S.double() ** 2).sum(dim=0)
    total = energy.sum()
    kk = min(k, rank)
    energy_top_k = float(energy[:kk].sum() / total) if total > 0 else math.nan
    row.update(
        entropy=entropy,
        effective_rank=math.exp(entropy),
        lssf_rank=lssf_rank,
        energy_top_k=finite_or_none(energy_top_k),
        r_align=finite_or_none(math.sqrt(energy_top_k)) if math.isfinite(energy_top_k) else None,
    )
    energy_curve = (
        _cumulative_share(energy[:CURVE_RANKS], total, CURVE_RANKS) if total > 0 else [math.nan] * CURVE_RANKS
    )

    r_ft_curve = None
    if drift is not None:
        width = min(max(k, CURVE_RANKS), rank)
        # ||P_k X||² = sum_{i<=k} ||u_iᵀ X||²: one thin product gives every k at once.
        coefficients = U[..., :width].transpose(-2, -1) @ drift
        by_direction = (coefficients.double() ** 2).sum(dim=-1).reshape(-1, width).sum(dim=0)
        # vector_norm reduces in place; a float64 copy of a 32000 x 4096 drift would be 1 GB.
        drift_energy = torch.linalg.vector_norm(drift).double() ** 2
        # A zero tau has no safety subspace (its U is arbitrary): r_ft is undefined.
        if drift_energy > 0 and total > 0:
            cumulative = torch.cumsum(by_direction, dim=0) / drift_energy
            r_ft = math.sqrt(float(cumulative[kk - 1]))
            r_ft_curve = [
                math.sqrt(v) for v in _cumulative_share(by_direction[:CURVE_RANKS], drift_energy, CURVE_RANKS)
            ]
        else:
            r_ft = math.nan
            r_ft_curve = [math.nan] * CURVE_RANKS
        row.update(r_ft=finite_or_none(r_ft), safelora_cos=finite_or_none(cos))

    return TensorStats(
        row=row,
        spectrum=matrices_S[0, :SPECTRUM_LENGTH].double().tolist(),
        energy_curve=energy_curve,
        r_ft_curve=r_ft_curve,
        gap_ranks=[gap_rank(s, shape) for s in matrices_S.double().cpu()],
    )


@dataclass
class Analysis:
    tensors: List[Dict[str, object]]
    summary: Dict[str, object]
    inputs: Dict[str, object]

    def to_json(self) -> Dict[str, object]:
        return {"tensors": self.tensors, "summary": self.summary, "inputs": self.inputs}

    @property
    def has_finetuned(self) -> bool:
        return self.inputs.get("finetuned") is not None

    @property
    def columns(self) -> Tuple[str, ...]:
        return TENSOR_KEYS + (FINETUNED_KEYS if self.has_finetuned else ())


def _present(values: Iterable[Optional[float]]) -> List[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def _stats(values: Sequence[float]) -> Dict[str, Optional[float]]:
    if not values:
        return {"median": None, "min": None, "max": None}
    return {"median": float(statistics.median(values)), "min": float(min(values)), "max": float(max(values))}


def _mean(values: Sequence[float]) -> Optional[float]:
    return float(statistics.fmean(values)) if values else None


def _mean_curve(curves: List[List[float]]) -> List[Optional[float]]:
    return [_mean(_present(column)) for column in zip(*curves, strict=False)]


def representative_tensors(names: Sequence[str], limit: int = REPRESENTATIVE_LIMIT) -> List[str]:
    """One tensor per module type at the middle layer, then the non-layer tensors."""
    by_module: Dict[str, Dict[int, str]] = {}
    outside: List[str] = []
    for name in names:
        layer, module = layer_and_module(name)
        if layer is None:
            outside.append(name)
        else:
            by_module.setdefault(module, {})[layer] = name
    chosen = []
    for module in sorted(by_module, key=module_sort_key):
        layers = by_module[module]
        ordered = sorted(layers)
        chosen.append(layers[ordered[len(ordered) // 2]])
    return (chosen + outside)[:limit]


def summarize(
    results: List[TensorStats],
    k: int,
    has_finetuned: bool,
    *,
    below_2d: int = 0,
    filtered_out: int = 0,
) -> Dict[str, object]:
    """The r_align / r_ft means cover the nn.Linear weights, as the LoX reference does
    (``*_all`` keys: every tensor)."""
    rows = [r.row for r in results]
    linear_rows = [r for r in rows if is_linear_weight(r)]
    gap_ranks = [g for r in results for g in r.gap_ranks]
    summary: Dict[str, object] = {
        "tensors_analyzed": len(rows),
        "tensors_skipped_below_2d": below_2d,
        "tensors_filtered_out": filtered_out,
        "k": k,
        "effective_rank": _stats(_present(r["effective_rank"] for r in rows)),
        "lssf_rank": _stats(_present(r["lssf_rank"] for r in rows)),
        "mean_energy_top_k": _mean(_present(r["energy_top_k"] for r in rows)),
        "mean_r_align": _mean(_present(r["r_align"] for r in linear_rows)),
        "mean_r_align_all": _mean(_present(r["r_align"] for r in rows)),
        "mean_r_tensors": len(linear_rows),
        "mean_r_rule": LINEAR_RULE,
        "suggested_lox_rank": int(statistics.median_low(gap_ranks)) if gap_ranks else 1,
        "suggested_lox_rank_rule": SUGGESTED_RANK_RULE,
    }
    curves = {
        "k": list(range(1, CURVE_RANKS + 1)),
        "energy": _mean_curve([r.energy_curve for r in results]),
        "r_align": _mean_curve(
            [[math.sqrt(v) if math.isfinite(v) else math.nan for v in r.energy_curve] for r in results]
        ),
    }
    if has_finetuned:
        summary["mean_r_ft"] = _mean(_present(r["r_ft"] for r in linear_rows))
        summary["mean_r_ft_all"] = _mean(_present(r["r_ft"] for r in rows))
        curves["r_ft"] = _mean_curve([r.r_ft_curve for r in results if r.r_ft_curve is not None])
        projected = sorted(
            (r for r in rows if r["safelora_cos"] is not None and r["safelora_cos"] <= SAFELORA_THRESHOLD),
            key=lambda r: r["safelora_cos"],
        )
        summary["safelora"] = {
            "threshold": SAFELORA_THRESHOLD,
            "projection": "scaled",
            "projected": [{"name": r["name"], "cos": r["safelora_cos"]} for r in projected],
        }
        summary["safemerge"] = {
            "threshold": SAFEMERGE_THRESHOLD,
            "projection": "scaled",
            "merged": [
                {"name": r["name"], "cos": r["safelora_cos"]}
                for r in projected
                if r["safelora_cos"] < SAFEMERGE_THRESHOLD
            ],
        }
    summary["curves"] = curves
    representatives = representative_tensors([str(r["name"]) for r in rows])
    by_name = {r.row["name"]: r for r in results}
    summary["representative_spectra"] = {name: by_name[name].spectrum for name in representatives}
    return summary
