"""`safelora-select`: Safe LoRA's number mode, as a recipe with the equivalent threshold."""

from __future__ import annotations

import os
from typing import Callable, List, Optional, Sequence, Tuple

import yaml

from mergekit_lox.methods import safelora
from mergekit_lox.methods.inputs import ALIGNED, FINETUNED, finite_or_none, role_tensors
from mergekit_lox.run.lora_cache import default_lora_merge_cache
from mergekit_lox.safelora_tools.common import (
    SafeLoRAToolError,
    Scored,
    echo_selection,
    refuse_inside,
    select_lowest,
)


def tensor_cosine(group, input_parameters: dict, parameters: dict) -> Optional[float]:
    """The cosine the ``safelora_project`` kernel would compute for one tensor group
    (None for a 1-D tensor, V == 0 or dW == 0): the kernel's own input checks
    (``role_tensors``: a NaN input is an error, not a skipped tensor) and decision."""
    inputs = role_tensors(safelora.ROLES, group, {e.id: input_parameters[e.id]["role"] for e in group.non_base})
    if inputs[FINETUNED].ndim < 2:
        return None
    cos, _, _ = safelora.projection_cosine(
        inputs[FINETUNED], inputs[ALIGNED], inputs["base"], parameters["projection"], parameters["rank"]
    )
    return finite_or_none(cos)


def read_recipe(recipe: str) -> dict:
    """The one YAML document of ``recipe``, checked to be a safelora_project recipe."""
    from mergekit_lox.check.documents import RecipeReadError, load_recipe_documents, read_recipe_text

    try:
        documents = [d for d in load_recipe_documents(read_recipe_text(recipe)) if d is not None]
    except RecipeReadError as error:
        raise SafeLoRAToolError(f"recipe {recipe}: {error}") from error
    except yaml.YAMLError as error:
        raise SafeLoRAToolError(f"recipe {recipe} is not valid YAML: {error}") from error
    if len(documents) != 1 or not isinstance(documents[0], dict):
        raise SafeLoRAToolError(
            f"recipe {recipe} must be one YAML mapping (got {len(documents)} document(s)); "
            "for a chain, run safelora-select on the safelora_project step alone"
        )
    document = documents[0]
    if document.get("merge_method") != safelora.NAME:
        raise SafeLoRAToolError(
            f"recipe {recipe} has merge_method {document.get('merge_method')!r}; safelora-select needs {safelora.NAME}"
        )
    return document


def recipe_cosines(
    recipe: str,
    *,
    lora_merge_cache: Optional[str] = None,
    device: str = "cpu",
    quiet: bool = True,
) -> List[Scored]:
    """Every tensor's Safe LoRA cosine, streamed one tensor at a time.

    ``aligned+adapter`` references are merged by mergekit itself
    (``ModelReference.merged``) into ``lora_merge_cache``, as a merge would.
    """
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions
    from pydantic import ValidationError

    from mergekit_lox.mergekit_compat import forget_loaded_models, planned_tensor_results
    from mergekit_lox.methods import register_all
    from mergekit_lox.run.lora_cache import merge_loras

    register_all()  # the start-up hook has done it already; this says so
    document = read_recipe(recipe)
    try:
        config = MergeConfiguration.model_validate(document)
    except ValidationError as error:
        raise SafeLoRAToolError(f"recipe {recipe} is not a valid mergekit recipe: {error}") from error
    merge_loras([document], lora_merge_cache)  # keyed by content, as `run` does
    forget_loaded_models()  # read the models as they are on disk now
    options = MergeOptions(lora_merge_cache=lora_merge_cache, device=device, quiet=quiet)
    results = planned_tensor_results(config, options, tensor_cosine, desc="Safe LoRA cosines")
    return [Scored(name, cos) for name, cos in results]


