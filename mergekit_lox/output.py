"""Outputs are complete or absent: staged builds and input-directory protection.

mergekit writes straight into OUT, tensor by tensor; a run that fails or is
interrupted (Ctrl-C, a full disk) leaves a directory that looks like a model.
`staged_output` has mergekit write into a hidden sibling of OUT instead and
moves it into place only once everything is written; on failure the staging
directory is removed. `refuse_inside_inputs` stops a run whose OUT is, or is
inside, one of its input models' directories before anything is written.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from typing import Iterable, Iterator


class OutputError(ValueError):
    """OUT would overwrite or sit inside an input."""


def _resolved(path: str) -> str:
    return os.path.realpath(os.path.abspath(os.path.expanduser(path)))


def local_model_dirs(recipe_documents: Iterable[dict]) -> list[str]:
    """Local directories a recipe reads (models and LoRA adapters), not hub IDs."""
    from mergekit.config import MergeConfiguration

    dirs = []
    for document in recipe_documents:
        try:
            config = MergeConfiguration.model_validate(document)
        except Exception:  # noqa: BLE001 - schema errors are reported elsewhere
            continue
        for reference in config.referenced_models():
            for part in (reference.model, reference.lora):
                if part is not None and os.path.isdir(part.path):
                    dirs.append(_resolved(part.path))
    return dirs


def refuse_inside_inputs(out: str, input_dirs: Iterable[str]) -> None:
    """Raise when OUT equals or lies inside an input directory (or contains one)."""
    target = _resolved(out)
    for source in input_dirs:
        source = _resolved(source)
        if target == source or target.startswith(source + os.sep):
            raise OutputError(f"output {out} is inside input model directory {source}: choose another OUT")
        if source.startswith(target + os.sep):
            raise OutputError(f"output {out} contains input model directory {source}: choose another OUT")


@contextlib.contextmanager
def staged_output(out: str) -> Iterator[str]:
    """Yield a staging directory beside OUT; move it to OUT only on success.

    An existing OUT is replaced only after the new one is complete, and kept
    untouched if the run fails.
    """
    out = os.path.abspath(out)
    parent, name = os.path.split(out.rstrip(os.sep))
    os.makedirs(parent, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    staging = os.path.join(parent, f".{name}.incomplete-{token}")
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not os.path.isdir(staging):
        return
    if os.path.lexists(out):
        retired = os.path.join(parent, f".{name}.replaced-{token}")
        os.replace(out, retired)
        os.replace(staging, out)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, out)
