"""Utility: perplexity on a text source, lm-evaluation-harness tasks.

Perplexity: the source's texts are joined with blank lines, tokenized once and
cut into consecutive, non-overlapping windows of ``min(model context, 1024)``
tokens; perplexity = exp(total negative log-likelihood / predicted tokens),
where every token but each window's first is predicted.
Benchmarks are lm-evaluation-harness's (``pip install 'mergekit-lox[eval]'``),
called through ``lm_eval.simple_evaluate(model="hf", ...)``, never re-implemented.
"""

from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Sequence

MAX_WINDOW = 1024
LM_EVAL_MISSING = "--lm-eval-tasks needs lm-evaluation-harness: pip install 'mergekit-lox[eval]'"


class UtilityError(ValueError):
    """Utility cannot be measured as asked; the message names the source or extra."""


def windows(token_ids: List[int], size: int) -> List[List[int]]:
    """Consecutive windows of ``size`` tokens; a last window of one token predicts nothing and is dropped."""
    cut = [token_ids[i : i + size] for i in range(0, len(token_ids), size)]
    return [w for w in cut if len(w) > 1]


def context_length(model) -> int:
    length = getattr(model.config, "max_position_embeddings", None) or MAX_WINDOW
    return max(2, min(int(length), MAX_WINDOW))


def perplexity(model, tokenizer, texts: Sequence[str], *, batch_size: int = 8, source: str = "") -> Dict[str, float]:
    """``{"perplexity", "tokens", "nll"}``: mean NLL in nats per predicted token and its exp."""
    import torch

    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    chunks = windows(ids, context_length(model))
    if not chunks:
        raise UtilityError(f"{source}: fewer than 2 tokens of text, no perplexity")
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(chunks), max(1, batch_size)):
        batch = chunks[start : start + batch_size]
        width = max(len(c) for c in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, chunk in enumerate(batch):  # right-padded: positions start at 0 in every row
            input_ids[row, : len(chunk)] = torch.tensor(chunk)
            mask[row, : len(chunk)] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
        target = input_ids[:, 1:]
        picked = logprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        valid = mask[:, 1:].bool()
        total -= float(picked[valid].double().sum())
        count += int(valid.sum())
    nll = total / count
    return {"perplexity": math.exp(nll), "tokens": count, "nll": nll}


def _local_tasks(tasks: Sequence[str]) -> tuple:
    """Task names, with a local task file (``*.yaml``) replaced by the ``task:`` it defines;
    and the folders of those files, for lm-eval's ``include_path``."""
    import yaml

    names, folders = [], []
    for task in tasks:
        if not (task.endswith((".yaml", ".yml")) and os.path.isfile(task)):
            names.append(task)
            continue
        try:
            with open(task, encoding="utf-8") as f:
                config = yaml.safe_load(f)
        except (OSError, yaml.YAMLError) as error:
            raise UtilityError(f"--lm-eval-tasks {task}: cannot read ({' '.join(str(error).split())[:200]})") from None
        if not isinstance(config, dict) or not isinstance(config.get("task"), str):
            raise UtilityError(f"--lm-eval-tasks {task}: not an lm-eval task file (no 'task:' name)")
        names.append(config["task"])
        folders.append(os.path.dirname(os.path.abspath(task)))
    return names, sorted(set(folders))


def lm_eval_tasks(
    path: str, tasks: Sequence[str], *, batch_size: int, device: str, seed: int, limit: Optional[int] = None
) -> Dict[str, Dict[str, object]]:
    """lm-evaluation-harness's numbers per task: ``{task: {metric: value}}``.

    ``tasks`` are lm-eval task or group names, or paths to local task files
    (``.yaml``; their folders are given to lm-eval as ``include_path``)."""
    try:
        import lm_eval
    except ImportError:
        raise UtilityError(LM_EVAL_MISSING) from None
    names, folders = _local_tasks(tasks)
    options: Dict[str, object] = {}
    if folders:
        from lm_eval.tasks import TaskManager

        options["task_manager"] = TaskManager(include_path=folders)
    try:
        output = lm_eval.simple_evaluate(
            model="hf",
            # A dict, not "pretrained=PATH": lm-eval splits a string at commas and '=', so a
            # path holding one would become other model arguments.
            model_args={"pretrained": path},
            tasks=names,
            batch_size=batch_size,
            device=device,
            limit=limit,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
            **options,
        )
    except Exception as error:  # noqa: BLE001 - the harness raises many kinds; name the tasks
        text = " ".join(str(error).split())[:300]
        raise UtilityError(f"lm-eval on {path} (tasks {', '.join(names)}): {text}") from None
    results = (output or {}).get("results", {})
    table: Dict[str, Dict[str, object]] = {}
    for task, metrics in results.items():
        table[task] = {
            name: value
            for name, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        }
    return table
