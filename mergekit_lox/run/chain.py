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
- each stage records what it was computed from (``mergekit_lox_stage.yml``:
  its document and those of the stages it uses); a completed stage whose
  record no longer matches the recipe is an error instead of being silently
  reused;
- no stage is written inside an input model's directory (output.py);
- each stage is built in a staging directory and appears only once complete,
  so a failed or interrupted stage is never reused as finished.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import yaml

from mergekit_lox.files.output import STAGE_RECORD
from mergekit_lox.run import RunError


class ChainError(RunError):
    """The chain cannot run as written; nothing has been computed."""


def document_count(recipe: str) -> int:
    """How many YAML documents ``recipe`` holds (a chain has more than one)."""
    from mergekit_lox.check.documents import load_recipe_documents, read_recipe_text

    return len(load_recipe_documents(read_recipe_text(recipe)))


def is_chain(recipe: str) -> bool:
    try:
        return document_count(recipe) > 1
    except (ValueError, yaml.YAMLError):
        return False  # the one-document path's check reports it (with the YAML line)


def default_intermediate_dir(out: str) -> str:
    """``OUT.intermediate`` beside ``OUT``."""
    return os.path.normpath(out) + ".intermediate"


def _is_complete(path: str) -> bool:
    """mergekit-multi's own test for a stage it will skip."""
    from mergekit_lox.mergekit_compat import multimerge_model_files

    return os.path.exists(os.path.join(path, "config.json")) and any(
        os.path.exists(os.path.join(path, name)) for name in multimerge_model_files()
    )


def stage_records(documents: List[dict], dependencies: Dict[Optional[str], set]) -> Dict[Optional[str], str]:
    """What each stage is computed from: its own document (as mergekit normalises it,
    references by name, so independent of the intermediate directory) followed by
    the records of the stages it uses, so a change upstream shows downstream too."""
    from mergekit.config import MergeConfiguration

    from mergekit_lox.check.documents import without_name

    own = {d.get("name"): MergeConfiguration.model_validate(without_name(d)).to_yaml() for d in documents}
    records: Dict[Optional[str], str] = {}

    def record(name):
        if name not in records:
            used = "".join(f"\n# uses stage {dep}:\n{record(dep)}" for dep in sorted(dependencies[name]))
            records[name] = own[name] + "\n" + used
        return records[name]

    for name in own:
        record(name)
    return records


def _stages_to_compute(
    recipe: str, records: Dict[Optional[str], str], outputs: Dict[Optional[str], str], lazy: bool
) -> Dict[str, str]:
    """Refuse to reuse a completed stage computed from another recipe; return the
    record (what it is computed from) of every stage about to be computed, by
    output directory. The record is written with the stage, once it is complete."""
    to_compute = {}
    for name, text in records.items():
        target = outputs[name]
        path = os.path.join(target, STAGE_RECORD)
        if lazy and _is_complete(target):
            # mergekit-multi will reuse it: it must come from these very documents. A
            # stage completed by plain mergekit-multi has no record to compare with.
            if os.path.exists(path):
                with open(path, "r", encoding="utf-8") as f:
                    if f.read() != text:
                        stage = f"stage {name!r}" if name else "the final document"
                        raise ChainError(
                            f"{recipe}: {stage} in {target} was computed from a different document "
                            "(its own or a stage it uses); delete that directory or pass --no-lazy"
                        )
            continue
        to_compute[os.path.abspath(target)] = text
    return to_compute


def _staged_stages(records: Dict[str, str], logged: List[BaseException], strict: bool = False):
    """Build every stage mergekit-multi computes in a staging directory (files/output.py).

    For the duration of the chain, each stage mergekit-multi runs is written
    into ``staged_output(out_path)`` instead, with the stage's record, and
    appears at ``out_path`` only once complete and verified (safety.py). A
    stage that fails or is interrupted leaves nothing that mergekit-multi's
    ``--lazy`` would mistake for a finished stage on the next run. Its
    ``stage+adapter`` references are merged (lora_cache.py) once the stage
    they use exists.
    """
    from mergekit_lox.files.output import staged_output
    from mergekit_lox.mergekit_compat import multimerge_stages
    from mergekit_lox.run.lora_cache import merge_loras
    from mergekit_lox.run.safety import output_verifier

    def run_stage(run_merge, config, out_path, options, **kwargs):
        merge_loras(
            [config],
            options.lora_merge_cache,
            trust_remote_code=options.trust_remote_code,
            lora_merge_dtype=options.lora_merge_dtype,
        )
        logged.clear()
        verify = output_verifier(
            out_path,
            config,
            copy_tokenizer=options.copy_tokenizer,
            write_model_card=options.write_model_card,
            logged=logged,
            strict=strict,
        )
        with staged_output(out_path, verify=verify) as staging:
            run_merge(config, staging, options=options, **kwargs)
            record = records.get(os.path.abspath(out_path))
            if record is not None and os.path.isdir(staging):
                with open(os.path.join(staging, STAGE_RECORD), "w", encoding="utf-8") as f:
                    f.write(record)

    return multimerge_stages(run_stage)


def run_chain(
    recipe: str,
    out: str,
    intermediate_dir: Optional[str] = None,
    mergekit_args: Sequence[str] = (),
    strict: bool = False,
) -> Dict[Optional[str], str]:
    """Check, then run a multi-document recipe exactly as
    ``mergekit-multi RECIPE -I INTERMEDIATE_DIR --out-path OUT ARGS...`` does,
    each stage written through a staging directory.

    Returns where each stage was written (name, None for the final, -> dir).
    """
    from mergekit.scripts.multimerge import load_config
    from mergekit.scripts.multimerge import main as mergekit_multi

    from mergekit_lox.check.documents import load_recipe_documents, read_recipe_text
    from mergekit_lox.run.document import command_options, prepared_run, require_valid
    from mergekit_lox.run.safety import mergekit_logged_errors

    intermediate_dir = intermediate_dir or default_intermediate_dir(out)
    args: List[str] = list(mergekit_args)
    multi_args = [recipe, "--intermediate-dir", intermediate_dir, "--out-path", out, *args]
    options = command_options(mergekit_multi, multi_args)
    require_valid(recipe, unsafe_truncate_embeddings=bool(options.get("unsafe_truncate_embeddings")))

    source = read_recipe_text(recipe)
    configs, dependencies = load_config(source, intermediate_dir)
    outputs = {name: (out if name is None else os.path.join(intermediate_dir, name)) for name in configs}
    lazy = bool(options.get("lazy", True))
    documents = load_recipe_documents(source)
    to_compute = _stages_to_compute(recipe, stage_records(documents, dependencies), outputs, lazy)
    with prepared_run(recipe, documents, options, out, outputs.values(), to_compute):
        with mergekit_logged_errors() as logged, _staged_stages(to_compute, logged, strict):
            mergekit_multi.main(args=multi_args, prog_name="mergekit-multi", standalone_mode=False)
    return outputs
