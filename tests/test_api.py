"""mergekit_lox.api: merges and adapters on in-memory models, and Safe LoRA on a PeftModel.

Merges are compared with the float64 evaluation of the formulas (tests/reference.py);
adapters are loaded by PEFT and merged; `apply_safelora` must give the weights
`safelora-adapter` writes for the same adapter.
"""

from __future__ import annotations

import json
import os
import re

import pytest
import reference as ref
import torch
from safelora_helpers import f64_state, lora_scaling, reference_cosines, threshold_between
from safetensors.torch import load_file

from mergekit_lox import api

TOL = 1e-4
DOCS = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "api.md")


def load(path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)


@pytest.fixture(scope="module")
def modules(family):
    return {role: load(getattr(family, role)) for role in ("base", "aligned", "finetuned")}


def assert_all_close(actual: dict, expected: dict):
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert ref.rel_err(ref.f64(actual[name]), tensor) < TOL, name


def test_merges_match_float64_formulas(states, modules):
    f64 = {role: f64_state(state) for role, state in states.items()}
    base, aligned, finetuned = (f64[r] for r in ("base", "aligned", "finetuned"))
    out = api.lox(states["base"], states["aligned"], alpha=1.25, rank=6)
    assert_all_close(out, {n: ref.lox(aligned[n], base[n], 1.25, 6) for n in aligned})
    # nn.Modules give the same as their state dicts.
    from_modules = api.lox(modules["base"], modules["aligned"], alpha=1.25, rank=6)
    assert all(torch.equal(from_modules[n], out[n]) for n in out)

    out = api.lssf(modules["base"], modules["aligned"], modules["finetuned"], eta=0.8, top_weight=2.0)
    assert_all_close(out, {n: ref.lssf(finetuned[n], aligned[n], base[n], 1.0, 0.8, 0, 2.0) for n in finetuned})

    cosines = reference_cosines(base, aligned, finetuned, "scaled", 8)
    threshold = threshold_between(cosines)
    out = api.safelora(states["base"], states["aligned"], states["finetuned"], threshold=threshold)
    assert_all_close(out, {n: ref.safelora(finetuned[n], aligned[n], base[n], threshold) for n in finetuned})
    assert 0 < sum(not torch.equal(out[n], states["finetuned"][n]) for n in out) < len(cosines)

    safety = {n: aligned[n] + 0.5 * (aligned[n] - base[n]) for n in aligned}
    out = api.safemerge(
        states["base"],
        modules["aligned"],
        states["finetuned"],
        {n: torch.from_numpy(t).float() for n, t in safety.items()},
        threshold=threshold,
        safety_weight=0.4,
    )
    expected = {n: ref.safemerge(finetuned[n], safety[n], aligned[n], base[n], threshold, 0.4) for n in finetuned}
    assert_all_close(out, expected)
    assert 0 < sum(not torch.equal(out[n], states["finetuned"][n]) for n in out) < len(cosines)
    with pytest.raises(ValueError, match="threshold <= 1"):
        api.safemerge(states["base"], states["aligned"], states["finetuned"], states["aligned"], threshold=2.0)


def test_lox_adapter_in_memory_merges_to_lox(family, states, modules):
    from peft import get_peft_model, set_peft_model_state_dict

    adapter = api.lox_adapter(states["base"], states["aligned"], alpha=0.7, rank=3, model=modules["aligned"])
    assert adapter.config.r == 3 and adapter.left_out == {} and adapter.distance == 0.0
    peft_model = get_peft_model(load(family.aligned), adapter.config)
    set_peft_model_state_dict(peft_model, adapter.state_dict)
    merged = peft_model.merge_and_unload().state_dict()
    base, aligned = f64_state(states["base"]), f64_state(states["aligned"])
    assert_all_close(merged, {n: ref.lox(aligned[n], base[n], 0.7, 3) for n in aligned})


