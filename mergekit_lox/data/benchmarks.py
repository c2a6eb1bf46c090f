"""The safety and over-refusal benchmarks shipped with the package, by name, offline.

    --safety advbench | harmbench[:test|val] | strongreject | catqa | harmfulqa | xstest[:unsafe]
    --over-refusal xstest        (XSTest's 250 safe prompts: refusing them is over-refusal)

Files, licences and origins: data/bundled/NOTICE.md. A name is resolved only when no file or
folder of that name exists (a local ``advbench`` folder is read as a folder).
"""

from __future__ import annotations

import csv
import json
import os
import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

BUNDLED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bundled")


class BenchmarkError(ValueError):
    """An unknown benchmark name or split; the message lists the known ones."""


def _csv(name: str) -> List[Dict[str, str]]:
    with open(os.path.join(BUNDLED, name), encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _nested_questions(name: str) -> List[str]:
    """CatQA / HarmfulQA: {category: {subcategory: [question, ...]}}, in file order."""
    with open(os.path.join(BUNDLED, name), encoding="utf-8") as f:
        data = json.load(f)
    return [q for subcategories in data.values() for questions in subcategories.values() for q in questions]


def _harmbench(split: str) -> List[str]:
    """HarmBench's standard and contextual behaviours (a contextual one is its context, then
    the behaviour, as HarmBench prompts it); the copyright behaviours need HarmBench's own
    hash-based judge and are left out."""
    rows = _csv(f"harmbench_behaviors_text_{split}.csv")
    prompts = []
    for row in rows:
        if row["FunctionalCategory"] == "copyright":
            continue
        context = (row.get("ContextString") or "").strip()
        prompts.append(f"{context}\n\n---\n\n{row['Behavior']}" if context else row["Behavior"])
    return prompts


def _xstest(label: str) -> List[str]:
    return [row["prompt"] for row in _csv("xstest_prompts.csv") if row["label"] == label]


@dataclass(frozen=True)
class Benchmark:
    name: str
    description: str
    files: Tuple[str, ...]
    licence: str
    splits: Dict[str, Callable[[], List[str]]]  # the first is the default
    columns: str
    kind: str = "harmful"  # harmful: refusing is right; safe: refusing is over-refusal


BENCHMARKS: Dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark(
            "advbench",
            "AdvBench harmful behaviours (Zou et al. 2023)",
            ("advbench_harmful_behaviors.csv",),
            "MIT",
            {"train": lambda: [r["goal"] for r in _csv("advbench_harmful_behaviors.csv")]},
            "goal,target",
        ),
        Benchmark(
            "harmbench",
            "HarmBench text behaviours, standard and contextual (Mazeika et al. 2024)",
            ("harmbench_behaviors_text_test.csv", "harmbench_behaviors_text_val.csv"),
            "MIT",
            {"test": lambda: _harmbench("test"), "val": lambda: _harmbench("val")},
            "Behavior,FunctionalCategory,SemanticCategory,Tags,ContextString,BehaviorID",
        ),
        Benchmark(
            "strongreject",
            "StrongREJECT forbidden prompts (Souly et al. 2024)",
            ("strongreject_dataset.csv",),
            "MIT",
            {"train": lambda: [r["forbidden_prompt"] for r in _csv("strongreject_dataset.csv")]},
            "category,source,forbidden_prompt",
        ),
        Benchmark(
            "catqa",
            "CatQA categorical harmful questions, English (Bhardwaj et al. 2024)",
            ("catqa_english.json",),
            "Apache-2.0",
            {"train": lambda: _nested_questions("catqa_english.json")},
            "{category: {subcategory: [question, ...]}}",
        ),
        Benchmark(
            "harmfulqa",
            "HarmfulQA harmful questions (Bhardwaj & Poria 2023)",
            ("harmfulqa.json",),
            "Apache-2.0",
            {"train": lambda: _nested_questions("harmfulqa.json")},
            "{topic: {subtopic: [question, ...]}}",
        ),
        Benchmark(
            "xstest",
            "XSTest v2 (Röttger et al. 2024): safe prompts that look unsafe (over-refusal), unsafe contrasts",
            ("xstest_prompts.csv",),
            "CC-BY-4.0",
            {"unsafe": lambda: _xstest("unsafe"), "safe": lambda: _xstest("safe")},
            "id,prompt,type,label,focus,note",
            kind="safe",
        ),
    )
}


def is_benchmark(spec: Optional[str]) -> bool:
    """True when ``spec`` names a bundled benchmark (``NAME`` or ``NAME:split``) and no file
    or folder of that name exists."""
    return bool(spec) and not os.path.exists(spec) and spec.split(":", 1)[0].lower() in BENCHMARKS


def benchmark_prompts(spec: str, *, limit: Optional[int] = None, seed: int = 0) -> Tuple[str, List[str]]:
    """``(NAME:split, prompts)`` for ``spec``; with ``limit``, a fixed random subsample of that
    size drawn with ``seed`` (in the file's order), the same on every machine."""
    name, _, split = spec.partition(":")
    benchmark = BENCHMARKS.get(name.lower())
    if benchmark is None:
        raise BenchmarkError(f"unknown benchmark {name!r}; bundled: {', '.join(BENCHMARKS)}")
    split = split or next(iter(benchmark.splits))
    if split not in benchmark.splits:
        raise BenchmarkError(
            f"benchmark {benchmark.name} has no split {split!r}; its splits: {', '.join(benchmark.splits)}"
        )
    prompts = benchmark.splits[split]()
    if limit is not None:
        if limit < 1:
            raise BenchmarkError(f"--limit must be at least 1, got {limit}")
        if limit < len(prompts):
            keep = sorted(random.Random(seed).sample(range(len(prompts)), limit))
            prompts = [prompts[i] for i in keep]
    return f"{benchmark.name}:{split}", prompts


# --over-refusal NAME: the split of safe prompts (refusing them is over-refusal).
OVER_REFUSAL = {"xstest": "xstest:safe"}


def over_refusal_prompts(spec: str, *, limit: Optional[int] = None, seed: int = 0) -> Tuple[str, List[str]]:
    """The safe prompts of ``--over-refusal NAME`` (only XSTest's today)."""
    if spec.lower() not in OVER_REFUSAL:
        raise BenchmarkError(f"--over-refusal {spec!r}: bundled over-refusal sets: {', '.join(OVER_REFUSAL)}")
    return benchmark_prompts(OVER_REFUSAL[spec.lower()], limit=limit, seed=seed)


def describe() -> List[Dict[str, object]]:
    """One row per benchmark and split: name, prompts, licence, files, columns, kind."""
    rows = []
    for b in BENCHMARKS.values():
        for split, load in b.splits.items():
            rows.append(
                {
                    "name": f"{b.name}:{split}",
                    "prompts": len(load()),
                    "kind": "over-refusal" if b.kind == "safe" and split == "safe" else "harmful",
                    "licence": b.licence,
                    "files": list(b.files),
                    "columns": b.columns,
                    "description": b.description,
                }
            )
    return rows
