"""The sweep's record: DIR/sweep.json (rewritten whole after each point), the chosen
point, the Pareto front, DIR/sweep.csv.

The chosen point (``choose``):

1. the reference refusal rate R is the reference model's (default: the recipe's
   aligned model, evaluated once with the same eval options), the number given as
   ``reference:``, or, when neither exists, the highest refusal rate among the
   finished points;
2. among the finished ("ok") points whose refusal rate is at least R - tolerance,
   the one with the best utility: the lowest perplexity (ties: the first point);
3. when no point reaches R - tolerance: the highest refusal rate (ties: lowest
   perplexity, then the first point);
4. when no utility was measured: the highest refusal rate (ties: the first point).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Any, Dict, List, Optional, Tuple

from mergekit_lox.files.output import spreadsheet_text
from mergekit_lox.sweep.numbers import number
from mergekit_lox.sweep.spec import SweepError

SWEEP_JSON = "sweep.json"
SWEEP_CSV = "sweep.csv"
REPORT_HTML = "report.html"
FORMAT = 1


class SweepStateError(SweepError):
    """DIR cannot hold this sweep; the message says why."""


def _section(point: Dict[str, Any], name: str) -> Dict[str, Any]:
    entry = point.get("eval")
    section = entry.get(name) if isinstance(entry, dict) else None
    return section if isinstance(section, dict) else {}


def refusal_rate(point: Dict[str, Any]) -> Optional[float]:
    """The refusal rate a point is chosen on: in a staged sweep the worst case over the
    attacks (``point["worst"]``, set by ``annotate``), else its eval's."""
    if "worst" in point:
        return number((point["worst"] or {}).get("refusal_rate"))
    return number(_section(point, "safety").get("refusal_rate"))


def perplexity(point: Dict[str, Any]) -> Optional[float]:
    """The perplexity a point is chosen on (in a staged sweep: the worst case over the attacks)."""
    if "worst" in point:
        return number((point["worst"] or {}).get("perplexity"))
    return number(_section(point, "utility").get("perplexity"))


