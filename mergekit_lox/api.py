"""A small Python API on in-memory models, for people who work in PEFT and transformers.

Every function takes models as state dicts (``{name: tensor}``) or ``nn.Module``
objects (their ``state_dict()``) with the same weight names, and computes with
the very functions the merge methods run (``methods/lox.py``, ``lssf.py``,
``safelora.py``, ``safemerge.py``), weight by weight:

- ``lox``, ``lssf``, ``safelora``, ``safemerge``: the merged state dict;
- ``lox_adapter``, ``lssf_adapter``: the term LoX / LSSF adds, as a PEFT LoRA
  adapter (``LoraConfig`` and PEFT's state dict; ``out=DIR`` writes it);
- ``apply_safelora``: Safe LoRA's projection of a ``PeftModel``'s LoRA weights,
  in place (``B' = C B``, the paper's one-liner).

docs/api.md has runnable examples.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, NamedTuple, Optional, Union

import torch

from mergekit_lox import linalg

StateLike = Union[Mapping[str, torch.Tensor], torch.nn.Module]


class Adapter(NamedTuple):
    """An adapter: its ``LoraConfig``, PEFT's state dict, the weights left out
    (name -> why) and the relative Frobenius distance of model + adapter to the merge."""

    config: object
    state_dict: Dict[str, torch.Tensor]
    left_out: Dict[str, str]
    distance: float


def _state(model: StateLike, label: str) -> Dict[str, torch.Tensor]:
    if isinstance(model, torch.nn.Module):
        return model.state_dict()
    if isinstance(model, Mapping):
        return dict(model)
    raise TypeError(f"{label} must be a state dict or an nn.Module, got {type(model).__name__}")


def _states(**models: StateLike) -> Dict[str, Dict[str, torch.Tensor]]:
    """The state dicts by role, checked to hold the same weight names and shapes."""
    states = {role: _state(model, role) for role, model in models.items()}
    (first, reference), *others = states.items()
    for role, state in others:
        if state.keys() != reference.keys():
            missing = sorted(set(reference) ^ set(state))
            raise ValueError(f"{first} and {role} hold different weights: {', '.join(missing[:4])} ...")
        for name, tensor in state.items():
            if tensor.shape != reference[name].shape:
                raise ValueError(f"weight {name}: {first} {tuple(reference[name].shape)}, {role} {tuple(tensor.shape)}")
    return states


def _transposed(*models: StateLike) -> frozenset:
    """Weights stored ``[in, out]`` (transformers Conv1D: GPT-2), read from the first
    nn.Module given; state dicts alone do not say, and are taken as nn.Linear's ``[out, in]``."""
    from mergekit_lox.layout import transposed_names

    module = next((m for m in models if isinstance(m, torch.nn.Module)), None)
    return transposed_names(module) if module is not None else frozenset()


def _linear_map(name: str, tensor: torch.Tensor, transposed: frozenset) -> torch.Tensor:
    """A weight as the linear map ``W [out, in]`` the methods' formulas act on (layout.py)."""
    return tensor.mT if name in transposed and tensor.ndim == 2 else tensor


def _merge(
    kernel, output_role: str, states: Dict[str, Dict[str, torch.Tensor]], transposed: frozenset = frozenset()
) -> Dict[str, torch.Tensor]:
    """``kernel(name, **inputs)`` per floating-point weight; anything else is the output role's own.
    A Conv1D weight (``transposed``) is computed on as ``W [out, in]`` and returned as stored."""
    out = {}
    for name, kept in states[output_role].items():
        if not kept.is_floating_point():
            out[name] = kept
            continue
        inputs = {role: _linear_map(name, state[name], transposed) for role, state in states.items()}
        out[name] = _linear_map(name, kernel(name, **inputs), transposed).contiguous()
    return out


def lox(base: StateLike, aligned: StateLike, alpha: float = 1.25, rank: int = 6, svd: str = "auto"):
    """``lox_extrapolate``: ``W_a + alpha lowrank_k(W_a - W_b)`` for every weight (docs/lox.md)."""
    from mergekit_lox.methods.lox import extrapolate

    linalg.check_svd_mode(svd)
    return _merge(
        lambda name, base, aligned: extrapolate(aligned, base, alpha, rank, svd),
        "aligned",
        _states(base=base, aligned=aligned),
        _transposed(aligned, base),
    )


def _lssf_parameters(scale, eta, rank, top_weight, svd) -> Dict[str, object]:
    linalg.check_svd_mode(svd)
    if not 0 < eta <= 1 or top_weight < 1 or rank < 0:
        raise ValueError(f"lssf: need 0 < eta <= 1, top_weight >= 1, rank >= 0; got {eta}, {top_weight}, {rank}")
    return {"scale": scale, "eta": eta, "rank": rank, "top_weight": top_weight, "svd": svd}


