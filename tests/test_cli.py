"""The `mergekit-lox` command line: methods, demo, error convention."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli


def test_methods_json_lists_every_method_with_its_spec(capsys):
    from mergekit.merge_methods import get
    from mergekit.merge_methods.base import MISSING

    code, out, _ = run_cli(["methods", "--json"], capsys)
    assert code == 0
    listed = {m["name"]: m for m in json.loads(out)}
    assert set(listed) == {"lox_extrapolate", "lssf_fusion", "safelora_project", "safemerge"}
    papers = {
        "lox_extrapolate": "2506.15606",
        "lssf_fusion": "2602.00038",
        "safelora_project": "2405.16833",
        "safemerge": "2503.17239",
    }
    for name, described in listed.items():
        spec = get(name).spec
        assert papers[name] in described["paper"]
        assert [p["name"] for p in described["parameters"]] == [p.name for p in spec.parameters]
        for p, param in zip(described["parameters"], spec.parameters, strict=True):
            assert p["default"] == (None if param.default is MISSING else param.default)
            assert p["type"]
    alpha = listed["lox_extrapolate"]["parameters"][0]
    assert (alpha["name"], alpha["default"], alpha["type"]) == ("alpha", 1.25, "float (finite)")
    assert listed["lssf_fusion"]["roles"] == ["aligned", "finetuned"]


def test_methods_text(capsys):
    code, out, _ = run_cli(["methods"], capsys)
    assert code == 0
    assert "lox_extrapolate: LoX" in out and "top_weight" in out and "'orthogonal'" in out
    assert "safemerge: SafeMERGE" in out and "safety_weight" in out
    # Where each method departs from its paper and reference code, and which test holds it.
    assert out.strip().splitlines()[-1].endswith("docs/fidelity.md")


def test_errors_are_one_line_exit_1(tmp_path, capsys):
    code, _, err = run_cli(["run", str(tmp_path / "missing.yml"), str(tmp_path / "out")], capsys)
    assert code == 1
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and "missing.yml" in lines[-1]
    assert "Traceback" not in err


def test_usage_error_exits_2(capsys):
    code, _, err = run_cli(["run"], capsys)
    assert code == 2
    assert "Missing argument" in err


def test_demo_shows_what_each_method_did(tmp_path, capsys):
    code, out, err = run_cli(["demo", "--no-behaviour", str(tmp_path / "demo")], capsys)
    assert code == 0, err
    assert not (tmp_path / "demo" / "behaviour").exists()  # the testbed: tests/test_testbed.py

    header = next(line for line in out.splitlines() if line.startswith("module"))
    columns = header.split()[1:]
    assert columns[:4] == ["aligned", "finetuned", "lox", "lssf"]
    rows = {
        line.split()[0]: dict(zip(columns, map(float, line.split()[1:]), strict=True))
        for line in out.splitlines()
        if line.split() and line.split()[0].endswith(("_proj", "embed_tokens", "lm_head"))
    }
    assert set(rows) >= {"q_proj", "down_proj", "embed_tokens", "lm_head"}
    for module, row in rows.items():
        # The planted component: as aligned, 40% kept by the synthetic fine-tune,
        # (1 + alpha) after LoX (rank 6 covers the planted rank 4), 0.4 + 1 after LSSF.
        assert row["aligned"] == pytest.approx(1.0, abs=0.02), module
        assert row["finetuned"] == pytest.approx(0.4, abs=0.02), module
        assert row["lox"] == pytest.approx(2.25, abs=0.03), module
        assert row["lssf"] == pytest.approx(1.4, abs=0.03), module
