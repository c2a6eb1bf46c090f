"""Independent float64 evaluations of docs/methods.md, in NumPy (not torch, not our code).

Every output tensor of a real merge is compared against these, tensor by tensor.
"""

from __future__ import annotations

import math

import numpy as np


def f64(tensor) -> np.ndarray:
    return tensor.detach().double().cpu().numpy()


def rel_err(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    denom = np.linalg.norm(expected)
    return float(np.linalg.norm(actual - expected) / (denom if denom > 0 else 1.0))


def lowrank(M: np.ndarray, k: int) -> np.ndarray:
    """lowrank_k over the last two axes; k = 0 or k >= min(m, n) is M."""
    if k == 0 or k >= min(M.shape[-2:]):
        return M
    U, S, Vh = np.linalg.svd(M, full_matrices=False)
    return (U[..., :, :k] * S[..., None, :k]) @ Vh[..., :k, :]


def lox(W_a, W_b, alpha, rank):
    if W_a.ndim < 2:
        return W_a
    return W_a + alpha * lowrank(W_a - W_b, rank)


CEIL_TOLERANCE = 1e-6  # linalg.entropy_rank's ceil, not bumped by rounding of an integer exp(H)


def entropy_rank_of(M: np.ndarray, rank_scale: float) -> int:
    """clamp(ceil(rank_scale * exp(H)), 1, min(m, n)) with p_i = S_i / sum S (Roy and
    Vetterli's effective rank): linalg.entropy_rank's rule, no longer LSSF's."""
    S = np.linalg.svd(M, compute_uv=False)
    S = S[S > S[0] * max(M.shape) * np.finfo(np.float32).eps] if S[0] > 0 else S[:0]
    if S.size == 0:
        return 1
    p = S / S.sum()
    H = -np.sum(p * np.log(p))
    k = math.ceil(rank_scale * math.exp(H) * (1 - CEIL_TOLERANCE))
    return int(min(max(k, 1), min(M.shape)))


def lssf_rank_of(S: np.ndarray, shape, eta: float, eps: float = float(np.finfo(np.float32).eps)) -> int:
    """docs/methods.md section 2's automatic rank from singular values S (descending) of an
    m x n matrix: energies p_i = S_i^2 / sum S_j^2, h_i = -p_i ln p_i, the smallest r
    with H_r >= eta H (1 when H == 0; full rank when eta = 1). Values at or below S_1 max(m, n) eps are rounding
    noise and count as zero (docs/lssf.md)."""
    S = np.asarray(S, np.float64)
    if S.size == 0 or S[0] <= 0:
        return 1
    S = np.where(S > S[0] * max(shape[-2:]) * eps, S, 0.0)
    p = S**2 / np.sum(S**2)
    partial = np.cumsum([-x * math.log(x) if x > 0 else 0.0 for x in p])
    H = partial[-1]  # H = H_n, the last partial sum (so that eta = 1 finds it)
    if H == 0:
        return 1
    if eta >= 1:
        return S.size  # full rank by definition (docs/methods.md section 2)
    return int(np.argmax(partial >= eta * H)) + 1


def lssf_matrix(W_f, tau, scale=1.0, eta=0.9, rank=0, top_weight=1.0, basis=None):
    """One matrix: W_f + scale U' U'^T tau, U' = U[:, :r] diag(a), formed explicitly.

    ``basis``: a calibrated (U, S); None = the SVD of tau itself (data-free)."""
    if basis is None:
        U, S, _ = np.linalg.svd(tau, full_matrices=False)
    else:
        U, S = (np.asarray(t, np.float64) for t in basis)
    r = min(rank, *tau.shape) if rank > 0 else lssf_rank_of(S, tau.shape, eta)
    r = min(r, U.shape[1])
    top = S[:r]
    if top[0] == top[-1]:
        a = np.ones(r)
    else:
        a = 1 + (top_weight - 1) * (top - top[-1]) / (top[0] - top[-1])
    Up = U[:, :r] * a
    return W_f + scale * Up @ Up.T @ tau


def lssf(W_f, W_a, W_b, scale=1.0, eta=0.9, rank=0, top_weight=1.0, basis=None):
    """lssf_fusion on one tensor: 1-D passes W_f through; a stack is fused matrix by matrix."""
    if W_f.ndim < 2:
        return W_f
    tau = W_a - W_b
    if W_f.ndim > 2:
        stack = tau.reshape(-1, *tau.shape[-2:])
        out = W_f.reshape(stack.shape).copy()
        for i, matrix in enumerate(stack):
            out[i] = lssf_matrix(out[i], matrix, scale, eta, rank, top_weight)
        return out.reshape(W_f.shape)
    return lssf_matrix(W_f, tau, scale, eta, rank, top_weight, basis)


def safelora_projection(V: np.ndarray, dW: np.ndarray, projection: str, rank: int) -> np.ndarray:
    if projection == "scaled":
        C = V @ V.swapaxes(-1, -2) / np.linalg.norm(V, axis=(-2, -1), keepdims=True)
    else:
        U, S, _ = np.linalg.svd(V, full_matrices=False)
        # Only directions V actually has (non-zero singular values, as matrix_rank).
        nonzero = S > S[..., :1] * max(V.shape[-2:]) * np.finfo(np.float32).eps
        U = (U * nonzero[..., None, :])[..., :, :rank]
        C = U @ U.swapaxes(-1, -2)
    return C @ dW


def safelora_cosine(W_f, W_a, W_b, projection="scaled", rank=8) -> float:
    """NaN when V or dW is zero; 0 when C dW is zero (the limit, as the reference)."""
    V, dW = W_a - W_b, W_f - W_a
    if not V.any() or not dW.any():
        return float("nan")
    CdW = safelora_projection(V, dW, projection, rank)
    norms = np.linalg.norm(CdW) * np.linalg.norm(dW)
    return float(np.sum(CdW * dW) / norms) if norms > 0 else 0.0


def safelora(W_f, W_a, W_b, threshold=0.5, projection="scaled", rank=8):
    if W_f.ndim < 2:
        return W_f
    V, dW = W_a - W_b, W_f - W_a
    if not V.any() or not dW.any():
        return W_f
    if safelora_cosine(W_f, W_a, W_b, projection, rank) <= threshold:
        return W_a + safelora_projection(V, dW, projection, rank)
    return W_f


def peft_lora_finetuned(aligned: dict, adapter: dict, scaling) -> dict:
    """W_f = W_a + s B A for every `base_model.model.<module>.lora_A/B.weight` pair.

    ``aligned`` maps tensor names to float64 arrays, ``adapter`` maps the PEFT
    adapter's keys to arrays, ``scaling(module)`` gives s = lora_alpha / r.
    """
    finetuned = dict(aligned)
    for key, A in adapter.items():
        if key.endswith(".lora_A.weight"):
            module = key[: -len(".lora_A.weight")].removeprefix("base_model.model.")
            B = adapter[key.replace(".lora_A.weight", ".lora_B.weight")]
            finetuned[module + ".weight"] = aligned[module + ".weight"] + scaling(module) * (B @ A)
    return finetuned


def safemerge(W_f, W_s, W_a, W_b, threshold=0.35, safety_weight=0.2, projection="scaled", rank=8):
    """SafeMERGE (arXiv 2503.17239): the fine-tuned layer, or where its Safe LoRA cosine is
    below the threshold (strictly), (1 - w) W_f + w W_s; W_f where the cosine is undefined."""
    if W_f.ndim < 2:
        return W_f
    cos = safelora_cosine(W_f, W_a, W_b, projection, rank)
    if np.isfinite(cos) and cos < threshold:
        return (1 - safety_weight) * W_f + safety_weight * W_s
    return W_f


def safemerge_code_cosine(P, lora_A, lora_B) -> float:
    """The authors' `compute_safelora_cos` (github.com/aladinD/SafeMERGE, utils.py),
    transcribed: cos(P B A, B A) over the flattened matrices, rounded to 5 decimals;
    P = V Vᵀ / ||V||_F (0 when ||V||_F < 1e-9). The adapter's scaling is left out there."""
    projected, original = (P @ lora_B @ lora_A).ravel(), (lora_B @ lora_A).ravel()
    eps = 1e-8  # torch.nn.functional.cosine_similarity's
    denominator = max(np.linalg.norm(projected) * np.linalg.norm(original), eps)
    return float(np.round(projected @ original / denominator, 5))


def safemerge_code_projection(V) -> np.ndarray:
    norm = np.linalg.norm(V)
    return np.zeros((V.shape[0], V.shape[0])) if norm < 1e-9 else V @ V.T / norm


def resta(W_sft, W_aligned, W_unaligned, beta):
    """RESTA (Bhardwaj et al., ACL 2024): theta_sft + beta (theta_aligned - theta_unaligned)."""
    return W_sft + beta * (W_aligned - W_unaligned)
