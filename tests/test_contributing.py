"""docs/contributing.md's claim, executed: adding a method is one module in
methods/ plus one line in methods/__init__.py (the doc's own code, not a copy)."""

from __future__ import annotations

import ast
import importlib
import json
import os
import re
import sys
from pathlib import Path

import pytest
import reference as ref
import yaml
from conftest import run_cli

import mergekit_lox.methods as methods
from mergekit_lox.demo.synthetic import load_state_dict

DOC = Path(__file__).resolve().parents[1] / "docs" / "contributing.md"


def doc_blocks() -> dict:
    """The doc's python code blocks, by the file named on their first line."""
    blocks = re.findall(r"```python\n# (\S+)\n(.*?)```", DOC.read_text(), flags=re.S)
    return {path: code for path, code in blocks}


def doc_method_modules() -> list:
    code = doc_blocks()["mergekit_lox/methods/__init__.py"]
    (assignment,) = ast.parse(code).body
    return list(ast.literal_eval(assignment.value))


@pytest.fixture
def fourth_method(tmp_path, monkeypatch):
    """The doc's example module, importable as mergekit_lox.methods.<name>, in
    METHOD_MODULES as the doc's one line says; mergekit's registry and
    sys.modules are restored afterwards."""
    from mergekit.merge_methods import registry

    listed = doc_method_modules()
    assert listed[:-1] == list(methods.METHOD_MODULES), "the doc's list must be the real one plus one line"
    name = listed[-1]
    package, _, module = name.rpartition(".")
    assert package == "mergekit_lox.methods"
    (tmp_path / f"{module}.py").write_text(doc_blocks()[f"mergekit_lox/methods/{module}.py"])

    monkeypatch.setattr(methods, "__path__", [*methods.__path__, str(tmp_path)])
    monkeypatch.setattr(methods, "METHOD_MODULES", tuple(listed))
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    yield importlib.import_module(name)
    sys.modules.pop(name, None)


def recipe(family, role="aligned", factor=0.5) -> dict:
    return {
        "merge_method": "task_vector_scale",
        "base_model": family.base,
        "models": [{"model": family.aligned, "parameters": {"role": role}}],
        "parameters": {"factor": factor},
        "dtype": "float32",
    }


def test_the_doc_example_is_listed_registered_and_checked(fourth_method, family, states, tmp_path, capsys):
    import mergekit.merge_methods
    from mergekit.io.tasks import GatherTensors
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    code, out, err = run_cli(["methods", "--json"], capsys)
    assert code == 0, err
    described = json.loads(out)
    assert [m["name"] for m in described] == [
        "lox_extrapolate",
        "lssf_fusion",
        "safelora_project",
        "safemerge",
        "task_vector_scale",
    ]
    listed = described[-1]
    assert listed["roles"] == ["aligned"] and listed["roles_optional"] is True
    assert [(p["name"], p["default"]) for p in listed["parameters"]] == [("factor", 0.5), ("role", None)]

    assert mergekit.merge_methods.get("task_vector_scale") is fourth_method.METHOD
    import mergekit_lox

    assert mergekit_lox.task_vector_scale is fourth_method.METHOD

    # A wrong role fails while mergekit plans: no input tensor is ever loaded.
    loaded = []
    original = GatherTensors.execute

    def counting(self, *args, **kwargs):
        loaded.append(1)
        return original(self, *args, **kwargs)

    GatherTensors.execute = counting
    try:
        bad = tmp_path / "bad.yml"
        bad.write_text(yaml.safe_dump(recipe(family, role="finetuned")))
        with pytest.raises(Exception, match=r"task_vector_scale needs base_model.*has role 'finetuned'"):
            mergekit_yaml.main(args=[str(bad), str(tmp_path / "bad-out"), "--quiet"], standalone_mode=False)
        assert loaded == []
        assert not os.path.exists(tmp_path / "bad-out" / "model.safetensors")

        good = tmp_path / "good.yml"
        good.write_text(yaml.safe_dump(recipe(family, factor=0.75)))
        mergekit_yaml.main(args=[str(good), str(tmp_path / "out"), "--quiet"], standalone_mode=False)
        assert loaded
    finally:
        GatherTensors.execute = original

    merged = load_state_dict(str(tmp_path / "out"))
    assert set(merged) == set(states["aligned"])
    for name, tensor in merged.items():
        W_a, W_b = ref.f64(states["aligned"][name]), ref.f64(states["base"][name])
        assert ref.rel_err(ref.f64(tensor), W_a + 0.75 * (W_a - W_b)) < 1e-6, name


def test_check_knows_the_doc_example(fourth_method, family, tmp_path, capsys):
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe(family, factor="big")))
    code, _, err = run_cli(["check", str(path)], capsys)
    assert code == 1
    assert "parameters.factor: 'big' is not a valid float (finite)" in err
