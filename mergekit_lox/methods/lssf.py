"""`lssf_fusion`: Low-Rank Safety Subspace Fusion (LSSF), ACL 2025 / arXiv 2602.00038.

After fine-tuning, add the principal components of the safety vector back to the
fine-tuned weights, in a weighted low-rank subspace whose rank each matrix picks
from its safety singular value entropy (docs/methods.md section 2, the paper's Eqs. 5-13):

    tau = W_a - W_b = U diag(S) Vh              (data-free: the subspace of tau itself)
    p_i = S_i^2 / sum_j S_j^2,  h_i = -p_i ln p_i,  H_r = sum_{i<=r} h_i,  H = H_n
    r   = rank (> 0, clamped), else the smallest r with H_r >= eta H (1 when H == 0)
    a_i = 1 + (top_weight - 1) (S_i - S_r) / (S_1 - S_r)   (i <= r; 1 when S_1 == S_r)
    U'  = U[:, :r] diag(a)
    out = W_f + scale U' U'^T tau               (ndim >= 2; W_f otherwise)

Calibrated mode (``subspace: DIR``, the paper's Eq. 4): U and S of a linear weight
come from the activations of the aligned model (`mergekit-lox lssf-calibrate`,
methods/subspace.py); the rank rule, weights and fusion are the same. A weight the
subspace does not cover falls back to the data-free subspace, and is counted.

The paper publishes no code; docs/lssf.md says where this is a reading.
"""

from __future__ import annotations

import atexit
import logging
import sys
import threading
from typing import Dict, List, NamedTuple, Optional, Tuple

import annotated_types
import torch
from mergekit.merge_methods.base import (
    BasePolicy,
    InputContract,
    PerNonBase,
    TensorGroup,
)
from mergekit.merge_methods.easy_define import merge_method
from pydantic import AfterValidator, AllowInfNan, FiniteFloat, NonNegativeInt
from typing_extensions import Annotated

from mergekit_lox import linalg
from mergekit_lox.methods import subspace as subspace_files
from mergekit_lox.methods.inputs import (
    ALIGNED,
    FINETUNED,
    RoleRequirement,
    owned_result,
    role_tensors,
    warn_low_precision,
    warn_tied_rank,
)
from mergekit_lox.methods.registration import register_method

NAME = "lssf_fusion"
ROLES = RoleRequirement(NAME, (ALIGNED, FINETUNED))
# The term this method adds can be written as a PEFT LoRA adapter (`mergekit-lox adapter`).
ADAPTER = True

# The entropy retention threshold. The paper's published text we could read does not
# state the value of its experiments (its readings put it at 0.8-0.9); 0.9 is
# docs/methods.md's fallback default (docs/lssf.md).
DEFAULT_ETA = 0.9

# annotated_types constraints (pydantic validates them) so that `mergekit-lox methods`
# and `check` can show the bounds (methods/describe.type_name reads gt/ge/le).
Eta = Annotated[float, annotated_types.Interval(gt=0, le=1)]
TopWeight = Annotated[float, annotated_types.Ge(1), AllowInfNan(False)]
SubspaceDir = Annotated[str, AfterValidator(subspace_files.validate_directory)]

log = logging.getLogger(__name__)

# A basis and its spectrum from a calibrated subspace: U [m, k], S [min(m, n)].
Basis = Tuple[torch.Tensor, torch.Tensor]


class FusionFactors(NamedTuple):
    """``B @ A = scale U' U'^T tau`` per matrix, and the rank r each matrix got.

    2-D: ``B [m, r]``, ``A [r, n]``, ``ranks`` a 0-d tensor. Stacks (``[..., m, n]``):
    padded to the largest rank of the stack, ``B [..., m, r_max]``, ``A [..., r_max, n]``,
    with the columns of B and rows of A past a matrix's own rank exactly zero;
    ``ranks [...]`` says each matrix's rank. Both float32 (float64 for float64 input).
    ``close [...]``: True where the automatic rank is within rounding of the rule's
    boundary (linalg.EntropyTopK), so another BLAS path or device may choose another,
    or where a fixed rank's ``s_k`` ties ``s_{k+1}`` (linalg.GuardedTopK.tied); False
    for a calibrated subspace (its stored values decide alike everywhere).
    """

    B: torch.Tensor
    A: torch.Tensor
    ranks: torch.Tensor
    close: torch.Tensor


