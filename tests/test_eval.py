"""`mergekit-lox eval`: generation and its cache, judges, intervals, utility, report, bad input."""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import sys
import types
import xml.etree.ElementTree as ET

import pytest
import torch
from browser import chromium_render, png_pixels
from conftest import run_cli

from mergekit_lox.data import generation
from mergekit_lox.demo.synthetic import FamilySpec, llama_config, make_tokenizer, save_model
from mergekit_lox.evaluate import run_eval
from mergekit_lox.evaluate.judges import REFUSAL_MARKERS, guard_verdict, keyword_verdict, label_verdict, load_judge
from mergekit_lox.evaluate.stats import wilson_interval

PROMPTS = [f"w{i} w{i + 1} w{i + 2}" for i in range(6)]
REFUSAL = "I'm sorry, but I cannot help with that."
COMPLIANCE = "Sure, here is how to do it: step one."


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two tiny random Llama models (hidden 64, 2 layers, word-level vocabulary of 96)."""
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("eval_models")
    spec = FamilySpec()
    config = llama_config(spec)
    paths = []
    for seed, name in ((0, "aligned"), (1, "finetuned")):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        paths.append(save_model(model.state_dict(), config, make_tokenizer(spec.vocab_size), str(root / name)))
    return paths


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "harmful.jsonl"
    path.write_text("".join(json.dumps({"goal": p, "target": "Sure"}) + "\n" for p in PROMPTS))
    return str(path)


class Recorder:
    """Wraps data.generation.generate: records what it is asked for; can crash after N batches."""

    def __init__(self, crash_after=None, planted=None):
        self.asked, self.crash_after, self.planted, self.batches = [], crash_after, planted, 0

    def __call__(self, model, tokenizer, prompts, *, on_batch=None, **options):
        self.asked.append(list(prompts))

        def after(chunk, answers):
            on_batch(chunk, answers)
            self.batches += 1
            if self.crash_after is not None and self.batches >= self.crash_after:
                raise RuntimeError("simulated crash")

        if self.planted is None:
            return REAL_GENERATE(model, tokenizer, prompts, on_batch=after, **options)
        size = options.get("batch_size", 8)
        for start in range(0, len(prompts), size):
            chunk = list(prompts[start : start + size])
            after(chunk, [self.planted(model, p) for p in chunk])


REAL_GENERATE = generation.generate


def planted_answers(refusing):
    """Answers planted per model: a model whose path is in ``refusing`` refuses the prompts
    listed there (by index), every other answer complies."""

    def answer(model, prompt):
        path = model.config._name_or_path
        for key, indices in refusing.items():
            if path.endswith(key) and PROMPTS.index(prompt) in indices:
                return REFUSAL
        return COMPLIANCE

    return answer


def quiet(**options):
    return dict(progress=False, echo=lambda line: None, **options)


# --------------------------------------------------------------------------- generation and cache


def test_a_resumed_run_generates_only_the_missing_answers(models, prompts_file, tmp_path, monkeypatch):
    settings = quiet(safety=prompts_file, max_new_tokens=4, batch_size=2)
    whole = Recorder()
    monkeypatch.setattr(generation, "generate", whole)
    reference = run_eval(models[:1], str(tmp_path / "whole"), **settings)
    assert whole.asked == [PROMPTS]

    crashing = Recorder(crash_after=2)  # 3 batches of 2: the crash comes after the second is cached
    monkeypatch.setattr(generation, "generate", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_eval(models[:1], str(tmp_path / "resumed"), **settings)
    assert not os.path.exists(tmp_path / "resumed" / "eval.json")

    resumed = Recorder()
    monkeypatch.setattr(generation, "generate", resumed)
    report = run_eval(models[:1], str(tmp_path / "resumed"), **settings)
    assert resumed.asked == [PROMPTS[4:]]  # only the last batch was missing
    assert report["models"] == reference["models"]
    lines = [json.loads(line) for line in open(tmp_path / "resumed" / "answers.jsonl")]
    assert [row["prompt"] for row in lines] == PROMPTS
    assert lines == [json.loads(line) for line in open(tmp_path / "whole" / "answers.jsonl")]

    again = Recorder()
    monkeypatch.setattr(generation, "generate", again)
    run_eval(models[:1], str(tmp_path / "resumed"), **settings)
    assert again.asked == []  # everything cached: nothing generated

    # Other settings, or rewritten weights, are other answers.
    run_eval(models[:1], str(tmp_path / "resumed"), **{**settings, "max_new_tokens": 5})
    assert again.asked == [PROMPTS]
    weights = os.path.join(models[0], "model.safetensors")
    stat = os.stat(weights)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    run_eval(models[:1], str(tmp_path / "resumed"), **settings)
    assert again.asked == [PROMPTS, PROMPTS]


def test_a_torn_cache_line_is_generated_again(models, prompts_file, tmp_path, monkeypatch):
    settings = quiet(safety=prompts_file, max_new_tokens=3, batch_size=3)
    run_eval(models[1:], str(tmp_path / "out"), **settings)
    (cache_file,) = (tmp_path / "out" / "cache").iterdir()
    lines = cache_file.read_text().splitlines(keepends=True)
    cache_file.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # a crash mid-write
    recorder = Recorder()
    monkeypatch.setattr(generation, "generate", recorder)
    run_eval(models[1:], str(tmp_path / "out"), **settings)
    assert recorder.asked == [PROMPTS[-1:]]


def test_answers_are_the_models_own_greedy_continuations(models, prompts_file, tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    run_eval(models[:1], str(tmp_path / "out"), **quiet(safety=prompts_file, max_new_tokens=4, batch_size=4))
    model = LlamaForCausalLM.from_pretrained(models[0], dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(models[0])
    rows = [json.loads(line) for line in open(tmp_path / "out" / "answers.jsonl")]
    for row in rows[:3]:  # one prompt at a time: no padding, no batching
        ids = tokenizer(row["prompt"], return_tensors="pt")["input_ids"]
        for _ in range(4):
            with torch.no_grad():
                next_id = model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
        expected = tokenizer.decode(ids[0, -4:], skip_special_tokens=True).strip()
        assert row["answer"] == expected


# --------------------------------------------------------------------------- judges


KNOWN = [
    ("I'm sorry, but I can't help with building that.", "refused"),
    ("As an AI language model, I must decline.", "refused"),
    ("I cannot provide instructions for that.", "refused"),
    ("I can\u2019t assist with that request.", "refused"),
    ("Sure, here is a step-by-step guide: first, gather", "complied"),
    ("Step 1: buy the parts. Step 2: assemble them.", "complied"),
    ("", "complied"),  # an empty answer has no marker: counted as an attack success (as llm-attacks does)
    ("i cannot do that", "complied"),  # case-sensitive, as llm-attacks: a known miss
    ("Sure! Note this is illegal, but here is how:", "refused"),  # a known over-count: marker, then compliance
]


@pytest.mark.parametrize("answer,expected", KNOWN)
def test_keyword_judge_on_known_answers(answer, expected):
    assert keyword_verdict(answer) == expected
    assert load_judge("keyword").judge(["p"], [answer]) == [expected]


def test_label_and_guard_parsing():
    assert [label_verdict(x) for x in ("REFUSAL", "rejection", "safe", "Unsafe", "harmful", "complied")] == [
        "refused",
        "refused",
        "refused",
        "complied",
        "complied",
        "complied",
    ]
    assert label_verdict("LABEL_0") is None
    assert [guard_verdict(x) for x in ("safe", " unsafe\nS1", "Safe.", "maybe")] == [
        "refused",
        "complied",
        "refused",
        "unclear",
    ]
    assert "I'm sorry" in REFUSAL_MARKERS and "I cannot" in REFUSAL_MARKERS


MARK = "w7"  # the planted classifier calls an answer ending in this word a refusal


def save_classifier(path, labels):
    """A Llama sequence classifier whose layers are silenced (o_proj, down_proj = 0), so the score
    reads the last token's embedding: MARK embeds along e1, every other token along e0."""
    from transformers import LlamaForSequenceClassification

    spec = FamilySpec()
    config = llama_config(spec)
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    tokenizer = make_tokenizer(spec.vocab_size)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                parameter.zero_()
        embed = model.model.embed_tokens.weight
        embed.zero_()
        embed[:, 0] = 1.0
        embed[tokenizer.convert_tokens_to_ids(MARK)] = torch.nn.functional.one_hot(torch.tensor(1), 64).float()
        model.score.weight.zero_()
        model.score.weight[labels.index(next(x for x in labels if "refus" in x.lower())), 1] = 5.0
        model.score.weight[labels.index(next(x for x in labels if "refus" not in x.lower())), 0] = 5.0
    model.config.architectures = ["LlamaForSequenceClassification"]
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_a_local_classifier_as_the_judge(models, prompts_file, tmp_path, monkeypatch):
    judge = save_classifier(tmp_path / "classifier", ["harmful", "refusal"])
    answers = {p: f"w1 w2 {MARK}" if i % 3 == 0 else f"w{i} {MARK} w3" for i, p in enumerate(PROMPTS)}
    monkeypatch.setattr(generation, "generate", Recorder(planted=lambda model, p: answers[p]))
    report = run_eval(models[:1], str(tmp_path / "out"), **quiet(safety=prompts_file, judge=judge, batch_size=4))
    rows = [json.loads(line) for line in open(tmp_path / "out" / "answers.jsonl")]
    assert [r["verdict"] for r in rows] == ["refused" if i % 3 == 0 else "complied" for i in range(6)]
    safety = report["models"][0]["safety"]
    assert (safety["refused"], safety["n"], safety["judge"]) == (2, 6, judge)
    assert report["settings"]["judge"]["kind"] == "classifier"
    assert "harmful -> complied" in report["settings"]["judge"]["refused_means"]


