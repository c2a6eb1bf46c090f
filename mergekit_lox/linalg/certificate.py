"""The certificate of the randomized path: a bound on the relative error of the
low-rank term, per matrix (docs/performance.md has the derivation in full).

Notation: ``M`` is ``m x n``; Rayleigh-Ritz on an orthonormal ``Q`` gives
``B = Qᵀ M = Ub diag(s~) Vh``, ``U~ = Q Ub``, ``V~ = Vhᵀ``; the approximate
low-rank term is ``U~_k diag(s~_k) V~_kᵀ = P~ M`` with ``P~ = U~_k U~_kᵀ``, the
exact one ``P M`` with ``P = U_k U_kᵀ``.

1. **A bound on s_{k+1}(M), from Gaussian probes.** ``F = M - U~_k diag(s~_k) V~_kᵀ
   = (I - P~) M`` has ``s_{k+1}(M) <= |F|_2`` (Eckart-Young: ``P~ M`` has rank k).
   With ``A = Fᵀ F = MᵀM - V~_k diag(s~_k²) V~_kᵀ`` and probes ``w_i ~ N(0, I_n)``
   (independent of ``M`` and of the sketch), ``c_i = u_1ᵀ w_i`` (``u_1`` a top
   eigenvector of ``A``) are independent standard normals and, for every ``j >= 1``,
   ``|A^j w_i|² >= λ_1^{2j} c_i²``. On the event ``max_i c_i² >= t``, whose complement
   has probability at most ``(2t/π)^{r/2}`` for ``r`` probes, every
   ``ŝ_j = (max_i |A^j w_i| / sqrt(t))^{1/(2j)}`` bounds ``|F|_2``; ``t`` is chosen so
   that this probability is the settings' ``failure_probability`` (1e-9).
2. **The angles, from a Sylvester equation.** With ``D = U_⊥ᵀ U~_k`` (the sines of
   the angles between the approximate and the exact top-k left subspaces), the
   residuals ``R = M V~_k - U~_k Σ~`` and ``R' = Mᵀ U~_k - V~_k Σ~`` give
   ``D Σ~² - (S_⊥ S_⊥ᵀ) D = -S_⊥ V_⊥ᵀ R' - U_⊥ᵀ R Σ~``, so entry by entry, with every
   exact ``σ <= s_{k+1} <= ŝ`` and every ``s~_j >= s~_k > ŝ``:
   ``|D|_F <= (ŝ |R'|_F + s~_k |R|_F) / (s~_k² - ŝ²)``. (Wedin's sin-theta theorem
   gives ``sqrt(|R|² + |R'|²) / (s~_k - ŝ)``, up to 2 times larger.)
3. **The low-rank term.** ``(P~ - P) M = -(I - P~) P M + P~ (I - P) M``, so
   ``|P~M - PM|_F <= |D|_2 |PM|_F + |D|_F s_{k+1}`` and, with
   ``|PM|_F >= |s~_{1..k}|`` (Ritz values are lower bounds),
   ``|P~M - PM|_F / |PM|_F <= |D|_F (1 + ŝ / |s~_{1..k}|)``.

Rounding: every quantity is computed in the input's precision. ``|R|`` and
``|R'|`` get ``ROUNDING_RESIDUAL * u sqrt(k) |M|_F`` added and ``ŝ²`` gets
``ROUNDING_PROBE * u sqrt(max(m, n)) |M|_F²`` (``u`` the unit roundoff), several
times the rounding errors measured on the benchmark's spectra: a calibrated
allowance, not a worst-case analysis.
"""

from __future__ import annotations

import math

import torch

ROUNDING_RESIDUAL = 16.0
ROUNDING_PROBE = 4.0
# Half-width of the interval around each singular value from LAPACK's SVD, in units of
# u |M|_F: 4 times the largest error measured against float64 (4 u |M|_F on noise,
# power-law and low-rank-plus-noise spectra, 256 x 768 to 1024 x 1024, with MKL's default
# and MKL_CBWR=COMPATIBLE paths).
ROUNDING_SVD = 16.0


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def probe_estimate(log_norm: torch.Tensor, steps: int, threshold: float) -> torch.Tensor:
    """``ŝ_j = (max_i |A^j w_i| / sqrt(t))^{1/(2j)}`` from ``log max_i |A^j w_i|``."""
    return torch.exp((log_norm - 0.5 * math.log(threshold)) / (2 * steps))


