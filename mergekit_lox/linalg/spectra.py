"""Entropies of a spectrum, and the ranks chosen from them.

- ``singular_value_entropy`` / ``effective_rank`` / ``entropy_rank``: Roy &
  Vetterli's effective rank ``exp(H)`` with ``p_i = S_i / sum S_j`` (a metric of
  ``analyze``).
- ``energy_entropy_ranks``: LSSF's rule (docs/methods.md section 2) from the
  energy distribution ``p_i = S_i² / sum S_j²``, ``h_i = -p_i ln p_i``: the
  smallest ``r`` with ``sum_{i<=r} h_i >= eta H``.
- ``energy_entropy_rank`` / ``energy_entropy_top_k``: that rule on a matrix
  without a full SVD where it can be shown: the eigenvalues of the smaller Gram
  matrix (no vectors) give every ``S_i²`` up to a rounding interval; a rank is
  certified when no value in the intervals moves it, and its top-r triplets then
  come from the certified randomized path (docs/performance.md).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from mergekit_lox.linalg import exact, gram
from mergekit_lox.linalg.certificate import ROUNDING_SVD, unit_roundoff
from mergekit_lox.linalg.exact import Decomposition, full_rank_of, lowrank_per_matrix, nonzero_mask
from mergekit_lox.linalg.modes import RANDOMIZED, RandomizedSettings, SvdMode, _count, check_svd_mode, uses_randomized
from mergekit_lox.linalg.randomized import guarded_top_k

# ceil() of a float effective rank that is an integer up to rounding (e.g. four
# equal singular values give exp(H) = 4.0000001) must not add a dimension.
_CEIL_TOLERANCE = 1e-6
# Half-width of the interval around each Gram eigenvalue, in units of
# u sqrt(max(m, n)) |M|_F²: 10 times the largest error measured (docs/performance.md).
ROUNDING_GRAM = 2.0


def singular_value_entropy(S: torch.Tensor, shape) -> torch.Tensor:
    """``H = -sum p_i ln p_i`` with ``p_i = S_i / sum S_j`` over non-zero S_i.

    Computed in float64 (it is a short vector per matrix); 0 for a zero matrix.
    """
    S = S.to(torch.float64)
    S = torch.where(nonzero_mask(S, shape), S, torch.zeros_like(S))
    total = S.sum(dim=-1, keepdim=True)
    p = S / torch.where(total > 0, total, torch.ones_like(total))
    return _entropy_terms(p).sum(dim=-1)


def effective_rank(S: torch.Tensor, shape) -> torch.Tensor:
    """Roy & Vetterli's effective rank ``exp(H)``."""
    return torch.exp(singular_value_entropy(S, shape))


def entropy_rank(S: torch.Tensor, shape, rank_scale: float = 1.0) -> torch.Tensor:
    """``clamp(ceil(rank_scale * exp(H)), 1, min(m, n))`` per matrix (an integer tensor)."""
    scaled = rank_scale * effective_rank(S, shape)
    k = torch.ceil(scaled * (1 - _CEIL_TOLERANCE))
    return k.clamp(min=1, max=min(shape[-2], shape[-1])).to(torch.int64)


def _entropy_terms(p: torch.Tensor) -> torch.Tensor:
    """``-p ln p``, 0 where ``p == 0``."""
    return torch.where(p > 0, -p * torch.log(torch.where(p > 0, p, 1.0)), 0.0)


def _first(condition: torch.Tensor) -> torch.Tensor:
    """1-based position of the first True along the last axis (the last is True)."""
    return torch.argmax(condition.to(torch.int8), dim=-1) + 1