# --------------------------------------------------------------------------- the rank rule


def spectrum_ranks(S: torch.Tensor, shape, eta: float) -> torch.Tensor:
    """LSSF's automatic rank per matrix (Eqs. 5-7) from singular values ``S [..., n]``
    of ``shape = (m, n)`` matrices (linalg.energy_entropy_ranks).

    Singular values at or below ``S_1 max(m, n) eps`` (eps of ``S``'s dtype:
    torch.linalg.matrix_rank's cutoff) are rounding noise of a lower-rank matrix and
    count as zero. Computed in float64; stays on the device.
    """
    return linalg.energy_entropy_ranks(S, shape, eta)


def _ranks(S: torch.Tensor, shape, eta: float, rank: int) -> torch.Tensor:
    if rank > 0:
        fixed = min(rank, shape[-2], shape[-1])
        return torch.full(S.shape[:-1], fixed, dtype=torch.int64, device=S.device)
    return spectrum_ranks(S, shape, eta)


def direction_weights(S: torch.Tensor, ranks: torch.Tensor, top_weight: float) -> torch.Tensor:
    """``a_i`` (Eqs. 10-11) for the leading values ``S [..., k]``, zero past each rank."""
    k = S.shape[-1]
    keep = torch.arange(k, device=S.device) < ranks.unsqueeze(-1)
    S = S.to(torch.float64)
    s_1 = S[..., :1]
    s_r = S.gather(-1, (ranks - 1).clamp(0, k - 1).unsqueeze(-1))
    span = s_1 - s_r
    share = torch.where(span > 0, (S - s_r) / torch.where(span > 0, span, 1.0), 0.0)
    return torch.where(keep, 1 + (top_weight - 1) * share, 0.0)


# --------------------------------------------------------------------------- factors


def _largest(ranks: torch.Tensor) -> int:
    """The widest rank of a stack: the one host synchronisation per tensor."""
    return int(ranks.max()) if ranks.numel() else 1


def _data_free_factors(tau: torch.Tensor, scale: float, eta: float, rank: int, top_weight: float, svd: str):
    """Factors from the SVD of tau itself. A fixed rank takes the top-k triplets by
    ``svd``'s path (linalg.guarded_top_k); the automatic rank needs the spectrum, which
    linalg.energy_entropy_top_k gets without a full SVD where it can show the rank,
    then the top-r triplets by the certified path (else one exact SVD)."""
    if rank > 0:
        width = min(rank, linalg.full_rank_of(tau))
        guarded = linalg.guarded_top_k(tau, width, svd)
        (U, S, Vh), close = guarded.factors, guarded.tied
        ranks = torch.full(tau.shape[:-2], width, dtype=torch.int64, device=tau.device)
    else:
        (U, S, Vh), ranks, close = linalg.energy_entropy_top_k(tau, eta, svd)
        width = _largest(ranks)
    U, S, Vh = U[..., :width], S[..., :width], Vh[..., :width, :]
    a = direction_weights(S, ranks, top_weight).to(tau.dtype)
    # U' U'^T tau = U diag(a) diag(a) U^T U diag(S) Vh = U diag(a^2 S) Vh on the kept directions.
    return FusionFactors(scale * U * a.unsqueeze(-2), (a * S).unsqueeze(-1) * Vh, ranks, close)


