"""Which input is the aligned model and which the fine-tune: the `role` parameter.

One function serves both places where roles are checked: the planner (while
mergekit plans the merge, before any tensor is computed; see
``registration.install_plan_checks``) and the kernels themselves (for library
callers of ``merge_tensors`` / ``merge_state_dicts``, which skip the planner).
"""

from __future__ import annotations

from typing import Dict, Hashable, Mapping, Optional, Sequence, Tuple

ALIGNED = "aligned"
FINETUNED = "finetuned"

# method name -> roles its non-base models must carry, and whether a lone
# non-base model may omit its role.
ROLE_REQUIREMENTS: Dict[str, Tuple[Tuple[str, ...], bool]] = {
    "lox_extrapolate": ((ALIGNED,), True),
    "lssf_fusion": ((ALIGNED, FINETUNED), False),
    "safelora_project": ((ALIGNED, FINETUNED), False),
}


class RoleError(ValueError):
    """The recipe's `role` parameters do not describe the inputs a method needs."""


def requirement_text(method: str, required: Sequence[str]) -> str:
    wanted = " and ".join(f"one with `parameters: {{role: {r}}}`" for r in required)
    return f"{method} needs base_model plus exactly {len(required)} model(s) under `models:`: {wanted}"


def resolve_roles(
    method: str,
    roles: Mapping[Hashable, Optional[str]],
    *,
    where: Optional[str] = None,
) -> Dict[str, Hashable]:
    """Map each required role to the input carrying it, or raise a RoleError.

    ``roles`` maps every non-base input to its `role` value (None when unset).
    """
    required, lone_may_omit = ROLE_REQUIREMENTS[method]
    problems = []
    for model, role in roles.items():
        if role is not None and role not in required:
            problems.append(
                f"model {model} has role {role!r}, expected one of {', '.join(required)}"
            )
    if len(roles) != len(required):
        problems.append(f"got {len(roles)} non-base model(s)")
    if not problems:
        if lone_may_omit and len(roles) == 1:
            return {required[0]: next(iter(roles))}
        found: Dict[str, Hashable] = {}
        for model, role in roles.items():
            if role is None:
                problems.append(f"model {model} has no role")
            elif role in found:
                problems.append(f"role {role!r} is given to both {found[role]} and {model}")
            else:
                found[role] = model
        missing = [r for r in required if r not in found]
        if missing and not problems:
            problems.append(f"no model has role {', '.join(missing)}")
        if not problems:
            return found
    location = f" (tensor {where})" if where else ""
    raise RoleError(f"{requirement_text(method, required)}; {'; '.join(problems)}{location}")


def role_tensors(method: str, group, role) -> dict:
    """A kernel's inputs, checked: ``{"base": W_b, "aligned": W_a[, "finetuned": W_f]}``.

    Refuses NaN/Inf inputs and bad roles (naming the tensor and the model)
    before any arithmetic; ``role`` is the kernel's per-model `role` values.
    """
    from mergekit_lox.finite import require_finite

    require_finite(group)
    roles = resolve_roles(method, dict(role), where=group.metadata.name)
    by_id = {entry.id: entry.tensor for entry in group.non_base}
    return {"base": group.base.tensor, **{name: by_id[model] for name, model in roles.items()}}
