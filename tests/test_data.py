"""data/: prompt sources and generation, shared by lssf-calibrate and eval."""

from __future__ import annotations

import json

import pytest
import torch

from mergekit_lox.data.generation import ModelLoadError, chat_text, generate, load_causal_lm
from mergekit_lox.data.prompts import DataError, load_prompts, load_rows
from mergekit_lox.demo.synthetic import FamilySpec, llama_config, make_tokenizer, save_model


def write(path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_each_local_format_reads_the_same_prompts(tmp_path):
    prompts = ["w1 w2", "w3, with a comma", "w4"]
    jsonl = write(tmp_path / "p.jsonl", "".join(json.dumps({"goal": p, "target": "x"}) + "\n" for p in prompts))
    as_json = write(tmp_path / "p.json", json.dumps([{"prompt": p} for p in prompts]))
    plain = write(tmp_path / "p.json2.json", json.dumps(prompts))
    csv_file = write(tmp_path / "p.csv", "id,Question\n" + "".join(f'{i},"{p}"\n' for i, p in enumerate(prompts)))
    text = write(tmp_path / "p.txt", "\n".join(prompts) + "\n\n")
    for source in (jsonl, as_json, plain, csv_file, text):
        assert load_prompts(source) == prompts, source
    assert load_prompts(jsonl, limit=2) == prompts[:2]
    assert load_prompts(jsonl, column="target") == ["x"] * 3


def test_a_local_datasets_folder_and_its_split(tmp_path):
    import datasets

    folder = str(tmp_path / "saved")
    datasets.DatasetDict(
        {"test": datasets.Dataset.from_dict({"Goal": ["w1", "w2"], "Category": ["a", "b"]})}
    ).save_to_disk(folder)
    assert load_prompts(folder, split="test") == ["w1", "w2"]
    with pytest.raises(DataError, match=r"saved: no split 'train' \(--split\); it has test"):
        load_prompts(folder, split="train")


def test_bad_sources_name_the_source_and_the_option(tmp_path):
    jsonl = write(tmp_path / "p.jsonl", json.dumps({"a": "w1", "b": "w2"}) + "\n")
    with pytest.raises(DataError, match=r"p.jsonl: no column 'prompt' \(--column\); its columns are a, b"):
        load_prompts(jsonl, column="prompt")
    with pytest.raises(DataError, match=r"p.jsonl: which column holds the prompts\? give --column"):
        load_prompts(jsonl)
    empty = write(tmp_path / "empty.jsonl", "\n")
    with pytest.raises(DataError, match="empty.jsonl: holds no prompts"):
        load_prompts(empty)
    blank = write(tmp_path / "blank.jsonl", json.dumps({"prompt": "  "}) + "\n")
    with pytest.raises(DataError, match="column 'prompt' holds no non-empty prompts"):
        load_prompts(blank)
    broken = write(tmp_path / "broken.jsonl", '{"prompt": "w1"}\n{"prompt": \n')
    with pytest.raises(DataError, match="broken.jsonl: line 2 is not JSON"):
        load_rows(broken)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match="latin.txt: not UTF-8 text"):
        load_prompts(str(latin))
    with pytest.raises(DataError, match="missing.jsonl: no such file"):
        load_prompts(str(tmp_path / "missing.jsonl"))


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from transformers import LlamaForCausalLM

    spec = FamilySpec()
    torch.manual_seed(0)
    config = llama_config(spec)
    model = LlamaForCausalLM(config)
    return save_model(model.state_dict(), config, make_tokenizer(spec.vocab_size), str(tmp_path_factory.mktemp("lm")))


