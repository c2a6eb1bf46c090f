"""What `mergekit-lox run` adds around mergekit so that bad input costs no data.

mergekit-yaml validates a recipe's schema and starts: a misspelt local path
falls into a Hugging Face lookup, a bad parameter value fails with a
multi-line pydantic error, an OUT inside an input model is written into, and a
run that fails or is interrupted half-way leaves half a model in OUT.
`run_document` does, before mergekit starts:

1. the whole of `mergekit-lox check` (check.py); its first problem is the error;
2. refuse an OUT (or LoRA merge cache) equal to, inside or containing an
   input model's directory (output.py), a cache or intermediate folder inside
   OUT, and an existing OUT that holds anything an earlier merge did not write;
3. fetch Hugging Face ids, naming the one that fails (safety.py);
4. merge `model+adapter` references into the LoRA merge cache atomically,
   keyed by content (lora_cache.py);

then runs mergekit-yaml's own command into a staging directory beside OUT
that replaces OUT only once complete and verified (output.staged_output,
safety.output_verifier). chain.py does the same per stage of a
multi-document recipe.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterable, Iterator, List, Sequence

from mergekit_lox.run import RunError


def require_valid(recipe: str, unsafe_truncate_embeddings: bool = False):
    """Run `mergekit-lox check` on ``recipe``; raise its first problem as one line.

    With ``unsafe_truncate_embeddings`` (mergekit's option of that name) a
    vocabulary-size mismatch is mergekit's to handle, not a problem.
    """
    from mergekit_lox.check import VOCABULARY_MISMATCH, check_recipe

    report = check_recipe(recipe)
    problems = [
        p for p in report.problems if not (unsafe_truncate_embeddings and p.message.startswith(VOCABULARY_MISMATCH))
    ]
    if problems:
        more = len(problems) - 1
        tail = f" (and {more} more problem(s): run `mergekit-lox check {recipe}`)" if more else ""
        raise RunError(f"{recipe}: {problems[0]}{tail}")
    return report


def command_options(command, argv: Sequence[str]) -> dict:
    """The options mergekit's click ``command`` would parse from ``argv``.

    Parsing is mergekit's own, so a bad option is a usage error at once,
    before anything runs.
    """
    from mergekit_lox.mergekit_compat import install_option_errors

    install_option_errors()  # a bad --out-shard-size: a usage error naming it
    with command.make_context(command.name, list(argv)) as ctx:
        return dict(ctx.params)


@contextlib.contextmanager
def disk_full_explained(out: str) -> Iterator[None]:
    """Turn a full disk (``safety.is_disk_full``: ENOSPC, or safetensors' error carrying
    it) into a one-line error that says OUT was left as it was."""
    from mergekit_lox.run.safety import is_disk_full

    existed = os.path.lexists(out)
    try:
        yield
    except Exception as error:
        if not is_disk_full(error):
            raise
        state = "is unchanged" if existed else "was not created"
        raise RunError(
            f"no space left on the device while writing {out}: nothing was written ({out} {state}); "
            "free some space or choose an OUT on another disk"
        ) from error


def guard_outputs(recipe: str, documents: List[dict], targets: Iterable[str]) -> None:
    """No output (OUT, a stage, the LoRA cache) may be, lie inside or contain an input."""
    from mergekit_lox.check.documents import without_name
    from mergekit_lox.files.output import (
        OutputError,
        local_model_dirs,
        refuse_inside_inputs,
    )

    inputs = local_model_dirs([without_name(d) for d in documents])
    for target in targets:
        if target:
            try:
                refuse_inside_inputs(target, inputs)
            except OutputError as error:
                raise RunError(f"{recipe}: {error}") from None


@contextlib.contextmanager
def prepared_run(
    recipe: str,
    documents: List[dict],
    options: dict,
    out: str,
    outputs: Iterable[str],
    replaced: Iterable[str],
) -> Iterator[None]:
    """Everything before mergekit writes, for one document or a chain.

    No output (``outputs`` and the LoRA merge cache) may be, lie inside or
    contain an input; nothing in ``replaced`` may be replaced unless an earlier
    merge wrote it; `model+adapter` references are merged into the cache; a
    full disk in the body is reported as one line about ``out``.
    """
    from mergekit_lox.files.output import OutputError, refuse_to_replace
    from mergekit_lox.mergekit_compat import forget_loaded_models
    from mergekit_lox.run.safety import refuse_nested_outputs, require_hub_models

    cache = options.get("lora_merge_cache")
    nested = [("--lora-merge-cache", cache), ("--intermediate-dir", options.get("intermediate_dir"))]
    refuse_nested_outputs(recipe, out, nested)
    guard_outputs(recipe, documents, [*outputs, cache])
    for target in replaced:
        try:
            refuse_to_replace(target)
        except OutputError as error:
            raise RunError(f"{recipe}: {error}") from None
    from mergekit_lox.run.lora_cache import merge_loras

    require_hub_models(recipe, hub_references(documents), cache_dir=options.get("transformers_cache"))
    forget_loaded_models()  # read every model as it is on disk now, not as an earlier run here saw it
    with disk_full_explained(out):
        merge_loras(
            documents,
            cache,
            trust_remote_code=bool(options.get("trust_remote_code")),
            lora_merge_dtype=options.get("lora_merge_dtype"),
        )
        yield


def hub_references(documents: List[dict]):
    """``(field, path)`` of every model a recipe names that is neither a local
    folder nor a chain stage: Hugging Face ids, fetched before anything runs."""
    from mergekit.config import MergeConfiguration

    from mergekit_lox.check.documents import without_name
    from mergekit_lox.check.files import model_references

    names = {d.get("name") for d in documents}
    for index, document in enumerate(documents, start=1):
        config = MergeConfiguration.model_validate(without_name(document))
        for where, reference in model_references(document, config):
            path = reference.model.path
            if path not in names and not os.path.exists(path):
                yield f"document {index}: {where}", path


def run_document(recipe: str, out: str, mergekit_args: Sequence[str] = (), strict: bool = False) -> None:
    """Run a one-document recipe as ``mergekit-yaml RECIPE OUT ARGS...`` does,
    checked first and written through a staging directory."""
    from mergekit.config import MergeConfiguration
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    from mergekit_lox.check.documents import load_recipe_documents, read_recipe_text, without_name
    from mergekit_lox.files.output import staged_output
    from mergekit_lox.run.safety import mergekit_logged_errors, output_verifier

    args = list(mergekit_args)
    options = command_options(mergekit_yaml, [recipe, out, *args])
    require_valid(recipe, unsafe_truncate_embeddings=bool(options.get("unsafe_truncate_embeddings")))
    documents = [d for d in load_recipe_documents(read_recipe_text(recipe)) if d is not None]
    config = MergeConfiguration.model_validate(without_name(documents[0]))
    with prepared_run(recipe, documents, options, out, [out], [out]), mergekit_logged_errors() as logged:
        verify = output_verifier(
            out,
            config,
            copy_tokenizer=bool(options.get("copy_tokenizer", True)),
            write_model_card=bool(options.get("write_model_card", True)),
            logged=logged,
            strict=strict,
        )
        with staged_output(out, verify=verify) as staging:
            mergekit_yaml.main(args=[recipe, staging, *args], prog_name="mergekit-yaml", standalone_mode=False)
