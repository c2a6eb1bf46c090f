"""Issue 23: a merge that changes nothing says so (a warning naming why), and --strict
makes it an error that leaves no output."""

from __future__ import annotations

import os
import shutil

from conftest import run_cli
from safelora_helpers import recipe, write_yaml


def lox(family, aligned: str, **parameters) -> dict:
    return {
        "merge_method": "lox_extrapolate",
        "base_model": family.base,
        "models": [{"model": aligned}],
        "parameters": {"rank": 2, **parameters},
        "dtype": "float32",
    }


def test_safelora_that_projects_nothing_is_named_and_strict_refuses_it(family, tmp_path, capsys):
    # -0.999: below every cosine of the family (they are positive), above -1, so check cannot know.
    source = write_yaml(tmp_path / "r.yml", recipe(family, family.finetuned, threshold=-0.999))
    code, out, err = run_cli(["check", source], capsys)
    assert code == 0 and "warning" not in out
    code, _, err = run_cli(["run", source, str(tmp_path / "out"), "--quiet"], capsys)
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert code == 0 and len(warnings) == 1, err
    assert "safelora_project changed none of its" in warnings[0] and "cosine is at or below `threshold`" in warnings[0]
    assert os.path.isdir(tmp_path / "out")
    code, _, err = run_cli(["run", source, str(tmp_path / "strict"), "--quiet", "--strict"], capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1 and "--strict refuses a merge that changes nothing" in errors[0]
    assert not os.path.exists(tmp_path / "strict")
    # A threshold that projects something: no warning.
    source = write_yaml(tmp_path / "ok.yml", recipe(family, family.finetuned, threshold=1.0))
    code, _, err = run_cli(["run", source, str(tmp_path / "ok"), "--quiet", "--strict"], capsys)
    assert code == 0 and "warning:" not in err, err


def test_an_aligned_model_identical_to_the_base_is_a_zero_safety_vector(family, tmp_path, capsys):
    copy = shutil.copytree(family.base, tmp_path / "base-copy")  # only the run can see it
    source = write_yaml(tmp_path / "same.yml", lox(family, str(copy)))
    code, out, _ = run_cli(["check", "--strict", source], capsys)
    assert code == 0 and "warning" not in out
    code, _, err = run_cli(["run", source, str(tmp_path / "out"), "--quiet"], capsys)
    assert code == 0 and "lox_extrapolate changed none of its" in err and "identical to the base in every one" in err
    # alpha 0: check knows before computing.
    zero = write_yaml(tmp_path / "alpha.yml", lox(family, family.aligned, alpha=0))
    code, _, err = run_cli(["check", "--strict", zero], capsys)
    assert code == 1 and "parameters.alpha: alpha 0 extrapolates nothing" in err
    code, _, err = run_cli(["run", zero, str(tmp_path / "alpha"), "--quiet", "--strict"], capsys)
    assert code == 1 and "lox_extrapolate changed none of its" in err and "`alpha` is 0" in err
    assert not os.path.exists(tmp_path / "alpha")
    # The same recipe with alpha 1.25 changes the aligned model: no warning.
    code, out, _ = run_cli(["check", "--strict", write_yaml(tmp_path / "ok.yml", lox(family, family.aligned))], capsys)
    assert code == 0 and "warning" not in out
