"""Per-matrix cost of ``svd: auto`` (certified sketch, else the certified float64 Gram
path, else LAPACK) against LAPACK's exact SVD (not a test).

For each family of bench_models.FAMILIES and each matrix shape of a Llama layer
(70M and hidden-2048 shapes), it builds one delta matrix with that family's
spectrum and times, interleaved, ``--repeats`` times each (medians reported):
the exact SVD (``linalg.svd``) and ``linalg.guarded_top_k(M, k, "auto")``;
it reports the path taken ("fallback to Gram": the sketch was not certified, the Gram path
was), the time against the exact SVD, the certified bound and
the true error of the low-rank term against a float64 SVD.

    python benchmarks/bench_certificate.py                    # 70M shapes, k = 6
    python benchmarks/bench_certificate.py --shapes 2048x2048,5632x2048,32000x2048
    python benchmarks/bench_certificate.py --gram-table       # the Gram path's parts, per shape
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_models import FAMILIES, Planting, delta_spectrum  # noqa: E402

from mergekit_lox import linalg  # noqa: E402

SHAPES_70M = "512x512,256x512,1536x512,512x1536,32000x512"


def delta(m: int, n: int, planting: Planting, seed: int = 0) -> torch.Tensor:
    """One float32 delta with the family's spectrum (as bench_models.generate builds it)."""
    generator = torch.Generator().manual_seed(seed)
    r = min(m, n)
    S = delta_spectrum(r, planting).float()
    U = torch.linalg.qr(torch.randn(m, r, generator=generator)).Q
    V = torch.linalg.qr(torch.randn(n, r, generator=generator)).Q
    M = (U * S) @ V.T
    if planting.floor > 0:
        noise = torch.randn(m, n, generator=generator)
        M += noise * (planting.floor * float(S[max(planting.planted_rank, 1) - 1]) / float(noise.norm()))
    return M


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def measure(M: torch.Tensor, k: int, repeats: int) -> dict:
    exact, guarded = [], []
    for _ in range(repeats):
        exact.append(timed(lambda: linalg.svd(M)))
        guarded.append(timed(lambda: linalg.guarded_top_k(M, k, "auto")))
    linalg.reset_svd_counts()
    result = linalg.guarded_top_k(M, k, "auto")
    counts = linalg.svd_counts()
    path = "randomized" if counts["randomized"] else ("fallback" if counts["fallback"] else "exact")
    if counts["gram"]:
        path += " to Gram"  # the float64 Gram path (linalg/gram.py) did the decomposition
    U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    truth = (U[:, :k] * S[:k]) @ Vh[:k]
    error = float((linalg.compose(result.factors).double() - truth).norm() / truth.norm())
    return {
        "path": path,
        "exact_s": statistics.median(exact),
        "guarded_s": statistics.median(guarded),
        "bound": float(result.bound),
        "error": error,
        "s_next_over_s_k": float(S[k] / S[k - 1]),
    }


def gram_table(shapes, repeats: int) -> None:
    """Where the Gram path's time goes, per shape: LAPACK's float32 SVD against the
    float64 Gram product, all eigenpairs, the top 9, and ``gram.spectrum`` in all."""
    from mergekit_lox.linalg import gram

    def median(function, *args) -> float:
        function(*args)  # warm: the first LAPACK call of a process is slower
        return statistics.median(timed(lambda: function(*args)) for _ in range(repeats))

    print(
        "| shape | `torch.linalg.svd` float32 | Gram float64 (`dsyrk`) | all pairs (`dsyevd`) "
        "| top 9 pairs (`dsyevx`) | `gram.spectrum`, all | `gram.spectrum(top=9)` |"
    )
    print("|---|---|---|---|---|---|---|")
    for m, n in shapes:
        M = torch.randn(m, n, generator=torch.Generator().manual_seed(0))
        A = M if m <= n else M.mT
        G = gram._gram64(A)
        times = [
            median(torch.linalg.svd, M, False),
            median(gram._gram64, A),
            median(gram._eigenpairs, G),
            median(gram._eigenpairs, G, 9),
            median(gram.spectrum, M),
            median(gram.spectrum, M, 9),
        ]
        print(f"| {m} x {n} | " + " | ".join(f"{t:.2f}" for t in times) + " |", flush=True)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=SHAPES_70M, help="comma-separated MxN")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--k", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    parser.add_argument(
        "--gram-table", action="store_true", help="only time the Gram path's parts (default shapes: hidden 2048)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gram_table and args.shapes == SHAPES_70M:
        args.shapes = "2048x5632,2048x2048,32000x2048"
    shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")]
    if args.gram_table:
        gram_table(shapes, min(args.repeats, 3))
        return {}
    rows = []
    print(f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}, medians of {args.repeats}")
    print("| family | shape | s_{k+1}/s_k | path | exact s | guarded s | guarded / exact | bound | true error |")
    print("|---|---|---|---|---|---|---|---|---|")
    for family in args.families.split(","):
        for planting in FAMILIES[family]:
            for m, n in shapes:
                row = measure(delta(m, n, planting), args.k, args.repeats)
                row.update(family=family, decay=planting.decay, shape=[m, n])
                rows.append(row)
                label = family if family != "power-law" else f"power-law b={planting.decay}"
                print(
                    f"| {label} | {m} x {n} | {row['s_next_over_s_k']:.2f} | {row['path']} | {row['exact_s']:.3f} | "
                    f"{row['guarded_s']:.3f} | {row['guarded_s'] / row['exact_s']:.2f} | {row['bound']:.1e} | "
                    f"{row['error']:.1e} |",
                    flush=True,
                )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return {"rows": rows}


if __name__ == "__main__":
    main()
