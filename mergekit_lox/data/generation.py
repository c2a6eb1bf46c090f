"""Causal LMs through transformers: loading with named errors, chat formatting, greedy generation.

vLLM is used by ``eval`` when it is installed and a GPU is present (evaluate/);
this module is the transformers path every command shares.
"""

from __future__ import annotations

import os
from typing import Callable, List, Optional, Sequence, Tuple


class ModelLoadError(ValueError):
    """A model or tokenizer cannot be loaded; the message names it."""


def resolve_device(device: str):
    import torch

    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ModelLoadError(f"--device {device!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {device}: CUDA is not available on this machine")
    return resolved


def load_causal_lm(path: str, *, device: str = "cpu", dtype: Optional[str] = None, what: str = "model") -> Tuple:
    """``(model, tokenizer)`` for a local folder or hub id, model in eval mode on ``device``.

    ``dtype`` names a torch dtype ("float32", "bfloat16", ...); default: float32 on
    CPU (half precision is slow and inexact there), the checkpoint's own on GPU.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = resolve_device(device)
    if dtype is None:
        torch_dtype = torch.float32 if target.type == "cpu" else "auto"
    else:
        torch_dtype = getattr(torch, dtype, None)
        if not isinstance(torch_dtype, torch.dtype):
            raise ModelLoadError(f"--dtype {dtype!r} is not a torch dtype (float32, bfloat16, float16)")
    if not os.path.exists(path) and (path.startswith((".", "/", "~")) or path.count("/") != 1):
        raise ModelLoadError(f"{what} {path}: no such directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, output_loading_info=True)
    except Exception as error:  # noqa: BLE001 - transformers/hub raise many kinds; name the model
        text = " ".join(str(error).split())[:300]
        raise ModelLoadError(f"cannot load {what} {path}: {text}") from None
    # transformers fills a tensor the checkpoint lacks (or holds in another shape) with random
    # values and goes on with a warning: answers, activations or a fine-tune of that model
    # would be reported as the checkpoint's. A damaged checkpoint is an error instead.
    damaged = list(info.get("missing_keys") or ()) + [k for k, *_ in info.get("mismatched_keys") or ()]
    if damaged:
        raise ModelLoadError(
            f"{what} {path}: the checkpoint lacks {len(damaged)} tensor(s) the model needs, or holds them in "
            f"another shape ({', '.join(sorted(damaged)[:3])}{' ...' if len(damaged) > 3 else ''}): transformers "
            "would fill them with random values; use a complete checkpoint"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(target).eval(), tokenizer


class TokenizerError(ModelLoadError):
    """A tokenizer that cannot encode the prompts; the message names the model and prompt."""


# A tokenizer that loses more than this share of the prompts' words (unknown tokens, or
# words that do not survive encode-decode) is most likely not the tokenizer the model was
# trained with: warned about, since some tokenizers legitimately normalise text.
MOSTLY_LOST = 0.5


def check_tokenizer(tokenizer, prompts: Sequence[str], what: str, warn: Callable[[str], None]) -> None:
    """Probe ``tokenizer`` on ``prompts`` before any generation or forward pass.

    A prompt that encodes to no tokens is an error naming the model, the tokenizer
    class and the prompt's index (transformers would fail later with an IndexError
    that names none of them: a custom word-level ``tokenizer.json`` beside a ``qwen2``
    config loads as a byte-level Qwen2Tokenizer and encodes every word to nothing).
    When most words of the prompts come back as the unknown token, or not at all from
    encode-decode, ``warn`` says so.
    """
    cls = type(tokenizer).__name__
    unk = getattr(tokenizer, "unk_token_id", None)
    words = lost = 0
    for index, prompt in enumerate(prompts):
        try:
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            decoded = tokenizer.decode([i for i in ids if i != unk], skip_special_tokens=True)
        except Exception as error:  # noqa: BLE001 - any tokenizer failure, named
            raise TokenizerError(
                f"{what}: tokenizer {cls} cannot encode prompt {index} ({type(error).__name__})"
            ) from None
        if prompt.strip() and not ids:
            raise TokenizerError(
                f"{what}: tokenizer {cls} encodes prompt {index} ({prompt[:40]!r}) to no tokens; "
                "the tokenizer files do not match the model (check tokenizer_config.json's tokenizer_class)"
            )
        prompt_words = prompt.lower().split()
        kept = decoded.lower()
        words += len(prompt_words)
        lost += sum(1 for w in prompt_words if w not in kept)
    if words and lost > MOSTLY_LOST * words:
        warn(
            f"warning: {what}: tokenizer {cls} loses {lost} of {words} words of the prompts "
            "(unknown tokens, or not recovered by decoding): is it the model's own tokenizer?"
        )


def context_length(model) -> Optional[int]:
    """The longest sequence the model's position table holds (None: no such limit known)."""
    config = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def chat_text(tokenizer, prompt: str, response: Optional[str] = None) -> str:
    """``prompt`` as the model sees it: the tokenizer's chat template when it has one
    (with the generation prompt, or followed by ``response``), else the prompt itself."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        if response is None:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        messages.append({"role": "assistant", "content": response})
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return prompt if response is None else f"{prompt} {response}"


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    seed: int = 0,
    on_batch: Optional[Callable[[List[str], List[str]], None]] = None,
    progress: bool = False,
    what: str = "model",
    warn: Callable[[str], None] = print,
) -> List[str]:
    """Greedy answers to ``prompts`` (chat-formatted), in order; ``on_batch(prompts, answers)``
    is called after each batch, so a caller can cache as it goes. The tokenizer is probed
    on every prompt first (``check_tokenizer``; ``what`` names the model)."""
    import torch

    check_tokenizer(tokenizer, prompts, what, warn)

    torch.manual_seed(seed)
    tokenizer.padding_side = "left"  # decoder-only: pad on the left so answers start together
    answers: List[str] = []
    batches = range(0, len(prompts), max(1, batch_size))
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="generating", unit="batch")
    device = next(model.parameters()).device
    context = context_length(model)
    for start in batches:
        chunk = list(prompts[start : start + batch_size])
        texts = [chat_text(tokenizer, p) for p in chunk]
        encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not tokenizer.chat_template)
        encoded = {k: v.to(device) for k, v in encoded.items() if k in ("input_ids", "attention_mask")}
        new_tokens_here = max_new_tokens
        if context is not None:
            # Never past the position table (transformers fails there with "index out of range").
            room = context - encoded["input_ids"].shape[1]
            if room < 1:
                raise ModelLoadError(
                    f"{what}: prompts {start} to {start + len(chunk) - 1} take {encoded['input_ids'].shape[1]} tokens, "
                    f"the model's whole context ({context}): shorten them"
                )
            new_tokens_here = min(max_new_tokens, room)
        try:
            with torch.no_grad():
                output = model.generate(
                    **encoded,
                    max_new_tokens=new_tokens_here,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )
        except (IndexError, RuntimeError, ValueError) as error:
            # transformers' own text names neither the model nor the prompt (--verbose shows it).
            raise ModelLoadError(
                f"{what}: generation failed on prompts {start} to {start + len(chunk) - 1} "
                f"({type(error).__name__} in transformers; tokenizer {type(tokenizer).__name__})"
            ) from error

        new_tokens = output[:, encoded["input_ids"].shape[1] :]
        batch_answers = [a.strip() for a in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
        answers.extend(batch_answers)
        if on_batch is not None:
            on_batch(chunk, batch_answers)
    return answers
