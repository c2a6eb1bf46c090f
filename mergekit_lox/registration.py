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
        registry.register(method)


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

    from mergekit_lox.describe import unknown_parameter_message
    from mergekit_lox.roles import ROLE_REQUIREMENTS, resolve_roles

    @functools.wraps(original)
    def resolve_parameters(spec, *, tensor_name, inputs, sources, base_model=None, t=0):
        shared, per_input = original(
            spec,
            tensor_name=tensor_name,
            inputs=inputs,
            sources=sources,
            base_model=base_model,
            t=t,
        )
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