def test_generation_is_greedy_and_independent_of_batching(tiny_lm):
    model, tokenizer = load_causal_lm(tiny_lm)
    prompts = ["w1 w2 w3", "w4", "w5 w6"]
    batched = generate(model, tokenizer, prompts, max_new_tokens=5, batch_size=3)
    single = generate(model, tokenizer, prompts, max_new_tokens=5, batch_size=1)
    assert batched == single
    # Greedy: each answer is the argmax continuation, step by step.
    ids = tokenizer(prompts[1], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        for _ in range(5):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    expected = tokenizer.decode(ids[0, -5:], skip_special_tokens=True).strip()
    assert single[1] == expected
    seen = []
    generate(model, tokenizer, prompts, max_new_tokens=2, batch_size=2, on_batch=lambda p, a: seen.append(p))
    assert seen == [prompts[:2], prompts[2:]]


def test_chat_template_is_applied_when_the_tokenizer_has_one(tiny_lm):
    _, tokenizer = load_causal_lm(tiny_lm)
    assert chat_text(tokenizer, "w1") == "w1"
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    assert chat_text(tokenizer, "w1") == "<user>w1<assistant>"
    assert chat_text(tokenizer, "w1", "w2") == "<user>w1<assistant>w2"


def test_a_model_that_cannot_be_loaded_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match=r"model .*nowhere: no such directory"):
        load_causal_lm(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"cannot load judge .*empty"):
        load_causal_lm(str(tmp_path / "empty"), what="judge")
    with pytest.raises(ModelLoadError, match="--dtype 'float99' is not a torch dtype"):
        load_causal_lm(str(tmp_path / "empty"), dtype="float99")


@pytest.fixture(scope="module")
def mismatched_lm(tmp_path_factory):
    """Issue 23's case: a word-level tokenizer.json beside a qwen2 config. transformers 5
    loads it as the byte-level Qwen2Tokenizer, which encodes these words to nothing."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    path = str(tmp_path_factory.mktemp("qwen2-wordlevel"))
    Qwen2ForCausalLM(config).save_pretrained(path)
    make_tokenizer(64).save_pretrained(path)
    return path


def test_a_prompt_encoded_to_no_tokens_is_named_before_generating(mismatched_lm, tiny_lm, tmp_path, capsys):
    from conftest import run_cli

    _, tokenizer = load_causal_lm(mismatched_lm)
    assert tokenizer("w5 w6", add_special_tokens=False)["input_ids"] == []  # the precondition
    prompts = write(tmp_path / "p.txt", "w1 w2\nw5 w6\n")
    code, _, err = run_cli(["eval", mismatched_lm, "--safety", prompts, "-o", str(tmp_path / "out")], capsys)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"error: model {mismatched_lm}: tokenizer {type(tokenizer).__name__} encodes prompt 0")
    assert "IndexError" not in err and "out of bounds" not in err
    code, _, err = run_cli(
        ["lssf-calibrate", "--aligned", mismatched_lm, "--prompts", prompts, "-o", str(tmp_path / "sub")], capsys
    )
    assert code == 1 and f"aligned model {mismatched_lm}: tokenizer" in err and "encodes prompt 0" in err
    assert not (tmp_path / "sub").exists()


def test_a_tokenizer_that_loses_most_words_is_warned_about(tiny_lm):
    from mergekit_lox.data.generation import check_tokenizer

    _, tokenizer = load_causal_lm(tiny_lm)
    warnings = []
    check_tokenizer(tokenizer, ["w1 w2 w3", "w4 w5"], "model m", warnings.append)
    assert warnings == []
    # Words outside the word-level vocabulary become <unk>: 5 of 6 lost.
    check_tokenizer(tokenizer, ["how to make", "w4 cake now"], "model m", warnings.append)
    assert len(warnings) == 1 and "model m: tokenizer" in warnings[0] and "loses 5 of 6 words" in warnings[0]


def test_generation_stops_at_the_models_context(tmp_path):
    """Issue 26: lssf-calibrate's 128 new tokens ran past a short position table
    (`index out of range in self`); generation is capped there, and a prompt that fills
    the context is one error naming the prompts."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=96, n_embd=32, n_layer=1, n_head=2, n_positions=12, bos_token_id=1, eos_token_id=2)
    path = str(tmp_path / "gpt2")
    GPT2LMHeadModel(config).save_pretrained(path)
    make_tokenizer(96).save_pretrained(path)
    model, tokenizer = load_causal_lm(path)
    [answer] = generate(model, tokenizer, ["w1 w2 w3 w4"], max_new_tokens=128, what="model m")
    assert len(tokenizer(answer, add_special_tokens=False)["input_ids"]) <= 12 - 4  # no IndexError, capped
    with pytest.raises(
        ModelLoadError, match=r"model m: prompts 0 to 0 take 12 tokens, the model's whole context \(12\)"
    ):
        generate(model, tokenizer, [" ".join(f"w{i}" for i in range(12))], max_new_tokens=4, what="model m")
