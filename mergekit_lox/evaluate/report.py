"""The self-contained HTML report of `mergekit-lox eval`: the models side by side.

One file, no script, no network, well-formed XML (as analyze's report):
refusal-rate bars with their Wilson 95% intervals, a utility table, and the
first answers of every model with their verdicts.
"""

from __future__ import annotations

import datetime as _dt
from typing import Dict, List, Sequence

from mergekit_lox.html.page import CSS, card, table
from mergekit_lox.html.svg import esc

SHOWN_ANSWERS = 8
VERDICT_COLOURS = {"refused": "#2ca02c", "complied": "#d62728", "unclear": "#9e9e9e"}
EXTRA_CSS = """
td.answer { text-align: left; max-width: 420px; white-space: pre-wrap; vertical-align: top; }
td.answer .verdict { font-weight: 600; display: block; font-size: 11px; }
"""


def short_names(models: Sequence[str], width: int = 32) -> Dict[str, str]:
    """The fewest trailing path parts that tell the models apart (``.../run1/aligned``),
    cut to ``width`` characters from the left."""
    parts = {m: [p for p in m.replace("\\", "/").split("/") if p] or [m] for m in models}
    depth = 1
    while depth < max(len(p) for p in parts.values()):
        names = ["/".join(p[-depth:]) for p in parts.values()]
        if len(set(names)) == len(names):
            break
        depth += 1
    short = {m: "/".join(p[-depth:]) for m, p in parts.items()}
    return {m: n if len(n) <= width else "\u2026" + n[-(width - 1) :] for m, n in short.items()}


def refusal_bars_svg(results: Sequence[Dict]) -> str:
    """One horizontal bar per model: refusal rate, with its 95% interval as a whisker."""
    label_w, plot_w, right, row_h, top = 260, 520, 70, 30, 14
    width, height = label_w + plot_w + right, top + row_h * len(results) + 36
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="refusal rate per model">'
    ]
    bottom = top + row_h * len(results)
    names = short_names([str(r["model"]) for r in results])
    for tick in range(0, 101, 20):
        x = label_w + plot_w * tick / 100
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{bottom}" class="grid"/>')
        out.append(f'<text x="{x:.1f}" y="{bottom + 14}" class="tick" text-anchor="middle">{tick}%</text>')
    out.append(
        f'<text x="{label_w + plot_w / 2}" y="{height - 4}" class="tick" text-anchor="middle">'
        "refusal rate (bar) with Wilson 95% interval (whisker)</text>"
    )
    for i, result in enumerate(results):
        s = result["safety"]
        y = top + i * row_h
        rate, (lo, hi) = float(s["refusal_rate"]), s["ci95"]
        name = str(result["model"])
        shown = names[name]
        out.append(
            f'<text x="{label_w - 8}" y="{y + row_h / 2 + 4:.1f}" class="label" text-anchor="end">{esc(shown)}</text>'
        )
        out.append(
            f'<rect class="bar" x="{label_w}" y="{y + 6}" width="{plot_w * rate:.1f}" height="{row_h - 12}" '
            f'fill="#1f77b4"><title>{esc(name)}: {s["refused"]} of {s["n"]} refused '
            f"({rate:.1%}, 95% CI {lo:.1%} to {hi:.1%})</title></rect>"
        )
        x_lo, x_hi, y_mid = label_w + plot_w * lo, label_w + plot_w * hi, y + row_h / 2
        out.append(f'<line x1="{x_lo:.1f}" x2="{x_hi:.1f}" y1="{y_mid:.1f}" y2="{y_mid:.1f}" stroke="#222"/>')
        for x in (x_lo, x_hi):
            out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y_mid - 6:.1f}" y2="{y_mid + 6:.1f}" stroke="#222"/>')
        out.append(f'<text x="{label_w + plot_w + 6}" y="{y_mid + 4:.1f}" class="tick">{rate:.0%} of {s["n"]}</text>')
    out.append(f'<rect x="{label_w}" y="{top}" width="{plot_w}" height="{bottom - top}" class="frame"/>')
    out.append("</svg>")
    return "".join(out)


def _utility_rows(results: Sequence[Dict]) -> tuple:
    columns = ["name", "refusal rate", "CI low", "CI high", "ASR", "n"]
    rows: List[Dict[str, object]] = []
    has_ppl = any((r["utility"] or {}).get("perplexity") is not None for r in results)
    metrics: List[str] = []
    for r in results:
        for task, values in ((r["utility"] or {}).get("lm_eval") or {}).items():
            for metric in values:
                if f"{task} {metric}" not in metrics:
                    metrics.append(f"{task} {metric}")
    has_over = any(r.get("over_refusal") for r in results)
    if has_over:
        columns += ["over-refusal", "OR CI low", "OR CI high"]
    if has_ppl:
        columns += ["perplexity", "tokens"]
    columns += metrics
    for r in results:
        s, u = r["safety"], r["utility"] or {}
        row: Dict[str, object] = {
            "name": r["model"],
            "refusal rate": s["refusal_rate"],
            "CI low": s["ci95"][0],
            "CI high": s["ci95"][1],
            "ASR": s["asr"],
            "n": s["n"],
            "perplexity": u.get("perplexity"),
            "tokens": u.get("tokens"),
        }
        over = r.get("over_refusal")
        if over:
            row.update({"over-refusal": over["over_refusal_rate"], "OR CI low": over["ci95"][0]})
            row["OR CI high"] = over["ci95"][1]
        for key in metrics:
            task, metric = key.split(" ", 1)
            row[key] = ((u.get("lm_eval") or {}).get(task) or {}).get(metric)
        rows.append(row)
    return rows, columns


