"""What a run checks beyond the recipe: its output complete, a full disk named,
hub models reachable, and outputs that would swallow each other.

- mergekit logs some failures and carries on (a tokenizer that could not be
  copied, say on a full disk: "The merge was still successful"), so a run can
  return with a 0-byte tokenizer file. ``output_verifier`` checks the staged
  output before it replaces OUT (files/verify.py), and names what mergekit
  logged; a logged full disk becomes the usual no-space line.
- safetensors reports a full disk as ``SafetensorError(... os error 28)``, not
  ``OSError``: ``is_disk_full`` recognises both, anywhere in the cause chain.
- A Hugging Face id that cannot be fetched fails inside mergekit with the hub's
  connection text, naming no model; ``require_hub_models`` fetches each one
  first, through mergekit's own ``ModelReference.local_path`` (the same cache
  and files mergekit would use), and names the model that fails.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from typing import Callable, Iterator, List, Optional

from mergekit_lox.run import RunError

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXT = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122")


def is_disk_full(error: BaseException) -> bool:
    """True when ``error`` (or what caused it) is a full disk or quota: an ``OSError``
    ENOSPC / EDQUOT, or a library error that carries its text (safetensors)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _DISK_FULL:
            return True
        if any(text in str(error).lower() for text in _DISK_FULL_TEXT):
            return True
        error = error.__cause__ or error.__context__
    return False


@contextlib.contextmanager
def mergekit_logged_errors() -> Iterator[List[BaseException]]:
    """Collect, for the duration, the exceptions mergekit logs at ERROR and goes on from."""
    caught: List[BaseException] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.exc_info and record.exc_info[1] is not None:
                caught.append(record.exc_info[1])

    handler = _Collect(logging.ERROR)
    logger = logging.getLogger("mergekit")
    logger.addHandler(handler)
    try:
        yield caught
    finally:
        logger.removeHandler(handler)


def output_verifier(
    out: str,
    config,
    *,
    copy_tokenizer: bool,
    write_model_card: bool,
    logged: List[BaseException],
    strict: bool = False,
) -> Callable[[str], None]:
    """``staged_output``'s ``verify`` for a merge of ``config`` (a MergeConfiguration)
    into ``out``: config, model card, the tokenizer files mergekit copies and every
    weight shard must be there and whole. A failure names the file and what mergekit
    logged; a logged full disk is raised as ``OSError(ENOSPC)`` (the no-space line)."""
    from mergekit_lox.errors import one_line
    from mergekit_lox.files.verify import IncompleteOutputError, verify_model_output
    from mergekit_lox.mergekit_compat import tokenizer_files_copied

    required = ["config.json"] + (["README.md", "mergekit_config.yml"] if write_model_card else [])
    copied = tokenizer_files_copied(config) if copy_tokenizer else {}
    existed = os.path.lexists(out)
    from mergekit_lox.methods.inputs import take_changes

    take_changes()  # the tally starts with this merge

    def verify(staging: str) -> None:
        require_a_change(out, take_changes(), strict, existed)
        try:
            verify_model_output(staging, required, copied)
        except IncompleteOutputError as error:
            for failure in logged:
                if is_disk_full(failure):
                    raise OSError(errno.ENOSPC, f"{one_line(failure)} ({error})") from failure
            cause = f"; mergekit logged: {one_line(logged[0])}" if logged else ""
            state = "is unchanged" if existed else "was not created"
            raise RunError(
                f"{out}: the merge did not write a complete model: {error}{cause}; nothing was written "
                f"({out} {state}); run it again, and report it if it happens again"
            ) from error

    return verify


# Why a method's merge can change nothing, beyond a zero safety vector.
_UNCHANGED_BECAUSE = {
    "safelora_project": "no matrix's cosine is at or below `threshold` (`mergekit-lox analyze --finetuned` shows "
    "the cosines; `safelora-select` picks a threshold that projects N)",
    "safemerge": "no matrix's cosine is at or below `threshold` (`mergekit-lox analyze --finetuned` shows the cosines)",
    "lox_extrapolate": "`alpha` is 0",
    "lssf_fusion": "`scale` is 0",
}


def no_change_reasons(changes) -> List[str]:
    """One line per method of the merge whose every weight matrix came out unchanged."""
    lines = []
    for method, tally in sorted(changes.items()):
        if tally.matrices == 0 or tally.unchanged < tally.matrices:
            continue
        if tally.zero_safety == tally.matrices:
            why = "the aligned model is identical to the base in every one (a zero safety vector)"
        else:
            why = _UNCHANGED_BECAUSE.get(method, "every result equals its input")
        lines.append(f"{method} changed none of its {tally.matrices} weight matrices: {why}")
    return lines


def require_a_change(out: str, changes, strict: bool, existed: bool) -> None:
    """Warn (stderr) about a merge that changed nothing; with ``strict``, refuse it
    before it replaces OUT."""
    import sys

    for line in no_change_reasons(changes):
        if strict:
            state = "is unchanged" if existed else "was not created"
            raise RunError(f"{out}: {line}; --strict refuses a merge that changes nothing ({out} {state})")
        print(f"warning: {out}: {line}", file=sys.stderr)


def require_hub_models(recipe: str, references, cache_dir: Optional[str] = None) -> None:
    """Fetch each ``(field, model path)`` that is not a local folder, as mergekit would
    (its cache, or a download of configs and weights), or raise naming the model."""
    from mergekit_lox.files.hub import fetch_hub_model

    for where, path in references:
        if os.path.exists(path):
            continue
        try:
            fetch_hub_model(f"model {path}", path, cache_dir=cache_dir)
        except ValueError as error:
            raise RunError(f"{recipe}: {where}: {error}") from error


def refuse_nested_outputs(recipe: str, out: str, others) -> None:
    """A LoRA merge cache or intermediate folder (``(option, path)``) inside OUT would
    be swallowed by OUT's replacement, and would make OUT look like someone else's folder."""
    from mergekit_lox.files.output import is_within

    for option, path in others:
        if path and is_within(path, out):
            raise RunError(
                f"{recipe}: {option} {path} is inside OUT {out}, which a run replaces as a whole: "
                f"put it beside OUT instead (the default is {os.path.normpath(out)}{_DEFAULT_SUFFIX[option]})"
            )


_DEFAULT_SUFFIX = {"--lora-merge-cache": ".lora-cache", "--intermediate-dir": ".intermediate"}
