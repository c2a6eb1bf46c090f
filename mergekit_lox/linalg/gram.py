"""The top-k subspace through the smaller Gram matrix in float64, certified.

For a float32 ``M`` (``m x n``; ``A = M`` when ``m <= n``, else ``Mᵀ``, so that
``A`` is ``s x l`` with ``s <= l``):

    G = A Aᵀ  (float64, accumulated a block of columns at a time)
    G = W diag(λ) Wᵀ                  (torch.linalg.eigh, λ descending)
    S_i = sqrt(λ_i),  W = U (m <= n) or V (m > n)

On CPU this is 1.1 to 1.7 times cheaper than LAPACK's float32 SVD at the shapes of
an LLM (2048 x 5632: 1.5 s against 2.6 s on 2 threads, docs/performance.md), and
it gives every singular value, which LSSF's automatic rank needs.

What is proven (docs/performance.md, "The Gram path"): the computed eigenpairs
are exact for ``G + E`` with

    |E|_2 <= e = (γ_l + s u) |M|_F²,   γ_l = l u / (1 - l u),   u = 2^-53

(``γ_l |M|_F²`` bounds the rounding of the Gram product, elementwise
``γ_l |A| |A|ᵀ``; ``s u |G|_2`` is our constant for eigh's backward error,
LAPACK's "p(s) u |G|_2" with p(s) = s). Weyl puts each exact ``λ_i`` within
``e`` of the computed one; Davis and Kahan bound the angle between the exact and
computed top-j subspaces by ``e / (λ~_j - λ~_{j+1} - e)``. For the rank-k term
``P_k M`` (what every method adds), directions j+1..k with little mass may be
mixed freely, so for any ``j <= k``

    |P~_k M - P_k M|_F <= sinθ_j |M|_F + 2 sqrt(sum_{j<i<=k} (λ~_i + e))

and the bound kept is the smallest over j, divided by
``|P_k M|_F >= sqrt(sum_{i<=k} λ~_i - k e)``. Nothing here is probabilistic.
A matrix whose bound exceeds the tolerance (the Agreement's 1e-3) goes to
LAPACK's SVD. The other side's factor is a float32 product (``Wᵀ A``), rounded
as the exact path's own products are.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from mergekit_lox.linalg.exact import Decomposition

_U64 = torch.finfo(torch.float64).eps / 2
# Columns per float64 block of the Gram product: about 16 MB of float64 per block.
_BLOCK_ELEMENTS = 1 << 21


def applies(matrix: torch.Tensor) -> bool:
    """Where the Gram path is used by ``svd: auto`` (and for fallbacks of ``randomized``):
    float32 matrices on CPU. float64 inputs keep LAPACK's SVD (squaring their condition
    number would lose what float64 was asked for); on CUDA it is unmeasured."""
    return matrix.device.type == "cpu" and matrix.dtype == torch.float32 and matrix.numel() > 0


class GramSpectrum(NamedTuple):
    """``values [..., s]`` (λ, descending, float64), ``vectors [..., s, s]`` (columns,
    descending, float64), ``left`` (vectors are left singular vectors), ``error [...]``
    (``e`` above) and ``total [...]`` (``|M|_F²``)."""

    values: torch.Tensor
    vectors: torch.Tensor
    left: bool
    error: torch.Tensor
    total: torch.Tensor


def _gram64(A: torch.Tensor) -> torch.Tensor:
    """``A Aᵀ`` in float64 without a float64 copy of ``A`` (blocks of columns)."""
    short, long = A.shape[-2:]
    batch = max(1, A[..., 0, 0].numel())
    columns = max(1, _BLOCK_ELEMENTS // (short * batch))
    G = torch.zeros(*A.shape[:-1], short, dtype=torch.float64, device=A.device)
    for start in range(0, long, columns):
        block = A[..., start : start + columns].to(torch.float64)
        G += block @ block.mT
    return G


def spectrum(matrix: torch.Tensor) -> GramSpectrum:
    """Every ``λ_i = S_i²`` and the singular vectors of the smaller side."""
    left = matrix.shape[-2] <= matrix.shape[-1]
    A = matrix if left else matrix.mT
    short, long = A.shape[-2:]
    G = _gram64(A)
    total = torch.diagonal(G, dim1=-2, dim2=-1).sum(dim=-1)
    values, vectors = torch.linalg.eigh(G)
    gamma = long * _U64 / (1 - long * _U64)
    error = (gamma + short * _U64) * total
    return GramSpectrum(values.flip(-1).clamp_min(0), vectors.flip(-1), left, error, total)


def term_bound(spec: GramSpectrum, ranks: torch.Tensor) -> torch.Tensor:
    """The proven bound on ``|P~_k M - P_k M|_F / |P_k M|_F`` for each matrix's rank ``k``
    (module docstring); 0 where nothing is truncated or ``M == 0``, inf where no
    ``j <= k`` gives a finite bound."""
    values, e = spec.values, spec.error.unsqueeze(-1)
    s = values.shape[-1]
    k = ranks.to(values.device).clamp(1, s).unsqueeze(-1)
    # sinθ_j for j = 0..s (j = 0: the empty subspace, exact; j = s: everything).
    following = torch.cat([values[..., 1:], torch.zeros_like(values[..., :1])], dim=-1)
    separation = values - following - e
    sin_theta = torch.where(separation > 0, e / separation.clamp_min(torch.finfo(torch.float64).tiny), torch.inf)
    sin_theta = torch.cat([torch.zeros_like(values[..., :1]), sin_theta.clamp(max=1)], dim=-1)
    sin_theta[..., -1] = 0  # j = s: P = I
    cumulative = torch.cat([torch.zeros_like(values[..., :1]), torch.cumsum(values + e, dim=-1)], dim=-1)
    mixed = (cumulative.gather(-1, k) - cumulative).clamp_min(0).sqrt()
    norm = spec.total.sqrt().unsqueeze(-1)
    candidates = sin_theta * norm + 2 * mixed
    j = torch.arange(s + 1, device=values.device)
    candidates = torch.where(j <= k, candidates, torch.inf)
    numerator = candidates.amin(dim=-1)
    head = (torch.cumsum(values, dim=-1).gather(-1, k - 1) - k * e).squeeze(-1)
    bound = numerator / head.clamp_min(0).sqrt()
    bound = torch.where(head > 0, bound, torch.inf)
    untouched = (k.squeeze(-1) >= s) | (spec.total == 0)
    return torch.where(untouched, 0.0, bound)


def factors(matrix: torch.Tensor, spec: GramSpectrum, width: int) -> Decomposition:
    """The top-``width`` triplets in ``matrix``'s dtype. The other side is ``Wᵀ A / S``
    (``A W / S`` when tall); where ``S == 0`` it is 0, which changes no product
    ``U diag(S) Vh``."""
    W = spec.vectors[..., :width].to(matrix.dtype)
    S = spec.values[..., :width].sqrt().to(matrix.dtype)
    zero = S == 0
    divisor = torch.where(zero, 1.0, S)
    # In place: for LSSF's wide ranks the other side is as large as the matrix.
    if spec.left:
        Vh = (W.mT @ matrix).div_(divisor.unsqueeze(-1)).masked_fill_(zero.unsqueeze(-1), 0.0)
        return Decomposition(W, S, Vh)
    U = (matrix @ W).div_(divisor.unsqueeze(-2)).masked_fill_(zero.unsqueeze(-2), 0.0)
    return Decomposition(U, S, W.mT)
