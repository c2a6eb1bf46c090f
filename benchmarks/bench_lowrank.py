"""Side-by-side benchmark of the low-rank engine (not part of the test suite).

For each method it builds (or reuses) a synthetic Llama-shaped model triple
(benchmarks/bench_models.py) and measures, each in its own subprocess:

  (1) baseline: the dense reference-style script (benchmarks/dense_baseline.py):
      all inputs fully in memory, a full SVD of every tensor with >= 2 dims;
  (2) the method through `mergekit-yaml` with `svd: exact`;
  (3) the same with `svd: auto` (the default);
  (4) mergekit's `linear` merge of the same input models (the I/O floor).

It reports wall time, CPU time, peak RSS (GNU time's report of the child)
and peak anonymous RSS (sampled), the ratios, the worst relative error of (2) and (3) against (1) over all tensors,
both on the output tensor and on the method's update term (out - W_a for LoX
and Safe LoRA, out - W_f for LSSF), and how many matrices each path took.
A table goes to stdout, everything to benchmarks/results/<time>-<size>.json.

    python benchmarks/bench_lowrank.py                      # 70M, all methods, CPU
    python benchmarks/bench_lowrank.py --size small --methods lox
    python benchmarks/bench_lowrank.py --size 7b --cuda     # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional

import torch
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_models import SIZES, ModelShape, Planting, build  # noqa: E402

METHODS = {"lox": "lox_extrapolate", "lssf": "lssf_fusion", "safelora": "safelora_project"}
VARIANTS = ["baseline", "exact", "auto", "linear"]
LABELS = {
    "baseline": "(1) dense baseline",
    "exact": "(2) svd: exact",
    "auto": "(3) svd: auto",
    "linear": "(4) mergekit linear",
}


# --- running and measuring one subprocess ---------------------------------------


TIME = "/usr/bin/time"  # GNU time: the peak RSS of exactly its child


class AnonymousMemorySampler(threading.Thread):
    """Peak anonymous resident memory (RssAnon) of the measured program, every 20 ms.

    ru_maxrss also counts file-backed pages: safetensors inputs that mergekit
    reads through mmap stay resident in the process while their shard is open,
    although they are page cache that the kernel can drop at will. RssAnon is
    the memory the program itself allocated (the baseline's loaded models,
    mergekit's output buffer, the temporaries).
    """

    def __init__(self, launcher_pid: int, wrapped: bool):
        super().__init__(daemon=True)
        self.launcher_pid = launcher_pid
        self.wrapped = wrapped
        self.peak_kb = 0
        self.done = threading.Event()

    def _measured_pid(self) -> Optional[int]:
        if not self.wrapped:
            return self.launcher_pid
        try:
            with open(f"/proc/{self.launcher_pid}/task/{self.launcher_pid}/children") as f:
                children = f.read().split()
            return int(children[0]) if children else None
        except OSError:
            return None

    def run(self) -> None:
        pid = None
        while not self.done.is_set():
            pid = pid or self._measured_pid()
            if pid is not None:
                try:
                    with open(f"/proc/{pid}/status") as f:
                        for line in f:
                            if line.startswith("RssAnon:"):
                                self.peak_kb = max(self.peak_kb, int(line.split()[1]))
                                break
                except OSError:
                    pass
            self.done.wait(0.02)


def measure(cmd: List[str], log_path: str, env: Optional[dict] = None) -> dict:
    """Wall time, CPU time and peak RSS of one program run in its own process.

    Peak RSS comes from GNU time's report of its child. (The benchmark's own
    wait4 rusage would not do: Linux carries a process's peak RSS across
    fork and exec, so every child would report at least this process's size.)
    """
    wrapped = os.access(TIME, os.X_OK)
    stats_path = log_path + ".time"
    if wrapped:
        cmd = [TIME, "-f", "%M %U %S", "-o", stats_path] + cmd
    with open(log_path, "w") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        sampler = AnonymousMemorySampler(proc.pid, wrapped)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        sampler.done.set()
        sampler.join()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"command failed ({code}): {' '.join(cmd)}\n{tail}")
    if wrapped:
        with open(stats_path) as f:
            rss_kb, user, system = f.read().split()[-3:]
        rss_kb, cpu = int(rss_kb), float(user) + float(system)
    else:  # no GNU time: wait4's figure, an upper bound (see above)
        rss_kb, cpu = usage.ru_maxrss, usage.ru_utime + usage.ru_stime
    return {
        "load_average_after": os.getloadavg()[0],
        "wall_s": wall,
        "cpu_s": cpu,
        "peak_rss_mb": rss_kb / 1024,
        "peak_anon_mb": sampler.peak_kb / 1024,
    }


def warm_page_cache(paths: List[str]) -> None:
    """Read every input file once so that no variant pays for the first disk read."""
    for path in paths:
        for name in os.listdir(path):
            with open(os.path.join(path, name), "rb") as f:
                while f.read(64 << 20):
                    pass


# --- recipes ------------------------------------------------------------------


def method_recipe(method: str, paths: Dict[str, str], svd: str, args) -> dict:
    if method == "lox":
        models = [{"model": paths["aligned"]}]
        parameters = {"alpha": args.alpha, "rank": args.lox_rank, "svd": svd}
    else:
        models = [
            {"model": paths["aligned"], "parameters": {"role": "aligned"}},
            {"model": paths["finetuned"], "parameters": {"role": "finetuned"}},
        ]
        if method == "lssf":
            parameters = {"rank": args.lssf_rank, "svd": svd}
        else:
            parameters = {
                "threshold": args.threshold,
                "projection": args.projection,
                "rank": args.safelora_rank,
                "svd": svd,
            }
    return {
        "merge_method": METHODS[method],
        "base_model": paths["base"],
        "models": models,
        "parameters": parameters,
        "dtype": "float32",
    }


def linear_recipe(method: str, paths: Dict[str, str]) -> dict:
    roles = ["base", "aligned"] + ([] if method == "lox" else ["finetuned"])
    return {
        "merge_method": "linear",
        "models": [{"model": paths[r], "parameters": {"weight": 1.0}} for r in roles],
        "dtype": "float32",
    }


def baseline_command(method: str, paths: Dict[str, str], out: str, args) -> List[str]:
    cmd = [sys.executable, os.path.join(HERE, "dense_baseline.py"), method]
    cmd += ["--base", paths["base"], "--aligned", paths["aligned"], "--out", out]
    cmd += ["--device", args.device]
    if method == "lox":
        cmd += ["--alpha", str(args.alpha), "--rank", str(args.lox_rank)]
    else:
        cmd += ["--finetuned", paths["finetuned"]]
    if method == "lssf":
        cmd += ["--rank", str(args.lssf_rank)]
    if method == "safelora":
        cmd += ["--threshold", str(args.threshold), "--projection", args.projection]
        cmd += ["--rank", str(args.safelora_rank)]
    return cmd


def mergekit_command(recipe_path: str, out: str, args) -> List[str]:
    exe = shutil.which("mergekit-yaml") or os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
    cmd = [exe, recipe_path, out, "--device", args.device]
    return cmd + [word for option in args.mergekit_option for word in shlex.split(option)]


# --- comparing outputs ----------------------------------------------------------


class TensorIndex:
    """Tensors of a safetensors model directory, read one at a time."""

    def __init__(self, path: str):
        from safetensors import safe_open

        self.files = {}
        for name in sorted(os.listdir(path)):
            if name.endswith(".safetensors"):
                handle = safe_open(os.path.join(path, name), framework="pt")
                for key in handle.keys():
                    self.files[key] = handle

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.files[name].get_tensor(name)

    def names(self):
        return list(self.files)


def worst_errors(reference_dir: str, candidate_dir: str, anchor_dir: str) -> dict:
    """Worst relative Frobenius error over all >= 2-D tensors, on out and on out - anchor."""
    ref, cand, anchor = TensorIndex(reference_dir), TensorIndex(candidate_dir), TensorIndex(anchor_dir)
    worst_out, worst_term = 0.0, 0.0
    where_out = where_term = None
    for name in ref.names():
        r = ref[name].double()
        if r.ndim < 2:
            continue
        c, a = cand[name].double(), anchor[name].double()
        e_out = float((c - r).norm() / r.norm().clamp_min(1e-30))
        term = r - a
        e_term = float(((c - a) - term).norm() / term.norm()) if term.norm() > 0 else float((c - a).norm())
        if e_out > worst_out:
            worst_out, where_out = e_out, name
        if e_term > worst_term:
            worst_term, where_term = e_term, name
    return {"out": worst_out, "out_tensor": where_out, "term": worst_term, "term_tensor": where_term}


# --- the benchmark --------------------------------------------------------------


def child_environment(args) -> dict:
    env = dict(os.environ)
    if args.threads:
        # Every variant alike: torch's intra-op pool and the BLAS / OpenMP pools.
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[name] = str(args.threads)
    return env


def measure_startup(args) -> dict:
    """Wall time, CPU time and RSS of each program doing nothing but starting.

    ``mergekit-yaml --help`` imports all that a merge imports (torch,
    transformers, mergekit, our methods through the start-up hook);
    ``dense_baseline.py --help`` imports torch and safetensors. Subtracting
    these separates the merge itself from interpreter start-up, a fixed cost
    that dominates small models.
    """
    programs = {
        "mergekit": mergekit_command("--help", "", args)[:1] + ["--help"],
        "baseline": [sys.executable, os.path.join(HERE, "dense_baseline.py"), "--help"],
    }
    out = {}
    for name, cmd in programs.items():
        log = os.path.join(args.work_dir, f"startup-{name}.log")
        runs = [measure(cmd, log, child_environment(args)) for _ in range(args.repeats)]
        out[name] = min(runs, key=lambda r: r["wall_s"])
        print(
            f"  start-up of {name:9s}: {out[name]['wall_s']:5.2f} s wall, "
            f"{out[name]['peak_rss_mb']:.0f} MB peak RSS",
            flush=True,
        )
    return out


def net_wall(result: dict, variant: str) -> float:
    program = "baseline" if variant == "baseline" else "mergekit"
    return result["best"][variant]["wall_s"] - result["startup"][program]["wall_s"]


def run_method(method: str, paths: Dict[str, str], work: str, args) -> dict:
    runs: Dict[str, List[dict]] = {v: [] for v in VARIANTS}
    counts: Dict[str, dict] = {}
    outs = {v: os.path.join(work, f"{method}-{v}") for v in VARIANTS}
    for repeat in range(args.repeats):
        # Cheapest first; interleaved repeats so that drifting machine load hits all alike.
        for variant in ["linear", "auto", "exact", "baseline"]:
            if variant in args.skip:
                continue
            out = outs[variant]
            shutil.rmtree(out, ignore_errors=True)
            env = child_environment(args)
            log = os.path.join(work, f"{method}-{variant}.log")
            if variant == "baseline":
                cmd = baseline_command(method, paths, out, args)
            else:
                recipe = linear_recipe(method, paths) if variant == "linear" else method_recipe(method, paths, variant, args)
                recipe_path = os.path.join(work, f"{method}-{variant}.yml")
                with open(recipe_path, "w") as f:
                    yaml.safe_dump(recipe, f, sort_keys=False)
                cmd = mergekit_command(recipe_path, out, args)
                stats = os.path.join(work, f"{method}-{variant}-svd.json")
                env["MERGEKIT_LOX_SVD_STATS"] = stats
            result = measure(cmd, log, env)
            runs[variant].append(result)
            if variant in ("exact", "auto") and os.path.exists(stats):
                with open(stats) as f:
                    counts[variant] = json.load(f)
            print(
                f"  {METHODS[method]:17s} {LABELS[variant]:22s} run {repeat + 1}: "
                f"{result['wall_s']:7.2f} s wall {result['cpu_s']:7.2f} s CPU "
                f"{result['peak_rss_mb']:6.0f} MB peak RSS ({result['peak_anon_mb']:.0f} MB anonymous)",
                flush=True,
            )

    best = {v: min(r, key=lambda x: x["wall_s"]) for v, r in runs.items() if r}
    anchor = paths["aligned"] if method in ("lox", "safelora") else paths["finetuned"]
    errors = {}
    if "baseline" in best:
        for variant in ("exact", "auto"):
            if variant in best:
                errors[variant] = worst_errors(outs["baseline"], outs[variant], anchor)
    if not args.keep_outputs:
        for out in outs.values():
            shutil.rmtree(out, ignore_errors=True)
    return {"runs": runs, "best": best, "errors": errors, "svd_counts": counts}


def ratios(result: dict) -> dict:
    best = result["best"]
    out = {}
    if "auto" in best and "linear" in best:
        out["auto_over_linear"] = best["auto"]["wall_s"] / best["linear"]["wall_s"]
    if "auto" in best and "baseline" in best:
        out["baseline_over_auto"] = best["baseline"]["wall_s"] / best["auto"]["wall_s"]
        out["rss_auto_over_baseline"] = best["auto"]["peak_rss_mb"] / best["baseline"]["peak_rss_mb"]
        out["anon_auto_over_baseline"] = best["auto"]["peak_anon_mb"] / best["baseline"]["peak_anon_mb"]
    if "exact" in best and "baseline" in best:
        out["baseline_over_exact"] = best["baseline"]["wall_s"] / best["exact"]["wall_s"]
    # Without interpreter start-up (measure_startup): the merge's own cost.
    if "auto" in best and "linear" in best:
        out["net_auto_over_linear"] = net_wall(result, "auto") / net_wall(result, "linear")
    if "auto" in best and "baseline" in best:
        out["net_baseline_over_auto"] = net_wall(result, "baseline") / net_wall(result, "auto")
    # The same ratios in CPU time (user + system): on a shared machine, less
    # sensitive to what else runs than wall time.
    if "auto" in best and "linear" in best:
        out["cpu_auto_over_linear"] = best["auto"]["cpu_s"] / best["linear"]["cpu_s"]
    if "auto" in best and "baseline" in best:
        out["cpu_baseline_over_auto"] = best["baseline"]["cpu_s"] / best["auto"]["cpu_s"]
    return out


TARGETS = {
    # issue 5: (3) at most 1.2x (4); at least 10x faster than (1); peak RSS at most
    # a third of (1); error at most 1e-3.
    "auto_over_linear": ("<=", 1.2),
    "baseline_over_auto": (">=", 10.0),
    "rss_auto_over_baseline": ("<=", 1 / 3),
    "error": ("<=", 1e-3),
}


def verdicts(result: dict) -> dict:
    values = dict(result["ratios"])
    if "auto" in result["errors"]:
        values["error"] = result["errors"]["auto"]["term"]
    out = {}
    for key, (op, target) in TARGETS.items():
        if key in values:
            ok = values[key] <= target if op == "<=" else values[key] >= target
            out[key] = {"value": values[key], "target": f"{op} {target:.3g}", "met": ok}
    return out


def print_table(results: dict) -> None:
    print()
    print(
        f"{'method':17s} {'variant':22s} {'wall s':>8s} {'net s':>7s} {'CPU s':>7s} {'peak RSS MB':>12s} {'anon MB':>8s} "
        f"{'x linear':>9s} {'baseline/x':>11s} {'err out':>9s} {'err term':>9s}  svd paths (matrices)"
    )
    for method, result in results.items():
        best = result["best"]
        for variant in VARIANTS:
            if variant not in best:
                continue
            b = best[variant]
            vs_linear = b["wall_s"] / best["linear"]["wall_s"] if "linear" in best else float("nan")
            speedup = best["baseline"]["wall_s"] / b["wall_s"] if "baseline" in best else float("nan")
            err = result["errors"].get(variant)
            err_out = f"{err['out']:.1e}" if err else ""
            err_term = f"{err['term']:.1e}" if err else ""
            counts = result["svd_counts"].get(variant, "")
            counts = ", ".join(f"{k} {v}" for k, v in counts.items()) if counts else ""
            print(
                f"{METHODS[method]:17s} {LABELS[variant]:22s} {b['wall_s']:8.2f} {net_wall(result, variant):7.2f} {b['cpu_s']:7.2f} "
                f"{b['peak_rss_mb']:12.0f} {b['peak_anon_mb']:8.0f} "
                f"{vs_linear:9.2f} {speedup:11.1f} {err_out:>9s} {err_term:>9s}  {counts}"
            )
        for key, v in result["verdicts"].items():
            print(f"{'':17s}   target {key}: {v['value']:.3g} (want {v['target']}): {'met' if v['met'] else 'MISSED'}")
        r = result["ratios"]
        extra = [
            f"{key} {r[key]:.3g}"
            for key in ("net_auto_over_linear", "net_baseline_over_auto", "anon_auto_over_baseline",
                        "cpu_auto_over_linear", "cpu_baseline_over_auto")
            if key in r
        ]
        if extra:
            print(f"{'':17s}   also: {', '.join(extra)}")
    print()


def machine() -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "processor": platform.processor(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            info["memory_gb"] = round(int(f.readline().split()[1]) / 2**20, 1)
        info["load_average_at_start"] = os.getloadavg()
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import mergekit

        info["mergekit"] = getattr(mergekit, "__version__", None) or _dist_version("mergekit")
    except ImportError:
        pass
    return info


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="70m")
    for dim in ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab"):
        p.add_argument(f"--{dim.replace('_', '-')}", type=int, help=f"override the size's {dim}")
    p.add_argument("--methods", default="lox,lssf,safelora", help="comma-separated: lox, lssf, safelora")
    p.add_argument("--skip", default="", help="comma-separated variants to skip: baseline, exact, auto, linear")
    p.add_argument("--repeats", type=int, default=1, help="runs per variant; the fastest is reported")
    p.add_argument("--cuda", action="store_true", help="--device cuda for every variant")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--mergekit-option",
        action="append",
        default=[],
        help="extra mergekit-yaml options for (2)-(4), e.g. '--out-shard-size 100M' (repeatable)",
    )
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "mergekit-lox-bench"))
    p.add_argument("--results-dir", default=os.path.join(HERE, "results"))
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--planted-strength", type=float, default=Planting.planted_strength)
    p.add_argument("--planted-rank", type=int, default=Planting.planted_rank)
    p.add_argument("--decay", type=float, default=Planting.decay)
    p.add_argument("--alpha", type=float, default=1.25)
    p.add_argument("--lox-rank", type=int, default=6)
    p.add_argument("--lssf-rank", type=int, default=0, help="0: automatic (entropy) rank, the default")
    p.add_argument("--safelora-rank", type=int, default=8)
    p.add_argument("--projection", default="orthogonal", choices=["orthogonal", "scaled"])
    p.add_argument("--threshold", type=float, default=1.0, help="1.0 projects every tensor")
    p.add_argument("--build-device", default=None, help="device that generates the models (default: --device)")
    p.add_argument("--input-shard-mb", type=int, default=2048, help="safetensors shard size of the built models")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="OMP/MKL/OpenBLAS threads for every variant (0: leave the default, one per core)",
    )
    p.add_argument("--keep-outputs", action="store_true")
    args = p.parse_args(argv)
    if args.cuda:
        args.device = "cuda"
    args.skip = [s for s in args.skip.split(",") if s]
    args.methods = [m for m in args.methods.split(",") if m]
    for m in args.methods:
        if m not in METHODS:
            p.error(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    dims = dict(SIZES[args.size])
    for dim in dims:
        if getattr(args, dim) is not None:
            dims[dim] = getattr(args, dim)
    shape = ModelShape(**dims)
    planting = Planting(
        planted_rank=args.planted_rank, planted_strength=args.planted_strength, decay=args.decay
    )
    os.makedirs(args.work_dir, exist_ok=True)
    start = time.perf_counter()
    paths = build(
        args.work_dir,
        shape,
        planting,
        with_finetuned=any(m != "lox" for m in args.methods),
        dtype=args.dtype,
        shard_bytes=args.input_shard_mb << 20,
        device=args.build_device or args.device,
    )
    print(f"models ready in {time.perf_counter() - start:.1f} s: {shape.parameters() / 1e6:.1f}M parameters", flush=True)
    warm_page_cache(list(paths.values()))

    startup = measure_startup(args)
    results = {}
    for method in args.methods:
        result = run_method(method, paths, args.work_dir, args)
        result["startup"] = startup
        result["ratios"] = ratios(result)
        result["verdicts"] = verdicts(result)
        results[method] = result
    print_table(results)

    report = {
        "command": " ".join([os.path.relpath(sys.argv[0])] + (argv if argv is not None else sys.argv[1:])),
        "machine": machine(),
        "shape": dims,
        "parameters": shape.parameters(),
        "planting": planting.__dict__,
        "settings": {k: v for k, v in vars(args).items() if k not in dims},
        "results": results,
    }
    os.makedirs(args.results_dir, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    label = args.size if dims == SIZES[args.size] else f"h{dims['hidden']}-l{dims['layers']}"
    path = os.path.join(args.results_dir, f"{stamp}-{label}-{args.device}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(f"results: {path}")
    return report


if __name__ == "__main__":
    main()
