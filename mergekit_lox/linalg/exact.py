"""The exact decompositions and the small matrix helpers every path shares."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float32 math whatever the storage dtype; float64 when a caller asks for it."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


class Decomposition(NamedTuple):
    """Thin SVD factors ``U [..., m, r]``, ``S [..., r]``, ``Vh [..., r, n]``."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor

    def leading(self, k: int) -> "Decomposition":
        """The first ``k`` triplets of each matrix."""
        return Decomposition(self.U[..., :k], self.S[..., :k], self.Vh[..., :k, :])


def full_rank_of(matrix: torch.Tensor) -> int:
    return min(matrix.shape[-2], matrix.shape[-1])


def truncates(matrix: torch.Tensor, k: int) -> bool:
    """True when rank ``k`` actually truncates (0 and k >= min(m, n) mean 'all')."""
    return 0 < k < full_rank_of(matrix)


def svd(matrix: torch.Tensor) -> Decomposition:
    """Exact thin SVD, batched over leading dimensions.

    A wide matrix is decomposed through its transpose, which LAPACK's divide and
    conquer does several times faster on CPU (docs/performance.md), with factors
    equal up to rounding.
    """
    if matrix.shape[-2] < matrix.shape[-1]:
        U, S, Vh = torch.linalg.svd(matrix.mT, full_matrices=False)
        return Decomposition(Vh.mT, S, U.mT)
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    return Decomposition(U, S, Vh)


def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """All singular values (no vectors), descending, through the faster orientation."""
    return torch.linalg.svdvals(matrix.mT if matrix.shape[-2] < matrix.shape[-1] else matrix)


def compose(factors: Decomposition) -> torch.Tensor:
    """``U diag(S) Vh`` for a (possibly truncated) decomposition."""
    return (factors.U * factors.S.unsqueeze(-2)) @ factors.Vh


def rank_mask(width: int, k: torch.Tensor, device) -> torch.Tensor:
    """``[..., width]``: True for the first ``k`` positions of each matrix of a stack."""
    return torch.arange(width, device=device) < k.to(device).unsqueeze(-1)


def lowrank_per_matrix(factors: Decomposition, k: torch.Tensor) -> torch.Tensor:
    """``lowrank_k`` with a different ``k`` for each matrix of a stack.

    Masks singular values instead of slicing, so the whole stack is one batched
    product and no rank is read back to the host.
    """
    keep = rank_mask(factors.S.shape[-1], k, factors.S.device)
    return compose(Decomposition(factors.U, factors.S * keep, factors.Vh))


def nonzero_mask(S: torch.Tensor, shape) -> torch.Tensor:
    """Singular values that are non-zero at working precision (as matrix_rank)."""
    eps = torch.finfo(S.dtype).eps
    cutoff = S[..., :1] * (max(shape[-2], shape[-1]) * eps)
    return S > cutoff


def left_project(basis: torch.Tensor, update: torch.Tensor, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
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


def sum_of_squares(tensor: torch.Tensor, dim=(-2, -1)) -> torch.Tensor:
    """``sum x²`` over ``dim``, accurate to a few units of roundoff, in ``tensor``'s dtype.

    Not ``torch.linalg.vector_norm``: on CPU its float32 reduction lost 4.5e-4 (relative)
    of the norm of a 2048 x 5632 matrix, against 8e-9 for the summation of ``x * x``
    (measured, torch 2.13), enough to move a Safe LoRA cosine by 8e-4 and to break a
    rounding interval of a few ``u``.
    """
    return (tensor * tensor).sum(dim=dim)


def frobenius(matrix: torch.Tensor) -> torch.Tensor:
    """Frobenius norm of each matrix of a stack, shaped to broadcast back (accurate:
    ``sum_of_squares``)."""
    return sum_of_squares(matrix).sqrt().unsqueeze(-1).unsqueeze(-1)


def add_product(target: torch.Tensor, left: torch.Tensor, right: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``target + alpha * left @ right`` as one fused product (addmm / baddbmm), stacks too."""
    if target.ndim == 2:
        return torch.addmm(target, left, right, alpha=alpha)
    m, n, r = target.shape[-2], target.shape[-1], left.shape[-1]
    flat = torch.baddbmm(target.reshape(-1, m, n), left.reshape(-1, m, r), right.reshape(-1, r, n), alpha=alpha)
    return flat.reshape(target.shape)
