"""PEFT's LoRA on parameters (``target_parameters``): routers and MoE expert stacks.

PEFT 0.21's ``target_modules="all-linear"`` on a transformers 5 MoE model (Mixtral,
Qwen-MoE) also targets parameters that are not ``nn.Linear``: each router's
``mlp.gate.weight`` and each layer's expert stacks ``mlp.experts.gate_up_proj``
``[E, 2I, H]`` and ``mlp.experts.down_proj`` (``peft.tuners.lora.layer.ParamWrapper``;
two parameters of one module nest, so one of them is saved under ``...experts.base_layer``).
For a stack of ``E`` experts PEFT stores one pair, ``lora_A`` ``[E r, in]`` and ``lora_B``
``[out, r E]``, and expert ``e`` gets

    dW_e = s B_e A_e,   A_e = A.reshape(E, r, in)[e],   B_e = B.reshape(out, r, E)[:, :, e]

(``ParamWrapper.get_delta_weight``). Safe LoRA projects each expert's update with the C
of its own matrix, B'_e = C_e B_e (so s B'_e A_e = C_e dW_e), and decides once for the
stack, as ``safelora_project`` does on the stack the merge reads
(docs/methods.md, "Mixture-of-experts weights"). A 2-D parameter (a router) is a plain
``B A`` pair. Which key is which parameter, its rank and scaling are read from PEFT
itself: the adapter is injected into the aligned model's architecture built on the meta
device (no weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import torch

from mergekit_lox.errors import one_line
from mergekit_lox.files.peft import injected_parameter_wrappers, wrapped_parameter_name
from mergekit_lox.safelora_tools.common import SafeLoRAToolError


@dataclass(frozen=True)
class ParameterTarget:
    """One parameter PEFT's LoRA adapts through ``target_parameters``."""

    module: str  # PEFT's module of the pair (the key stem without base_model.model.)
    weight: str  # the parameter, as the merge names it (model.layers.0.mlp.experts.gate_up_proj)
    experts: int  # 1 for a 2-D parameter
    rank: int  # r per expert
    scaling: float


def parameter_targets(config, aligned: str, adapter: str) -> Dict[str, ParameterTarget]:
    """``{module: ParameterTarget}`` for the parameters ``config`` (a LoraConfig with
    ``target_parameters``) adapts on the model of ``aligned``; empty without them. Refuses
    (one line, naming the parameter) what the projection cannot handle: an expert stack
    stored ``[experts, in, out]`` (GPT-OSS's layout)."""
    if not getattr(config, "target_parameters", None):
        return {}
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(aligned))
        wrappers = injected_parameter_wrappers(model, config)
    except Exception as error:  # noqa: BLE001 - transformers / PEFT raise many kinds
        raise SafeLoRAToolError(
            f"adapter {adapter}: cannot tell which parameters its target_parameters="
            f"{list(config.target_parameters)!r} adapt on aligned model {aligned}: {one_line(error)}"
        ) from error
    targets = {}
    for path, (_, wrapper) in wrappers.items():
        weight = wrapped_parameter(path, wrapper, f"adapter {adapter}")
        targets[path] = ParameterTarget(
            path, weight, wrapper.num_experts, wrapper.r["default"], float(wrapper.scaling["default"])
        )
    return targets


def wrapped_parameter(path: str, wrapper, what: str) -> str:
    """The parameter (``owner.name``) a PEFT ParamWrapper at module ``path`` adapts: two
    parameters of one module nest, the inner wrapper under ``...base_layer``. Refuses an
    expert stack stored ``[experts, in, out]`` (GPT-OSS), naming it after ``what``."""
    weight = wrapped_parameter_name(path, wrapper)
    if wrapper.num_experts > 1 and getattr(wrapper.get_base_layer(), "is_transposed", False):
        raise SafeLoRAToolError(
            f"{what}: parameter {weight} is an expert stack stored [experts, in, out], which "
            "safelora-adapter does not project; merge the LoRA (aligned+adapter) and use the "
            "safelora_project recipe instead"
        )
    return weight


def expert_factors(A: torch.Tensor, B: torch.Tensor, experts: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """PEFT's pair of an expert stack as per-expert factors: ``A`` ``[E r, in]`` ->
    ``[E, r, in]``, ``B`` ``[out, r E]`` -> ``[E, out, r]`` (``B_e = B[:, e::E]``)."""
    return A.reshape(experts, -1, A.shape[-1]), B.reshape(B.shape[0], -1, experts).permute(2, 0, 1)


def stacked_b(B: torch.Tensor) -> torch.Tensor:
    """``expert_factors``' inverse for B: ``[E, out, r]`` -> PEFT's ``[out, r E]``."""
    experts, out, _ = B.shape
    return B.permute(1, 2, 0).reshape(out, -1)
