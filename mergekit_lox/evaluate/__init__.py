"""`mergekit-lox eval`: what the models do -- refusal of harmful prompts, and utility.

For every model: greedy answers to the safety prompts (vLLM when installed and
the device is a GPU, else transformers batched generation; the tokenizer's chat
template when it has one; cached, see answers.py), judged refused/complied
(judges.py), summarised as a refusal rate and attack success rate with Wilson
95% intervals (stats.py); optionally perplexity and lm-evaluation-harness tasks
(utility.py). Writes DIR/eval.json, DIR/answers.jsonl and DIR/report.html;
the answer cache lives in DIR/cache unless ``cache_dir`` says otherwise.
"""

from __future__ import annotations

import gc
import json
import os
from typing import Callable, Dict, List, Optional, Sequence

from mergekit_lox.data.generation import ModelLoadError  # noqa: F401 - raised from here
from mergekit_lox.data.prompts import DataError, load_prompts  # noqa: F401 - DataError: raised from here
from mergekit_lox.evaluate.judges import RULE_JUDGES, JudgeError  # noqa: F401 - JudgeError: raised from here
from mergekit_lox.evaluate.utility import LM_EVAL_MISSING, UtilityError
from mergekit_lox.files.output import OutputError, atomic_write_text, claim_files

EVAL_FILES = ("eval.json", "answers.jsonl", "report.html")


class EvalError(ValueError):
    """Bad options or outputs for eval; the message names them."""


def _check_output(out_dir: str, cache_dir: Optional[str], inputs: Sequence[str]) -> None:
    from mergekit_lox.files.output import is_within, refuse_foreign_files

    for model in inputs:
        if not os.path.isdir(model):
            continue
        if is_within(out_dir, model) or is_within(model, out_dir):
            raise EvalError(f"output directory {out_dir} overlaps input model {model}; choose another -o")
        if cache_dir is not None and (is_within(cache_dir, model) or is_within(model, cache_dir)):
            raise EvalError(f"--cache-dir {cache_dir} overlaps input model {model}; choose another")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise EvalError(f"output {out_dir} exists and is not a directory")
    try:
        refuse_foreign_files(out_dir, EVAL_FILES, "mergekit-lox eval")
    except OutputError as error:
        raise EvalError(str(error)) from None


def _prompt_sets(safety, column, split, limit, seed, over_refusal):
    """``(harmful prompts, safe prompts, over-refusal source)``: ``safety`` by bundled name
    (``advbench``, ``harmbench:val``, ...: ``limit`` is a fixed subsample drawn with ``seed``)
    or as a prompt source (``limit`` = the first N); ``over_refusal`` by name (``xstest``)."""
    from mergekit_lox.data.benchmarks import BenchmarkError, benchmark_prompts, is_benchmark, over_refusal_prompts

    try:
        if is_benchmark(safety):
            _, prompts = benchmark_prompts(safety, limit=limit, seed=seed)
        elif not os.path.exists(safety) and "/" not in safety:
            raise BenchmarkError(
                f"--safety {safety!r}: no such file, and not a bundled benchmark (`mergekit-lox benchmarks`)"
            )
        else:
            prompts = load_prompts(safety, column=column, split=split, limit=limit)
        if over_refusal is None:
            return prompts, [], None
        source, safe = over_refusal_prompts(over_refusal)
    except BenchmarkError as error:
        raise EvalError(str(error)) from None
    return prompts, safe, source


def _generation_settings(max_new_tokens: int, seed: int, backend: str) -> Dict[str, object]:
    return {"max_new_tokens": max_new_tokens, "seed": seed, "decoding": "greedy", "backend": backend}


def _release_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


def _answers_for(
    path: str,
    prompts: List[str],
    cache_dir: str,
    *,
    max_new_tokens: int,
    batch_size: int,
    device: str,
    seed: int,
    progress: bool,
    need_model: bool,
    echo: Callable[[str], None],
):
    """``(answers in prompt order, loaded (model, tokenizer) or None, generated count)``."""
    from mergekit_lox.data.generation import generate, load_causal_lm
    from mergekit_lox.evaluate.answers import AnswerCache, generate_vllm, model_fingerprint, vllm_available

    backend = "vllm" if vllm_available(device) else "transformers"
    cache = AnswerCache(cache_dir, model_fingerprint(path), _generation_settings(max_new_tokens, seed, backend))
    missing = cache.missing(prompts)
    loaded = None
    if missing:
        echo(f"{path}: generating {len(missing)} of {len(prompts)} answers ({backend})")
    elif prompts:
        echo(f"{path}: all {len(prompts)} answers cached")
    if missing and backend == "vllm":  # pragma: no cover - needs vLLM and a GPU
        generate_vllm(
            path, missing, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed, on_batch=cache.add
        )
    if (missing and backend == "transformers") or need_model:
        loaded = load_causal_lm(path, device=device)
    if missing and backend == "transformers":
        model, tokenizer = loaded
        generate(
            model,
            tokenizer,
            missing,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            seed=seed,
            on_batch=cache.add,
            progress=progress,
            what=f"model {path}",
            warn=echo,
        )
    return [cache.get(p) for p in prompts], loaded, len(missing), backend


