"""docs/fidelity.md: every test it cites exists (file, function, parametrize id), and
every method the project ships, and every RESTA recipe, has its row."""

from __future__ import annotations

import ast
import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "fidelity.md")
CITED = re.compile(r"`(tests/[\w/]+\.py)::(\w+)(?:\[([^\]]+)\])?`")


def text() -> str:
    with open(DOC, encoding="utf-8") as f:
        return f.read()


def citations() -> list:
    return sorted(set(CITED.findall(text())))


def test_the_doc_cites_tests():
    assert len(citations()) >= 12


@pytest.mark.parametrize("path, function, case", citations(), ids=lambda v: v or "-")
def test_every_cited_test_exists(path, function, case):
    file = os.path.join(ROOT, path)
    assert os.path.isfile(file), path
    with open(file, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    defined = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert function in defined, f"{path} has no {function}"
    if case:
        assert case in ast.unparse(defined[function]), f"{function} has no case {case}"


def test_every_method_and_recipe_of_mergekits_methods_has_a_row():
    from mergekit_lox.methods import by_name

    rows = [line for line in text().splitlines() if line.startswith("| ") and not line.startswith("| method")]
    for name in by_name():
        assert any(row.startswith(f"| `{name}`") for row in rows), name
    for recipe in glob.glob(os.path.join(ROOT, "recipes", "resta*.yml")):
        assert any(f"recipes/{os.path.basename(recipe)}" in row for row in rows), recipe
    for row in rows:
        assert re.search(r"exact vs reference code|exact vs paper formula|our reading", row.split("|")[-2]), row
