"""A low-rank term per weight, written as a PEFT LoRA adapter (pure: no files, no models).

Each weight ``W`` of the target model gets ``W + B A`` where ``B @ A`` is the
term the merge method adds. PEFT merges a linear LoRA as
``W += scaling * lora_B @ lora_A`` and an embedding LoRA as
``W += scaling * (lora_embedding_B @ lora_embedding_A)ᵀ``; with
``lora_alpha = r`` for every module (``alpha_pattern`` where a module's rank
differs from ``r``) the scaling is 1, so the stored factors are the term's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from mergekit_lox.files.peft import PEFT_PREFIX, injected_parameter_wrappers
from mergekit_lox.layout import is_conv1d

LINEAR, EMBEDDING = "linear", "embedding"
# A transformers Conv1D (GPT-2): a linear layer stored [in, out]. Its term is computed on the
# linear map W [out, in] (layout.py), so its factors are stored as a linear module's, and
# the adapter sets ``fan_in_fan_out`` (PEFT applies ``(lora_B @ lora_A)ᵀ`` to a Conv1D; it
# sets the flag per module type, so nn.Linear modules of the same adapter stay untransposed).
CONV1D = "conv1d"
LINEAR_KINDS = (LINEAR, CONV1D)
# A 2-D or 3-D parameter of a module that is none of those: a transformers 5 MoE router's
# ``mlp.gate.weight`` and expert stacks ``mlp.experts.gate_up_proj`` / ``down_proj``
# (``[experts, out, in]``). PEFT adapts them through ``target_parameters`` (its ParamWrapper),
# one pair per parameter: for E experts of rank r, ``lora_A [E r, in]`` and ``lora_B [out, r E]``,
# expert e getting ``B.reshape(out, r, E)[:, :, e] @ A.reshape(E, r, in)[e]``.
PARAMETER = "parameter"
CARRIED_KINDS = (*LINEAR_KINDS, EMBEDDING, PARAMETER)


def cap_rank(B: torch.Tensor, A: torch.Tensor, max_rank: int) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-``max_rank`` approximation of ``B @ A``, as factors, and the
    squared Frobenius norm it drops (``sum`` of the dropped singular values squared).

    ``B`` is ``m x r``, ``A`` is ``r x n``; the SVD of ``B A`` comes from two thin
    QRs and the SVD of an ``r x r`` core, never an ``m x n`` matrix. The factors
    come back balanced (``U S^1/2``, ``S^1/2 Vh``). ``r <= max_rank`` returns the
    input unchanged.
    """
    if B.shape[-1] <= max_rank:
        return B, A, 0.0
    Qb, Rb = torch.linalg.qr(B)  # batched over a stack's leading dimensions
    Qa, Ra = torch.linalg.qr(A.mT)
    Uc, Sc, Vhc = torch.linalg.svd(Rb @ Ra.mT)
    root = Sc[..., :max_rank].sqrt()
    capped_B = (Qb @ Uc[..., :, :max_rank]) * root.unsqueeze(-2)
    capped_A = root.unsqueeze(-1) * (Vhc[..., :max_rank, :] @ Qa.mT)
    return capped_B, capped_A, float(Sc[..., max_rank:].double().square().sum())


def term_norm_squared(B: torch.Tensor, A: torch.Tensor) -> float:
    """``||B A||_F^2 = <BᵀB, A Aᵀ>`` (r x r products only), in float64."""
    B, A = B.double(), A.double()
    return float(((B.mT @ B) * (A @ A.mT)).sum())


