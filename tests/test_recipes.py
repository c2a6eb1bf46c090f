"""The shipped recipes in recipes/: each passes `check`, and each runs end to end.

Offline, every Hugging Face ID is replaced by a local fixture playing the
same part (pretrained base, aligned model, fine-tunes, a PEFT LoRA adapter).
Two more substitutions make outputs comparable to a float64 evaluation at
1e-4: `dtype` becomes float32 and `out_dtype` is dropped (the real recipes
store bfloat16/float16, which only rounds the result); a `dare_linear` recipe
runs at density 1 (its random drops are tests/test_resta.py's). Everything else --
methods, parameters, roles, chain references, tokenizer_source -- is run as
written, through `mergekit-lox run` (in-process), and every output tensor of
every stage is compared with recipe_reference's independent evaluation.
"""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest
import recipe_reference
import reference as ref
import torch
import yaml

from mergekit_lox import cli
from mergekit_lox.check import check_recipe
from mergekit_lox.demo.synthetic import (
    FamilySpec,
    erode,
    llama_config,
    load_state_dict,
    make_tokenizer,
    save_model,
)

RECIPES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")
RECIPES = sorted(glob.glob(os.path.join(RECIPES_DIR, "*.yml")))
TOL = 1e-4

# The part each Hugging Face checkpoint plays in the recipes -> fixture key.
PARTS = {
    "meta-llama/Llama-2-7b-hf": "base",
    "meta-llama/Llama-2-7b-chat-hf": "aligned",
    "mistralai/Mistral-7B-v0.3": "base",
    "mistralai/Mistral-7B-Instruct-v0.3": "aligned",
    "meta-llama/Llama-3.1-8B": "base",
    "meta-llama/Llama-3.1-8B-Instruct": "aligned",
    "arcee-ai/Llama-3.1-SuperNova-Lite": "finetuned",
    "akjindal53244/Llama-3.1-Storm-8B": "finetuned2",
    "FinGPT/fingpt-forecaster_dow30_llama2-7b_lora": "adapter",
    # RESTA's unaligned model (the chat model fine-tuned on harmful data): a placeholder id.
    "your-name/Llama-2-7b-chat-unaligned": "unaligned",
    # SafeMERGE's safety model (the chat model tuned on safety data): a placeholder id.
    "your-name/Llama-2-7b-chat-safety": "safety",
}


