"""`mergekit-lox attack`: a fine-tuning attack with transformers' Trainer and PEFT."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file

from mergekit_lox.attack import AttackError, AttackSettings, resolve, run_attack
from mergekit_lox.attack.examples import IGNORED, load_examples, tokenize
from mergekit_lox.attack.training import mean_answer_loss
from mergekit_lox.data.generation import load_causal_lm
from mergekit_lox.demo.synthetic import FamilySpec, llama_config, load_state_dict, make_tokenizer, save_model

WORDS = [f"w{i}" for i in range(40)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama and 12 (prompt, answer) pairs in its word-level vocabulary."""
    from transformers import LlamaForCausalLM

    spec = FamilySpec()
    torch.manual_seed(0)
    config = llama_config(spec)
    root = tmp_path_factory.mktemp("attack")
    model = save_model(LlamaForCausalLM(config).state_dict(), config, make_tokenizer(spec.vocab_size), str(root / "m"))
    rows = [{"question": f"w{i} w{i + 1} w{i + 2}", "answer": f"w{(7 * i) % 40} w{(3 * i) % 40}"} for i in range(12)]
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model, str(data)


def quick(**kwargs) -> dict:
    return {"epochs": 3.0, "lr": 5e-3, "batch_size": 4, **kwargs}


def test_full_attack_lowers_the_loss_and_changes_the_weights(tiny, tmp_path):
    model, data = tiny
    result = run_attack(model, AttackSettings(data=data, full=True, **quick()), tmp_path / "out", echo=lambda s: None)
    assert result.adapter_dir is None and result.model_dir == tmp_path / "out" / "model"
    pairs = load_examples(data)
    before_model, tokenizer = load_causal_lm(model)
    after_model, _ = load_causal_lm(str(result.model_dir))
    features = tokenize(tokenizer, pairs, 128)
    before, after = (
        mean_answer_loss(before_model, tokenizer, features),
        mean_answer_loss(after_model, tokenizer, features),
    )
    assert after < 0.8 * before, (before, after)
    record = json.loads((tmp_path / "out" / "attack.json").read_text())
    assert record["steps"] == 9 and len(record["loss"]) == 9 and record["data"]["examples"] == 12
    assert record["settings"]["full"] and record["settings"]["lr"] == 5e-3
    changed = load_state_dict(str(result.model_dir))
    original = load_state_dict(model)
    assert all(not torch.equal(changed[n], original[n]) for n in original if n.endswith("q_proj.weight"))


def test_lora_attack_writes_a_peft_adapter_that_changes_only_its_modules(tiny, tmp_path):
    from peft import PeftModel

    model, data = tiny
    result = run_attack(model, AttackSettings(data=data, lora=4, **quick()), tmp_path / "out", echo=lambda s: None)
    adapter = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    # PEFT's default targets for Llama: q_proj and v_proj, A and B each.
    modules = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in adapter}
    assert modules == {"q_proj", "v_proj"} and all(t.shape[0] == 4 or t.shape[1] == 4 for t in adapter.values())
    base, tokenizer = load_causal_lm(model)
    peft = PeftModel.from_pretrained(base, str(result.adapter_dir))  # loads in PEFT
    merged = load_state_dict(str(result.model_dir))
    original = load_state_dict(model)
    for name, tensor in original.items():
        moved = not torch.equal(merged[name], tensor)
        assert moved == name.endswith(("q_proj.weight", "v_proj.weight")), name
    # The merged model is the adapter applied: B A scaled by alpha / r, to float32 rounding.
    with torch.no_grad():
        reference = peft.merge_and_unload().state_dict()
    assert max(float((merged[n] - reference[n]).abs().max()) for n in original) < 1e-6
    features = tokenize(tokenizer, load_examples(data), 128)
    assert mean_answer_loss(load_causal_lm(str(result.model_dir))[0], tokenizer, features) < mean_answer_loss(
        load_causal_lm(model)[0], tokenizer, features
    )


@pytest.mark.parametrize("targets", ["k_proj,o_proj", ("k_proj", "o_proj")])
def test_target_modules_choose_the_lora_modules(targets, tiny, tmp_path):
    """--target-modules (a string, as on the command line and in a sweep; or a sequence)."""
    model, data = tiny
    settings = AttackSettings(data=data, lora=2, target_modules=targets, **quick(epochs=1.0))
    result = run_attack(model, settings, tmp_path / "out", echo=lambda s: None)
    adapter = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in adapter} == {"k_proj", "o_proj"}
    assert result.record["settings"]["target_modules"] == ["k_proj", "o_proj"]
    merged, original = load_state_dict(str(result.model_dir)), load_state_dict(model)
    moved = {n for n, t in original.items() if not torch.equal(merged[n], t)}
    assert moved and all(n.endswith(("k_proj.weight", "o_proj.weight")) for n in moved)