def _interval_ranks(low, high, total_low, total_high, shape, eta: float, eps: float):
    """LSSF's rank when each ``S_i²`` lies in ``[low_i, high_i]`` and the sum of all
    ``S_i²`` in ``[total_low, total_high]`` (``[..., 1]``), all float64.

    Returns ``(rank, certified)``: ``rank`` is where every spectrum in the
    intervals has reached ``eta`` (the rule's rank when the intervals are
    points), and ``certified`` says no spectrum in them gives another rank.
    Values at or below ``S_1 max(m, n) eps`` count as zero (as ``nonzero_mask``):
    the rule's own treatment of rounding noise.
    """
    tiny = torch.finfo(torch.float64).tiny
    cut = (max(shape[-2], shape[-1]) * eps) ** 2
    surely = low > cut * high[..., :1]
    maybe = high > cut * low[..., :1]
    dropped = torch.where(surely, 0.0, torch.minimum(high, cut * high[..., :1])).sum(dim=-1, keepdim=True)
    p_low = torch.where(surely, low, 0.0) / total_high.clamp_min(tiny)
    p_high = (torch.where(maybe, high, 0.0) / (total_low - dropped).clamp_min(tiny)).clamp(max=1)
    h_low = torch.minimum(_entropy_terms(p_low), _entropy_terms(p_high))
    h_high = _entropy_terms(torch.minimum(p_low.clamp_min(1 / math.e), p_high))  # h peaks at 1/e
    head_low, head_high = torch.cumsum(h_low, dim=-1), torch.cumsum(h_high, dim=-1)
    tail_low = (h_low.sum(dim=-1, keepdim=True) - head_low).clamp_min(0)
    tail_high = (h_high.sum(dim=-1, keepdim=True) - head_high).clamp_min(0)
    # H_r >= eta H  <=>  (1 - eta) H_r >= eta (H - H_r); always true at the last position.
    surely_reached = (1 - eta) * head_low >= eta * tail_high
    maybe_reached = (1 - eta) * head_high >= eta * tail_low
    surely_reached[..., -1] = maybe_reached[..., -1] = True
    zero = total_high[..., 0] <= 0
    if eta >= 1:
        # eta = 1 is full rank by definition (1 where H == 0: one value above the cut).
        # The rule alone would stop at the last value above the rounding cut, a count
        # that the last bits of the small values decide (another BLAS path, another
        # device); the directions past it carry only rounding.
        single_low, single_high = tail_high[..., 0] <= 0, tail_low[..., 0] <= 0
        rank = torch.where(zero | single_low, 1, low.shape[-1])
        return rank, zero | (single_low == single_high)
    rank, earliest = _first(surely_reached), _first(maybe_reached)
    return torch.where(zero, 1, rank), zero | (rank == earliest)


def _within_rounding(energy, width, total, total_width, shape, eta: float, eps: float) -> torch.Tensor:
    """Where LSSF's rank from the energies ``S_i² [..., n]``, each known to ``± width``
    (``|M|_F² = total ± total_width``, ``[..., 1]``), is not certified: a spectrum within
    rounding of the computed one has another rank, so another BLAS path or device may
    choose it."""
    low, high = (energy - width).clamp_min(0), energy + width
    bounds = ((total - total_width).clamp_min(0), total + total_width)
    return ~_interval_ranks(low, high, *bounds, shape, eta, eps)[1]


def svd_ranks_within_rounding(S: torch.Tensor, matrix: torch.Tensor, eta: float) -> torch.Tensor:
    """``_within_rounding`` for singular values ``S`` of ``matrix`` from LAPACK's SVD, each
    known to ``ROUNDING_SVD u |M|_F`` (a calibrated allowance, as the certificate's)."""
    u = unit_roundoff(S.dtype)
    total = exact.sum_of_squares(matrix).to(torch.float64).unsqueeze(-1)
    delta = ROUNDING_SVD * u * total.sqrt()
    values = S.to(torch.float64)
    width = (2 * values + delta) * delta
    return _within_rounding(values.square(), width, total, 8 * u * total, matrix.shape, eta, torch.finfo(S.dtype).eps)


def energy_entropy_ranks(S: torch.Tensor, shape, eta: float) -> torch.Tensor:
    """LSSF's automatic rank per matrix from exact singular values ``S [..., n]``.

    The smallest ``r`` with ``sum_{i<=r} h_i >= eta H`` (1 when ``H == 0``), with
    ``p_i = S_i² / sum S_j²`` over the values above ``S_1 max(m, n) eps``
    (``nonzero_mask``); ``eta = 1``: full rank ``min(m, n)`` by definition where
    ``H > 0`` (no cut that rounding could move); computed in float64, on ``S``'s device.
    """
    energy = torch.where(nonzero_mask(S, shape), S.to(torch.float64), 0.0).square()
    total = energy.sum(dim=-1, keepdim=True)
    return _interval_ranks(energy, energy, total, total, shape, eta, torch.finfo(S.dtype).eps)[0]


