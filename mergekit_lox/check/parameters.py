"""Methods and parameters: names, types, scalars, conditions, gradients, inputs and roles, dtypes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Tuple

from mergekit_lox.check.report import Document, Problem, Report, error_text, join_path, suggest

# An irrational fraction: a gradient is interpolated at arbitrary points, so
# probe one that never lands on an integer between two distinct integers.
_PROBE = 1 / math.sqrt(2)


def method_registry():
    from mergekit.merge_methods import registry

    from mergekit_lox.methods import register_all

    register_all()  # the start-up hook has done it already; this says so
    return {m.spec.name: m for m in registry.registered_methods()}


def _validate_scalar(spec, value, where: str) -> Optional[str]:
    from mergekit_lox.methods.describe import type_name

    try:
        spec.validate(value)
    except Exception as error:
        return f"{value!r} is not a valid {type_name(spec.value_type)}: {error_text(error)}"
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
            problems.extend(_validate_condition(spec, condition, join_path(where, i)))
    elif isinstance(value, list) and not value:
        problems.append((where, "empty list: no value"))
    else:
        problems.append((where, "expected a value, a gradient list of values, or {filter, value} entries"))
    return problems


def _validate_condition(spec, condition: dict, where: str) -> List[Tuple[str, str]]:
    problems = [
        (
            join_path(where, key),
            f"unknown key in a conditional value (expected filter, value){suggest(key, ['filter', 'value'])}",
        )
        for key in condition
        if key not in ("filter", "value")
    ]
    if "filter" in condition and not isinstance(condition["filter"], (str, type(None))):
        problems.append((join_path(where, "filter"), "must be a string (a substring of tensor names)"))
    if "value" not in condition:
        problems.append((where, "conditional entry has no `value`"))
    elif _is_scalar(condition["value"]) or (
        isinstance(condition["value"], list) and all(_is_scalar(v) for v in condition["value"])
    ):
        problems.extend(_validate_setting(spec, condition["value"], join_path(where, "value")))
    else:
        problems.append((join_path(where, "value"), "must be a value or a gradient list of values"))
    return problems


def _validate_gradient(spec, values: list, where: str) -> List[Tuple[str, str]]:
    problems = []
    validated = []
    for i, value in enumerate(values):
        error = _validate_scalar(spec, value, join_path(where, i))
        if error:
            problems.append((join_path(where, i), error))
        else:
            validated.append(spec.validate(value))
    if problems or len(validated) < 2:
        return problems
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in validated)
    if not numeric:
        return problems  # bools and strings are selected, not interpolated
    for a, b in zip(validated, validated[1:], strict=False):
        if a == b:
            continue
        probe = a + _PROBE * (b - a)
        error = _validate_scalar(spec, probe, where)
        if error:
            problems.append(
                (
                    where,
                    f"gradient {values!r} interpolates between its values, and {probe:.4g} "
                    f"is not valid: {error.split(': ', 1)[-1]}",
                )
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


def input_groups(raw: dict, config) -> Iterator[_Group]:
    """Mirror of MergePlanner.normalize_config's view of the recipe."""
    top = raw.get("parameters")

    def slices(raw_slices, cfg_slices, where, outer):
        for i, (raw_slice, cfg_slice) in enumerate(zip(raw_slices, cfg_slices, strict=False)):
            base = cfg_slice.base_model or config.base_model
            yield _Group(
                where=join_path(where, i) + ".sources",
                inputs=[
                    _Input(src.model, rs.get("parameters"), join_path(join_path(where, i) + ".sources", j))
                    for j, (rs, src) in enumerate(zip(raw_slice["sources"], cfg_slice.sources, strict=False))
                ],
                base=base,
                base_where=join_path(where, i) + ".base_model" if cfg_slice.base_model else "base_model",
                shared=[raw_slice.get("parameters"), *outer],
                add_base=False,
            )

    def models(raw_models, cfg_models, where, outer):
        yield _Group(
            where=where,
            inputs=[
                _Input(m.model, rm.get("parameters"), join_path(where, i))
                for i, (rm, m) in enumerate(zip(raw_models, cfg_models, strict=False))
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
                yield join_path(join_path(where, i), "parameters"), item["parameters"], True

    def from_slices(items, where):
        for i, item in enumerate(items or []):
            if isinstance(item, dict):
                if "parameters" in item:
                    yield join_path(join_path(where, i), "parameters"), item["parameters"], False
                yield from from_inputs(item.get("sources"), join_path(join_path(where, i), "sources"))

    if "parameters" in raw:
        yield "parameters", raw["parameters"], False
    yield from from_inputs(raw.get("models"), "models")
    yield from from_slices(raw.get("slices"), "slices")
    for name, module in (raw.get("modules") or {}).items():
        where = f"modules.{name}"
        if isinstance(module, dict):
            if "parameters" in module:
                yield join_path(where, "parameters"), module["parameters"], False
            yield from from_inputs(module.get("models"), join_path(where, "models"))
            yield from from_slices(module.get("slices"), join_path(where, "slices"))


def check_parameters(report: Report, doc: Document, method) -> None:
    from mergekit.merge_methods.base import ParameterScope

    from mergekit_lox.methods.describe import unknown_parameter_message

    spec = method.spec
    known = {p.name: p for p in spec.parameters}
    for where, parameters, per_model in _parameter_dicts(doc.raw):
        if not parameters:
            continue
        for name, value in parameters.items():
            field_path = join_path(where, name)
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


def lookup(name: str, own: Optional[dict], shared: List[Optional[dict]]):
    """The setting of ``name`` by mergekit's precedence: the input's own, then outer."""
    for scope in [own, *shared]:
        if scope and name in scope:
            return True, scope[name]
    return False, None


def check_inputs(report: Report, doc: Document, method) -> None:
    from mergekit.merge_methods.base import BasePolicy, ParameterScope

    from mergekit_lox.methods import role_requirement
    from mergekit_lox.methods.inputs import RoleError

    spec = method.spec
    for group in input_groups(doc.raw, doc.config):
        if spec.contract.base == BasePolicy.REQUIRED and group.base is None:
            report.problems.append(Problem(doc.label, "base_model", f"{spec.name} requires a base_model"))
            continue
        ids = [item.model for item in group.inputs]
        if group.add_base and group.base is not None and group.base not in ids:
            ids.append(group.base)
        try:
            method.validate_inputs(ids, group.base)
        except Exception as error:
            report.problems.append(Problem(doc.label, group.where, f"{spec.name}: {error_text(error)}"))
            continue
        has_base = spec.contract.base != BasePolicy.IGNORED and group.base is not None
        non_base = [item for item in group.inputs if not (has_base and item.model == group.base)]

        for parameter in spec.parameters:
            if not parameter.required:
                continue
            if parameter.scope == ParameterScope.SHARED:
                if not lookup(parameter.name, None, group.shared)[0]:
                    report.problems.append(
                        Problem(
                            doc.label,
                            join_path("parameters", parameter.name),
                            f"missing required parameter of {spec.name}",
                        )
                    )
                continue
            targets = non_base if parameter.scope == ParameterScope.NON_BASE else group.inputs
            for item in targets:
                if not lookup(parameter.name, item.parameters, group.shared)[0]:
                    report.problems.append(
                        Problem(
                            doc.label,
                            join_path(join_path(item.where, "parameters"), parameter.name),
                            f"missing required parameter of {spec.name} for model {item.model}",
                        )
                    )

        requirement = role_requirement(spec.name)
        if requirement is not None:
            roles = {}
            for item in non_base:
                _, role = lookup("role", item.parameters, group.shared)
                if not (role is None or isinstance(role, str)):
                    break  # a conditional role: resolved per tensor at plan time
                roles[str(item.model)] = role
            else:
                try:
                    resolved = requirement.resolve(roles)
                except RoleError as error:
                    report.problems.append(Problem(doc.label, group.where, str(error)))
                else:
                    check_subspace(report, doc, spec.name, group, resolved)


def check_subspace(report: Report, doc: Document, method: str, group, resolved: dict) -> None:
    """`lssf_fusion`'s calibrated ``subspace`` must come from the group's aligned model
    (config hash and weights fingerprint, methods/subspace.py). A missing or damaged
    subspace is already reported by the parameter's own validation."""
    from mergekit_lox.methods.subspace import SubspaceError, mismatch

    found, value = lookup("subspace", None, group.shared)
    if method != "lssf_fusion" or not found or not isinstance(value, str):
        return
    aligned = next((i.model for i in group.inputs if str(i.model) == resolved.get("aligned")), None)
    if aligned is None or aligned.lora is not None:
        return
    try:
        problem = mismatch(value, aligned.model.path)
    except SubspaceError:
        return
    if problem:
        report.problems.append(Problem(doc.label, "parameters.subspace", problem))


# Methods whose result is a small correction of an input: rounding the inputs to 16 bits
# before the kernel (mergekit casts to `dtype`) costs 2-50% of a LoRA-sized update.
PRECISION_SENSITIVE = ("safelora_project", "lssf_fusion", "safemerge")


def check_precision(report: Report, doc: Document) -> None:
    """A note (not an error) when such a method computes from 16-bit inputs."""
    dtype = str(doc.config.dtype or "")
    if doc.config.merge_method in PRECISION_SENSITIVE and dtype in ("float16", "bfloat16", "half", "bf16", "fp16"):
        report.notes.append(
            Problem(
                doc.label,
                "dtype",
                f"{doc.config.merge_method} computes from {dtype} inputs: rounding W_a and W_f to 16 bits "
                "costs 2-50% of a small update; set `dtype: float32` and store with `out_dtype: " + dtype + "`",
            )
        )


# Parameter values with which a method returns its pass-through input for every tensor.
_NO_OP_VALUES = {
    "lox_extrapolate": ("alpha", lambda v: v == 0, "alpha 0 extrapolates nothing: the output is the aligned model"),
    "lssf_fusion": ("scale", lambda v: v == 0, "scale 0 fuses nothing: the output is the fine-tuned model"),
    "safelora_project": ("threshold", lambda v: v < -1, "threshold below -1, the lowest cosine: nothing is projected"),
    "safemerge": ("threshold", lambda v: v < -1, "threshold below -1, the lowest cosine: nothing is merged"),
}


def check_no_op(report: Report, doc: Document) -> None:
    """A warning (an error with ``check --strict``) for a document that would change
    nothing, as far as can be seen without reading a tensor: a parameter value that
    disables the method."""
    config = doc.config
    if config.merge_method not in _NO_OP_VALUES:
        return
    # (An aligned model that is the base model itself is refused by mergekit already: it
    # drops the base from the inputs. A copy of it under another path shows only in the run.)
    name, disables, why = _NO_OP_VALUES[config.merge_method]
    value = (config.parameters or {}).get(name)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and disables(value):
        report.no_ops.append(Problem(doc.label, f"parameters.{name}", why))


def check_dtypes(report: Report, doc: Document) -> None:
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