def build_adapter(family, path: str) -> str:
    """A PEFT LoRA adapter on the aligned fixture, with predictable Safe LoRA decisions:
    its q_proj updates lie in the planted safety subspace (cosine near 1: kept), its
    v_proj and down_proj updates are random directions (cosine small: projected)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(family.aligned, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(11)
    for name, module in peft_model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in getattr(module, "lora_A", {}):
            continue
        weight = name.removeprefix("base_model.model.") + ".weight"
        A, B = module.lora_A["default"].weight, module.lora_B["default"].weight
        with torch.no_grad():
            A.copy_(0.1 * torch.randn(A.shape, generator=generator))
            if weight.endswith("q_proj.weight"):
                B.copy_(family.planted[weight].U[:, : B.shape[1]].float())
            else:
                B.copy_(0.05 * torch.randn(B.shape, generator=generator))
    peft_model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def fixtures(family, states, tmp_path_factory):
    """Local stand-ins for every checkpoint the recipes name."""
    root = tmp_path_factory.mktemp("recipe_fixtures")
    spec = FamilySpec()
    second = save_model(
        erode(states["aligned"], family.planted, erosion=0.3, seed=21),
        llama_config(spec),
        make_tokenizer(spec.vocab_size),
        str(root / "finetuned2"),
    )
    return {
        "base": family.base,
        "aligned": family.aligned,
        "finetuned": family.finetuned,
        "finetuned2": second,
        "adapter": build_adapter(family, str(root / "adapter")),
        # The aligned model with its planted safety component removed, plus an update of its own.
        "unaligned": save_model(
            erode(states["aligned"], family.planted, erosion=1.0, task_strength=0.2, seed=31),
            llama_config(spec),
            make_tokenizer(spec.vocab_size),
            str(root / "unaligned"),
        ),
        # The aligned model with more of its planted safety component, plus an update of its own.
        "safety": save_model(
            erode(states["aligned"], family.planted, erosion=-0.3, task_strength=0.1, seed=41),
            llama_config(spec),
            make_tokenizer(spec.vocab_size),
            str(root / "safety"),
        ),
    }


def substitute(recipe: str, fixtures: dict, out_dir: str) -> str:
    """The recipe with every HF ID replaced by its fixture, dtype float32, no out_dtype."""

    def swap(value):
        if isinstance(value, dict):
            return {k: swap(v) for k, v in value.items()}
        if isinstance(value, list):
            return [swap(v) for v in value]
        if isinstance(value, str) and any(part in PARTS for part in value.split("+")):
            return "+".join(fixtures[PARTS[part]] if part in PARTS else part for part in value.split("+"))
        return value

    with open(recipe) as f:
        documents = [swap(d) for d in yaml.safe_load_all(f)]
    for doc in documents:
        doc["dtype"] = "float32"
        doc.pop("out_dtype", None)
        if doc["merge_method"] == "dare_linear":
            # DARE's drops are random: compared here at density 1 (the formula around them);
            # the drops themselves are checked in tests/test_resta.py.
            for model in doc["models"]:
                model.setdefault("parameters", {})["density"] = 1.0
    path = os.path.join(out_dir, os.path.basename(recipe))
    with open(path, "w") as f:
        yaml.safe_dump_all(documents, f, sort_keys=False)
    return path


def test_there_are_recipes_for_every_workflow():
    methods = set()
    for recipe in RECIPES:
        with open(recipe) as f:
            methods.update(d["merge_method"] for d in yaml.safe_load_all(f))
    assert len(RECIPES) >= 5
    assert {"lox_extrapolate", "lssf_fusion", "safelora_project", "safemerge"} <= methods
    assert methods & {"ties", "task_arithmetic"}


@pytest.mark.parametrize("recipe", RECIPES, ids=os.path.basename)
def test_recipe_passes_check(recipe):
    report = check_recipe(recipe)
    assert report.problems == []
    # Offline, every hub ID is accepted and said so; each is one we can stand in for.
    hub_ids = {n.message.split(" ")[0] for n in report.notes}
    assert hub_ids and hub_ids <= set(PARTS), hub_ids - set(PARTS)


@pytest.mark.parametrize("recipe", RECIPES, ids=os.path.basename)
def test_recipe_runs_end_to_end_on_fixtures(recipe, fixtures, tmp_path):
    local = substitute(recipe, fixtures, str(tmp_path))
    report = check_recipe(local)
    assert report.problems == [] and report.notes == []  # every path is now local

    out = str(tmp_path / "out")
    cli.main(["run", local, out, "--quiet"])

    expected = recipe_reference.RecipeEvaluator(local)
    names = recipe_reference.stage_names(local)
    for name in names:
        stage_dir = out if name is None else os.path.join(out + ".intermediate", name)
        actual = load_state_dict(stage_dir)
        wanted = expected.output(name)
        assert set(actual) == set(wanted), stage_dir
        for tensor, value in actual.items():
            err = ref.rel_err(ref.f64(value), wanted[tensor])
            assert err < TOL, f"{os.path.basename(recipe)} stage {name or 'final'}: {tensor} rel err {err:.2e}"

    # The merge did something: the final output is not any one of its inputs.
    final = load_state_dict(out)
    for key in ("aligned", "finetuned"):
        source = load_state_dict(fixtures[key])
        assert any(not torch.equal(final[t], source[t]) for t in final), key


def adapter_cosines(fixtures) -> dict:
    """Float64 Safe LoRA cosine of every matrix the adapter fixture changes (SafeMERGE's too)."""
    base = recipe_reference.load_model(fixtures["base"])
    aligned = recipe_reference.load_model(fixtures["aligned"])
    tuned = recipe_reference.fold_lora(aligned, fixtures["adapter"])
    return {
        name: ref.safelora_cosine(tuned[name], aligned[name], base[name])
        for name in tuned
        if tuned[name].ndim == 2 and not np.array_equal(tuned[name], aligned[name])
    }


def test_safelora_recipe_exercises_both_decisions(fixtures):
    """The adapter fixture must make Safe LoRA keep some tensors and project others,
    with cosines clear of the threshold, or the end-to-end test proves less."""
    cosines = adapter_cosines(fixtures)
    assert cosines
    assert all(abs(c - 0.5) > 0.02 for c in cosines.values()), cosines
    kept = {n for n, c in cosines.items() if c > 0.5}
    assert kept and kept != set(cosines)
    assert all("q_proj" in n for n in kept)


def test_safemerge_recipe_exercises_both_decisions(fixtures):
    """At the recipe's threshold 0.35 the adapter fixture makes SafeMERGE keep its q_proj
    updates (in the safety subspace) and merge the others, with cosines clear of it."""
    with open(os.path.join(RECIPES_DIR, "safemerge-llama2-7b.yml")) as f:
        threshold = yaml.safe_load(f)["parameters"]["threshold"]
    cosines = adapter_cosines(fixtures)
    assert all(abs(c - threshold) > 0.02 for c in cosines.values()), cosines
    merged = {n for n, c in cosines.items() if c < threshold}
    assert merged and merged != set(cosines)
    assert not any("q_proj" in n for n in merged)
