"""The self-contained HTML report of `mergekit-lox analyze`.

One file, no script, no network: plots are inline SVG drawn here, styles are
inline CSS. The markup is well-formed XML (every tag closed, only numeric or
XML entities) so it can be checked by a strict parser.
"""

from __future__ import annotations

import datetime as _dt
import math
from html import escape
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from mergekit_lox.analyze import Analysis, layer_and_module, module_sort_key

# viridis, sampled: dark = low, yellow = high.
_PALETTE = [
    (68, 1, 84), (72, 40, 120), (62, 73, 137), (49, 104, 142), (38, 130, 142),
    (31, 158, 137), (53, 183, 121), (110, 206, 88), (181, 222, 43), (253, 231, 37),
]
_SERIES = {"r_align": "#1f77b4", "r_ft": "#d62728", "energy": "#7f7f7f"}
_MISSING = "#eeeeee"


def _e(text) -> str:
    return escape(str(text), quote=True)


def _fmt(value, digits: int = 3) -> str:
    """``digits`` significant digits in fixed point (exponent only outside [1e-3, 1e5))."""
    if value is None:
        return "\u2013"
    if isinstance(value, list):
        return "\u00d7".join(str(v) for v in value)
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) < 1e5):
        return str(int(value))
    if not math.isfinite(value):
        return "\u2013"
    magnitude = abs(value)
    if magnitude >= 1e5 or magnitude < 1e-3:
        return f"{value:.{digits - 1}e}"
    decimals = max(0, digits - 1 - math.floor(math.log10(magnitude)))
    return f"{value:.{decimals}f}"


def _color(t: float) -> Tuple[str, bool]:
    """Palette colour at t in [0, 1], and whether text on it should be light."""
    t = min(max(t, 0.0), 1.0) * (len(_PALETTE) - 1)
    i = min(int(t), len(_PALETTE) - 2)
    f = t - i
    rgb = [round(a + (b - a) * f) for a, b in zip(_PALETTE[i], _PALETTE[i + 1])]
    light = (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]) < 140
    return "#%02x%02x%02x" % tuple(rgb), light


def _scale(values: Sequence[float], log: bool) -> Callable[[float], float]:
    finite = [v for v in values if v is not None and math.isfinite(v) and (v > 0 or not log)]
    if not finite:
        return lambda v: 0.5
    lo, hi = min(finite), max(finite)
    if log:
        lo, hi = math.log(lo), math.log(hi)
    if hi - lo < 1e-12:
        return lambda v: 0.5

    def position(v: float) -> float:
        x = math.log(v) if log else v
        return (x - lo) / (hi - lo)

    return position


# --------------------------------------------------------------------------- plots


