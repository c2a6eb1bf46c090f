"""The work of a staged sweep (stages.py), the same under every executor: a point's
defend -> attack -> repair -> eval, and the baseline (the undefended model attacked).

A point writes under its defense ``DIR/defenses/NNN/`` (shared with every point of the
same defend settings; NNN is the first of them):

- ``recipe.yml``, ``model/``: the defended model; ``eval/``, ``before.json``: its eval;
- ``attacks/NAME/run/``: `mergekit-lox attack`'s output (the attacked model, the adapter);
  ``attacks/NAME/eval/``, ``attacks/NAME/after.json``: the attacked model's eval;

and under its own ``DIR/points/NNN/repair/NAME/``: ``recipe.yml``, ``model/``, ``eval/``,
``result.json`` (the repaired model). The baseline: ``DIR/baseline/`` with ``eval/`` and
``attacks/NAME/``. Each ``*.json`` is written (atomically) once its step is complete, and
a step whose file exists is not run again: a rerun after a kill repeats no finished
attack, merge or eval.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any, Callable, Dict, Optional

from mergekit_lox.errors import one_line
from mergekit_lox.sweep import points, stages


def cached(path: str, compute: Callable[[], Dict[str, Any]]) -> Dict[str, Any]:
    """The JSON at ``path`` when a run has finished this step, else ``compute()`` written there."""
    from mergekit_lox.files.output import atomic_write_text

    if os.path.isfile(path):
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    value = compute()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_text(path, json.dumps(value, allow_nan=False, default=str) + "\n")
    return value


def _attack_summary(result) -> Dict[str, Any]:
    record = getattr(result, "record", None)
    record = json.loads(json.dumps(record, default=str)) if isinstance(record, dict) else None
    return {"lora": result.adapter_dir is not None, "record": record}


def _path(value) -> Optional[str]:
    return None if value is None else str(value)


def _attack(model: str, fields: Dict[str, Any], out: str):
    """`mergekit-lox attack` of ``model`` into ``out``: resumable, a finished attack is returned as it is."""
    import contextlib
    import io
    from pathlib import Path

    from mergekit_lox.attack import run_attack

    # transformers' Trainer prints its log dicts to stdout; the sweep prints one line per point.
    with contextlib.redirect_stdout(io.StringIO()):
        return run_attack(model, stages.attack_settings(fields), Path(out), echo=lambda *_: None)


def _attacked(model: Callable[[], str], name: str, fields: Dict[str, Any], folder: str, options: Dict[str, Any]):
    """The eval of ``model`` after attack ``name`` (the step ``folder/after.json``)."""

    def run() -> Dict[str, Any]:
        result = _attack(model(), fields, os.path.join(folder, "run"))
        entry = points.evaluate(str(result.model_dir), os.path.join(folder, "eval"), options)
        return {"eval": entry, "attack": _attack_summary(result)}

    return cached(os.path.join(folder, "after.json"), run)


def remove_attack(folder: str) -> None:
    """Delete an attack's output (``folder/run``: models and adapter) once no step needs it;
    its eval and record stay."""
    run = os.path.join(folder, "run")
    if os.path.isdir(run) and not os.path.islink(run):
        shutil.rmtree(run)


def _defended(task: Dict[str, Any]) -> Callable[[], str]:
    """The defended model, merged on first use (again if `keep` deleted it and a step needs it)."""
    from mergekit_lox.files.output import atomic_write_text
    from mergekit_lox.run import run_recipe

    model = os.path.join(task["defense"], points.MODEL)

    def merged() -> str:
        if not points.merged_output(model):
            recipe = os.path.join(task["defense"], "recipe.yml")
            os.makedirs(task["defense"], exist_ok=True)
            atomic_write_text(recipe, task["recipe"])
            run_recipe(recipe, model, points.merge_options(task))
        return model

    return merged


def _repair(task, name: str, defended: Callable[[], str], fields: Dict[str, Any]) -> Dict[str, Any]:
    """The eval of the repaired model (the step ``points/NNN/repair/NAME/result.json``)."""
    from mergekit_lox.files.output import atomic_write_text
    from mergekit_lox.run import run_recipe
    from mergekit_lox.sweep.overrides import recipe_yaml

    folder = os.path.join(task["dir"], "repair", name)

    def run() -> Dict[str, Any]:
        attacked = _attack(defended(), fields, os.path.join(task["defense"], "attacks", name, "run"))
        models = {
            stages.DEFENDED: defended(),
            stages.ATTACKED: _path(attacked.model_dir),
            stages.ADAPTER: _path(attacked.adapter_dir),
        }
        os.makedirs(folder, exist_ok=True)
        recipe = os.path.join(folder, "recipe.yml")
        atomic_write_text(recipe, recipe_yaml(stages.substitute(task["repair"], models)))
        model = os.path.join(folder, points.MODEL)
        run_recipe(recipe, model, points.merge_options(task))
        entry = points.evaluate(model, os.path.join(folder, "eval"), task["eval"])
        if task["keep"] != "all":
            points.remove_model(folder)
        return {"eval": entry}

    return cached(os.path.join(folder, "result.json"), run)["eval"]


def _staged_point(task: Dict[str, Any], result: Dict[str, Any]) -> None:
    defended = _defended(task)
    before = cached(
        os.path.join(task["defense"], "before.json"),
        lambda: {"eval": points.evaluate(defended(), os.path.join(task["defense"], "eval"), task["eval"])},
    )
    result["eval"] = before["eval"]
    outcomes = {}
    for name, fields in task["attacks"].items():
        after = _attacked(defended, name, fields, os.path.join(task["defense"], "attacks", name), task["eval"])
        outcome = {"eval": after["eval"], "attack": after["attack"], "repaired": None}
        if task["repair"] is not None:
            outcome["repaired"] = _repair(task, name, defended, fields)
        outcomes[name] = outcome
    result["attacks"] = outcomes
    model = os.path.join(task["defense"], points.MODEL)
    result["model"] = model if points.merged_output(model) else None


def _baseline(task: Dict[str, Any], result: Dict[str, Any]) -> None:
    before = cached(
        os.path.join(task["dir"], "before.json"),
        lambda: {"eval": points.evaluate(task["model"], os.path.join(task["dir"], "eval"), task["eval"])},
    )
    result["eval"] = before["eval"]
    outcomes = {}
    for name, fields in task["attacks"].items():
        folder = os.path.join(task["dir"], "attacks", name)
        after = _attacked(lambda: task["model"], name, fields, folder, task["eval"])
        outcomes[name] = {"eval": after["eval"], "attack": after["attack"], "repaired": None}
        if task["keep"] != "all":
            remove_attack(folder)
    result["attacks"] = outcomes


def execute(task: Dict[str, Any]) -> Dict[str, Any]:
    """Run one task of any kind (points.execute for a plain point or the reference); never
    raises for a failure of the work itself, only for an interrupt."""
    if task["kind"] not in ("staged", "baseline"):
        return points.execute(task)
    points.in_cwd(task)
    start = time.monotonic()
    result: Dict[str, Any] = {"status": "failed", "error": None, "eval": None, "attacks": None, "model": None}
    result.update(host=os.uname().nodename, merge_seconds=None, eval_seconds=None)
    os.makedirs(task["dir"], exist_ok=True)
    try:
        (_baseline if task["kind"] == "baseline" else _staged_point)(task, result)
        result["status"] = "ok"
    except Exception as error:  # noqa: BLE001 - recorded as the point's one-line error
        result["error"] = one_line(error)
    result["seconds"] = time.monotonic() - start
    return result


def staged_task(index: int, leader: int, out_dir: str, defend_text: str, repair, sweep) -> Dict[str, Any]:
    """A staged point: ``group`` (its defense's first point) keeps points that share a
    defense from running at once (executors.drive)."""
    task = points.point_task(index, out_dir, defend_text, sweep)
    task.update(kind="staged", group=leader, repair=repair, attacks=dict(sweep.attacks))
    task["defense"] = os.path.join(os.path.abspath(out_dir), stages.defense_dir(leader))
    return task


def baseline_task(out_dir: str, sweep) -> Dict[str, Any]:
    task = points.reference_task(sweep.baseline, out_dir, sweep)
    task.update(kind="baseline", dir=os.path.join(os.path.abspath(out_dir), "baseline"), keep=sweep.keep)
    task["attacks"] = dict(sweep.attacks)
    return task