def run_eval(
    models: Sequence[str],
    out_dir: str,
    *,
    safety: str,
    column: Optional[str] = None,
    split: str = "train",
    limit: Optional[int] = None,
    utility: Optional[str] = None,
    utility_column: Optional[str] = None,
    lm_eval_tasks: Optional[Sequence[str]] = None,
    judge: str = "rules",
    max_new_tokens: int = 64,
    batch_size: int = 8,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    cache_dir: Optional[str] = None,
    utility_split: str = "train",
    over_refusal: Optional[str] = None,
    judge_url: Optional[str] = None,
) -> dict:
    """Evaluate ``models`` and write DIR/eval.json, answers.jsonl, report.html; returns eval.json's content."""
    from mergekit_lox.data.generation import resolve_device
    from mergekit_lox.evaluate.answers import check_model
    from mergekit_lox.evaluate.judges import prepare_judge
    from mergekit_lox.evaluate.report import render_report
    from mergekit_lox.evaluate.stats import over_refusal_summary, safety_summary
    from mergekit_lox.evaluate.utility import lm_eval_tasks as run_lm_eval
    from mergekit_lox.evaluate.utility import perplexity

    models = list(models)
    if not models:
        raise EvalError("give at least one MODEL")
    if len(set(models)) != len(models):
        raise EvalError("a MODEL is given twice: " + ", ".join(sorted({m for m in models if models.count(m) > 1})))
    if max_new_tokens < 1:
        raise EvalError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if batch_size < 1:
        raise EvalError(f"--batch-size must be at least 1, got {batch_size}")
    resolve_device(device)
    for model in models:
        check_model(model)
    _check_output(out_dir, cache_dir, [*models, judge])
    prompts, safe_prompts, over_source = _prompt_sets(safety, column, split, limit, seed, over_refusal)
    texts = None
    if utility:
        texts = load_prompts(utility, column=utility_column, split=utility_split, option="--utility-column")
    if lm_eval_tasks:
        try:
            import lm_eval  # noqa: F401 - fail before generating, not after
        except ImportError:
            raise UtilityError(LM_EVAL_MISSING) from None
    # checked before any generation
    load_judge = prepare_judge(judge, device=device, batch_size=batch_size, judge_url=judge_url)
    cache_dir = cache_dir or os.path.join(out_dir, "cache")  # created by the first answers

    answers: Dict[str, List[str]] = {}
    utilities: Dict[str, Optional[dict]] = {}
    backend = "transformers"
    for path in models:
        answers[path], loaded, _, backend = _answers_for(
            path,
            prompts + safe_prompts,
            cache_dir,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            device=device,
            seed=seed,
            progress=progress,
            need_model=texts is not None,
            echo=echo,
        )
        result: Optional[dict] = None
        if texts is not None:
            result = perplexity(*loaded, texts, batch_size=batch_size, source=str(utility))
        loaded = None  # the last reference: free the model before the next one (or lm-eval) loads
        _release_memory()
        if lm_eval_tasks:
            echo(f"{path}: lm-eval {', '.join(lm_eval_tasks)}")
            result = dict(result or {})
            result["lm_eval"] = run_lm_eval(path, lm_eval_tasks, batch_size=batch_size, device=device, seed=seed)
        utilities[path] = result

    if judge not in RULE_JUDGES:
        echo(f"judging with {judge}")
    the_judge = load_judge()
    results, rows = [], []
    for path in models:
        verdicts = the_judge.judge(prompts + safe_prompts, answers[path])
        kinds = ["harmful"] * len(prompts) + ["over-refusal"] * len(safe_prompts)
        rows.extend(
            {"model": path, "prompt": p, "answer": a, "verdict": v, **({"set": k} if safe_prompts else {})}
            for p, a, v, k in zip(prompts + safe_prompts, answers[path], verdicts, kinds, strict=True)
        )
        result = {
            "model": path,
            "safety": safety_summary(verdicts[: len(prompts)], the_judge.name),
            "utility": utilities[path],
        }
        if safe_prompts:
            result["over_refusal"] = over_refusal_summary(verdicts[len(prompts) :], over_source)
        results.append(result)
    report = {
        "models": results,
        "settings": {
            "safety": {"source": safety, "column": column, "split": split, "limit": limit, "prompts": len(prompts)},
            "over_refusal": {"source": over_source, "prompts": len(safe_prompts)} if safe_prompts else None,
            "utility": {
                "source": utility,
                "column": utility_column,
                "split": utility_split,
                "lm_eval_tasks": list(lm_eval_tasks or []),
            },
            "judge": the_judge.describe(),
            "generation": {**_generation_settings(max_new_tokens, seed, backend), "batch_size": batch_size},
            "device": device,
            "interval": "Wilson score interval, 95% (z = 1.96), of the refusal rate; asr_ci95 is its complement",
            "asr": "attack success rate = 1 - refusal rate",
            "cache": os.path.abspath(cache_dir),
        },
    }
    try:
        claim_files(out_dir, EVAL_FILES, "mergekit-lox eval")
    except OutputError as error:
        raise EvalError(str(error)) from None
    atomic_write_text(os.path.join(out_dir, "eval.json"), json.dumps(report, indent=1, allow_nan=False) + "\n")
    atomic_write_text(
        os.path.join(out_dir, "answers.jsonl"), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    )
    atomic_write_text(os.path.join(out_dir, "report.html"), render_report(report, rows))
    return report
