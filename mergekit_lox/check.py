"""`mergekit-lox check`: validate a recipe without loading a single tensor.

Every rule is read from what mergekit itself uses, so `check` cannot drift
from what a run would accept:

- the schema is mergekit's ``MergeConfiguration`` (pydantic) -- plus the keys
  it would silently ignore (pydantic drops unknown fields, so a misspelt
  ``paramters:`` would otherwise just vanish);
- methods, parameter names, scopes, defaults and types come from the
  registered ``MergeMethodSpec`` objects, and every scalar is validated with
  ``ParameterSpec.validate``, the very call the planner makes;
- input counts and base handling go through the method's ``validate_inputs``,
  roles through ``roles.resolve_roles`` (what the planner hook calls);
- chains follow ``mergekit-multi``: a document may carry ``name:`` and later
  documents refer to its output by that name.

A problem is reported as one line naming the document and the field.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

import yaml

from mergekit_lox.describe import one_line

# `owner/name` as the Hugging Face hub spells repository IDs.
HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")

# An irrational fraction: a gradient is interpolated at arbitrary points, so
# probe one that never lands on an integer between two distinct integers.
_PROBE = 1 / math.sqrt(2)


@dataclass(frozen=True)
class Problem:
    """One finding: the document it is in, the field, and what is wrong."""

    document: str
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.document}: {self.field}" if self.field else self.document
        return f"{where}: {self.message}"


@dataclass
class Document:
    index: int  # 1-based position in the file
    name: Optional[str]
    raw: Any
    label: str
    config: Any = None  # MergeConfiguration once the schema accepts it
    references: Dict[str, str] = field(default_factory=dict)  # document name -> field


@dataclass
class Report:
    recipe: str
    documents: List[Document] = field(default_factory=list)
    problems: List[Problem] = field(default_factory=list)
    notes: List[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> Tuple[List[str], List[str]]:
        """(`error: ...` lines, `note: ...` lines), each naming the recipe."""
        return (
            [f"error: {self.recipe}: {p}" for p in self.problems],
            [f"note: {self.recipe}: {n}" for n in self.notes],
        )


def _suggest(word, candidates) -> str:
    """`` (did you mean 'x'?)``: describe.closest, the wording `methods` and the planner use."""
    from mergekit_lox.describe import closest

    return closest(str(word), sorted(candidates))


def _join(path: str, key) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def _error_text(error: Exception) -> str:
    from pydantic import ValidationError

    if isinstance(error, ValidationError):
        return "; ".join(e["msg"] for e in error.errors())
    return one_line(error)


# --------------------------------------------------------------------------
# YAML and the document list


def _document_of_line(text: str, line: int) -> int:
    """1-based document number containing 1-based ``line`` (counting `---`)."""
    count, seen_content = 1, False
    for content in text.splitlines()[: line - 1]:
        if content.startswith("---"):
            if seen_content:
                count += 1
            seen_content = True
        elif content.strip() and not content.lstrip().startswith("#"):
            seen_content = True
    return count


def _load_documents(report: Report, text: str) -> Optional[List[Any]]:
    try:
        return list(yaml.safe_load_all(text))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
        line = mark.line + 1 if mark is not None else None
        reason = getattr(error, "problem", None) or " ".join(str(error).split())
        where = f"document {_document_of_line(text, line)}" if line else "recipe"
        report.problems.append(
            Problem(where, f"line {line}" if line else "yaml", f"YAML syntax error: {reason}")
        )
        return None


def _label(index: int, name: Optional[str], final_of_chain: bool) -> str:
    if name is not None:
        return f"document {index} ({name!r})"
    return f"document {index} (final)" if final_of_chain else f"document {index}"


def _split_documents(report: Report, loaded: List[Any]) -> None:
    chain = len(loaded) > 1
    names: Dict[str, int] = {}
    unnamed: List[int] = []
    for index, raw in enumerate(loaded, start=1):
        name = raw.get("name") if isinstance(raw, dict) else None
        doc = Document(index, name if isinstance(name, str) else None, raw, "")
        unnamed_final = isinstance(raw, dict) and "name" not in raw
        doc.label = _label(index, doc.name, chain and unnamed_final)
        report.documents.append(doc)
        if raw is None:
            report.problems.append(Problem(doc.label, "", "empty document (a stray `---`?)"))
            continue
        if not isinstance(raw, dict):
            report.problems.append(
                Problem(doc.label, "", f"a recipe document is a mapping, got {type(raw).__name__}")
            )
            continue
        if "name" in raw and not isinstance(name, str):
            report.problems.append(Problem(doc.label, "name", f"must be a string, got {name!r}"))
            continue
        if doc.name is None:
            unnamed.append(index)
        elif doc.name in names:
            report.problems.append(
                Problem(doc.label, "name", f"duplicate name, already used by document {names[doc.name]}")
            )
        else:
            names[doc.name] = index
    if chain and len(unnamed) > 1:
        report.problems.append(
            Problem(
                "recipe",
                "name",
                f"documents {', '.join(map(str, unnamed))} have no `name:`; "
                "only the final document of a chain may be unnamed",
            )
        )
    if chain and not unnamed and all(isinstance(d.raw, dict) for d in report.documents):
        report.problems.append(
            Problem(
                "recipe",
                "name",
                "every document has a `name:`; the final document of a chain has none "
                "(it is the one written to OUT)",
            )
        )


# --------------------------------------------------------------------------
# Schema


def _unknown_fields(raw: Any, model_cls, path: str) -> Iterator[Tuple[str, str]]:
    """Keys that mergekit's pydantic models would silently drop."""
    from mergekit.common import ModelReference
    from mergekit.config import ConditionalParameter
    from pydantic import BaseModel
    from typing_extensions import get_args, get_origin

    skip = (ModelReference, ConditionalParameter)

    def walk(value, annotation, where):
        origin = get_origin(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if issubclass(annotation, skip) or not isinstance(value, dict):
                return
            fields = annotation.model_fields
            for key, sub in value.items():
                if key not in fields:
                    yield _join(where, key), f"unknown field{_suggest(key, fields)}"
                else:
                    yield from walk(sub, fields[key].annotation, _join(where, key))
        elif origin in (list, List) and isinstance(value, list):
            (item,) = get_args(annotation) or (Any,)
            for i, sub in enumerate(value):
                yield from walk(sub, item, _join(where, i))
        elif origin in (dict, Dict) and isinstance(value, dict):
            item = (get_args(annotation) or (Any, Any))[1]
            for key, sub in value.items():
                yield from walk(sub, item, _join(where, key))
        elif get_args(annotation):
            # A Union/Optional: follow the one member of the value's shape.
            members = [
                a
                for a in get_args(annotation)
                if (isinstance(value, dict) and isinstance(a, type) and issubclass(a, BaseModel))
                or (isinstance(value, list) and get_origin(a) in (list, List))
            ]
            if len(members) == 1:
                yield from walk(value, members[0], where)

    yield from walk(raw, model_cls, path)


def _schema_location(loc: Tuple) -> str:
    """pydantic's error location, without its union-member tags (`str`, `list[...]`)."""
    path = ""
    for part in loc:
        if isinstance(part, str) and (part in _TYPE_TAGS or "[" in part or "-" in part):
            continue
        path = _join(path, part)
    return path


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "ConditionalParameter", "ModelReference"}


