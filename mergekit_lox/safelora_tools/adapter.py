"""`safelora-adapter`: project a PEFT LoRA adapter itself (B' = C B)."""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from mergekit_lox import linalg
from mergekit_lox.files.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, module_name
from mergekit_lox.methods import safelora
from mergekit_lox.methods.inputs import finite_or_none, require_finite_tensor
from mergekit_lox.safelora_tools.common import (
    ADAPTER_REPORT,
    LORA_A,
    LORA_B,
    UNSUPPORTED_LORA_OPTIONS,
    SafeLoRAToolError,
    Scored,
    echo_selection,
    refuse_inside,
    select_lowest,
)
from mergekit_lox.safelora_tools.parameters import expert_factors, parameter_targets, stacked_b


@dataclass
class AdapterModule:
    """One LoRA module: ``dW = scaling * B @ A`` on ``weight`` of the model."""

    module: str  # e.g. model.layers.0.self_attn.q_proj
    weight: str  # e.g. model.layers.0.self_attn.q_proj.weight
    key_a: str
    key_b: str
    scaling: float
    experts: int = 1  # > 1: PEFT's LoRA on an expert stack, one (B_e, A_e) per expert (parameters.py)
    cos: Optional[float] = None
    projected_b: Optional[torch.Tensor] = None
    projected: bool = False


def read_lora_config(adapter: str):
    from peft import LoraConfig, PeftConfig

    if not os.path.isfile(os.path.join(adapter, ADAPTER_CONFIG)):
        raise SafeLoRAToolError(f"adapter {adapter} has no {ADAPTER_CONFIG}: not a PEFT adapter directory")
    try:
        config = PeftConfig.from_pretrained(adapter)
    except Exception as error:  # noqa: BLE001 - PEFT raises many kinds; say which file
        raise SafeLoRAToolError(f"cannot read {os.path.join(adapter, ADAPTER_CONFIG)}: {error}") from error
    if not isinstance(config, LoraConfig):
        raise SafeLoRAToolError(f"adapter {adapter} is a {config.peft_type} adapter; safelora-adapter needs LoRA")
    # target_parameters (routers, MoE expert stacks) is read by parameters.parameter_targets
    refuse_unsupported_options(config, f"adapter {adapter}", allowed=("target_parameters",))
    return config


def refuse_unsupported_options(config, what: str, allowed: Tuple[str, ...] = ()) -> None:
    """Plain LoRA on linear layers only: refuse the LoraConfig options that change what (A, B) mean."""
    for option in UNSUPPORTED_LORA_OPTIONS:
        if option not in allowed and getattr(config, option, None):
            raise SafeLoRAToolError(
                f"{what} uses {option}={getattr(config, option)!r}, which Safe LoRA's adapter projection does "
                "not support (plain LoRA on linear layers only); merge it and use safelora_project instead"
            )


def module_scaling(config, module: str, r: int) -> float:
    """PEFT's ``scaling``: lora_alpha / r (or / sqrt(r) with rsLoRA), per-module patterns."""
    from peft.utils.other import get_pattern_key

    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
    return alpha / math.sqrt(r) if config.use_rslora else alpha / r


def adapter_modules(adapter: str, config, tensors: Mapping[str, torch.Tensor], targets=None) -> List[AdapterModule]:
    """Pair every lora_A with its lora_B; refuse any tensor that is not such a pair.
    ``targets``: ``parameters.parameter_targets``, the pairs that adapt a parameter."""
    from peft.utils.other import get_pattern_key

    modules = []
    for key in tensors:
        if key.endswith(LORA_B):
            continue
        if not key.endswith(LORA_A):
            raise SafeLoRAToolError(
                f"adapter {adapter}: tensor {key} is not a lora_A/lora_B weight; "
                "safelora-adapter supports plain LoRA on linear layers only"
            )
        stem = key[: -len(LORA_A)]
        key_b = stem + LORA_B
        if key_b not in tensors:
            raise SafeLoRAToolError(f"adapter {adapter}: {key} has no matching {key_b}")
        module = module_name(stem)
        A, B = tensors[key], tensors[key_b]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise SafeLoRAToolError(
                f"adapter {adapter}: module {module} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}, "
                "not a linear LoRA pair (B: out x r, A: r x in)"
            )
        r = A.shape[0]
        target = (targets or {}).get(module)
        if target is not None:  # a parameter PEFT adapts: its rank (per expert) and scaling are PEFT's
            if r != target.rank * target.experts:
                raise SafeLoRAToolError(
                    f"adapter {adapter}: parameter {target.weight} has a LoRA of {r} rows for "
                    f"{target.experts} expert(s) but its config says r={target.rank}"
                )
            # named by the parameter (PEFT's module of an inner pair is ...experts.base_layer)
            modules.append(AdapterModule(target.weight, target.weight, key, key_b, target.scaling, target.experts))
            continue
        expected_r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
        if r != expected_r:
            raise SafeLoRAToolError(
                f"adapter {adapter}: module {module} has rank {r} but its config says r={expected_r}"
            )
        modules.append(AdapterModule(module, module + ".weight", key, key_b, module_scaling(config, module, r)))
    for key in tensors:
        if key.endswith(LORA_B) and key[: -len(LORA_B)] + LORA_A not in tensors:
            raise SafeLoRAToolError(f"adapter {adapter}: {key} has no matching lora_A")
    if not modules:
        raise SafeLoRAToolError(f"adapter {adapter}: {ADAPTER_WEIGHTS} holds no LoRA modules")
    return modules


