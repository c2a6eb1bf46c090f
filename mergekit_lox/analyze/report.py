"""The self-contained HTML report of `mergekit-lox analyze`.

One file, no script, no network: plots are inline SVG drawn here, styles are
inline CSS. The markup is well-formed XML (every tag closed, only numeric or
XML entities) so it can be checked by a strict parser.
"""

from __future__ import annotations

import datetime as _dt

from mergekit_lox.analyze.names import layer_and_module
from mergekit_lox.analyze.plots import (
    curves_svg,
    heatmap_svg,
    spectrum_svg,
)
from mergekit_lox.analyze.stats import Analysis
from mergekit_lox.html.page import CSS, card, table
from mergekit_lox.html.svg import esc, fmt, histogram_svg


def render_report(analysis: Analysis) -> str:
    summary, inputs, rows = analysis.summary, analysis.inputs, analysis.tensors
    k = int(summary["k"])
    suggested = int(summary["suggested_lox_rank"])
    finetuned = analysis.has_finetuned
    n = len(rows)
    safelora = summary.get("safelora") or {}
    # Next to the figure: which tensors the mean covers, and how it compares with the reference.
    mean_over = f"over {summary['mean_r_tensors']} {summary['mean_r_rule']}; R_metrics.py's default k is 100"
    projected = safelora.get("projected", [])

    parts = [
        '<!DOCTYPE html>\n<html xmlns="http://www.w3.org/1999/xhtml" lang="en"><head><meta charset="utf-8"/>',
        '<meta name="viewport" content="width=device-width, initial-scale=1"/>',
        "<title>mergekit-lox analyze: safety-subspace report</title>",
        f"<style>{CSS}</style></head><body><main>",
        "<h1>Safety-subspace report</h1>",
        '<p class="inputs">',
        f"base <code>{esc(inputs['base'])}</code><br/>aligned <code>{esc(inputs['aligned'])}</code><br/>",
        f"fine-tuned <code>{esc(inputs['finetuned'])}</code><br/>"
        if finetuned
        else "fine-tuned: none given (no r_ft, no Safe LoRA cosine)<br/>",
        f"k = {k}; {n} tensors with 2 or more dimensions analysed",
        f", {summary['tensors_skipped_below_2d']} with fewer skipped",
        f", filter <code>{esc(inputs['filter'])}</code>" if inputs.get("filter") else "",
        f"; device {esc(inputs['device'])}; written {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}.</p>",
        "<p>tau = W_aligned \u2212 W_base is each tensor's safety update; "
        "dW = W_finetuned \u2212 W_aligned the fine-tuning update. Hover a cell or point for exact values; "
        "every number is also in analysis.json and analysis.csv beside this file.</p>",
        '<div class="cards">',
        card(fmt(summary["effective_rank"]["median"]), "median effective rank exp(H) of tau"),
        card(fmt(summary["lssf_rank"]["median"]), "median LSSF automatic rank (eta 0.9)"),
        card(fmt(summary["mean_energy_top_k"]), f"mean share of ||tau||\u00b2 in the top {k}"),
        card(fmt(summary["mean_r_align"]), f"mean r_align at k = {k}, {mean_over}"),
    ]
    if finetuned:
        parts.append(card(fmt(summary["mean_r_ft"]), f"mean r_ft at k = {k}, {mean_over}"))
        parts.append(
            card(f"{len(projected)} / {n}", f"tensors Safe LoRA projects at threshold {safelora['threshold']:g}")
        )
    parts.append(card(str(suggested), "suggested LoX rank (a heuristic)", accent=True))
    parts.append("</div>")

    parts.append("<h2>1. Where safety lives: effective rank of tau per layer</h2>")
    parts.append(
        "<p>exp(H) of the singular values of tau: how many directions the safety update really uses. "
        "Low (dark) means concentrated in a few directions, which a small LoX rank covers and which "
        "fine-tuning can wash out easily; high (yellow) means diffuse. "
        "This is the effective rank metric (Roy and Vetterli); LSSF's own rank rule keeps the leading "
        "directions holding 90% of the energy entropy (lssf_rank).</p>"
    )
    parts.append(heatmap_svg(rows, "effective_rank", "effective rank", log=True))

    parts.append(f"<h2>2. How much of the safety subspace the models keep (k = {k})</h2>")
    parts.append(
        f"<p>r_align = ||P_k tau|| / ||tau||: the share (in norm) of the safety update inside its own "
        f"top-{k} subspace. "
        + (
            "r_ft = ||P_k (dW + tau)|| / ||dW + tau||: the same share for the fine-tuned model's whole "
            "change from base. r_ft well below r_align means the fine-tune has moved the weights out of "
            "the safety subspace, the erosion LoX guards against (LoX paper, section 3). "
            "Both maps share one colour scale.</p>"
            if finetuned
            else "Give --finetuned to see r_ft, the same share after fine-tuning.</p>"
        )
    )
    # One colour scale for both maps: a cell darker in r_ft than in r_align is erosion.
    shares = [float(r[key]) for r in rows for key in ("r_ft", "r_align") if r.get(key) is not None]
    shared = (min(shares), max(shares)) if shares else None
    if finetuned:
        parts.append(heatmap_svg(rows, "r_ft", "r_ft", log=False, value_range=shared))
    parts.append(heatmap_svg(rows, "r_align", "r_align", log=False, value_range=shared))

    parts.append("<h2>3. Choosing the LoX rank</h2>")
    parts.append(
        f"<p><b>Suggested LoX rank (a heuristic): {suggested}.</b> "
        f"It is the {esc(summary['suggested_lox_rank_rule'])}: "
        "the rank after which the safety spectrum drops most, so LoX extrapolates the concentrated part and "
        "not the tail. The curves are means over tensors; the green line marks the suggestion, the dashed "
        f"one --k. The LoX paper uses rank 6 on its own DPO-aligned Llama-2-7B (its reference script "
        "defaults to full rank, --k 0); the rank for another model is yours to choose. A starting point: "
        f"<code>rank: {suggested}</code> in a <code>lox_extrapolate</code> recipe.</p>"
    )
    parts.append(curves_svg(summary["curves"], k, suggested))

    parts.append("<h2>4. Singular spectra of representative tensors</h2>")
    parts.append(
        "<p>S_i / S_1 of tau (log scale, first 64). One tensor per module type at the middle layer, "
        'and the tensors outside the layers.</p><p class="key">'
        '<span style="background:#555"></span>--k'
        '<span style="background:#ff7f0e"></span>LSSF rank'
        '<span style="background:#2ca02c"></span>suggested LoX rank</p>'
    )
    by_name = {row["name"]: row for row in rows}
    parts.append('<div class="spectra">')
    for name, spectrum in summary["representative_spectra"].items():
        parts.append(spectrum_svg(name, by_name[name], spectrum, k, suggested))
    parts.append("</div>")

    if finetuned:
        threshold = safelora["threshold"]
        parts.append(f"<h2>5. Safe LoRA at threshold {threshold:g}</h2>")
        parts.append(
            "<p>The cosine between dW and its projection C dW onto the alignment matrix (C = V V\u1d40/||V||, "
            "the reference's scaled projection). A low cosine means the fine-tuning update points away from "
            f"the alignment subspace; <code>safelora_project</code> with threshold {threshold:g} replaces those "
            f"tensors (red) by W_aligned + C dW. {len(projected)} of {n} tensors would be projected.</p>"
        )
        merging = summary.get("safemerge") or {}
        if merging:
            parts.append(
                f"<p><code>safemerge</code> (SafeMERGE) compares the same cosine with its default threshold "
                f"{merging['threshold']:g} (strictly) and would merge {len(merging['merged'])} of {n} tensors "
                "toward its safety model (all in analysis.json).</p>"
            )
        cosines = [float(r["safelora_cos"]) for r in rows if r.get("safelora_cos") is not None]
        parts.append(histogram_svg(cosines, threshold))
        if projected:
            listed = [by_name[p["name"]] for p in projected[:60]]
            parts.append(table(listed, ["name", "shape", "safelora_cos", "r_ft", "r_align"]))
            if len(projected) > 60:
                parts.append(f'<p class="note">and {len(projected) - 60} more (all in analysis.json).</p>')

    outside = [row for row in rows if layer_and_module(str(row["name"]))[0] is None]
    if outside:
        parts.append(f"<h2>{6 if finetuned else 5}. Tensors outside the layers</h2>")
        parts.append(table(outside, analysis.columns))
    parts.append(f"<details><summary>All {n} tensors</summary>")
    parts.append(table(rows, analysis.columns))
    parts.append("</details>")
    parts.append(
        '<p class="note">Written by <code>mergekit-lox analyze</code>. How to read this report: '
        "docs/analyze.md in the mergekit-lox repository.</p>"
    )
    parts.append("</main></body></html>\n")
    return "".join(parts)
