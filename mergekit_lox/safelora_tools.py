"""Safe LoRA beyond the per-tensor kernel: number mode and adapter projection.

- ``safelora-select`` (number mode): Safe LoRA's reference can project "the N
  layers with the lowest cosine", a decision across tensors that a per-tensor
  merge kernel cannot make. We plan the recipe with mergekit's own planner and
  stream it through mergekit's executor, computing the cosine of every tensor
  the merge would compute (same loaders, same per-tensor parameters, same dtype
  alignment, same kernel function ``safelora.projection_cosine``), then write
  the recipe back with ``threshold`` = the N-th lowest cosine.
- ``safelora-adapter``: projects a PEFT LoRA adapter itself. With
  dW = s B A (s = lora_alpha / r), C dW = s (C B) A, so replacing B by C B in
  the modules Safe LoRA projects gives an adapter that, merged, equals the
  ``safelora_project`` merge of the same inputs.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import yaml

from mergekit_lox import safelora
from mergekit_lox.finite import require_finite, require_finite_tensor
from mergekit_lox.lora_targets import ADAPTER_CONFIG, ADAPTER_WEIGHTS, module_name
from mergekit_lox.roles import ALIGNED, FINETUNED, resolve_roles

ADAPTER_REPORT = "safelora.json"
LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"
# LoraConfig fields that change what a stored (A, B) pair means; the adapter
# path supports plain LoRA on linear layers only and refuses the rest.
UNSUPPORTED_LORA_OPTIONS = (
    "use_dora",
    "lora_bias",
    "fan_in_fan_out",
    "modules_to_save",
    "trainable_token_indices",
    "target_parameters",
    "layer_replication",
    "use_qalora",
    "use_bdlora",
    "alora_invocation_tokens",
)


class SafeLoRAToolError(ValueError):
    """Bad input to safelora-select / safelora-adapter; the message names the culprit."""


@dataclass(frozen=True)
class Scored:
    """One decision unit (a tensor of a recipe, a module of an adapter) and its cosine."""

    name: str
    cos: float


def finite_or_none(value: torch.Tensor) -> Optional[float]:
    value = float(value)
    return value if math.isfinite(value) else None


def select_lowest(scores: Sequence[Scored], num_layers: int, what: str) -> Tuple[float, List[Scored]]:
    """Safe LoRA's number mode: ``threshold`` = the N-th lowest cosine.

    As the reference (``np.sort(cos)[:N][-1]`` then ``cos <= thrs``), every unit
    at or below that cosine is projected, so ties at the N-th value select more
    than N. Units without a cosine (V == 0, dW == 0, 1-D) never count.
    """
    ranked = sorted(scores, key=lambda s: (s.cos, s.name))
    if num_layers < 1:
        raise SafeLoRAToolError(f"--num-layers must be at least 1, got {num_layers}")
    if num_layers > len(ranked):
        raise SafeLoRAToolError(
            f"--num-layers {num_layers} but {what} has only {len(ranked)} "
            "tensor(s) with a Safe LoRA cosine (2-D or more, V != 0, dW != 0)"
        )
    threshold = ranked[num_layers - 1].cos
    return threshold, [s for s in ranked if s.cos <= threshold]


def refuse_inside(out: str, inputs: Sequence[Tuple[str, str]]) -> None:
    """Never write into an input model's (or adapter's) directory: (label, path) pairs."""
    from mergekit_lox.output import is_within

    for label, path in inputs:
        if path and os.path.isdir(path):
            if is_within(out, path):
                raise SafeLoRAToolError(f"output {out} is inside the {label} directory {path}; choose another path")


# --------------------------------------------------------------------------- number mode


def _cosine_task_class():
    """Built lazily: importing mergekit's graph costs seconds, `--help` should not."""
    from mergekit.graph import Task
    from mergekit.merge_methods.base import TensorEntry, TensorGroup, TensorMetadata
    from mergekit.merge_methods.dtype import align_dtype
    from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask

    class SafeLoRACosine(Task[Optional[float]]):
        """The cosine the ``safelora_project`` kernel would compute for one tensor.

        Wraps the merge task mergekit planned for that tensor: same inputs
        (loaders, aliases, vocabulary handling), same resolved parameters,
        same dtype alignment as ``GroupMergeMethod._execute``.
        """

        merge: ExecuteMergeMethodTask

        def arguments(self):
            return {"tensors": self.merge.gather_tensors}

        def group_label(self):
            return self.merge.group_label()

        def uses_accelerator(self) -> bool:
            return True

        def execute(self, tensors, **_kwargs) -> Optional[float]:
            merge = self.merge
            entries = tuple(
                TensorEntry(id=model, tensor=tensor, is_base=model == merge.base_model)
                for model in merge.model_order
                if (tensor := tensors.get(model)) is not None
            )
            if len(entries) < len(merge.model_order) or not all(
                e.tensor.is_floating_point() for e in entries
            ):
                return None
            name = merge.output_weight.name
            group = align_dtype(
                TensorGroup(entries=entries, metadata=TensorMetadata.from_weight_info(merge.output_weight))
            )
            require_finite(group)  # as the kernel does: a NaN input is an error, not a skipped tensor
            roles = resolve_roles(
                safelora.NAME,
                {e.id: merge.input_parameters[e.id]["role"] for e in group.non_base},
                where=name,
            )
            by_id = {e.id: e.tensor for e in group.non_base}
            finetuned = by_id[roles[FINETUNED]]
            if finetuned.ndim < 2:
                return None
            cos, _, _ = safelora.projection_cosine(
                finetuned,
                by_id[roles[ALIGNED]],
                group.base.tensor,
                merge.parameters["projection"],
                merge.parameters["rank"],
            )
            return finite_or_none(cos)

    return SafeLoRACosine