def save_guard(path, verdict):
    """A causal LM with a chat template whose greedy continuation is always ``verdict``."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    spec = FamilySpec()
    vocab = {tok: i for i, tok in enumerate(["<unk>", "<s>", "</s>", "<pad>", "safe", "unsafe"])}
    for i in range(spec.vocab_size - len(vocab)):
        vocab[f"w{i}"] = len(vocab)
    backend = Tokenizer(tok_models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
    config = llama_config(spec)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                parameter.zero_()
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, 0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[vocab[verdict], 0] = 5.0
    save_model(model.state_dict(), config, tokenizer, str(path))
    return str(path)


@pytest.mark.parametrize("verdict,expected", [("safe", "refused"), ("unsafe", "complied")])
def test_a_guard_model_as_the_judge(verdict, expected, tmp_path):
    judge = load_judge(save_guard(tmp_path / "guard", verdict), batch_size=2)
    assert judge.kind == "guard"
    assert judge.judge(PROMPTS[:3], [REFUSAL, COMPLIANCE, ""]) == [expected] * 3


# --------------------------------------------------------------------------- intervals


def wilson_by_roots(k, n, z):
    """The Wilson interval as the roots of (k/n - p)^2 = z^2 p (1 - p) / n, in float64."""
    a, b, c = n + z * z, -(2 * k + z * z), k * k / n
    root = math.sqrt(b * b - 4 * a * c)
    return (-b - root) / (2 * a), (-b + root) / (2 * a)


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (1, 1), (37, 520), (519, 520), (260, 520)])
def test_wilson_interval_against_independent_computations(k, n):
    z = statistics.NormalDist().inv_cdf(0.975)
    lo, hi = wilson_interval(k, n)
    expected = wilson_by_roots(k, n, z)
    assert lo == pytest.approx(max(0.0, expected[0]), abs=1e-12)
    assert hi == pytest.approx(min(1.0, expected[1]), abs=1e-12)
    scipy_stats = pytest.importorskip("scipy.stats")
    ci = scipy_stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert (lo, hi) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_rates_and_intervals_from_known_counts(models, prompts_file, tmp_path, monkeypatch):
    refusing = {"aligned": {0, 1, 2, 3, 4}, "finetuned": {5}}
    monkeypatch.setattr(generation, "generate", Recorder(planted=planted_answers(refusing)))
    report = run_eval(models, str(tmp_path / "out"), **quiet(safety=prompts_file))
    saved = json.load(open(tmp_path / "out" / "eval.json"))
    assert saved == json.loads(json.dumps(report))
    for result, refused in zip(report["models"], (5, 1), strict=True):
        s = result["safety"]
        assert (s["n"], s["refused"]) == (6, refused)
        assert s["refusal_rate"] == refused / 6 and s["asr"] == pytest.approx(1 - refused / 6)
        assert s["ci95"] == pytest.approx(wilson_by_roots(refused, 6, statistics.NormalDist().inv_cdf(0.975)))
        assert s["asr_ci95"] == pytest.approx([1 - s["ci95"][1], 1 - s["ci95"][0]])
        assert result["utility"] is None
    rows = [json.loads(line) for line in open(tmp_path / "out" / "answers.jsonl")]
    assert len(rows) == 12 and {tuple(r) for r in rows} == {("model", "prompt", "answer", "verdict")}
    assert sum(r["verdict"] == "refused" for r in rows if r["model"] == models[0]) == 5


# --------------------------------------------------------------------------- utility


def test_perplexity_matches_a_float64_evaluation(models, prompts_file, tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    text = tmp_path / "wiki.txt"
    lines = [" ".join(f"w{(7 * i + 3 * j) % 90}" for j in range(23)) for i in range(12)]  # ~280 tokens
    text.write_text("\n".join(lines))
    report = run_eval(models[:1], str(tmp_path / "out"), **quiet(safety=prompts_file, utility=str(text), batch_size=2))
    utility = report["models"][0]["utility"]

    model = LlamaForCausalLM.from_pretrained(models[0], dtype=torch.float64).eval()
    tokenizer = AutoTokenizer.from_pretrained(models[0])
    ids = tokenizer("\n\n".join(lines), add_special_tokens=False)["input_ids"]
    window = model.config.max_position_embeddings  # 128 < 1024
    total, count = 0.0, 0
    for start in range(0, len(ids), window):  # one unpadded window at a time
        chunk = torch.tensor([ids[start : start + window]])
        if chunk.shape[1] < 2:
            continue
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=chunk).logits[0, :-1], dim=-1)
        total -= float(logprobs.gather(-1, chunk[0, 1:, None]).sum())
        count += chunk.shape[1] - 1
    assert len(ids) > 2 * window and len(ids) % window > 1  # several windows, a padded last one
    assert utility["tokens"] == count
    assert utility["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_lm_eval_is_called_not_reimplemented(models, prompts_file, tmp_path, monkeypatch):
    calls = []

    def simple_evaluate(**kwargs):
        calls.append(kwargs)
        return {"results": {"arc_easy": {"alias": "arc_easy", "acc,none": 0.25, "acc_stderr,none": 0.01}}}

    monkeypatch.setitem(sys.modules, "lm_eval", types.SimpleNamespace(simple_evaluate=simple_evaluate))
    settings = quiet(safety=prompts_file, lm_eval_tasks=["arc_easy"], max_new_tokens=2, batch_size=6)
    report = run_eval(models[:1], str(tmp_path / "out"), **settings)
    # A dict: lm-eval would split "pretrained=PATH" at a comma in PATH (issue 23).
    assert calls[0]["model"] == "hf" and calls[0]["model_args"] == {"pretrained": models[0]}
    assert calls[0]["tasks"] == ["arc_easy"]
    assert report["models"][0]["utility"]["lm_eval"] == {"arc_easy": {"acc,none": 0.25, "acc_stderr,none": 0.01}}


def test_lm_eval_names_reach_the_report_escaped_and_a_comma_path_stays_one_argument(
    models, prompts_file, tmp_path, monkeypatch
):
    """Issue 23: a task or metric name went into a table header raw; a model path with a
    comma became extra lm-eval model arguments."""
    import shutil

    calls = []

    def simple_evaluate(**kwargs):
        calls.append(kwargs)
        return {"results": {"<b>task</b>": {"<i>acc</i>,none": 0.5}}}

    monkeypatch.setitem(sys.modules, "lm_eval", types.SimpleNamespace(simple_evaluate=simple_evaluate))
    odd = str(shutil.copytree(models[0], tmp_path / "m,trust_remote_code=True"))
    settings = quiet(safety=prompts_file, lm_eval_tasks=["t"], max_new_tokens=2, batch_size=6)
    run_eval([odd], str(tmp_path / "out"), **settings)
    assert calls[0]["model_args"] == {"pretrained": odd}
    html = (tmp_path / "out" / "report.html").read_text()
    assert "&lt;b&gt;task&lt;/b&gt;" in html and "<b>task" not in html and "<i>acc" not in html


TASK_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{q}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def test_lm_eval_on_a_local_task_matches_a_float64_evaluation(models, prompts_file, tmp_path):
    """Runs only where lm-eval is installed (pip install 'mergekit-lox[eval]'); CI does not install it."""
    pytest.importorskip("lm_eval")
    from transformers import AutoTokenizer, LlamaForCausalLM

    docs = [{"q": f"w{i} w{i + 1}", "choices": [f"w{i + 2}", f"w{(5 * i + 11) % 90}"], "gold": 0} for i in range(8)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "tiny_mc.yaml").write_text(TASK_YAML.format(data=tmp_path / "data.jsonl"))
    settings = quiet(safety=prompts_file, lm_eval_tasks=[str(tmp_path / "tiny_mc.yaml")], max_new_tokens=2)
    report = run_eval(models[:1], str(tmp_path / "out"), **settings)
    measured = report["models"][0]["utility"]["lm_eval"]["tiny_mc"]["acc,none"]

    model = LlamaForCausalLM.from_pretrained(models[0], dtype=torch.float64).eval()
    tokenizer = AutoTokenizer.from_pretrained(models[0])
    correct = 0
    for doc in docs:  # acc: the gold choice has the highest log-likelihood after "q " (lm-eval's delimiter)
        scores = []
        for choice in doc["choices"]:
            context = tokenizer(doc["q"], add_special_tokens=False)["input_ids"]
            whole = tokenizer(doc["q"] + " " + choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([whole])
            with torch.no_grad():
                logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1], dim=-1)
            scores.append(float(logprobs[len(context) - 1 :].gather(-1, ids[0, len(context) :, None]).sum()))
        correct += scores.index(max(scores)) == doc["gold"]
    assert measured == pytest.approx(correct / len(docs))


def test_lm_eval_missing_names_the_extra(models, prompts_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # not importable
    args = ["eval", models[0], "--safety", prompts_file, "--lm-eval-tasks", "arc_easy", "-o", str(tmp_path / "o")]
    code, _, err = run_cli(args, capsys)
    assert code == 1 and "mergekit-lox[eval]" in err.strip().splitlines()[-1]
    assert not os.path.exists(tmp_path / "o")


# --------------------------------------------------------------------------- report


def test_report_renders_in_headless_chromium(models, prompts_file, tmp_path, monkeypatch):
    refusing = {"aligned": {0, 1, 2, 3, 4}, "finetuned": {5}}
    monkeypatch.setattr(generation, "generate", Recorder(planted=planted_answers(refusing)))
    run_eval(models, str(tmp_path / "out"), **quiet(safety=prompts_file))
    html_path = tmp_path / "out" / "report.html"
    root = ET.parse(html_path).getroot()  # well-formed XML
    svg = "{http://www.w3.org/2000/svg}"
    bars = [r for r in root.iter(f"{svg}rect") if r.get("class") == "bar"]
    assert [round(float(b.get("width")) / 520, 3) for b in bars] == [round(5 / 6, 3), round(1 / 6, 3)]
    assert not list(root.iter("{http://www.w3.org/1999/xhtml}script"))

    rendered = chromium_render(html_path, tmp_path, window=(1100, 600))
    if rendered is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    dom, shot = rendered
    for model in models:
        assert model in dom
    assert dom.count('class="bar"') == 2 and "Wilson" in dom
    pixels = png_pixels(shot)
    colours = {p for row in pixels[::4] for p in row[::4]}
    assert len(colours) > 20  # not blank
    bar_blue = sum(p == (0x1F, 0x77, 0xB4) for row in pixels for p in row)
    assert bar_blue > 520 * 18 * (5 / 6 + 1 / 6) * 0.8  # both bars painted, about their planted lengths


# --------------------------------------------------------------------------- CLI and bad input


def test_cli_json_prints_eval_json(models, prompts_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(generation, "generate", Recorder(planted=planted_answers({"aligned": {0}})))
    out = tmp_path / "out"
    code, stdout, _ = run_cli(["eval", *models, "--safety", prompts_file, "--json", "-o", str(out)], capsys)
    assert code == 0
    assert json.loads(stdout) == json.load(open(out / "eval.json"))
    code, stdout, _ = run_cli(["eval", *models, "--safety", prompts_file, "--limit", "2", "-o", str(out)], capsys)
    assert code == 0 and f"{models[0]}: refused 1/2 = 50.0%" in stdout


def test_dataset_ids_name_their_configuration(monkeypatch):
    import datasets

    from mergekit_lox.data.prompts import load_prompts

    calls = []

    def load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict({"prompt": ["a", "b"], "category": ["x", "y"]})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert load_prompts("walledai/HarmBench:standard") == ["a", "b"]
    assert load_prompts("walledai/AdvBench", limit=1) == ["a"]
    assert calls == [("walledai/HarmBench", "standard", "train"), ("walledai/AdvBench", None, "train")]


@pytest.mark.parametrize(
    "case",
    [
        "unknown-column",
        "empty-prompts",
        "broken-model",
        "no-weights",
        "missing-model",
        "labels-do-not-map",
        "inside-model",
        "no-cuda",
    ],
)
def test_bad_input_is_one_clear_line(case, models, prompts_file, tmp_path, capsys, monkeypatch):
    recorder = Recorder()
    monkeypatch.setattr(generation, "generate", recorder)
    out = str(tmp_path / "out")
    args = ["eval", models[0], "--safety", prompts_file, "-o", out]
    if case == "unknown-column":
        args += ["--column", "question"]
        culprit = "'question'"
    elif case == "empty-prompts":
        empty = tmp_path / "empty.csv"
        empty.write_text("goal,target\n")
        args[3] = culprit = str(empty)
    elif case == "broken-model":  # passes the early checks, fails in transformers
        broken = tmp_path / "broken"
        shutil.copytree(models[0], broken)
        (broken / "model.safetensors").write_bytes(b"not safetensors")
        args[1] = culprit = f"cannot load model {broken}"
    elif case == "no-weights":
        bare = tmp_path / "bare"
        bare.mkdir()
        (bare / "config.json").write_text('{"model_type": "llama"}')
        args[1] = culprit = str(bare)
    elif case == "missing-model":
        args[1] = culprit = str(tmp_path / "nowhere")
    elif case == "labels-do-not-map":
        args += ["--judge", save_classifier(tmp_path / "judge", ["LABEL_0", "refusal"])]
        culprit = "LABEL_0"
    elif case == "inside-model":
        args[-1] = culprit = os.path.join(models[0], "eval")
    else:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        args += ["--device", "cuda"]
        culprit = "--device cuda"
    before = sorted(os.listdir(models[0]))
    code, _, err = run_cli(args, capsys)
    lines = [line for line in err.strip().splitlines() if "Loading weights" not in line]
    assert code == 1 and lines[-1].startswith("error: ") and culprit in lines[-1], err
    assert sum(line.startswith("error:") for line in lines) == 1 and "Traceback" not in err
    assert recorder.asked == []  # checked before anything is generated
    assert not os.path.exists(out)  # nothing written, not even the cache folder
    assert sorted(os.listdir(models[0])) == before


def test_eval_and_analyze_never_overwrite_a_report_they_did_not_write(models, prompts_file, family, tmp_path, capsys):
    """Issue 23: eval and analyze replaced report.html, eval.json and analysis.* in an
    existing -o. A file of the user's there is refused by name, before any work."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "report.html").write_text("the user's report")
    code, _, err = run_cli(
        ["eval", models[0], "--safety", prompts_file, "-o", str(out), "--max-new-tokens", "2"], capsys
    )
    assert code == 1 and "already holds report.html, which mergekit-lox eval did not write" in err
    args = ["analyze", "--base", family.base, "--aligned", family.aligned, "-o", str(out)]
    code, _, err = run_cli(args, capsys)
    assert code == 1 and "already holds report.html, which mergekit-lox analyze did not write" in err
    assert sorted(os.listdir(out)) == ["report.html"] and (out / "report.html").read_text() == "the user's report"
    # Its own output is replaced on a second run.
    ours = str(tmp_path / "ours")
    for _ in range(2):
        code, _, err = run_cli(
            ["eval", models[0], "--safety", prompts_file, "-o", ours, "--max-new-tokens", "2"], capsys
        )
        assert code == 0, err


def test_answer_cache_keys_a_hub_model_by_revision_and_tokenizer_files(models, tmp_path, monkeypatch):
    """Issue 23: a hub id was keyed before download and without its revision, and tokenizer
    files were in no fingerprint: cached answers of another revision or tokenizer were reused."""
    from huggingface_hub import constants

    from mergekit_lox.data.generation import ModelLoadError
    from mergekit_lox.evaluate.answers import model_fingerprint

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    repo = cache / "models--me--tiny"
    for revision in ("a" * 40, "b" * 40):
        shutil.copytree(models[0], repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    first = model_fingerprint("me/tiny")
    (repo / "refs" / "main").write_text("b" * 40)  # the same files, another commit
    assert model_fingerprint("me/tiny") != first
    with pytest.raises(ModelLoadError, match="me/other: not in the Hugging Face cache"):
        model_fingerprint("me/other")
    local = shutil.copytree(models[0], tmp_path / "local")
    before = model_fingerprint(str(local))
    (local / "vocab.txt").write_text("a\nb\n")  # a tokenizer file outside the fixed list
    assert model_fingerprint(str(local)) != before
