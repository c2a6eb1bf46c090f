"""RESTA as shipped recipes of mergekit's own methods (recipes/resta-*.yml): the
task_arithmetic recipe equals theta_sft + beta (theta_aligned - theta_unaligned) in float64;
the dare_linear recipe's random drops, with mergekit's --random-seed, keep that formula around
a delta that is the fine-tune's own, entry by entry either dropped or scaled by one common
factor (mergekit 0.1.5 rescales to the delta's L1 norm), at about the recipe's density."""

from __future__ import annotations

import os

import numpy as np
import pytest
import reference as ref
import yaml
from conftest import run_merge_recipe

from mergekit_lox.demo.synthetic import FamilySpec, erode, llama_config, make_tokenizer, save_model

RECIPES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")
TOL = 1e-4


@pytest.fixture(scope="module")
def unaligned(family, states, tmp_path_factory):
    """The aligned model "fine-tuned on harmful data": its planted safety component removed."""
    spec = FamilySpec()
    tuned = erode(states["aligned"], family.planted, erosion=1.0, task_strength=0.2, seed=31)
    path = str(tmp_path_factory.mktemp("resta") / "unaligned")
    return save_model(tuned, llama_config(spec), make_tokenizer(spec.vocab_size), path)


def shipped(name: str, family, unaligned) -> dict:
    """The shipped recipe with its checkpoints replaced by the fixtures, in float32; returns
    the document and beta (minus the unaligned model's weight, as written in the file)."""
    with open(os.path.join(RECIPES, name)) as f:
        doc = yaml.safe_load(f)
    assert doc["base_model"] == "meta-llama/Llama-2-7b-chat-hf"
    sft, bad = doc["models"]
    assert sft["parameters"]["weight"] == 1.0 and bad["model"] == "your-name/Llama-2-7b-chat-unaligned"
    doc["base_model"], sft["model"], bad["model"] = family.aligned, family.finetuned, unaligned
    doc["dtype"] = "float32"
    doc.pop("out_dtype")
    return doc, -bad["parameters"]["weight"]


def test_resta_recipe_matches_float64(family, states, unaligned, tmp_path):
    doc, beta = shipped("resta-llama2-7b.yml", family, unaligned)
    assert beta > 0
    out = run_merge_recipe(doc, tmp_path / "out")
    bad = {
        n: ref.f64(t)
        for n, t in run_merge_recipe(
            {"merge_method": "passthrough", "models": [{"model": unaligned}], "dtype": "float32"}, tmp_path / "u"
        ).items()
    }
    for name, tensor in out.items():
        W_sft, W_a = ref.f64(states["finetuned"][name]), ref.f64(states["aligned"][name])
        expected = ref.resta(W_sft, W_a, bad[name], beta)
        assert ref.rel_err(ref.f64(tensor), expected) < TOL, name
        if tensor.ndim == 2:  # the safety vector was added
            assert ref.rel_err(ref.f64(tensor), W_sft) > 100 * TOL, name


def test_resta_dare_recipe_drops_only_the_finetune_delta(family, states, unaligned, tmp_path):
    doc, beta = shipped("resta-dare-llama2-7b.yml", family, unaligned)
    density = doc["models"][0]["parameters"]["density"]
    assert 0 < density < 1 and doc["models"][1]["parameters"]["density"] == 1.0
    out = run_merge_recipe(doc, tmp_path / "out", random_seed=5)
    again = run_merge_recipe(doc, tmp_path / "again", random_seed=5)
    bad = {
        n: ref.f64(t)
        for n, t in run_merge_recipe(
            {"merge_method": "passthrough", "models": [{"model": unaligned}], "dtype": "float32"}, tmp_path / "u"
        ).items()
    }
    kept_fractions = []
    for name, tensor in out.items():
        assert np.array_equal(tensor.numpy(), again[name].numpy()), name  # --random-seed reproduces it
        W_sft, W_a = ref.f64(states["finetuned"][name]), ref.f64(states["aligned"][name])
        delta = W_sft - W_a
        # What is left once the safety vector, kept whole, is taken out: the dropped delta.
        dropped = ref.f64(tensor) - ref.resta(W_a, W_a, bad[name], beta)
        kept = np.abs(dropped) > 0.5 * np.abs(delta)
        # mergekit's rescale: the kept entries times ||delta||_1 / ||kept delta||_1.
        scale = np.abs(delta).sum() / np.abs(delta[kept]).sum()
        assert 0.5 / density < scale < 2 / density, (name, scale)
        noise = 1e-6 * max(1.0, float(np.abs(W_a).max()))  # float32 rounding of the stored weights
        np.testing.assert_allclose(dropped[kept], scale * delta[kept], rtol=1e-4, atol=noise, err_msg=name)
        assert np.abs(dropped[~kept]).max(initial=0) < noise + 0.5 * np.abs(delta[~kept]).max(initial=0), name
        clear = np.abs(delta) > 1e-3 * np.abs(delta).max()  # entries well above float32 noise
        assert np.abs(dropped[clear & ~kept]).max(initial=0) < noise, name
        kept_fractions.append((kept & clear).sum() / clear.sum())
    # Bernoulli(density) over ~100k entries: within a few standard deviations of the density.
    assert abs(np.mean(kept_fractions) - density) < 0.02, kept_fractions