def read_recipe(recipe: str) -> dict:
    """The one YAML document of ``recipe``, checked to be a safelora_project recipe."""
    try:
        with open(recipe, encoding="utf-8") as f:
            documents = [d for d in yaml.safe_load_all(f) if d is not None]
    except OSError as error:
        raise SafeLoRAToolError(f"cannot read recipe {recipe}: {error.strerror}") from error
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
            f"recipe {recipe} has merge_method {document.get('merge_method')!r}; "
            f"safelora-select needs {safelora.NAME}"
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
    from mergekit.architecture import get_architecture_info
    from mergekit.config import MergeConfiguration
    from mergekit.graph import Executor
    from mergekit.io.tasks import LoaderCache, SaveTensor
    from mergekit.merge import _model_out_config
    from mergekit.options import MergeOptions
    from mergekit.plan import MergePlanner
    from pydantic import ValidationError

    import mergekit_lox  # noqa: F401 - registration and planner role checks

    try:
        config = MergeConfiguration.model_validate(read_recipe(recipe))
    except ValidationError as error:
        raise SafeLoRAToolError(f"recipe {recipe} is not a valid mergekit recipe: {error}") from error
    options = MergeOptions(lora_merge_cache=lora_merge_cache, device=device, quiet=quiet)
    arch_info = get_architecture_info(config, options)
    LoaderCache().setup(options=options)
    out_config = _model_out_config(config, arch_info, trust_remote_code=options.trust_remote_code)
    # plan_to_disk only builds tasks; nothing is written unless they execute.
    # (plan_in_memory fails in mergekit 0.1.5: ReturnTensor cannot validate its
    # generic Task[Tensor] field.)
    planned = MergePlanner(config, arch_info, options=options, out_model_config=out_config).plan_to_disk(
        out_path=os.devnull
    )

    cosine_task = _cosine_task_class()
    tasks = [cosine_task(merge=p.tensor_task) for p in planned if isinstance(p, SaveTensor)]
    executor = Executor(targets=tasks, math_device=options.device, storage_device="cpu")
    scores = [
        Scored(task.merge.output_weight.name, cos)
        for task, cos in executor.run(quiet=quiet, desc="Safe LoRA cosines")
        if cos is not None
    ]
    LoaderCache().flush_all()
    return scores


