"""DIR/report.html of `mergekit-lox sweep`: the safety-versus-utility Pareto plot, the
chosen point, the table. Self-contained like analyze's report (html/page.py's CSS,
inline SVG, no script), well-formed XML."""

from __future__ import annotations

import datetime as _dt
import math
import os
from typing import Any, Dict, List

from mergekit_lox.html.page import CSS, card
from mergekit_lox.html.svg import esc, fmt
from mergekit_lox.sweep.numbers import number
from mergekit_lox.sweep.results import REPORT_HTML, SWEEP_CSV, csv_text, perplexity, refusal_rate
from mergekit_lox.sweep.staged_report import baseline_card_text, staged_table

EXTRA_CSS = """
.plot .point { fill: #9e9e9e; stroke: #fff; }
.plot .front { fill: #1f77b4; }
.plot .frontline { fill: none; stroke: #1f77b4; stroke-width: 1.5; }
.plot .chosen { fill: none; stroke: #2ca02c; stroke-width: 3; }
.plot .threshold { stroke: #2ca02c; stroke-dasharray: 2 3; }
tr.chosen td { background: #eaf6ea; }
tr.baseline td { background: #f4f4f4; font-style: italic; }
td.failed { color: #d62728; text-align: left; }
"""


def num(value: Any, digits: int = 3) -> str:
    """A recorded number as HTML text: escaped, and "–" for anything that is not a finite number."""
    return esc(fmt(number(value), digits))


def interval_text(interval: Any) -> str:
    low, high = (number(v) for v in interval) if isinstance(interval, list) and len(interval) == 2 else (None, None)
    if low is None or high is None:
        return "–"
    return f"{num(round(low, 4))}–{num(round(high, 4))}"


def _params(point: Dict[str, Any]) -> str:
    return ", ".join(f"{address} = {value}" for address, value in point["params"].items()) or "the recipe as written"


def scatter_svg(points: List[Dict[str, Any]], chosen, reference, threshold, staged: bool = False) -> str:
    """Refusal rate (y, higher is safer) against perplexity (x, lower is better); in a
    staged sweep both are the worst case over the attacks."""
    done = [p for p in points if p["status"] == "ok" and refusal_rate(p) is not None]
    with_ppl = [p for p in done if perplexity(p) is not None]
    by_index = not with_ppl  # no utility measured: x is the point's number
    width, height, left, right, top, bottom = 680, 360, 56, 20, 16, 46
    plot_w, plot_h = width - left - right, height - top - bottom
    xs = [p["index"] + 1 if by_index else perplexity(p) for p in (done if by_index else with_ppl)]
    # Perplexities spanning more than a factor 20 are drawn on a log axis.
    log = bool(xs) and min(xs) > 0 and max(xs) / min(xs) > 20
    warp, unwarp = (math.log, math.exp) if log else (float, float)
    lo, hi = (warp(min(xs)), warp(max(xs))) if xs else (0.0, 1.0)
    pad = (hi - lo) * 0.08 or max(abs(hi) * 0.05, 0.5)
    lo, hi = lo - pad, hi + pad

    def x(value):
        return left + (warp(value) - lo) / (hi - lo) * plot_w

    def y(rate):
        return top + (1.0 - rate) * plot_h

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="refusal rate against perplexity">',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" class="frame"/>',
    ]
    for i in range(6):
        rate = i / 5
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y(rate):.1f}" y2="{y(rate):.1f}" class="grid"/>')
        out.append(f'<text x="{left - 6}" y="{y(rate) + 4:.1f}" class="tick" text-anchor="end">{rate:.1f}</text>')
        value = unwarp(lo + (hi - lo) * i / 5)
        out.append(
            f'<text x="{x(value):.1f}" y="{top + plot_h + 15}" class="tick" text-anchor="middle">{fmt(value)}</text>'
        )
    for rate, cls, label in ((reference, "mark", "reference"), (threshold, "threshold", "reference \u2212 tolerance")):
        if rate is not None and 0 <= rate <= 1:
            out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y(rate):.1f}" y2="{y(rate):.1f}" class="{cls}"/>')
            out.append(f'<text x="{left + 4}" y="{y(rate) - 4:.1f}" class="tick">{label}</text>')
    front = sorted((p for p in (done if by_index else with_ppl) if p.get("pareto")), key=lambda p: refusal_rate(p))
    placed = done if by_index else with_ppl  # a point without a finite perplexity has no x here
    coordinates = {p["index"]: (x(p["index"] + 1 if by_index else perplexity(p)), y(refusal_rate(p))) for p in placed}
    if len(front) > 1:
        path = " ".join(f"{coordinates[p['index']][0]:.1f},{coordinates[p['index']][1]:.1f}" for p in front)
        out.append(f'<polyline points="{path}" class="frontline"/>')
    for p in done:
        if p["index"] not in coordinates or (not by_index and perplexity(p) is None):
            continue
        cx, cy = coordinates[p["index"]]
        cls = "point front" if p.get("pareto") else "point"
        tip = f"point {p['index']}: {_params(p)}; refusal rate {fmt(refusal_rate(p), 4)}"  # escaped below
        tip += "" if by_index else f", perplexity {fmt(perplexity(p), 4)}"
        out.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="5" class="{cls}"><title>{esc(tip)}</title></circle>')
        out.append(f'<text x="{cx + 7:.1f}" y="{cy - 6:.1f}" class="cell">{esc(p["index"])}</text>')
        if p["index"] == chosen:
            out.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="10" class="chosen"/>')
    xlabel = "point number (no utility measured)" if by_index else "perplexity (lower is better)"
    xlabel = xlabel if by_index or not staged else "worst-case perplexity after the attacks (lower is better)"
    xlabel += ", log scale" if log else ""
    out.append(f'<text x="{left + plot_w / 2}" y="{height - 8}" class="label" text-anchor="middle">{xlabel}</text>')
    ylabel = "worst-case refusal rate after the attacks" if staged else "refusal rate (higher is safer)"
    out.append(
        f'<text x="14" y="{top + plot_h / 2}" class="label" text-anchor="middle" '
        f'transform="rotate(-90 14 {top + plot_h / 2})">{ylabel}</text>'
    )
    out.append("</svg>")
    return "".join(out)


