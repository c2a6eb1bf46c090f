"""Answers to the safety prompts: generated once per (model content, prompt, settings), cached.

The cache is a folder of JSON-lines files, one per model fingerprint; each line
is ``{"key", "prompt", "answer"}`` where ``key`` hashes the fingerprint, the
generation settings and the prompt. Lines are appended (and flushed to disk) as
each batch finishes, so a crashed or interrupted run resumes where it stopped;
a torn last line is ignored.

The fingerprint of a local model hashes config.json, the tokenizer files (the
chat template changes the answers) and the name, size and modification time of
every weight file: rewriting a model invalidates its answers, copying one does
too (new mtimes). A hub id is fingerprinted through its downloaded snapshot
(the commit), else by the id alone.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from typing import Callable, Dict, List, Optional, Sequence

from mergekit_lox.data.generation import ModelLoadError

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "*.index.json")
CONTENT_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer_config.json",
    "tokenizer.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
)
# Tokenizer files besides those: what a prompt is encoded with decides the answer too.
TOKENIZER_PATTERNS = ("tokenizer*", "vocab*", "merges.txt", "added_tokens.json", "*.model", "*.tiktoken")


def looks_like_hub_id(path: str) -> bool:
    return not os.path.exists(path) and not path.startswith((".", "/", "~")) and path.count("/") == 1


def check_model(path: str) -> None:
    """Fail before any work when ``path`` is not a model directory with weights, or a hub id
    whose config cannot be had (a download of config.json only)."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ModelLoadError(f"model {path}: no config.json (not a Hugging Face model directory)")
        if not any(glob.glob(os.path.join(path, pattern)) for pattern in WEIGHT_PATTERNS):
            raise ModelLoadError(f"model {path}: no weight files (*.safetensors, *.bin)")
        return
    if not looks_like_hub_id(path):
        raise ModelLoadError(f"model {path}: no such directory")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(path)
    except Exception as error:  # noqa: BLE001 - transformers/hub raise many kinds; name the model
        raise ModelLoadError(f"cannot load model {path}: {' '.join(str(error).split())[:300]}") from None


def _snapshot_dir(model_id: str) -> Optional[str]:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model_id, "config.json")
    except Exception:  # noqa: BLE001 - no cache, bad id: fall back to the id
        return None
    return os.path.dirname(found) if isinstance(found, str) else None


def model_fingerprint(path: str) -> str:
    """A hex digest of what the model's answers depend on (see the module doc): its
    config, tokenizer and chat-template files by content, its weight files by name, size
    and time; for a hub id, the snapshot it resolves to in the cache, commit hash included
    (``check_model`` has fetched its config first), so that another revision of the same id
    is another model, and an id never stands for whatever it resolves to later."""
    digest = hashlib.sha256()
    directory = path if os.path.isdir(path) else _snapshot_dir(path)
    if directory is None:
        raise ModelLoadError(
            f"model {path}: not in the Hugging Face cache after fetching its config, so its revision is unknown "
            "and its cached answers could not be told from another revision's; download it first "
            "(huggingface-cli download) or give a local folder"
        )
    if not os.path.isdir(path):
        digest.update(f"hub:{path}@{os.path.basename(directory)}\0".encode())  # snapshots/<commit hash>
    names = set(CONTENT_FILES)
    names |= {
        os.path.basename(f) for pattern in TOKENIZER_PATTERNS for f in glob.glob(os.path.join(directory, pattern))
    }
    for name in sorted(names):
        file = os.path.join(directory, name)
        if os.path.isfile(file):
            digest.update(name.encode() + b"\0")
            with open(file, "rb") as f:
                digest.update(hashlib.sha256(f.read()).digest())
    weights = sorted({f for pattern in WEIGHT_PATTERNS for f in glob.glob(os.path.join(directory, pattern))})
    for file in weights:
        stat = os.stat(file)  # follows hub snapshot symlinks to the blobs
        digest.update(f"{os.path.basename(file)}:{stat.st_size}:{stat.st_mtime_ns}\0".encode())
    return digest.hexdigest()


def answer_key(fingerprint: str, settings: Dict[str, object], prompt: str) -> str:
    blob = json.dumps({"model": fingerprint, "settings": settings, "prompt": prompt}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class AnswerCache:
    """The cached answers of one model (one fingerprint) under ``settings``."""

    def __init__(self, cache_dir: str, fingerprint: str, settings: Dict[str, object]):
        self.fingerprint, self.settings = fingerprint, settings
        self.path = os.path.join(cache_dir, f"{fingerprint[:24]}.jsonl")
        self.answers: Dict[str, str] = {}
        if os.path.isfile(self.path):
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        entry = json.loads(line)
                        self.answers[entry["key"]] = entry["answer"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue  # a line torn by a crash: its batch is generated again

    def key(self, prompt: str) -> str:
        return answer_key(self.fingerprint, self.settings, prompt)

    def get(self, prompt: str) -> Optional[str]:
        return self.answers.get(self.key(prompt))

    def missing(self, prompts: Sequence[str]) -> List[str]:
        seen, missing = set(), []
        for prompt in prompts:
            if prompt not in seen and self.get(prompt) is None:
                missing.append(prompt)
            seen.add(prompt)
        return missing

    def add(self, prompts: Sequence[str], answers: Sequence[str]) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        lines = []
        for prompt, answer in zip(prompts, answers, strict=True):
            key = self.key(prompt)
            self.answers[key] = answer
            lines.append(json.dumps({"key": key, "prompt": prompt, "answer": answer}, ensure_ascii=False) + "\n")
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())


def vllm_available(device: str) -> bool:
    """vLLM is used when it is installed and the device is a CUDA GPU."""
    import importlib.util

    if not device.startswith("cuda") or importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available()


def generate_vllm(
    path: str,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
    on_batch: Callable[[List[str], List[str]], None],
) -> None:  # pragma: no cover - needs vLLM and a GPU (untested in CI)
    """Greedy answers through vLLM, in chunks so the cache fills as it goes. vLLM picks its GPU
    itself (set CUDA_VISIBLE_DEVICES to choose one)."""
    from vllm import LLM, SamplingParams

    from mergekit_lox.data.generation import chat_text

    llm = LLM(model=path, seed=seed)
    tokenizer = llm.get_tokenizer()
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, seed=seed)
    chunk_size = max(64, batch_size * 8)
    for start in range(0, len(prompts), chunk_size):
        chunk = list(prompts[start : start + chunk_size])
        texts = [chat_text(tokenizer, p) for p in chunk]
        if getattr(tokenizer, "chat_template", None):  # the template already holds the special tokens
            texts = [{"prompt_token_ids": tokenizer(t, add_special_tokens=False)["input_ids"]} for t in texts]
        outputs = llm.generate(texts, params, use_tqdm=True)
        on_batch(chunk, [o.outputs[0].text.strip() for o in outputs])
    del llm
