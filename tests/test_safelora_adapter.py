"""`safelora-adapter`: a PEFT LoRA adapter projected with Safe LoRA (B' = C B).

The projected adapter must load with `peft.PeftModel.from_pretrained` and, merged,
equal both a float64 evaluation of docs/methods.md section 3 on W_f = W_a + s B A and
the `safelora_project` merge of `aligned+adapter`.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import reference as ref
import torch
from conftest import run_merge_recipe
from safelora_helpers import (
    MIN_GAP,
    TOL,
    check_against_reference,
    f64_state,
    lora_scaling,
    recipe,
    reference_cosines,
    threshold_between,
)
from safetensors.torch import load_file

from mergekit_lox.cli import main
from mergekit_lox.safelora_tools import SafeLoRAToolError, safelora_adapter

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def f64(states):
    return {role: f64_state(state) for role, state in states.items()}


@pytest.fixture(scope="module")
def adapter_tensors(lora_adapter):
    return load_file(os.path.join(lora_adapter, WEIGHTS))


@pytest.fixture(scope="module")
def lora_finetuned(f64, adapter_tensors):
    adapter = {k: ref.f64(v) for k, v in adapter_tensors.items()}
    return ref.peft_lora_finetuned(f64["aligned"], adapter, lora_scaling)


def merged_peft(aligned_dir: str, adapter_dir: str) -> dict:
    """PEFT's own loading and merging of an adapter onto the aligned model."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(aligned_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    return {name: tensor.detach() for name, tensor in model.state_dict().items()}


def module_weight(key: str) -> str:
    return key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] + ".weight"


# The Agreement rule (docs/methods.md): exact decompositions match float64 to 1e-4; a
# randomized one (svd auto may take it for orthogonal U_k) keeps its error below 1e-3.
@pytest.mark.parametrize(
    "projection,rank,svd,tol",
    [("scaled", 8, "auto", TOL), ("orthogonal", 4, "exact", TOL), ("orthogonal", 4, "auto", 1e-3)],
)
def test_adapter_round_trip_through_peft(
    family, f64, lora_adapter, adapter_tensors, lora_finetuned, tmp_path, projection, rank, svd, tol
):
    cosines = reference_cosines(f64["base"], f64["aligned"], lora_finetuned, projection, rank)
    threshold = threshold_between(cosines)
    out = str(tmp_path / "projected")
    main(
        [
            "safelora-adapter",
            "--base",
            family.base,
            "--aligned",
            family.aligned,
            "--adapter",
            lora_adapter,
            "-o",
            out,
            "--threshold",
            repr(threshold),
            "--projection",
            projection,
            "--rank",
            str(rank),
            "--svd",
            svd,
        ]
    )

    # The adapter files: lora_A untouched, lora_B replaced by C B exactly where
    # the reference projects, every other file copied.
    projected = load_file(os.path.join(out, WEIGHTS))
    assert projected.keys() == adapter_tensors.keys()
    chosen = {name for name, cos in cosines.items() if cos <= threshold}
    assert 0 < len(chosen) < len(cosines)
    for key, tensor in adapter_tensors.items():
        weight = module_weight(key)
        if ".lora_B." in key and weight in chosen:
            V = f64["aligned"][weight] - f64["base"][weight]
            expected = ref.safelora_projection(V, ref.f64(tensor), projection, rank)
            assert ref.rel_err(ref.f64(projected[key]), expected) < tol, key
        else:
            assert torch.equal(projected[key], tensor), key
    assert set(os.listdir(lora_adapter)) <= set(os.listdir(out))
    report = json.load(open(os.path.join(out, "safelora.json")))
    assert {m["module"] + ".weight" for m in report["modules"] if m["projected"]} == chosen

    # Loaded and merged by PEFT, it is Safe LoRA of the LoRA fine-tune...
    merged = merged_peft(family.aligned, out)
    check_against_reference(merged, f64["base"], f64["aligned"], lora_finetuned, threshold, projection, rank)
    # ... and equals the safelora_project merge of `aligned+adapter`.
    via_merge = run_merge_recipe(
        recipe(
            family,
            f"{family.aligned}+{lora_adapter}",
            threshold=threshold,
            projection=projection,
            rank=rank,
            svd=svd,
        ),
        tmp_path / "merge",
        lora_merge_cache=str(tmp_path / "cache"),
    )
    for name, tensor in via_merge.items():
        assert ref.rel_err(ref.f64(merged[name]), ref.f64(tensor)) < TOL, name


def test_adapter_number_mode_projects_the_lowest_cosines(family, f64, lora_adapter, lora_finetuned, tmp_path):
    cosines = reference_cosines(f64["base"], f64["aligned"], lora_finetuned, "scaled", 8)
    ranked = sorted(cosines, key=cosines.get)
    assert cosines[ranked[2]] - cosines[ranked[1]] > MIN_GAP
    printed = []
    modules = safelora_adapter(
        family.base, family.aligned, lora_adapter, str(tmp_path / "out"), num_layers=2, echo=printed.append
    )
    assert {m.weight for m in modules if m.projected} == set(ranked[:2])
    for m in modules:
        assert m.cos == pytest.approx(cosines[m.weight], abs=1e-5)
    assert any(ranked[0].removesuffix(".weight") in line for line in printed)
    with pytest.raises(SafeLoRAToolError, match="--num-layers 7 but adapter .* has only 6"):
        safelora_adapter(family.base, family.aligned, lora_adapter, str(tmp_path / "out7"), num_layers=7)
    assert not os.path.exists(tmp_path / "out7")


