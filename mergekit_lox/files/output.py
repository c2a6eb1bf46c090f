"""Outputs are complete or absent: staged builds and input-directory protection.

mergekit writes straight into OUT, tensor by tensor; a run that fails or is
interrupted (Ctrl-C, a full disk) leaves a directory that looks like a model.
`staged_output` has mergekit write into a hidden sibling of OUT instead and
moves it into place only once everything is written; on failure the staging
directory is removed. `refuse_inside_inputs` stops a run whose OUT is, or is
inside, one of its input models' directories before anything is written.

Because a run replaces OUT as a whole, an existing OUT is replaced only when
it is empty or holds nothing but what an earlier run wrote: the files listed
in its ``MANIFEST`` (staged_output records them), or, for an output without
one (plain mergekit), mergekit's own file names next to its
``mergekit_config.yml`` or a chain stage record. A folder of the user's files,
or an output the user has since added files to, is refused, naming them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from typing import Callable, Iterable, Iterator, Optional, Tuple


class OutputError(ValueError):
    """OUT would overwrite or sit inside an input."""


def _resolved(path: str) -> str:
    return os.path.realpath(os.path.abspath(os.path.expanduser(path)))


def is_within(path: str, directory: str) -> bool:
    """True when ``path`` is ``directory`` or lies inside it (symlinks resolved)."""
    path, directory = _resolved(path), _resolved(directory)
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


# What a spreadsheet runs as a formula when a cell starts with it (CSV injection).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_text(text: str) -> str:
    """A text cell for a CSV file the tool writes: one that a spreadsheet would run as a
    formula (a tensor name, a task name or an error text starting with ``=``, ``+``, ``-``,
    ``@``, a tab or a carriage return) is prefixed with ``'``, which shows it as text.
    Numbers are not text and are never touched."""
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def link_leaves(path: str, folder: str) -> bool:
    """True when ``path`` (a file in ``folder``) is a symlink whose target lies outside
    ``folder``. A Hugging Face cache snapshot (``<repo>/snapshots/<rev>/``) links every file
    to ``<repo>/blobs/``: that repository folder counts as inside."""
    if not os.path.islink(path):
        return False
    root = _resolved(folder)
    parent = os.path.dirname(root)
    if os.path.basename(parent) == "snapshots" and os.path.basename(os.path.dirname(parent)).startswith(
        ("models--", "datasets--")
    ):
        root = os.path.dirname(parent)
    return not is_within(path, root)


def copy_plain_files(source: str, destination: str, skip: Iterable[str] = ()) -> list:
    """Copy the regular files at the top of ``source`` into ``destination`` (not ``skip``);
    returns the names not copied because they are links out of ``source`` (a token file
    linked into an adapter folder must not be published with the adapter)."""
    refused = []
    skip = set(skip)
    for entry in sorted(os.listdir(source)):
        path = os.path.join(source, entry)
        if entry in skip or not os.path.isfile(path):
            continue
        if link_leaves(path, source):
            refused.append(entry)
            continue
        shutil.copyfile(path, os.path.join(destination, entry))  # the content, never a link
    return refused


def name_problem(name: str) -> Optional[str]:
    """Why ``name`` cannot be one folder's name inside a folder the tool writes (a chain
    stage's ``name:``, a sweep point): None when it can. An absolute path, ``..``, a
    separator or a control character would put the folder elsewhere, or replace one."""
    if not name or not name.strip():
        return "is empty"
    if name in (".", ".."):
        return f"is {name!r}, not a folder name"
    if os.path.isabs(name) or "/" in name or "\\" in name or (os.altsep and os.altsep in name):
        return "holds a path separator: it must be one folder name (it is joined onto the intermediate folder)"
    if not name.isprintable():
        return "holds a control character"
    return None


def input_holding(out: str, inputs: Iterable[Tuple[str, Optional[str]]]) -> Optional[Tuple[str, str]]:
    """The first ``(label, directory)`` of ``inputs`` that is ``out`` or contains it
    (writing there would write into an input); None when none does. Entries
    whose path is empty or not a directory are skipped."""
    for label, path in inputs:
        if path and os.path.isdir(path) and is_within(out, path):
            return label, path
    return None


def local_model_dirs(recipe_documents: Iterable[dict]) -> list[str]:
    """Local directories a recipe reads (models and LoRA adapters), not hub IDs."""
    from mergekit.config import MergeConfiguration

    dirs = []
    for document in recipe_documents:
        try:
            config = MergeConfiguration.model_validate(document)
        except Exception:  # noqa: BLE001 - schema errors are reported elsewhere
            continue
        dirs.extend(config_input_dirs(config))
    return dirs


def config_input_dirs(config) -> list[str]:
    """Local directories one ``MergeConfiguration`` reads: its models and LoRA adapters,
    and the tokenizer donors (``tokenizer_source``, ``tokenizer.source``, a token's
    ``source`` model), which mergekit reads too and so must never be written into."""
    from mergekit.common import ModelReference

    references = list(config.referenced_models())
    donors = [config.tokenizer_source]
    if config.tokenizer is not None:
        donors.append(config.tokenizer.source)
        for token in (config.tokenizer.tokens or {}).values():
            donors.extend([token.source, getattr(token.source, "model", None)])
    references += [d for d in donors if isinstance(d, ModelReference)]
    dirs = []
    for reference in references:
        for part in (reference.model, reference.lora):
            if part is not None and os.path.isdir(part.path) and _resolved(part.path) not in dirs:
                dirs.append(_resolved(part.path))
    return dirs


def refuse_inside_inputs(out: str, input_dirs: Iterable[str]) -> None:
    """Raise when OUT equals or lies inside an input directory (or contains one)."""
    for source in input_dirs:
        source = _resolved(source)
        if is_within(out, source):
            raise OutputError(f"output {out} is inside input model directory {source}: choose another OUT")
        if is_within(source, out):
            raise OutputError(f"output {out} contains input model directory {source}: choose another OUT")


# What each chain stage records it was computed from (run/chain.py).
STAGE_RECORD = "mergekit_lox_stage.yml"

# Files that mark a directory as the output of an earlier merge (safe to replace):
# mergekit writes mergekit_config.yml with its model card, chain.py its stage record.
MERGE_OUTPUT_MARKERS = ("mergekit_config.yml", STAGE_RECORD)


def refuse_to_replace(
    out: str, markers: Tuple[str, ...] = MERGE_OUTPUT_MARKERS, writer: str = "a merge", during: bool = False
) -> None:
    """Raise unless OUT is absent, empty, or holds one of ``markers`` (by default:
    the output of an earlier merge; `mergekit-lox adapter` passes its own marker).
    ``during``: the second look, right before the swap (files may have appeared in OUT
    while the run computed)."""
    when = "appeared in" if during else "already exists as"
    outcome = "; OUT was left as it is and the new result not kept" if during else ""
    if not os.path.lexists(out):
        return
    if not os.path.isdir(out):
        raise OutputError(f"output {out} {when} something that is not a directory{outcome}: choose another OUT")
    entries = os.listdir(out)
    if entries and MANIFEST not in entries and not any(marker in entries for marker in markers):
        raise OutputError(
            f"output {out} already exists and was not written by {writer} (no {markers[0]}){outcome}; "
            "a run replaces OUT as a whole: remove it or choose another OUT"
        )
    extra = unwritten_files(out)
    if extra:
        shown = ", ".join(extra[:5]) + (f" (and {len(extra) - 5} more)" if len(extra) > 5 else "")
        said = "file(s) appeared in it during the run that" if during else "file(s) that"
        raise OutputError(
            f"output {out} holds {len(extra)} {said} {writer} did not write: {shown}{outcome}; "
            "a run replaces OUT as a whole: move them out of OUT or choose another OUT"
        )


# The list of files a run wrote, kept in OUT (staged_output writes it last): a
# re-run replaces OUT only when it holds nothing else.
MANIFEST = ".mergekit_lox_files.json"

# What mergekit writes into OUT, for an earlier output without a MANIFEST (plain
# mergekit-yaml, an older mergekit-lox): anything else in it is the user's.
MERGE_OUTPUT_FILES = (
    "config.json",
    "generation_config.json",
    "mergekit_config.yml",
    "README.md",
    "*.safetensors",
    "*.bin",
    "*.index.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "merges.txt",
    "vocab.*",
    "chat_template.*",
    "*preprocessor_config.json",
    STAGE_RECORD,
)


def _files_under(root: str) -> list:
    """Every file (and empty directory, with a trailing /) under ``root``, relative."""
    found = []
    for folder, dirs, files in os.walk(root):
        relative = os.path.relpath(folder, root)
        for name in files:
            found.append(os.path.normpath(os.path.join(relative, name)))
        if not dirs and not files and folder != root:
            found.append(relative + os.sep)
    return sorted(found)


def unwritten_files(out: str) -> list:
    """Files in the earlier output ``out`` that its run did not write (sorted)."""
    import fnmatch
    import json

    manifest = os.path.join(out, MANIFEST)
    present = [f for f in _files_under(out) if f != MANIFEST]
    if os.path.isfile(manifest):
        try:
            with open(manifest, "r", encoding="utf-8") as f:
                written = set(json.load(f)["files"])
        except (OSError, ValueError, KeyError, TypeError):
            written = set()
        return [f for f in present if f not in written]
    return [f for f in present if os.sep in f or not any(fnmatch.fnmatch(f, p) for p in MERGE_OUTPUT_FILES)]


def write_manifest(directory: str) -> None:
    """Record, in ``directory``, the files it holds: what the run wrote."""
    import json

    files = [f for f in _files_under(directory) if f != MANIFEST]
    with open(os.path.join(directory, MANIFEST), "w", encoding="utf-8") as f:
        json.dump({"written_by": "mergekit-lox", "files": files}, f, indent=1)


def _recorded_files(directory: str) -> list:
    import json

    try:
        with open(os.path.join(directory, MANIFEST), "r", encoding="utf-8") as f:
            return list(json.load(f)["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


def refuse_foreign_files(directory: str, names: Iterable[str], writer: str) -> None:
    """Before a command writes ``names`` into ``directory`` (its ``-o``): refuse, naming
    the file, when one of them exists and is not recorded in ``directory``'s MANIFEST as
    written by mergekit-lox (a ``report.html`` of the user's, another tool's
    ``eval.json``). Other files in ``directory`` are left alone. Writes nothing."""
    recorded = _recorded_files(directory)
    foreign = [n for n in names if os.path.lexists(os.path.join(directory, n)) and n not in recorded]
    if foreign:
        raise OutputError(
            f"{directory} already holds {', '.join(foreign)}, which {writer} did not write: "
            "choose another -o, or move that file, so that it is not overwritten"
        )


def claim_files(directory: str, names: Iterable[str], writer: str) -> None:
    """Right before ``writer`` writes ``names`` into ``directory``: ``refuse_foreign_files``
    once more (a file may have appeared while it computed), then record them in the
    MANIFEST (before they are written: a run killed half-way may replace them next time)."""
    import json

    names = list(names)
    refuse_foreign_files(directory, names, writer)
    recorded = _recorded_files(directory)
    files = recorded + [n for n in names if n not in recorded]
    os.makedirs(directory, exist_ok=True)
    atomic_write_text(
        os.path.join(directory, MANIFEST), json.dumps({"written_by": "mergekit-lox", "files": files}, indent=1)
    )


def claim_directory(path: str, marker: str, writer: str) -> None:
    """Make ``path`` a folder that ``writer`` fills with files of its own: it must be
    new, empty, or claimed by ``writer`` before (it holds ``marker``), so that no
    file of the user's is ever overwritten; ``marker`` is then written into it."""
    if os.path.lexists(path):
        if not os.path.isdir(path):
            raise OutputError(f"{path} exists and is not a directory: choose another folder")
        entries = sorted(os.listdir(path))
        if entries and marker not in entries:
            shown = ", ".join(entries[:5]) + (f" (and {len(entries) - 5} more)" if len(entries) > 5 else "")
            raise OutputError(
                f"{path} already holds files that {writer} did not write ({shown}): "
                "choose a new or empty folder, so that none of them is overwritten"
            )
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, marker), "a", encoding="utf-8"):
        pass


