"""Which weights a model stores transposed: transformers' ``Conv1D`` (GPT-2 and its family).

A linear layer computes ``y = W x`` with ``W [out, in]`` (``nn.Linear.weight``). GPT-2's
``Conv1D`` computes ``y = x W_s + b`` and stores ``W_s = Wᵀ [in, out]``. The methods whose
math has a side act on the layer's output space, as their papers write it for ``W [out, in]``:

- Safe LoRA and SafeMERGE: ``C dW`` with ``C = V Vᵀ / ||V||`` (``out x out``);
- LSSF with a calibrated subspace: ``U' U'ᵀ tau`` with ``U`` the left singular vectors of
  ``Z = W X`` (the layer's outputs);
- PEFT LoRA: ``lora_B [out, r] @ lora_A [r, in]``, applied transposed to a Conv1D
  (``fan_in_fan_out``).

On a stored Conv1D weight the same formulas would project its input space instead. So every
kernel sees a weight as the linear map ``W [out, in]`` (methods/inputs.role_tensors gives it
``W_sᵀ`` and writes the result back transposed), and so do lssf-calibrate, the adapters,
safelora-adapter and analyze. LoX and data-free LSSF are transposition-invariant (the SVD of
``Wᵀ`` is that of ``W`` transposed), so their results do not change.

Which weights are Conv1D is read from the model transformers builds from the config, on the
meta device (no memory, no weights read), once per config; model types whose transformers
modeling file never mentions Conv1D (Llama, Mistral, Qwen, ... all but the GPT-2 family) are
known to have none without building anything.
"""

from __future__ import annotations

import functools
import os
import threading
from typing import Dict, FrozenSet, Optional


def is_conv1d(module) -> bool:
    """transformers' ``Conv1D`` (``pytorch_utils.Conv1D``): a linear layer stored ``[in, out]``."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - every transformers we support has it
        return False
    return isinstance(module, Conv1D)


def transposed_names(model) -> FrozenSet[str]:
    """The weight names of ``model``'s Conv1D modules, also without the base model's prefix
    (``transformer.h.0.attn.c_attn.weight`` and ``h.0.attn.c_attn.weight``: GPT-2
    checkpoints are saved either way, and mergekit's definition lists both)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    names = set()
    for name, module in model.named_modules():
        if is_conv1d(module):
            names.add(f"{name}.weight")
            if prefix and name.startswith(prefix + "."):
                names.add(f"{name[len(prefix) + 1 :]}.weight")
    return frozenset(names)


_BY_CONFIG: Dict[str, FrozenSet[str]] = {}
_BY_CONFIG_LOCK = threading.Lock()


def _may_use_conv1d(model_type: str) -> bool:
    """False when transformers' modeling file of ``model_type`` never mentions Conv1D: read as
    text, without importing transformers (building even a meta model imports the whole
    modeling module; analyze runs within a memory bound)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("transformers")
        module = model_type.replace("-", "_")
        path = os.path.join(os.path.dirname(spec.origin), "models", module, f"modeling_{module}.py")
        if not os.path.isfile(path):
            return True  # named otherwise (openai-gpt: openai): build the model to know
        with open(path, encoding="utf-8") as f:
            return "Conv1D" in f.read()
    except Exception:  # noqa: BLE001 - anything unusual: build the model to know
        return True


def _build_transposed(config) -> FrozenSet[str]:
    import torch
    import transformers

    if not _may_use_conv1d(config.model_type):
        return frozenset()

    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
        try:
            with torch.device("meta"):
                return transposed_names(auto.from_config(config))
        except Exception:  # noqa: BLE001 - not that kind of model (or none transformers builds)
            continue
    return frozenset()


def transposed_weights(config) -> FrozenSet[str]:
    """Names of the weights the model of ``config`` (a transformers ``PretrainedConfig``)
    stores as ``[in, out]``; empty for models without Conv1D (Llama, Mistral, Qwen, ...)."""
    if not getattr(config, "model_type", None):
        return frozenset()
    key = config.to_json_string(use_diff=False)
    with _BY_CONFIG_LOCK:
        if key not in _BY_CONFIG:
            _BY_CONFIG[key] = _build_transposed(config)
        return _BY_CONFIG[key]


def saved_model_type(model_dir: str) -> Optional[str]:
    """The ``model_type`` of the model saved in ``model_dir`` (its config.json, read as JSON:
    nothing imported); None when there is no config.json, or it is unreadable or names none."""
    import json

    try:
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return model_type if isinstance(model_type, str) and model_type else None


def transposed_weights_at(model_dir: str) -> FrozenSet[str]:
    """``transposed_weights`` of the model saved in the local folder ``model_dir`` (or a hub id
    in the local cache); empty when it has no readable config.json."""
    if os.path.isfile(os.path.join(model_dir, "config.json")):
        model_type = saved_model_type(model_dir)
        if model_type is None or not _may_use_conv1d(model_type):
            return frozenset()
    elif os.path.isdir(model_dir):
        return frozenset()
    from transformers import AutoConfig

    return transposed_weights(AutoConfig.from_pretrained(model_dir))


@functools.lru_cache(maxsize=256)
def _reference_transposed(reference, stamp: Optional[float]) -> FrozenSet[str]:
    try:
        config = reference.config(trust_remote_code=False)
    except Exception:  # noqa: BLE001 - a model mergekit itself will load or refuse: nothing known
        return frozenset()
    return transposed_weights(config)


def stored_transposed(reference, name: Optional[str]) -> bool:
    """Whether tensor ``name`` of the model behind ``reference`` (a mergekit
    ``ModelReference``; anything else, as in the Python API's tensor groups, is not) is
    stored transposed. Cached per reference and its config.json's modification time."""
    if name is None or not name.endswith(".weight") or not hasattr(reference, "config"):
        return False
    path = getattr(getattr(reference, "model", None), "path", None)
    config_file = os.path.join(path, "config.json") if isinstance(path, str) else None
    stamp = os.path.getmtime(config_file) if config_file and os.path.isfile(config_file) else None
    try:
        return name in _reference_transposed(reference, stamp)
    except TypeError:  # an unhashable reference: look it up uncached
        return name in _reference_transposed.__wrapped__(reference, stamp)
