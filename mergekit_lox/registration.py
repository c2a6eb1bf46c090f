"""Register the project's merge methods with mergekit, idempotently.

Called by the start-up hook (``mergekit_lox._hook``) when mergekit's registry
module has executed, and by each method module when it finishes importing, so
registration happens whichever of the two is imported first.
"""

from __future__ import annotations

import functools
import importlib

METHOD_MODULES = ("mergekit_lox.lox", "mergekit_lox.lssf", "mergekit_lox.safelora")


def register_method(method) -> None:
    """Register ``method`` unless a method of that name is already known."""
    from mergekit.merge_methods import registry

    if method.spec.name not in {m.spec.name for m in registry.registered_methods()}:
        _explain_input_errors(method)
        registry.register(method)


def _explain_input_errors(method) -> None:
    """Append what our method needs to mergekit's input-count errors.

    mergekit checks the inputs while it plans (``validate_inputs``) and says
    e.g. "Merge method requires at least 2 non-base inputs for
    default.slices[0]; got 1", naming neither the method nor the roles.
    """
    from mergekit_lox.roles import ROLE_REQUIREMENTS, requirement_text

    if method.spec.name not in ROLE_REQUIREMENTS or getattr(method, "_mergekit_lox_explains", False):
        return
    original = method.validate_inputs
    needs = requirement_text(method.spec.name, ROLE_REQUIREMENTS[method.spec.name][0])

    @functools.wraps(original)
    def validate_inputs(input_ids, base_id=None, *, group_name=None):
        try:
            original(input_ids, base_id, group_name=group_name)
        except ValueError as error:
            raise ValueError(f"{error}: {needs}") from None

    method.validate_inputs = validate_inputs
    method._mergekit_lox_explains = True


def register_all() -> None:
    """Import every method module; each registers its method as it finishes.

    A module that is still half-imported (its own import is what pulled in
    mergekit's registry) is returned as is and registers itself when done.
    """
    for name in METHOD_MODULES:
        importlib.import_module(name)


def method_objects():
    """The project's MergeMethod objects, in documentation order."""
    register_all()
    from mergekit.merge_methods import registry

    from mergekit_lox.roles import ROLE_REQUIREMENTS

    return [registry.get(name) for name in ROLE_REQUIREMENTS]


def install_plan_checks(plan_module) -> None:
    """Make mergekit's planner check our methods' parameters while it plans.

    mergekit resolves per-model parameters per tensor in
    ``mergekit.plan.resolve_parameters`` during planning, before anything
    executes, but only passes input IDs to a method's ``validate_inputs`` and
    silently ignores parameter names a method does not have. We wrap that one
    function so that, for our methods, a misspelt parameter name or a missing,
    duplicated or misspelt role fails the plan with a clear message instead of
    being ignored or failing the first kernel call.
    """
    original = plan_module.resolve_parameters
    if getattr(original, "_mergekit_lox_checks_roles", False):
        return

    from pydantic import ValidationError

    from mergekit_lox.describe import unknown_parameter_message
    from mergekit_lox.roles import ROLE_REQUIREMENTS, resolve_roles

    @functools.wraps(original)
    def resolve_parameters(spec, *, tensor_name, inputs, sources, base_model=None, t=0):
        try:
            shared, per_input = original(
                spec,
                tensor_name=tensor_name,
                inputs=inputs,
                sources=sources,
                base_model=base_model,
                t=t,
            )
        except ValidationError as error:
            if spec.name not in ROLE_REQUIREMENTS:
                raise
            # pydantic's message names a type ("1 validation error for float"),
            # not the parameter: say which one, for which model and tensor.
            raise ValueError(
                invalid_parameter_message(spec, tensor_name, inputs, sources, base_model, t) or str(error)
            ) from error
        if spec.name in ROLE_REQUIREMENTS:
            known = [p.name for p in spec.parameters]
            for model in (None, *inputs):
                for settings in sources(model):
                    for name in settings or ():
                        if name not in known:
                            raise ValueError(unknown_parameter_message(spec.name, name, known))
            resolve_roles(
                spec.name,
                {
                    str(model): values.get("role")
                    for model, values in per_input.items()
                    if model != base_model
                },
                where=tensor_name,
            )
        return shared, per_input

    resolve_parameters._mergekit_lox_checks_roles = True
    plan_module.resolve_parameters = resolve_parameters


def invalid_parameter_message(spec, tensor_name, inputs, sources, base_model=None, t=0):
    """One line naming the first parameter whose value mergekit's own
    ``resolve_parameter`` rejects, or None when every value is valid."""
    from mergekit.merge_methods.base import ParameterScope
    from mergekit.parameter_resolver import resolve_parameter
    from pydantic import ValidationError

    from mergekit_lox.describe import type_name

    for model in (None, *inputs):
        settings = tuple(sources(model))
        if model is None:
            parameters = spec.shared_parameters
        else:
            parameters = [
                p for p in spec.input_parameters if model != base_model or p.scope == ParameterScope.INPUT
            ]
        for parameter in parameters:
            try:
                resolve_parameter(parameter, settings, tensor_name=tensor_name, t=t, model=model)
            except ValidationError as error:
                details = error.errors()
                value = details[0].get("input") if details else None
                reasons = "; ".join(d["msg"] for d in details)
                owner = f" of model {model}" if model is not None else ""
                return (
                    f"{spec.name}: parameter {parameter.name}{owner} (tensor {tensor_name}): "
                    f"{value!r} is not a valid {type_name(parameter.value_type)}: {reasons}"
                )
    return None
