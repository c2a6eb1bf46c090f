"""`mergekit-lox lssf-calibrate`: LSSF's calibrated safety subspace (the paper's Eq. 4).

Runs the aligned model over harmful queries and its own responses, with forward hooks
on its linear layers that accumulate each layer's normalised activation Gram
(gram.py: memory bounded whatever the number of samples), then writes, per weight, the
top left singular vectors and all singular values of ``Z = W X^`` as a subspace
directory (methods/subspace.py) for ``lssf_fusion``'s ``subspace:`` parameter.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Dict, List, Optional, Sequence

from mergekit_lox.calibrate.gram import NORMALIZATIONS


class CalibrationError(ValueError):
    """Bad input to lssf-calibrate; the message names the option, file or model."""


def _check_numbers(**values: int) -> None:
    for option, value in values.items():
        if value < 1:
            raise CalibrationError(f"--{option.replace('_', '-')} must be at least 1, got {value}")


def local_model_dir(path: str) -> Optional[str]:
    """The folder holding the model's files: ``path`` itself, or the hub cache's snapshot."""
    if os.path.isdir(path):
        return os.path.abspath(path)
    try:
        from transformers.utils import cached_file

        return os.path.dirname(cached_file(path, "config.json"))
    except Exception:  # noqa: BLE001 - offline or not a hub id: identity unknown
        return None


def checkpoint_names(model_dir: Optional[str]) -> Optional[set]:
    """Tensor names stored in a local safetensors model (headers only), or None."""
    if model_dir is None:
        return None
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            return set(json.load(f).get("weight_map", {}))
    files = [f for f in os.listdir(model_dir) if f.endswith(".safetensors")]
    if not files:
        return None
    from safetensors import safe_open

    names: set = set()
    for filename in files:
        with safe_open(os.path.join(model_dir, filename), framework="pt") as f:
            names.update(f.keys())
    return names


def linear_layers(model, stored: Optional[set]) -> Dict[str, str]:
    """Module name -> weight name for every linear layer (``nn.Linear``, and transformers'
    ``Conv1D``, which stores its weight transposed: layout.py) except the output head.

    Weight names are the model's own tensor names (``<module>.weight``), as mergekit names
    them; with ``stored`` (the checkpoint's names) a module whose weight is stored neither
    under that name nor under it without the base model's prefix (GPT-2 checkpoints saved
    as ``h.0.attn.c_attn.weight``) is left out.
    """
    import torch

    from mergekit_lox.layout import is_conv1d

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    prefix = (getattr(model, "base_model_prefix", "") or "") + "."
    layers = {}
    for name, module in model.named_modules():
        if (isinstance(module, torch.nn.Linear) or is_conv1d(module)) and module is not head:
            weight = f"{name}.weight"
            short = weight[len(prefix) :] if prefix != "." and weight.startswith(prefix) else None
            if stored is None or weight in stored or short in stored:
                layers[name] = weight
    return layers


def calibration_texts(
    prompts: str,
    *,
    samples: int,
    column: Optional[str],
    response_column: Optional[str],
    split: str,
) -> tuple:
    """``(queries, responses or None)``: the first ``samples`` non-empty queries of the source."""
    from mergekit_lox.data.prompts import load_rows, pick_column

    rows, columns = load_rows(prompts, split=split)
    query_column = pick_column(columns, column, prompts)
    answer_column = (
        pick_column(columns, response_column, prompts, "--response-column") if response_column is not None else None
    )
    pairs = []
    for row in rows:
        query = str(row.get(query_column) or "").strip()
        if query:
            pairs.append((query, None if answer_column is None else str(row.get(answer_column) or "").strip()))
        if len(pairs) == samples:
            break
    if not pairs:
        raise CalibrationError(f"{prompts}: column {query_column!r} holds no non-empty queries")
    queries = [q for q, _ in pairs]
    return queries, (None if answer_column is None else [a for _, a in pairs])


def _forward_batches(model, tokenizer, texts: Sequence[str], batch_size: int, accumulator, progress: bool) -> None:
    """Run the model over ``texts`` (query + response) in batches; the hooks do the rest."""
    import torch
    from tqdm import tqdm

    tokenizer.padding_side = "right"
    device = next(model.parameters()).device
    limit = getattr(model.config, "max_position_embeddings", None)
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc="activations", unit="batch", disable=not progress):
        encoded = tokenizer(
            list(texts[start : start + batch_size]),
            return_tensors="pt",
            padding=True,
            truncation=limit is not None,
            max_length=limit,
            add_special_tokens=not getattr(tokenizer, "chat_template", None),
        )
        mask = encoded["attention_mask"].bool()
        accumulator.mask = mask
        with torch.no_grad():
            model(input_ids=encoded["input_ids"].to(device), attention_mask=mask.long().to(device))
    accumulator.mask = None


def _subspace_tensors(accumulator, max_rank: int, progress: bool):
    """Per weight: ``W.U`` (top ``max_rank`` left singular vectors) and ``W.S`` (all values).

    A layer whose inputs were all zero has no subspace (Z = 0): it is left out, so that
    lssf_fusion fuses that weight in its data-free subspace (and counts it)."""
    from tqdm import tqdm

    from mergekit_lox.calibrate.gram import left_factors

    tensors, weights = {}, {}
    for layer in tqdm(accumulator.layers, desc="subspaces", unit="weight", disable=not progress):
        weight = layer.linear_weight()
        U, S = left_factors(weight, layer)
        layer.gram = layer.gram.new_zeros(0)  # free it as soon as it is used
        if not bool(S[0] > 0):
            continue
        k = min(max_rank, U.shape[1])
        tensors[f"{layer.weight_name}.U"] = U[:, :k].float().cpu()
        tensors[f"{layer.weight_name}.S"] = S.float().cpu()
        weights[layer.weight_name] = {"shape": list(weight.shape), "stored_rank": k, "gram": layer.side}
        if layer.transposed:  # U is in the output space of W = W_stored^T [out, in]
            weights[layer.weight_name]["stored"] = "transposed (Conv1D)"
    return tensors, weights


def calibrate(
    aligned: str,
    prompts: str,
    out: str,
    *,
    samples: int = 128,
    max_rank: int = 256,
    device: str = "cpu",
    dtype: Optional[str] = None,
    batch_size: int = 8,
    column: Optional[str] = None,
    response_column: Optional[str] = None,
    split: str = "train",
    normalization: str = "token",
    max_new_tokens: int = 128,
    progress: bool = False,
    echo: Callable[[str], None] = lambda line: None,
) -> Dict:
    """Calibrate ``aligned`` on ``prompts`` and write the subspace to ``out``; returns its metadata."""
    from mergekit_lox.calibrate.gram import GramAccumulator
    from mergekit_lox.data.generation import chat_text, check_tokenizer, generate, load_causal_lm
    from mergekit_lox.files.output import OutputError, refuse_inside_inputs, staged_output
    from mergekit_lox.methods import subspace

    _check_numbers(samples=samples, max_rank=max_rank, batch_size=batch_size, max_new_tokens=max_new_tokens)
    if normalization not in NORMALIZATIONS:
        raise CalibrationError(f"--normalization must be one of {', '.join(NORMALIZATIONS)}, got {normalization!r}")
    model_dir = local_model_dir(aligned)
    try:
        refuse_inside_inputs(out, [model_dir] if model_dir else [])
    except OutputError as error:
        raise CalibrationError(str(error)) from None
    queries, responses = calibration_texts(
        prompts, samples=samples, column=column, response_column=response_column, split=split
    )
    model, tokenizer = load_causal_lm(aligned, device=device, dtype=dtype, what="aligned model")
    # Before any compute: a tokenizer that encodes a query to nothing is named here, and a
    # model with nothing to calibrate is refused before its answers are generated.
    check_tokenizer(tokenizer, queries, f"aligned model {aligned}", echo)
    layers = linear_layers(model, checkpoint_names(model_dir))
    if not layers:
        raise CalibrationError(
            f"aligned model {aligned}: no nn.Linear or Conv1D layer whose weight the checkpoint stores "
            "under the module's name: nothing to calibrate"
        )
    if responses is None:
        echo(f"generating the aligned model's responses to {len(queries)} queries")
        responses = generate(
            model,
            tokenizer,
            queries,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            progress=progress,
            what=f"aligned model {aligned}",
            warn=lambda line: None,  # check_tokenizer above has warned already
        )
    texts = [chat_text(tokenizer, q, r) for q, r in zip(queries, responses, strict=True)]
    with GramAccumulator(model, layers, normalization) as accumulator:
        _forward_batches(model, tokenizer, texts, batch_size, accumulator, progress)
    tokens = accumulator.layers[0].tokens
    tensors, weights = _subspace_tensors(accumulator, max_rank, progress)
    metadata = {
        "model": {"path": aligned, **(subspace.model_identity(model_dir) if model_dir else {})},
        "prompts": {
            "source": os.path.abspath(prompts) if os.path.exists(prompts) else prompts,
            "column": column,
            "response_column": response_column,
            "split": split,
        },
        "responses": "from the source" if response_column else f"generated (greedy, max_new_tokens {max_new_tokens})",
        "samples": len(queries),
        "tokens": tokens,
        "normalization": normalization,
        "max_rank": max_rank,
        "weights": weights,
    }
    with staged_output(out, markers=(subspace.JSON_NAME,), writer="lssf-calibrate") as staging:
        subspace.write(staging, metadata, tensors)
    return metadata


def describe(metadata: Dict) -> List[str]:
    """What the CLI prints after a calibration."""
    return [
        f"calibrated {len(metadata['weights'])} linear weight(s) of {metadata['model']['path']} on "
        f"{metadata['samples']} sample(s), {metadata['tokens']} token(s) ({metadata['normalization']} normalisation)",
    ]