def _check_schema(report: Report, doc: Document) -> None:
    from mergekit.config import MergeConfiguration
    from pydantic import ValidationError

    body = {k: v for k, v in doc.raw.items() if k != "name"}
    for where, message in _unknown_fields(body, MergeConfiguration, ""):
        report.problems.append(Problem(doc.label, where, message))
    try:
        doc.config = MergeConfiguration.model_validate(body)
    except ValidationError as error:
        seen = set()
        for item in error.errors():
            where = _schema_location(item["loc"]) or "(document)"
            if where not in seen:
                seen.add(where)
                report.problems.append(Problem(doc.label, where, f"schema: {item['msg']}"))
    except Exception as error:  # mergekit's model validators raise RuntimeError
        text = _error_text(error)
        where = "tokenizer_source" if "tokenizer" in text else "models"
        report.problems.append(Problem(doc.label, where, f"schema: {text}"))


# --------------------------------------------------------------------------
# Methods and parameters


def _registry():
    import mergekit_lox  # noqa: F401 - registers the project's methods
    from mergekit.merge_methods import registry

    return {m.spec.name: m for m in registry.registered_methods()}


def _validate_scalar(spec, value, where: str) -> Optional[str]:
    from mergekit_lox.describe import type_name

    try:
        spec.validate(value)
    except Exception as error:
        return f"{value!r} is not a valid {type_name(spec.value_type)}: {_error_text(error)}"
    return None


