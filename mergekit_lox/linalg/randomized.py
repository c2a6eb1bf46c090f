"""The randomized top-k path: a Gaussian sketch with power iterations (Halko,
Martinsson & Tropp 2011), Rayleigh-Ritz, and a per-matrix certificate
(linalg/certificate.py); matrices it cannot certify are recomputed exactly.

Host synchronisations, each a read of a few numbers per tensor (never per
matrix of a stack): whether a gap may be shown (after the power steps, and at
the first Rayleigh-Ritz), one per probe step, one per round of further power
steps, and the fallback's indexing.
"""

from __future__ import annotations

from typing import NamedTuple, Union

import torch

from mergekit_lox.linalg import certificate, exact, gram
from mergekit_lox.linalg.exact import Decomposition, full_rank_of, rank_mask
from mergekit_lox.linalg.modes import RANDOMIZED, RandomizedSettings, SvdMode, _count, uses_randomized
from mergekit_lox.linalg.passes import (
    apply_and_gram,
    gaussian,
    orthonormal,
    power_step,
    seeded_generator,
)

_SKETCH, _PROBES = 0, 1


class GuardedTopK(NamedTuple):
    """Top-k factors with how each matrix of the stack got them.

    ``randomized`` is True where the sketched factors passed the certificate;
    ``bound`` is the certified bound on the relative Frobenius error of the
    low-rank term there (0 where the factors are exact). ``tied``: True where the
    factors are LAPACK's and ``s_k`` ties ``s_{k+1}`` within rounding
    (``certificate.tied_at_rank``), so that the rank-k term is not determined:
    another BLAS path or device may return another one.
    """

    factors: Decomposition
    randomized: torch.Tensor
    bound: torch.Tensor
    tied: torch.Tensor


class _Ritz(NamedTuple):
    B: torch.Tensor  # Qᵀ M            [..., l, n]
    Ub: torch.Tensor  # left vectors of B [..., l, l]
    S: torch.Tensor  # Ritz values      [..., l]
    factors: Decomposition  # the top k_max triplets


def _ritz(M: torch.Tensor, Z: torch.Tensor, k_max: int) -> _Ritz:
    """Rayleigh-Ritz on ``range(M Z)``: ``U~ = Q Ub``, ``s~``, ``V~ = Vhᵀ`` of ``B = Qᵀ M``."""
    Q = orthonormal(M @ Z)
    B = Q.mT @ M
    Ub, S, Vh = exact.svd(B)
    factors = Decomposition(Q @ Ub[..., :k_max], S[..., :k_max], Vh[..., :k_max, :])
    return _Ritz(B, Ub, S, factors)


