"""mergekit_compat: each patch is installed, buys what it says, and is skipped
(with one warning naming the version) on another mergekit, the methods still working.

Behaviour bought, asserted elsewhere too:
- plan-time checks (``install_plan_checks``): tests/test_errors.py
  ``test_plain_mergekit_yaml_raises_them_while_planning`` (unknown parameter,
  bad value, missing/duplicated/misspelt role, all before any tensor loads);
- staged chain stages (``multimerge_stages``): tests/test_outputs.py
  ``test_interrupted_chain_stage_is_not_left_for_lazy_reuse``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
import warnings

import pytest
import reference as ref
import yaml

from mergekit_lox import mergekit_compat as compat
from mergekit_lox.demo.synthetic import load_state_dict


def lox_recipe(family, **parameters) -> dict:
    return {
        "merge_method": "lox_extrapolate",
        "base_model": family.base,
        "models": [{"model": family.aligned, "parameters": {"role": "aligned"}}],
        "parameters": {"alpha": 1.25, "rank": 4, **parameters},
        "dtype": "float32",
    }


def write_recipe(path, document) -> str:
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return str(path)


def test_it_names_the_mergekit_version_it_was_written_for():
    assert compat.MERGEKIT_VERSION == compat.installed_version() == "0.1.5"
    assert f"Written for mergekit {compat.MERGEKIT_VERSION} " in compat.__doc__


# --------------------------------------------------------------------------- plan-time checks


def test_plan_checks_are_installed_once_mergekit_plan_is_imported():
    """In a fresh interpreter, plain `import mergekit.plan` (the start-up hook) installs them."""
    probe = (
        "import mergekit.plan as p; "
        "print(getattr(p.resolve_parameters, '_mergekit_lox_checks', False), "
        "p.resolve_parameters.__wrapped__.__module__)"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["True", "mergekit.parameter_resolver"]


def test_plan_checks_turn_a_silently_ignored_parameter_into_a_plan_time_error(family, tmp_path, monkeypatch):
    """What the patch buys: without it mergekit merges and drops a misspelt
    parameter; with it the plan fails before a single input tensor is loaded."""
    import mergekit.plan
    from mergekit.io.tasks import GatherTensors
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    recipe = write_recipe(tmp_path / "recipe.yml", lox_recipe(family, alhpa=2.0))
    patched = mergekit.plan.resolve_parameters
    assert patched._mergekit_lox_checks

    loaded = []
    original_execute = GatherTensors.execute

    def counting_execute(self, *args, **kwargs):
        loaded.append(1)
        return original_execute(self, *args, **kwargs)

    monkeypatch.setattr(GatherTensors, "execute", counting_execute)
    with pytest.raises(ValueError, match=r"lox_extrapolate has no parameter 'alhpa' \(did you mean 'alpha'\?\)"):
        mergekit_yaml.main(args=[recipe, str(tmp_path / "with"), "--quiet"], standalone_mode=False)
    assert loaded == []

    monkeypatch.setattr(mergekit.plan, "resolve_parameters", patched.__wrapped__)
    mergekit_yaml.main(args=[recipe, str(tmp_path / "without"), "--quiet"], standalone_mode=False)
    assert loaded, "without the patch mergekit loads tensors and merges"
    assert os.path.exists(tmp_path / "without" / "model.safetensors")


def test_plan_checks_leave_other_methods_alone(family, run_recipe, tmp_path):
    """Arguments pass through untouched; a mergekit method is neither checked nor changed."""
    document = {
        "merge_method": "linear",
        "models": [
            {"model": family.aligned, "parameters": {"weight": 0.25}},
            {"model": family.base, "parameters": {"weight": 0.75}},
        ],
        "dtype": "float32",
    }
    merged = run_recipe(document, str(tmp_path / "out"))
    aligned, base = load_state_dict(family.aligned), load_state_dict(family.base)
    for name, tensor in merged.items():
        expected = 0.25 * ref.f64(aligned[name]) + 0.75 * ref.f64(base[name])
        assert ref.rel_err(ref.f64(tensor), expected) < 1e-6, name


# --------------------------------------------------------------------------- chain stages


def test_multimerge_run_merge_is_swapped_for_the_chain_and_restored():
    from mergekit.scripts import multimerge

    original = multimerge.run_merge
    calls = []

    def run_stage(run_merge, config, out_path, options, **kwargs):
        calls.append((run_merge, config, out_path, options, kwargs))

    with compat.multimerge_stages(run_stage):
        assert multimerge.run_merge is not original
        multimerge.run_merge("config", "out", "options", config_source="src")
    assert multimerge.run_merge is original
    assert calls == [(original, "config", "out", "options", {"config_source": "src"})]

    with pytest.raises(KeyboardInterrupt):
        with compat.multimerge_stages(run_stage):
            raise KeyboardInterrupt
    assert multimerge.run_merge is original


def test_a_chain_run_goes_through_the_swap(family, tmp_path, monkeypatch):
    """`mergekit-lox run` on a chain runs every stage mergekit-multi computes through
    ``multimerge_stages``, and mergekit-multi's module is as it was afterwards."""
    from mergekit.scripts import multimerge

    from mergekit_lox.run import run_recipe

    original = multimerge.run_merge
    staged = []
    real = compat.multimerge_stages

    def spying(run_stage):
        def spy(run_merge, config, out_path, options, **kwargs):
            staged.append(os.path.basename(out_path))
            assert multimerge.run_merge is not original
            return run_stage(run_merge, config, out_path, options, **kwargs)

        return real(spy)

    monkeypatch.setattr(compat, "multimerge_stages", spying)
    first = {"name": "step", **lox_recipe(family)}
    final = lox_recipe(family)
    final["models"][0]["model"] = "step"
    recipe = tmp_path / "chain.yml"
    recipe.write_text(yaml.safe_dump_all([first, final], sort_keys=False))
    run_recipe(str(recipe), str(tmp_path / "out"), ["--quiet"])
    assert staged == ["step", "out"]
    assert multimerge.run_merge is original
    assert os.path.exists(tmp_path / "out" / "model.safetensors")