def _is_scalar(value) -> bool:
    return isinstance(value, (bool, int, float, str))


def _validate_setting(spec, value, where: str) -> List[Tuple[str, str]]:
    """Validate a parameter setting as mergekit's ``evaluate_setting`` reads it:
    a scalar, a gradient (list of scalars), a ``{filter, value}`` condition or a
    list of conditions."""
    problems: List[Tuple[str, str]] = []
    if _is_scalar(value):
        error = _validate_scalar(spec, value, where)
        if error:
            problems.append((where, error))
    elif isinstance(value, dict):
        problems.extend(_validate_condition(spec, value, where))
    elif isinstance(value, list) and value and all(_is_scalar(v) for v in value):
        problems.extend(_validate_gradient(spec, value, where))
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for i, condition in enumerate(value):
            problems.extend(_validate_condition(spec, condition, _join(where, i)))
    elif isinstance(value, list) and not value:
        problems.append((where, "empty list: no value"))
    else:
        problems.append(
            (where, "expected a value, a gradient list of values, or {filter, value} entries")
        )
    return problems


def _validate_condition(spec, condition: dict, where: str) -> List[Tuple[str, str]]:
    problems = [
        (_join(where, key), f"unknown key in a conditional value (expected filter, value){_suggest(key, ['filter', 'value'])}")
        for key in condition
        if key not in ("filter", "value")
    ]
    if "filter" in condition and not isinstance(condition["filter"], (str, type(None))):
        problems.append((_join(where, "filter"), "must be a string (a substring of tensor names)"))
    if "value" not in condition:
        problems.append((where, "conditional entry has no `value`"))
    elif _is_scalar(condition["value"]) or (
        isinstance(condition["value"], list) and all(_is_scalar(v) for v in condition["value"])
    ):
        problems.extend(_validate_setting(spec, condition["value"], _join(where, "value")))
    else:
        problems.append((_join(where, "value"), "must be a value or a gradient list of values"))
    return problems


def _validate_gradient(spec, values: list, where: str) -> List[Tuple[str, str]]:
    problems = []
    validated = []
    for i, value in enumerate(values):
        error = _validate_scalar(spec, value, _join(where, i))
        if error:
            problems.append((_join(where, i), error))
        else:
            validated.append(spec.validate(value))
    if problems or len(validated) < 2:
        return problems
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in validated)
    if not numeric:
        return problems  # bools and strings are selected, not interpolated
    for a, b in zip(validated, validated[1:]):
        if a == b:
            continue
        probe = a + _PROBE * (b - a)
        error = _validate_scalar(spec, probe, where)
        if error:
            problems.append(
                (where, f"gradient {values!r} interpolates between its values, and {probe:.4g} "
                 f"is not valid: {error.split(': ', 1)[-1]}")
            )
            break
    return problems


@dataclass
class _Input:
    model: Any  # ModelReference
    parameters: Optional[dict]
    where: str  # e.g. "models[1]"


