"""Plain mergekit sees the methods: start-up hook, both install modes, idempotency."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import reference as ref
import yaml

from mergekit_lox.demo.synthetic import load_state_dict

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def python(*args, **kwargs):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=kwargs.pop("cwd", "/"), **kwargs)


def test_startup_imports_neither_torch_nor_mergekit():
    probe = (
        "import sys, json; print(json.dumps({"
        "'heavy': sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'mergekit')),"
        "'hooked': 'mergekit_lox._hook' in sys.modules}))"
    )
    result = python("-c", probe)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen == {"heavy": [], "hooked": True}, "the .pth hook must run and stay light"


def test_installed_mergekit_yaml_runs_lox(family, states, tmp_path):
    recipe = tmp_path / "lox.yml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "lox_extrapolate",
                "base_model": family.base,
                "models": [{"model": family.aligned}],
                "parameters": {"alpha": 1.25, "rank": 6},
                "dtype": "float32",
            }
        )
    )
    out = tmp_path / "out"
    result = subprocess.run(
        [str(BIN / "mergekit-yaml"), str(recipe), str(out), "--quiet"],
        capture_output=True,
        text=True,
        cwd=str(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    merged = load_state_dict(str(out))
    for name, tensor in merged.items():
        expected = ref.lox(ref.f64(states["aligned"][name]), ref.f64(states["base"][name]), 1.25, 6)
        assert ref.rel_err(ref.f64(tensor), expected) < 1e-4, name
    card = (out / "README.md").read_text()
    assert "LoX" in card and "arxiv.org/abs/2506.15606" in card


def test_registration_is_idempotent_whatever_is_imported_first():
    script = (
        "import mergekit_lox.methods.lssf\n"  # a method module first: its import pulls in mergekit's registry
        "import mergekit_lox\n"
        "from mergekit.merge_methods import get, registered_methods\n"
        "mergekit_lox.register_all(); mergekit_lox.register_all(); mergekit_lox._hook.install()\n"
        "names = [m.spec.name for m in registered_methods()]\n"
        "wanted = ['lox_extrapolate', 'lssf_fusion', 'safelora_project']\n"
        "assert [names.count(n) for n in wanted] == [1, 1, 1], names\n"
        "assert get('lssf_fusion') is mergekit_lox.lssf_fusion\n"
        "print('ok')\n"
    )
    result = python("-c", script)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


@pytest.fixture(scope="module")
def wheel_dir(tmp_path_factory):
    """The project built as a regular wheel and unpacked like site-packages."""
    build = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(build), str(REPO)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.fail(f"wheel build failed: {result.stderr[-2000:]}")
    (wheel,) = build.glob("mergekit_lox-*.whl")
    site = build / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    assert (site / "mergekit_lox.pth").exists(), "the wheel must install the start-up hook"
    return site


def test_regular_install_registers_through_pth(wheel_dir):
    venv_site = sysconfig.get_paths()["purelib"]
    script = (
        "import sys, site\n"
        f"site.addsitedir({str(wheel_dir)!r})\n"  # processes the wheel's .pth, as site-packages would
        "assert 'mergekit_lox._hook' in sys.modules\n"
        "assert not any(m.split('.')[0] in ('torch', 'mergekit') for m in sys.modules)\n"
        f"sys.path.append({venv_site!r})\n"  # dependencies only: the editable install's .pth is not processed
        "import mergekit_lox\n"
        f"assert mergekit_lox.__file__.startswith({str(wheel_dir)!r}), mergekit_lox.__file__\n"
        "from mergekit.merge_methods import get\n"
        "print(get('lox_extrapolate').spec.pretty_name)\n"
    )
    result = python("-S", "-c", script)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "LoX (Low-Rank Extrapolation)"


def test_nothing_breaks_without_mergekit(wheel_dir):
    script = (
        "import site, sys\n"
        f"site.addsitedir({str(wheel_dir)!r})\n"
        "import mergekit_lox\n"
        "try:\n    import mergekit\nexcept ImportError:\n    print('no mergekit, fine')\n"
    )
    result = python("-S", "-c", script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "no mergekit, fine"
    assert result.stderr == ""


def test_editable_install_has_the_hook():
    """The environment the suite runs in (CI: `pip install -e .`) carries the .pth."""
    site = Path(sysconfig.get_paths()["purelib"])
    assert (site / "mergekit_lox.pth").exists()
    assert shutil.which("mergekit-lox", path=str(BIN)) is not None
    assert os.path.exists(BIN / "mergekit-yaml")


def test_hooked_modules_keep_their_loader_behaviour():
    """The post-import wrapper must not hide the real loader's methods."""
    script = (
        "import inspect, mergekit.plan, mergekit.merge_methods.registry as r\n"
        "assert 'def register' in inspect.getsource(r)\n"
        "assert mergekit.plan.__loader__.get_filename('mergekit.plan').endswith('plan.py')\n"
        "from mergekit.merge_methods import get; get('safelora_project')\n"
        "print('ok')\n"
    )
    result = python("-c", script)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_the_wheel_ships_the_benchmarks_with_their_licences(wheel_dir):
    """Issue 25: `--safety advbench` and the rest work from a regular install, offline."""
    from mergekit_lox.data.benchmarks import BENCHMARKS

    bundled = wheel_dir / "mergekit_lox" / "data" / "bundled"
    for benchmark in BENCHMARKS.values():
        for name in benchmark.files:
            assert (bundled / name).is_file(), name
    assert {p.name for p in bundled.glob("LICENSE.*")} >= {"LICENSE.xstest.txt", "LICENSE.red-instruct.txt"}
    assert "CC-BY-4.0" in (bundled / "NOTICE.md").read_text()