def lssf(
    base: StateLike,
    aligned: StateLike,
    finetuned: StateLike,
    scale: float = 1.0,
    eta: float = 0.9,
    rank: int = 0,
    top_weight: float = 1.0,
    svd: str = "auto",
    subspace: Optional[str] = None,
):
    """``lssf_fusion``: ``W_f + scale U' U'^T (W_a - W_b)`` for every weight (docs/lssf.md);
    ``subspace``: a directory written by `mergekit-lox lssf-calibrate`."""
    from mergekit_lox.adapters.terms import lssf_arguments
    from mergekit_lox.methods.lssf import fuse

    parameters = {**_lssf_parameters(scale, eta, rank, top_weight, svd), "subspace": subspace}
    return _merge(
        lambda name, base, aligned, finetuned: fuse(
            finetuned, aligned, base, **lssf_arguments(parameters, name, None, finetuned.shape)
        ),
        "finetuned",
        _states(base=base, aligned=aligned, finetuned=finetuned),
        _transposed(finetuned, aligned, base),
    )


def safelora(
    base: StateLike,
    aligned: StateLike,
    finetuned: StateLike,
    threshold: float = 0.5,
    projection: str = "scaled",
    rank: int = 8,
    svd: str = "auto",
):
    """``safelora_project``: ``W_a + C (W_f - W_a)`` where the cosine is <= threshold, else
    ``W_f`` (docs/safelora.md)."""
    from mergekit_lox.methods.safelora import project

    linalg.check_svd_mode(svd)
    return _merge(
        lambda name, base, aligned, finetuned: project(finetuned, aligned, base, threshold, projection, rank, svd),
        "finetuned",
        _states(base=base, aligned=aligned, finetuned=finetuned),
        _transposed(finetuned, aligned, base),
    )


def safemerge(
    base: StateLike,
    aligned: StateLike,
    finetuned: StateLike,
    safety: StateLike,
    threshold: float = 0.35,
    safety_weight: float = 0.2,
    projection: str = "scaled",
    rank: int = 8,
    svd: str = "auto",
):
    """``safemerge``: ``(1 - w) W_f + w W_s`` where Safe LoRA's cosine is < threshold, else
    ``W_f`` (``safety``: the aligned model tuned on safety data; docs/safemerge.md)."""
    from mergekit_lox.methods.safemerge import merge

    linalg.check_svd_mode(svd)
    if not -1 <= threshold <= 1 or not 0 <= safety_weight <= 1:
        raise ValueError(
            f"safemerge: need -1 <= threshold <= 1 and 0 <= safety_weight <= 1; got {threshold}, {safety_weight}"
        )
    return _merge(
        lambda name, base, aligned, finetuned, safety: merge(
            finetuned, safety, aligned, base, threshold, safety_weight, projection, rank, svd
        ),
        "finetuned",
        _states(base=base, aligned=aligned, finetuned=finetuned, safety=safety),
        _transposed(finetuned, aligned, base, safety),
    )


# --------------------------------------------------------------------------- adapters


def _adapter(method: str, states, parameters, model, max_rank, embeddings, out) -> Adapter:
    from mergekit_lox.adapters.command import peft_adapter
    from mergekit_lox.adapters.files import manifest, write_adapter_dir
    from mergekit_lox.adapters.lora import module_kinds
    from mergekit_lox.adapters.terms import TARGET_ROLE, term_factors
    from mergekit_lox.adapters.weights import AdapterTerms, ModuleTypes, weight_term

    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"{method} adapter: the model it applies to must be an nn.Module (its module types decide "
            "what a LoRA can carry); pass it as a module or as model="
        )
    if max_rank is not None and max_rank < 1:
        raise ValueError(f"max_rank must be at least 1, got {max_rank}")
    kinds, tied = module_kinds(model)

    def meta_model():
        with torch.device("meta"):
            return type(model)(model.config)

    types = ModuleTypes(kinds, tied, type(model).__name__, embeddings, meta_model)
    target_role = TARGET_ROLE[method]
    transposed = _transposed(model)  # Conv1D: the term is that of W [out, in] (fan_in_fan_out)
    weights = []
    for name, target in states[target_role].items():
        inputs = {role: _linear_map(name, state[name], transposed) for role, state in states.items()}
        target = inputs[target_role]
        factors = term_factors(method, inputs, parameters, name) if target.is_floating_point() else None
        weights.append(weight_term(name, target, factors, types, max_rank))
    terms = AdapterTerms(weights)
    target_path = getattr(model, "name_or_path", None) or None
    task_type = "CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else None
    adapter, config = peft_adapter(terms, types, target_path, task_type)
    if out is not None:
        models = {role: "(in memory)" for role in states}
        record = manifest(method, parameters, models, str(target_path), terms, adapter.ranks(), max_rank)
        write_adapter_dir(out, adapter, config, {**record, "written_by": "mergekit_lox.api"})
    return Adapter(config, adapter.state_dict(), terms.left_out(), terms.distance())


