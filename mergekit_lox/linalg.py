"""The linear algebra every method shares, written once.

All functions take a matrix or a stack of matrices (``[..., m, n]``: tensors
with more than 2 dimensions are batches over the leading dimensions, never
flattened) and stay on the input's device without host synchronisation, so
they run unchanged on mergekit's CPU or GPU executor.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

# ceil() of a float effective rank that is an integer up to rounding (e.g. four
# equal singular values give exp(H) = 4.0000001) must not add a dimension.
_CEIL_TOLERANCE = 1e-6


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float32 math whatever the storage dtype; float64 when a caller asks for it."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def as_compute(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype=dtype)


class Decomposition(NamedTuple):
    """Thin SVD factors ``U [..., m, r]``, ``S [..., r]``, ``Vh [..., r, n]``."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor


def full_rank_of(matrix: torch.Tensor) -> int:
    return min(matrix.shape[-2], matrix.shape[-1])


def truncates(matrix: torch.Tensor, k: int) -> bool:
    """True when rank ``k`` actually truncates (0 and k >= min(m, n) mean 'all')."""
    return 0 < k < full_rank_of(matrix)


def svd(matrix: torch.Tensor) -> Decomposition:
    """Exact thin SVD, batched over leading dimensions."""
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    return Decomposition(U, S, Vh)


def top_k(matrix: torch.Tensor, k: int) -> Decomposition:
    """The top-``k`` singular triplets of ``matrix`` (exact)."""
    U, S, Vh = svd(matrix)
    return Decomposition(U[..., :k], S[..., :k], Vh[..., :k, :])


def compose(factors: Decomposition) -> torch.Tensor:
    """``U diag(S) Vh`` for a (possibly truncated) decomposition."""
    return (factors.U * factors.S.unsqueeze(-2)) @ factors.Vh


def lowrank(matrix: torch.Tensor, k: int) -> torch.Tensor:
    """``lowrank_k(M) = U[:, :k] diag(S[:k]) Vh[:k, :]``; k = 0 or k >= min(m, n) is M."""
    if not truncates(matrix, k):
        return matrix
    return compose(top_k(matrix, k))


def nonzero_mask(S: torch.Tensor, shape) -> torch.Tensor:
    """Singular values that are non-zero at working precision (as matrix_rank)."""
    eps = torch.finfo(S.dtype).eps
    cutoff = S[..., :1] * (max(shape[-2], shape[-1]) * eps)
    return S > cutoff


def singular_value_entropy(S: torch.Tensor, shape) -> torch.Tensor:
    """``H = -sum p_i ln p_i`` with ``p_i = S_i / sum S_j`` over non-zero S_i.

    Computed in float64 (it is a short vector per matrix); 0 for a zero matrix.
    """
    S = S.to(torch.float64)
    S = torch.where(nonzero_mask(S, shape), S, torch.zeros_like(S))
    total = S.sum(dim=-1, keepdim=True)
    p = S / torch.where(total > 0, total, torch.ones_like(total))
    plogp = torch.where(p > 0, p * torch.log(torch.where(p > 0, p, torch.ones_like(p))), 0.0)
    return -plogp.sum(dim=-1)


def effective_rank(S: torch.Tensor, shape) -> torch.Tensor:
    """Roy & Vetterli's effective rank ``exp(H)``."""
    return torch.exp(singular_value_entropy(S, shape))


def entropy_rank(S: torch.Tensor, shape, rank_scale: float = 1.0) -> torch.Tensor:
    """LSSF's automatic rank ``clamp(ceil(rank_scale * exp(H)), 1, min(m, n))``.

    Returns an integer tensor with one rank per matrix of the stack.
    """
    scaled = rank_scale * effective_rank(S, shape)
    k = torch.ceil(scaled * (1 - _CEIL_TOLERANCE))
    return k.clamp(min=1, max=min(shape[-2], shape[-1])).to(torch.int64)


def lowrank_per_matrix(factors: Decomposition, k: torch.Tensor) -> torch.Tensor:
    """``lowrank_k`` with a different ``k`` for each matrix of a stack.

    Masks singular values instead of slicing, so the whole stack is one batched
    product and no rank is read back to the host.
    """
    r = factors.S.shape[-1]
    keep = torch.arange(r, device=factors.S.device) < k.to(factors.S.device).unsqueeze(-1)
    return compose(Decomposition(factors.U, factors.S * keep, factors.Vh))


def left_project(
    basis: torch.Tensor, update: torch.Tensor, scale: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``basis basisᵀ update`` (divided by ``scale``), in the cheaper association.

    ``basis`` is ``[..., m, r]`` and ``update`` ``[..., m, n]``. Forming the
    ``m x m`` Gram matrix first costs ``m² (r + n)``; ``basis (basisᵀ update)``
    costs ``2 m r n``. For Safe LoRA's scaled projection (basis = V, r = n) the
    Gram path wins only when m < n, so an out x out matrix is never built for a
    tall matrix; for a thin orthonormal basis (small r) it never wins.
    """
    m, r = basis.shape[-2], basis.shape[-1]
    n = update.shape[-1]
    if m * (r + n) < 2 * r * n:
        result = (basis @ basis.transpose(-2, -1)) @ update
    else:
        result = basis @ (basis.transpose(-2, -1) @ update)
    if scale is not None:
        result = result / scale
    return result


def frobenius(matrix: torch.Tensor) -> torch.Tensor:
    """Frobenius norm of each matrix of a stack, shaped to broadcast back."""
    return torch.linalg.matrix_norm(matrix, ord="fro").unsqueeze(-1).unsqueeze(-1)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of two tensors seen as flat vectors (NaN when either is zero)."""
    a = a.reshape(-1)
    b = b.reshape(-1)
    return torch.dot(a, b) / (torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b))


__all__ = [
    "Decomposition",
    "as_compute",
    "compose",
    "compute_dtype",
    "cosine",
    "effective_rank",
    "entropy_rank",
    "frobenius",
    "full_rank_of",
    "left_project",
    "lowrank",
    "lowrank_per_matrix",
    "nonzero_mask",
    "singular_value_entropy",
    "svd",
    "top_k",
    "truncates",
]