def write_selected_recipe(recipe: str, out: str, threshold: float, selected: Sequence[Scored], num_layers: int) -> None:
    document = read_recipe(recipe)
    parameters = document.get("parameters") or {}
    parameters["threshold"] = threshold
    document["parameters"] = parameters
    header = (
        f"# Written by `mergekit-lox safelora-select {os.path.basename(recipe)} --num-layers {num_layers}`:\n"
        f"# threshold = Safe LoRA cosine number {num_layers} from the lowest ({selected[num_layers - 1].name});\n"
        f"# {len(selected)} tensor(s) have a cosine at or below it and are projected.\n"
    )
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        f.write(header)
        yaml.safe_dump(document, f, sort_keys=False)


def recipe_inputs(recipe: str) -> List[Tuple[str, str]]:
    """Local directories a recipe reads (models and LoRA adapters), labelled."""
    document = read_recipe(recipe)
    models = document.get("models")
    refs = [document.get("base_model")] + [
        m.get("model") for m in (models if isinstance(models, list) else []) if isinstance(m, dict)
    ]
    return [
        ("input model", part) for ref in refs for part in str(ref or "").split("+") if part and os.path.isdir(part)
    ]


def safelora_select(
    recipe: str,
    num_layers: int,
    out: str,
    *,
    lora_merge_cache: Optional[str] = None,
    device: str = "cpu",
    echo: Callable[[str], None] = print,
) -> Tuple[float, List[Scored]]:
    """Number mode: write ``out`` = ``recipe`` with threshold = N-th lowest cosine."""
    refuse_inside(out, recipe_inputs(recipe))
    if lora_merge_cache is None:
        lora_merge_cache = default_lora_merge_cache(out)
    scores = recipe_cosines(recipe, lora_merge_cache=lora_merge_cache, device=device)
    threshold, selected = select_lowest(scores, num_layers, f"recipe {recipe}")
    write_selected_recipe(recipe, out, threshold, selected, num_layers)
    echo(f"threshold {threshold!r}: cosine number {num_layers} from the lowest, of {len(scores)}")
    echo_selection(selected, num_layers, "tensor", echo)
    echo(f"wrote {out}")
    return threshold, selected


def echo_selection(selected: Sequence[Scored], num_layers: int, what: str, echo) -> None:
    if len(selected) > num_layers:
        echo(f"{len(selected)} {what}s tie at or below the threshold; all are projected")
    echo(f"{'cosine':>10}  {what}")
    for s in selected:
        echo(f"{s.cos:10.6f}  {s.name}")


def default_lora_merge_cache(out: str) -> str:
    """``OUT.lora-cache`` beside OUT: where `aligned+adapter` references get merged."""
    return os.path.abspath(out).rstrip(os.sep) + ".lora-cache"


# --------------------------------------------------------------------------- adapters


@dataclass
class AdapterModule:
    """One LoRA module: ``dW = scaling * B @ A`` on ``weight`` of the model."""

    module: str  # e.g. model.layers.0.self_attn.q_proj
    weight: str  # e.g. model.layers.0.self_attn.q_proj.weight
    key_a: str
    key_b: str
    scaling: float
    cos: Optional[float] = None
    projected_b: Optional[torch.Tensor] = None
    projected: bool = False


def read_lora_config(adapter: str):
    from peft import LoraConfig, PeftConfig

    if not os.path.isfile(os.path.join(adapter, ADAPTER_CONFIG)):
        raise SafeLoRAToolError(f"adapter {adapter} has no {ADAPTER_CONFIG}: not a PEFT adapter directory")
    try:
        config = PeftConfig.from_pretrained(adapter)
    except Exception as error:  # noqa: BLE001 - PEFT raises many kinds; say which file
        raise SafeLoRAToolError(f"cannot read {os.path.join(adapter, ADAPTER_CONFIG)}: {error}") from error
    if not isinstance(config, LoraConfig):
        raise SafeLoRAToolError(f"adapter {adapter} is a {config.peft_type} adapter; safelora-adapter needs LoRA")
    for option in UNSUPPORTED_LORA_OPTIONS:
        if getattr(config, option, None):
            raise SafeLoRAToolError(
                f"adapter {adapter} uses {option}={getattr(config, option)!r}, which safelora-adapter does "
                "not support (plain LoRA on linear layers only); merge it and use safelora_project instead"
            )
    return config


def module_scaling(config, module: str, r: int) -> float:
    """PEFT's ``scaling``: lora_alpha / r (or / sqrt(r) with rsLoRA), per-module patterns."""
    from peft.utils.other import get_pattern_key

    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
    return alpha / math.sqrt(r) if config.use_rslora else alpha / r