def _model_loader(path: str, label: str):
    """The checkpoint in the layout transformers loads and the merges read (Mixtral's
    block_sparse_moe.gate as mlp.gate, per-expert matrices as fused stacks), which is the
    layout a LoRA trained with transformers 5 names."""
    from mergekit_lox.mergekit_compat import ConvertedCheckpoint

    try:
        return ConvertedCheckpoint(path, as_merged=False)
    except Exception as error:  # noqa: BLE001 - mergekit raises RuntimeError/FileNotFoundError
        raise SafeLoRAToolError(f"{label} model {path}: {error}") from error


def _load(loader, name: str, label: str, path: str, module: str, device: str) -> torch.Tensor:
    if name not in loader:
        raise SafeLoRAToolError(f"tensor {name} (adapter module {module}) not found in {label} model {path}")
    return loader.get(name, device=device)


def score_adapter_modules(
    base: str,
    aligned: str,
    modules: Sequence[AdapterModule],
    tensors: Mapping[str, torch.Tensor],
    projection: str,
    rank: int,
    device: str = "cpu",
    adapter: str = "adapter",
    svd: str = "auto",
) -> None:
    """Fill each module's cosine and C B, loading one base/aligned weight pair at a time.

    A Conv1D weight (stored ``[in, out]``; PEFT's LoRA on it is ``fan_in_fan_out``, its
    ``B A`` the ``[out, in]`` update) is read transposed, so that C acts on the layer's
    output space as on an nn.Linear (layout.py)."""
    from mergekit_lox.layout import transposed_weights_at

    transposed = transposed_weights_at(aligned)
    base_loader = _model_loader(base, "base")
    aligned_loader = _model_loader(aligned, "aligned")
    for m in modules:
        W_b = _load(base_loader, m.weight, "base", base, m.module, device)
        W_a = _load(aligned_loader, m.weight, "aligned", aligned, m.module, device)
        if m.weight in transposed:
            W_b, W_a = W_b.mT, W_a.mT
        A = tensors[m.key_a].to(device)
        B = tensors[m.key_b].to(device)
        score_module(m, W_b, W_a, A, B, projection, rank, (base, aligned, adapter), svd)
        del W_b, W_a
    base_loader.flush()
    aligned_loader.flush()


def score_module(m: AdapterModule, W_b, W_a, A, B, projection: str, rank: int, sources, svd: str = "auto") -> None:
    """Fill ``m.cos`` and ``m.projected_b`` = C B for one LoRA module (``sources``:
    where base, aligned and the adapter come from, for error messages; ``svd``: how
    ``projection: orthogonal`` finds U_k, as the recipe parameter of that name)."""
    base, aligned, adapter = sources
    for tensor, name, source, kind in (
        (W_b, m.weight, base, "model"),
        (W_a, m.weight, aligned, "model"),
        (A, m.key_a, adapter, "adapter"),
        (B, m.key_b, adapter, "adapter"),
    ):
        require_finite_tensor(tensor, name, source, kind)
    if m.experts > 1:
        A, B = expert_factors(A, B, m.experts)
    if W_a.shape != W_b.shape or W_a.shape != (*B.shape[:-1], A.shape[-1]):
        raise SafeLoRAToolError(
            f"module {m.module}: base {tuple(W_b.shape)}, aligned {tuple(W_a.shape)} and "
            f"LoRA B A {(*B.shape[:-1], A.shape[-1])} shapes differ"
        )
    dtype = functools.reduce(torch.promote_types, map(linalg.compute_dtype, (W_a, W_b, A, B)))
    alignment = W_a.to(dtype) - W_b.to(dtype)
    update = m.scaling * (B.to(dtype) @ A.to(dtype))
    cos, _ = safelora.update_cosine(alignment, update, projection, rank, svd)
    m.cos = finite_or_none(cos)
    # C B with the same C: merged, s (C B) A = C dW, the kernel's projected update.
    m.projected_b = safelora.project_update(alignment, B.to(dtype), projection, rank, svd).cpu()
    if m.experts > 1:  # each expert's C_e B_e, back in PEFT's [out, r E]
        m.projected_b = stacked_b(m.projected_b)


def projection_options(threshold: Optional[float], num_layers: Optional[int], projection: str, rank: int):
    """Check the Safe LoRA options; the threshold to use (0.5 unless num_layers is given)."""
    if threshold is not None and num_layers is not None:
        raise SafeLoRAToolError("give --threshold or --num-layers, not both")
    from mergekit_lox.methods.describe import option_value

    # The rules of safelora_project's own parameters: nan / inf / rank 0 are refused as in a recipe.
    try:
        option_value(safelora.NAME, "projection", projection, "--projection")
        option_value(safelora.NAME, "rank", rank, "--rank")
        if threshold is not None:
            threshold = option_value(safelora.NAME, "threshold", threshold, "--threshold")
    except ValueError as error:
        raise SafeLoRAToolError(str(error)) from None
    return 0.5 if threshold is None and num_layers is None else threshold