def atomic_write_text(path: str, text: str) -> None:
    """Write the file ``path`` whole or not at all: into a hidden sibling first,
    renamed over ``path`` once written (a half-written file never lies around)."""
    directory, name = os.path.split(os.path.abspath(path))
    partial, descriptor = exclusive_sibling(directory, name)
    try:
        with open(descriptor, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(partial)
        raise


def exclusive_sibling(directory: str, name: str) -> Tuple[str, int]:
    """``(path, fd)`` of a new file beside ``name`` in ``directory``, under an unpredictable
    name (staging_prefix + 8 random characters), created exclusively: a name somebody
    planted (a symlink to a file of theirs, a file) is never opened, another is drawn.
    The file gets the usual permissions (umask), not mkstemp's 0600."""
    import secrets

    prefix = staging_prefix(directory, name)  # a long legal NAME must not make this too long
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        path = os.path.join(directory, prefix + secrets.token_hex(_RANDOM // 2))
        try:
            return path, os.open(path, flags, 0o666)
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {os.path.join(directory, name)}")


@contextlib.contextmanager
def staged_output(
    out: str,
    markers: Tuple[str, ...] = MERGE_OUTPUT_MARKERS,
    writer: str = "a merge",
    verify: Optional[Callable[[str], None]] = None,
) -> Iterator[str]:
    """Yield a staging directory for OUT; move it to OUT only on success.

    The staging directory is ``NAME`` inside a hidden sibling
    ``.NAME.incomplete-XXXX/`` of OUT: same filesystem (the final move is a
    rename), and the same basename, which mergekit uses as the model card's
    title. An existing OUT is replaced only after the new one is complete, and
    kept untouched if the run fails or is interrupted (any exception,
    KeyboardInterrupt included); the hidden sibling is always removed, and one
    left by a killed run is removed by the next (``clean_leftovers``).

    Once the body returns, ``verify(staging)`` may refuse the result (an
    exception: OUT stays as it was); then the list of files written is recorded
    in it (``MANIFEST``), so that a re-run replaces OUT only if it holds nothing else.
    """
    out = os.path.abspath(out).rstrip(os.sep)
    parent, name = os.path.split(out)
    os.makedirs(parent, exist_ok=True)
    prefix = staging_prefix(parent, name)
    clean_leftovers(out, prefix)
    refuse_to_replace(out, markers, writer)
    root = tempfile.mkdtemp(prefix=prefix, dir=parent)
    staging = os.path.join(root, name)
    try:
        _write_owner(root)
        yield staging
        if os.path.isdir(staging):
            if verify is not None:
                verify(staging)
            write_manifest(staging)
            # Checked again right before the swap: the first look was before the run.
            refuse_to_replace(out, markers, writer, during=True)
            move_into_place(staging, out, os.path.join(root, ".replaced"))
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------- staging folders
# `.NAME.incomplete-XXXXXXXX/` beside OUT, holding `NAME/` (the new output),
# `.owner` (which process builds it) and, for a moment, `.replaced` (the previous OUT).

_OWNER = ".owner"
_RANDOM = 8  # tempfile.mkdtemp's random suffix


def staging_prefix(parent: str, name: str) -> str:
    """``.NAME.incomplete-``, or, when that plus mkdtemp's suffix would exceed the
    file-system's name limit (a legal 240-character NAME), NAME cut short and
    followed by a hash of it: the same prefix for the same OUT either way."""
    import hashlib

    prefix = f".{name}.incomplete-"
    try:
        limit = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        limit = 255
    if len(os.fsencode(prefix)) + _RANDOM <= limit:
        return prefix
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:12]
    room = limit - _RANDOM - len(f".~{digest}.incomplete-")
    short = os.fsencode(name)[:room].decode("utf-8", errors="ignore")
    return f".{short}~{digest}.incomplete-"


def _write_owner(root: str) -> None:
    import json
    import socket

    with open(os.path.join(root, _OWNER), "w", encoding="utf-8") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname()}, f)