def finished(points: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return [p for p in points if p["status"] == "ok" and refusal_rate(p) is not None]


def reference_rate(state: Dict[str, Any]) -> Tuple[Optional[float], str]:
    """(R, where it comes from)."""
    reference = state.get("reference") or {}
    if reference.get("refusal_rate") is not None:
        return float(reference["refusal_rate"]), reference.get("source", "given")
    rates = [refusal_rate(p) for p in finished(state["points"])]
    return (max(rates) if rates else None), "the highest refusal rate among the points"


def choose(points: List[Dict[str, Any]], reference: Optional[float], tolerance: float) -> Tuple[Optional[int], str]:
    """(index of the chosen point or None, which case of the rule chose it)."""
    done = finished(points)
    if not done:
        return None, "no point finished"
    if reference is None:
        reference = max(refusal_rate(p) for p in done)
    worst = math.inf

    def utility(p):
        value = perplexity(p)
        return worst if value is None else value

    def safest(candidates):
        return min(candidates, key=lambda p: (-refusal_rate(p), utility(p), p["index"]))

    if all(perplexity(p) is None for p in done):
        return safest(done)["index"], "no utility measured: the highest refusal rate"
    threshold = reference - tolerance
    eligible = [p for p in done if refusal_rate(p) >= threshold - 1e-12]
    if not eligible:
        return safest(done)["index"], f"no point reaches refusal rate {threshold:.4g}: the highest refusal rate"
    best = min(eligible, key=lambda p: (utility(p), p["index"]))
    return best["index"], f"the lowest perplexity among the points with refusal rate >= {threshold:.4g}"


def pareto_front(points: List[Dict[str, Any]]) -> List[int]:
    """Indices of the finished points no other finished point beats on both axes
    (refusal rate: higher is better; perplexity: lower is better; no perplexity
    counts as the worst)."""
    done = finished(points)

    def key(p):
        value = perplexity(p)
        return refusal_rate(p), -(math.inf if value is None else value)

    front = []
    for p in done:
        a = key(p)
        if not any(key(q)[0] >= a[0] and key(q)[1] >= a[1] and key(q) != a for q in done):
            front.append(p["index"])
    return front


def new_state(sweep, out_dir: str, executor: str) -> Dict[str, Any]:
    state = _new_state(sweep, executor)
    if sweep.staged:
        from mergekit_lox.sweep import stages

        leaders = stages.group_leaders(stages.defend_texts(sweep))
        state["sweep"].update(staged=True, attacks=list(sweep.attacks), repair=sweep.repair_label)
        state["baseline"] = None if sweep.baseline is None else {"model": sweep.baseline, "status": "pending"}
        for point, leader in zip(state["points"], leaders, strict=True):
            point.update(defense=stages.defense_dir(leader), attacks=None)
    return state


def _new_state(sweep, executor: str) -> Dict[str, Any]:
    return {
        "format": FORMAT,
        "sweep": {
            "file": os.path.abspath(sweep.path),
            "recipe": sweep.recipe_label,
            "fingerprint": sweep.fingerprint(),
            "addresses": sweep.addresses,
            "eval": sweep.eval,
            "keep": sweep.keep,
            "tolerance": sweep.tolerance,
            "executor": executor,
        },
        "reference": None,
        "points": [
            {
                "index": i,
                "dir": os.path.join("points", f"{i:03d}"),
                "params": params,
                "status": "pending",
                "error": None,
                "eval": None,
                "seconds": None,
                "attempts": 0,
            }
            for i, params in enumerate(sweep.points)
        ],
        "chosen": None,
    }


def open_state(sweep, out_dir: str, executor: str) -> Dict[str, Any]:
    """The record in ``out_dir``: resumed when it is this sweep's, new when ``out_dir`` is
    absent or empty; refused when it holds anything else."""
    path = os.path.join(out_dir, SWEEP_JSON)
    state = new_state(sweep, out_dir, executor)
    if os.path.isfile(path):
        try:
            with open(path, "r", encoding="utf-8") as f:
                previous = json.load(f)
            fingerprint = previous["sweep"]["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise SweepStateError(f"{path} is not a sweep record ({error}): choose another -o") from None
        if fingerprint != state["sweep"]["fingerprint"]:
            raise SweepStateError(
                f"{out_dir} holds the results of a different sweep (recipe, points, eval or mergekit options "
                "changed): choose another -o, or delete it to start over"
            )
        recorded(state, previous, path)
        return state
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise SweepStateError(
            f"{out_dir} exists and holds no {SWEEP_JSON}: a sweep writes a new folder, choose another -o"
        )
    return state


STATUSES = ("ok", "failed", "pending")
RECORDED = ("status", "error", "eval", "seconds", "merge_seconds", "eval_seconds", "attempts", "host", "model")
RECORDED_STAGED = ("attacks",)


def recorded(state: Dict[str, Any], previous: Any, path: str) -> None:
    """Copy the results of ``previous`` (sweep.json as read) into the new ``state``, trusting
    nothing in it: the points must be this sweep's (same count, index, parameters), a
    recorded model must be the point's own ``DIR/points/NNN/model`` (so that `keep` can
    never delete outside ``DIR``), and only the result fields are taken, never a path the
    sweep derives itself (``dir``)."""

    def refuse(why: str) -> None:
        raise SweepStateError(f"{path}: {why}: not this sweep's record; choose another -o, or delete it to start over")

    points = previous.get("points") if isinstance(previous, dict) else None
    if not isinstance(points, list) or len(points) != len(state["points"]):
        refuse("its points do not match the sweep file's")
    for point, old in zip(state["points"], points, strict=True):
        where = f"point {point['index']}"
        if not isinstance(old, dict) or old.get("index") != point["index"] or old.get("params") != point["params"]:
            refuse(f"{where} is recorded with another index or other parameters")
        if old.get("status") not in STATUSES:
            refuse(f"{where}: status {old.get('status')!r} is not one of {', '.join(STATUSES)}")
        model = old.get("model")
        own = os.path.join(point.get("defense") or point["dir"], "model")
        if model is not None and model != own:
            refuse(f"{where}: model {model!r} is not the point's own {own}")
        if not isinstance(old.get("eval"), (dict, type(None))) or not isinstance(
            old.get("attacks"), (dict, type(None))
        ):
            refuse(f"{where}: eval or attacks is not a mapping")
        point.update({k: old[k] for k in RECORDED + (RECORDED_STAGED if "defense" in point else ()) if k in old})
    baseline, old = state.get("baseline"), previous.get("baseline")
    if baseline is not None and isinstance(old, dict) and old.get("status") == "ok":
        if old.get("model") != baseline["model"] or not isinstance(old.get("attacks"), dict):
            refuse(f"the baseline is recorded for {old.get('model')!r}, not {baseline['model']!r}")
        baseline.update({k: old[k] for k in ("status", "eval", "attacks", "seconds", "attempts", "host") if k in old})
    reference = previous.get("reference")
    if isinstance(reference, dict) and isinstance(reference.get("eval"), dict):
        state["reference"] = reference


def annotate(state: Dict[str, Any]) -> None:
    """Fill in the reference rate, the chosen point and the Pareto front."""
    if state["sweep"].get("staged"):
        from mergekit_lox.sweep.stages import worst_case

        for point in [*state["points"], state.get("baseline") or {}]:
            point["worst"] = worst_case(point.get("attacks")) if point.get("status") == "ok" else None
    rate, source = reference_rate(state)
    index, why = choose(state["points"], rate, state["sweep"]["tolerance"])
    front = set(pareto_front(state["points"]))
    for point in state["points"]:
        point["pareto"] = point["index"] in front
    state["chosen"] = index
    state["rule"] = {
        "reference_refusal_rate": rate,
        "reference_source": source,
        "tolerance": state["sweep"]["tolerance"],
        "threshold": None if rate is None else rate - state["sweep"]["tolerance"],
        "why": why,
    }


def save(state: Dict[str, Any], out_dir: str) -> str:
    from mergekit_lox.files.output import atomic_write_text

    path = os.path.join(out_dir, SWEEP_JSON)
    atomic_write_text(path, json.dumps(state, indent=1, allow_nan=False) + "\n")
    return path


def _csv_value(value) -> Any:
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        value = json.dumps(value)
    return spreadsheet_text(value) if isinstance(value, str) else value


def _staged_cells(point: Dict[str, Any], attacks: List[str]) -> Dict[str, Any]:
    cells: Dict[str, Any] = {}
    outcomes = point.get("attacks") if isinstance(point.get("attacks"), dict) else {}
    for name in attacks:
        outcome = outcomes.get(name) if isinstance(outcomes.get(name), dict) else {}
        for prefix, entry in (("", {"eval": outcome.get("eval")}), ("repaired_", {"eval": outcome.get("repaired")})):
            cells[f"{name}.{prefix}refusal_rate"] = number(_section(entry, "safety").get("refusal_rate"))
            cells[f"{name}.{prefix}perplexity"] = number(_section(entry, "utility").get("perplexity"))
    worst = point.get("worst") if isinstance(point.get("worst"), dict) else {}
    for key in ("refusal_rate", "refusal_attack", "perplexity", "perplexity_attack"):
        cells[f"worst_{key}"] = worst.get(key)
    return cells


def csv_text(state: Dict[str, Any]) -> str:
    addresses = state["sweep"]["addresses"]
    columns = ["index", "status", *addresses, "refusal_rate", "ci95_low", "ci95_high", "asr", "perplexity"]
    columns += ["pareto", "chosen", "seconds", "merge_seconds", "eval_seconds", "attempts", "model", "error"]
    attacks = [a for a in state["sweep"].get("attacks") or [] if isinstance(a, str)]
    for name in attacks:
        columns += [f"{name}.refusal_rate", f"{name}.perplexity", f"{name}.repaired_refusal_rate"]
        columns += [f"{name}.repaired_perplexity"]
    if state["sweep"].get("staged"):
        columns += ["worst_refusal_rate", "worst_refusal_attack", "worst_perplexity", "worst_perplexity_attack"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for point in state["points"]:
        row = _staged_cells(point, attacks)
        safety = (point.get("eval") or {}).get("safety") or {}
        interval = safety.get("ci95") or [None, None]
        row.update({**point, **{a: point["params"].get(a) for a in addresses}})
        before = number(_section(point, "utility").get("perplexity"))  # a staged point's: before the attacks
        row.update(refusal_rate=safety.get("refusal_rate"), asr=safety.get("asr"), perplexity=before)
        row.update(ci95_low=interval[0], ci95_high=interval[1], chosen=point["index"] == state.get("chosen"))
        writer.writerow([_csv_value(row.get(c)) for c in columns])
    return buffer.getvalue()
