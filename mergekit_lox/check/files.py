"""Model references: local paths, Hugging Face ids, earlier documents; vocabularies and shapes."""

from __future__ import annotations

import os
from typing import Any, Dict, Iterator, List, Optional, Tuple

from mergekit_lox.check.parameters import input_groups
from mergekit_lox.check.report import (
    Document,
    Problem,
    Report,
    join_path,
    suggest,
)
from mergekit_lox.files.hub import looks_like_hub_id


def model_references(raw: dict, config) -> Iterator[Tuple[str, Any]]:
    """(field, ModelReference) for every model a document names."""
    from mergekit.common import ModelReference

    if config.base_model is not None:
        yield "base_model", config.base_model
    for group in input_groups(raw, config):
        for item in group.inputs:
            yield join_path(item.where, "model"), item.model
        if group.base_where != "base_model" and group.base is not None:
            yield group.base_where, group.base
    if isinstance(config.tokenizer_source, ModelReference):
        yield "tokenizer_source", config.tokenizer_source
    if config.tokenizer is not None and isinstance(config.tokenizer.source, ModelReference):
        yield "tokenizer.source", config.tokenizer.source


def check_path(report: Report, doc: Document, where: str, path: str, kind: str, names) -> None:
    marker = "config.json" if kind == "model" else "adapter_config.json"
    if kind == "model" and path in names:
        doc.references.setdefault(path, where)
        return
    if os.path.exists(path):
        if not os.path.isdir(path):
            report.problems.append(Problem(doc.label, where, f"{path} is not a directory"))
        elif not os.path.exists(os.path.join(path, marker)):
            what = "model directory" if kind == "model" else "PEFT adapter directory"
            report.problems.append(Problem(doc.label, where, f"{path} is not a {what} (no {marker})"))
        return
    local_root = path.split("/", 1)[0]
    if looks_like_hub_id(path) and not _holds_models(local_root):
        report.notes.append(
            Problem(
                doc.label,
                where,
                f"{path} is not a local path; taken as a Hugging Face ID (not checked offline)",
            )
        )
        return
    if names and "/" not in path:
        message = f"unknown reference {path!r}: not the name of a document in this recipe, nor a local path"
    elif looks_like_hub_id(path):
        message = (
            f"{path} does not exist: {local_root}/ holds local models, so this is a local path, not a Hugging Face ID"
        )
    else:
        message = f"{path} does not exist: not a local path, nor a Hugging Face ID (owner/name)"
    # A bare name in a chain is a document name; otherwise suggest what is on disk too.
    nearby = _siblings(path) if "/" in path or not names else []
    report.problems.append(Problem(doc.label, where, message + suggest(path, [*names, *nearby])))


def _holds_models(directory: str) -> bool:
    """A local directory with model directories in it: `dir/name` under it is
    a local path (misspelt when missing), not a Hugging Face ID."""
    try:
        return any(os.path.isfile(os.path.join(directory, e, "config.json")) for e in os.listdir(directory))
    except OSError:
        return False


def _siblings(path: str) -> List[str]:
    """Existing entries beside a missing path, as the recipe would spell them."""
    parent = os.path.dirname(path.rstrip("/"))
    try:
        return [os.path.join(parent, e) for e in os.listdir(parent or ".")]
    except OSError:
        return []


def check_references(report: Report, doc: Document, names) -> None:
    from mergekit_lox.files.peft import ADAPTER_WEIGHTS, adapter_mismatch

    for where, reference in model_references(doc.raw, doc.config):
        check_path(report, doc, where, reference.model.path, "model", names)
        if reference.lora is not None:
            check_path(report, doc, where + " (LoRA)", reference.lora.path, "lora", ())
            model, lora = reference.model.path, reference.lora.path
            if _is_local(lora, ADAPTER_WEIGHTS):
                try:
                    _read_header(os.path.join(lora, ADAPTER_WEIGHTS))
                except DamagedWeightsError as error:
                    report.problems.append(Problem(doc.label, where + " (LoRA)", str(error)))
                    continue
            if _is_local(model, "config.json") and _is_local(lora, "adapter_config.json"):
                mismatch = adapter_mismatch(model, lora)
                if mismatch:
                    report.problems.append(Problem(doc.label, where + " (LoRA)", mismatch))


def _is_local(path: str, marker: str) -> bool:
    return os.path.isfile(os.path.join(path, marker))