@dataclass
class LoraAdapter:
    """PEFT LoRA modules, each with the factors of its term (``B @ A`` in the weight's layout)."""

    factors: Dict[str, Tuple[str, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # PARAMETER entries: parameter name -> the PEFT module path its pair is saved under
    # (``parameter_stems``: two parameters of one module nest, one under ``...base_layer``).
    parameter_stems: Dict[str, str] = field(default_factory=dict)

    def add(self, module: str, kind: str, B: torch.Tensor, A: torch.Tensor) -> None:
        """``module``: the module name; for PARAMETER, the parameter's full name."""
        if kind not in CARRIED_KINDS:
            raise ValueError(f"module {module}: PEFT LoRA adapts linear or embedding modules, not {kind!r}")
        self.factors[module] = (kind, B.detach().float().cpu(), A.detach().float().cpu())

    def ranks(self) -> Dict[str, int]:
        """Rank per module and per parameter (a stack: the largest of its experts', padded)."""
        return {module: B.shape[-1] for module, (_, B, _) in self.factors.items()}

    def parameters(self) -> List[str]:
        return sorted(name for name, (kind, _, _) in self.factors.items() if kind == PARAMETER)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """PEFT's own key names (as ``get_peft_model_state_dict`` saves them)."""
        tensors = {}
        r = max(self.ranks().values())
        for module, (kind, B, A) in sorted(self.factors.items()):
            stem = PEFT_PREFIX + module
            if kind == PARAMETER:  # padded to r (zero columns add nothing), PEFT's layout
                stem = PEFT_PREFIX + self.parameter_stems[module]
                pad = r - B.shape[-1]
                B = torch.nn.functional.pad(B, (0, pad))
                A = torch.nn.functional.pad(A, (0, 0, 0, pad))
                if B.ndim == 3:
                    experts, out_features, _ = B.shape
                    A = A.reshape(experts * r, A.shape[-1])
                    B = B.permute(1, 2, 0).reshape(out_features, r * experts)
                tensors[stem + ".lora_A.weight"] = A.contiguous()
                tensors[stem + ".lora_B.weight"] = B.contiguous()
            elif kind in LINEAR_KINDS:
                tensors[stem + ".lora_A.weight"] = A.contiguous()
                tensors[stem + ".lora_B.weight"] = B.contiguous()
            else:  # an embedding stores (B_e @ A_e)ᵀ: A_e = Bᵀ (r x vocab), B_e = Aᵀ (dim x r)
                tensors[stem + ".lora_embedding_A"] = B.mT.contiguous()
                tensors[stem + ".lora_embedding_B"] = A.mT.contiguous()
        return tensors

    def config_fields(self) -> Dict[str, object]:
        """``LoraConfig`` arguments: scaling 1 everywhere (``lora_alpha`` = r per module)."""
        ranks = self.ranks()
        if not ranks:
            raise ValueError("the adapter has no modules")
        r = max(ranks.values())
        parameters = self.parameters()
        modules = {module: rank for module, rank in ranks.items() if module not in parameters}
        # Exact names: PEFT reads pattern keys as regular expressions matched at the end.
        # Parameters are padded to r: they need no pattern.
        pattern = {re.escape(module): rank for module, rank in sorted(modules.items()) if rank != r}
        extra = {"target_parameters": parameters} if parameters else {}
        return {
            "r": r,
            "lora_alpha": r,
            "target_modules": sorted(modules),
            **extra,
            "rank_pattern": pattern,
            "alpha_pattern": dict(pattern),
            "lora_dropout": 0.0,
            "fan_in_fan_out": any(kind == CONV1D for kind, _, _ in self.factors.values()),
            "bias": "none",
            "use_rslora": False,
            "init_lora_weights": True,
        }

    def lora_config(self, base_model_name_or_path: Optional[str] = None, task_type: Optional[str] = None):
        from peft import LoraConfig

        return LoraConfig(base_model_name_or_path=base_model_name_or_path, task_type=task_type, **self.config_fields())


def module_kinds(model: torch.nn.Module) -> Tuple[Dict[str, str], List[str]]:
    """``{weight name: LINEAR | CONV1D | EMBEDDING | PARAMETER | why not}`` for every module
    weight of ``model`` (``nn.Linear``, transformers' ``Conv1D``, ``nn.Embedding``, a router's
    weight or an expert stack, anything else with a ``weight``),
    and the weight names tied to another (input embeddings shared with the
    output head), which an adapter leaves out."""
    kinds: Dict[str, str] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        kind = kind_of_module(module)
        if kind is not None and isinstance(weight, torch.nn.Parameter):
            kinds[name + ".weight"] = kind
        elif isinstance(weight, torch.nn.Parameter) and weight.ndim not in (2, 3):
            kinds[name + ".weight"] = f"a {type(module).__name__} module, which PEFT LoRA does not adapt here"
        if kind is None and not isinstance(module, torch.nn.modules.conv._ConvNd):
            kinds.update(_parameter_kinds(name, module))
    tied = []
    inputs, outputs = _embeddings(model)
    if inputs is not None and outputs is not None and inputs.weight is outputs.weight:
        tied = [n + ".weight" for n, m in model.named_modules() if m is inputs or m is outputs]
    return kinds, tied


def _parameter_kinds(name: str, module) -> Dict[str, str]:
    """PARAMETER (PEFT's ``target_parameters``) for a module's own ``weight`` matrix (an MoE
    router) and its 3-D expert stacks ``[experts, out, in]``; why not for a stack stored
    ``[experts, in, out]`` (GPT-OSS), which PEFT's ParamWrapper reads in another layout."""
    kinds = {}
    for parameter_name, parameter in module.named_parameters(recurse=False):
        full = f"{name}.{parameter_name}" if name else parameter_name
        if parameter.ndim == 3 and getattr(module, "is_transposed", False):
            kinds[full] = "an expert stack stored [experts, in, out], which this adapter does not write"
        elif parameter.ndim == 3 or (parameter.ndim == 2 and parameter_name == "weight"):
            kinds[full] = PARAMETER
    return kinds


def kind_of_module(module) -> Optional[str]:
    """LINEAR, CONV1D or EMBEDDING for the modules PEFT LoRA adapts as modules, else None."""
    if isinstance(module, torch.nn.Linear):
        return LINEAR
    if is_conv1d(module):
        return CONV1D
    if isinstance(module, torch.nn.Embedding):
        return EMBEDDING
    return None


def parameter_stems(meta_model: torch.nn.Module, config) -> Dict[str, str]:
    """``{parameter name: PEFT module path of its pair}`` for ``config``'s
    ``target_parameters``, read from PEFT itself (files/peft.injected_parameter_wrappers)."""
    wrappers = injected_parameter_wrappers(meta_model, config)
    return {parameter: path for path, (parameter, _) in wrappers.items()}


def _embeddings(model):
    try:
        return model.get_input_embeddings(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None, None


def adapter_kind(name: str, shape, kinds: Dict[str, str], tied: List[str], embeddings: bool, arch: str) -> str:
    """LINEAR, CONV1D, EMBEDDING or PARAMETER when the term of weight ``name`` can be in the
    adapter, else why it is left out (one phrase)."""
    kind = kinds.get(name)
    if len(shape) > 2 and kind != PARAMETER:
        if kind and kind not in CARRIED_KINDS:
            return kind
        return f"a {len(shape)}-D stack of matrices (PEFT LoRA adapts 2-D weights)"
    if kind is None:
        return f"no nn.Linear or nn.Embedding module, nor a parameter PEFT adapts, of that name in {arch}"
    if name in tied:
        return (
            "tied to "
            + " and ".join(t for t in tied if t != name)
            + " (PEFT would apply an embedding LoRA to the input embeddings only)"
        )
    if kind == EMBEDDING and not embeddings:
        return "an embedding, left out by --no-embeddings"
    return kind


def module_of(weight: str, kind: str = LINEAR) -> str:
    """The adapter's key for weight ``weight``: its module, or a PARAMETER's own name."""
    return weight if kind == PARAMETER else weight[: -len(".weight")]