def adapter_modules(adapter: str, config, tensors: Mapping[str, torch.Tensor]) -> List[AdapterModule]:
    """Pair every lora_A with its lora_B; refuse any tensor that is not such a pair."""
    from peft.utils.other import get_pattern_key

    modules = []
    for key in tensors:
        if key.endswith(LORA_B):
            continue
        if not key.endswith(LORA_A):
            raise SafeLoRAToolError(
                f"adapter {adapter}: tensor {key} is not a lora_A/lora_B weight; "
                "safelora-adapter supports plain LoRA on linear layers only"
            )
        stem = key[: -len(LORA_A)]
        key_b = stem + LORA_B
        if key_b not in tensors:
            raise SafeLoRAToolError(f"adapter {adapter}: {key} has no matching {key_b}")
        module = module_name(stem)
        A, B = tensors[key], tensors[key_b]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise SafeLoRAToolError(
                f"adapter {adapter}: module {module} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}, "
                "not a linear LoRA pair (B: out x r, A: r x in)"
            )
        r = A.shape[0]
        expected_r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
        if r != expected_r:
            raise SafeLoRAToolError(f"adapter {adapter}: module {module} has rank {r} but its config says r={expected_r}")
        modules.append(AdapterModule(module, module + ".weight", key, key_b, module_scaling(config, module, r)))
    for key in tensors:
        if key.endswith(LORA_B) and key[: -len(LORA_B)] + LORA_A not in tensors:
            raise SafeLoRAToolError(f"adapter {adapter}: {key} has no matching lora_A")
    if not modules:
        raise SafeLoRAToolError(f"adapter {adapter}: {ADAPTER_WEIGHTS} holds no LoRA modules")
    return modules


def _model_loader(path: str, label: str):
    from mergekit.io import LazyTensorLoader

    try:
        return LazyTensorLoader.from_disk(path, lazy_unpickle=True)
    except Exception as error:  # noqa: BLE001 - mergekit raises RuntimeError/FileNotFoundError
        raise SafeLoRAToolError(f"{label} model {path}: {error}") from error


def _load(loader, name: str, label: str, path: str, module: str, device: str) -> torch.Tensor:
    if name not in loader.index.tensor_paths:
        raise SafeLoRAToolError(f"tensor {name} (adapter module {module}) not found in {label} model {path}")
    return loader.get_tensor(name, device=device)


def score_adapter_modules(
    base: str,
    aligned: str,
    modules: Sequence[AdapterModule],
    tensors: Mapping[str, torch.Tensor],
    projection: str,
    rank: int,
    device: str = "cpu",
    adapter: str = "adapter",
) -> None:
    """Fill each module's cosine and C B, loading one base/aligned weight pair at a time."""
    base_loader = _model_loader(base, "base")
    aligned_loader = _model_loader(aligned, "aligned")
    for m in modules:
        W_b = _load(base_loader, m.weight, "base", base, m.module, device)
        W_a = _load(aligned_loader, m.weight, "aligned", aligned, m.module, device)
        A = tensors[m.key_a].to(device)
        B = tensors[m.key_b].to(device)
        for tensor, name, source, kind in (
            (W_b, m.weight, base, "model"),
            (W_a, m.weight, aligned, "model"),
            (A, m.key_a, adapter, "adapter"),
            (B, m.key_b, adapter, "adapter"),
        ):
            require_finite_tensor(tensor, name, source, kind)
        if W_a.shape != W_b.shape or W_a.shape != (B.shape[0], A.shape[1]):
            raise SafeLoRAToolError(
                f"module {m.module}: base {tuple(W_b.shape)}, aligned {tuple(W_a.shape)} and "
                f"LoRA B A {(B.shape[0], A.shape[1])} shapes differ"
            )
        dtype = torch.float64 if torch.float64 in (W_a.dtype, W_b.dtype, A.dtype, B.dtype) else torch.float32
        alignment = W_a.to(dtype) - W_b.to(dtype)
        update = m.scaling * (B.to(dtype) @ A.to(dtype))
        cos, _ = safelora.update_cosine(alignment, update, projection, rank)
        m.cos = finite_or_none(cos)
        # C B with the same C: merged, s (C B) A = C dW, the kernel's projected update.
        m.projected_b = safelora.project_update(alignment, B.to(dtype), projection, rank).cpu()
        del W_b, W_a, alignment, update
    base_loader.flush()
    aligned_loader.flush()