# The start of the vocabulary-size problem (safe_run lets mergekit's
# --unsafe-truncate-embeddings handle it instead).
VOCABULARY_MISMATCH = "models have different vocabulary sizes"


def _config_int(path: str, key: str) -> Optional[int]:
    """An integer of the model's config.json (``vocab_size``, ``num_hidden_layers``), or None."""
    import json

    try:
        with open(os.path.join(path, "config.json"), "r", encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    value = config.get(key) if isinstance(config, dict) else None
    return value if isinstance(value, int) else None


def _vocab_size(path: str) -> Optional[int]:
    return _config_int(path, "vocab_size")


def _merged_models(doc: Document) -> Dict[str, str]:
    """Local model folders merged tensor by tensor (a `models:` recipe), path -> field."""
    if doc.config.slices or (doc.config.modules and any(m.slices for m in doc.config.modules.values())):
        return {}
    found: Dict[str, str] = {}
    for where, reference in model_references(doc.raw, doc.config):
        path = reference.model.path
        if not where.startswith("tokenizer") and _is_local(path, "config.json"):
            found.setdefault(path, where)
    return found


def check_layer_counts(report: Report, doc: Document) -> None:
    """Models with different numbers of layers cannot be merged layer by layer:
    mergekit stops with "All inputs to a slice must contain the same number of
    layers", naming no model. Compared from each model's config.json."""
    counts = {path: (where, _config_int(path, "num_hidden_layers")) for path, where in _merged_models(doc).items()}
    _report_differing(
        report,
        doc,
        "models",
        {path: (where, n) for path, (where, n) in counts.items() if n is not None},
        "models have different numbers of layers (num_hidden_layers)",
        "merge models of one architecture and size (the aligned and fine-tuned models descend from the base)",
    )


def _report_differing(report: Report, doc: Document, field: str, found: Dict[str, Tuple[str, int]], what, fix) -> None:
    """One problem, ``what: where path (value), ...; fix``, when the values ``found``
    (model path -> (its field, value)) are not all the same."""
    if len({value for _, value in found.values()}) > 1:
        listed = ", ".join(f"{where} {path} ({value})" for path, (where, value) in found.items())
        report.problems.append(Problem(doc.label, field, f"{what}: {listed}; {fix}"))


def check_vocabularies(report: Report, doc: Document) -> None:
    """Different vocabulary sizes fail mergekit's first embedding tensor, after
    everything before it was computed, unless a tokenizer option aligns them."""
    if doc.config.tokenizer is not None or doc.config.tokenizer_source is not None:
        return
    sizes: Dict[str, Tuple[str, int]] = {}
    for where, reference in model_references(doc.raw, doc.config):
        path = reference.model.path
        size = _vocab_size(path) if _is_local(path, "config.json") else None
        if size is not None and path not in sizes:
            sizes[path] = (where, size)
    fix = (
        "align them with mergekit's tokenizer options, "
        "e.g. `tokenizer: {source: base}` or `tokenizer_source: base` (docs/troubleshooting.md)"
    )
    _report_differing(report, doc, "tokenizer", sizes, VOCABULARY_MISMATCH, fix)


def _tensor_shapes(path: str) -> Optional[Dict[str, Tuple[int, ...]]]:
    """Every tensor's shape in a local safetensors model, from the file headers only."""
    from mergekit.io.lazy_tensor_loader import ShardedTensorIndex

    try:
        index = ShardedTensorIndex.from_disk(path) if _is_local(path, "config.json") else None
    except Exception:  # noqa: BLE001 - a damaged file is named below; no weights: the run says so
        for shard in sorted(e for e in os.listdir(path) if e.endswith(".safetensors")):
            _read_header(os.path.join(path, shard))
        return None
    if index is None or not index.is_safetensors:
        return None
    shapes: Dict[str, Tuple[int, ...]] = {}
    for shard in sorted(set(index.tensor_paths.values())):
        shapes.update(_read_header(os.path.join(path, shard)))
    return shapes


def _read_header(file: str) -> Dict[str, Tuple[int, ...]]:
    """Tensor name -> shape, from a safetensors file's header; DamagedWeightsError naming it."""
    from safetensors import safe_open

    try:
        with safe_open(file, framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as error:  # noqa: BLE001 - safetensors' own error type
        raise DamagedWeightsError(damaged_safetensors_message(file, error)) from error


class DamagedWeightsError(ValueError):
    """A weight file that safetensors cannot read (truncated, garbage)."""


def damaged_safetensors_message(file: str, error: BaseException) -> str:
    from mergekit_lox.errors import one_line

    return (
        f"{file} is not a readable safetensors file ({one_line(error)}): "
        "the download or copy is truncated or damaged; fetch or export it again"
    )


def check_shapes(report: Report, doc: Document) -> None:
    """Inputs merged together must have the same tensor shapes; mergekit finds
    out only when it reaches the first differing tensor. Compared from the
    safetensors headers of local models (`models:` recipes; slices may pair
    different layers). Vocabulary-sized rows are left to the vocabulary check
    and mergekit's tokenizer options."""
    seen: Dict[str, Tuple[str, Dict[str, Tuple[int, ...]], Optional[int]]] = {}
    for path, where in _merged_models(doc).items():
        try:
            shapes = _tensor_shapes(path)
        except DamagedWeightsError as error:
            report.problems.append(Problem(doc.label, where, str(error)))
            return
        if shapes is not None:
            seen[path] = (where, shapes, _vocab_size(path))
    if len(seen) < 2:
        return
    (first_path, (first_where, first_shapes, first_vocab)), *others = seen.items()
    for path, (where, shapes, vocab) in others:
        differing = [
            name
            for name in first_shapes
            if name in shapes
            and shapes[name] != first_shapes[name]
            and not (
                shapes[name][1:] == first_shapes[name][1:]
                and (first_shapes[name][0], shapes[name][0]) == (first_vocab, vocab)
            )
        ]
        if differing:
            name = differing[0]
            more = f" (and {len(differing) - 1} more tensor(s))" if len(differing) > 1 else ""
            report.problems.append(
                Problem(
                    doc.label,
                    where,
                    f"tensor {name} has shape {first_shapes[name]} in {first_where} {first_path} "
                    f"but {shapes[name]} in {path}{more}: these models do not share an architecture",
                )
            )


def check_architecture_fit(report: Report, doc: Document) -> None:
    """Where mergekit's definition of the architecture and the input checkpoints disagree
    (mergekit stops on the first tensor it requires and no input stores, "Tensor ...
    required but not present", after loading everything): what the merge fits
    (mergekit_compat.install_checkpoint_fit: a tensor the model does not need skipped, one
    stored under another name merged under it, one the definition does not list added) is
    a note; a tensor the model needs that an input lacks, or a definition that cannot be
    laid out for the config, is an error."""
    from mergekit_lox.mergekit_compat import DefinitionError, checkpoint_gaps, missing_tensor_message

    try:
        fit = checkpoint_gaps(doc.config)
    except DefinitionError as error:
        report.problems.append(
            Problem(doc.label, "models", f"{error}: every merge of this model would stop there; it is not supported")
        )
        return
    if fit is None:
        return
    definition = "mergekit's definition of this architecture"
    notes = [f"{definition} is repaired: {'; '.join(fit.repairs)}"] if fit.repairs else []
    if fit.renamed:
        pairs = [f"{listed} (stored as {stored})" for listed, stored in fit.renamed.items()]
        notes.append(
            f"{definition} names tensors the checkpoints store under other names, which transformers loads as the "
            f"same tensors: {_shown(pairs)}; merged under the stored names"
        )
    if fit.aliased:
        pairs = [f"{listed} (also stored as {' / '.join(others)})" for listed, others in fit.aliased.items()]
        notes.append(
            "the checkpoints store tensors under different names (as different transformers versions save them), "
            f"which transformers loads as the same tensors: {_shown(pairs)}; merged under the names of {definition}"
        )
    if fit.added:
        notes.append(
            f"the checkpoints store {_shown(fit.added)}, which {definition} does not list: merged as further "
            "tensors, so that the output is whole"
        )
    if fit.skipped:
        notes.append(
            f"{definition} lists {_shown(fit.skipped)}, which the checkpoints do not store and the model does not "
            "use (or ties to another tensor): merged without them"
        )
    report.notes.extend(Problem(doc.label, "models", note) for note in notes)
    for name, model in fit.missing[:1]:
        report.problems.append(Problem(doc.label, "models", missing_tensor_message(name, model)))


def _shown(names: List[str]) -> str:
    return ", ".join(names[:3]) + (f" (and {len(names) - 3} more)" if len(names) > 3 else "")