@dataclass
class _Group:
    """One set of inputs merged together (the recipe, a slice, a module)."""

    where: str
    inputs: List[_Input]
    base: Any  # Optional[ModelReference]
    base_where: str
    shared: List[Optional[dict]]  # parameter dicts that apply to every input, by precedence
    add_base: bool  # mergekit appends a missing base to `models:` itself


def _groups(raw: dict, config) -> Iterator[_Group]:
    """Mirror of MergePlanner.normalize_config's view of the recipe."""
    top = raw.get("parameters")

    def slices(raw_slices, cfg_slices, where, outer):
        for i, (raw_slice, cfg_slice) in enumerate(zip(raw_slices, cfg_slices)):
            base = cfg_slice.base_model or config.base_model
            yield _Group(
                where=_join(where, i) + ".sources",
                inputs=[
                    _Input(src.model, rs.get("parameters"), _join(_join(where, i) + ".sources", j))
                    for j, (rs, src) in enumerate(zip(raw_slice["sources"], cfg_slice.sources))
                ],
                base=base,
                base_where=_join(where, i) + ".base_model" if cfg_slice.base_model else "base_model",
                shared=[raw_slice.get("parameters"), *outer],
                add_base=False,
            )

    def models(raw_models, cfg_models, where, outer):
        yield _Group(
            where=where,
            inputs=[
                _Input(m.model, rm.get("parameters"), _join(where, i))
                for i, (rm, m) in enumerate(zip(raw_models, cfg_models))
            ],
            base=config.base_model,
            base_where="base_model",
            shared=outer,
            add_base=True,
        )

    if config.models:
        yield from models(raw["models"], config.models, "models", [top])
    if config.slices:
        yield from slices(raw["slices"], config.slices, "slices", [top])
    if config.modules:
        for name, module in config.modules.items():
            raw_module = raw["modules"][name]
            outer = [raw_module.get("parameters"), top]
            where = f"modules.{name}"
            if module.models:
                yield from models(raw_module["models"], module.models, where + ".models", outer)
            if module.slices:
                yield from slices(raw_module["slices"], module.slices, where + ".slices", outer)


def _parameter_dicts(raw: dict) -> Iterator[Tuple[str, Any, bool]]:
    """(field, parameters value, is per-model) for every `parameters:` in a document."""

    def from_inputs(items, where):
        for i, item in enumerate(items or []):
            if isinstance(item, dict) and "parameters" in item:
                yield _join(_join(where, i), "parameters"), item["parameters"], True

    def from_slices(items, where):
        for i, item in enumerate(items or []):
            if isinstance(item, dict):
                if "parameters" in item:
                    yield _join(_join(where, i), "parameters"), item["parameters"], False
                yield from from_inputs(item.get("sources"), _join(_join(where, i), "sources"))

    if "parameters" in raw:
        yield "parameters", raw["parameters"], False
    yield from from_inputs(raw.get("models"), "models")
    yield from from_slices(raw.get("slices"), "slices")
    for name, module in (raw.get("modules") or {}).items():
        where = f"modules.{name}"
        if isinstance(module, dict):
            if "parameters" in module:
                yield _join(where, "parameters"), module["parameters"], False
            yield from from_inputs(module.get("models"), _join(where, "models"))
            yield from from_slices(module.get("slices"), _join(where, "slices"))


def _check_parameters(report: Report, doc: Document, method) -> None:
    from mergekit.merge_methods.base import ParameterScope

    from mergekit_lox.describe import unknown_parameter_message

    spec = method.spec
    known = {p.name: p for p in spec.parameters}
    for where, parameters, per_model in _parameter_dicts(doc.raw):
        if not parameters:
            continue
        for name, value in parameters.items():
            field_path = _join(where, name)
            if name not in known:
                # The planner hook refuses these for our methods; mergekit ignores them for its own.
                report.problems.append(
                    Problem(doc.label, field_path, unknown_parameter_message(spec.name, name, known))
                )
                continue
            parameter = known[name]
            if per_model and parameter.scope == ParameterScope.SHARED:
                report.problems.append(
                    Problem(
                        doc.label,
                        field_path,
                        f"{name} is a shared parameter of {spec.name}; mergekit ignores it under "
                        "a model: set it in the document's top-level `parameters:`",
                    )
                )
                continue
            for sub_where, message in _validate_setting(parameter, value, field_path):
                report.problems.append(Problem(doc.label, sub_where, message))


