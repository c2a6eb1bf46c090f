"""The methods whose term can be an adapter, and that term as factors (the kernels' own functions)."""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

import torch

from mergekit_lox.methods.inputs import ALIGNED, FINETUNED, warn_tied_rank


class AdapterError(ValueError):
    """An adapter cannot be written as asked; the message names the recipe, model, option or tensor."""


# The model whose weights the method adds its term to: the adapter applies to it.
TARGET_ROLE = {"lox_extrapolate": ALIGNED, "lssf_fusion": FINETUNED}


def adapter_methods() -> Dict[str, object]:
    """Method name -> module, for the methods that declare ``ADAPTER = True``."""
    from mergekit_lox.methods import method_modules

    return {m.NAME: m for m in method_modules() if getattr(m, "ADAPTER", False)}


def term_factors(
    method: str,
    inputs: Mapping[str, torch.Tensor],
    parameters: Mapping[str, object],
    name: Optional[str] = None,
    aligned_model=None,
) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``(B, A)`` with ``B @ A`` = the term ``method`` adds to weight ``name`` (compute
    dtype), or None for a weight it leaves as it is (fewer than 2 dimensions).

    ``inputs`` are the kernel's inputs by role (``base``, ``aligned``[, ``finetuned``]);
    ``parameters`` the method's resolved parameters for this weight. An LSSF
    ``subspace`` is read as the kernel reads it (``aligned_model``: the aligned
    model's mergekit reference, to check the subspace was calibrated on it).
    """
    module = adapter_methods()[method]
    target = inputs[TARGET_ROLE[method]]
    if target.ndim < 2:
        return None
    # A term that rounding decides (a tie at a fixed rank, an automatic rank on the rule's
    # boundary) is reported as the kernels report it, naming the weight.
    if method == "lox_extrapolate":
        B, A, tied = module.lox_factors_with_ties(
            inputs[ALIGNED], inputs["base"], parameters["alpha"], parameters["rank"], parameters["svd"]
        )
        warn_tied_rank(method, name, tied, parameters["rank"])
        return B, A
    terms = module.fusion_terms(
        inputs[ALIGNED], inputs["base"], **lssf_arguments(parameters, name, aligned_model, target.shape)
    )
    module.warn_undetermined(name, terms.ranks, terms.close, parameters["rank"])
    return terms.B, terms.A


def lssf_arguments(parameters: Mapping[str, object], name: Optional[str], aligned_model, shape) -> Dict[str, object]:
    """The keyword arguments of ``lssf.fusion_factors`` / ``lssf.fuse`` for one weight: its
    parameters, and its calibrated basis when ``subspace`` is set (read and checked as
    the kernel does; None where the subspace does not cover the weight)."""
    from mergekit_lox.methods import lssf

    basis = None
    if parameters.get("subspace") is not None and len(shape) >= 2:
        basis = lssf._calibrated_basis(parameters["subspace"], name, aligned_model, tuple(shape))
    return {"basis": basis, **{key: parameters[key] for key in ("scale", "eta", "rank", "top_weight", "svd")}}