def with_probe_allowance(s_hat: torch.Tensor, norm2: torch.Tensor, shape) -> torch.Tensor:
    """``sqrt(ŝ² + ROUNDING_PROBE u sqrt(max(m, n)) |M|_F²)``: the bound on ``|F|_2``."""
    allowance = ROUNDING_PROBE * unit_roundoff(norm2.dtype) * math.sqrt(max(shape[-2], shape[-1]))
    return torch.sqrt(s_hat.square() + allowance * norm2)


def residual_allowance(norm2: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``ROUNDING_RESIDUAL u sqrt(k) |M|_F``, added to ``|R|_F`` and ``|R'|_F``."""
    return ROUNDING_RESIDUAL * unit_roundoff(norm2.dtype) * torch.sqrt(k.to(norm2.dtype) * norm2)


def error_bound(
    residual: torch.Tensor,
    residual_t: torch.Tensor,
    s_k: torch.Tensor,
    s_hat: torch.Tensor,
    top_norm: torch.Tensor,
):
    """The bound of step 3 per matrix, and where a gap was shown (``s~_k > ŝ``).

    ``residual``, ``residual_t``: ``|R|_F``, ``|R'|_F`` (allowance included);
    ``s_k``: the k-th Ritz value; ``s_hat``: the bound on ``s_{k+1}(M)``;
    ``top_norm``: ``|s~_{1..k}|``. Infinite where no gap is shown.
    """
    gap = s_k.square() - s_hat.square()
    shown = (s_k > s_hat) & (gap > 0)
    safe_gap = torch.where(shown, gap, 1.0)
    sines = (s_hat * residual_t + s_k * residual) / safe_gap
    bound = sines * (1 + s_hat / torch.where(top_norm > 0, top_norm, 1.0))
    return torch.where(shown, bound, torch.inf), shown


def tied_at_rank(S: torch.Tensor, ranks: torch.Tensor, tolerance: float) -> torch.Tensor:
    """Where the rank-k term of a matrix is not determined by its computed spectrum
    ``S [..., n]`` (every value, descending, from LAPACK's SVD): ``s_k - s_{k+1}`` within
    ``2 ROUNDING_SVD u |M|_F``, so another BLAS path or device may turn the top-k subspace
    within the pair, and ``s_k > tolerance |s_{1..k}|``, so that the turn moves the term
    by more than the Agreement (a tie among values that small does not)."""
    width = S.shape[-1]
    if width < 2:
        return torch.zeros(S.shape[:-1], dtype=torch.bool, device=S.device)
    k = ranks.to(S.device).clamp(1, width - 1).unsqueeze(-1)
    s_k, s_next = S.gather(-1, k - 1).squeeze(-1), S.gather(-1, k).squeeze(-1)
    norm = torch.linalg.vector_norm(S, dim=-1)
    head = torch.cumsum(S.square(), dim=-1).gather(-1, k - 1).squeeze(-1).sqrt()
    delta = ROUNDING_SVD * unit_roundoff(S.dtype) * norm
    return (s_k - s_next <= 2 * delta) & (s_k > tolerance * head) & (ranks.to(S.device) < width)


def iterations_needed(bound: torch.Tensor, ratio: torch.Tensor, tolerance: float) -> torch.Tensor:
    """Power steps expected to bring ``bound`` to a quarter of ``tolerance``.

    ``ratio = (s~_l / s~_k)²`` (smallest over k-th Ritz value, squared) is the
    contraction of the residual per step of subspace iteration. A prediction
    only: the bound is computed again after the steps.
    """
    contraction = ratio.clamp(1e-6, 0.9)
    steps = torch.log(bound / (tolerance / 4)) / torch.log(1 / contraction)
    return torch.ceil(steps.clamp(min=1.0, max=1e6)).to(torch.int64)
