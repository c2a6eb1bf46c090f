"""Does a LoRA adapter fit the model it is applied to? (`model+adapter` references)

When mergekit folds an adapter into its model (PEFT's ``merge_and_unload``),
PEFT wraps the modules named by the adapter's ``target_modules`` that it finds
and silently skips stored LoRA weights for modules the model does not have:
an adapter meant for another architecture, or with a renamed module, merges
"successfully" with part of it missing. `adapter_mismatch` compares the
adapter with the model before anything runs, reading only
``adapter_config.json`` and tensor names (safetensors headers, mergekit's own
index of the model), never a tensor.
"""

from __future__ import annotations

import json
import os
import re
from typing import Dict, Iterable, List, Optional, Set, Tuple

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


# Anything a plain LoRA stores for a module: lora_A/lora_B (+ embedding/DoRA variants).
def module_name(stored: str) -> str:
    """A stored module path without PEFT's ``base_model.model.`` wrapper prefix."""
    return stored[len(PEFT_PREFIX) :] if stored.startswith(PEFT_PREFIX) else stored


def wrapped_parameter_name(path: str, wrapper) -> str:
    """The parameter (``owner.name``) a PEFT ``ParamWrapper`` at module ``path`` adapts
    (``target_parameters``): two parameters of one module nest, the inner wrapper under
    ``...base_layer``."""
    owner = path
    while owner.endswith(".base_layer"):
        owner = owner[: -len(".base_layer")]
    return f"{owner}.{wrapper.parameter_name}"


def injected_parameter_wrappers(meta_model, config) -> Dict[str, Tuple[str, object]]:
    """``{PEFT module path: (parameter name, ParamWrapper)}`` for each parameter ``config``'s
    ``target_parameters`` adapts, read from PEFT itself: ``config`` (a LoraConfig, copied,
    in inference mode) injected into ``meta_model`` (on the meta device, changed in place)."""
    import copy

    from peft import inject_adapter_in_model
    from peft.tuners.lora.layer import ParamWrapper

    config = copy.deepcopy(config)
    config.inference_mode = True
    model = inject_adapter_in_model(config, meta_model, adapter_name="default")
    return {
        path: (wrapped_parameter_name(path, module), module)
        for path, module in model.named_modules()
        if isinstance(module, ParamWrapper)
    }


_LORA_KEY = re.compile(r"^(?P<module>.+?)\.lora_(?:A|B|embedding_A|embedding_B|magnitude_vector)\b")


def model_modules(model_dir: str) -> Set[str]:
    """Module names of a local model: its tensor names without the parameter suffix."""
    from mergekit.io.lazy_tensor_loader import ShardedTensorIndex

    names = ShardedTensorIndex.from_disk(model_dir).tensor_paths
    return {name.rsplit(".", 1)[0] for name in names if "." in name}


def adapter_weight_modules(adapter_dir: str) -> Optional[List[str]]:
    """Modules the adapter's safetensors file holds LoRA weights for (None: no such file)."""
    path = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    if not os.path.isfile(path):
        return None
    from safetensors import safe_open

    modules = []
    with safe_open(path, framework="pt") as f:
        for key in f.keys():
            match = _LORA_KEY.match(key)
            if match:
                module = module_name(match.group("module"))
                if module not in modules:
                    modules.append(module)
    return modules


def _present(module: str, modules: Set[str]) -> bool:
    # Checkpoints may save a head model ("model.layers.0...") or a bare one
    # ("layers.0..."): accept a match up to one leading wrapper.
    return module in modules or any(m.endswith("." + module) or module.endswith("." + m) for m in modules)


def _unmatched_targets(targets, modules: Set[str]) -> List[str]:
    """PEFT's matching rule: a list entry matches a module it equals or ends
    (``.q_proj``); a string is a regular expression on the full name."""
    if targets is None or targets == "all-linear":
        return []
    if isinstance(targets, str):
        return [] if any(re.fullmatch(targets, m) for m in modules) else [targets]
    return [t for t in targets if not any(m == t or m.endswith("." + t) for m in modules)]


def _some(names: Iterable[str], limit: int = 3) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def adapter_mismatch(model_dir: str, adapter_dir: str) -> Optional[str]:
    """Why the adapter does not fit the model, in one line; None when it fits
    (or when either side cannot be read: other checks report that)."""
    try:
        with open(os.path.join(adapter_dir, ADAPTER_CONFIG), "r", encoding="utf-8") as f:
            config = json.load(f)
        modules = model_modules(model_dir)
        stored = adapter_weight_modules(adapter_dir)
    except Exception:  # noqa: BLE001 - unreadable files are reported by other checks
        return None
    if not isinstance(config, dict):
        return None
    missing = [m for m in stored or () if not _present(m, modules)]
    unmatched = _unmatched_targets(config.get("target_modules"), modules)
    if not missing and not unmatched:
        return None
    parts = []
    if missing:
        parts.append(
            f"holds LoRA weights for {len(missing)} module(s) that model {model_dir} does not have: {_some(missing)}"
        )
    if unmatched:
        parts.append(f"its target_modules {_some(unmatched)} match no module of model {model_dir}")
    return (
        f"adapter {adapter_dir} does not fit: "
        + "; ".join(parts)
        + " (PEFT would skip them silently): use the adapter trained on this model"
    )