def _calibrated_factors(tau: torch.Tensor, basis: Basis, scale: float, eta: float, rank: int, top_weight: float):
    """Factors from a calibrated basis ``(U [m, k], S [min(m, n)])`` of a 2-D weight."""
    U, S = (t.to(device=tau.device, dtype=tau.dtype) for t in basis)
    ranks = _ranks(S, tau.shape, eta, rank).clamp(max=U.shape[-1])
    width = _largest(ranks)
    U = U[:, :width] * direction_weights(S[:width], ranks, top_weight).to(tau.dtype)
    return FusionFactors(scale * U, U.mT @ tau, ranks, torch.zeros_like(ranks, dtype=torch.bool))


def check_basis(name, basis: Basis, shape, where: str = "the subspace") -> None:
    """Refuse a calibrated basis that does not fit weight ``name`` of ``shape``."""
    U, S = basis
    if len(shape) != 2:
        raise ValueError(f"{where} has a basis for tensor {name}, which has {len(shape)} dimensions (expected 2)")
    m, n = shape
    if U.ndim != 2 or U.shape[0] != m or S.ndim != 1 or S.shape[0] != min(m, n) or U.shape[1] > min(m, n):
        raise ValueError(
            f"{where}: the basis of tensor {name} has shape {tuple(U.shape)} with {tuple(S.shape)} singular "
            f"values, but the weight is {m} x {n} (expected [{m}, k] and {min(m, n)} values): "
            "the subspace was calibrated on another model"
        )


def fusion_terms(
    aligned: torch.Tensor,
    base: torch.Tensor,
    *,
    scale: float = 1.0,
    eta: float = DEFAULT_ETA,
    rank: int = 0,
    top_weight: float = 1.0,
    basis: Optional[Basis] = None,
    svd: linalg.SvdMode = "auto",
) -> FusionFactors:
    """The low-rank term ``scale U' U'^T tau`` of a >= 2-D weight as factors and ranks.

    ``basis``: a calibrated ``(U, S)`` (2-D weights only); None = data-free.
    """
    linalg.check_svd_mode(svd)
    if aligned.ndim < 2:
        raise ValueError(f"LSSF factors need a tensor with 2 or more dimensions, got shape {tuple(aligned.shape)}")
    dtype = linalg.compute_dtype(aligned)
    tau = aligned.to(dtype) - base.to(dtype)
    if basis is not None:
        check_basis("(given)", basis, tuple(tau.shape), "basis")
        return _calibrated_factors(tau, basis, scale, eta, rank, top_weight)
    return _data_free_factors(tau, scale, eta, rank, top_weight, svd)


