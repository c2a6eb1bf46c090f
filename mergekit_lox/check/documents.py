"""YAML documents of a recipe: loading, chain names, cycles between stages."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import yaml

from mergekit_lox.check.report import (
    Document,
    Problem,
    Report,
)
from mergekit_lox.files.output import name_problem


def without_name(document: dict) -> dict:
    """A recipe document as mergekit-yaml reads it: without mergekit-multi's ``name:`` key."""
    return {k: v for k, v in document.items() if k != "name"}


def _document_of_line(text: str, line: int) -> int:
    """1-based document number containing 1-based ``line`` (counting `---`)."""
    count, seen_content = 1, False
    for content in text.splitlines()[: line - 1]:
        if content.startswith("---"):
            if seen_content:
                count += 1
            seen_content = True
        elif content.strip() and not content.lstrip().startswith("#"):
            seen_content = True
    return count


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A key given twice in one YAML mapping."""


class RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping: YAML itself
    keeps the last one silently (`alpha: 1.25` ... `alpha: 2` runs with 2). Keys
    merged in with ``<<: *anchor`` may be overridden, as YAML intends. Every
    recipe the package reads goes through ``load_recipe_documents``."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: Dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark.line)
                except TypeError:
                    continue  # an unhashable key: SafeLoader's own error follows
                if first != key_node.start_mark.line:
                    raise DuplicateKeyError(
                        None,
                        None,
                        f"key {key!r} is given twice in one mapping (first at line {first + 1}): "
                        "YAML would silently keep only the last; give it once",
                        key_node.start_mark,
                    )
        return super().construct_mapping(node, deep=deep)


def load_recipe_documents(text: str) -> List[Any]:
    """Every YAML document of a recipe's text (RecipeLoader: duplicate keys refused)."""
    return list(yaml.load_all(text, Loader=RecipeLoader))


class RecipeReadError(ValueError):
    """A recipe file that cannot be read as text."""


def read_recipe_text(path: str) -> str:
    """The text of recipe file ``path``, or a RecipeReadError saying why not (naming it)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as error:
        raise RecipeReadError(f"cannot read: {error.strerror or error}") from error
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise RecipeReadError(
            f"not UTF-8 text: byte 0x{data[error.start]:02x} at line {line} ({error.reason}); save the recipe as UTF-8"
        ) from error


def load_documents(report: Report, text: str) -> Optional[List[Any]]:
    try:
        return load_recipe_documents(text)
    except DuplicateKeyError as error:
        line = error.problem_mark.line + 1
        report.problems.append(Problem(f"document {_document_of_line(text, line)}", f"line {line}", error.problem))
        return None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
        line = mark.line + 1 if mark is not None else None
        reason = getattr(error, "problem", None) or " ".join(str(error).split())
        where = f"document {_document_of_line(text, line)}" if line else "recipe"
        report.problems.append(Problem(where, f"line {line}" if line else "yaml", f"YAML syntax error: {reason}"))
        return None


def _label(index: int, name: Optional[str], final_of_chain: bool) -> str:
    if name is not None:
        return f"document {index} ({name!r})"
    return f"document {index} (final)" if final_of_chain else f"document {index}"


def split_documents(report: Report, loaded: List[Any]) -> None:
    chain = len(loaded) > 1
    names: Dict[str, int] = {}
    unnamed: List[int] = []
    for index, raw in enumerate(loaded, start=1):
        name = raw.get("name") if isinstance(raw, dict) else None
        doc = Document(index, name if isinstance(name, str) else None, raw, "")
        unnamed_final = isinstance(raw, dict) and "name" not in raw
        doc.label = _label(index, doc.name, chain and unnamed_final)
        report.documents.append(doc)
        if raw is None:
            report.problems.append(Problem(doc.label, "", "empty document (a stray `---`?)"))
            continue
        if not isinstance(raw, dict):
            report.problems.append(Problem(doc.label, "", f"a recipe document is a mapping, got {type(raw).__name__}"))
            continue
        if "name" in raw and not isinstance(name, str):
            report.problems.append(Problem(doc.label, "name", f"must be a string, got {name!r}"))
            continue
        unsafe = name_problem(doc.name) if doc.name is not None else None
        if unsafe:
            report.problems.append(Problem(doc.label, "name", f"{doc.name!r} {unsafe}"))
        if doc.name is None:
            unnamed.append(index)
        elif doc.name in names:
            report.problems.append(
                Problem(doc.label, "name", f"duplicate name, already used by document {names[doc.name]}")
            )
        else:
            names[doc.name] = index
    if chain and len(unnamed) > 1:
        report.problems.append(
            Problem(
                "recipe",
                "name",
                f"documents {', '.join(map(str, unnamed))} have no `name:`; "
                "only the final document of a chain may be unnamed",
            )
        )
    if chain and not unnamed and all(isinstance(d.raw, dict) for d in report.documents):
        report.problems.append(
            Problem(
                "recipe",
                "name",
                "every document has a `name:`; the final document of a chain has none (it is the one written to OUT)",
            )
        )


def check_cycles(report: Report, documents: List[Document]) -> None:
    named = {d.name: d for d in documents if d.name is not None}
    state: Dict[str, int] = {}  # 1 = on the stack, 2 = done
    reported = set()

    def visit(name: str, stack: List[str]) -> None:
        state[name] = 1
        for target in named[name].references:
            if target not in named:
                continue
            if state.get(target) == 1:
                cycle = stack[stack.index(target) :] + [target]
                key = frozenset(cycle)
                if key not in reported:
                    reported.add(key)
                    first = named[cycle[0]]
                    report.problems.append(
                        Problem(
                            first.label,
                            first.references[cycle[1]],
                            "chain cycle: " + " -> ".join(cycle),
                        )
                    )
            elif target not in state:
                visit(target, stack + [target])
        state[name] = 2

    for name in named:
        if name not in state:
            visit(name, [name])
