"""`mergekit-lox adapter RECIPE -o ADAPTER_DIR`: a recipe's low-rank term as a PEFT LoRA adapter."""

from __future__ import annotations

import os
from typing import Callable, Optional

import yaml

from mergekit_lox.adapters.files import write_adapter_dir
from mergekit_lox.adapters.recipe import AdapterRecipe, read_adapter_recipe, target_reference
from mergekit_lox.adapters.terms import TARGET_ROLE, AdapterError, term_factors
from mergekit_lox.adapters.weights import AdapterTerms, ModuleTypes, weight_term


def module_types(config, embeddings: bool = True, trust_remote_code: bool = False) -> ModuleTypes:
    """The target model's module types, from its architecture built on the meta device
    (transformers; no weights are read or allocated)."""
    import torch
    import transformers

    from mergekit_lox.adapters.lora import module_kinds
    from mergekit_lox.errors import one_line

    arch = (config.architectures or [type(config).__name__])[0]
    model_class = getattr(transformers, arch, None)
    try:
        with torch.device("meta"):
            if model_class is not None:
                model = model_class(config)
            else:
                model = transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as error:  # noqa: BLE001 - any failure means we cannot tell module types
        raise AdapterError(f"cannot build architecture {arch} to read its module types: {one_line(error)}") from error
    kinds, tied = module_kinds(model)
    return ModuleTypes(kinds, tied, arch, embeddings, meta_model=lambda: _meta_model(model_class, config))


def _meta_model(model_class, config):
    """The architecture built again on the meta device (PEFT injects into it in place)."""
    import torch
    import transformers

    with torch.device("meta"):
        if model_class is not None:
            return model_class(config)
        return transformers.AutoModelForCausalLM.from_config(config)


# What PEFT 0.21 does to a LoRA on a module named like a transformers-v4 expert projection.
CONVERTED_BY_PEFT = (
    "PEFT converts a LoRA on a module of this name into one on the expert stacks (its compatibility with "
    "transformers v4 checkpoints of this model type), so it cannot carry this module's term"
)


def peft_adapter(terms: AdapterTerms, types: ModuleTypes, target_path, task_type):
    """``(LoraAdapter, LoraConfig)`` of ``terms``, as PEFT will load it.

    On MoE model types whose layout changed in transformers 5 (Qwen-MoE, GLM-4-MoE,
    DeepSeek-V3, ...), PEFT reads a ``target_modules`` entry named like a v4 expert projection
    (``gate_proj``, ``up_proj``, ``down_proj``, ``gate``) as the expert stacks and drops the
    module, also from a dense layer or a shared expert, where it is an nn.Linear: such modules
    are left out (named, with their share of the term) rather than written into an adapter
    PEFT would load otherwise."""
    adapter = terms.adapter()
    config = adapter.lora_config(target_path, task_type)
    dropped = converted_by_peft(config, types)
    if dropped:
        terms.leave_out({f"{module}.weight" for module in dropped}, CONVERTED_BY_PEFT)
        adapter = terms.adapter()
        config = adapter.lora_config(target_path, task_type)
    locate_parameters(adapter, config, types)
    return adapter, config


def converted_by_peft(config, types: ModuleTypes) -> list:
    """The ``target_modules`` PEFT's transformers-v5 conversion would take out of ``config``."""
    import copy

    if types.meta_model is None or not config.target_modules:
        return []
    try:
        from peft.utils.transformers_weight_conversion import (
            convert_peft_config_for_transformers,
            get_model_conversion_mapping,
        )
    except ImportError:  # a PEFT without the transformers-v5 conversion converts nothing
        return []

    model = types.meta_model()
    converted = copy.deepcopy(config)
    convert_peft_config_for_transformers(converted, model=model, conversions=get_model_conversion_mapping(model))
    kept = set(converted.target_modules or ())
    return sorted(module for module in config.target_modules if module not in kept)


def locate_parameters(adapter, config, types: ModuleTypes) -> None:
    """Where PEFT saves the pair of each parameter the adapter carries (a router, an expert
    stack: ``target_parameters``), read from PEFT injected into the meta model."""
    from mergekit_lox.adapters.lora import parameter_stems

    if not adapter.parameters():
        return
    try:
        adapter.parameter_stems = parameter_stems(types.meta_model(), config)
    except Exception as error:  # noqa: BLE001 - PEFT raises many kinds; say what it could not do
        from mergekit_lox.errors import one_line

        raise AdapterError(
            f"PEFT cannot adapt parameter(s) {', '.join(adapter.parameters()[:3])} of {types.arch} "
            f"through target_parameters: {one_line(error)}"
        ) from error
    missing = [name for name in adapter.parameters() if name not in adapter.parameter_stems]
    if missing:
        raise AdapterError(f"PEFT does not adapt parameter {missing[0]} of {types.arch} through target_parameters")


def _target_path(reference, lora_merge_cache: Optional[str]) -> str:
    """What the adapter applies to: a local directory (absolute), a hub id, or the
    merged `model+adapter` in the LoRA merge cache."""
    from mergekit_lox.mergekit_compat import lora_cache_name

    if reference.lora is not None:
        return os.path.join(os.path.abspath(lora_merge_cache), lora_cache_name(reference))
    path = reference.model.path
    return os.path.abspath(path) if os.path.isdir(path) else path


