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

from mergekit_lox.files.peft import PEFT_PREFIX
from mergekit_lox.layout import is_conv1d

LINEAR, EMBEDDING = "linear", "embedding"
# A transformers Conv1D (GPT-2): a linear layer stored [in, out]. Its term is computed on the
# linear map W [out, in] (layout.py), so its factors are stored as a linear module's, and
# the adapter sets ``fan_in_fan_out`` (PEFT applies ``(lora_B @ lora_A)ᵀ`` to a Conv1D; it
# sets the flag per module type, so nn.Linear modules of the same adapter stay untransposed).
CONV1D = "conv1d"
LINEAR_KINDS = (LINEAR, CONV1D)


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
    Qb, Rb = torch.linalg.qr(B)
    Qa, Ra = torch.linalg.qr(A.mT)
    Uc, Sc, Vhc = torch.linalg.svd(Rb @ Ra.mT)
    root = Sc[:max_rank].sqrt()
    capped_B = (Qb @ Uc[:, :max_rank]) * root
    capped_A = root.unsqueeze(-1) * (Vhc[:max_rank] @ Qa.mT)
    return capped_B, capped_A, float(Sc[max_rank:].double().square().sum())


def term_norm_squared(B: torch.Tensor, A: torch.Tensor) -> float:
    """``||B A||_F^2 = <BᵀB, A Aᵀ>`` (r x r products only), in float64."""
    B, A = B.double(), A.double()
    return float(((B.mT @ B) * (A @ A.mT)).sum())


@dataclass
class LoraAdapter:
    """PEFT LoRA modules, each with the factors of its term (``B @ A`` in the weight's layout)."""

    factors: Dict[str, Tuple[str, torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def add(self, module: str, kind: str, B: torch.Tensor, A: torch.Tensor) -> None:
        if kind not in (*LINEAR_KINDS, EMBEDDING):
            raise ValueError(f"module {module}: PEFT LoRA adapts linear or embedding modules, not {kind!r}")
        self.factors[module] = (kind, B.detach().float().cpu(), A.detach().float().cpu())

    def ranks(self) -> Dict[str, int]:
        return {module: B.shape[-1] for module, (_, B, _) in self.factors.items()}

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """PEFT's own key names (as ``get_peft_model_state_dict`` saves them)."""
        tensors = {}
        for module, (kind, B, A) in sorted(self.factors.items()):
            stem = PEFT_PREFIX + module
            if kind in LINEAR_KINDS:
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
        # Exact names: PEFT reads pattern keys as regular expressions matched at the end.
        pattern = {re.escape(module): rank for module, rank in sorted(ranks.items()) if rank != r}
        return {
            "r": r,
            "lora_alpha": r,
            "target_modules": sorted(ranks),
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
    """``{weight name: LINEAR | CONV1D | EMBEDDING | why not}`` for every module weight of
    ``model`` (``nn.Linear``, transformers' ``Conv1D``, ``nn.Embedding``, anything else with a ``weight``),
    and the weight names tied to another (input embeddings shared with the
    output head), which an adapter leaves out."""
    kinds: Dict[str, str] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.nn.Parameter):
            continue
        if isinstance(module, torch.nn.Linear):
            kinds[name + ".weight"] = LINEAR
        elif is_conv1d(module):
            kinds[name + ".weight"] = CONV1D
        elif isinstance(module, torch.nn.Embedding):
            kinds[name + ".weight"] = EMBEDDING
        else:
            kinds[name + ".weight"] = f"a {type(module).__name__} module, which PEFT LoRA does not adapt here"
    tied = []
    inputs, outputs = _embeddings(model)
    if inputs is not None and outputs is not None and inputs.weight is outputs.weight:
        tied = [n + ".weight" for n, m in model.named_modules() if m is inputs or m is outputs]
    return kinds, tied


def _embeddings(model):
    try:
        return model.get_input_embeddings(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None, None


def adapter_kind(name: str, shape, kinds: Dict[str, str], tied: List[str], embeddings: bool, arch: str) -> str:
    """LINEAR, CONV1D or EMBEDDING when the term of weight ``name`` can be an adapter module,
    else why it is left out (one phrase)."""
    if len(shape) > 2:
        return f"a {len(shape)}-D stack of matrices (PEFT LoRA adapts 2-D weights)"
    kind = kinds.get(name)
    if kind is None:
        return f"no nn.Linear or nn.Embedding module of that name in {arch}"
    if name in tied:
        return (
            "tied to "
            + " and ".join(t for t in tied if t != name)
            + " (PEFT would apply an embedding LoRA to the input embeddings only)"
        )
    if kind == EMBEDDING and not embeddings:
        return "an embedding, left out by --no-embeddings"
    return kind


def module_of(weight: str) -> str:
    return weight[: -len(".weight")]
