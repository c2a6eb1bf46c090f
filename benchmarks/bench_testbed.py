"""The behavioural testbed over several seeds: every row of the demo's table with intervals
across seeds (issue 24). docs/eval.md shows its output.

    python benchmarks/bench_testbed.py --seeds 5 [-o benchmarks/results/testbed] [--device cuda --size large]

Per seed it builds the whole testbed (`mergekit_lox.demo.testbed.run_testbed`: base,
aligned, LoX, the full and LoRA fine-tunes through `mergekit-lox attack`, LSSF and Safe
LoRA, eval), then prints, per model and measure, the mean over seeds with a 95% t-interval
of that mean and the per-seed range, the alignment change and the benign fine-tune's drop
of harmful refusal per seed, and writes everything to OUT/testbed.json.

``--size large`` (hidden 512, 8 layers: about 30M parameters) is the GPU configuration;
on 2 CPU cores the default size takes about 30 s a seed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

MEASURES = (  # (column, path in a result row)
    ("harmful refused", ("harmful", "refusal_rate")),
    ("refusal word", ("harmful_words",)),
    ("harmful done", ("harmful_done",)),
    ("benign refused", ("benign", "refusal_rate")),
    ("benign done", ("benign_done",)),
)
SIZES = {"demo": {}, "large": {"hidden_size": 512, "num_hidden_layers": 8}}


def value(row: dict, path) -> float:
    for key in path:
        row = row[key]
    return float(row)


def interval(values) -> str:
    """mean [95% t-interval of the mean] (range)."""
    from scipy import stats

    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.2f}"
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return (
        f"{mean:.2f} [{max(0.0, mean - half):.2f}, {min(1.0, mean + half):.2f}] ({min(values):.2f}-{max(values):.2f})"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default="demo")
    parser.add_argument("-o", "--out", default="benchmarks/results/testbed")
    args = parser.parse_args(argv)

    from mergekit_lox.demo import testbed as tb
    from mergekit_lox.run import run_recipe

    runs, timings, changes, drops = [], [], [], []
    for seed in range(args.seeds):
        root = os.path.join(args.out, f"seed-{seed}")
        spec = tb.TestbedSpec(seed=seed, device=args.device, **SIZES[args.size])
        started = time.perf_counter()
        results = tb.run_testbed(root, lambda r, o: run_recipe(r, o, ["--quiet"]), echo=lambda line: None, spec=spec)
        timings.append(time.perf_counter() - started)
        changes.append(statistics.median(tb.alignment_change(results["base"]["model"], results["aligned"]["model"])))
        drops.append(results["aligned"]["harmful"]["refusal_rate"] - results["benign FT"]["harmful"]["refusal_rate"])
        runs.append(results)
        print(
            f"seed {seed}: {timings[-1]:.0f} s, alignment change median {changes[-1]:.1%}, "
            f"benign FT drop {drops[-1]:.2f}"
        )
    labels = list(runs[0])
    print()
    print(f"| model ({args.seeds} seeds, {args.size}, {args.device}) | " + " | ".join(m for m, _ in MEASURES) + " |")
    print("|---|" + "---|" * len(MEASURES))
    table = {}
    for label in labels:
        cells = [interval([value(run[label], path) for run in runs]) for _, path in MEASURES]
        table[label] = dict(zip([m for m, _ in MEASURES], cells, strict=True))
        print(f"| {label} | " + " | ".join(cells) + " |")
    print()
    print("alignment change (median relative, per seed): " + ", ".join(f"{c:.1%}" for c in changes))
    print("benign fine-tune's drop of harmful refusal (per seed): " + ", ".join(f"{d:.2f}" for d in drops))
    print(f"seconds per seed: {', '.join(f'{t:.0f}' for t in timings)}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "testbed.json"), "w", encoding="utf-8") as f:
        json.dump(
            {"args": vars(args), "table": table, "changes": changes, "drops": drops, "seconds": timings, "runs": runs},
            f,
            indent=1,
            default=str,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