def _guard_output(chosen: AdapterRecipe, out: str, lora_merge_cache: str) -> None:
    from mergekit_lox.adapters.files import refuse_to_replace
    from mergekit_lox.files.output import OutputError, config_input_dirs, refuse_inside_inputs

    inputs = [*config_input_dirs(chosen.config), *chosen.stages.values()]
    try:
        refuse_inside_inputs(out, inputs)
        refuse_inside_inputs(lora_merge_cache, inputs)  # merged copies are written there
        if os.path.isdir(lora_merge_cache):
            refuse_inside_inputs(out, [lora_merge_cache])
    except OutputError as error:
        raise AdapterError(f"{chosen.recipe}: {error}") from None
    refuse_to_replace(out)


def _per_weight(chosen: AdapterRecipe, target, types: ModuleTypes, max_rank, require_complete):
    """The computation run on every planned tensor (see ``planned_tensor_results``)."""
    from mergekit_lox.methods import role_requirement
    from mergekit_lox.methods.inputs import ALIGNED, role_tensors

    requirement = role_requirement(chosen.method)
    target_role = TARGET_ROLE[chosen.method]

    def compute(group, input_parameters, parameters):
        roles = {e.id: input_parameters[e.id]["role"] for e in group.non_base}
        inputs = role_tensors(requirement, group, roles)
        name = group.metadata.name
        models = requirement.resolve(roles, where=name)
        if models[target_role] != target:
            raise AdapterError(f"recipe {chosen.recipe}: tensor {name} gives role {target_role} to another model")
        factors = term_factors(chosen.method, inputs, parameters, name, models[ALIGNED])
        return weight_term(name, inputs[target_role], factors, types, max_rank, require_complete)

    return compute


def _manifest(chosen: AdapterRecipe, target_path: str, terms: AdapterTerms, ranks, max_rank, svd_counts) -> dict:
    from mergekit_lox.adapters.files import manifest

    final = next(d for d in chosen.documents if len(chosen.documents) == 1 or "name" not in d)
    roles = {"base": str(chosen.config.base_model)}
    for model in chosen.config.models or []:
        roles[(model.parameters or {}).get("role") or TARGET_ROLE[chosen.method]] = str(model.model)
    parameters = dict(final.get("parameters") or {})
    return manifest(
        chosen.method,
        parameters,
        roles,
        target_path,
        terms,
        ranks,
        max_rank,
        recipe=os.path.abspath(chosen.recipe),
        document=yaml.safe_dump(final, sort_keys=False),
        stages=chosen.stages,
        svd=svd_counts,
    )


def write_recipe_adapter(
    recipe: str,
    out: str,
    *,
    max_rank: Optional[int] = None,
    require_complete: bool = False,
    embeddings: bool = True,
    intermediate_dir: Optional[str] = None,
    lora_merge_cache: Optional[str] = None,
    device: str = "cpu",
    echo: Callable[[str], None] = print,
) -> AdapterTerms:
    """Compute the term of ``recipe``'s (final) ``lox_extrapolate`` / ``lssf_fusion``
    document as mergekit would, weight by weight, and write it to ``out`` as a PEFT
    LoRA adapter for the model the term is added to. Returns the weights' terms."""
    from mergekit.options import MergeOptions

    from mergekit_lox import linalg
    from mergekit_lox.mergekit_compat import planned_tensor_results
    from mergekit_lox.run.lora_cache import default_lora_merge_cache, merge_loras

    if max_rank is not None and max_rank < 1:
        raise AdapterError(f"--max-rank must be at least 1, got {max_rank}")
    chosen = read_adapter_recipe(recipe, intermediate_dir)
    lora_merge_cache = lora_merge_cache or default_lora_merge_cache(out)
    _guard_output(chosen, out, lora_merge_cache)
    target = target_reference(chosen)
    types = module_types(target.config(), embeddings)
    merge_loras([yaml.safe_load(chosen.config.to_yaml())], lora_merge_cache)
    target_path = _target_path(target, lora_merge_cache)

    options = MergeOptions(lora_merge_cache=lora_merge_cache, device=device, quiet=True)
    before = linalg.svd_counts()
    compute = _per_weight(chosen, target, types, max_rank, require_complete)
    planner_config = chosen.config.model_copy(deep=True)  # mergekit's planner rewrites `models:` in place
    terms = AdapterTerms([term for _, term in planned_tensor_results(planner_config, options, compute, "adapter")])
    after = linalg.svd_counts()
    svd_counts = {path: after[path] - before[path] for path in after}
    task_type = "CAUSAL_LM" if types.arch.endswith("ForCausalLM") else None
    adapter, config = peft_adapter(terms, types, target_path, task_type)
    if require_complete and terms.left_out():
        name, why = next(iter(terms.left_out().items()))
        raise AdapterError(f"weight {name} cannot be part of the adapter: {why} (--require-complete)")
    manifest = _manifest(chosen, target_path, terms, adapter.ranks(), max_rank, svd_counts)
    config.revision = target.model.revision
    write_adapter_dir(out, adapter, config, manifest)

    low, high = min(adapter.ranks().values()), config.r
    span = f"rank {low}" if low == high else f"rank {low} to {high}"
    echo(f"{chosen.method}: {len(adapter.ranks())} LoRA module(s), {span} (scaling 1), for {target_path}")
    for line in terms.lines():
        echo(line)
    echo(f"wrote {out}")
    return terms