def edited_adapter(source: str, target, config_changes=None, drop=None, rename=None) -> str:
    """A copy of ``source`` with config fields changed or tensors dropped/renamed."""
    from safetensors.torch import save_file

    shutil.copytree(source, target)
    if config_changes:
        path = os.path.join(target, "adapter_config.json")
        config = json.load(open(path))
        config.update(config_changes)
        json.dump(config, open(path, "w"))
    tensors = load_file(os.path.join(source, WEIGHTS))
    if drop:
        tensors = {k: v for k, v in tensors.items() if drop not in k}
    if rename:
        tensors = {k.replace(*rename): v for k, v in tensors.items()}
    save_file(tensors, os.path.join(target, WEIGHTS))
    return str(target)


def test_adapter_errors_name_the_problem(family, lora_adapter, tmp_path, capsys):
    def run(adapter, out="out", **kwargs):
        return safelora_adapter(
            family.base, family.aligned, adapter, str(tmp_path / out), echo=lambda s: None, **kwargs
        )

    with pytest.raises(SafeLoRAToolError, match="use_dora"):
        run(edited_adapter(lora_adapter, tmp_path / "dora", {"use_dora": True}))
    with pytest.raises(SafeLoRAToolError, match=r"q_proj.lora_A.weight has no matching .*lora_B"):
        run(edited_adapter(lora_adapter, tmp_path / "half", drop="layers.0.self_attn.q_proj.lora_B"))
    with pytest.raises(
        SafeLoRAToolError, match=r"tensor model.layers.0.self_attn.qq_proj.weight .* not found in base model"
    ):
        run(
            edited_adapter(
                lora_adapter, tmp_path / "renamed", rename=("layers.0.self_attn.q_proj", "layers.0.self_attn.qq_proj")
            )
        )
    with pytest.raises(SafeLoRAToolError, match="not a PEFT adapter"):
        run(family.base)
    with pytest.raises(SafeLoRAToolError, match="inside the adapter directory"):
        safelora_adapter(family.base, family.aligned, lora_adapter, os.path.join(lora_adapter, "out"))
    assert not os.path.exists(os.path.join(lora_adapter, "out"))
    os.makedirs(tmp_path / "full")
    open(tmp_path / "full" / "keep.txt", "w").close()
    with pytest.raises(SafeLoRAToolError, match="already exists and is not an empty directory"):
        run(lora_adapter, out="full")
    # Nothing half-written is left beside a failed output.
    assert sorted(os.listdir(tmp_path)) == ["dora", "full", "half", "renamed"]

    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "safelora-adapter",
                "--base",
                family.base,
                "--aligned",
                family.aligned,
                "--adapter",
                lora_adapter,
                "-o",
                str(tmp_path / "x"),
                "--threshold",
                "0.1",
                "--num-layers",
                "2",
            ]
        )
    assert exit_.value.code == 2
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "safelora-adapter",
                "--base",
                family.base,
                "--aligned",
                family.aligned,
                "--adapter",
                str(tmp_path / "nope"),
                "-o",
                str(tmp_path / "x"),
            ]
        )
    assert exit_.value.code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: adapter {tmp_path / 'nope'} is not a directory"


def test_links_out_of_the_adapter_folder_are_not_copied(family, lora_adapter, tmp_path, capsys):
    """Issue 23: safelora-adapter copied the targets of symlinks in the input adapter folder
    into the output, so a linked token file would be published with the adapter. A link
    inside the folder (and a Hugging Face cache snapshot's links to its blobs) is copied as
    the file it names."""
    adapter = tmp_path / "adapter"
    shutil.copytree(lora_adapter, adapter)
    secret = tmp_path / "token"
    secret.write_text("hf_secret")
    os.symlink(secret, adapter / "token.txt")
    shutil.copy(adapter / "adapter_config.json", adapter / "notes.md")
    os.symlink("notes.md", adapter / "LINKED.md")  # inside the folder: fine
    safelora_adapter(family.base, family.aligned, str(adapter), str(tmp_path / "out"), echo=lambda s: None)
    out = tmp_path / "out"
    assert not (out / "token.txt").exists() and "hf_secret" not in "".join(p.read_text() for p in out.glob("*.md"))
    assert (out / "LINKED.md").is_file() and not (out / "LINKED.md").is_symlink()
    assert "token.txt is a link to a file outside the adapter folder: not copied" in capsys.readouterr().err


def test_a_hub_cache_snapshot_counts_as_one_folder(tmp_path):
    from mergekit_lox.files.output import link_leaves

    repo = tmp_path / "hub" / "models--me--adapter"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "abc").write_text("{}")
    snapshot = repo / "snapshots" / "0123"
    snapshot.mkdir(parents=True)
    os.symlink("../../blobs/abc", snapshot / "adapter_config.json")
    os.symlink(tmp_path / "elsewhere", snapshot / "token")
    assert not link_leaves(str(snapshot / "adapter_config.json"), str(snapshot))
    assert link_leaves(str(snapshot / "token"), str(snapshot))
