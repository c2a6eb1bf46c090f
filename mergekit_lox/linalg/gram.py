"""The top-k subspace through the smaller Gram matrix in float64, certified.

For a float32 ``M`` (``m x n``; ``A = M`` when ``m <= n``, else ``Mᵀ``, so that
``A`` is ``s x l`` with ``s <= l``):

    G = A Aᵀ  (float64, BLAS dsyrk on a block of columns at a time)
    G = W diag(λ) Wᵀ   (LAPACK dsyevd: every pair; dsyevx: only the top k + 1)
    S_i = sqrt(λ_i),  W = U (m <= n) or V (m > n)

On CPU this costs 0.25 to 0.7 of LAPACK's float32 SVD at the shapes of an LLM with
every pair (2048 x 5632: 1.2 s against 4.9 s on 2 threads, docs/performance.md), which
LSSF's automatic rank needs, and 0.13 to 0.35 with the top k + 1 (0.66 s), which is
all the bound below reads at rank k.

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

from typing import NamedTuple, Optional

import numpy as np
import scipy.linalg
import torch
from scipy.linalg import blas
from threadpoolctl import ThreadpoolController

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
    """``values [..., t]`` (the top ``t`` λ, descending, float64), ``vectors [..., s, t]``
    (their eigenvectors as columns, float64), ``left`` (vectors are left singular
    vectors), ``error [...]`` (``e`` above), ``total [...]`` (``|M|_F²``) and ``size``
    (``s``, the smaller side: ``t == s`` unless only the top ``t`` were asked for)."""

    values: torch.Tensor
    vectors: torch.Tensor
    left: bool
    error: torch.Tensor
    total: torch.Tensor
    size: int


# BLAS threads: SciPy's OpenBLAS keeps its own pool, whose idle threads spin for a while
# after each call and then starve torch's threads on the same cores (measured: the
# sketch's passes of a 1536 x 512 matrix ran 10 times slower right after a 2-thread
# eigendecomposition). So a matrix whose smaller side is below this runs OpenBLAS on one
# thread (no pool, no spinning); larger ones, whose calls last long enough to be worth it,
# on as many as torch uses.
_PARALLEL_SIDE = 1024
_controller = None


def _blas_threads(short: int):
    """A context in which SciPy's BLAS and LAPACK use the threads chosen for a Gram side of
    ``short`` (one below ``_PARALLEL_SIDE``, else ``torch.get_num_threads()``)."""
    global _controller
    if _controller is None:
        _controller = ThreadpoolController()
    threads = 1 if short < _PARALLEL_SIDE else torch.get_num_threads()
    return _controller.limit(limits=threads, user_api="blas")


def _gram64(A: torch.Tensor) -> torch.Tensor:
    """The lower triangle of ``A Aᵀ`` in float64 (the strict upper triangle is 0), with
    BLAS's ``dsyrk`` on blocks of columns converted to float64 one at a time: half the
    products of a general matrix product, and no float64 copy of ``A``."""
    short, long = A.shape[-2:]
    columns = max(1, _BLOCK_ELEMENTS // max(short, 1))
    flat = A.reshape(-1, short, long)
    G = torch.empty(flat.shape[0], short, short, dtype=torch.float64, device=A.device)
    with _blas_threads(short):
        for index, matrix in enumerate(flat):
            G[index] = _gram64_one(matrix, columns)
    return G.reshape(*A.shape[:-1], short)


def _gram64_one(matrix: torch.Tensor, columns: int) -> torch.Tensor:
    short, long = matrix.shape
    # Fortran order: dsyrk accumulates into it in place.
    gram = np.zeros((short, short), dtype=np.float64, order="F")
    for start in range(0, long, columns):
        block = matrix[:, start : start + columns].to(torch.float64).contiguous().numpy()
        # block is C-ordered s x c, so block.T is a Fortran c x s matrix a, and
        # trans=1 gives aᵀ a = block blockᵀ.
        gram = blas.dsyrk(1.0, block.T, beta=1.0, c=gram, trans=1, lower=1, overwrite_c=1)
    return torch.from_numpy(gram)


def _eigenpairs(G: torch.Tensor, top: Optional[int] = None):
    """Eigenpairs of each symmetric ``G`` (lower triangle read), ascending: every pair, or
    only the ``top`` largest. Every pair of a side of ``_PARALLEL_SIDE`` or more by
    LAPACK's ``dsyevd`` through SciPy (0.86 s for 2048 x 2048 on this 2-core machine,
    against 1.04 s for ``torch.linalg.eigh``, whose MKL is slower on this AMD CPU), of a
    smaller side by ``torch.linalg.eigh`` (faster there than one OpenBLAS thread); the
    top pairs by ``dsyevx`` (bisection and inverse iteration: 9 of 2048 in 0.26 s)."""
    short = G.shape[-1]
    if top is None and short < _PARALLEL_SIDE:
        return torch.linalg.eigh(G, UPLO="L")
    width = short if top is None else top
    flat = G.reshape(-1, short, short)
    values = torch.empty(flat.shape[0], width, dtype=torch.float64)
    vectors = torch.empty(flat.shape[0], short, width, dtype=torch.float64)
    if top is None:
        options = {"driver": "evd"}
    else:
        options = {"driver": "evx", "subset_by_index": [short - top, short - 1]}
    with _blas_threads(short):
        for index, matrix in enumerate(flat):
            w, v = scipy.linalg.eigh(matrix.numpy(), lower=True, check_finite=False, **options)
            values[index], vectors[index] = torch.from_numpy(w), torch.from_numpy(v)
    return values.reshape(*G.shape[:-2], width), vectors.reshape(*G.shape[:-2], short, width)


def spectrum(matrix: torch.Tensor, top: Optional[int] = None) -> GramSpectrum:
    """Every ``λ_i = S_i²`` and the singular vectors of the smaller side; with ``top``,
    only the largest ``top`` of them where that is cheaper (``top <= s / 4``)."""
    left = matrix.shape[-2] <= matrix.shape[-1]
    A = matrix if left else matrix.mT
    short, long = A.shape[-2:]
    G = _gram64(A)
    total = torch.diagonal(G, dim1=-2, dim2=-1).sum(dim=-1)
    values, vectors = _eigenpairs(G, top if top is not None and 4 * top <= short else None)
    gamma = long * _U64 / (1 - long * _U64)
    error = (gamma + short * _U64) * total
    return GramSpectrum(values.flip(-1).clamp_min(0), vectors.flip(-1), left, error, total, short)


def term_bound(spec: GramSpectrum, ranks: torch.Tensor) -> torch.Tensor:
    """The proven bound on ``|P~_k M - P_k M|_F / |P_k M|_F`` for each matrix's rank ``k``
    (module docstring); 0 where nothing is truncated or ``M == 0``, inf where no
    ``j <= k`` gives a finite bound."""
    values, e = spec.values, spec.error.unsqueeze(-1)
    s = spec.size
    k = ranks.to(values.device).clamp(1, s).unsqueeze(-1)
    if values.shape[-1] < s and int(k.max()) >= values.shape[-1]:
        # Every candidate j <= k below reads λ_1..λ_{k+1}: a partial spectrum must hold them.
        raise ValueError(f"a spectrum of the top {values.shape[-1]} values bounds ranks below it, got {int(k.max())}")
    # sinθ_j for j = 0..s (j = 0: the empty subspace, exact; j = s: everything).
    following = torch.cat([values[..., 1:], torch.zeros_like(values[..., :1])], dim=-1)
    separation = values - following - e
    sin_theta = torch.where(separation > 0, e / separation.clamp_min(torch.finfo(torch.float64).tiny), torch.inf)
    sin_theta = torch.cat([torch.zeros_like(values[..., :1]), sin_theta.clamp(max=1)], dim=-1)
    if values.shape[-1] == s:
        sin_theta[..., -1] = 0  # j = s: P = I
    cumulative = torch.cat([torch.zeros_like(values[..., :1]), torch.cumsum(values + e, dim=-1)], dim=-1)
    mixed = (cumulative.gather(-1, k) - cumulative).clamp_min(0).sqrt()
    norm = spec.total.sqrt().unsqueeze(-1)
    candidates = sin_theta * norm + 2 * mixed
    j = torch.arange(values.shape[-1] + 1, device=values.device)
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
