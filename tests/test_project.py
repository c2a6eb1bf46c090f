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
    assert test_command in ci_lines
    # Then the numerical tests again under other BLAS code paths (issue 23): every numerical
    # test file is named there.
    rerun = next(line for line in ci_lines if line.startswith("NUMERICAL="))
    assert any(line.startswith("MKL_CBWR=$path python -m pytest") for line in ci_lines)
    for name in ("test_linalg.py", "test_lox.py", "test_lssf.py", "test_safelora.py"):
        assert f"tests/{name}" in rerun and (REPO / "tests" / name).exists()
    # The install steps CI runs are the README's, too.
    for step in tests.split(" && ")[2:-1]:
        assert any(step.replace("pip install", "pip install -q") == line for line in ci_lines), step


# Imported only when installed, behind a guard that says how to install them.
OPTIONAL_IMPORTS = {"vllm"}


def test_every_direct_import_is_a_declared_requirement():
    """Issue 23: a package mergekit_lox imports is one it asks for (an extra where the
    import is optional), so `pip install mergekit-lox` alone never leaves an import error."""
    import ast
    import sys
    from importlib.metadata import packages_distributions

    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"].values()
    requirements = list(project["dependencies"]) + [r for extra in extras for r in extra]
    declared = {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}
    imported = set()
    for path in (REPO / "mergekit_lox").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"mergekit_lox", "__future__"} - OPTIONAL_IMPORTS
    distributions = packages_distributions()
    missing = {}
    for module in sorted(third_party):
        names = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
        if not names & declared:
            missing[module] = sorted(names)
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