def _lookup(name: str, own: Optional[dict], shared: List[Optional[dict]]):
    """The setting of ``name`` by mergekit's precedence: the input's own, then outer."""
    for scope in [own, *shared]:
        if scope and name in scope:
            return True, scope[name]
    return False, None


def _check_inputs(report: Report, doc: Document, method) -> None:
    from mergekit.merge_methods.base import BasePolicy, ParameterScope

    from mergekit_lox.roles import ROLE_REQUIREMENTS, RoleError, resolve_roles

    spec = method.spec
    for group in _groups(doc.raw, doc.config):
        if spec.contract.base == BasePolicy.REQUIRED and group.base is None:
            report.problems.append(
                Problem(doc.label, "base_model", f"{spec.name} requires a base_model")
            )
            continue
        ids = [item.model for item in group.inputs]
        if group.add_base and group.base is not None and group.base not in ids:
            ids.append(group.base)
        try:
            method.validate_inputs(ids, group.base)
        except Exception as error:
            report.problems.append(
                Problem(doc.label, group.where, f"{spec.name}: {_error_text(error)}")
            )
            continue
        has_base = spec.contract.base != BasePolicy.IGNORED and group.base is not None
        non_base = [item for item in group.inputs if not (has_base and item.model == group.base)]

        for parameter in spec.parameters:
            if not parameter.required:
                continue
            if parameter.scope == ParameterScope.SHARED:
                if not _lookup(parameter.name, None, group.shared)[0]:
                    report.problems.append(
                        Problem(doc.label, _join("parameters", parameter.name), f"missing required parameter of {spec.name}")
                    )
                continue
            targets = non_base if parameter.scope == ParameterScope.NON_BASE else group.inputs
            for item in targets:
                if not _lookup(parameter.name, item.parameters, group.shared)[0]:
                    report.problems.append(
                        Problem(
                            doc.label,
                            _join(_join(item.where, "parameters"), parameter.name),
                            f"missing required parameter of {spec.name} for model {item.model}",
                        )
                    )

        if spec.name in ROLE_REQUIREMENTS:
            roles = {}
            for item in non_base:
                _, role = _lookup("role", item.parameters, group.shared)
                if not (role is None or isinstance(role, str)):
                    break  # a conditional role: resolved per tensor at plan time
                roles[str(item.model)] = role
            else:
                try:
                    resolve_roles(spec.name, roles)
                except RoleError as error:
                    report.problems.append(Problem(doc.label, group.where, str(error)))


def _check_dtypes(report: Report, doc: Document) -> None:
    from mergekit.common import dtype_from_name

    for key in ("dtype", "out_dtype"):
        value = getattr(doc.config, key)
        if value is None:
            continue
        try:
            dtype = dtype_from_name(value)
            ok = dtype.is_floating_point
        except Exception:
            ok = False
        if not ok:
            report.problems.append(
                Problem(doc.label, key, f"unknown floating-point dtype {value!r} (float32, float16, bfloat16)")
            )


# --------------------------------------------------------------------------
# Model references: local paths, Hugging Face IDs, earlier documents


def _model_references(raw: dict, config) -> Iterator[Tuple[str, Any]]:
    """(field, ModelReference) for every model a document names."""
    from mergekit.common import ModelReference

    if config.base_model is not None:
        yield "base_model", config.base_model
    for group in _groups(raw, config):
        for item in group.inputs:
            yield _join(item.where, "model"), item.model
        if group.base_where != "base_model" and group.base is not None:
            yield group.base_where, group.base
    if isinstance(config.tokenizer_source, ModelReference):
        yield "tokenizer_source", config.tokenizer_source
    if config.tokenizer is not None and isinstance(config.tokenizer.source, ModelReference):
        yield "tokenizer.source", config.tokenizer.source