def _running_elsewhere(root: str) -> Optional[str]:
    """Why the staging folder ``root`` may still be in use (None: its run is over)."""
    import json
    import socket

    try:
        with open(os.path.join(root, _OWNER), "r", encoding="utf-8") as f:
            owner = json.load(f)
        pid, host = int(owner["pid"]), str(owner["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if host != socket.gethostname():
        return f"it belongs to a run on {host}"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except OSError:
        pass
    return f"its run (process {pid}) is still going"


def clean_leftovers(out: str, prefix: str, note=None) -> None:
    """Remove the staging folders of OUT that a killed run (SIGKILL, a power cut) left
    beside it, saying so with their age; one whose run may still be going is only
    reported. A previous OUT caught half-way through the final swap is put back."""
    import re
    import time

    note = note or (lambda line: print(line, file=sys.stderr))
    parent = os.path.dirname(out)
    pattern = re.compile(re.escape(prefix) + r"[a-z0-9_]{%d}" % _RANDOM)
    for entry in sorted(os.listdir(parent)):
        root = os.path.join(parent, entry)
        if not pattern.fullmatch(entry) or not os.path.isdir(root) or os.path.islink(root):
            continue
        if not set(os.listdir(root)) <= {os.path.basename(out), _OWNER, ".replaced"}:
            continue  # not laid out as ours: leave it
        age = time.time() - os.path.getmtime(root)
        when = f"{age / 3600:.1f} h" if age >= 3600 else f"{age / 60:.0f} min"
        busy = _running_elsewhere(root)
        if busy:
            note(f"note: staging folder {root} ({when} old) was left alone: {busy}")
            continue
        retired = os.path.join(root, ".replaced")
        if os.path.isdir(retired) and not os.path.lexists(out):
            os.replace(retired, out)
            note(f"note: put back {out}, which a run killed {when} ago had moved aside")
        shutil.rmtree(root, ignore_errors=True)
        note(f"note: removed staging folder {root}, left by a run killed {when} ago")


def move_into_place(staging: str, out: str, retired: str) -> None:
    """Rename the folder ``staging`` to ``out``; an existing ``out`` is first renamed to
    ``retired`` (same file system), and put back if the second rename fails."""
    if not os.path.lexists(out):
        os.replace(staging, out)
        return
    os.replace(out, retired)
    try:
        os.replace(staging, out)
    except BaseException:
        os.replace(retired, out)  # put the previous OUT back
        raise