def select_modules(
    modules: Sequence[AdapterModule],
    threshold: Optional[float],
    num_layers: Optional[int],
    what: str,
    *,
    accuracy: float = 0.0,
    warn=None,
) -> Tuple[float, List[Scored]]:
    """Mark the modules Safe LoRA projects (``cos <= threshold``, or the ``num_layers``
    lowest); returns the threshold used and the selected modules, lowest cosine first.
    ``warn(message)`` names each module whose cosine lies within ``accuracy`` of a given
    threshold (number mode: select_lowest's warning), whose decision another CPU's BLAS
    path, a GPU or another dtype may take the other way."""
    scored = [Scored(m.module, m.cos) for m in modules if m.cos is not None]
    if num_layers is not None:
        threshold, _ = select_lowest(scored, num_layers, what, accuracy=accuracy, warn=warn)
    elif warn is not None:
        for s in scored:
            if abs(s.cos - threshold) <= accuracy:
                warn(
                    f"warning: {what}: module {s.name}: cosine {s.cos:.8g} is within {accuracy:.0e} (the cosine's "
                    f"accuracy) of the threshold {threshold!r}: another CPU, GPU or dtype may decide it the other way"
                )
    selected = sorted((s for s in scored if s.cos <= threshold), key=lambda s: (s.cos, s.name))
    chosen = {s.name for s in selected}
    for m in modules:
        m.projected = m.module in chosen
    return threshold, selected


def write_adapter(adapter: str, out: str, tensors: Dict[str, torch.Tensor], metadata, report: dict) -> None:
    """Write the projected adapter completely into a staging folder, then move it to ``out``."""
    from safetensors.torch import save_file

    from mergekit_lox.files.output import copy_plain_files, staged_output

    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise SafeLoRAToolError(f"output {out} already exists and is not an empty directory")
    with staged_output(out) as staging:
        os.makedirs(staging)
        for name in copy_plain_files(adapter, staging, skip=(ADAPTER_WEIGHTS,)):
            print(
                f"warning: {os.path.join(adapter, name)} is a link to a file outside the adapter folder: not copied",
                file=sys.stderr,
            )
        save_file(tensors, os.path.join(staging, ADAPTER_WEIGHTS), metadata=metadata)
        with open(os.path.join(staging, ADAPTER_REPORT), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, allow_nan=False)  # undefined cosines are null already


def safelora_adapter(
    base: str,
    aligned: str,
    adapter: str,
    out: str,
    *,
    threshold: Optional[float] = None,
    num_layers: Optional[int] = None,
    projection: str = "scaled",
    rank: int = 8,
    svd: str = "auto",
    device: str = "cpu",
    echo: Callable[[str], None] = print,
) -> List[AdapterModule]:
    """Project a PEFT LoRA adapter trained on ``aligned``; write a PEFT adapter to ``out``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    threshold = projection_options(threshold, num_layers, projection, rank)
    for path, label in ((base, "base model"), (aligned, "aligned model"), (adapter, "adapter")):
        if not os.path.isdir(path):
            raise SafeLoRAToolError(f"{label} {path} is not a directory")
    refuse_inside(out, [("base model", base), ("aligned model", aligned), ("adapter", adapter)])

    config = read_lora_config(adapter)
    weights = os.path.join(adapter, ADAPTER_WEIGHTS)
    if not os.path.isfile(weights):
        raise SafeLoRAToolError(f"adapter {adapter} has no {ADAPTER_WEIGHTS} (only safetensors adapters are supported)")
    tensors = load_file(weights)
    with safe_open(weights, framework="pt") as f:
        metadata = f.metadata() or {"format": "pt"}
    modules = adapter_modules(adapter, config, tensors, parameter_targets(config, aligned, adapter))
    score_adapter_modules(base, aligned, modules, tensors, projection, rank, device, adapter, svd)

    accuracy = safelora.cosine_accuracy(projection, svd)
    threshold, selected = select_modules(
        modules, threshold, num_layers, f"adapter {adapter}", accuracy=accuracy, warn=echo
    )
    output = dict(tensors)
    for m in modules:
        if m.projected:
            output[m.key_b] = m.projected_b.to(tensors[m.key_b].dtype).contiguous()

    report = {
        "base_model": base,
        "aligned_model": aligned,
        "adapter": adapter,
        "projection": projection,
        "rank": rank,
        "svd": svd,
        "threshold": threshold,
        "num_layers": num_layers,
        "modules": [
            {"module": m.module, "scaling": m.scaling, "cos": m.cos, "projected": m.projected} for m in modules
        ],
    }
    write_adapter(adapter, out, output, metadata, report)
    echo(f"threshold {threshold!r}: {len(selected)} of {len(modules)} LoRA modules projected (B' = C B)")
    echo_selection(selected, num_layers or len(selected), "module", echo)
    echo(f"wrote {out}")
    return modules
