"""The staged sweep's part of report.html: per point (and for the baseline, the undefended
model), refusal rate and perplexity before the attacks, after each attack, after repair,
and the worst case over the attacks; over-refusal where the eval measured it."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from mergekit_lox.html.svg import esc, fmt
from mergekit_lox.sweep.numbers import number


def num(value: Any, digits: int = 3) -> str:
    return esc(fmt(number(value), digits))


def _section(entry: Any, name: str) -> Dict[str, Any]:
    section = entry.get(name) if isinstance(entry, dict) else None
    return section if isinstance(section, dict) else {}


def over_refusal_text(entry: Any) -> Optional[str]:
    """ "r [lo-hi] (benchmark)" from an eval entry's ``over_refusal`` section, or None."""
    section = _section(entry, "over_refusal")
    rate = number(section.get("over_refusal_rate"))
    if rate is None:
        return None
    interval = section.get("ci95")
    bounds = [number(v) for v in interval] if isinstance(interval, list) and len(interval) == 2 else []
    text = fmt(rate, 3)
    if len(bounds) == 2 and None not in bounds:
        text += f" [{fmt(round(bounds[0], 4), 3)}\u2013{fmt(round(bounds[1], 4), 3)}]"
    return text + (f" ({section['benchmark']})" if isinstance(section.get("benchmark"), str) else "")


def _entries(row: Dict[str, Any], attacks: List[str], repair: bool) -> List[Any]:
    """The evals a row shows, in column order: before, then per attack after (and repaired)."""
    outcomes = row.get("attacks") if isinstance(row.get("attacks"), dict) else {}
    entries = [row.get("eval")]
    for name in attacks:
        outcome = outcomes.get(name) if isinstance(outcomes.get(name), dict) else {}
        entries.append(outcome.get("eval"))
        if repair:
            entries.append(outcome.get("repaired"))
    return entries


def staged_table(state: Dict[str, Any], chosen: Optional[int]) -> str:
    sweep = state["sweep"]
    attacks = [a for a in sweep.get("attacks") or [] if isinstance(a, str)]
    repair = bool(sweep.get("repair"))
    addresses = sweep["addresses"]
    baseline = state.get("baseline")
    rows = ([("baseline", baseline)] if isinstance(baseline, dict) else []) + [("point", p) for p in state["points"]]
    with_over = any(over_refusal_text(e) for _, row in rows for e in _entries(row, attacks, repair))
    per = 3 if with_over else 2
    groups = [("before the attacks", per)]
    for name in attacks:
        groups.append((f"after {name}", per))
        if repair:
            groups.append((f"after {name}, repaired", per))
    top = "".join(f'<th rowspan="2">{esc(h)}</th>' for h in ["#", *addresses, "status"])
    top += "".join(f'<th colspan="{span}">{esc(label)}</th>' for label, span in groups)
    top += '<th colspan="2">worst case over the attacks</th><th rowspan="2">Pareto</th><th rowspan="2">error</th>'
    sub = ["refusal", "perplexity", *(["over-refusal"] if with_over else [])] * len(groups)
    sub += ["refusal (attack)", "perplexity (attack)"]
    body = []
    for kind, row in rows:
        if kind == "baseline":
            label = f"baseline: {row.get('model')} undefended"
            cells = [esc(label)] + ["" for _ in addresses]
        else:
            cells = [esc(row["index"])] + [esc(row["params"].get(a, "\u2013")) for a in addresses]
        status = "chosen" if kind == "point" and row["index"] == chosen else row.get("status")
        cells.append(esc(status))
        for entry in _entries(row, attacks, repair):
            cells += [num(_section(entry, "safety").get("refusal_rate"), 4)]
            cells += [num(_section(entry, "utility").get("perplexity"), 5)]
            if with_over:
                cells.append(esc(over_refusal_text(entry) or "\u2013"))
        worst = row.get("worst") if isinstance(row.get("worst"), dict) else {}
        for key in ("refusal_rate", "perplexity"):
            value, by = worst.get(key), worst.get(key.split("_")[0] + "_attack")
            cells.append(f"{num(value, 4)} ({esc(by)})" if number(value) is not None else "\u2013")
        cells.append("yes" if row.get("pareto") else "")
        error = row.get("error") if row.get("status") == "failed" else None
        row_html = "".join(f"<td>{c}</td>" for c in cells) + f'<td class="failed">{esc(error or "")}</td>'
        cls = ' class="chosen"' if status == "chosen" else ' class="baseline"' if kind == "baseline" else ""
        body.append(f"<tr{cls}>{row_html}</tr>")
    head = f"<tr>{top}</tr><tr>{''.join(f'<th>{esc(h)}</th>' for h in sub)}</tr>"
    return f'<table class="staged"><thead>{head}</thead><tbody>{"".join(body)}</tbody></table>'


def baseline_card_text(state: Dict[str, Any]) -> Optional[str]:
    baseline = state.get("baseline")
    worst = baseline.get("worst") if isinstance(baseline, dict) else None
    if not isinstance(worst, dict) or number(worst.get("refusal_rate")) is None:
        return None
    before = number(_section(baseline.get("eval"), "safety").get("refusal_rate"))
    return f"{fmt(before, 3)} \u2192 {fmt(number(worst['refusal_rate']), 3)}"