def _check_path(report: Report, doc: Document, where: str, path: str, kind: str, names) -> None:
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
    if HF_ID.match(path) and not _holds_models(local_root):
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
    elif HF_ID.match(path):
        message = (
            f"{path} does not exist: {local_root}/ holds local models, so this is a local path, "
            "not a Hugging Face ID"
        )
    else:
        message = f"{path} does not exist: not a local path, nor a Hugging Face ID (owner/name)"
    # A bare name in a chain is a document name; otherwise suggest what is on disk too.
    nearby = _siblings(path) if "/" in path or not names else []
    report.problems.append(Problem(doc.label, where, message + _suggest(path, [*names, *nearby])))


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


def _check_references(report: Report, doc: Document, names) -> None:
    from mergekit_lox.lora_targets import adapter_mismatch

    for where, reference in _model_references(doc.raw, doc.config):
        _check_path(report, doc, where, reference.model.path, "model", names)
        if reference.lora is not None:
            _check_path(report, doc, where + " (LoRA)", reference.lora.path, "lora", ())
            model, lora = reference.model.path, reference.lora.path
            if _is_local(model, "config.json") and _is_local(lora, "adapter_config.json"):
                mismatch = adapter_mismatch(model, lora)
                if mismatch:
                    report.problems.append(Problem(doc.label, where + " (LoRA)", mismatch))


def _is_local(path: str, marker: str) -> bool:
    return os.path.isfile(os.path.join(path, marker))


# The start of the vocabulary-size problem (safe_run lets mergekit's
# --unsafe-truncate-embeddings handle it instead).
VOCABULARY_MISMATCH = "models have different vocabulary sizes"


def _vocab_size(path: str) -> Optional[int]:
    import json

    try:
        with open(os.path.join(path, "config.json"), "r", encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    size = config.get("vocab_size") if isinstance(config, dict) else None
    return size if isinstance(size, int) else None


def _check_vocabularies(report: Report, doc: Document) -> None:
    """Different vocabulary sizes fail mergekit's first embedding tensor, after
    everything before it was computed, unless a tokenizer option aligns them."""
    if doc.config.tokenizer is not None or doc.config.tokenizer_source is not None:
        return
    sizes: Dict[str, Tuple[str, int]] = {}
    for where, reference in _model_references(doc.raw, doc.config):
        path = reference.model.path
        size = _vocab_size(path) if _is_local(path, "config.json") else None
        if size is not None and path not in sizes:
            sizes[path] = (where, size)
    if len({size for _, size in sizes.values()}) > 1:
        listed = ", ".join(f"{where} {path} ({size})" for path, (where, size) in sizes.items())
        report.problems.append(
            Problem(
                doc.label,
                "tokenizer",
                f"{VOCABULARY_MISMATCH}: {listed}; align them with mergekit's tokenizer options, "
                "e.g. `tokenizer: {source: base}` or `tokenizer_source: base` (docs/troubleshooting.md)",
            )
        )


def _tensor_shapes(path: str) -> Optional[Dict[str, Tuple[int, ...]]]:
    """Every tensor's shape in a local safetensors model, from the file headers only."""
    from mergekit.io.lazy_tensor_loader import ShardedTensorIndex
    from safetensors import safe_open

    try:
        index = ShardedTensorIndex.from_disk(path) if _is_local(path, "config.json") else None
    except Exception:  # noqa: BLE001 - no weights: another check or the run reports it
        return None
    if index is None or not index.is_safetensors:
        return None
    shapes: Dict[str, Tuple[int, ...]] = {}
    try:
        for shard in sorted(set(index.tensor_paths.values())):
            with safe_open(os.path.join(path, shard), framework="pt") as f:
                for name in f.keys():
                    shapes[name] = tuple(f.get_slice(name).get_shape())
    except Exception:  # noqa: BLE001 - a damaged file fails the run with its own message
        return None
    return shapes


def _check_shapes(report: Report, doc: Document) -> None:
    """Inputs merged together must have the same tensor shapes; mergekit finds
    out only when it reaches the first differing tensor. Compared from the
    safetensors headers of local models (`models:` recipes; slices may pair
    different layers). Vocabulary-sized rows are left to the vocabulary check
    and mergekit's tokenizer options."""
    if doc.config.slices or (doc.config.modules and any(m.slices for m in doc.config.modules.values())):
        return
    seen: Dict[str, Tuple[str, Dict[str, Tuple[int, ...]], Optional[int]]] = {}
    for where, reference in _model_references(doc.raw, doc.config):
        path = reference.model.path
        if where.startswith("tokenizer") or path in seen:
            continue
        shapes = _tensor_shapes(path)
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


def _check_cycles(report: Report, documents: List[Document]) -> None:
    named = {d.name: d for d in documents if d.name is not None}
    state: Dict[str, int] = {}  # 1 = on the stack, 2 = done
    reported = set()

    def visit(name: str, stack: List[str]) -> None:
        state[name] = 1
        for target in named[name].references:
            if target not in named:
                continue
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target]
                key = frozenset(cycle)
                if key not in reported:
                    reported.add(key)
                    first = named[cycle[0]]
                    report.problems.append(
                        Problem(
                            first.label,
                            first.references[cycle[1]],
                            "chain cycle: " + " -> ".join(cycle),
                        )
                    )
            elif target not in state:
                visit(target, stack + [target])
        state[name] = 2

    for name in named:
        if name not in state:
            visit(name, [name])


