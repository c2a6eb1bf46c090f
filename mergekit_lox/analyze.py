"""`mergekit-lox analyze`: where safety lives in a model family, tensor by tensor.

Streams the base, aligned (and optionally fine-tuned) models one tensor name at
a time through mergekit's lazy loader (safetensors ``safe_open``, sharded or
not; PyTorch ``.bin`` via mergekit's lazy unpickler), so only a few tensors are
ever in memory, and computes for every tensor with 2 or more dimensions, with
``tau = W_a - W_b`` and ``dW = W_f - W_a``:

    entropy         H of the singular values of tau (LSSF's safety entropy)
    effective_rank  exp(H)
    lssf_rank       LSSF's automatic rank, clamp(ceil(exp(H)), 1, min(m, n))
    energy_top_k    sum_{i<=k} S_i^2 / sum_i S_i^2        (share of ||tau||^2)
    r_align         ||P_k tau|| / ||tau||,  P_k = U_k U_kᵀ from SVD(tau)
    r_ft            ||P_k (dW + tau)|| / ||dW + tau||      (LoX's metrics)
    safelora_cos    Safe LoRA's cosine, scaled projection

For a stack of matrices (a tensor with more than 2 dimensions) every matrix
gets its own SVD and projector; norms and energies are taken over the whole
tensor, ``entropy`` is the mean of the matrices' entropies and ``lssf_rank``
the largest of their ranks (what LSSF would use at most).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import statistics
import sys
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from mergekit_lox import linalg
from mergekit_lox.describe import one_line

TENSOR_KEYS = ("name", "shape", "entropy", "effective_rank", "lssf_rank", "energy_top_k", "r_align")
FINETUNED_KEYS = ("r_ft", "safelora_cos")
SAFELORA_THRESHOLD = 0.5
# k = 1..CURVE_RANKS for the r(k) curves and the spectral-gap rank suggestion.
CURVE_RANKS = 32
# Singular values kept per tensor for the report's spectra.
SPECTRUM_LENGTH = 64
REPRESENTATIVE_LIMIT = 9

SUGGESTED_RANK_RULE = (
    "median, over all weight matrices, of the position i <= "
    f"{CURVE_RANKS} of the largest gap S_i / S_(i+1) in the singular values of tau"
)


class AnalysisError(ValueError):
    """Bad input to `analyze`: the message names the model, file or tensor."""


# --------------------------------------------------------------------------- models


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model(role: str, path: str) -> str:
    """A local model directory, or a Hugging Face id resolved as mergekit does
    (its cache, or a download of the weights and configs only)."""
    if os.path.isdir(path):
        return os.path.abspath(path)
    if os.path.exists(path):
        raise AnalysisError(f"{role} model {path}: not a directory")
    if not _HUB_ID.match(path):
        raise AnalysisError(f"{role} model {path}: no such directory")
    from mergekit.common import ModelReference

    try:
        return ModelReference.parse(path).local_path()
    except Exception as error:  # noqa: BLE001 - offline, unknown repo, no access...
        raise AnalysisError(
            f"{role} model {path}: not a local directory, and fetching it from the Hugging Face "
            f"hub failed: {one_line(error)}"
        ) from error


class ModelTensors:
    """One model directory, read one tensor at a time (mergekit's lazy loader)."""

    def __init__(self, role: str, path: str):
        from mergekit.io.lazy_tensor_loader import LazyTensorLoader, ShardedTensorIndex

        self.role = role
        self.path = resolve_model(role, path)
        try:
            index = ShardedTensorIndex.from_disk(self.path)
        except Exception as error:  # noqa: BLE001 - any unreadable index is bad input
            raise AnalysisError(
                f"{role} model {path}: cannot read its weights (need model.safetensors, "
                f"model.safetensors.index.json or pytorch_model.bin): {one_line(error)}"
            ) from error
        self.shard_of: Dict[str, str] = dict(index.tensor_paths)
        self.loader = LazyTensorLoader(index, lazy_unpickle=True)

    def __contains__(self, name: str) -> bool:
        return name in self.shard_of

    def get(self, name: str) -> torch.Tensor:
        try:
            return self.loader.get_tensor(name)
        except Exception as error:  # noqa: BLE001
            shard = os.path.join(self.path, self.shard_of.get(name, "?"))
            raise AnalysisError(
                f"{self.role} model {self.path}: cannot read tensor {name} from {shard}: "
                f"{one_line(error)}"
            ) from error


def natural_key(name: str) -> Tuple:
    """`layers.10` after `layers.9`: digit runs compare as numbers."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


_LAYER = re.compile(r"\.(\d+)\.")


def layer_and_module(name: str) -> Tuple[Optional[int], str]:
    """`model.layers.3.self_attn.q_proj.weight` -> (3, `self_attn.q_proj`).

    Tensors outside the repeated layers (embeddings, lm_head) get layer None and
    their name without `.weight`; other indices (experts) collapse to `#`.
    """
    stem = re.sub(r"\.weight$", "", name)
    match = _LAYER.search(stem + ".")
    if match is None:
        return None, stem
    module = (stem + ".")[match.end():].rstrip(".")
    return int(match.group(1)), re.sub(r"\d+", "#", module) or stem


# Llama's order within a layer: attention, then MLP (other modules sort after, by name).
_MODULE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def module_sort_key(module: str) -> Tuple:
    tail = module.rsplit(".", 1)[-1]
    rank = _MODULE_ORDER.index(tail) if tail in _MODULE_ORDER else len(_MODULE_ORDER)
    return (rank, natural_key(module))


# --------------------------------------------------------------------------- math


@dataclass
class TensorStats:
    """One tensor's row plus what the report draws for it."""

    row: Dict[str, object]
    spectrum: List[float]  # top singular values of tau (first matrix of a stack)
    energy_curve: List[float]  # energy share of the top k, k = 1..CURVE_RANKS
    r_ft_curve: Optional[List[float]]  # r_ft at k = 1..CURVE_RANKS
    gap_ranks: List[int]  # largest-gap position, one per matrix


def _finite(value: float) -> Optional[float]:
    return value if math.isfinite(value) else None


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
        from mergekit_lox.safelora import projection_cosine

        cos = float(projection_cosine(finetuned, aligned, base, "scaled")[0])
    tau = aligned.to(dtype) - base.to(dtype)
    # dW + tau = W_f - W_b: the fine-tuned model's whole distance from base.
    drift = finetuned.to(dtype) - base.to(dtype) if finetuned is not None else None
    del base, aligned, finetuned

    U, S, _ = linalg.svd(tau)
    rank = S.shape[-1]
    matrices_S = S.reshape(-1, rank)
    entropy = float(linalg.singular_value_entropy(S, shape).double().mean())
    lssf_rank = int(linalg.entropy_rank(S, shape, 1.0).max())

    # ||P_k tau||² = sum_{i<=k} S_i² (U_k orthonormal), per matrix, summed over the stack.
    energy = (matrices_S.double() ** 2).sum(dim=0)
    total = energy.sum()
    kk = min(k, rank)
    energy_top_k = float(energy[:kk].sum() / total) if total > 0 else math.nan
    row.update(
        entropy=entropy,
        effective_rank=math.exp(entropy),
        lssf_rank=lssf_rank,
        energy_top_k=_finite(energy_top_k),
        r_align=_finite(math.sqrt(energy_top_k)) if math.isfinite(energy_top_k) else None,
    )
    energy_curve = _cumulative_share(energy[:CURVE_RANKS], total, CURVE_RANKS) if total > 0 else [math.nan] * CURVE_RANKS

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
            r_ft_curve = [math.sqrt(v) for v in _cumulative_share(by_direction[:CURVE_RANKS], drift_energy, CURVE_RANKS)]
        else:
            r_ft = math.nan
            r_ft_curve = [math.nan] * CURVE_RANKS
        row.update(r_ft=_finite(r_ft), safelora_cos=_finite(cos))

    return TensorStats(
        row=row,
        spectrum=matrices_S[0, :SPECTRUM_LENGTH].double().tolist(),
        energy_curve=energy_curve,
        r_ft_curve=r_ft_curve,
        gap_ranks=[gap_rank(s, shape) for s in matrices_S.double().cpu()],
    )


# --------------------------------------------------------------------------- streaming


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


def resolve_device(device: str) -> torch.device:
    try:
        resolved = torch.device(device)
        torch.empty(0, device=resolved)
    except Exception as error:  # noqa: BLE001
        raise AnalysisError(f"device {device!r} is not usable: {one_line(error)}") from error
    return resolved


def _selected_names(models: Dict[str, ModelTensors], name_filter: Optional[str]) -> Tuple[List[str], int]:
    aligned = models["aligned"]
    names = list(aligned.shard_of)
    selected = [n for n in names if name_filter is None or name_filter in n]
    if not selected:
        raise AnalysisError(f"aligned model {aligned.path}: no tensor name contains {name_filter!r}")
    for role, model in models.items():
        for name in selected:
            if name not in model:
                raise AnalysisError(
                    f"tensor {name} of aligned model {aligned.path} is missing from {role} model {model.path}"
                )
    # Shard by shard, so each lazy loader rarely reopens a file.
    selected.sort(key=lambda n: (aligned.shard_of[n], natural_key(n)))
    return selected, len(names) - len(selected)


def analyze_models(
    base: str,
    aligned: str,
    finetuned: Optional[str] = None,
    *,
    k: int = 6,
    name_filter: Optional[str] = None,
    device: str = "cpu",
    progress: bool = False,
) -> Analysis:
    """Stream the models and compute every tensor's metrics and the summary."""
    if k < 1:
        raise AnalysisError(f"--k must be at least 1, got {k}")
    target = resolve_device(device)
    models = {"base": ModelTensors("base", base), "aligned": ModelTensors("aligned", aligned)}
    if finetuned is not None:
        models["finetuned"] = ModelTensors("finetuned", finetuned)
    names, filtered_out = _selected_names(models, name_filter)

    from tqdm import tqdm

    results: List[TensorStats] = []
    below_2d = 0
    bar = tqdm(names, desc="analyze", unit="tensor", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    try:
        for name in bar:
            tensors = {}
            for role, model in models.items():
                tensors[role] = model.get(name)
                if tensors[role].shape != tensors["base"].shape:
                    raise AnalysisError(
                        f"tensor {name}: shape {tuple(tensors[role].shape)} in {role} model {model.path} "
                        f"differs from {tuple(tensors['base'].shape)} in base model {models['base'].path}"
                    )
            if tensors["aligned"].ndim < 2:
                below_2d += 1
                continue
            tensors = {role: t.to(target) for role, t in tensors.items()}
            results.append(
                tensor_stats(name, tensors["base"], tensors["aligned"], tensors.get("finetuned"), k)
            )
            del tensors
    except BaseException:
        bar.leave = False  # erase the bar: the error line is all that should remain
        raise
    finally:
        bar.close()
    if not results:
        raise AnalysisError(
            f"aligned model {models['aligned'].path}: no tensor with 2 or more dimensions"
            + (f" contains {name_filter!r}" if name_filter else "")
        )
    results.sort(key=lambda r: natural_key(str(r.row["name"])))

    inputs = {
        "base": models["base"].path,
        "aligned": models["aligned"].path,
        "finetuned": models["finetuned"].path if finetuned is not None else None,
        "k": k,
        "filter": name_filter,
        "device": str(target),
        "safelora_threshold": SAFELORA_THRESHOLD,
        "safelora_projection": "scaled",
    }
    summary = summarize(results, k, finetuned is not None, below_2d=below_2d, filtered_out=filtered_out)
    return Analysis([r.row for r in results], summary, inputs)


# --------------------------------------------------------------------------- summary


def _present(values: Iterable[Optional[float]]) -> List[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def _stats(values: Sequence[float]) -> Dict[str, Optional[float]]:
    if not values:
        return {"median": None, "min": None, "max": None}
    return {"median": float(statistics.median(values)), "min": float(min(values)), "max": float(max(values))}


def _mean(values: Sequence[float]) -> Optional[float]:
    return float(statistics.fmean(values)) if values else None


def _mean_curve(curves: List[List[float]]) -> List[Optional[float]]:
    return [_mean(_present(column)) for column in zip(*curves)]


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
    results: List[TensorStats], k: int, has_finetuned: bool, *, below_2d: int = 0, filtered_out: int = 0
) -> Dict[str, object]:
    rows = [r.row for r in results]
    gap_ranks = [g for r in results for g in r.gap_ranks]
    summary: Dict[str, object] = {
        "tensors_analyzed": len(rows),
        "tensors_skipped_below_2d": below_2d,
        "tensors_filtered_out": filtered_out,
        "k": k,
        "effective_rank": _stats(_present(r["effective_rank"] for r in rows)),
        "lssf_rank": _stats(_present(r["lssf_rank"] for r in rows)),
        "mean_energy_top_k": _mean(_present(r["energy_top_k"] for r in rows)),
        "mean_r_align": _mean(_present(r["r_align"] for r in rows)),
        "suggested_lox_rank": int(statistics.median_low(gap_ranks)) if gap_ranks else 1,
        "suggested_lox_rank_rule": SUGGESTED_RANK_RULE,
    }
    curves = {
        "k": list(range(1, CURVE_RANKS + 1)),
        "energy": _mean_curve([r.energy_curve for r in results]),
        "r_align": _mean_curve([[math.sqrt(v) if math.isfinite(v) else math.nan for v in r.energy_curve] for r in results]),
    }
    if has_finetuned:
        summary["mean_r_ft"] = _mean(_present(r["r_ft"] for r in rows))
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
    summary["curves"] = curves
    representatives = representative_tensors([str(r["name"]) for r in rows])
    by_name = {r.row["name"]: r for r in results}
    summary["representative_spectra"] = {name: by_name[name].spectrum for name in representatives}
    return summary


# --------------------------------------------------------------------------- output


def _check_output_dir(out_dir: str, inputs: Iterable[Optional[str]]) -> str:
    from mergekit_lox.output import is_within

    out = os.path.realpath(out_dir)
    for model in inputs:
        if model is None:
            continue
        # Writing three report files beside (or above) a model is harmless; inside it is not.
        if is_within(out, model):
            raise AnalysisError(f"output directory {out_dir} is inside input model {model}; choose another -o")
    if os.path.exists(out) and not os.path.isdir(out):
        raise AnalysisError(f"output {out_dir} exists and is not a directory")
    return out


def _csv_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return "x".join(str(v) for v in value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _write_atomic(path: str, text: str) -> None:
    """Write ``path`` whole or not at all (a half-written report never lies around)."""
    partial = path + ".partial"
    with open(partial, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    os.replace(partial, path)


def write_outputs(analysis: Analysis, out_dir: str) -> Dict[str, str]:
    """DIR/analysis.json, DIR/analysis.csv and DIR/report.html."""
    import io

    from mergekit_lox.report import render_report

    os.makedirs(out_dir, exist_ok=True)
    paths = {
        "json": os.path.join(out_dir, "analysis.json"),
        "csv": os.path.join(out_dir, "analysis.csv"),
        "html": os.path.join(out_dir, "report.html"),
    }
    # allow_nan=False: every undefined value is already null, and stays valid JSON.
    _write_atomic(paths["json"], json.dumps(analysis.to_json(), indent=1, allow_nan=False) + "\n")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(analysis.columns)
    for row in analysis.tensors:
        writer.writerow([_csv_value(row[c]) for c in analysis.columns])
    _write_atomic(paths["csv"], buffer.getvalue())
    _write_atomic(paths["html"], render_report(analysis))
    return paths


def run_analysis(
    base: str,
    aligned: str,
    out_dir: str,
    finetuned: Optional[str] = None,
    *,
    k: int = 6,
    name_filter: Optional[str] = None,
    device: str = "cpu",
    progress: bool = False,
) -> Dict[str, str]:
    """Analyse and write the three files; returns their paths."""
    base, aligned = resolve_model("base", base), resolve_model("aligned", aligned)
    finetuned = resolve_model("finetuned", finetuned) if finetuned is not None else None
    _check_output_dir(out_dir, (base, aligned, finetuned))
    analysis = analyze_models(
        base, aligned, finetuned, k=k, name_filter=name_filter, device=device, progress=progress
    )
    return write_outputs(analysis, out_dir)
