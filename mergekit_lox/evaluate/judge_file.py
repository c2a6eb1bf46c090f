"""`mergekit-lox judge`: judge answers that already exist, and measure a judge against labels.

Input: ``answers.jsonl`` from ``eval`` or any JSONL/CSV/parquet file with a prompt and an
answer column. Output: ``DIR/judged.jsonl`` (every input row, in order, plus ``verdict``:
refused, complied or unclear) and ``DIR/judge.json``. Where the rows carry labels (a
``--label-column``, or a ``final_label`` / ``label`` column whose values all map), the
agreement with them, the precision and recall of "refused" and the confusion table.

Label values: ``refused`` / ``complied``; ``refusal`` / ``compliance``; XSTest's
``1_full_compliance`` (complied), ``2_full_refusal`` and ``3_partial_refusal`` (refused: a
partial refusal is a refusal); booleans-as-text ``true`` (refused) / ``false`` (complied).
"""

from __future__ import annotations

import json
import os
from typing import Callable, Dict, List, Optional, Sequence

from mergekit_lox.evaluate.judges import COMPLIED, REFUSED, UNCLEAR, JudgeError, prepare_judge

LABELS = {
    "refused": REFUSED,
    "refusal": REFUSED,
    "complied": COMPLIED,
    "compliance": COMPLIED,
    "1_full_compliance": COMPLIED,
    "2_full_refusal": REFUSED,
    "3_partial_refusal": REFUSED,
    "true": REFUSED,
    "false": COMPLIED,
}
PROMPT_COLUMNS = ("prompt", "question", "goal", "Goal", "Behavior", "forbidden_prompt")
ANSWER_COLUMNS = ("answer", "completion", "response", "output", "generation")
LABEL_COLUMNS = ("final_label", "label", "human_label")
JUDGE_FILES = ("judged.jsonl", "judge.json")


def _label(value) -> Optional[str]:
    return LABELS.get(str(value).strip().lower()) if value is not None else None


def _pick(columns: Sequence[str], given: Optional[str], known: Sequence[str], source: str, option: str) -> str:
    from mergekit_lox.data.prompts import DataError, pick_column

    try:
        return pick_column(columns, given, source, option, tuple(known), option[2:].replace("-column", "s"))
    except DataError as error:
        raise JudgeError(str(error)) from None


def agreement(verdicts: Sequence[str], labels: Sequence[str]) -> Dict[str, object]:
    """Agreement of ``verdicts`` with ``labels`` (unclear counts as not refused), the precision
    and recall of refused, and the confusion table label -> verdict -> count."""
    confusion = {label: {v: 0 for v in (REFUSED, COMPLIED, UNCLEAR)} for label in (REFUSED, COMPLIED)}
    for v, label in zip(verdicts, labels, strict=True):
        confusion[label][v] += 1
    tp = confusion[REFUSED][REFUSED]
    fp = confusion[COMPLIED][REFUSED]
    fn = confusion[REFUSED][COMPLIED] + confusion[REFUSED][UNCLEAR]
    n = len(labels)
    agreed = tp + confusion[COMPLIED][COMPLIED] + confusion[COMPLIED][UNCLEAR]
    return {
        "n": n,
        "agreement": agreed / n if n else None,
        "precision": tp / (tp + fp) if tp + fp else None,
        "recall": tp / (tp + fn) if tp + fn else None,
        "confusion": confusion,
    }


def judge_file(
    answers: str,
    out_dir: str,
    *,
    judge: str = "rules",
    label_column: Optional[str] = None,
    prompt_column: Optional[str] = None,
    answer_column: Optional[str] = None,
    device: str = "cpu",
    batch_size: int = 8,
    echo: Callable[[str], None] = print,
    judge_url: Optional[str] = None,
) -> dict:
    """Judge the answers in ``answers`` and write DIR/judged.jsonl and DIR/judge.json."""
    from mergekit_lox.data.prompts import DataError, load_rows
    from mergekit_lox.files.output import OutputError, atomic_write_text, claim_files, refuse_foreign_files

    try:
        rows, columns = load_rows(answers)
        refuse_foreign_files(out_dir, JUDGE_FILES, "mergekit-lox judge")
    except (DataError, OutputError) as error:
        raise JudgeError(str(error)) from None
    if not rows:
        raise JudgeError(f"{answers}: no rows to judge")
    prompt = _pick(columns, prompt_column, PROMPT_COLUMNS, answers, "--prompt-column")
    answer = _pick(columns, answer_column, ANSWER_COLUMNS, answers, "--answer-column")
    labels: Optional[List[str]] = None
    if label_column is not None:
        _pick(columns, label_column, (), answers, "--label-column")
        labels = [_label(r.get(label_column)) for r in rows]
        bad = sorted({str(r.get(label_column)) for r, v in zip(rows, labels, strict=True) if v is None})
        if bad:
            raise JudgeError(
                f"{answers}: --label-column {label_column} has values {', '.join(bad[:5])} that are not labels "
                f"({', '.join(LABELS)})"
            )
    else:
        for name in LABEL_COLUMNS:
            if name in columns and all(_label(r.get(name)) for r in rows):
                label_column, labels = name, [_label(r.get(name)) for r in rows]
                break
    the_judge = prepare_judge(judge, device=device, batch_size=batch_size, judge_url=judge_url)()
    verdicts = the_judge.judge([str(r.get(prompt) or "") for r in rows], [str(r.get(answer) or "") for r in rows])
    report: Dict[str, object] = {
        "input": os.path.abspath(answers),
        "rows": len(rows),
        "columns": {"prompt": prompt, "answer": answer, "label": label_column},
        "judge": the_judge.describe(),
        "verdicts": {v: verdicts.count(v) for v in (REFUSED, COMPLIED, UNCLEAR)},
    }
    if labels is not None:
        report["agreement"] = agreement(verdicts, labels)
    try:
        claim_files(out_dir, JUDGE_FILES, "mergekit-lox judge")
    except OutputError as error:
        raise JudgeError(str(error)) from None
    judged = "".join(
        json.dumps({**row, "verdict": v}, ensure_ascii=False, default=str) + "\n"
        for row, v in zip(rows, verdicts, strict=True)
    )
    atomic_write_text(os.path.join(out_dir, "judged.jsonl"), judged)
    atomic_write_text(os.path.join(out_dir, "judge.json"), json.dumps(report, indent=1) + "\n")
    for line in describe(report):
        echo(line)
    return report


def _figure(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def describe(report: dict) -> List[str]:
    """The lines `judge` prints: the verdict counts, then agreement and the confusion table."""
    counts = ", ".join(f"{k} {v}" for k, v in report["verdicts"].items())
    lines = [f"{report['rows']} answers judged by {report['judge']['name']}: {counts}"]
    measured = report.get("agreement")
    if measured:
        lines.append(
            f"agreement with {report['columns']['label']}: {_figure(measured['agreement'])} "
            f"(refusal precision {_figure(measured['precision'])}, recall {_figure(measured['recall'])}, "
            f"n {measured['n']})"
        )
        lines.append("label / verdict".ljust(18) + "".join(v.rjust(10) for v in (REFUSED, COMPLIED, UNCLEAR)))
        for label, row in measured["confusion"].items():
            lines.append(label.ljust(18) + "".join(str(row[v]).rjust(10) for v in (REFUSED, COMPLIED, UNCLEAR)))
    return lines
