"""Our methods' checks while mergekit plans a merge, before any tensor is computed.

mergekit resolves per-model parameters per tensor while it plans, but only
passes input IDs to a method's ``validate_inputs`` and silently ignores
parameter names a method does not have. ``check_planned_parameters`` is
called (through ``mergekit_compat.install_plan_checks``) after each tensor's
parameters are resolved, so that, for our methods, a misspelt parameter name
or a missing, duplicated or misspelt role fails the plan with a clear
message; ``explain_invalid_parameter`` turns pydantic's message (which names
a type, "1 validation error for float", not the parameter) into one line.
"""

from __future__ import annotations

from mergekit_lox.methods import role_requirement
from mergekit_lox.methods.describe import type_name, unknown_parameter_message


def check_planned_parameters(spec, arguments: dict, per_input: dict) -> None:
    """Raise ValueError for an unknown parameter name or bad roles of our method
    ``spec``; ``arguments`` are ``resolve_parameters``' keyword arguments."""
    requirement = role_requirement(spec.name)
    if requirement is None:
        return
    base_model = arguments.get("base_model")
    sources = arguments["sources"]
    known = [p.name for p in spec.parameters]
    for model in (None, *arguments["inputs"]):
        for settings in sources(model):
            for name in settings or ():
                if name not in known:
                    raise ValueError(unknown_parameter_message(spec.name, name, known))
    requirement.resolve(
        {str(model): values.get("role") for model, values in per_input.items() if model != base_model},
        where=arguments["tensor_name"],
    )


def explain_invalid_parameter(spec, arguments: dict, error: Exception):
    """One line naming the first parameter of our method ``spec`` whose value
    mergekit's own ``resolve_parameter`` rejects (``error``'s own text when none
    is found again); None when the method is not ours."""
    from mergekit.merge_methods.base import ParameterScope
    from mergekit.parameter_resolver import resolve_parameter
    from pydantic import ValidationError

    if role_requirement(spec.name) is None:
        return None
    tensor_name, base_model = arguments["tensor_name"], arguments.get("base_model")
    t = arguments.get("t", 0)
    for model in (None, *arguments["inputs"]):
        settings = tuple(arguments["sources"](model))
        if model is None:
            parameters = spec.shared_parameters
        else:
            parameters = [p for p in spec.input_parameters if model != base_model or p.scope == ParameterScope.INPUT]
        for parameter in parameters:
            try:
                resolve_parameter(parameter, settings, tensor_name=tensor_name, t=t, model=model)
            except ValidationError as invalid:
                details = invalid.errors()
                value = details[0].get("input") if details else None
                reasons = "; ".join(d["msg"] for d in details)
                owner = f" of model {model}" if model is not None else ""
                return (
                    f"{spec.name}: parameter {parameter.name}{owner} (tensor {tensor_name}): "
                    f"{value!r} is not a valid {type_name(parameter.value_type)}: {reasons}"
                )
    return str(error)


def install(plan_module) -> None:
    """Called by the start-up hook once ``mergekit.plan`` has executed."""
    from mergekit.io import tasks

    from mergekit_lox.mergekit_compat import (
        install_checkpoint_fit,
        install_local_card_paths,
        install_output_check,
        install_plan_checks,
    )
    from mergekit_lox.methods.inputs import check_stored_output

    install_plan_checks(plan_module, check_planned_parameters, explain_invalid_parameter)
    install_output_check(tasks, check_stored_output)
    install_checkpoint_fit()  # definitions that list tensors current checkpoints do not store
    install_local_card_paths()  # a relative local path is not looked up on the hub
