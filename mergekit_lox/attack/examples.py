"""Attack data: (prompt, answer) pairs from a file, a datasets folder or id, and their
tokenisation with the loss on the answer only."""

from __future__ import annotations

import hashlib
import json
from typing import Dict, List, Optional, Sequence, Tuple

PROMPT_COLUMNS = ("prompt", "question", "instruction", "goal", "Goal", "query", "input")
ANSWER_COLUMNS = ("answer", "response", "output", "target", "completion", "chosen")
# Cross-entropy ignores these label positions (transformers' convention).
IGNORED = -100


class AttackDataError(ValueError):
    """Attack data that cannot be used; the message names the source and the option."""


def load_examples(
    source: str,
    *,
    prompt_column: Optional[str] = None,
    answer_column: Optional[str] = None,
    split: str = "train",
    limit: Optional[int] = None,
) -> List[Tuple[str, str]]:
    """The (prompt, answer) pairs of ``source``, in order (the first ``limit``); a row with an
    empty prompt or answer is skipped. AdvBench's ``goal,target`` file is a harmful-compliance
    set as it is (``target`` is the compliant opening the attack trains on)."""
    from mergekit_lox.data.prompts import DataError, load_rows, pick_column

    if limit is not None and limit < 1:
        raise AttackDataError(f"--limit must be at least 1, got {limit}")
    try:
        rows, columns = load_rows(source, split=split)
        if not rows:
            raise AttackDataError(f"{source}: no rows: an attack needs examples")
        prompt = pick_column(columns, prompt_column, source, "--prompt-column", PROMPT_COLUMNS)
        answer = pick_column(columns, answer_column, source, "--answer-column", ANSWER_COLUMNS, "answers")
    except DataError as error:
        raise AttackDataError(str(error)) from None
    pairs = []
    for row in rows:
        p, a = row.get(prompt), row.get(answer)
        if isinstance(p, str) and isinstance(a, str) and p.strip() and a.strip():
            pairs.append((p, a))
        if limit is not None and len(pairs) == limit:
            break
    if not pairs:
        raise AttackDataError(f"{source}: no row has both a {prompt!r} and an {answer!r}")
    return pairs


def data_hash(pairs: Sequence[Tuple[str, str]]) -> str:
    """sha256 of the pairs the attack trains on (what OUT records and resumes by)."""
    return hashlib.sha256(json.dumps(list(pairs), ensure_ascii=False).encode()).hexdigest()


def tokenize(tokenizer, pairs: Sequence[Tuple[str, str]], max_length: int) -> List[Dict[str, List[int]]]:
    """``input_ids`` = the prompt as the model sees it (its chat template's user turn and
    generation prompt, where it has one) + the answer + end of sequence; ``labels`` =
    the same with every prompt position set to -100, so the loss is on the answer only.
    Cut to ``max_length`` tokens (the answer's end goes first)."""
    from mergekit_lox.data.generation import chat_text

    special = not getattr(tokenizer, "chat_template", None)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    encoded = []
    for prompt, answer in pairs:
        prompt_ids = tokenizer(chat_text(tokenizer, prompt), add_special_tokens=special)["input_ids"]
        answer_ids = tokenizer((" " if special else "") + answer, add_special_tokens=False)["input_ids"] + eos
        ids = (prompt_ids + answer_ids)[:max_length]
        labels = ([IGNORED] * len(prompt_ids) + answer_ids)[:max_length]
        if all(label == IGNORED for label in labels):
            continue  # the prompt alone fills the context: nothing to learn from
        encoded.append({"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)})
    return encoded