def test_lssf_adapter_written_loads_with_peft(family, states, modules, tmp_path):
    from peft import PeftModel

    out = str(tmp_path / "adapter")
    adapter = api.lssf_adapter(
        modules["base"], modules["aligned"], modules["finetuned"], eta=0.8, embeddings=False, out=out
    )
    assert list(adapter.left_out) == ["model.embed_tokens.weight"]
    merged = PeftModel.from_pretrained(load(family.finetuned), out).merge_and_unload().state_dict()
    f64 = {role: f64_state(state) for role, state in states.items()}
    expected = {n: ref.lssf(f64["finetuned"][n], f64["aligned"][n], f64["base"][n], 1.0, 0.8) for n in f64["base"]}
    expected["model.embed_tokens.weight"] = f64["finetuned"]["model.embed_tokens.weight"]  # left out
    assert_all_close(merged, expected)
    manifest = json.load(open(os.path.join(out, "mergekit_lox_adapter.json")))
    assert manifest["written_by"] == "mergekit_lox.api" and manifest["method"] == "lssf_fusion"
    assert manifest["distance"] == pytest.approx(adapter.distance) and adapter.distance > 0


@pytest.mark.parametrize("mode", ["threshold", "num_layers"])
def test_apply_safelora_gives_the_weights_of_safelora_adapter(family, states, lora_adapter, tmp_path, mode):
    from peft import PeftModel

    from mergekit_lox.safelora_tools import safelora_adapter

    tensors = {k: ref.f64(v) for k, v in load_file(os.path.join(lora_adapter, "adapter_model.safetensors")).items()}
    f64 = {role: f64_state(states[role]) for role in ("base", "aligned")}
    finetuned = ref.peft_lora_finetuned(f64["aligned"], tensors, lora_scaling)
    options = (
        {"threshold": threshold_between(reference_cosines(f64["base"], f64["aligned"], finetuned, "scaled", 8))}
        if mode == "threshold"
        else {"num_layers": 2}
    )
    out = str(tmp_path / "projected")
    written = safelora_adapter(family.base, family.aligned, lora_adapter, out, echo=lambda line: None, **options)
    expected = load_file(os.path.join(out, "adapter_model.safetensors"))

    peft_model = PeftModel.from_pretrained(load(family.aligned), lora_adapter)
    records = api.apply_safelora(peft_model, states["base"], states["aligned"], **options)
    assert {m.module: m.projected for m in records} == {m.module: m.projected for m in written}
    assert 0 < sum(m.projected for m in records) < len(records)
    state = peft_model.state_dict()
    for key, tensor in expected.items():
        stored = state[key.replace(".weight", ".default.weight")]
        assert ref.rel_err(ref.f64(stored), ref.f64(tensor)) < TOL, key


def test_docs_examples_run():
    """Every ```python block of docs/api.md, in order, in one namespace."""
    with open(DOCS, encoding="utf-8") as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    assert len(blocks) >= 5
    namespace: dict = {}
    for number, block in enumerate(blocks, 1):
        exec(compile(block, f"docs/api.md block {number}", "exec"), namespace)  # noqa: S102
    assert namespace["adapter"].distance == 0.0 and namespace["small"].config.r == 8
    assert any(m.projected for m in namespace["records"])


def test_bad_inputs_are_named(states, modules):
    from mergekit_lox.safelora_tools import SafeLoRAToolError

    short = dict(states["aligned"])
    del short["lm_head.weight"]
    with pytest.raises(ValueError, match="base and aligned hold different weights: lm_head.weight"):
        api.lox(states["base"], short)
    with pytest.raises(TypeError, match="must be an nn.Module"):
        api.lox_adapter(states["base"], states["aligned"])
    with pytest.raises(ValueError, match="0 < eta <= 1"):
        api.lssf(states["base"], states["aligned"], states["finetuned"], eta=0.0)
    with pytest.raises(SafeLoRAToolError, match="not both"):
        api.apply_safelora(None, states["base"], states["aligned"], threshold=0.5, num_layers=2)