def heatmap_svg(
    rows: List[Dict[str, object]],
    key: str,
    label: str,
    *,
    log: bool,
    digits: int = 3,
    value_range: Optional[Tuple[float, float]] = None,
) -> str:
    """Module type x layer grid of ``key``; mean where several tensors share a cell.

    ``value_range`` fixes the colour scale, so that two maps can be compared cell by cell.
    """
    cells: Dict[Tuple[str, int], List[Dict[str, object]]] = {}
    for row in rows:
        layer, module = layer_and_module(str(row["name"]))
        if layer is not None:
            cells.setdefault((module, layer), []).append(row)
    if not cells:
        return '<p class="note">No tensor belongs to a numbered layer, so there is no per-layer map.</p>'
    modules = sorted({m for m, _ in cells}, key=module_sort_key)
    layers = sorted({layer for _, layer in cells})
    values = {
        cell: _mean([r[key] for r in group]) for cell, group in cells.items()
    }
    position = _scale(list(value_range) if value_range else list(values.values()), log)

    left = max(8 * max(len(m) for m in modules), 60) + 12
    width_cell = max(18.0, min(56.0, (1240 - left) / len(layers)))
    height_cell = 24
    top = 42
    scale_note = ", log colour scale" if log else ""
    title = f"{label} by layer and module{scale_note}"
    # Wide enough for the title (about 7.5 px a character in the 12 px label font).
    width = max(left + width_cell * len(layers) + 8, 7.5 * len(title) + 16)
    legend_y = top + height_cell * len(modules) + 12
    height = legend_y + 32
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" width="{width:.0f}" height="{height}" '
        f'viewBox="0 0 {width:.0f} {height}" role="img" aria-label="{_e(label)} per layer">',
        f'<text x="8" y="16" class="label">{_e(title)}</text>',
        f'<text x="{left - 6}" y="{top - 7}" class="tick" text-anchor="end">layer</text>',
    ]
    step = max(1, math.ceil(len(layers) / ((width - left) / 22)))
    for j, layer in enumerate(layers):
        if j % step == 0:
            x = left + (j + 0.5) * width_cell
            out.append(f'<text x="{x:.1f}" y="{top - 7}" class="tick" text-anchor="middle">{layer}</text>')
    for i, module in enumerate(modules):
        y = top + i * height_cell
        out.append(
            f'<text x="{left - 6}" y="{y + height_cell / 2 + 4:.1f}" class="label" text-anchor="end">{_e(module)}</text>'
        )
        for j, layer in enumerate(layers):
            x = left + j * width_cell
            value = values.get((module, layer))
            group = cells.get((module, layer), [])
            if value is None:
                fill, light = _MISSING, False
            else:
                fill, light = _color(position(value))
            names = ", ".join(str(r["name"]) for r in group) or f"layer {layer} {module}: none"
            shape = _fmt(group[0]["shape"]) if group else ""
            tip = f"{names} [{shape}]: {label} = {_fmt(value, 4)}"
            out.append(
                f'<rect x="{x:.1f}" y="{y}" width="{width_cell - 1:.1f}" height="{height_cell - 1}" '
                f'fill="{fill}"><title>{_e(tip)}</title></rect>'
            )
            if value is not None and width_cell >= 30:
                color = "#ffffff" if light else "#111111"
                out.append(
                    f'<text x="{x + (width_cell - 1) / 2:.1f}" y="{y + height_cell / 2 + 3.5:.1f}" '
                    f'class="cell" text-anchor="middle" fill="{color}">{_fmt(value, digits)}</text>'
                )
    finite = list(value_range) if value_range else [v for v in values.values() if v is not None and math.isfinite(v)]
    if finite:
        out.append(_legend(left, legend_y, min(320.0, width - left - 8), min(finite), max(finite)))
    out.append("</svg>")
    return "".join(out)


def _legend(x: float, y: float, width: float, lo: float, hi: float) -> str:
    steps = 40
    parts = []
    for s in range(steps):
        fill, _ = _color(s / (steps - 1))
        parts.append(
            f'<rect x="{x + s * width / steps:.1f}" y="{y}" width="{width / steps + 0.5:.1f}" height="10" fill="{fill}"/>'
        )
    parts.append(f'<text x="{x}" y="{y + 23}" class="tick">{_fmt(lo)}</text>')
    parts.append(f'<text x="{x + width}" y="{y + 23}" class="tick" text-anchor="end">{_fmt(hi)}</text>')
    return "".join(parts)


def _axis_ticks(lo: float, hi: float, count: int = 5) -> List[float]:
    return [lo + (hi - lo) * i / (count - 1) for i in range(count)]


