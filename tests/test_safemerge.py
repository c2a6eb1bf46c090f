"""safemerge (SafeMERGE, arXiv 2503.17239): outputs vs float64 under plain `mergekit-yaml`,
in-process and in a `mergekit-multi` chain, both projections; the kernel's edge cases
(strict comparison, undefined cosines, 1-D tensors); the authors' cosine transcribed
(reference.safemerge_code_cosine) on LoRA factors; bad input at plan time."""

from __future__ import annotations

import os
import sys

import pytest
import reference as ref
from conftest import run_merge_recipe
from safelora_helpers import TOL, f64_state, reference_cosines, threshold_between

from mergekit_lox.demo.synthetic import FamilySpec, erode, llama_config, load_state_dict, make_tokenizer, save_model

SAFETY_WEIGHT = 0.3
BIN = os.path.dirname(sys.executable)


@pytest.fixture(scope="module")
def safety_model(family, states, tmp_path_factory):
    """The aligned model tuned further on "safety data": more of the planted safety
    component (erosion < 0) plus a small update of its own."""
    spec = FamilySpec()
    tuned = erode(states["aligned"], family.planted, erosion=-0.3, task_strength=0.1, seed=5)
    path = str(tmp_path_factory.mktemp("safemerge") / "safety")
    return save_model(tuned, llama_config(spec), make_tokenizer(spec.vocab_size), path)


@pytest.fixture(scope="module")
def f64(states, safety_model):
    return {
        **{role: f64_state(state) for role, state in states.items()},
        "safety": f64_state(load_state_dict(safety_model)),
    }


def recipe(family, safety_model, finetuned=None, **parameters) -> dict:
    return {
        "merge_method": "safemerge",
        "base_model": family.base,
        "models": [
            {"model": family.aligned, "parameters": {"role": "aligned"}},
            {"model": finetuned or family.finetuned, "parameters": {"role": "finetuned"}},
            {"model": safety_model, "parameters": {"role": "safety"}},
        ],
        "parameters": {"safety_weight": SAFETY_WEIGHT, **parameters},
        "dtype": "float32",
    }


def check_against_reference(out, f64, threshold, projection="scaled", rank=8, finetuned=None):
    """Every output tensor vs float64; returns the names the reference merges."""
    finetuned = finetuned or f64["finetuned"]
    merged = set()
    for name, W_f in finetuned.items():
        expected = ref.safemerge(
            W_f,
            f64["safety"][name],
            f64["aligned"][name],
            f64["base"][name],
            threshold,
            SAFETY_WEIGHT,
            projection,
            rank,
        )
        err = ref.rel_err(ref.f64(out[name]), expected)
        assert err < TOL, (name, err)
        if expected is not W_f:
            merged.add(name)
            # The merge really moved this tensor toward the safety model.
            assert ref.rel_err(ref.f64(out[name]), W_f) > 100 * TOL, name
    return merged


@pytest.mark.parametrize("projection,rank", [("scaled", 8), ("orthogonal", 4)])
def test_merge_matches_float64_reference(family, safety_model, f64, tmp_path, projection, rank):
    cosines = reference_cosines(f64["base"], f64["aligned"], f64["finetuned"], projection, rank)
    threshold = threshold_between(cosines)
    parameters = {"threshold": threshold, "projection": projection, "rank": rank}
    out = run_merge_recipe(recipe(family, safety_model, **parameters), tmp_path / "out")
    merged = check_against_reference(out, f64, threshold, projection, rank)
    assert merged == {name for name, cos in cosines.items() if cos < threshold}
    assert 0 < len(merged) < len(cosines)
