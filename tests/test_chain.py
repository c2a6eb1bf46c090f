"""Chains: multi-document recipes through `mergekit-lox run` and through `mergekit-multi`.

The three-stage chain is LoX -> task arithmetic (the LoX model plus a weighted
task vector of the fine-tune) -> LSSF realignment of that merge; every
tensor of every stage is compared with the composition of the stage formulas
evaluated in float64 (reference.py), and the same file is run by the
installed `mergekit-multi` console script with no flag or import of ours.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import reference as ref
import yaml
from safetensors.numpy import save_file

from mergekit_lox import cli
from mergekit_lox.demo.synthetic import load_state_dict
from mergekit_lox.run.chain import STAGE_RECORD, default_intermediate_dir

TOL = 1e-4
ALPHA, LOX_RANK = 1.25, 6
TASK_WEIGHT = 0.8
SCALE, LSSF_RANK = 0.9, 3


def chain_documents(family, alpha=ALPHA):
    return [
        {
            "name": "hardened",
            "merge_method": "lox_extrapolate",
            "base_model": family.base,
            "models": [{"model": family.aligned, "parameters": {"role": "aligned"}}],
            "parameters": {"alpha": alpha, "rank": LOX_RANK},
            "dtype": "float32",
        },
        {
            "name": "merged",
            "merge_method": "task_arithmetic",
            "base_model": family.aligned,
            "models": [
                {"model": "hardened", "parameters": {"weight": 1.0}},
                {"model": family.finetuned, "parameters": {"weight": TASK_WEIGHT}},
            ],
            "dtype": "float32",
        },
        {
            "merge_method": "lssf_fusion",
            "base_model": family.base,
            "models": [
                {"model": family.aligned, "parameters": {"role": "aligned"}},
                {"model": "merged", "parameters": {"role": "finetuned"}},
            ],
            "parameters": {"scale": SCALE, "rank": LSSF_RANK},
            "dtype": "float32",
        },
    ]


def write_recipe(path, documents) -> str:
    with open(path, "w") as f:
        yaml.safe_dump_all(documents, f, sort_keys=False)
    return str(path)


def expected_stages(states, hardened=None):
    """The composition of the stage formulas, float64, per tensor."""
    stages = {"hardened": {}, "merged": {}, None: {}}
    for name in states["base"]:
        W_b, W_a, W_f = (ref.f64(states[k][name]) for k in ("base", "aligned", "finetuned"))
        lox = ref.lox(W_a, W_b, ALPHA, LOX_RANK) if hardened is None else hardened[name]
        merged = W_a + 1.0 * (lox - W_a) + TASK_WEIGHT * (W_f - W_a)
        stages["hardened"][name] = lox
        stages["merged"][name] = merged
        stages[None][name] = ref.lssf(merged, W_a, W_b, SCALE, rank=LSSF_RANK)
    return stages


def assert_matches(directory, expected):
    actual = load_state_dict(directory)
    assert set(actual) == set(expected), directory
    for name, tensor in actual.items():
        err = ref.rel_err(ref.f64(tensor), expected[name])
        assert err < TOL, f"{directory}: {name} rel err {err:.2e}"


def run_cli(*argv):
    """`mergekit-lox ARGV` in-process; returns the exit status."""
    try:
        cli.main(list(argv))
    except SystemExit as exit_:
        return exit_.code
    return 0


@pytest.fixture(scope="module")
def chain_run(family, tmp_path_factory):
    """The three-stage chain, run once by `mergekit-lox run` with default intermediates."""
    root = tmp_path_factory.mktemp("chain")
    recipe = write_recipe(root / "chain.yml", chain_documents(family))
    out = str(root / "final")
    assert run_cli("run", recipe, out, "--quiet") == 0
    return recipe, out


def test_run_equals_composition_of_stage_formulas(chain_run, states):
    recipe, out = chain_run
    intermediate = default_intermediate_dir(out)
    assert intermediate == out + ".intermediate"
    expected = expected_stages(states)
    assert_matches(os.path.join(intermediate, "hardened"), expected["hardened"])
    assert_matches(os.path.join(intermediate, "merged"), expected["merged"])
    assert_matches(out, expected[None])
    # Each stage did work: the final output is neither the merge nor the fine-tune.
    final = load_state_dict(out)
    name = "model.layers.1.mlp.down_proj.weight"
    for other in (expected["merged"][name], ref.f64(states["finetuned"][name])):
        assert ref.rel_err(ref.f64(final[name]), other) > 1e-2


def test_mergekit_multi_runs_the_same_chain(chain_run, states, tmp_path):
    """The installed console script, in a fresh interpreter: our methods are
    registered by the start-up hook, nothing else is imported or passed."""
    recipe, _ = chain_run
    script = os.path.join(os.path.dirname(sys.executable), "mergekit-multi")
    out, intermediate = str(tmp_path / "final"), str(tmp_path / "stages")
    result = subprocess.run(
        [script, recipe, "-I", intermediate, "--out-path", out, "--quiet"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    expected = expected_stages(states)
    assert_matches(os.path.join(intermediate, "hardened"), expected["hardened"])
    assert_matches(out, expected[None])


def test_completed_stages_are_skipped_on_rerun(chain_run, states, tmp_path):
    """Replace the completed first stage's weights by known ones and delete the later
    stages: the re-run must keep the first stage and build the rest from it."""
    recipe, out = chain_run
    stages = str(tmp_path / "stages")
    shutil.copytree(default_intermediate_dir(out), stages)
    shutil.rmtree(os.path.join(stages, "merged"))
    planted = {name: ref.f64(t) * 0.5 for name, t in states["aligned"].items()}
    save_file(
        {k: v.astype(np.float32) for k, v in planted.items()},
        os.path.join(stages, "hardened", "model.safetensors"),
        metadata={"format": "pt"},
    )
    final = str(tmp_path / "final")
    assert run_cli("run", recipe, final, "--intermediate-dir", stages, "--quiet") == 0

    expected = expected_stages(states, hardened=planted)
    assert_matches(os.path.join(stages, "hardened"), planted)
    assert_matches(os.path.join(stages, "merged"), expected["merged"])
    assert_matches(final, expected[None])


def test_changed_stage_is_not_reused_silently(chain_run, family, tmp_path, capsys):
    recipe, out = chain_run
    stages = str(tmp_path / "stages")
    shutil.copytree(default_intermediate_dir(out), stages)
    before = open(os.path.join(stages, "hardened", "model.safetensors"), "rb").read()
    changed = write_recipe(tmp_path / "changed.yml", chain_documents(family, alpha=0.5))
    final = str(tmp_path / "final")

    assert run_cli("run", changed, final, "--intermediate-dir", stages, "--quiet") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stage 'hardened'" in err[0] and "different document" in err[0]
    assert open(os.path.join(stages, "hardened", "model.safetensors"), "rb").read() == before
    assert os.path.exists(os.path.join(stages, "hardened", STAGE_RECORD))
    assert not os.path.exists(final)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda docs: docs[2]["models"][1].update(model="mergd"), "unknown reference 'mergd'"),
        (lambda docs: docs[0]["models"][0].update(model="merged"), "chain cycle: hardened -> merged -> hardened"),
    ],
    ids=["unknown-reference", "cycle"],
)
def test_bad_chain_fails_before_anything_runs(family, tmp_path, capsys, mutate, message):
    documents = chain_documents(family)
    mutate(documents)
    recipe = write_recipe(tmp_path / "bad.yml", documents)
    out = str(tmp_path / "final")
    assert run_cli("run", recipe, out, "--quiet") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {recipe}: document ") and message in err[0]
    assert not os.path.exists(out) and not os.path.exists(out + ".intermediate")


def test_output_inside_an_input_model_is_refused(family, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "chain.yml", chain_documents(family))
    out = os.path.join(family.aligned, "realigned")
    assert run_cli("run", recipe, out, "--quiet") == 1
    err = capsys.readouterr().err
    assert "is inside input model directory" in err and family.aligned in err
    assert not os.path.exists(out) and not os.path.exists(out + ".intermediate")


def test_a_stage_name_that_leaves_the_intermediate_folder_is_refused_before_writing(family, tmp_path, capsys):
    """Issue 23: `name: ../../x` (or an absolute path) was joined onto the intermediate
    folder, so a chain could write, and replace, a folder anywhere."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "mine.txt").write_text("the user's")
    for name in ("../victim", str(victim)):
        documents = chain_documents(family)
        documents[0]["name"] = name
        documents[1]["models"][0]["model"] = name
        recipe = write_recipe(tmp_path / "bad.yml", documents)
        out = tmp_path / "work" / "final"
        assert run_cli("run", recipe, str(out), "--quiet") == 1
        err = capsys.readouterr().err
        assert f"document 1 ({name!r}): name: {name!r} holds a path separator" in err
        assert sorted(os.listdir(victim)) == ["mine.txt"] and not (tmp_path / "work").exists()