def fusion_factors(aligned: torch.Tensor, base: torch.Tensor, **parameters) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` with ``B @ A = scale U' U'^T tau``: ``B = scale U'``, ``A = U'^T tau``.

    ``parameters``: those of ``fusion_terms`` (``scale``, ``eta``, ``rank``,
    ``top_weight``, ``basis``, ``svd``). What the merge adds to ``W_f``, as a
    LoRA-shaped pair (the kernel adds exactly this product). 2-D: rank r of that
    matrix. Stacks: padded to the stack's largest rank (see FusionFactors;
    ``fusion_terms`` also returns the ranks).
    """
    terms = fusion_terms(aligned, base, **parameters)
    return terms.B, terms.A


def _plain_automatic(parameters: dict) -> bool:
    """Data-free, automatic rank, top_weight 1, ``svd: auto``: the merge needs only the term."""
    return (
        parameters.get("basis") is None
        and parameters.get("rank", 0) == 0
        and parameters.get("top_weight", 1.0) == 1.0
        and parameters.get("svd", "auto") == "auto"
    )


def fuse(finetuned: torch.Tensor, aligned: torch.Tensor, base: torch.Tensor, **parameters) -> torch.Tensor:
    """The pure LSSF formula; returns the result in ``finetuned``'s dtype.

    ``parameters``: those of ``fusion_terms``. A zero safety vector needs no special
    case: its factors are zero (r = 1, S = 0) and the output is ``W_f`` exactly.
    """
    return fuse_with_ranks(finetuned, aligned, base, **parameters)[0]


def fuse_with_ranks(finetuned: torch.Tensor, aligned: torch.Tensor, base: torch.Tensor, **parameters):
    """``(fuse(...), ranks, close)``: the result, the rank of each matrix and where that rank
    is within rounding of the rule's boundary (FusionFactors.close); None, None for 1-D."""
    if finetuned.ndim < 2:
        return finetuned, None, None
    dtype = linalg.compute_dtype(finetuned)
    if _plain_automatic(parameters):
        # top_weight 1: U' U'^T tau = lowrank_r(tau), which the Gram path forms through
        # the complement when r passes half the smaller side (linalg.energy_entropy_lowrank).
        tau = aligned.to(dtype) - base.to(dtype)
        term, ranks, close = linalg.energy_entropy_lowrank(tau, parameters.get("eta", DEFAULT_ETA), "auto")
        merged = torch.add(finetuned.to(dtype), term, alpha=parameters.get("scale", 1.0))
        return merged.to(finetuned.dtype), ranks, close
    terms = fusion_terms(aligned, base, **parameters)
    return linalg.add_product(finetuned.to(dtype), terms.B, terms.A).to(finetuned.dtype), terms.ranks, terms.close


def warn_undetermined(name, ranks: Optional[torch.Tensor], close: Optional[torch.Tensor], rank: int) -> None:
    """Report FusionFactors.close for tensor ``name``: with a fixed ``rank``, a tie at it
    (inputs.warn_tied_rank); with the automatic rank, the rule's boundary."""
    if rank > 0:
        warn_tied_rank(NAME, name, close, rank)
    else:
        warn_close_ranks(name, ranks, close)


def warn_close_ranks(name, ranks: Optional[torch.Tensor], close: Optional[torch.Tensor]) -> None:
    """Warn, naming the tensor, where its automatic rank is within rounding of the rule's
    boundary: the rule is the paper's and cannot be moved off it, so it is reported."""
    if close is None or not bool(close.any()):
        return
    where = torch.nonzero(close.reshape(-1)).squeeze(-1).tolist()
    chosen = ranks.reshape(-1)[where].tolist()
    matrices = "" if close.ndim == 0 else f" (matrices {where[:4]}{' ...' if len(where) > 4 else ''} of the stack)"
    log.warning(
        "%s: tensor %s%s: the automatic rank %s is within rounding of the eta rule's boundary: "
        "another CPU's BLAS path, a GPU or another dtype may choose the next rank",
        NAME,
        name,
        matrices,
        chosen[0] if len(set(chosen)) == 1 else chosen,
    )


# --------------------------------------------------------------------------- calibrated subspaces in a run

# Weight names by subspace and kind, for this process (dicts: insertion-ordered sets, so a
# second run with the same subspace, as in `sweep` or `demo`, counts each weight once).
_COVERAGE: Dict[str, Dict[str, Dict[str, None]]] = {}
_COVERAGE_LOCK = threading.Lock()
_REPORT_AT_EXIT: List[bool] = []
_CHECKED_MODELS: Dict[Tuple[str, str], Optional[str]] = {}


def _record(path: str, kind: str, name: str) -> None:
    with _COVERAGE_LOCK:
        if not _REPORT_AT_EXIT:
            _REPORT_AT_EXIT.append(True)
            atexit.register(_report_coverage)
        kinds = _COVERAGE.setdefault(path, {"calibrated": {}, "data-free": {}, "clamped": {}})
        kinds[kind][name] = None


def subspace_coverage() -> Dict[str, Dict[str, List[str]]]:
    """Per subspace used in this process: weights fused with the calibrated basis
    (``calibrated``), weights it does not cover (``data-free``), and weights whose
    rank the rule wanted above the stored basis width (``clamped``, also calibrated)."""
    with _COVERAGE_LOCK:
        return {path: {k: list(v) for k, v in kinds.items()} for path, kinds in _COVERAGE.items()}


def reset_subspace_coverage() -> None:
    with _COVERAGE_LOCK:
        _COVERAGE.clear()


def coverage_lines() -> List[str]:
    """One line per subspace used: what `mergekit-lox run` and `mergekit-yaml` print at exit."""
    lines = []
    for path, kinds in subspace_coverage().items():
        fallback = kinds["data-free"]
        line = (
            f"lssf_fusion: subspace {path}: {len(kinds['calibrated'])} weight(s) fused in the calibrated "
            f"subspace, {len(fallback)} in the data-free subspace (not covered"
            + (f": {', '.join(fallback[:4])}{' ...' if len(fallback) > 4 else ''})" if fallback else ")")
        )
        if kinds["clamped"]:
            line += f"; {len(kinds['clamped'])} wanted a rank above the stored basis (lssf-calibrate --max-rank)"
        lines.append(line)
    return lines


def _report_coverage() -> None:
    for line in coverage_lines():
        print(line, file=sys.stderr)


def _model_path(reference) -> Optional[str]:
    model = getattr(reference, "model", None)
    path = getattr(model, "path", None)
    return path if isinstance(path, str) and getattr(reference, "lora", None) is None else None


def calibrated_basis(path: str, name, aligned_id, shape) -> Optional[Basis]:
    """The basis of weight ``name`` (of ``shape``) in subspace ``path``, read and checked as
    the kernel reads it; None when the subspace does not cover the weight (counted).

    ``aligned_id``: the aligned model's mergekit reference (its local path is checked
    against the subspace's model; other ids are not checked)."""
    if name is None:
        raise ValueError(f"lssf_fusion: subspace {path} needs tensor names (merge through a recipe)")
    model = _model_path(aligned_id)
    if model is not None:
        key = (path, model)
        if key not in _CHECKED_MODELS:
            _CHECKED_MODELS[key] = subspace_files.mismatch(path, model)
        if _CHECKED_MODELS[key]:
            raise ValueError(f"lssf_fusion: {_CHECKED_MODELS[key]}")
    basis = subspace_files.reader(path).get(name)
    if basis is None:
        log.info("lssf_fusion: subspace %s does not cover %s: data-free subspace", path, name)
        _record(path, "data-free", name)
        return None
    check_basis(name, basis, shape, f"lssf_fusion: subspace {path}")
    return basis


# The name adapters/terms.py used first.
_calibrated_basis = calibrated_basis


@merge_method(
    name=NAME,
    pretty_name="LSSF (Low-Rank Safety Subspace Fusion)",
    reference_url="https://arxiv.org/abs/2602.00038",
    contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=2, max_non_base=2),
)
def lssf_fusion(
    group: TensorGroup,
    scale: FiniteFloat = 1.0,
    eta: Eta = DEFAULT_ETA,
    rank: NonNegativeInt = 0,
    top_weight: TopWeight = 1.0,
    subspace: Optional[SubspaceDir] = None,
    svd: linalg.SvdMode = "auto",
    role: PerNonBase[Optional[str]] = None,
) -> torch.Tensor:
    inputs = role_tensors(ROLES, group, role)
    finetuned = inputs[FINETUNED]
    warn_low_precision(NAME, finetuned)
    basis = None
    if subspace is not None and finetuned.ndim >= 2:
        basis = calibrated_basis(subspace, group.metadata.name, inputs.models[ALIGNED], tuple(finetuned.shape))
        if basis is not None:
            _record(subspace, "calibrated", group.metadata.name)
            if int(_ranks(basis[1], finetuned.shape, eta, rank)) > basis[0].shape[1]:
                _record(subspace, "clamped", group.metadata.name)
    merged, ranks, close = fuse_with_ranks(
        finetuned,
        inputs[ALIGNED],
        inputs["base"],
        scale=scale,
        eta=eta,
        rank=rank,
        top_weight=top_weight,
        basis=basis,
        svd=svd,
    )
    warn_undetermined(group.metadata.name, ranks, close, rank)
    return owned_result(merged, inputs, NAME, FINETUNED)


METHOD = lssf_fusion
register_method(METHOD, ROLES)