def recipe_cosine_accuracy(document: dict) -> float:
    """``safelora.cosine_accuracy`` for the recipe's ``projection`` and ``svd``; the
    loosest one when either is given per tensor (a list of filters)."""
    parameters = document.get("parameters") or {}
    projection, svd = parameters.get("projection", "scaled"), parameters.get("svd", "auto")
    if not isinstance(projection, str) or not isinstance(svd, str):
        return safelora.cosine_accuracy("orthogonal", "auto")
    return safelora.cosine_accuracy(projection, svd)


def write_selected_recipe(recipe: str, out: str, threshold: float, selected: Sequence[Scored], num_layers: int) -> None:
    document = read_recipe(recipe)
    parameters = document.get("parameters") or {}
    parameters["threshold"] = threshold
    document["parameters"] = parameters
    header = (
        f"{WRITTEN_BY} {os.path.basename(recipe)} --num-layers {num_layers}`:\n"
        f"# threshold = midway between Safe LoRA cosine number {num_layers} from the lowest "
        f"({selected[num_layers - 1].name}) and the next higher one;\n"
        f"# {len(selected)} tensor(s) have a cosine below it and are projected.\n"
    )
    from mergekit_lox.files.output import atomic_write_text

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    atomic_write_text(out, header + yaml.safe_dump(document, sort_keys=False))


# The first line of every recipe safelora-select writes: the only files it overwrites.
WRITTEN_BY = "# Written by `mergekit-lox safelora-select"


def refuse_to_overwrite(recipe: str, out: str) -> None:
    """``out`` may be new or a recipe safelora-select wrote; never its input recipe,
    nor any other file."""
    if not os.path.lexists(out):
        return
    if os.path.isdir(out):
        raise SafeLoRAToolError(f"output {out} is a directory: give the path of the recipe file to write")
    if os.path.exists(recipe) and os.path.samefile(recipe, out):
        raise SafeLoRAToolError(f"output {out} is the input recipe {recipe}: give -o another path")
    try:
        with open(out, "r", encoding="utf-8") as f:
            first = f.readline()
    except (OSError, UnicodeDecodeError):
        first = ""
    if not first.startswith(WRITTEN_BY):
        raise SafeLoRAToolError(
            f"output {out} already exists and was not written by safelora-select: "
            "give -o a new path, or remove that file"
        )


def recipe_inputs(recipe: str) -> List[Tuple[str, str]]:
    """Local directories a recipe reads (models, LoRA adapters, tokenizer donors), labelled."""
    from mergekit_lox.files.output import local_model_dirs

    return [("input model", path) for path in local_model_dirs([read_recipe(recipe)])]


def safelora_select(
    recipe: str,
    num_layers: int,
    out: str,
    *,
    lora_merge_cache: Optional[str] = None,
    device: str = "cpu",
    echo: Callable[[str], None] = print,
) -> Tuple[float, List[Scored]]:
    """Number mode: write ``out`` = ``recipe`` with a threshold between the N-th lowest
    cosine and the next (``select_lowest``)."""
    inputs = recipe_inputs(recipe)
    refuse_inside(out, inputs)
    refuse_to_overwrite(recipe, out)
    if lora_merge_cache is None:
        lora_merge_cache = default_lora_merge_cache(out)
    refuse_inside(lora_merge_cache, inputs, option="--lora-merge-cache")  # merged copies are written there
    scores = recipe_cosines(recipe, lora_merge_cache=lora_merge_cache, device=device)
    accuracy = recipe_cosine_accuracy(read_recipe(recipe))
    threshold, selected = select_lowest(scores, num_layers, f"recipe {recipe}", accuracy=accuracy, warn=echo)
    write_selected_recipe(recipe, out, threshold, selected, num_layers)
    echo(
        f"threshold {threshold!r}: midway between cosine number {num_layers} from the lowest "
        f"and the next, of {len(scores)}"
    )
    echo_selection(selected, num_layers, "tensor", echo)
    echo(f"wrote {out}")
    return threshold, selected