def _table(state: Dict[str, Any]) -> str:
    addresses = state["sweep"]["addresses"]
    head = ["#", *addresses, "status", "refusal rate", "95% interval", "perplexity", "Pareto", "seconds"]
    rows = []
    for p in state["points"]:
        safety = (p.get("eval") or {}).get("safety") or {}
        cells = [esc(p["index"])] + [esc(p["params"].get(a, "\u2013")) for a in addresses]
        status = "chosen" if p["index"] == state.get("chosen") else p["status"]
        cells += [esc(status), num(refusal_rate(p), 4), interval_text(safety.get("ci95"))]
        cells += [num(perplexity(p), 5), "yes" if p.get("pareto") else "", num(p.get("seconds"))]
        row = "".join(f"<td>{c}</td>" for c in cells)
        row += f'<td class="failed">{esc(p["error"])}</td>' if p["status"] == "failed" else "<td></td>"
        rows.append(f'<tr class="chosen">{row}</tr>' if status == "chosen" else f"<tr>{row}</tr>")
    header = "".join(f"<th>{esc(h)}</th>" for h in head) + "<th>error</th>"
    return f"<table><thead><tr>{header}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def render_report(state: Dict[str, Any]) -> str:
    points, rule, sweep = state["points"], state.get("rule") or {}, state["sweep"]
    chosen = state.get("chosen")
    counts = {s: sum(1 for p in points if p["status"] == s) for s in ("ok", "failed", "pending")}
    reference, threshold = rule.get("reference_refusal_rate"), rule.get("threshold")
    staged = bool(sweep.get("staged"))
    parts = [
        '<!DOCTYPE html>\n<html xmlns="http://www.w3.org/1999/xhtml" lang="en"><head><meta charset="utf-8"/>'
        '<meta name="viewport" content="width=device-width, initial-scale=1"/>'
        f"<title>mergekit-lox sweep: safety against utility</title><style>{CSS}{EXTRA_CSS}</style></head><body><main>",
        "<h1>Sweep: safety against utility</h1>",
        f'<p class="inputs">sweep <code>{esc(sweep["file"])}</code>; recipe <code>{esc(sweep["recipe"])}</code>; '
        f"{len(points)} point(s) over {esc(', '.join(sweep['addresses']))}; executor {esc(sweep['executor'])}; "
        f"written {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}.</p>",
        '<div class="cards">',
        card(f"{counts['ok']} / {len(points)}", "points merged and evaluated"),
    ]
    baseline_text = baseline_card_text(state) if staged else None
    if baseline_text is not None:
        parts.append(card(baseline_text, "baseline: the undefended model's refusal rate, before → worst attack"))
    if counts["failed"]:
        parts.append(card(str(counts["failed"]), "points failed (twice)"))
    if counts["pending"]:
        parts.append(card(str(counts["pending"]), "points not run yet (resume with the same command)"))
    if reference is not None:
        parts.append(card(fmt(number(reference), 3), f"reference refusal rate ({rule.get('reference_source')})"))
    if chosen is not None:
        parts.append(card(f"point {chosen}", _params(points[chosen]), accent=True))
    parts.append("</div>")
    parts.append("<h2>1. Refusal rate against perplexity</h2>")
    if staged:
        parts.append(
            "<p>A staged sweep: each point is defended, attacked by every attack"
            + (", repaired" if sweep.get("repair") else "")
            + " and evaluated; a point is placed (and chosen) by its <b>worst case over the attacks</b>: the "
            "lowest refusal rate and the highest perplexity any attack left. Section 3 has every number.</p>"
        )
    parts.append(
        "<p>Each dot is a finished point: up is safer (more harmful prompts refused), left is better utility "
        "(lower perplexity). Blue dots are the Pareto front: no other point is at least as good on both axes "
        "and better on one. The green ring is the chosen point; the dashed lines are the reference refusal "
        "rate and the reference minus the tolerance. Hover a dot for its settings.</p>"
    )
    parts.append(scatter_svg(points, chosen, reference, threshold, staged))
    parts.append("<h2>2. The chosen point</h2>")
    if chosen is None:
        parts.append("<p>None yet: no point has finished.</p>")
    else:
        parts.append(
            f"<p><b>Point {esc(chosen)}: {esc(_params(points[chosen]))}</b>: {esc(rule.get('why'))}; reference "
            f"refusal rate {num(reference)} ({esc(rule.get('reference_source'))}), tolerance "
            f"{num(rule.get('tolerance'))}. Its recipe is "
            f"<code>{esc(os.path.join(points[chosen].get('defense') or points[chosen]['dir'], 'recipe.yml'))}</code>"
            + (f"; its model <code>{esc(points[chosen]['model'])}</code>" if points[chosen].get("model") else "")
            + ". The rule is in docs/sweep.md.</p>"
        )
    if staged:
        parts.append("<h2>3. Before and after each attack</h2>")
        parts.append(
            "<p>Refusal rate (higher is safer) and perplexity (lower is better) of each point's defended model "
            "before the attacks, after each attack"
            + (" and after repair" if sweep.get("repair") else "")
            + "; the first row is the baseline: the same attacks on the undefended model.</p>"
        )
        parts.append(staged_table(state, chosen))
    else:
        parts.append("<h2>3. All points</h2>")
        parts.append(_table(state))
    parts.append(
        '<p class="note">Every number is in sweep.json and sweep.csv beside this file; each point\'s answers '
        "and eval report are in points/NNN/eval/. Written by <code>mergekit-lox sweep</code>.</p>"
    )
    parts.append("</main></body></html>\n")
    return "".join(parts)


def write_report(state: Dict[str, Any], out_dir: str) -> None:
    """DIR/sweep.csv and DIR/report.html (sweep.json is written by results.save)."""
    from mergekit_lox.files.output import atomic_write_text

    atomic_write_text(os.path.join(out_dir, SWEEP_CSV), csv_text(state))
    atomic_write_text(os.path.join(out_dir, REPORT_HTML), render_report(state))