def curves_svg(curves: Dict[str, List[Optional[float]]], k: int, suggested: int) -> str:
    """Mean r_align(k) and r_ft(k) over tensors, k = 1..K, with k and the suggestion marked."""
    ks = curves["k"]
    width, height = 640, 300
    left, right, top, bottom = 48, 150, 28, 40
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(kv: float) -> float:
        return left + (kv - ks[0]) / max(ks[-1] - ks[0], 1) * plot_w

    def py(v: float) -> float:
        return top + (1 - v) * plot_h

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="r(k) curves">'
    ]
    out.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" class="frame"/>')
    for v in _axis_ticks(0.0, 1.0):
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{py(v):.1f}" y2="{py(v):.1f}" class="grid"/>')
        out.append(f'<text x="{left - 6}" y="{py(v) + 4:.1f}" class="tick" text-anchor="end">{v:.2f}</text>')
    for kv in ks:
        if kv == 1 or kv % 4 == 0:
            out.append(f'<text x="{px(kv):.1f}" y="{top + plot_h + 16}" class="tick" text-anchor="middle">{kv}</text>')
    out.append(
        f'<text x="{left + plot_w / 2}" y="{height - 6}" class="tick" text-anchor="middle">rank k</text>'
    )
    markers = [("--k", k, "mark"), ("suggested", suggested, "suggest")]
    for marker, kv, cls in markers:
        if ks[0] <= kv <= ks[-1]:
            out.append(f'<line x1="{px(kv):.1f}" x2="{px(kv):.1f}" y1="{top}" y2="{top + plot_h}" class="{cls}"/>')
    # Labels above the frame; the smaller rank's label sits left of its line so
    # that equal or close ranks do not collide.
    for marker, kv, cls in markers:
        if ks[0] <= kv <= ks[-1]:
            other = k if cls == "suggest" else suggested
            on_left = kv < other or (kv == other and cls == "suggest")
            anchor, dx = ("end", -3) if on_left else ("start", 3)
            out.append(
                f'<text x="{px(kv) + dx:.1f}" y="{top - 8}" class="tick" text-anchor="{anchor}">{marker} {kv}</text>'
            )
    legend_y = top + 8
    names = {"r_align": "r_align(k)", "r_ft": "r_ft(k)", "energy": "energy share"}
    for series in ("r_align", "r_ft", "energy"):
        values = curves.get(series)
        if not values:
            continue
        points = [(px(kv), py(v)) for kv, v in zip(ks, values) if v is not None]
        dash = ' stroke-dasharray="4 3"' if series == "energy" else ""
        out.append(
            f'<polyline fill="none" stroke="{_SERIES[series]}" stroke-width="2"{dash} points="'
            + " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
            + '"/>'
        )
        out.append(
            f'<line x1="{left + plot_w + 12}" x2="{left + plot_w + 32}" y1="{legend_y}" y2="{legend_y}" '
            f'stroke="{_SERIES[series]}" stroke-width="2"{dash}/>'
        )
        out.append(f'<text x="{left + plot_w + 38}" y="{legend_y + 4}" class="tick">{names[series]}</text>')
        legend_y += 18
    out.append("</svg>")
    return "".join(out)


def spectrum_svg(name: str, row: Dict[str, object], spectrum: List[float], k: int, suggested: int) -> str:
    """Singular values of tau relative to the largest, log scale, with the ranks marked."""
    width, height = 400, 210
    left, right, top, bottom = 44, 10, 30, 30
    plot_w, plot_h = width - left - right, height - top - bottom
    values = [s / spectrum[0] for s in spectrum if spectrum and spectrum[0] > 0 and s > 0]
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="spectrum of {_e(name)}">'
    ]
    out.append(f'<text x="{left}" y="13" class="label">{_e(_short(name))}</text>')
    out.append(
        f'<text x="{left}" y="25" class="tick">{_fmt(row["shape"])}, effective rank {_fmt(row["effective_rank"])}, '
        f'LSSF rank {row["lssf_rank"]}</text>'
    )
    out.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" class="frame"/>')
    if not values:
        out.append(f'<text x="{left + 10}" y="{top + 30}" class="tick">tau is zero</text></svg>')
        return "".join(out)
    floor = max(min(values), 1e-8)
    decades = max(1, math.ceil(-math.log10(floor)))
    n = len(values)

    def px(i: float) -> float:
        return left + (i - 1) / max(n - 1, 1) * plot_w

    def py(v: float) -> float:
        return top + (-math.log10(max(v, 10.0 ** -decades))) / decades * plot_h

    for d in range(decades + 1):
        y = top + d / decades * plot_h
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        out.append(f'<text x="{left - 4}" y="{y + 4:.1f}" class="tick" text-anchor="end">1e-{d}</text>' if d else
                   f'<text x="{left - 4}" y="{y + 4:.1f}" class="tick" text-anchor="end">1</text>')
    for i in (1, *range(8, n + 1, 8)):
        out.append(f'<text x="{px(i):.1f}" y="{top + plot_h + 14}" class="tick" text-anchor="middle">{i}</text>')
    for marker, kv, cls in (("k", k, "mark"), ("LSSF", row["lssf_rank"], "lssf"), ("gap", suggested, "suggest")):
        if isinstance(kv, int) and 1 <= kv <= n:
            out.append(f'<line x1="{px(kv):.1f}" x2="{px(kv):.1f}" y1="{top}" y2="{top + plot_h}" class="{cls}"/>')
    out.append(
        '<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="'
        + " ".join(f"{px(i + 1):.1f},{py(v):.1f}" for i, v in enumerate(values))
        + '"/>'
    )
    for i, v in enumerate(values):
        out.append(f'<circle cx="{px(i + 1):.1f}" cy="{py(v):.1f}" r="2" fill="#1f77b4"><title>S_{i + 1}/S_1 = {v:.4g}</title></circle>')
    out.append("</svg>")
    return "".join(out)


