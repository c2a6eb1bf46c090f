"""Runs: one-document recipes and chains, checked first and written whole or not at all.

Used by every command that merges (``run``, ``demo``, ``sweep``).
"""

from __future__ import annotations

from typing import List, Optional


class RunError(ValueError):
    """The run was refused or failed; the message says what to fix."""


def run_recipe(
    recipe: str,
    out: str,
    mergekit_args: Optional[List[str]] = None,
    intermediate_dir: Optional[str] = None,
    strict: bool = False,
) -> None:
    """Run a one-document recipe as `mergekit-yaml RECIPE OUT ARGS...` does;
    a multi-document recipe is a chain, run as `mergekit-multi` runs it (chain.py).
    Both are checked first and write OUT only once complete (safe_run.py). A merge
    that changes nothing is warned about, or refused with ``strict`` (run/safety.py)."""
    from mergekit_lox.run.chain import is_chain, run_chain
    from mergekit_lox.run.document import run_document

    if is_chain(recipe):
        run_chain(recipe, out, intermediate_dir, mergekit_args or [], strict=strict)
        return
    run_document(recipe, out, mergekit_args or [], strict=strict)


def default_mergekit_args(out: str, mergekit_args: List[str]) -> List[str]:
    """mergekit options that `run` adds unless the user gave them.

    --lora-merge-cache: mergekit needs one to merge `model: aligned+adapter_dir`
    references and has no default. Ours is `OUT.lora-cache/` beside OUT, so
    merged copies go where the output goes, not into an input model's or an
    adapter's directory; mergekit creates it only when a LoRA is merged.
    """
    from mergekit_lox.run.lora_cache import default_lora_merge_cache

    given = any(a == "--lora-merge-cache" or a.startswith("--lora-merge-cache=") for a in mergekit_args)
    return [] if given else ["--lora-merge-cache", default_lora_merge_cache(out)]
