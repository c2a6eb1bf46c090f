"""Float64 evaluation of whole recipes, chains included, in NumPy.

Independent of mergekit and of our kernels: models are read with
``safetensors.numpy``, LoRA adapters are folded in by hand (W + alpha/r B A),
chain references are resolved by document name, and every method is the
formula of reference.py (ours) or of mergekit's documentation (task
arithmetic, TIES), so a recipe's real output can be compared tensor by tensor.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

import numpy as np
import reference as ref
import yaml
from safetensors.numpy import load_file

State = Dict[str, np.ndarray]


def load_model(path: str) -> State:
    state: State = {}
    for filename in sorted(os.listdir(path)):
        if filename.endswith(".safetensors"):
            state.update({k: v.astype(np.float64) for k, v in load_file(os.path.join(path, filename)).items()})
    return state


def fold_lora(state: State, adapter_dir: str) -> State:
    """W + (lora_alpha / r) B A for every module the PEFT adapter targets."""
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        config = json.load(f)
    scaling = config["lora_alpha"] / config["r"]
    tensors = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    out = dict(state)
    for key, A in tensors.items():
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
        B = tensors[key.replace(".lora_A.", ".lora_B.")]
        name = module + ".weight"
        out[name] = state[name] + scaling * (B.astype(np.float64) @ A.astype(np.float64))
    return out


def setting(value: Any, tensor: str):
    """A scalar or mergekit `{filter, value}` conditions (no gradients here)."""
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        for condition in value:
            if condition.get("filter") in (None, "*") or condition["filter"] in tensor:
                return condition["value"]
        return None
    return value


def ties(base, deltas32, deltas, weights, densities, normalize=True, lam=1.0):
    """mergekit's TIES: magnitude-prune each task vector, elect signs by weighted sum.

    The top-k selection is made on the float32 deltas mergekit sees, so both
    pick the same entries; everything else is float64.
    """
    kept = []
    for d32, d64, w, density in zip(deltas32, deltas, weights, densities, strict=True):
        if density < 1:
            k = max(1, int(density * d32.size))
            mask = np.zeros(d32.size)
            mask[np.argsort(-np.abs(d32).ravel(), kind="stable")[:k]] = 1
            d64 = d64 * mask.reshape(d64.shape)
        kept.append(w * d64)
    D = np.stack(kept)
    W = np.array(weights, dtype=np.float64).reshape((-1,) + (1,) * base.ndim)
    majority = np.where(D.sum(axis=0) >= 0, 1.0, -1.0)
    agree = np.sign(D) == majority
    mixed = (D * agree).sum(axis=0)
    if normalize:
        divisor = (W * agree).sum(axis=0)
        divisor[divisor == 0] = 1
        mixed = mixed / divisor
    return base + lam * mixed


class RecipeEvaluator:
    """Evaluates every document of a (substituted, all-local) recipe file."""

    def __init__(self, recipe_path: str):
        with open(recipe_path) as f:
            self.documents = [d for d in yaml.safe_load_all(f)]
        self.by_name = {d["name"]: d for d in self.documents if "name" in d}
        self.results: Dict[Optional[str], State] = {}
        self.raw32: Dict[str, State] = {}

    def model(self, reference: str) -> State:
        path, _, lora = reference.partition("+")
        state = self.output(path) if path in self.by_name else load_model(path)
        return fold_lora(state, lora) if lora else state

    def output(self, name: Optional[str]) -> State:
        if name not in self.results:
            doc = self.by_name[name] if name else next(d for d in self.documents if "name" not in d)
            self.results[name] = self.evaluate(doc)
        return self.results[name]

    def evaluate(self, doc: dict) -> State:
        method = doc["merge_method"]
        base = self.model(doc["base_model"])
        models = [(m["model"], m.get("parameters") or {}) for m in doc["models"]]
        top = doc.get("parameters") or {}
        if method in ("lox_extrapolate", "lssf_fusion", "safelora_project", "safemerge"):
            return self._ours(method, base, models, top)
        if method in ("task_arithmetic", "ties", "dare_linear"):
            return self._task_vectors(method, doc["base_model"], base, models, top)
        raise NotImplementedError(method)

    def _ours(self, method, base: State, models, top) -> State:
        by_role = {}
        for reference, params in models:
            by_role[params.get("role", "aligned")] = self.model(reference)
        out = {}
        for name, W_b in base.items():
            p = {k: setting(v, name) for k, v in top.items()}
            W_a = by_role["aligned"][name]
            if method == "lox_extrapolate":
                out[name] = ref.lox(W_a, W_b, p.get("alpha", 1.25), p.get("rank", 6))
            elif method == "lssf_fusion":
                out[name] = ref.lssf(
                    by_role["finetuned"][name],
                    W_a,
                    W_b,
                    p.get("scale", 1.0),
                    p.get("eta", 0.9),
                    p.get("rank", 0),
                    p.get("top_weight", 1.0),
                )
            elif method == "safemerge":
                out[name] = ref.safemerge(
                    by_role["finetuned"][name],
                    by_role["safety"][name],
                    W_a,
                    W_b,
                    p.get("threshold", 0.35),
                    p.get("safety_weight", 0.2),
                    p.get("projection", "scaled"),
                    p.get("rank", 8),
                )
            else:
                out[name] = ref.safelora(
                    by_role["finetuned"][name],
                    W_a,
                    W_b,
                    p.get("threshold", 0.5),
                    p.get("projection", "scaled"),
                    p.get("rank", 8),
                )
        return out

    def _task_vectors(self, method, base_reference, base: State, models, top) -> State:
        inputs = [(self.model(r), params) for r, params in models if r != base_reference]
        base32 = {k: v.astype(np.float32) for k, v in base.items()}
        out = {}
        for name, W_b in base.items():
            p = {k: setting(v, name) for k, v in top.items()}
            weights = [setting(params["weight"], name) for _, params in inputs]
            deltas = [state[name] - W_b for state, _ in inputs]
            if method == "dare_linear":
                # Density 1 keeps every entry (and rescales by 1): task arithmetic.
                assert all(setting(params.get("density", 1.0), name) == 1.0 for _, params in inputs)
            if method in ("task_arithmetic", "dare_linear"):
                mixed = sum(w * d for w, d in zip(weights, deltas, strict=True))
                if p.get("normalize", False):
                    mixed = mixed / sum(weights)
                out[name] = W_b + p.get("lambda", 1.0) * mixed
            else:
                deltas32 = [state[name].astype(np.float32) - base32[name] for state, _ in inputs]
                densities = [setting(params.get("density", 1.0), name) for _, params in inputs]
                out[name] = ties(
                    W_b,
                    deltas32,
                    deltas,
                    weights,
                    densities,
                    normalize=p.get("normalize", True),
                    lam=p.get("lambda", 1.0),
                )
        return out


def stage_names(recipe_path: str) -> List[Optional[str]]:
    with open(recipe_path) as f:
        return [d.get("name") for d in yaml.safe_load_all(f)]