def histogram_svg(cosines: List[float], threshold: float) -> str:
    """Safe LoRA cosines in bins of 0.05 over [0, 1]; bars at or below the threshold are projected."""
    bins = 20
    counts = [0] * bins
    for c in cosines:
        counts[min(max(int(c * bins), 0), bins - 1)] += 1
    width, height = 640, 220
    left, right, top, bottom = 44, 16, 12, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = max(counts) or 1
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="Safe LoRA cosine histogram">'
    ]
    out.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" class="frame"/>')
    for b, count in enumerate(counts):
        x = left + b * plot_w / bins
        h = count / peak * plot_h
        fill = "#d62728" if (b + 1) / bins <= threshold + 1e-12 else "#9e9e9e"
        out.append(
            f'<rect x="{x + 1:.1f}" y="{top + plot_h - h:.1f}" width="{plot_w / bins - 2:.1f}" height="{h:.1f}" '
            f'fill="{fill}"><title>cos in [{b / bins:.2f}, {(b + 1) / bins:.2f}): {count} tensor(s)</title></rect>'
        )
    for v in _axis_ticks(0.0, 1.0, 6):
        out.append(f'<text x="{left + v * plot_w:.1f}" y="{top + plot_h + 14}" class="tick" text-anchor="middle">{v:.1f}</text>')
    out.append(f'<text x="{left - 6}" y="{top + 10}" class="tick" text-anchor="end">{peak}</text>')
    out.append(f'<text x="{left - 6}" y="{top + plot_h}" class="tick" text-anchor="end">0</text>')
    tx = left + threshold * plot_w
    out.append(f'<line x1="{tx:.1f}" x2="{tx:.1f}" y1="{top}" y2="{top + plot_h}" class="mark"/>')
    out.append(f'<text x="{tx + 4:.1f}" y="{top + 12}" class="tick">threshold {threshold:g}</text>')
    out.append(
        f'<text x="{left + plot_w / 2}" y="{height - 6}" class="tick" text-anchor="middle">'
        "Safe LoRA cosine (scaled projection)</text>"
    )
    out.append("</svg>")
    return "".join(out)


# --------------------------------------------------------------------------- page


_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: #1d1d1f;
       margin: 0; background: #fafafa; }
