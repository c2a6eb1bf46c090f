"""`mergekit-lox sweep`: a grid of recipe parameters, merge + eval per point, a Pareto report.

``spec``: the sweep file (validated as `check` does, one line per problem);
``overrides``: parameter addresses and grid expansion; ``points``: one point's
merge + eval (the same under every executor); ``executors``: local or Ray;
``results``: sweep.json / sweep.csv and the chosen point; ``report``: report.html.
Staged sweeps (defend -> attack -> repair -> eval): ``stages`` (the file's stages and
placeholders, the worst case), ``pipeline`` (a staged point's and the baseline's work),
``staging`` (the driver's side: tasks, record, deletions), ``staged_report``.
The guide is docs/sweep.md.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Optional

from mergekit_lox.sweep.spec import SweepError, check_file, load_sweep, read_sweep


def _reference(sweep, state: Dict[str, Any]) -> Optional[str]:
    """Fill ``state["reference"]`` as far as the sweep file decides it; the model to
    evaluate as the reference, or None."""
    from mergekit_lox.sweep.overrides import aligned_model

    if isinstance(sweep.reference, (int, float)):
        state["reference"] = {"source": "reference: in the sweep file", "model": None, "refusal_rate": sweep.reference}
        return None
    model = sweep.reference if isinstance(sweep.reference, str) else aligned_model(sweep.documents)
    if model is None:
        state["reference"] = None
        return None
    previous = state.get("reference") or {}
    if previous.get("model") == model and previous.get("eval") is not None:
        return None  # evaluated by an earlier run
    source = "reference: in the sweep file" if isinstance(sweep.reference, str) else "the recipe's aligned model"
    state["reference"] = {"source": source, "model": model, "refusal_rate": None, "eval": None}
    return model


def _describe(point: Dict[str, Any]) -> str:
    from mergekit_lox.sweep.results import perplexity, refusal_rate

    if point["status"] != "ok":
        return f"failed ({point['attempts']} attempt(s)): {point['error']}"
    ppl = perplexity(point)
    utility = f", perplexity {ppl:.4g}" if ppl is not None else ""
    return f"ok: refusal rate {refusal_rate(point):.3g}{utility} ({point['seconds']:.1f} s)"


def run_sweep(
    sweep_file: str,
    out_dir: str,
    *,
    executor: str = "local",
    ray_address: Optional[str] = None,
    gpus_per_point: Optional[float] = None,
    cpus_per_point: float = 1.0,
    retry_failed: bool = False,
    trust_remote_code: bool = False,
    echo: Callable[[str], None] = print,
) -> Dict[str, Any]:
    """Run (or resume) the sweep in ``sweep_file`` into ``out_dir``; returns sweep.json's content.

    Points already recorded in ``out_dir/sweep.json`` are not run again (failed ones
    only with ``retry_failed``); the record is rewritten after every point.
    """
    from mergekit_lox.files.output import OutputError, local_model_dirs, refuse_inside_inputs
    from mergekit_lox.sweep import executors, results
    from mergekit_lox.sweep.overrides import apply, recipe_yaml
    from mergekit_lox.sweep.points import point_task, reference_task, remove_model
    from mergekit_lox.sweep.report import write_report
    from mergekit_lox.sweep.staging import Staging

    sweep = load_sweep(sweep_file)
    if trust_remote_code:  # the command line's choice, never the file's (spec.CODE_RUNNING_OPTIONS)
        sweep.command_line_options = ["--trust-remote-code"]
    out_dir = os.path.abspath(out_dir)
    try:
        inputs = local_model_dirs([{k: v for k, v in d.items() if k != "name"} for d in sweep.documents])
        refuse_inside_inputs(out_dir, inputs)
    except OutputError as error:
        raise SweepError(f"{sweep_file}: {error}") from None
    state = results.open_state(sweep, out_dir, executor)
    state["sweep"]["executor"] = executor
    reference_model = _reference(sweep, state)
    todo = [p for p in state["points"] if p["status"] == "pending" or (retry_failed and p["status"] == "failed")]
    staging = Staging(sweep, state, out_dir) if sweep.staged else None
    if staging is not None and reference_model is not None and reference_model == sweep.baseline:
        reference_model = None  # the baseline's own eval before the attacks is the reference's
    tasks = [reference_task(reference_model, out_dir, sweep)] if reference_model else []
    if staging is not None:
        tasks += staging.tasks(todo, retry_failed)
    else:
        tasks += [
            point_task(p["index"], out_dir, recipe_yaml(apply(sweep.documents, p["params"])), sweep) for p in todo
        ]
    run = executors.make_executor(executor, sweep, ray_address, gpus_per_point, cpus_per_point)
    os.makedirs(out_dir, exist_ok=True)
    total = len(state["points"])

    def prune(final: bool) -> None:
        """keep: best -- delete every merged model that can no longer be the chosen one."""
        fixed = (state.get("reference") or {}).get("refusal_rate") is not None
        if sweep.keep != "best" or not (final or fixed):
            return
        if staging is not None:
            staging.prune()
            return
        for point in state["points"]:
            if point.get("model") and point["index"] != state["chosen"]:
                remove_model(os.path.join(out_dir, point["dir"]))
                point["model"] = None

    def record(final: bool = False) -> None:
        results.annotate(state)
        prune(final)
        results.save(state, out_dir)
        write_report(state, out_dir)

    def on_done(task, result, attempts) -> None:
        if task["kind"] == "baseline":
            staging.baseline_done(result, attempts)
            echo(f"baseline {task['model']}: " + staging.describe(state["baseline"]))
        elif task["kind"] == "reference":
            entry = result["eval"]
            state["reference"].update(eval=entry, error=result["error"], seconds=result["seconds"])
            state["reference"]["refusal_rate"] = entry["safety"]["refusal_rate"] if entry else None
            echo(f"reference {task['model']}: " + (_describe({**result, "attempts": attempts, "index": None})))
        else:
            point = state["points"][task["index"]]
            point.update({k: result.get(k) for k in ("status", "error", "eval", "seconds", "merge_seconds")})
            point.update(eval_seconds=result.get("eval_seconds"), attempts=attempts, host=result.get("host"))
            point["model"] = os.path.relpath(result["model"], out_dir) if result.get("model") else None
            if staging is not None:
                point["attacks"] = result.get("attacks")
                staging.point_done(point)
            finished = sum(1 for p in state["points"] if p["status"] != "pending")
            described = staging.describe(point) if staging is not None else _describe(point)
            echo(f"[{finished}/{total}] point {point['index']} {point['params']}: {described}")
        record()

    skipped = total - len(todo)
    if skipped:
        echo(f"{skipped} of {total} point(s) already recorded in {os.path.join(out_dir, results.SWEEP_JSON)}")
    record()
    try:
        executors.drive(run, tasks, on_done)
    finally:
        run.close()
    record(final=True)
    return state


__all__ = ["SweepError", "check_file", "load_sweep", "read_sweep", "run_sweep"]