class EntropyRank(NamedTuple):
    """``ranks [...]`` per matrix; ``certified [...]`` where the rank is shown to be the
    rule's on the exact spectrum (always, on the exact path); ``values [..., n]`` the
    singular values it was computed from (from the Gram matrix: accurate to
    about ``sqrt(u) |M|_F``, not the exact SVD's ``u |M|_2``)."""

    ranks: torch.Tensor
    certified: torch.Tensor
    values: torch.Tensor


def energy_entropy_rank(matrix: torch.Tensor, eta: float, svd: SvdMode = "auto") -> EntropyRank:
    """LSSF's automatic rank of each matrix of a stack, without singular vectors.

    ``exact``: from ``svdvals``. ``auto`` and ``randomized``: from the eigenvalues
    of the smaller Gram matrix (``eigvalsh``, several times cheaper than an SVD),
    each known to ``ROUNDING_GRAM u sqrt(max(m, n)) |M|_F²``; ``certified`` is False
    where a value in those intervals could give another rank.
    """
    if check_svd_mode(svd) == "exact":
        S = exact.singular_values(matrix)
        return EntropyRank(energy_entropy_ranks(S, matrix.shape, eta), torch.ones_like(S[..., 0], dtype=torch.bool), S)
    small = matrix if matrix.shape[-2] <= matrix.shape[-1] else matrix.mT
    eigenvalues = torch.linalg.eigvalsh(small @ small.mT).flip(-1).clamp_min(0).to(torch.float64)
    total = exact.sum_of_squares(matrix).to(torch.float64).unsqueeze(-1)
    u = unit_roundoff(matrix.dtype)
    width = ROUNDING_GRAM * u * math.sqrt(max(matrix.shape[-2], matrix.shape[-1])) * total
    low, high = (eigenvalues - width).clamp_min(0), eigenvalues + width
    # |M|_F² itself is accurate to a few u (a sum of squares).
    bounds = (total * (1 - 8 * u), total * (1 + 8 * u))
    ranks, certified = _interval_ranks(low, high, *bounds, matrix.shape, eta, torch.finfo(matrix.dtype).eps)
    return EntropyRank(ranks, certified, eigenvalues.sqrt().to(matrix.dtype))


class EntropyTopK(NamedTuple):
    """The top-``max(ranks)`` triplets of each matrix, LSSF's rank of each, and ``close
    [...]``: True where rounding of the spectrum (within the path's proven or calibrated
    error) could give another rank, so that another BLAS path or device may choose it."""

    factors: Decomposition
    ranks: torch.Tensor
    close: torch.Tensor


class EntropyLowRank(NamedTuple):
    """``lowrank_r(M)`` with LSSF's rank ``r`` of each matrix, and ``close`` as EntropyTopK's."""

    term: torch.Tensor
    ranks: torch.Tensor
    close: torch.Tensor


def energy_entropy_top_k(
    matrix: torch.Tensor, eta: float, svd: SvdMode = "auto", settings: RandomizedSettings = RANDOMIZED
) -> EntropyTopK:
    """LSSF's automatic rank and the top-r triplets of each matrix of a stack.

    ``exact``: one LAPACK SVD, whose values set the ranks. ``auto``: the float64
    Gram path (linalg/gram.py: every value, and the top-r vectors with a proven
    bound at each matrix's rank) where it applies and certifies, else one LAPACK
    SVD. (The rule's rank falls where the spectrum decays smoothly on every
    realistic spectrum we measured, so no sketch of the top-r vectors could be
    certified there: docs/performance.md.)
    ``randomized``: the ranks from ``energy_entropy_rank`` (Gram eigenvalues, no
    vectors); where every matrix of the stack has a certified rank, a gap at it
    in those values (``min_relative_gap``) and a sketchable width, the triplets
    come from ``guarded_top_k`` (certified per matrix, or exact); otherwise one
    decomposition of the stack as ``auto``'s, counted as a fallback. Factors are
    ``[..., :max(ranks)]``.
    """
    matrices = math.prod(matrix.shape[:-2])
    if check_svd_mode(svd) == "randomized" and uses_randomized(matrix.shape, 1, svd, settings) and matrices:
        chosen = energy_entropy_rank(matrix, eta, svd)
        widest = int(chosen.ranks.max())
        if widest < full_rank_of(matrix):
            s_r = chosen.values.gather(-1, (chosen.ranks - 1).unsqueeze(-1))
            s_next = chosen.values.gather(-1, chosen.ranks.unsqueeze(-1))
            gap = bool((s_next <= (1 - settings.min_relative_gap) * s_r).all())
            if gap and bool(chosen.certified.all()) and uses_randomized(matrix.shape, widest, svd, settings):
                factors = guarded_top_k(matrix, chosen.ranks, svd, settings).factors
                return EntropyTopK(factors, chosen.ranks, ~chosen.certified)
        _count("fallback", matrices)
    else:
        _count("exact", matrices)
    if svd != "exact" and gram.applies(matrix):
        certified = _gram_ranks(matrix, eta, settings)
        if certified is not None:
            spectrum, ranks, close = certified
            _count("gram", matrices)
            return EntropyTopK(gram.factors(matrix, spectrum, int(ranks.max())), ranks, close)
    factors = exact.svd(matrix)
    ranks = energy_entropy_ranks(factors.S, matrix.shape, eta)
    close = svd_ranks_within_rounding(factors.S, matrix, eta)
    return EntropyTopK(factors.leading(int(ranks.max()) if matrices else 1), ranks, close)