main { max-width: 1320px; margin: 0 auto; padding: 24px 32px 48px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 34px 0 6px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
p { line-height: 1.45; margin: 6px 0; max-width: 1000px; }
p.note, .inputs { color: #555; font-size: 13px; }
.inputs code { font-size: 12px; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 18px 0 6px; }
.card { background: #fff; border: 1px solid #ddd; border-radius: 8px; padding: 10px 14px; min-width: 150px; }
.card .value { font-size: 24px; font-weight: 600; }
.card .what { font-size: 12px; color: #555; }
.card.accent { border-color: #2ca02c; }
.plot { background: #fff; border: 1px solid #e3e3e3; border-radius: 6px; margin: 6px 0; max-width: 100%; height: auto; }
.plot text { font-family: inherit; }
.plot .tick { font-size: 11px; fill: #444; }
.plot .label { font-size: 12px; fill: #222; font-weight: 600; }
.plot .cell { font-size: 10px; }
.plot .frame { fill: none; stroke: #bbb; }
.plot .grid { stroke: #eee; }
.plot .mark { stroke: #555; stroke-dasharray: 4 3; }
.plot .suggest { stroke: #2ca02c; stroke-width: 2; }
.plot .lssf { stroke: #ff7f0e; stroke-dasharray: 2 2; }
.spectra { display: flex; flex-wrap: wrap; gap: 8px; }
.key { font-size: 12px; color: #555; }
.key span { display: inline-block; width: 14px; height: 3px; vertical-align: middle; margin: 0 4px 0 12px; }
table { border-collapse: collapse; font-size: 12px; background: #fff; margin: 8px 0; }
th, td { border: 1px solid #e0e0e0; padding: 3px 8px; text-align: right; }
th { background: #f0f0f0; }
td.name, th.name { text-align: left; font-family: ui-monospace, "DejaVu Sans Mono", monospace; }
details { margin-top: 10px; }
summary { cursor: pointer; font-weight: 600; }
"""


def _mean(values) -> Optional[float]:
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(finite) / len(finite) if finite else None


def _short(name: str) -> str:
    return name[:-7] if name.endswith(".weight") else name


def _card(value: str, what: str, accent: bool = False) -> str:
    cls = "card accent" if accent else "card"
    return f'<div class="{cls}"><div class="value">{_e(value)}</div><div class="what">{_e(what)}</div></div>'


def _table(rows: List[Dict[str, object]], columns: Sequence[str]) -> str:
    head = "".join(f'<th class="name">{c}</th>' if c == "name" else f"<th>{c}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for c in columns:
            if c == "name":
                cells.append(f'<td class="name">{_e(row[c])}</td>')
            else:
                cells.append(f"<td>{_e(_fmt(row[c], 4))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render_report(analysis: Analysis) -> str:
    summary, inputs, rows = analysis.summary, analysis.inputs, analysis.tensors
    k = int(summary["k"])
    suggested = int(summary["suggested_lox_rank"])
    finetuned = analysis.has_finetuned
    n = len(rows)
    safelora = summary.get("safelora") or {}
    projected = safelora.get("projected", [])

    parts = [
        '<!DOCTYPE html>\n<html xmlns="http://www.w3.org/1999/xhtml" lang="en"><head><meta charset="utf-8"/>',
        '<meta name="viewport" content="width=device-width, initial-scale=1"/>',
        "<title>mergekit-lox analyze: safety-subspace report</title>",
        f"<style>{_CSS}</style></head><body><main>",
        "<h1>Safety-subspace report</h1>",
        '<p class="inputs">',
        f"base <code>{_e(inputs['base'])}</code><br/>aligned <code>{_e(inputs['aligned'])}</code><br/>",
        f"fine-tuned <code>{_e(inputs['finetuned'])}</code><br/>" if finetuned else "fine-tuned: none given (no r_ft, no Safe LoRA cosine)<br/>",
        f"k = {k}; {n} tensors with 2 or more dimensions analysed",
        f", {summary['tensors_skipped_below_2d']} with fewer skipped",
        f", filter <code>{_e(inputs['filter'])}</code>" if inputs.get("filter") else "",
        f"; device {_e(inputs['device'])}; written {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}.</p>",
        "<p>tau = W_aligned \u2212 W_base is each tensor's safety update; "
        "dW = W_finetuned \u2212 W_aligned the fine-tuning update. Hover a cell or point for exact values; "
        "every number is also in analysis.json and analysis.csv beside this file.</p>",
        '<div class="cards">',
        _card(_fmt(summary["effective_rank"]["median"]), "median effective rank exp(H) of tau"),
        _card(_fmt(summary["lssf_rank"]["median"]), "median LSSF automatic rank"),
        _card(_fmt(summary["mean_energy_top_k"]), f"mean share of ||tau||\u00b2 in the top {k}"),
        _card(_fmt(summary["mean_r_align"]), f"mean r_align at k = {k}"),
    ]
    if finetuned:
        parts.append(_card(_fmt(summary["mean_r_ft"]), f"mean r_ft at k = {k}"))
        parts.append(_card(f"{len(projected)} / {n}", f"tensors Safe LoRA projects at threshold {safelora['threshold']:g}"))
    parts.append(_card(str(suggested), "suggested LoX rank", accent=True))
    parts.append("</div>")

    parts.append("<h2>1. Where safety lives: effective rank of tau per layer</h2>")
    parts.append(
        "<p>exp(H) of the singular values of tau: how many directions the safety update really uses. "
        "Low (dark) means concentrated in a few directions, which a small LoX rank covers and which "
        "fine-tuning can wash out easily; high (yellow) means diffuse. "
        "LSSF's automatic rank is its ceiling.</p>"
    )
    parts.append(heatmap_svg(rows, "effective_rank", "effective rank", log=True))

    parts.append(f"<h2>2. How much of the safety subspace the models keep (k = {k})</h2>")
    parts.append(
        f"<p>r_align = ||P_k tau|| / ||tau||: the share (in norm) of the safety update inside its own "
        f"top-{k} subspace. "
        + (
            "r_ft = ||P_k (dW + tau)|| / ||dW + tau||: the same share for the fine-tuned model's whole "
            "change from base. r_ft well below r_align means the fine-tune has moved the weights out of "
            "the safety subspace, the erosion LoX guards against (LoX paper, section 3). Both maps share one colour scale.</p>"
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
        f"<p><b>Suggested LoX rank: {suggested}.</b> It is the {_e(summary['suggested_lox_rank_rule'])}: "
        "the rank after which the safety spectrum drops most, so LoX extrapolates the concentrated part and "
        "not the tail. The curves are means over tensors; the green line marks the suggestion, the dashed "
        f"one --k. The LoX paper uses rank 6 on Llama-2-7B. Use it as a starting point: "
        f"<code>rank: {suggested}</code> in a <code>lox_extrapolate</code> recipe.</p>"
    )
    parts.append(curves_svg(summary["curves"], k, suggested))

    parts.append("<h2>4. Singular spectra of representative tensors</h2>")
    parts.append(
        '<p>S_i / S_1 of tau (log scale, first 64). One tensor per module type at the middle layer, '
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
        cosines = [float(r["safelora_cos"]) for r in rows if r.get("safelora_cos") is not None]
        parts.append(histogram_svg(cosines, threshold))
        if projected:
            listed = [by_name[p["name"]] for p in projected[:60]]
            parts.append(_table(listed, ["name", "shape", "safelora_cos", "r_ft", "r_align"]))
            if len(projected) > 60:
                parts.append(f'<p class="note">and {len(projected) - 60} more (all in analysis.json).</p>')

    outside = [row for row in rows if layer_and_module(str(row["name"]))[0] is None]
    if outside:
        parts.append(f"<h2>{6 if finetuned else 5}. Tensors outside the layers</h2>")
        parts.append(_table(outside, analysis.columns))
    parts.append(f"<details><summary>All {n} tensors</summary>")
    parts.append(_table(rows, analysis.columns))
    parts.append("</details>")
    parts.append(
        '<p class="note">Written by <code>mergekit-lox analyze</code>. How to read this report: '
        "docs/analyze.md in the mergekit-lox repository.</p>"
    )
    parts.append("</main></body></html>\n")
    return "".join(parts)
