"""The page parts every HTML report shares: inline CSS, cards, tables."""

from __future__ import annotations

from typing import Dict, List, Sequence

from mergekit_lox.html.svg import esc, fmt

CSS = """
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


def card(value: str, what: str, accent: bool = False) -> str:
    cls = "card accent" if accent else "card"
    return f'<div class="{cls}"><div class="value">{esc(value)}</div><div class="what">{esc(what)}</div></div>'


def table(rows: List[Dict[str, object]], columns: Sequence[str]) -> str:
    head = "".join(f'<th class="name">{esc(c)}</th>' if c == "name" else f"<th>{esc(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for c in columns:
            if c == "name":
                cells.append(f'<td class="name">{esc(row[c])}</td>')
            else:
                cells.append(f"<td>{esc(fmt(row[c], 4))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
