"""The driver's side of a staged sweep (stages.py): which tasks to run, what to record
when one finishes, and which models to delete when (``keep``).

A defense's attacked models are deleted once every point of the defense has finished
(unless ``keep: all``): until then a point of the same defense may still repair them.
The defended model follows ``keep`` (none: deleted with its attacks; best: the chosen
point's stays; all: every one stays). The baseline's attacked models are deleted by its
own task (unless ``keep: all``)."""

from __future__ import annotations

import os
from typing import Any, Dict, List

from mergekit_lox.sweep import pipeline, points, stages


class Staging:
    def __init__(self, sweep, state: Dict[str, Any], out_dir: str):
        self.sweep, self.state, self.out_dir = sweep, state, out_dir
        self.texts = stages.defend_texts(sweep)
        self.leaders = stages.group_leaders(self.texts)

    def tasks(self, todo: List[Dict[str, Any]], retry_failed: bool) -> List[Dict[str, Any]]:
        baseline = self.state.get("baseline")
        run_baseline = baseline is not None and (
            baseline.get("status") in (None, "pending") or (retry_failed and baseline.get("status") == "failed")
        )
        tasks = [pipeline.baseline_task(self.out_dir, self.sweep)] if run_baseline else []
        for point in todo:
            index = point["index"]
            repair = stages.repair_documents(self.sweep, point["params"])
            tasks.append(
                pipeline.staged_task(index, self.leaders[index], self.out_dir, self.texts[index], repair, self.sweep)
            )
        return tasks

    def baseline_done(self, result: Dict[str, Any], attempts: int) -> None:
        baseline = self.state["baseline"]
        baseline.update({k: result.get(k) for k in ("status", "error", "eval", "attacks", "seconds", "host")})
        baseline["attempts"] = attempts
        reference = self.state.get("reference") or {}
        if reference.get("model") == baseline["model"] and reference.get("eval") is None:
            entry = result.get("eval")
            reference.update(eval=entry, error=result.get("error"), seconds=result.get("seconds"))
            reference["refusal_rate"] = (entry or {}).get("safety", {}).get("refusal_rate") if entry else None

    def _group(self, leader: int) -> List[Dict[str, Any]]:
        return [p for p in self.state["points"] if self.leaders[p["index"]] == leader]

    def _remove_defense_model(self, leader: int) -> None:
        points.remove_model(os.path.join(self.out_dir, stages.defense_dir(leader)))
        for point in self._group(leader):
            point["model"] = None

    def point_done(self, point: Dict[str, Any]) -> None:
        """Once every point of this point's defense has finished: delete what no step needs."""
        leader = self.leaders[point["index"]]
        if self.sweep.keep == "all" or any(p["status"] == "pending" for p in self._group(leader)):
            return
        for name in self.sweep.attacks:
            pipeline.remove_attack(os.path.join(self.out_dir, stages.defense_dir(leader), "attacks", name))
        if self.sweep.keep == "none":
            self._remove_defense_model(leader)

    def prune(self) -> None:
        """keep: best -- the defended models that can no longer be chosen (finished defenses only)."""
        chosen = self.state.get("chosen")
        keep = self.leaders[chosen] if chosen is not None else None
        for leader in set(self.leaders):
            group = self._group(leader)
            if leader != keep and all(p["status"] != "pending" for p in group) and any(p.get("model") for p in group):
                self._remove_defense_model(leader)

    @staticmethod
    def describe(entry: Dict[str, Any]) -> str:
        from mergekit_lox.sweep.results import number

        if entry.get("status") != "ok":
            return f"failed ({entry.get('attempts')} attempt(s)): {entry.get('error')}"
        before = number(((entry.get("eval") or {}).get("safety") or {}).get("refusal_rate"))
        worst = stages.worst_case(entry.get("attacks")) or {}
        text = f"ok: refusal rate {before:.3g} before the attacks" if before is not None else "ok"
        if worst.get("refusal_rate") is not None:
            text += f", {worst['refusal_rate']:.3g} after the worst ({worst['refusal_attack']})"
        return text + f" ({entry.get('seconds') or 0:.1f} s)"
