"""What the Conv1D layout lookup (mergekit_lox/layout.py) costs a merge (not a test).

Every kernel asks, per tensor, whether its weight is stored transposed (methods/inputs.
role_tensors -> layout.stored_transposed). This times, in one run:

- the first lookup for a model (its config read; for a model type whose transformers modeling
  file mentions Conv1D, the model built on the meta device), on a 7B-shaped GPT-2 and Llama
  config and on a tiny saved GPT-2;
- a cached lookup;
- against the baseline: one LoX kernel call (``lox.extrapolate``, exact SVD) on a 2048 x 2048
  matrix, the smallest matrix of a 1B model.

    python benchmarks/bench_layout.py
"""

from __future__ import annotations

import statistics
import tempfile
import time


def median_seconds(call, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    import torch
    import transformers
    from mergekit.common import ModelReference

    from mergekit_lox import layout
    from mergekit_lox.methods.lox import extrapolate

    rows = []
    for label, config in (
        ("GPT-2, 7B-shaped config (meta build)", transformers.GPT2Config(n_embd=4096, n_layer=32, n_head=32)),
        (
            "Llama, 7B-shaped config (modeling file read)",
            transformers.LlamaConfig(hidden_size=4096, num_hidden_layers=32),
        ),
    ):
        start = time.perf_counter()
        count = len(layout.transposed_weights(config))
        rows.append((f"first lookup: {label}, {count} Conv1D weights", time.perf_counter() - start))
    with tempfile.TemporaryDirectory() as root:
        transformers.GPT2LMHeadModel(
            transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64)
        ).save_pretrained(root)
        reference = ModelReference.parse(root)
        name = "transformer.h.0.attn.c_attn.weight"
        start = time.perf_counter()
        assert layout.stored_transposed(reference, name)
        rows.append(("first lookup: a saved tiny GPT-2 (config read, meta build)", time.perf_counter() - start))
        rows.append(
            ("cached lookup, per tensor", median_seconds(lambda: layout.stored_transposed(reference, name), 1000))
        )
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2048, 2048, generator=g)
    aligned = base + 0.01 * torch.randn(2048, 64, generator=g) @ torch.randn(64, 2048, generator=g)
    baseline = median_seconds(lambda: extrapolate(aligned, base, 1.25, 6, "exact"), 3)
    rows.append(("baseline: one LoX kernel call, 2048 x 2048, exact SVD", baseline))
    print(f"{'what':<70} {'time':>10} {'/ baseline':>11}")
    for label, seconds in rows:
        print(f"{label:<70} {seconds * 1e3:>8.3f} ms {seconds / baseline:>11.2e}")


if __name__ == "__main__":
    main()