def _at(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return values.gather(-1, index.unsqueeze(-1)).squeeze(-1)


class _Check:
    """The certificate's inputs for one round: residual norms and Ritz values per matrix."""

    def __init__(self, ritz: _Ritz, ranks, norm2, MV, s_k):
        U, S_top, Vk = ritz.factors
        k_max = S_top.shape[-1]
        keep = rank_mask(k_max, ranks, MV.device)
        S_kept = S_top * keep
        allowance = certificate.residual_allowance(norm2, ranks)
        residual = (MV - U * S_kept.unsqueeze(-2)) * keep.unsqueeze(-2)
        residual_t = (ritz.B.mT @ ritz.Ub[..., :k_max] - Vk.mT * S_kept.unsqueeze(-2)) * keep.unsqueeze(-2)
        self.residual = torch.linalg.vector_norm(residual, dim=(-2, -1)) + allowance
        self.residual_t = torch.linalg.vector_norm(residual_t, dim=(-2, -1)) + allowance
        self.s_k = s_k
        self.top_norm = torch.linalg.vector_norm(S_kept, dim=-1)
        self.ratio = (ritz.S[..., -1] / torch.where(self.s_k > 0, self.s_k, 1.0)).square()

    def bound(self, s_hat):
        return certificate.error_bound(self.residual, self.residual_t, self.s_k, s_hat, self.top_norm)


class _Probe:
    """Certificate step 1, resumable: ``s_hat >= s_{k+1}(M)`` per matrix with probability
    at least ``1 - failure_probability`` each. Every step's estimate holds on the same
    event, so the smallest is kept; ``F`` stays the one of the Ritz vectors it started
    from, and its bound on ``s_{k+1}(M)`` stays valid whatever the later Ritz vectors."""

    def __init__(self, M, ritz: _Ritz, ranks, norm2, settings: RandomizedSettings):
        _, S_top, self.Vk = ritz.factors
        self.M, self.norm2, self.settings = M, norm2, settings
        self.weights = (S_top * rank_mask(S_top.shape[-1], ranks, M.device)).square().unsqueeze(-1)
        self.Y = gaussian(M, settings.probes, seeded_generator(M.device, settings.seed, M.shape, _PROBES))
        self.log_scale = torch.zeros(M.shape[:-2], device=M.device, dtype=torch.float64)
        self.s_hat = torch.full(M.shape[:-2], torch.inf, device=M.device, dtype=M.dtype)
        self.steps = 0
        self.last = self.previous = None

    def step(self) -> None:
        """``Y <- A Y`` with ``A = Fᵀ F = MᵀM - V~_k diag(s~_k²) V~_kᵀ``: one pass over ``M``."""
        M, Vk = self.M, self.Vk
        Y = apply_and_gram(M, self.Y, 0)[1] - Vk.mT @ (self.weights * (Vk @ self.Y))
        top = torch.linalg.vector_norm(Y, dim=-2).amax(dim=-1)
        usable = top > 0
        self.steps += 1
        self.log_scale = self.log_scale + torch.log(torch.where(usable, top, 1.0)).double()
        log_norm = torch.where(usable, self.log_scale, -torch.inf)
        estimate = certificate.probe_estimate(log_norm, self.steps, self.settings.probe_threshold())
        self.previous, self.last = self.last, estimate.log()
        bound = certificate.with_probe_allowance(estimate.to(M.dtype), self.norm2, M.shape)
        self.s_hat = torch.minimum(self.s_hat, bound)
        self.Y = Y / torch.where(usable, top, 1.0)[..., None, None]

    def hopeless(self, s_k: torch.Tensor) -> torch.Tensor:
        """Where ŝ, extrapolated to the last step as ``ln ŝ_j ≈ a + b / j``, stays above s~_k."""
        if self.previous is None:
            return torch.zeros_like(s_k, dtype=torch.bool)
        j = self.steps
        slope = (self.previous - self.last) * j * (j - 1)
        final = self.last - slope * (1 / j - 1 / self.settings.probe_steps)
        return final.exp().to(s_k.dtype) >= s_k

    def show_gaps(self, hopeful: torch.Tensor, s_k: torch.Tensor) -> None:
        """At least 2 steps, until every hopeful matrix shows its gap (ŝ < s~_k) or cannot."""
        while self.steps < self.settings.probe_steps:
            self.step()
            settled = ~hopeful | (self.s_hat < s_k) | self.hopeless(s_k)
            if self.steps >= 2 and bool(settled.all()):
                break

    def tighten(self, targets: torch.Tensor, check: _Check) -> None:
        """Further steps until every target matrix passes, or cannot."""
        while self.steps < self.settings.probe_steps:
            self.step()
            passed = check.bound(self.s_hat)[0] <= self.settings.tolerance
            if bool((~targets | passed | self.hopeless(check.s_k)).all()):
                break


def _ranks_of(matrix: torch.Tensor, k: Union[int, torch.Tensor]):
    full = full_rank_of(matrix)
    batch = matrix.shape[:-2]
    if isinstance(k, torch.Tensor):
        ranks = k.to(device=matrix.device, dtype=torch.int64).clamp(1, full).expand(batch)
        return ranks, (int(ranks.max()) if ranks.numel() else 1)  # one synchronisation: the sketch width
    k_max = max(1, min(int(k), full))
    return torch.full(batch, k_max, device=matrix.device, dtype=torch.int64), k_max


def guarded_top_k(
    matrix: torch.Tensor,
    k: Union[int, torch.Tensor],
    svd: SvdMode = "exact",
    settings: RandomizedSettings = RANDOMIZED,
) -> GuardedTopK:
    """The top-``k`` singular triplets of each matrix of a stack, and how they were got.

    ``k`` is an int, or an integer tensor with one rank per matrix (then the
    factors hold ``max(k)`` triplets and the bound is for each matrix's own
    rank: use ``lowrank_per_matrix``). Ranks are clamped to ``min(m, n)``.

    The randomized path: ``power_iterations`` steps, Rayleigh-Ritz, the
    residuals; the probes bound ``s_{k+1}`` once per matrix; the certificate
    decides; a matrix with a gap shown but a bound above the tolerance gets the
    number of further power steps its Ritz values predict, if that fits in
    ``max_power_iterations``. Matrices whose Ritz values show no gap at k, whose
    gap the probes do not show, or that still fail, are recomputed by the exact
    SVD, alone, and counted as fallbacks.
    """
    ranks, k_max = _ranks_of(matrix, k)
    matrices = ranks.numel()
    if not uses_randomized(matrix.shape, k_max, svd, settings) or matrices == 0:
        _count("exact", matrices)
        return _exact_top_k(matrix, ranks, k_max, svd, settings)

    M = matrix
    Z = gaussian(M, k_max + settings.oversample, seeded_generator(M.device, settings.seed, M.shape, _SKETCH))
    values = None
    for step in range(settings.power_iterations):
        if step == settings.power_iterations - 1:
            Z, values = power_step(M, Z, with_values=True)
        else:
            Z = power_step(M, Z)
    iterations = settings.power_iterations
    if values is not None and not _may_show_a_gap(values, ranks, settings):
        _count("fallback", matrices)
        return _exact_top_k(matrix, ranks, k_max, svd, settings)
    probe = norm2 = None
    while True:
        ritz = _ritz(M, Z, k_max)
        s_k, s_next = _at(ritz.S, ranks - 1), _at(ritz.S, ranks)
        # No probe can show a gap the Ritz values do not show (ŝ >= s~_{k+1}).
        gap = (s_next <= (1 - settings.min_relative_gap) * s_k) & (s_k > 0)
        if norm2 is None and not bool((gap | (ritz.S[..., 0] == 0)).any()):
            zero = hopeful = torch.zeros_like(gap)  # no gap anywhere, and no zero matrix
            bound = torch.full_like(s_k, torch.inf)
            break
        MV, _, fresh = apply_and_gram(M, ritz.factors.Vh.mT, k_max, with_norm=norm2 is None)
        norm2 = fresh if norm2 is None else norm2
        check = _Check(ritz, ranks, norm2, MV, s_k)
        zero = norm2 == 0
        hopeful = gap & ~zero
        if probe is None and bool(hopeful.any()):
            # First show the gap (or that there is none); tighten ŝ later if the bound needs it.
            probe = _Probe(M, ritz, ranks, norm2, settings)
            probe.show_gaps(hopeful, s_k)
        if probe is None:
            bound = torch.full_like(s_k, torch.inf)
            break
        bound, shown = check.bound(probe.s_hat)
        best, _ = check.bound(s_next)  # the bound if ŝ were as small as it can be
        tighten = hopeful & shown & (bound > settings.tolerance) & (best <= settings.tolerance)
        if bool(tighten.any()):
            probe.tighten(tighten, check)
            bound, shown = check.bound(probe.s_hat)
        # More power steps shrink the residuals, not ŝ: take them only where the
        # predicted number fits in what is left (else the matrix falls back now).
        left = settings.max_power_iterations - iterations
        more = certificate.iterations_needed(bound, check.ratio, settings.tolerance)
        feasible = hopeful & shown & (bound > settings.tolerance) & (more <= left)
        n_feasible, steps = torch.stack([feasible.sum(), torch.where(feasible, more, 0).max()]).tolist()
        if not n_feasible:
            break
        # Z <- orth(Bᵀ) = orth(Mᵀ Q) is one power step, for free.
        steps = min(max(int(steps), 1), left)
        Z = orthonormal(ritz.B.mT)
        for _ in range(steps - 1):
            Z = power_step(M, Z)
        iterations += steps

    passed = (hopeful & (bound <= settings.tolerance)) | zero
    bound = torch.where(zero, 0.0, bound)
    factors = ritz.factors
    tied = torch.zeros_like(passed)
    n_passed = int(passed.sum())
    _count("randomized", n_passed)
    if n_passed < matrices:
        _count("fallback", matrices - n_passed)
        factors, redone_bound, tied = _exact_where_failed(matrix, factors, passed, ranks, k_max, svd, settings)
        bound = torch.where(passed, bound, redone_bound)
    return GuardedTopK(factors, passed, bound, tied)


def _may_show_a_gap(values: torch.Tensor, ranks: torch.Tensor, settings: RandomizedSettings) -> bool:
    """Whether some matrix's values (of ``M Z``, lower bounds on its singular values)
    show the relative gap at k that the certificate needs, or may be a zero matrix."""
    s_k, s_next = _at(values, ranks - 1), _at(values, ranks)
    gap = s_next <= (1 - settings.min_relative_gap) * s_k
    return bool((gap | (values[..., 0] == 0)).any())


def _exact_top_k(
    matrix: torch.Tensor, ranks: torch.Tensor, k_max: int, svd: SvdMode, settings: RandomizedSettings
) -> GuardedTopK:
    """Every matrix of the stack without a sketch (the caller counts the path):
    through the float64 Gram matrix where ``svd`` is not ``exact`` and it applies
    (linalg/gram.py), each matrix kept where its proven bound at its rank is within
    the tolerance; LAPACK's SVD for the rest (and for ``svd: exact``)."""
    zeros = torch.zeros(matrix.shape[:-2], device=matrix.device, dtype=matrix.dtype)
    if svd == "exact" or not gram.applies(matrix):
        full = exact.svd(matrix)
        tied = certificate.tied_at_rank(full.S, ranks, settings.tolerance)
        return GuardedTopK(full.leading(k_max), zeros.bool(), zeros, tied)
    # The bound at rank k reads λ_1..λ_{k+1} and the trace: the top k_max + 1 pairs suffice.
    spectrum = gram.spectrum(matrix, top=k_max + 1)
    bound = gram.term_bound(spectrum, ranks)
    passed = bound <= settings.tolerance
    factors = gram.factors(matrix, spectrum, k_max)
    n_passed = int(passed.sum())
    _count("gram", n_passed)
    tied = torch.zeros_like(passed)
    if n_passed < passed.numel():
        failed = _indices(~passed)
        full = exact.svd(_matrices(matrix, failed))
        factors = _replace(factors, failed, full.leading(k_max))
        flat = tied.reshape(-1).clone()
        flat[failed] = certificate.tied_at_rank(full.S, ranks.reshape(-1)[failed], settings.tolerance)
        tied = flat.reshape(passed.shape)
    return GuardedTopK(factors, zeros.bool(), torch.where(passed, bound, 0.0).to(matrix.dtype), tied)


def _exact_where_failed(
    matrix: torch.Tensor,
    factors: Decomposition,
    passed: torch.Tensor,
    ranks: torch.Tensor,
    k_max: int,
    svd: SvdMode,
    settings: RandomizedSettings,
):
    """Replace the factors of the matrices that failed the certificate by ``_exact_top_k``'s;
    returns them, the bound of each redone matrix (0 where LAPACK's) and ``tied``."""
    if not bool(passed.any()):
        redone = _exact_top_k(matrix, ranks, k_max, svd, settings)
        return redone.factors, redone.bound, redone.tied
    failed = _indices(~passed)
    redone = _exact_top_k(_matrices(matrix, failed), ranks.reshape(-1)[failed], k_max, svd, settings)
    bound = torch.zeros(passed.numel(), device=matrix.device, dtype=matrix.dtype)
    bound[failed] = redone.bound
    tied = torch.zeros(passed.numel(), device=matrix.device, dtype=torch.bool)
    tied[failed] = redone.tied
    return _replace(factors, failed, redone.factors), bound.reshape(passed.shape), tied.reshape(passed.shape)


def _indices(where: torch.Tensor) -> torch.Tensor:
    """Positions in the flattened stack where ``where`` is True."""
    return torch.nonzero(where.reshape(-1)).squeeze(-1)


def _matrices(matrix: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The matrices at ``indices`` of the flattened stack, as ``[len(indices), m, n]``."""
    return matrix.reshape(-1, *matrix.shape[-2:])[indices]


def _replace(factors: Decomposition, indices: torch.Tensor, redone: Decomposition) -> Decomposition:
    """``factors`` with the matrices at ``indices`` of the flattened stack replaced by
    ``redone``'s, in order (a 2-D matrix is a stack of one)."""
    batch = factors.S.shape[:-1]
    replaced = []
    for old, new in zip(factors, redone, strict=True):
        flat = old.reshape(-1, *old.shape[len(batch) :]).clone()
        flat[indices] = new
        replaced.append(flat.reshape(old.shape))
    return Decomposition(*replaced)
