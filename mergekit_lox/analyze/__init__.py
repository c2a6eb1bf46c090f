"""`mergekit-lox analyze`: where safety lives in a model family, tensor by tensor.

Streams the base, aligned (and optionally fine-tuned) models one tensor name at
a time through mergekit's lazy loader (safetensors ``safe_open``, sharded or
not; PyTorch ``.bin`` via mergekit's lazy unpickler), so only a few tensors are
ever in memory, in the layout mergekit's merges read (a Mixtral or Qwen-MoE
checkpoint saved per expert is converted as mergekit's loader converts it, into one
``experts.gate_up_proj`` and one ``experts.down_proj`` stack per layer: the matrices
the merge decomposes), and computes for every tensor with 2 or more dimensions, with
``tau = W_a - W_b`` and ``dW = W_f - W_a``:

    entropy         H = -sum p_i ln p_i, p_i = S_i / sum S, of the singular values of tau
    effective_rank  exp(H): Roy and Vetterli's effective rank (a metric; not LSSF's rule)
    lssf_rank       LSSF's automatic rank at eta 0.9: the smallest r whose energy entropy
                    (p_i = S_i^2 / sum S^2) keeps 90% of the total (methods/lssf.py)
    energy_top_k    sum_{i<=k} S_i^2 / sum_i S_i^2        (share of ||tau||^2)
    r_align         ||P_k tau|| / ||tau||,  P_k = U_k U_kᵀ from SVD(tau)
    r_ft            ||P_k (dW + tau)|| / ||dW + tau||      (LoX's metrics)

The summary's mean r_align / r_ft average the nn.Linear weights only, as LoX's
R_metrics.py does (``*_all``: every tensor); its default k is 100, ours --k 6.
    safelora_cos    Safe LoRA's cosine, scaled projection

For a stack of matrices (a tensor with more than 2 dimensions) every matrix
gets its own SVD and projector; norms and energies are taken over the whole
tensor, ``entropy`` is the mean of the matrices' entropies and ``lssf_rank``
the largest of their ranks (what LSSF would use at most).

A GPT-2 Conv1D weight, stored ``[in, out]``, is analysed as the linear map ``W [out, in]``
the merge methods work on (layout.py): its reported shape is ``[out, in]``, and ``r_ft``
and ``safelora_cos`` project onto the layer's output space, as they do for nn.Linear.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from typing import Dict, Iterable, List, Optional, Tuple

from mergekit_lox.analyze.models import (
    AnalysisError,
    ModelTensors,
    resolve_device,
    resolve_model,
)
from mergekit_lox.analyze.names import natural_key
from mergekit_lox.analyze.stats import (  # noqa: F401 - public names of analyze
    FINETUNED_KEYS,
    SAFELORA_THRESHOLD,
    TENSOR_KEYS,
    Analysis,
    TensorStats,
    summarize,
    tensor_stats,
)
from mergekit_lox.files.output import spreadsheet_text

# --------------------------------------------------------------------------- streaming


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


def _transposed_weights(model: str) -> frozenset:
    """The model's Conv1D weights (stored [in, out]; layout.py); none when its config is unreadable."""
    from mergekit_lox.layout import transposed_weights_at

    try:
        return transposed_weights_at(model)
    except Exception:  # noqa: BLE001 - no readable config: analyze the tensors as stored
        return frozenset()


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
    transposed = _transposed_weights(aligned)

    from tqdm import tqdm

    from mergekit_lox.methods.inputs import require_finite_tensor

    results: List[TensorStats] = []
    below_2d = 0
    bar = tqdm(names, desc="analyze", unit="tensor", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    try:
        for name in bar:
            tensors = {}
            for role, model in models.items():
                tensors[role] = model.get(name)
                # As every merge kernel does: a NaN/Inf input is an error naming it, not a 0.0 cosine.
                require_finite_tensor(tensors[role], name, model.path)
                if tensors[role].shape != tensors["base"].shape:
                    raise AnalysisError(
                        f"tensor {name}: shape {tuple(tensors[role].shape)} in {role} model {model.path} "
                        f"differs from {tuple(tensors['base'].shape)} in base model {models['base'].path}"
                    )
            if tensors["aligned"].ndim < 2:
                below_2d += 1
                continue
            if name in transposed:  # a Conv1D: the matrix the methods decompose is W [out, in]
                tensors = {role: t.mT for role, t in tensors.items()}
            tensors = {role: t.to(target) for role, t in tensors.items()}
            results.append(tensor_stats(name, tensors["base"], tensors["aligned"], tensors.get("finetuned"), k))
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


# --------------------------------------------------------------------------- output


# What analyze writes into -o (and may replace there: files/output.claim_files).
ANALYSIS_FILES = ("analysis.json", "analysis.csv", "report.html")


def _check_output_dir(out_dir: str, inputs: Iterable[Optional[str]]) -> str:
    from mergekit_lox.files.output import OutputError, input_holding, refuse_foreign_files

    out = os.path.realpath(out_dir)
    # Writing three report files beside (or above) a model is harmless; inside it is not.
    holding = input_holding(out, [("input model", model) for model in inputs])
    if holding:
        raise AnalysisError(f"output directory {out_dir} is inside input model {holding[1]}; choose another -o")
    if os.path.exists(out) and not os.path.isdir(out):
        raise AnalysisError(f"output {out_dir} exists and is not a directory")
    try:
        refuse_foreign_files(out, ANALYSIS_FILES, "mergekit-lox analyze")
    except OutputError as error:
        raise AnalysisError(str(error)) from None
    return out


def _csv_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return "x".join(str(v) for v in value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return spreadsheet_text(value)  # tensor names come from the checkpoint
    return str(value)


def write_outputs(analysis: Analysis, out_dir: str) -> Dict[str, str]:
    """DIR/analysis.json, DIR/analysis.csv and DIR/report.html."""
    import io

    from mergekit_lox.analyze.report import render_report
    from mergekit_lox.files.output import OutputError, atomic_write_text, claim_files

    try:
        claim_files(out_dir, ANALYSIS_FILES, "mergekit-lox analyze")
    except OutputError as error:
        raise AnalysisError(str(error)) from None
    paths = {
        kind: os.path.join(out_dir, name) for kind, name in zip(("json", "csv", "html"), ANALYSIS_FILES, strict=True)
    }
    # allow_nan=False: every undefined value is already null, and stays valid JSON.
    atomic_write_text(paths["json"], json.dumps(analysis.to_json(), indent=1, allow_nan=False) + "\n")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(analysis.columns)
    for row in analysis.tensors:
        writer.writerow([_csv_value(row[c]) for c in analysis.columns])
    atomic_write_text(paths["csv"], buffer.getvalue())
    atomic_write_text(paths["html"], render_report(analysis))
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
    analysis = analyze_models(base, aligned, finetuned, k=k, name_filter=name_filter, device=device, progress=progress)
    return write_outputs(analysis, out_dir)