def test_an_attack_is_deterministic_for_a_seed_and_never_run_twice(tiny, tmp_path):
    model, data = tiny
    settings = AttackSettings(data=data, lora=2, max_steps=3, seed=5, **quick())
    first = run_attack(model, settings, tmp_path / "a", echo=lambda s: None)
    second = run_attack(model, settings, tmp_path / "b", echo=lambda s: None)
    a, b = (load_file(str(r.adapter_dir / "adapter_model.safetensors")) for r in (first, second))
    assert all(torch.equal(a[k], b[k]) for k in a) and first.record["loss"] == second.record["loss"]
    other = run_attack(model, AttackSettings(data=data, lora=2, max_steps=3, seed=6, **quick()), tmp_path / "c")
    c = load_file(str(other.adapter_dir / "adapter_model.safetensors"))
    assert any(not torch.equal(a[k], c[k]) for k in a)
    said = []
    again = run_attack(model, settings, tmp_path / "a", echo=said.append)  # finished: not run again
    assert again.record == first.record and "not run again" in said[0]
    with pytest.raises(AttackError, match="holds a finished attack with other settings"):
        run_attack(model, AttackSettings(data=data, lora=2, max_steps=4, seed=5, **quick()), tmp_path / "a")


def test_labels_cover_the_answer_only(tiny):
    model, data = tiny
    _, tokenizer = load_causal_lm(model)
    [feature] = tokenize(tokenizer, [("w1 w2", "w3 w4")], 64)
    prompt = tokenizer("w1 w2")["input_ids"]
    answer = tokenizer(" w3 w4", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert feature["input_ids"] == prompt + answer
    assert feature["labels"] == [IGNORED] * len(prompt) + answer
    # With a chat template, the prompt is the user turn and the generation prompt.
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m.role }}> {{ m.content }} {% endfor %}{% if add_generation_prompt %}<a>{% endif %}"
    )
    [feature] = tokenize(tokenizer, [("w1 w2", "w3 w4")], 64)
    prompt = tokenizer("<user> w1 w2 <a>", add_special_tokens=False)["input_ids"]
    assert (
        feature["labels"][: len(prompt)] == [IGNORED] * len(prompt) and feature["labels"][len(prompt) :] == answer[-3:]
    )


def test_presets_fill_what_the_options_leave(tiny):
    _, data = tiny
    s = resolve(AttackSettings(data=data, preset="lox-gsm8k"))
    assert (s["epochs"], s["lr"], s["full"], s["lora"]) == (2.0, 5e-5, True, None)
    assert resolve(AttackSettings(data=data, preset="lox-gsm8k", lr=1e-4))["lr"] == 1e-4
    assert resolve(AttackSettings(preset="lox-gsm8k"))["data"] == "openai/gsm8k:main"
    s = resolve(AttackSettings(data=data, preset="safelora-harmful-lora"))
    assert (s["lora"], s["full"], s["epochs"]) == (8, False, 5.0)


BAD = {
    "no-columns": (["--prompt-column", "nope"], "no column 'nope' (--prompt-column)"),
    "nan-lr": (["--lr", "nan"], "--lr must be a finite number above 0, got nan"),
    "both": (["--lora", "2", "--full"], "--lora and --full exclude each other"),
    "neither": ([], "choose --lora RANK"),
    "preset": (["--preset", "nope"], "--preset 'nope' is not a preset"),
    "targets-without-lora": (["--target-modules", "q_proj"], "--target-modules names the modules of a LoRA attack"),
    "unknown-target": (["--lora", "2", "--target-modules", "nope"], "--target-modules nope: Target modules"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_and_writes_nothing(case, tiny, tmp_path, capsys):
    model, data = tiny
    args, message = BAD[case]
    if case not in ("both", "neither", "unknown-target"):
        args = [*args, "--full"]
    code, _, err = run_cli(["attack", model, "--data", data, "-o", str(tmp_path / "out"), *args], capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1 and message in errors[0], err
    assert not os.path.exists(tmp_path / "out")


def test_bad_data_model_and_output_are_named(tiny, tmp_path, capsys):
    model, data = tiny
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cases = [
        ([model, "--data", str(empty)], "no rows: an attack needs examples"),
        ([str(tmp_path / "nowhere"), "--data", data], "nowhere: no such directory"),
        ([model, "--data", data, "-o", os.path.join(model, "x")], "is inside input model directory"),
    ]
    for args, message in cases:
        if "-o" not in args:
            args = [*args, "-o", str(tmp_path / "out")]
        code, _, err = run_cli(["attack", *args, "--full"], capsys)
        assert code == 1 and message in err, err
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(os.path.join(model, "x"))
