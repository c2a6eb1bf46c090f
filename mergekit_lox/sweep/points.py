"""One unit of sweep work, the same under every executor: merge + eval of a point,
or the eval of the reference model. Tasks and results are small dicts of paths and
numbers (what Ray's object store carries); weights stay on disk.

A point writes, under its folder ``DIR/points/NNN/``:

- ``recipe.yml``: the recipe with the point's overrides;
- ``model/`` (and ``model.intermediate/`` for a chain): the merge, through
  `mergekit-lox run`'s staged path (nothing half-written);
- ``eval/``: `mergekit-lox eval`'s eval.json, answers.jsonl, report.html.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any, Dict, List

from mergekit_lox.errors import one_line

MODEL = "model"


def point_task(index: int, out_dir: str, recipe_text: str, sweep) -> Dict[str, Any]:
    return {
        "kind": "point",
        "index": index,
        "dir": os.path.join(os.path.abspath(out_dir), "points", f"{index:03d}"),
        "recipe": recipe_text,
        "eval": dict(sweep.eval),
        "mergekit_options": [*sweep.mergekit_options, *sweep.command_line_options],
        "lora_cache": os.path.join(os.path.abspath(out_dir), "lora-cache"),
        "keep": sweep.keep,
        "cwd": os.getcwd(),
    }


def reference_task(model: str, out_dir: str, sweep) -> Dict[str, Any]:
    return {
        "kind": "reference",
        "index": None,
        "model": model,
        "dir": os.path.join(os.path.abspath(out_dir), "reference"),
        "eval": dict(sweep.eval),
        "cwd": os.getcwd(),
    }


def evaluate(model: str, out_dir: str, options: Dict[str, Any]) -> Dict[str, Any]:
    """`mergekit-lox eval` of one model: its entry of eval.json."""
    from mergekit_lox.evaluate import run_eval

    report = run_eval([model], out_dir, **options, progress=False, echo=lambda *_: None)
    return report["models"][0]


def merge_options(task: Dict[str, Any]) -> List[str]:
    """The task's mergekit options, quiet, with the sweep's shared LoRA merge cache."""
    options = list(task["mergekit_options"])
    if not any(o == "--lora-merge-cache" or o.startswith("--lora-merge-cache=") for o in options):
        options += ["--lora-merge-cache", task["lora_cache"]]
    if "--quiet" not in options:
        options.append("--quiet")
    return options


def merged_output(path: str) -> bool:
    from mergekit_lox.files.output import MERGE_OUTPUT_MARKERS

    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, m)) for m in MERGE_OUTPUT_MARKERS)


def remove_model(point_dir: str) -> bool:
    """Delete the merge a point wrote (``model/`` and a chain's stages), nothing else:
    only folders inside ``point_dir`` that hold a merge's marker file. True when removed."""
    removed = False
    model = os.path.join(point_dir, MODEL)
    if merged_output(model):
        shutil.rmtree(model)
        removed = True
    stages = model + ".intermediate"
    if os.path.isdir(stages):
        for name in os.listdir(stages):
            if merged_output(os.path.join(stages, name)):
                shutil.rmtree(os.path.join(stages, name))
        if not os.listdir(stages):
            os.rmdir(stages)
    return removed


def in_cwd(task: Dict[str, Any]) -> None:
    # Relative model paths in the recipe mean what they meant where the sweep started.
    if os.path.isdir(task["cwd"]) and os.getcwd() != task["cwd"]:
        os.chdir(task["cwd"])


def execute(task: Dict[str, Any]) -> Dict[str, Any]:
    """Run one task; never raises for a failure of the work itself (only for an interrupt):
    ``{"status": "ok" | "failed", "error", "eval", "seconds", "merge_seconds", "eval_seconds", "model"}``."""
    from mergekit_lox.files.output import atomic_write_text

    in_cwd(task)
    start = time.monotonic()
    result: Dict[str, Any] = {"status": "failed", "error": None, "eval": None, "merge_seconds": None}
    result.update(eval_seconds=None, model=None, host=os.uname().nodename)
    os.makedirs(task["dir"], exist_ok=True)
    evaluated = time.monotonic()
    try:
        if task["kind"] == "reference":
            result["eval"] = evaluate(task["model"], task["dir"], task["eval"])
        else:
            from mergekit_lox.run import run_recipe

            recipe = os.path.join(task["dir"], "recipe.yml")
            atomic_write_text(recipe, task["recipe"])
            model = os.path.join(task["dir"], MODEL)
            run_recipe(recipe, model, merge_options(task))
            merged = time.monotonic()
            result["merge_seconds"] = merged - start
            result["model"] = model
            evaluated = merged
            result["eval"] = evaluate(model, os.path.join(task["dir"], "eval"), task["eval"])
        result["eval_seconds"] = time.monotonic() - evaluated
        result["status"] = "ok"
    except Exception as error:  # noqa: BLE001 - recorded as the point's one-line error
        result["error"] = one_line(error)
    # keep: none deletes every merge, best keeps the ok ones until the driver has chosen, all keeps all.
    if task["kind"] == "point" and (task["keep"] == "none" or (task["keep"] == "best" and result["status"] != "ok")):
        if remove_model(task["dir"]):
            result["model"] = None
    result["seconds"] = time.monotonic() - start
    return result
