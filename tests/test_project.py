"""The README's promises about CI stay true."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    commands = re.findall(r"^    (python3 -m venv .*)$", readme, flags=re.M)
    assert len(commands) >= 2, "README must open with the demo and the test command"
    demo, tests = commands[0], commands[1]
    assert demo.endswith("mergekit-lox demo")
    test_command = tests.split(" && ")[-1]
    assert test_command.startswith("python -m pytest")
    ci_lines = [line.strip() for line in ci.splitlines() if line.strip() and not line.startswith("#")]
    assert ci_lines[-1] == test_command
    # The install steps CI runs are the README's, too.
    for step in tests.split(" && ")[2:-1]:
        assert any(step.replace("pip install", "pip install -q") == line for line in ci_lines), step
