"""What `check` finds: problems and notes, each naming the document and the field."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from mergekit_lox.errors import one_line


@dataclass(frozen=True)
class Problem:
    """One finding: the document it is in, the field, and what is wrong."""

    document: str
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.document}: {self.field}" if self.field else self.document
        return printable(f"{where}: {self.message}")


def printable(text: str) -> str:
    """``text`` on one line: control characters (from the user's keys and values) escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


@dataclass
class Document:
    index: int  # 1-based position in the file
    name: Optional[str]
    raw: Any
    label: str
    config: Any = None  # MergeConfiguration once the schema accepts it
    references: Dict[str, str] = field(default_factory=dict)  # document name -> field


@dataclass
class Report:
    recipe: str
    documents: List[Document] = field(default_factory=list)
    problems: List[Problem] = field(default_factory=list)
    notes: List[Problem] = field(default_factory=list)
    no_ops: List[Problem] = field(default_factory=list)  # documents that would change nothing

    @property
    def ok(self) -> bool:
        return not self.problems

    def strict(self) -> "Report":
        """`check --strict`: a document that would change nothing is an error."""
        self.problems.extend(self.no_ops)
        self.no_ops = []
        return self

    def lines(self) -> Tuple[List[str], List[str]]:
        """(`error: ...` lines, `note: ...` and `warning: ...` lines), each naming the recipe."""
        return (
            [f"error: {self.recipe}: {p}" for p in self.problems],
            [f"note: {self.recipe}: {n}" for n in self.notes] + [f"warning: {self.recipe}: {n}" for n in self.no_ops],
        )


def suggest(word, candidates) -> str:
    """`` (did you mean 'x'?)``: describe.closest, the wording `methods` and the planner use."""
    from mergekit_lox.methods.describe import closest

    return closest(str(word), sorted(candidates))


def join_path(path: str, key) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    if not isinstance(key, str) or not key or key != key.strip() or not key.isprintable():
        key = repr(key)  # an empty, blank or odd key, shown as such
    return f"{path}.{key}" if path else str(key)


def error_text(error: Exception) -> str:
    from pydantic import ValidationError

    if isinstance(error, ValidationError):
        return "; ".join(e["msg"] for e in error.errors())
    return one_line(error)