# --------------------------------------------------------------------------


def check_text(text: str, recipe: str = "recipe") -> Report:
    """Validate recipe source text; paths are resolved against the working directory."""
    report = Report(recipe)
    loaded = _load_documents(report, text)
    if loaded is None:
        return report
    if not loaded:
        report.problems.append(Problem("recipe", "", "no documents"))
        return report
    _split_documents(report, loaded)
    methods = _registry()
    chain = len(loaded) > 1
    names = {d.name for d in report.documents if d.name is not None} if chain else set()
    for doc in report.documents:
        if not isinstance(doc.raw, dict) or ("name" in doc.raw and doc.name is None):
            continue
        _check_schema(report, doc)
        method_name = doc.raw.get("merge_method")
        method = methods.get(method_name) if isinstance(method_name, str) else None
        if isinstance(method_name, str) and method is None:
            report.problems.append(
                Problem(
                    doc.label,
                    "merge_method",
                    f"unknown merge method {method_name!r}"
                    + (_suggest(method_name, methods) or " (see `mergekit-lox methods`)"),
                )
            )
        if doc.config is None:
            continue
        _check_dtypes(report, doc)
        _check_references(report, doc, names)
        _check_vocabularies(report, doc)
        _check_shapes(report, doc)
        if method is None:
            continue
        _check_parameters(report, doc, method)
        _check_inputs(report, doc, method)
    if chain:
        _check_cycles(report, report.documents)
    return report


def check_recipe(path: str) -> Report:
    """Validate the recipe file at ``path`` without computing anything."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            text = f.read()
    except OSError as error:
        report = Report(path)
        report.problems.append(Problem("recipe", "", f"cannot read: {error.strerror or error}"))
        return report
    return check_text(text, path)


def summary(report: Report) -> str:
    """One line for a valid recipe: what runs, in which order."""
    docs = report.documents
    if len(docs) == 1:
        return f"ok: {report.recipe}: 1 document, {docs[0].config.merge_method}"
    stages = ", ".join(f"{d.name or 'final'} ({d.config.merge_method})" for d in docs)
    return f"ok: {report.recipe}: chain of {len(docs)} documents: {stages}"
