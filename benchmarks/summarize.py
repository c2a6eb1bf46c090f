"""docs/performance.md's ratio tables from bench_lowrank.py's result files (not a test).

    python benchmarks/summarize.py benchmarks/results/*-noise-floor-70m-cpu.json ...

One table per file: per spectrum and method, the ratios of ``svd: auto`` (3) to
mergekit's ``linear`` merge (4) and to ``svd: exact`` (2), the dense baseline (1), peak
RSS, the worst error of (3) against float64, which path each matrix took, and issue
14's targets as bench_lowrank.targets computed them.
"""

from __future__ import annotations

import json
import re
import sys

HEADER = (
    "| spectrum | method | wall auto / linear | CPU auto / linear | wall exact / linear | wall baseline / linear "
    "| auto / exact | RSS auto / linear | worst error auto (term) "
    "| matrices auto: randomized / fallback / no sketch (of which Gram) | targets |"
)


def spectrum_label(planting: dict) -> str:
    return ", ".join(f"{k}={planting[k]}" for k in ("planted_rank", "decay", "floor"))


def paths(counts: dict) -> str:
    gram = counts.get("gram", 0)
    return f"{counts.get('randomized', 0)} / {counts.get('fallback', 0)} / {counts.get('exact', 0)} ({gram})"


def targets_text(targets: dict) -> str:
    parts = []
    for name, (value, op, limit) in targets.items():
        met = value <= limit if op == "<=" else value >= limit
        parts.append(f"{name} {value:.3g} {op} {limit:g} ({'met' if met else 'MISSED'})")
    return "; ".join(parts)


def table(path: str) -> str:
    with open(path) as f:
        data = json.load(f)
    shape = data["shape"]
    load = data["machine"].get("load_average_at_start", [float("nan")])[0]
    command = re.sub(r" --work-dir \S+", "", data["command"])  # where the models went: not part of the table
    lines = [
        f"#### `{command}` ({data['parameters'] / 1e6:.0f}M parameters, hidden {shape['hidden']}, "
        f"{shape['layers']} layers; load average at start {load:.1f})",
        "",
        HEADER,
        "|" + "---|" * (HEADER.count("|") - 1),
    ]
    for spectrum in data["spectra"]:
        for method, result in spectrum["results"].items():
            r = result["ratios"]
            err = result["errors"].get("auto", {}).get("term", float("nan"))
            cells = [
                spectrum_label(spectrum["planting"]),
                method,
                *(
                    f"{r.get(key, float('nan')):.2f}"
                    for key in (
                        "auto_over_linear",
                        "cpu_auto_over_linear",
                        "exact_over_linear",
                        "baseline_over_linear",
                        "auto_over_exact",
                        "rss_auto_over_linear",
                    )
                ),
                f"{err:.1e}",
                paths(result["svd_counts"].get("auto", {})),
                targets_text(result["targets"]),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    for path in argv if argv is not None else sys.argv[1:]:
        print(table(path))
        print()


if __name__ == "__main__":
    main()
