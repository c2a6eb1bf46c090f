"""Issue 23: every path a command writes (OUT, --lora-merge-cache) is checked against every
input the recipe reads, tokenizer donors included, by one shared function
(files.output.config_input_dirs / local_model_dirs)."""

from __future__ import annotations

import os
import shutil

from conftest import run_cli
from safelora_helpers import recipe, write_yaml


def listing(path) -> list:
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)


def test_a_lora_merge_cache_inside_an_input_is_refused_by_every_command(family, tmp_path, capsys):
    aligned = shutil.copytree(family.aligned, tmp_path / "aligned")
    before = listing(aligned)
    cache = str(aligned / "cache")
    source = recipe(family, family.finetuned)
    source["models"][0]["model"] = str(aligned)
    safelora = write_yaml(tmp_path / "s.yml", source)
    code, _, err = run_cli(
        ["safelora-select", safelora, "--num-layers", "2", "-o", str(tmp_path / "o.yml"), "--lora-merge-cache", cache],
        capsys,
    )
    assert code == 1 and f"--lora-merge-cache {cache} is inside the input model directory" in err
    lox = {
        "merge_method": "lox_extrapolate",
        "base_model": family.base,
        "models": [{"model": str(aligned)}],
        "parameters": {"rank": 2},
        "dtype": "float32",
    }
    lox_recipe = write_yaml(tmp_path / "lox.yml", lox)
    code, _, err = run_cli(["adapter", lox_recipe, "-o", str(tmp_path / "ad"), "--lora-merge-cache", cache], capsys)
    assert code == 1 and "cache" in err and "is inside input model directory" in err
    code, _, err = run_cli(["run", lox_recipe, str(tmp_path / "m"), "--lora-merge-cache", cache], capsys)
    assert code == 1 and "inside input model directory" in err
    assert listing(aligned) == before and not os.path.exists(tmp_path / "o.yml")


def test_a_tokenizer_donor_is_an_input(family, tmp_path, capsys):
    donor = shutil.copytree(family.aligned, tmp_path / "donor")
    before = listing(donor)
    document = {
        "merge_method": "lox_extrapolate",
        "base_model": family.base,
        "models": [{"model": family.aligned}],
        "parameters": {"rank": 2},
        "tokenizer_source": str(donor),
        "dtype": "float32",
    }
    source = write_yaml(tmp_path / "r.yml", document)
    code, _, err = run_cli(["run", source, str(donor / "out"), "--quiet"], capsys)
    assert code == 1 and f"is inside input model directory {donor}" in err
    del document["tokenizer_source"]
    document["tokenizer"] = {"source": str(donor)}
    source = write_yaml(tmp_path / "t.yml", document)
    code, _, err = run_cli(["run", source, str(donor / "sub" / "out"), "--quiet"], capsys)
    assert code == 1 and f"inside input model directory {donor}" in err
    assert listing(donor) == before
