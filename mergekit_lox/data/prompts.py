"""Prompt sources: local files, local `datasets` folders, or Hugging Face dataset ids.

``load_rows`` returns the rows (dicts) and column names of a source;
``load_prompts`` picks one text column. Every failure is a ``DataError`` with one
line naming the source and, where it applies, the option (``--column``, ``--split``).
"""

from __future__ import annotations

import csv
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

# Columns tried, in order, when no --column is given (AdvBench: goal, HarmBench:
# Behavior, JailbreakBench: Goal, CatQA: Question, PKU-SafeRLHF: prompt).
PROMPT_COLUMNS = (
    "prompt",
    "goal",
    "Goal",
    "behavior",
    "Behavior",
    "instruction",
    "question",
    "Question",
    "query",
    "text",
)
TEXT_SUFFIXES = (".txt", ".text")


class DataError(ValueError):
    """A prompt source cannot be read as asked; the message names it."""


def _read_jsonl(path: str) -> List[Dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}: line {number} is not JSON ({error.msg})") from None
            rows.append(row if isinstance(row, dict) else {"text": row})
    return rows


def _read_json(path: str) -> List[Dict]:
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: not JSON ({error.msg}, line {error.lineno})") from None
    if isinstance(data, dict):  # {"data": [...]} or {"prompts": [...]}
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else [data]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of strings or objects")
    return [row if isinstance(row, dict) else {"text": row} for row in data]


def _read_csv(path: str) -> List[Dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return [dict(row) for row in csv.DictReader(f)]


def _read_text(path: str) -> List[Dict]:
    with open(path, encoding="utf-8") as f:
        return [{"text": line.rstrip("\n")} for line in f if line.strip()]


def _read_parquet(path: str) -> List[Dict]:
    import pyarrow.parquet

    try:
        return pyarrow.parquet.read_table(path).to_pylist()
    except pyarrow.ArrowInvalid as error:
        raise DataError(f"{path}: not a parquet file ({' '.join(str(error).split())[:120]})") from None


_READERS = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_csv,
    ".tsv": _read_csv,
    ".parquet": _read_parquet,
}


def _columns(rows: Sequence[Dict]) -> List[str]:
    seen: Dict[str, None] = {}
    for row in rows[:100]:
        for key in row:
            seen.setdefault(str(key), None)
    return list(seen)


def _load_dataset(source: str, split: str) -> Tuple[List[Dict], List[str]]:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a mergekit dependency
        raise DataError(f"{source}: reading a dataset needs the `datasets` package") from None
    try:
        if os.path.isdir(source):
            loaded = datasets.load_from_disk(source)
        else:
            # "ID:CONFIG" names a dataset configuration (walledai/HarmBench:standard).
            path, _, config = source.partition(":")
            loaded = datasets.load_dataset(path, config or None, split=split)
    except FileNotFoundError as error:
        raise DataError(f"{source}: no such file or dataset ({error})") from None
    except Exception as error:  # noqa: BLE001 - datasets raises many kinds; name the source
        text = " ".join(str(error).split())[:300]
        raise DataError(f"{source}: cannot load dataset (split {split!r}): {text}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{source}: no split {split!r} (--split); it has {', '.join(loaded)}")
        loaded = loaded[split]
    return [dict(row) for row in loaded], list(loaded.column_names)


def load_rows(source: str, *, split: str = "train") -> Tuple[List[Dict], List[str]]:
    """``(rows, columns)`` of ``source``: a local .jsonl/.json/.csv/.tsv/.txt file, a local
    folder written by ``datasets.save_to_disk``, or a Hugging Face dataset id
    (``ID`` or ``ID:CONFIG``)."""
    suffix = os.path.splitext(source)[1].lower()
    if os.path.isfile(source):
        reader = _READERS.get(suffix, _read_text)
        try:
            rows = reader(source)
        except UnicodeDecodeError:
            raise DataError(f"{source}: not UTF-8 text") from None
        except OSError as error:
            raise DataError(f"{source}: cannot read ({error.strerror})") from None
        return rows, _columns(rows)
    if os.path.isdir(source) or (not os.path.exists(source) and "/" in source and suffix not in _READERS):
        return _load_dataset(source, split)
    raise DataError(
        f"{source}: no such file (a prompt source is a .jsonl/.json/.csv/.parquet/.txt file or a dataset id)"
    )


def pick_column(
    columns: Sequence[str],
    column: Optional[str],
    source: str,
    option: str = "--column",
    known: Sequence[str] = PROMPT_COLUMNS,
    what: str = "prompts",
) -> str:
    """The column to read: ``column`` if given (and present), else the first of ``known``
    present (the prompt columns by default, where a lone column is taken too)."""
    if column is not None:
        if column not in columns:
            raise DataError(
                f"{source}: no column {column!r} ({option}); its columns are {', '.join(columns) or 'none'}"
            )
        return column
    for candidate in known:
        if candidate in columns:
            return candidate
    if len(columns) == 1 and known is PROMPT_COLUMNS:
        return columns[0]
    raise DataError(f"{source}: which column holds the {what}? give {option} (its columns are {', '.join(columns)})")


def load_prompts(
    source: str,
    *,
    column: Optional[str] = None,
    split: str = "train",
    limit: Optional[int] = None,
    option: str = "--column",
) -> List[str]:
    """The non-empty prompts of ``source`` (first ``limit`` of them), in order."""
    if limit is not None and limit < 1:
        raise DataError(f"{source}: --limit must be at least 1, got {limit}")
    rows, columns = load_rows(source, split=split)
    if not rows:
        raise DataError(f"{source}: holds no prompts")
    name = pick_column(columns, column, source, option)
    prompts = [str(row[name]).strip() for row in rows if row.get(name) is not None and str(row[name]).strip()]
    if not prompts:
        raise DataError(f"{source}: column {name!r} holds no non-empty prompts")
    return prompts[:limit] if limit else prompts
