"""Multi-document recipes (chains) for `mergekit-lox run`, run by mergekit-multi.

A chain is a YAML file of several documents in ``mergekit-multi``'s own
convention, so the same file runs under both commands:

- a document with ``name: X`` is written to ``INTERMEDIATE_DIR/X``, and any
  document may use ``X`` wherever it names a model (``model: X``,
  ``base_model: X``, ``X+lora_dir``);
- the document without a ``name:`` is the final one, written to ``OUT``;
- a stage whose output directory already holds a complete model
  (``config.json`` plus weights) is skipped, as ``mergekit-multi --lazy``
  does; ``--no-lazy`` recomputes everything.

Execution is mergekit-multi's own (``mergekit.scripts.multimerge``); this
module adds what mergekit-multi leaves to chance:

- the whole recipe is checked first (``check.check_recipe``), so an unknown
  reference, a cycle, an unknown parameter or a missing role fails before
  any stage runs, not after hours of earlier stages;
- each stage records the document it was computed from
  (``mergekit_lox_stage.yml``); a completed stage whose document has changed
  since is an error instead of being silently reused;
- outputs are never placed inside an input model's directory.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import yaml

STAGE_RECORD = "mergekit_lox_stage.yml"


class ChainError(ValueError):
    """The chain cannot run as written; nothing has been computed."""


def document_count(recipe: str) -> int:
    """How many YAML documents ``recipe`` holds (a chain has more than one)."""
    with open(recipe, "r", encoding="utf-8") as f:
        return sum(1 for _ in yaml.safe_load_all(f))


def is_chain(recipe: str) -> bool:
    return document_count(recipe) > 1


def default_intermediate_dir(out: str) -> str:
    """``OUT.intermediate`` beside ``OUT``."""
    return os.path.normpath(out) + ".intermediate"


def _is_complete(path: str) -> bool:
    """mergekit-multi's own test for a stage it will skip."""
    from mergekit.scripts.multimerge import MODEL_CHECK_FILENAMES

    return os.path.exists(os.path.join(path, "config.json")) and any(
        os.path.exists(os.path.join(path, name)) for name in MODEL_CHECK_FILENAMES
    )


def _inside(path: str, directory: str) -> bool:
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def _guard_outputs(recipe: str, configs, outputs: Dict[Optional[str], str]) -> None:
    """No stage may write into (or over) a local input model."""
    inputs = set()
    for config in configs.values():
        for reference in config.referenced_models():
            for part in (reference.model, reference.lora):
                if part is not None and os.path.isdir(part.path):
                    inputs.add(part.path)
    own = set(outputs.values())
    for name, target in outputs.items():
        for source in inputs:
            if source in own:
                continue  # an earlier stage's output, read by a later one
            if _inside(target, source):
                stage = f"stage {name!r}" if name else "the final document"
                raise ChainError(
                    f"{recipe}: {stage} would be written to {target}, which overlaps the input model {source}"
                )


def _record_stages(
    recipe: str, configs, outputs: Dict[Optional[str], str], lazy: bool
) -> None:
    """Refuse to reuse a completed stage computed from another document; record
    the document of every stage about to be computed."""
    for name, config in configs.items():
        target = outputs[name]
        text = config.to_yaml() + "\n"
        record = os.path.join(target, STAGE_RECORD)
        if lazy and _is_complete(target) and os.path.exists(record):
            with open(record, "r", encoding="utf-8") as f:
                if f.read() != text:
                    stage = f"stage {name!r}" if name else "the final document"
                    raise ChainError(
                        f"{recipe}: {stage} in {target} was computed from a different document; "
                        "delete that directory or pass --no-lazy to recompute"
                    )
            continue
        if lazy and _is_complete(target):
            continue  # completed by plain mergekit-multi: nothing to compare with
        os.makedirs(target, exist_ok=True)
        with open(record, "w", encoding="utf-8") as f:
            f.write(text)


def run_chain(
    recipe: str,
    out: str,
    intermediate_dir: Optional[str] = None,
    mergekit_args: Sequence[str] = (),
) -> Dict[Optional[str], str]:
    """Check, then run a multi-document recipe exactly as
    ``mergekit-multi RECIPE -I INTERMEDIATE_DIR --out-path OUT ARGS...`` does.

    Returns where each stage was written (name, None for the final, -> dir).
    """
    from mergekit.scripts.multimerge import load_config
    from mergekit.scripts.multimerge import main as mergekit_multi

    from mergekit_lox.check import check_recipe

    report = check_recipe(recipe)
    if report.problems:
        more = len(report.problems) - 1
        tail = f" (and {more} more problem(s): run `mergekit-lox check {recipe}`)" if more else ""
        raise ChainError(f"{recipe}: {report.problems[0]}{tail}")

    intermediate_dir = intermediate_dir or default_intermediate_dir(out)
    with open(recipe, "r", encoding="utf-8") as f:
        configs, _ = load_config(f.read(), intermediate_dir)
    outputs = {
        name: (out if name is None else os.path.join(intermediate_dir, name)) for name in configs
    }
    args: List[str] = list(mergekit_args)
    lazy = "--no-lazy" not in args
    _guard_outputs(recipe, configs, outputs)
    _record_stages(recipe, configs, outputs, lazy)
    mergekit_multi.main(
        args=[recipe, "--intermediate-dir", intermediate_dir, "--out-path", out, *args],
        prog_name="mergekit-multi",
        standalone_mode=False,
    )
    return outputs