def lox_adapter(
    base: StateLike,
    aligned: StateLike,
    alpha: float = 1.25,
    rank: int = 6,
    svd: str = "auto",
    *,
    model: Optional[torch.nn.Module] = None,
    max_rank: Optional[int] = None,
    embeddings: bool = True,
    out: Optional[str] = None,
) -> Adapter:
    """LoX's term ``alpha lowrank_k(W_a - W_b)`` as a PEFT LoRA adapter for the aligned model.

    ``model``: the model it applies to (default: ``aligned``, when that is an nn.Module);
    ``max_rank`` caps each module's rank; ``embeddings=False`` leaves embeddings out;
    ``out``: also write the adapter directory (as `mergekit-lox adapter` does).
    """
    linalg.check_svd_mode(svd)
    parameters = {"alpha": alpha, "rank": rank, "svd": svd}
    states = _states(base=base, aligned=aligned)
    model = aligned if model is None else model
    return _adapter("lox_extrapolate", states, parameters, model, max_rank, embeddings, out)


def lssf_adapter(
    base: StateLike,
    aligned: StateLike,
    finetuned: torch.nn.Module,
    scale: float = 1.0,
    eta: float = 0.9,
    rank: int = 0,
    top_weight: float = 1.0,
    svd: str = "auto",
    subspace: Optional[str] = None,
    *,
    max_rank: Optional[int] = None,
    embeddings: bool = True,
    out: Optional[str] = None,
) -> Adapter:
    """LSSF's term ``scale U' U'^T (W_a - W_b)`` as a PEFT LoRA adapter for ``finetuned``
    (an nn.Module: the model it applies to; its weights do not enter the term)."""
    parameters = {**_lssf_parameters(scale, eta, rank, top_weight, svd), "subspace": subspace}
    states = _states(base=base, aligned=aligned, finetuned=finetuned)
    return _adapter("lssf_fusion", states, parameters, finetuned, max_rank, embeddings, out)


# --------------------------------------------------------------------------- Safe LoRA on a PeftModel


def _lora_target(path: str, layer, what: str) -> tuple:
    """``(module, weight, experts)`` a PeftModel's LoRA layer adapts: an nn.Linear's
    ``<module>.weight``, or for PEFT's ``target_parameters`` (a ParamWrapper: an MoE router or
    expert stack) the parameter itself, with its number of experts (safelora_tools/parameters.py)."""
    from peft.tuners.lora.layer import ParamWrapper

    from mergekit_lox.files.peft import module_name
    from mergekit_lox.safelora_tools.parameters import wrapped_parameter

    module = module_name(path)
    if not isinstance(layer, ParamWrapper):
        return module, module + ".weight", 1
    weight = wrapped_parameter(module, layer, what)
    return weight, weight, layer.num_experts


def apply_safelora(
    peft_model,
    base: StateLike,
    aligned: StateLike,
    threshold: Optional[float] = None,
    num_layers: Optional[int] = None,
    projection: str = "scaled",
    rank: int = 8,
    adapter_name: Optional[str] = None,
    svd: str = "auto",
) -> List:
    """Safe LoRA on a ``PeftModel`` trained on ``aligned``: where the cosine of a
    module's update with its projection is <= ``threshold`` (default 0.5), or for the
    ``num_layers`` lowest, replace ``lora_B`` by ``C lora_B`` in place. The math of
    `mergekit-lox safelora-adapter`; returns its per-module records (cos, projected)."""
    from peft.tuners.lora import LoraLayer

    from mergekit_lox.files.peft import module_name
    from mergekit_lox.safelora_tools.adapter import (
        AdapterModule,
        projection_options,
        refuse_unsupported_options,
        score_module,
        select_modules,
    )

    threshold = projection_options(threshold, num_layers, projection, rank)
    adapter_name = adapter_name or peft_model.active_adapter
    refuse_unsupported_options(
        peft_model.peft_config[adapter_name], f"PeftModel adapter {adapter_name!r}", allowed=("target_parameters",)
    )
    states = _states(base=base, aligned=aligned)
    modules, factors = [], {}
    for path, layer in peft_model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        if adapter_name in layer.lora_embedding_A:
            raise ValueError(
                f"PeftModel module {module_name(path)} is an embedding LoRA; Safe LoRA projects linear ones"
            )
        if adapter_name not in layer.lora_A:
            continue
        module, weight, experts = _lora_target(path, layer, f"PeftModel adapter {adapter_name!r}")
        m = AdapterModule(module, weight, path + ".lora_A", path + ".lora_B", layer.scaling[adapter_name], experts)
        if m.weight not in states["aligned"]:
            raise ValueError(f"PeftModel module {module}: aligned has no weight {m.weight}")
        A, B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        W_b, W_a = states["base"][m.weight], states["aligned"][m.weight]
        if getattr(layer, "fan_in_fan_out", False):  # a Conv1D: B A is the update of W [out, in]
            W_b, W_a = W_b.mT, W_a.mT
        score_module(m, W_b, W_a, A.detach(), B.detach(), projection, rank, ("base", "aligned", "PeftModel"), svd)
        modules.append(m)
        factors[module] = B
    if not modules:
        raise ValueError(f"PeftModel has no linear LoRA modules for adapter {adapter_name!r}")
    select_modules(modules, threshold, num_layers, "the PeftModel")
    with torch.no_grad():
        for m in modules:
            if m.projected:
                factors[m.module].copy_(m.projected_b.to(factors[m.module].dtype))
    return modules