def _gram_ranks(matrix: torch.Tensor, eta: float, settings: RandomizedSettings):
    """``(spectrum, ranks, close)`` by the Gram path where its bound at every matrix's
    rank is within the tolerance, else None. The rule runs on the Gram values with the
    float32 cutoff of ``nonzero_mask`` (the values are accurate to ``e ~ 1e-12 |M|_F²``,
    far inside it); ``close`` where a spectrum within ``e`` of them has another rank."""
    spectrum = gram.spectrum(matrix)
    ranks = energy_entropy_ranks(spectrum.values.sqrt().to(matrix.dtype), matrix.shape, eta)
    if bool((gram.term_bound(spectrum, ranks) <= settings.tolerance).all()):
        e, total = spectrum.error.unsqueeze(-1), spectrum.total.unsqueeze(-1)
        close = _within_rounding(spectrum.values, e, total, e, matrix.shape, eta, torch.finfo(matrix.dtype).eps)
        return spectrum, ranks, close
    return None


def energy_entropy_lowrank(
    matrix: torch.Tensor, eta: float, svd: SvdMode = "auto", settings: RandomizedSettings = RANDOMIZED
):
    """``(lowrank_r(M), ranks, close)`` with LSSF's automatic rank ``r`` of each matrix of a
    stack (``close``: EntropyTopK's).

    ``auto`` on the Gram path, where the ranks pass half the smaller side ``s``: through
    the complement, ``lowrank_r(M) = M - P_c M`` with the ``s - r`` trailing directions,
    which costs ``(s - r) / r`` of the top-r factors' products (the rule keeps about
    1500 of 2048 directions of a hidden-2048 noise-floor delta). Otherwise the factors
    of ``energy_entropy_top_k``, composed.
    """
    if check_svd_mode(svd) == "auto" and gram.applies(matrix):
        certified = _gram_ranks(matrix, eta, settings)
        if certified is None:
            svd = "exact"  # the Gram path does not certify: LAPACK, without a second Gram pass
        else:
            spectrum, ranks, close = certified
            matrices = math.prod(matrix.shape[:-2])
            _count("exact", matrices)
            _count("gram", matrices)
            s, low = spectrum.size, int(ranks.min())
            if s - low >= int(ranks.max()):
                term = lowrank_per_matrix(gram.factors(matrix, spectrum, int(ranks.max())), ranks)
                return EntropyLowRank(term, ranks, close)
            trailing = torch.arange(low, s, device=matrix.device) >= ranks.unsqueeze(-1)
            W = spectrum.vectors[..., low:].to(matrix.dtype) * trailing.unsqueeze(-2).to(matrix.dtype)
            tail = W @ (W.mT @ matrix) if spectrum.left else (matrix @ W) @ W.mT
            return EntropyLowRank(torch.sub(matrix, tail, out=tail), ranks, close)
    factors, ranks, close = energy_entropy_top_k(matrix, eta, svd, settings)
    return EntropyLowRank(lowrank_per_matrix(factors, ranks), ranks, close)
