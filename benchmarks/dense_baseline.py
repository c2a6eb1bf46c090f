"""The dense baseline: how the public reference scripts compute the three methods.

Like VITA-Group/LoX's ``safety/LoX.py``: load every input model fully into
memory, then take a full SVD (``torch.linalg.svd``, thin factors) of the delta
of every tensor with 2 or more dimensions, and write the result. LSSF (no
public code) and Safe LoRA's orthogonal projection get the same treatment;
Safe LoRA's scaled projection needs no SVD and is computed as ``V (Vᵀ dW)``.
Everything in float32 on ``--device``.

This file deliberately does not import mergekit or mergekit_lox: it stands for
"the script you would otherwise run". Used by bench_lowrank.py.

    python benchmarks/dense_baseline.py lox --base B --aligned A --out OUT [--rank 6 --alpha 1.25]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil

import torch
from safetensors.torch import load_file, save_file


def load_model(path: str, device: str):
    state = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            state.update(load_file(os.path.join(path, name), device=device))
    return state


def entropy_rank(S: torch.Tensor, shape, rank_scale: float) -> int:
    S = S.double()
    S = S[S > S[0] * max(shape) * torch.finfo(torch.float32).eps] if S[0] > 0 else S[:0]
    if S.numel() == 0:
        return 1
    p = S / S.sum()
    H = float(-(p * p.log()).sum())
    return int(min(max(math.ceil(rank_scale * math.exp(H) * (1 - 1e-6)), 1), min(shape)))


def lox(W_a, W_b, args):
    U, S, Vh = torch.linalg.svd(W_a - W_b, full_matrices=False)
    k = args.rank if args.rank > 0 else S.numel()
    return W_a + args.alpha * (U[:, :k] * S[:k]) @ Vh[:k, :]


def lssf(W_f, W_a, W_b, args):
    U, S, Vh = torch.linalg.svd(W_a - W_b, full_matrices=False)
    k = args.rank if args.rank > 0 else entropy_rank(S, W_a.shape, args.rank_scale)
    return W_f + args.scale * (U[:, :k] * S[:k]) @ Vh[:k, :]


def safelora(W_f, W_a, W_b, args):
    V, dW = W_a - W_b, W_f - W_a
    if args.projection == "orthogonal":
        U = torch.linalg.svd(V, full_matrices=False)[0][:, : args.rank]
        projected = U @ (U.T @ dW)
    else:
        projected = V @ (V.T @ dW) / torch.linalg.norm(V)
    cos = torch.nn.functional.cosine_similarity(projected.reshape(1, -1), dW.reshape(1, -1))
    return W_a + projected if float(cos) <= args.threshold else W_f


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("method", choices=["lox", "lssf", "safelora"])
    parser.add_argument("--base", required=True)
    parser.add_argument("--aligned", required=True)
    parser.add_argument("--finetuned")
    parser.add_argument("--out", required=True)
    parser.add_argument("--alpha", type=float, default=1.25)
    parser.add_argument("--rank", type=int, default=None)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--rank-scale", type=float, default=1.0)
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--projection", default="orthogonal", choices=["scaled", "orthogonal"])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.rank is None:
        args.rank = {"lox": 6, "lssf": 0, "safelora": 8}[args.method]

    models = {"base": load_model(args.base, args.device), "aligned": load_model(args.aligned, args.device)}
    if args.method != "lox":
        models["finetuned"] = load_model(args.finetuned, args.device)
    # The result replaces the model it is computed from, as the reference
    # script updates the aligned model's parameters in place: the peak holds
    # the inputs, not the inputs and a copy.
    out = models["aligned"] if args.method == "lox" else models["finetuned"]
    with torch.no_grad():
        for name, aligned in list(models["aligned"].items()):
            W_a, W_b = aligned.float(), models["base"][name].float()
            W_f = models["finetuned"][name].float() if args.method != "lox" else None
            if aligned.ndim < 2:
                result = W_a if args.method == "lox" else W_f
            elif args.method == "lox":
                result = lox(W_a, W_b, args)
            elif args.method == "lssf":
                result = lssf(W_f, W_a, W_b, args)
            else:
                result = safelora(W_f, W_a, W_b, args)
            out[name] = result.to(aligned.dtype).contiguous().cpu()
    os.makedirs(args.out, exist_ok=True)
    save_file(out, os.path.join(args.out, "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(os.path.join(args.aligned, "config.json"), args.out)


if __name__ == "__main__":
    main()