# --------------------------------------------------------------------------- another mergekit version


def test_another_version_skips_every_patch_with_one_warning(monkeypatch):
    from mergekit.scripts import multimerge

    monkeypatch.setattr(compat, "installed_version", lambda: "9.9")
    monkeypatch.setattr(compat, "_warned", False)

    def unpatched(*args, **kwargs):
        return ({}, {})

    plan = types.SimpleNamespace(resolve_parameters=unpatched)
    original = multimerge.run_merge
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert compat.install_plan_checks(plan, lambda *a: None, lambda *a: None) is False
        with compat.multimerge_stages(lambda *a, **k: pytest.fail("a skipped patch ran")):
            assert multimerge.run_merge is original
        assert compat.install_plan_checks(plan, lambda *a: None, lambda *a: None) is False
    assert plan.resolve_parameters is unpatched
    ours = [w for w in caught if "mergekit-lox" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert "mergekit 9.9 is installed" in str(ours[0].message)
    assert compat.MERGEKIT_VERSION in str(ours[0].message)


_UNPATCHED_RUN = """
import json, sys, warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import mergekit_lox.mergekit_compat as compat
    compat.installed_version = lambda: "9.9"
    import mergekit.plan
    from mergekit.scripts.run_yaml import main as mergekit_yaml
    mergekit_yaml.main(args=[sys.argv[1], sys.argv[2], "--quiet"], standalone_mode=False)
print(json.dumps({
    "patched": bool(getattr(mergekit.plan.resolve_parameters, "_mergekit_lox_checks", False)),
    "ours": [str(w.message) for w in caught if "mergekit-lox" in str(w.message)],
}))
"""


def test_on_another_version_a_lox_merge_still_works(family, states, tmp_path):
    """A fresh interpreter that sees mergekit '9.9': no patch, one warning, and
    mergekit-yaml's own lox_extrapolate merge still equals the formula."""
    recipe = write_recipe(tmp_path / "lox.yml", lox_recipe(family))
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-c", _UNPATCHED_RUN, recipe, str(out)], capture_output=True, text=True, cwd=str(tmp_path)
    )
    assert result.returncode == 0, result.stderr[-2000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["patched"] is False
    assert len(seen["ours"]) == 1 and "mergekit 9.9 is installed" in seen["ours"][0]
    merged = load_state_dict(str(out))
    for name, tensor in merged.items():
        expected = ref.lox(ref.f64(states["aligned"][name]), ref.f64(states["base"][name]), 1.25, 4)
        assert ref.rel_err(ref.f64(tensor), expected) < 1e-4, name


def test_a_recipe_of_relative_local_paths_runs_offline(family, tmp_path, monkeypatch, capsys):
    """mergekit's model card asks the hub whether `base` (a local folder, no slash) is also a
    hub repository; offline (HF_HUB_OFFLINE=1 here, as in conftest) that request stopped the
    merge after every tensor was computed. A path that exists on disk is not looked up."""
    from conftest import run_cli

    root = os.path.dirname(family.base)
    monkeypatch.chdir(root)
    document = {
        "merge_method": "lox_extrapolate",
        "base_model": os.path.basename(family.base),
        "models": [{"model": os.path.basename(family.aligned)}],
        "parameters": {"alpha": 1.25, "rank": 4},
        "dtype": "float32",
    }
    recipe = tmp_path / "relative.yml"
    recipe.write_text(yaml.safe_dump(document))
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    code, _, err = run_cli(["run", str(recipe), str(tmp_path / "out"), "--quiet"], capsys)
    assert code == 0, err
    assert os.path.isfile(tmp_path / "out" / "README.md")  # the card was written, linking no hub model
    assert "huggingface.co/" + os.path.basename(family.base) not in (tmp_path / "out" / "README.md").read_text()
