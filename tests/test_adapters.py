"""`mergekit-lox adapter`: a LoX / LSSF recipe's term as a PEFT LoRA adapter.

Loaded by PEFT onto its target model and merged, the adapter must give the merge of
the same recipe (run by `mergekit-lox run`'s own function) on every weight it
covers; what it leaves out must be listed exactly, with the distance that makes.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import reference as ref
import torch
from conftest import run_cli
from safelora_helpers import write_yaml
from safetensors.torch import load_file
from test_calibrate import calibrated, prompts  # noqa: F401 - fixtures: a subspace of family.aligned
from test_lox import lox_recipe
from test_lssf import lssf_recipe
from test_safelora_adapter import merged_peft

from mergekit_lox.demo.synthetic import load_state_dict
from mergekit_lox.run import run_recipe

TOL = 1e-4
MANIFEST = "mergekit_lox_adapter.json"


def lssf_document(family, finetuned=None, **parameters):
    document = lssf_recipe(family, **parameters)
    document["models"][0]["model"] = finetuned or family.finetuned
    return document


def merged_and_adapter(tmp_path, capsys, document, *options):
    """Run the recipe as `mergekit-lox run` does and write its adapter; return
    (merged state dict, adapter dir, printed lines)."""
    recipe = write_yaml(tmp_path / "recipe.yml", document)
    run_recipe(recipe, str(tmp_path / "merged"), ["--quiet"])
    out = str(tmp_path / "adapter")
    code, printed, err = run_cli(["adapter", recipe, "-o", out, *options], capsys)
    assert code == 0, err
    return load_state_dict(str(tmp_path / "merged")), out, printed.splitlines()


def matrices(state):
    return {name for name, tensor in state.items() if tensor.ndim == 2}


def stored_ranks(adapter_dir) -> dict:
    tensors = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    ranks = {}
    for key, tensor in tensors.items():
        module = key.removeprefix("base_model.model.").split(".lora_")[0]
        if key.endswith(("lora_A.weight", "lora_embedding_A")):
            ranks[module] = tensor.shape[0]
    return ranks


@pytest.mark.parametrize("alpha, rank", [(1.25, 6), (0.7, 0)], ids=["paper", "full-rank"])
def test_lox_adapter_merged_by_peft_is_the_merge(family, states, tmp_path, capsys, alpha, rank):
    merged, out, _ = merged_and_adapter(tmp_path, capsys, lox_recipe(family, alpha=alpha, rank=rank))
    via_peft = merged_peft(family.aligned, out)
    for name, tensor in merged.items():
        assert ref.rel_err(ref.f64(via_peft[name]), ref.f64(tensor)) < TOL, name
        if tensor.ndim == 2:  # and the term is really there (an empty adapter fails)
            assert ref.rel_err(ref.f64(tensor), ref.f64(states["aligned"][name])) > 100 * TOL, name
    # Every matrix is a module (embeddings as embedding LoRA), each of LoX's rank, scaling 1.
    ranks = stored_ranks(out)
    assert {m + ".weight" for m in ranks} == matrices(merged)
    for module, r in ranks.items():
        assert r == (min(states["aligned"][module + ".weight"].shape) if rank == 0 else rank), module
    config = json.load(open(os.path.join(out, "adapter_config.json")))
    assert config["peft_type"] == "LORA" and config["use_rslora"] is False
    assert config["lora_alpha"] == config["r"] == max(ranks.values())
    assert config["base_model_name_or_path"] == os.path.abspath(family.aligned)
    manifest = json.load(open(os.path.join(out, MANIFEST)))
    assert manifest["left_out"] == {} and manifest["distance"] == 0.0
    card = open(os.path.join(out, "README.md")).read()
    assert "lox_extrapolate" in card and "arxiv.org/abs/2506.15606" in card and family.base in card


def test_lssf_adapter_merged_by_peft_is_the_merge(family, states, tmp_path, capsys):
    document = lssf_document(family, scale=1.0, eta=0.8, top_weight=1.5)
    merged, out, printed = merged_and_adapter(tmp_path, capsys, document)
    via_peft = merged_peft(family.finetuned, out)  # the adapter applies to the fine-tuned model
    for name, tensor in merged.items():
        assert ref.rel_err(ref.f64(via_peft[name]), ref.f64(tensor)) < TOL, name
        expected = ref.lssf(*(ref.f64(states[r][name]) for r in ("finetuned", "aligned", "base")), 1.0, 0.8, 0, 1.5)
        assert ref.rel_err(ref.f64(via_peft[name]), expected) < TOL, name
    # Per-module ranks: the paper's entropy rule on tau, through rank_pattern/alpha_pattern.
    ranks = stored_ranks(out)
    assert {m + ".weight" for m in ranks} == matrices(merged)
    for module, r in ranks.items():
        tau = ref.f64(states["aligned"][module + ".weight"]) - ref.f64(states["base"][module + ".weight"])
        assert r == ref.lssf_rank_of(np.linalg.svd(tau, compute_uv=False), tau.shape, 0.8), module
    assert len(set(ranks.values())) > 1  # so the patterns are exercised
    config = json.load(open(os.path.join(out, "adapter_config.json")))
    assert config["base_model_name_or_path"] == os.path.abspath(family.finetuned)
    assert set(config["rank_pattern"].values()) | {config["r"]} == set(ranks.values())
    assert config["alpha_pattern"] == config["rank_pattern"]
    assert any("lssf_fusion: 16 LoRA module(s)" in line for line in printed)


def test_lssf_adapter_with_a_calibrated_subspace(family, states, calibrated, tmp_path, capsys):  # noqa: F811
    merged, out, _ = merged_and_adapter(tmp_path, capsys, lssf_document(family, eta=0.8, subspace=calibrated))
    via_peft = merged_peft(family.finetuned, out)
    moved_by_basis = 0
    for name, tensor in merged.items():
        assert ref.rel_err(ref.f64(via_peft[name]), ref.f64(tensor)) < TOL, name
        data_free = ref.lssf(*(ref.f64(states[r][name]) for r in ("finetuned", "aligned", "base")), 1.0, 0.8)
        moved_by_basis += ref.rel_err(ref.f64(tensor), data_free) > 100 * TOL
    assert moved_by_basis > 0  # the calibrated subspace was used, not the data-free one


def test_left_out_and_capped_weights_are_listed_with_the_distance(family, states, tmp_path, capsys):
    merged, out, printed = merged_and_adapter(
        tmp_path, capsys, lox_recipe(family, alpha=1.25, rank=6), "--no-embeddings", "--max-rank", "2"
    )
    manifest = json.load(open(os.path.join(out, MANIFEST)))
    assert list(manifest["left_out"]) == ["model.embed_tokens.weight"]
    assert "model.embed_tokens.weight" in "\n".join(printed)
    via_peft = merged_peft(family.aligned, out)
    missing = total = 0.0
    for name, tensor in merged.items():
        W_a, full = ref.f64(states["aligned"][name]), ref.f64(tensor)
        got = ref.f64(via_peft[name])
        if name == "model.embed_tokens.weight":
            assert np.array_equal(got, W_a)  # left out: untouched
        elif tensor.ndim == 2:  # capped: the best rank-2 approximation of LoX's term
            expected = W_a + ref.lowrank(full - W_a, 2)
            assert ref.rel_err(got, expected) < TOL, name
        missing += float(np.sum((full - got) ** 2))
        total += float(np.sum(full**2))
    assert manifest["distance"] == pytest.approx(math.sqrt(missing / total), rel=1e-3)
    assert f"{manifest['distance']:.3g}" in "\n".join(printed)
    assert len(manifest["capped"]) == 15 and set(stored_ranks(out).values()) == {2}


def test_require_complete_fails_and_writes_nothing(family, tmp_path, capsys):
    recipe = write_yaml(tmp_path / "lox.yml", lox_recipe(family, alpha=1.25, rank=6))
    code, _, err = run_cli(
        ["adapter", recipe, "-o", str(tmp_path / "a"), "--no-embeddings", "--require-complete"], capsys
    )
    assert code == 1
    assert err.strip().splitlines()[-1].startswith("error: weight model.embed_tokens.weight cannot be part")
    assert sorted(os.listdir(tmp_path)) == ["lox.yml"]


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_lox_factors_are_the_kernels_term(svd):
    from mergekit_lox.methods.lox import extrapolate, lox_factors

    generator = torch.Generator().manual_seed(5)
    base = torch.randn(300, 200, generator=generator)
    planted = torch.randn(300, 8, generator=generator) @ torch.randn(8, 200, generator=generator)
    aligned = base + 0.1 * planted + 0.001 * torch.randn(300, 200, generator=generator)
    B, A = lox_factors(aligned, base, 1.25, 6, svd)
    assert B.shape == (300, 6) and A.shape == (6, 200) and B.dtype == A.dtype == torch.float32
    expected = 1.25 * ref.lowrank(ref.f64(aligned) - ref.f64(base), 6)
    assert ref.rel_err(ref.f64(B @ A), expected) < TOL
    kernel = extrapolate(aligned, base, 1.25, 6, svd)
    assert ref.rel_err(ref.f64(aligned + B @ A), ref.f64(kernel)) < 1e-6


def test_tied_and_stacked_weights_are_left_out():
    from transformers import LlamaConfig, LlamaForCausalLM

    from mergekit_lox.adapters.lora import module_kinds
    from mergekit_lox.adapters.weights import ModuleTypes, weight_term

    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        tie_word_embeddings=True,
    )  # fmt: skip
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    kinds, tied = module_kinds(model)
    assert sorted(tied) == ["lm_head.weight", "model.embed_tokens.weight"]
    assert kinds["model.layers.0.self_attn.q_proj.weight"] == "linear"
    types = ModuleTypes(kinds, tied, "LlamaForCausalLM")
    B, A = torch.ones(32, 2), torch.ones(2, 16)
    assert weight_term("model.embed_tokens.weight", torch.zeros(32, 16), (B, A), types).kind.startswith("tied to")
    stack = weight_term("model.experts.weight", torch.zeros(4, 32, 16), (B.expand(4, 32, 2), A), types)
    assert stack.left_out and "3-D" in stack.kind and stack.missing_sq == pytest.approx(4 * 32 * 16 * 4)
    assert weight_term("model.norm.weight", torch.ones(16), None, types).kind == ""  # 1-D: no term


def chain_documents(family):
    """A stage that copies the fine-tune (linear, weight 1), then LSSF on that stage."""
    stage = {
        "name": "ft",
        "merge_method": "linear",
        "models": [{"model": family.finetuned, "parameters": {"weight": 1.0}}],
        "dtype": "float32",
    }
    return [stage, lssf_document(family, finetuned="ft", scale=0.8)]


def test_chain_final_stage_uses_the_intermediate_outputs(family, tmp_path, capsys):
    import yaml

    recipe = str(tmp_path / "chain.yml")
    with open(recipe, "w") as f:
        yaml.safe_dump_all(chain_documents(family), f, sort_keys=False)
    out = str(tmp_path / "out")
    code, _, err = run_cli(["adapter", recipe, "-o", str(tmp_path / "early")], capsys)
    assert code == 1 and "give --intermediate-dir" in err  # nothing run yet, nowhere to look
    code, _, err = run_cli(["adapter", recipe, "-o", str(tmp_path / "early"), "-I", str(tmp_path / "no")], capsys)
    assert code == 1 and "stage 'ft' has not been run" in err
    run_recipe(recipe, out, ["--quiet"])
    code, _, err = run_cli(["adapter", recipe, "-o", str(tmp_path / "adapter"), "-I", out + ".intermediate"], capsys)
    assert code == 0, err
    stage = os.path.join(out + ".intermediate", "ft")
    config = json.load(open(tmp_path / "adapter" / "adapter_config.json"))
    assert config["base_model_name_or_path"] == os.path.abspath(stage)
    via_peft = merged_peft(stage, str(tmp_path / "adapter"))
    for name, tensor in load_state_dict(out).items():
        assert ref.rel_err(ref.f64(via_peft[name]), ref.f64(tensor)) < TOL, name
    assert not os.path.exists(tmp_path / "early")


def linear_stage(family, **fields):
    return {**lox_recipe(family), "merge_method": "linear", "parameters": {"weight": 1.0}, **fields}


@pytest.mark.parametrize(
    "documents, message",
    [
        (lambda f: [linear_stage(f)], "uses merge_method 'linear'; `mergekit-lox adapter` writes the term of"),
        (
            lambda f: [linear_stage(f, name="a"), linear_stage(f, base_model="a")],
            "has no lox_extrapolate or lssf_fusion stage: there is no low-rank term",
        ),
        (
            lambda f: [{**lox_recipe(f), "name": "a"}, linear_stage(f, base_model="a")],
            "its final document uses merge_method 'linear', and an adapter is written for the final document only",
        ),
    ],
    ids=["other-method", "chain-without-lox-or-lssf", "chain-lox-not-last"],
)
def test_recipes_without_an_adapter_term_are_refused(family, tmp_path, capsys, documents, message):
    import yaml

    recipe = str(tmp_path / "recipe.yml")
    with open(recipe, "w") as f:
        yaml.safe_dump_all(documents(family), f, sort_keys=False)
    code, _, err = run_cli(["adapter", recipe, "-o", str(tmp_path / "adapter")], capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert sorted(os.listdir(tmp_path)) == ["recipe.yml"]


def test_output_directories_are_guarded(family, tmp_path, capsys):
    recipe = write_yaml(tmp_path / "lox.yml", lox_recipe(family, alpha=1.25, rank=2))
    mine = tmp_path / "mine"
    os.makedirs(mine)
    (mine / "notes.txt").write_text("keep")
    code, _, err = run_cli(["adapter", recipe, "-o", str(mine)], capsys)
    assert code == 1 and "was not written by mergekit-lox adapter" in err.strip().splitlines()[-1]
    assert os.listdir(mine) == ["notes.txt"]
    inside = os.path.join(family.aligned, "adapter")
    code, _, err = run_cli(["adapter", recipe, "-o", inside], capsys)
    assert code == 1 and "inside input model directory" in err and not os.path.exists(inside)
    # An adapter we wrote is replaced, whole, by the next one.
    out = str(tmp_path / "adapter")
    assert run_cli(["adapter", recipe, "-o", out], capsys)[0] == 0
    assert run_cli(["adapter", recipe, "-o", out, "--max-rank", "1"], capsys)[0] == 0
    assert set(stored_ranks(out).values()) == {1}
    assert sorted(os.listdir(tmp_path)) == ["adapter", "lox.yml", "mine"]


def test_methods_lists_what_can_be_an_adapter(capsys):
    code, out, _ = run_cli(["methods", "--json"], capsys)
    assert code == 0
    adapters = {m["name"]: m["adapter"] for m in json.loads(out)}
    assert adapters == {"lox_extrapolate": True, "lssf_fusion": True, "safelora_project": False, "safemerge": False}
    code, out, _ = run_cli(["methods"], capsys)
    assert out.count("mergekit-lox adapter") == 2