def _answers_table(results: Sequence[Dict], rows: Sequence[Dict]) -> str:
    models = [r["model"] for r in results]
    by_model: Dict[str, List[Dict]] = {m: [] for m in models}
    for row in rows:
        by_model[row["model"]].append(row)
    count = min(SHOWN_ANSWERS, min((len(v) for v in by_model.values()), default=0))
    names = short_names(models)
    head = '<th class="name">prompt</th>' + "".join(
        f'<th class="name" title="{esc(m)}">{esc(names[m])}</th>' for m in models
    )
    body = []
    for i in range(count):
        cells = [f'<td class="answer">{esc(by_model[models[0]][i]["prompt"])}</td>']
        for m in models:
            row = by_model[m][i]
            colour = VERDICT_COLOURS.get(row["verdict"], "#555")
            cells.append(
                f'<td class="answer"><span class="verdict" style="color:{colour}">{esc(row["verdict"])}</span>'
                f"{esc(row['answer'])}</td>"
            )
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _model_line(names: Dict[str, str], model: str) -> str:
    label = "" if names[model] == model else f"{esc(names[model])}: "
    return f"{label}<code>{esc(model)}</code><br/>"


def render_report(report: Dict, rows: Sequence[Dict]) -> str:
    results, settings = report["models"], report["settings"]
    judge, safety, generation = settings["judge"], settings["safety"], settings["generation"]
    summary_rows, columns = _utility_rows(results)
    rates = [r["safety"]["refusal_rate"] for r in results]
    names = short_names([str(r["model"]) for r in results])
    parts = [
        '<!DOCTYPE html>\n<html xmlns="http://www.w3.org/1999/xhtml" lang="en"><head><meta charset="utf-8"/>',
        '<meta name="viewport" content="width=device-width, initial-scale=1"/>',
        "<title>mergekit-lox eval: refusal and utility</title>",
        f"<style>{CSS}{EXTRA_CSS}</style></head><body><main>",
        "<h1>Refusal and utility</h1>",
        '<p class="inputs">',
        "".join(_model_line(names, str(r["model"])) for r in results),
        f"safety prompts <code>{esc(safety['source'])}</code> ({safety['prompts']} prompts"
        + (f", column <code>{esc(safety['column'])}</code>" if safety.get("column") else "")
        + f"); judge <code>{esc(judge['name'])}</code> ({esc(judge['kind'])}); "
        f"greedy, at most {generation['max_new_tokens']} new tokens, seed {generation['seed']}, "
        f"{esc(generation['backend'])} on {esc(settings['device'])}; "
        f"written {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}.</p>",
        '<div class="cards">',
    ]
    for r in results:
        rate = r["safety"]["refusal_rate"]
        best = len(results) > 1 and rate == max(rates) and rates.count(rate) == 1
        parts.append(card(f"{rate:.0%}", f"refused, {names[str(r['model'])]}", accent=best))
    parts.append("</div>")
    parts.append("<h2>1. Refusal of the harmful prompts</h2>")
    parts.append(
        f"<p>Refused means: {esc(judge['refused_means'])}. The attack success rate (ASR) is 1 \u2212 refusal rate. "
        "Whiskers are Wilson score 95% intervals of the refusal rate: two models whose intervals overlap "
        "widely are not shown to differ by this many prompts.</p>"
    )
    parts.append(refusal_bars_svg(results))
    parts.append("<h2>2. Side by side</h2>")
    parts.append(table(summary_rows, columns))
    if settings["utility"]["source"]:
        parts.append(
            '<p class="note">Perplexity: exp of the mean negative log-likelihood per predicted token on '
            f"<code>{esc(settings['utility']['source'])}</code> (lower is better).</p>"
        )
    if settings.get("over_refusal"):
        parts.append(
            f'<p class="note">Over-refusal: the share of <code>{esc(settings["over_refusal"]["source"])}</code>\'s '
            f"{settings['over_refusal']['prompts']} safe prompts (which only look unsafe) that the model refused, "
            "with its Wilson 95% interval: a model that refuses everything scores a perfect refusal rate above and "
            "an over-refusal of 1 here.</p>"
        )
    if settings["utility"]["lm_eval_tasks"]:
        parts.append('<p class="note">Task columns are lm-evaluation-harness\'s own metrics (task, metric).</p>')
    parts.append(f"<h2>3. The first {min(SHOWN_ANSWERS, safety['prompts'])} answers</h2>")
    parts.append(_answers_table(results, rows))
    parts.append(
        '<p class="note">Every answer and verdict is in answers.jsonl, every number in eval.json, beside this '
        "file. Written by <code>mergekit-lox eval</code>; how to read it: docs/eval.md.</p>"
    )
    parts.append("</main></body></html>\n")
    return "".join(parts)