def write_adapter(adapter: str, out: str, tensors: Dict[str, torch.Tensor], metadata, report: dict) -> None:
    """Write the projected adapter completely into a staging folder, then move it to ``out``."""
    from safetensors.torch import save_file

    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise SafeLoRAToolError(f"output {out} already exists and is not an empty directory")
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=os.path.basename(os.path.abspath(out)) + ".incomplete-", dir=parent)
    try:
        for entry in os.listdir(adapter):
            source = os.path.join(adapter, entry)
            if entry != ADAPTER_WEIGHTS and os.path.isfile(source):
                shutil.copy2(source, os.path.join(staging, entry))
        save_file(tensors, os.path.join(staging, ADAPTER_WEIGHTS), metadata=metadata)
        with open(os.path.join(staging, ADAPTER_REPORT), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        if os.path.isdir(out):
            os.rmdir(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def safelora_adapter(
    base: str,
    aligned: str,
    adapter: str,
    out: str,
    *,
    threshold: Optional[float] = None,
    num_layers: Optional[int] = None,
    projection: str = "scaled",
    rank: int = 8,
    device: str = "cpu",
    echo: Callable[[str], None] = print,
) -> List[AdapterModule]:
    """Project a PEFT LoRA adapter trained on ``aligned``; write a PEFT adapter to ``out``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if threshold is not None and num_layers is not None:
        raise SafeLoRAToolError("give --threshold or --num-layers, not both")
    if projection not in ("scaled", "orthogonal"):
        raise SafeLoRAToolError(f"projection must be scaled or orthogonal, got {projection!r}")
    if rank < 1:
        raise SafeLoRAToolError(f"rank must be at least 1, got {rank}")
    if threshold is None and num_layers is None:
        threshold = 0.5
    for path, label in ((base, "base model"), (aligned, "aligned model"), (adapter, "adapter")):
        if not os.path.isdir(path):
            raise SafeLoRAToolError(f"{label} {path} is not a directory")
    refuse_inside(out, [("base model", base), ("aligned model", aligned), ("adapter", adapter)])

    config = read_lora_config(adapter)
    weights = os.path.join(adapter, ADAPTER_WEIGHTS)
    if not os.path.isfile(weights):
        raise SafeLoRAToolError(f"adapter {adapter} has no {ADAPTER_WEIGHTS} (only safetensors adapters are supported)")
    tensors = load_file(weights)
    with safe_open(weights, framework="pt") as f:
        metadata = f.metadata() or {"format": "pt"}
    modules = adapter_modules(adapter, config, tensors)
    score_adapter_modules(base, aligned, modules, tensors, projection, rank, device, adapter)

    scored = [Scored(m.module, m.cos) for m in modules if m.cos is not None]
    if num_layers is not None:
        threshold, _ = select_lowest(scored, num_layers, f"adapter {adapter}")
    selected = sorted((s for s in scored if s.cos <= threshold), key=lambda s: (s.cos, s.name))
    chosen = {s.name for s in selected}
    output = dict(tensors)
    for m in modules:
        m.projected = m.module in chosen
        if m.projected:
            output[m.key_b] = m.projected_b.to(tensors[m.key_b].dtype).contiguous()

    report = {
        "base_model": base,
        "aligned_model": aligned,
        "adapter": adapter,
        "projection": projection,
        "rank": rank,
        "threshold": threshold,
        "num_layers": num_layers,
        "modules": [
            {"module": m.module, "scaling": m.scaling, "cos": m.cos, "projected": m.projected} for m in modules
        ],
    }
    write_adapter(adapter, out, output, metadata, report)
    echo(f"threshold {threshold!r}: {len(selected)} of {len(modules)} LoRA modules projected (B' = C B)")
    echo_selection(selected, num_layers or len(selected), "module", echo)
    echo(f"wrote {out}")
    return modules
