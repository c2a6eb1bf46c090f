"""Every touch of mergekit internals, in one place.

Written for mergekit 0.1.5 (``MERGEKIT_VERSION``). Each patch says what it buys. When
another mergekit version is installed, the patches are skipped with one
warning naming that version: the methods still register (through mergekit's
public ``register``) and their kernels still check roles and inputs, but the
plan-time errors degrade to first-kernel errors and chain stages are not
staged.

Private names used (they may move in another version): ``mergekit.merge.
_model_out_config`` (the output config a merge would write, for planning
without merging) and ``ModelReference._unique_id`` (mergekit's LoRA cache key);
``planned_tensor_results`` wraps mergekit's planned merge tasks in a ``Task`` of
its own (safelora-select's per-tensor cosines). The architecture fit uses
``mergekit.architecture.base._prefix_weight`` and transformers 5's
``conversion_mapping.get_model_conversion_mapping`` / ``core_model_loading.
rename_source_key`` (without them, names are compared as they are);
``converted_layout`` walks transformers' conversion mapping with
``mergekit.architecture.conversion``'s ``_iter_transform_matches`` and ``_expanded_target_keys``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import warnings
from typing import Callable, Dict, Iterator, List, Optional, Tuple

MERGEKIT_VERSION = "0.1.5"

_warned = False


def installed_version() -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mergekit")
    except PackageNotFoundError:
        return None


def patches_apply() -> bool:
    """True when the installed mergekit is the version these patches were written for;
    otherwise warns once, naming the version, and the patches are skipped."""
    global _warned
    found = installed_version()
    if found == MERGEKIT_VERSION:
        return True
    if not _warned:
        _warned = True
        warnings.warn(
            f"mergekit-lox: mergekit {found} is installed, its patches were written for "
            f"{MERGEKIT_VERSION}; they are skipped (the methods still work, some errors come later)",
            RuntimeWarning,
            stacklevel=2,
        )
    return False


def _install(owner, name: str, wrap: Callable[[Callable], Callable]) -> bool:
    """Replace ``owner.name`` by ``wrap(original)``, once (the wrapper is marked), and
    only when the patches apply. Returns whether the wrapper is in place."""
    original = getattr(owner, name)
    if getattr(original, "_mergekit_lox_checks", False):
        return True
    if not patches_apply():
        return False
    patched = functools.wraps(original)(wrap(original))
    patched._mergekit_lox_checks = True
    setattr(owner, name, patched)
    return True


# --------------------------------------------------------------------------- planner checks


def install_plan_checks(
    plan_module,
    check: Callable[[object, Dict, Dict], None],
    explain: Callable[[object, Dict, Exception], Optional[str]],
) -> bool:
    """Wrap ``mergekit.plan.resolve_parameters`` so that parameter problems of
    our methods fail while mergekit plans.

    What it buys: mergekit ignores unknown parameter names and never shows a
    method its per-model parameters before the first tensor is computed, so a
    misspelt role or parameter would be silently dropped or fail hours in.
    ``check(spec, arguments, per_input)`` runs after each successful call;
    ``explain(spec, arguments, error)`` turns a pydantic ValidationError into
    one line (None: not ours, re-raise). Arguments pass through untouched
    (``*args, **kwargs``), so a new mergekit keyword breaks nothing.
    Returns whether the wrap is installed.
    """

    def wrap(original):
        from pydantic import ValidationError

        signature = inspect.signature(original)

        def resolve_parameters(spec, *args, **kwargs):
            try:
                shared, per_input = original(spec, *args, **kwargs)
            except ValidationError as error:
                message = explain(spec, _arguments(signature, spec, args, kwargs), error)
                if message is None:
                    raise
                raise ValueError(message) from error
            check(spec, _arguments(signature, spec, args, kwargs), per_input)
            return shared, per_input

        return resolve_parameters

    return _install(plan_module, "resolve_parameters", wrap)


def _arguments(signature: inspect.Signature, spec, args, kwargs) -> Dict:
    bound = signature.bind(spec, *args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


# --------------------------------------------------------------------------- stored outputs


def install_output_check(tasks_module, check: Callable[[str, str, object], None]) -> bool:
    """Wrap ``mergekit.io.tasks.SaveTensor.execute`` so that every merged tensor is
    passed to ``check(method_name, tensor_name, tensor)`` after the cast to the
    dtype it is stored in, and before it is written.

    What it buys: mergekit casts each result to the recipe's ``out_dtype`` in
    ``SaveTensor``, after the kernel returned, and writes whatever comes out: a
    LoX result beyond float16's range is stored as Inf, exit 0. The kernel never
    sees the storage dtype; this is the one place that does, for `mergekit-lox
    run`, chains and plain `mergekit-yaml` alike. The cast is mergekit's own
    (``dtype_from_name``; ``.to`` of an already cast tensor is a no-op); the
    tensor then goes to the original ``execute`` unchanged. ``check`` decides
    which methods it looks at (ours only). Returns whether the wrap is installed.
    """

    def wrap(original):
        from mergekit.common import dtype_from_name

        def execute(self, writer, tensor):
            method = getattr(self.tensor_task, "method_name", None)
            if tensor is not None and isinstance(method, str):
                if self.dtype:
                    tensor = tensor.to(dtype=dtype_from_name(self.dtype))
                check(method, self.tensor_name, tensor)
            return original(self, writer, tensor)

        return execute

    return _install(tasks_module.SaveTensor, "execute", wrap)


# --------------------------------------------------------------------------- chains


@contextlib.contextmanager
def multimerge_stages(run_stage: Callable) -> Iterator[None]:
    """For the duration, mergekit-multi runs each stage through ``run_stage``.

    What it buys: mergekit-multi writes each stage straight into its output
    folder; ``run_stage(original_run_merge, config, out_path, options, **kwargs)``
    can build it in a staging folder instead. mergekit-multi has no hook for
    this, so its module-level ``run_merge`` is swapped and always restored.
    """
    if not patches_apply():
        yield
        return
    from mergekit.scripts import multimerge

    original = multimerge.run_merge

    def run_merge(config, out_path, options, **kwargs):
        return run_stage(original, config, out_path, options, **kwargs)

    multimerge.run_merge = run_merge
    try:
        yield
    finally:
        multimerge.run_merge = original


def multimerge_model_files():
    """The file names mergekit-multi takes as a finished stage's weights."""
    from mergekit.scripts.multimerge import MODEL_CHECK_FILENAMES

    return MODEL_CHECK_FILENAMES


# --------------------------------------------------------------------------- private names


def model_out_config(config, arch_info, trust_remote_code: bool = False):
    """The output model config a merge of ``config`` would write (private in mergekit)."""
    from mergekit.merge import _model_out_config

    return _model_out_config(config, arch_info, trust_remote_code=trust_remote_code)


def lora_cache_name(reference) -> str:
    """mergekit's own LoRA merge cache key for ``model+adapter`` (``ModelReference.merged``)."""
    return reference.model._unique_id() + "_" + reference.lora._unique_id()


def forget_loaded_models() -> None:
    """Close and drop every model loader mergekit keeps for the life of the process.

    What it buys: ``LoaderCache.loaders`` (a class attribute) keeps one loader,
    with its index and open shard, per model reference: a second run in the same
    process (the demo, a sweep, the Python API, tests) would read a model that
    changed on disk since (a re-merged LoRA, a recomputed chain stage) through
    the first run's loader. Called before each run; costs one index read per model.
    """
    from mergekit.io.tasks import LoaderCache

    cache = LoaderCache()
    cache.flush_all()
    cache.loaders.clear()


# The files ``mergekit.merge._copy_tokenizer`` copies from the donor model, in its order.
_COPIED_TOKENIZER_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "added_tokens.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
    "chat_template.json",
    "video_preprocessor_config.json",
)


def tokenizer_files_copied(config) -> Dict[str, int]:
    """The files mergekit copies verbatim from the donor model into OUT, name -> size
    (empty when it builds the tokenizer otherwise, or the donor is not a local folder).

    Mirrors ``mergekit.merge.run_merge`` / ``_copy_tokenizer``: with no
    ``tokenizer:`` / ``tokenizer_source:`` and no ``chat_template``, the donor
    (base model, else the first model) holds ``tokenizer_config.json`` and
    ``tokenizer.json`` or ``tokenizer.model``. mergekit logs a failed copy and
    carries on; this says what a complete output holds.
    """
    import os

    if config.tokenizer is not None or config.tokenizer_source is not None or config.chat_template:
        return {}
    donor = config.base_model or config.referenced_models()[0]
    path = donor.model.path
    if donor.lora is not None or not os.path.isdir(path):
        return {}
    files = {name: os.path.join(path, name) for name in _COPIED_TOKENIZER_FILES}
    present = {name: os.path.getsize(file) for name, file in files.items() if os.path.isfile(file)}
    if "tokenizer_config.json" not in present or not {"tokenizer.json", "tokenizer.model"} & set(present):
        return {}
    return present


def install_option_errors() -> bool:
    """Make a bad ``--out-shard-size`` a click usage error (exit 2) naming the option.

    What it buys: mergekit's ``ShardSizeParamType.convert`` lets ``parse_kmb``'s
    bare ``ValueError('abc')`` out, which click does not turn into a usage error:
    the run ended with ``error: abc``, exit 1. Returns whether the wrap is installed.
    """
    from mergekit.options import ShardSizeParamType

    def wrap(original):
        def convert(self, value, param, ctx):
            try:
                return original(self, value, param, ctx)
            except (ValueError, IndexError, AttributeError):
                self.fail(
                    f"{value!r} is not a size: a whole number of parameters, or one with K, M or B (500M, 5B)",
                    param,
                    ctx,
                )

        return convert

    return _install(ShardSizeParamType, "convert", wrap)


# --------------------------------------------------------------------------- per-tensor computations on a plan


def planned_tensor_results(
    config, options, compute: Callable[[object, Dict, Dict], object], desc: str
) -> List[Tuple[str, object]]:
    """``(tensor name, compute(group, input_parameters, parameters))`` for every tensor
    a merge of ``config`` (a ``MergeConfiguration``) would write, streamed one tensor
    at a time through mergekit's own planner, loaders and executor; nothing is written.

    ``group`` is the ``TensorGroup`` mergekit's ``GroupMergeMethod`` would hand the
    kernel (same inputs, aliases, vocabulary handling and dtype alignment);
    ``input_parameters`` (model -> its resolved parameters) and ``parameters`` are the
    merge task's resolved per-tensor parameters. A tensor with a missing or
    non-floating input gives no result (None), as does ``compute`` returning None.
    Uses mergekit's internals ``Task``, ``ExecuteMergeMethodTask``' fields and
    ``align_dtype``; ``LoaderCache`` is set up for ``options`` and flushed after.
    """
    import os

    from mergekit.architecture import get_architecture_info
    from mergekit.graph import Executor
    from mergekit.io.tasks import LoaderCache, SaveTensor
    from mergekit.plan import MergePlanner

    arch_info = get_architecture_info(config, options)
    LoaderCache().setup(options=options)
    out_config = model_out_config(config, arch_info, trust_remote_code=options.trust_remote_code)
    # plan_to_disk only builds tasks; nothing is written unless they execute.
    # (plan_in_memory fails in mergekit 0.1.5: ReturnTensor cannot validate its
    # generic Task[Tensor] field.)
    planned = MergePlanner(config, arch_info, options=options, out_model_config=out_config).plan_to_disk(
        out_path=os.devnull
    )
    task_class = _per_tensor_task_class()
    tasks = [task_class(merge=p.tensor_task, compute=compute) for p in planned if isinstance(p, SaveTensor)]
    executor = Executor(targets=tasks, math_device=options.device, storage_device="cpu")
    results = [
        (task.merge.output_weight.name, result)
        for task, result in executor.run(quiet=options.quiet, desc=desc)
        if result is not None
    ]
    LoaderCache().flush_all()
    return results


def _per_tensor_task_class():
    """Built lazily: importing mergekit's graph costs seconds, `--help` should not."""
    from mergekit.graph import Task
    from mergekit.merge_methods.base import TensorEntry, TensorGroup, TensorMetadata
    from mergekit.merge_methods.dtype import align_dtype
    from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask

    class PerTensorResult(Task[Optional[object]]):
        """``compute`` on the inputs of one planned merge task (wrapped, not run):
        the tensor group as ``GroupMergeMethod._execute`` builds it."""

        merge: ExecuteMergeMethodTask
        compute: Callable

        def arguments(self):
            return {"tensors": self.merge.gather_tensors}

        def group_label(self):
            return self.merge.group_label()

        def uses_accelerator(self) -> bool:
            return True

        def execute(self, tensors, **_kwargs):
            merge = self.merge
            entries = tuple(
                TensorEntry(id=model, tensor=tensor, is_base=model == merge.base_model)
                for model in merge.model_order
                if (tensor := tensors.get(model)) is not None
            )
            if len(entries) < len(merge.model_order) or not all(e.tensor.is_floating_point() for e in entries):
                return None
            group = align_dtype(
                TensorGroup(entries=entries, metadata=TensorMetadata.from_weight_info(merge.output_weight))
            )
            return self.compute(group, merge.input_parameters, merge.parameters)

    return PerTensorResult


# --------------------------------------------------------------------------- architectures fitted to checkpoints
# mergekit 0.1.5's architecture definitions disagree in places with how transformers 5
# saves the same architecture: GPT-NeoX's attention bias buffer (no longer saved),
# Cohere's q/k norms (only with use_qk_norm), the norms of the other Falcon layout, a
# lm_head tied to the embeddings, T5's gated feed-forward (wi_0 / wi_1 where t5-small
# has wi), a vision tower saved without its `vision_model.` level (Gemma 3), a bare
# encoder saved without its head model's prefix (DistilBertModel, RobertaModel). Every
# merge then stops with "Tensor ... required but not present" after loading everything.
# The definition is fitted to the checkpoints here, once for every command, by comparing
# names in the key space of the transformers model built from the config (on the meta
# device, with transformers' own checkpoint renaming): a tensor no input stores that the
# model does not have (or has only as a tie) is skipped; one that every input stores
# under another name transformers loads as the same key is merged under that name; one
# every input stores that the model uses and the definition does not list is added. A
# tensor the model needs that an input lacks is a damaged or foreign checkpoint:
# ``checkpoint_fit`` names it, and check / run refuse before computing. Two slips of the
# definitions themselves are repaired first (``_repaired``).


@dataclasses.dataclass
class CheckpointFit:
    """How mergekit's definition of an architecture fits the input checkpoints."""

    arch_info: object  # the definition, its slips repaired (``repairs`` says which)
    repairs: List[str] = dataclasses.field(default_factory=list)
    skipped: List[str] = dataclasses.field(default_factory=list)  # no input stores it, the model has no use for it
    renamed: Dict[str, str] = dataclasses.field(default_factory=dict)  # listed name -> name the inputs store it under
    resolved: Dict[str, str] = dataclasses.field(default_factory=dict)  # optional tensor with aliases -> the stored one
    aliased: Dict[str, Tuple[str, ...]] = dataclasses.field(default_factory=dict)  # listed -> other inputs' names
    # optional tensors every input has only through transformers' conversion (DeepSeek-V3's and Jamba's fused
    # expert stacks in their MoE layers, which mergekit infers as optional): mergekit 0.1.5's planner looks
    # for an optional tensor's own name in the checkpoint, finds none and leaves it out of the output
    required: List[str] = dataclasses.field(default_factory=list)
    added: List[str] = dataclasses.field(default_factory=list)  # stored by all, used by the model, not listed
    layers: Optional["_LayerNames"] = None  # how layer weights are named, to fit every layer alike
    missing: List[Tuple[str, str]] = dataclasses.field(default_factory=list)  # (tensor, model): needed, absent

    @property
    def changes(self) -> bool:
        changed = self.repairs or self.skipped or self.renamed or self.resolved or self.aliased or self.required
        return bool(changed or self.added)


@dataclasses.dataclass
class _ModelLayout:
    """The transformers model a config builds: its state-dict keys, the keys tied to
    another tensor, and ``loaded(name)``: the key transformers loads a checkpoint tensor
    ``name`` into (its conversion mapping's renamings, the base-model prefix)."""

    state: set
    tied: set
    loaded: Callable[[str], str]


def _model_layout(model_config) -> Optional[_ModelLayout]:
    """None when transformers cannot build the model of ``model_config`` (remote code)."""
    import torch
    import transformers

    architecture = (getattr(model_config, "architectures", None) or [None])[0]
    model_class = getattr(transformers, architecture, None) if architecture else None
    try:
        with torch.device("meta"):
            if model_class is not None and hasattr(model_class, "base_model_prefix"):
                model = model_class(model_config)
            else:
                model = transformers.AutoModelForCausalLM.from_config(model_config)
        model.tie_weights()
    except Exception:  # noqa: BLE001 - not a model transformers builds without remote code: no fitting
        return None
    state = set(model.state_dict())
    seen, tied = set(), set()  # a tie: the same parameter under a second name (lm_head = embed_tokens)
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in seen:
            tied.add(name)
        seen.add(id(parameter))
    return _ModelLayout(state, tied, _loaded_key(model, state))


def _loaded_key(model, state: set) -> Callable[[str], str]:
    """transformers' renaming of a checkpoint key at load time (as in
    ``core_model_loading.convert_and_load_state_dict_in_model``); the identity where
    this transformers has no such API."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        mapping = get_model_conversion_mapping(model)
    except Exception:  # noqa: BLE001 - another transformers: names compared as they are
        return lambda name: name
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    meta = dict.fromkeys(state, True)
    prefix = getattr(model, "base_model_prefix", None) or None

    @functools.lru_cache(maxsize=None)
    def loaded(name: str) -> str:
        key, _ = rename_source_key(name, renamings, converters, prefix, meta)
        if key not in state and name in state:
            key, _ = rename_source_key(name, [], [], prefix, meta)
        return key

    return loaded


def _has_config_value(config, key: str) -> bool:
    for part in key.split("."):
        if not hasattr(config, part):
            return False
        config = getattr(config, part)
    return True


def _repaired(arch_info, model_config):
    """``(arch_info, repairs)``: mergekit 0.1.5's definition with two slips repaired, each
    named in ``repairs``: a ``weight_prefix`` without its dot (Whisper's decoder,
    ``model.decoder`` + ``embed_tokens.weight``), and a layer count read from a config key
    transformers 5 keeps only in ``text_config`` (Qwen2-VL's ``num_hidden_layers``)."""
    from mergekit.architecture.base import ModuleDefinition
    from mergekit.architecture.json_definitions import JsonModuleArchitecture

    repairs, modules = [], {}
    text_config = getattr(model_config, "text_config", None)
    for key, module in arch_info.modules.items():
        architecture, prefix = module.architecture, module.weight_prefix
        if prefix and not prefix.endswith("."):
            repairs.append(f"module {key}'s weight prefix {prefix!r} read as {prefix + '.'!r}")
            prefix += "."
        layers_key = architecture.num_layers_config_key() if isinstance(architecture, JsonModuleArchitecture) else None
        if (
            layers_key
            and architecture.definition.override_num_layers is None
            and not _has_config_value(model_config, layers_key)
            and text_config is not None
            and _has_config_value(text_config, layers_key)
        ):
            repairs.append(f"module {key}'s layer count read from text_config.{layers_key}")
            definition = architecture.definition.model_copy(
                update={"num_layers_config_key": "text_config." + layers_key}
            )
            architecture = architecture.model_copy(update={"definition": definition})
        modules[key] = ModuleDefinition(architecture=architecture, weight_prefix=prefix, subfolder=module.subfolder)
    if not repairs:
        return arch_info, []
    return _architecture_like(arch_info, modules), repairs


def _architecture_like(arch_info, modules):
    from mergekit.architecture import ModelArchitecture

    return ModelArchitecture(
        modules=modules,
        architectures=arch_info.architectures,
        model_type=arch_info.expected_model_type,
        tagalong_files=arch_info.tagalong_files,
        vocab_size_config_key=arch_info.vocab_size_config_key,
    )


def _stored_names(reference, fetch: bool = True) -> Optional[set]:
    """The tensor names a model reference's checkpoint stores (a LoRA adds none); None
    when its files are not there yet (a chain stage not computed), or, without ``fetch``
    (`check`, which downloads nothing), when it is a hub model."""
    import os

    from mergekit.common import ModelReference
    from mergekit.io import ShardedTensorIndex

    base = ModelReference(model=reference.model)
    path = base.model.path
    if not os.path.isdir(path):
        if not fetch:
            return None
        try:
            path = base.local_path()
        except Exception:  # noqa: BLE001 - not fetchable now: nothing to compare
            return None
    try:
        return set(ShardedTensorIndex.from_disk(path).tensor_paths)
    except Exception:  # noqa: BLE001
        return None


def checkpoint_fit(config, arch_info, trust_remote_code: bool = False, fetch: bool = True) -> CheckpointFit:
    """How mergekit's definition ``arch_info`` fits the checkpoints of ``config`` (a
    MergeConfiguration), each checkpoint's index read once and the transformers model built
    (on the meta device) at most once, only when a name is in doubt (``CheckpointFit``):

    - a tensor the definition requires that no input stores is ``renamed`` when every
      input stores a tensor transformers loads as the same key (under a name the
      definition does not list), else ``skipped`` when the model has no such key or has it
      only tied, else ``missing``; one that some inputs store and others store under
      another name that transformers loads as the same key (a checkpoint saved by another
      transformers version) is ``aliased`` to those names, else ``missing`` from the
      others (damaged or foreign checkpoints);
    - tensors every input stores, that the model uses untied and that no listed name loads
      as, are ``added``: a merge would otherwise leave them out of its output
      (Falcon-7B's input_layernorm under the 40B-layout definition, t5-small's ``wi``);
    - an optional tensor with aliases is ``resolved`` to the one name every input stores
      it under (mergekit 0.1.5's planner fails on optional tensors with aliases); one no
      input stores under its name is ``renamed`` like a required one when it can be;
    - ``layers`` (``_LayerNames``) lets the fitted definition do to any layer what is done
      alike to every layer.
    """
    from mergekit.architecture.conversion import can_convert_checkpoint_keys

    references = list(config.referenced_models())
    stored = {str(r.model.path): _stored_names(r, fetch) for r in references}
    known = [names for names in stored.values() if names is not None]
    model_config = references[0].config(trust_remote_code=trust_remote_code)
    fit = CheckpointFit(*_repaired(arch_info, model_config))
    if not known:
        return fit
    model_type = getattr(model_config, "model_type", None)

    def holds(present: set, names: set) -> bool:
        # mergekit's loader renames and fuses checkpoint keys (transformers' conversion
        # mapping: Mixtral's per-expert w1/w3 into gate_up_proj): a key it can produce counts.
        return any(can_convert_checkpoint_keys(model_type, present, name) for name in names)

    listed, held, unstored, optional, partial = set(), set(), {}, [], {}
    for weight in fit.arch_info.all_weights(model_config):
        names = {weight.name, *(weight.aliases or ()), *(weight.tied_names or ())}
        listed |= names
        absent = [path for path, present in stored.items() if present is not None and not holds(present, names)]
        if len(absent) < len(known):
            held |= names
        if weight.optional:
            if weight.aliases:
                candidates = [weight.name, *weight.aliases]
                chosen = {next((n for n in candidates if n in present), None) for present in known}
                if len(chosen) == 1:  # every input stores it under one name, or none stores it
                    fit.resolved[weight.name] = chosen.pop() or weight.name
            if len(absent) == len(known):
                optional.append(weight.name)
            elif not absent and not any(names & present for present in known):
                fit.required.append(weight.name)  # every input has it, only through conversion
        elif len(absent) == len(known):
            unstored[weight.name] = absent[0]
        elif absent:  # stored by other inputs: this one stores it under another name, or is damaged
            partial[weight.name] = absent
    unlisted = {path: names - listed for path, names in stored.items() if names is not None}
    complete = len(known) == len(stored) and all(unlisted.values())  # each input has a name to add or rename to
    layout = _model_layout(model_config) if unstored or partial or complete else None
    if layout is None:
        fit.missing.extend([*((name, absent[0]) for name, absent in partial.items()), *unstored.items()])
        return fit
    keyed = {path: {} for path in unlisted}  # per input: model key -> its name the definition does not list
    for path, names in unlisted.items():
        for name in sorted(names):
            keyed[path].setdefault(layout.loaded(name), name)
    held_keys = {layout.loaded(name) for name in held} if complete else set()
    candidates = {}  # model key -> each input's name for it: stored by every input, used, not listed
    for key in sorted(set.intersection(*map(set, keyed.values()))) if complete else []:
        if key in layout.state and key not in layout.tied and key not in held_keys:
            candidates[key] = [keyed[path][key] for path in keyed]

    def take(key: str) -> str:
        """The first input's name for ``key``; the others' names become its aliases."""
        first, *others = candidates.pop(key)
        if set(others) - {first}:
            fit.aliased[first] = tuple(sorted(set(others) - {first}))
        return first

    for name, absent in partial.items():
        others = [keyed[path].get(layout.loaded(name)) for path in absent]
        if all(others):
            fit.aliased[name] = tuple(sorted(set(others)))
        else:
            fit.missing.append((name, absent[others.index(None)]))
    for name in optional:  # optional under this name, stored under another: merged under that one
        if layout.loaded(name) in candidates:
            fit.renamed[name] = take(layout.loaded(name))
    for name, model in unstored.items():
        key = layout.loaded(name)
        if key in candidates:
            fit.renamed[name] = take(key)
        elif key not in layout.state or key in layout.tied:
            fit.skipped.append(name)
        else:
            fit.missing.append((name, model))
    fit.added = sorted(take(key) for key in list(candidates))
    fit.layers = _LayerNames(fit.arch_info, model_config)
    return fit


class _LayerNames:
    """How a definition names its layer weights (``model.layers.N.x``: the stem
    ``model.layers`` of each module, from its layer 0), so that what the fit does to every
    layer's tensor is done to the layer's tensor in any layer: a `slices:` recipe (one that
    stacks layers too) renames, skips and adds on the layers it takes, under their output
    numbers, not the input's."""

    def __init__(self, arch_info, model_config):
        import re

        self.counts: Dict[str, int] = {}
        self.stems: Dict[str, str] = {}  # stem -> module
        for key, module in arch_info.modules.items():
            prefix = module.weight_prefix or ""
            self.counts[key] = module.architecture.num_layers(model_config)
            for weight in (module.architecture.layer_weights(0, model_config) or []) if self.counts[key] else []:
                found = re.search(r"\.0\.", prefix + weight.name)
                if found:
                    self.stems.setdefault((prefix + weight.name)[: found.start()], key)

    def split(self, name: str, index: Optional[int] = None) -> Optional[Tuple[str, str, int]]:
        """``(module, template, layer)`` of a layer weight's name (``model.layers.{}.x``, the
        layer ``index`` when given); None for a name outside every module's layers."""
        import re

        for found in re.finditer(r"\.(\d+)\.", name):
            if name[: found.start()] in self.stems and index in (None, int(found.group(1))):
                template = name[: found.start()] + ".{}." + name[found.end() :]
                return self.stems[name[: found.start()]], template, int(found.group(1))
        return None

    def every_layer(self, names) -> Dict[str, Tuple[str, List[str]]]:
        """The templates of ``names`` that name a tensor of every layer of their module:
        template -> (module, the names it covers)."""
        seen: Dict[Tuple[str, str], Dict[int, str]] = {}
        for name in names:
            split = self.split(name)
            if split:
                seen.setdefault(split[:2], {})[split[2]] = name
        return {
            template: (key, list(by_layer.values()))
            for (key, template), by_layer in seen.items()
            if set(by_layer) == set(range(self.counts[key]))
        }

    def renames(self, renamed: Dict[str, str]) -> Dict[str, str]:
        """Template -> template, for the renames done alike in every layer."""
        templates = {}
        for template, (_, names) in self.every_layer(renamed).items():
            first = names[0]
            index = self.split(first)[2]
            target = renamed[first].replace(f".{index}.", ".{}.", 1)
            if all(renamed[name] == target.format(self.split(name)[2]) for name in names):
                templates[template] = target
        return templates


def fitted_architecture(fit: CheckpointFit):
    """``fit.arch_info`` with its weights fitted: skipped ones optional, renamed and
    resolved ones under their stored name (aliases dropped), added ones with their layer
    when every layer has one, else after the last layer of the module whose prefix they
    carry (the first module when none). What is done alike to every layer is done to any
    layer (``_LayerNames``). The module prefixes are applied here, so the modules carry
    full names."""
    from mergekit.architecture import ModuleArchitecture, WeightInfo
    from mergekit.architecture.base import ModuleDefinition, _prefix_weight

    arch_info, layers = fit.arch_info, fit.layers
    renamed, skipped = {**fit.resolved, **fit.renamed}, set(fit.skipped)
    layer_renames = layers.renames(fit.renamed) if layers else {}
    layer_skips = set(layers.every_layer(fit.skipped)) if layers else set()
    required = set(fit.required)
    layer_required = set(layers.every_layer(fit.required)) if layers else set()
    per_layer = layers.every_layer(fit.added) if layers else {}
    prefixes = {key: module.weight_prefix or "" for key, module in arch_info.modules.items()}
    added: Dict[str, List[str]] = {key: [] for key in prefixes}
    layer_added: Dict[str, List[str]] = {key: [] for key in prefixes}
    for template, (key, _) in per_layer.items():
        layer_added[key].append(template)
    in_layers = {name for _, names in per_layer.values() for name in names}
    for name in fit.added:
        if name not in in_layers:
            owners = [key for key, prefix in prefixes.items() if name.startswith(prefix)]
            added[max(owners, key=lambda key: len(prefixes[key])) if owners else next(iter(prefixes))].append(name)

    def fitted(weight, index: Optional[int] = None):
        split = layers.split(weight.name, index) if layers and index is not None else None
        template = split[1] if split else None
        if weight.name in renamed or template in layer_renames:
            name = renamed.get(weight.name) or layer_renames[template].format(index)
            return weight.model_copy(update={"name": name, "aliases": fit.aliased.get(name)})
        if weight.name in skipped or template in layer_skips:
            return weight.model_copy(update={"optional": True})
        if weight.name in required or template in layer_required:
            return weight.model_copy(update={"optional": False})
        if weight.name in fit.aliased:
            return weight.model_copy(update={"aliases": (*(weight.aliases or ()), *fit.aliased[weight.name])})
        return weight

    class Fitted(ModuleArchitecture):
        def __init__(self, inner, prefix: Optional[str], key: str):
            self._inner, self._prefix, self._key = inner, prefix or None, key

        def __getattr__(self, name):
            return getattr(self._inner, name)

        def _fit(self, weights, index: Optional[int] = None):
            if weights is None:
                return None
            return [fitted(_prefix_weight(weight, self._prefix), index) for weight in weights]

        def pre_weights(self, config):
            return self._fit(self._inner.pre_weights(config))

        def post_weights(self, config):
            extra = [fitted(WeightInfo(name=name)) for name in added[self._key]]
            return self._fit(self._inner.post_weights(config)) + extra

        def layer_weights(self, index, config):
            extra = [fitted(WeightInfo(name=template.format(index)), index) for template in layer_added[self._key]]
            return self._fit(self._inner.layer_weights(index, config), index) + extra

        def num_layers_config_key(self):
            return self._inner.num_layers_config_key()

        def num_layers(self, config):
            return self._inner.num_layers(config)

    modules = {
        key: ModuleDefinition(
            architecture=Fitted(module.architecture, module.weight_prefix, key), subfolder=module.subfolder
        )
        for key, module in arch_info.modules.items()
    }
    return _architecture_like(arch_info, modules)


def install_local_card_paths() -> bool:
    """mergekit's model card asks the hub whether each input path is also a hub repository
    (``mergekit.card.is_hf`` calls ``huggingface_hub.repo_exists`` for a path that exists on
    disk without a slash, such as ``base`` in a recipe run from its folder): offline that
    request fails and the merge stops after computing every tensor. A path that exists on
    disk is the local model mergekit merged: it is not linked as a hub model."""
    import os

    import mergekit.card as card

    def wrap(original):
        def is_hf(path: str) -> bool:
            if path and os.path.exists(path):
                return False
            return original(path)

        return is_hf

    return _install(card, "is_hf", wrap)


def install_checkpoint_fit() -> bool:
    """Fit mergekit's architecture definitions to the checkpoints (the section above):
    ``mergekit.architecture.get_architecture_info`` and the name ``mergekit.merge`` took."""
    import sys

    import mergekit.architecture as architecture

    def wrap(original):
        def get_architecture_info(config, options):
            arch_info = original(config, options)
            fit = checkpoint_fit(config, arch_info, trust_remote_code=options.trust_remote_code)
            if fit.missing:  # a hub model, which check does not fetch: said here, before any tensor is computed
                raise DefinitionError(missing_tensor_message(*fit.missing[0]))
            return fitted_architecture(fit) if fit.changes else arch_info

        return get_architecture_info

    installed = _install(architecture, "get_architecture_info", wrap)
    merge = sys.modules.get("mergekit.merge")
    if installed and merge is not None and hasattr(merge, "get_architecture_info"):
        merge.get_architecture_info = architecture.get_architecture_info
    return installed


class DefinitionError(ValueError):
    """mergekit's definition of an architecture does not fit a model: its config, or a
    checkpoint that lacks a tensor the model needs."""


def missing_tensor_message(name: str, model: str) -> str:
    return (
        f"tensor {name}, which mergekit's definition of this architecture requires, is missing from {model}: the "
        "checkpoint is incomplete, or saved by another version of its code; re-save it with transformers' "
        "save_pretrained (or repair the file) and check again"
    )


def checkpoint_gaps(config, trust_remote_code: bool = False) -> Optional[CheckpointFit]:
    """For `check`: ``checkpoint_fit`` against mergekit's own (unfitted) definition of the
    recipe's architecture; None when mergekit cannot tell the architecture without more (a
    hub model offline, mixed architectures: the run reports those). DefinitionError (one
    line) when the definition cannot be laid out for the config even repaired: every
    merge would stop on it."""
    import os

    import mergekit.architecture as architecture
    from mergekit.options import MergeOptions

    from mergekit_lox.errors import one_line

    references = list(config.referenced_models())
    if not all(os.path.isdir(r.model.path) for r in references):
        return None  # a hub model (check downloads nothing) or a chain stage not yet computed
    original = getattr(architecture.get_architecture_info, "__wrapped__", architecture.get_architecture_info)
    try:
        arch_info = original(config, MergeOptions(trust_remote_code=trust_remote_code))
    except Exception:  # noqa: BLE001 - not decidable before the run; mergekit says why then
        return None
    try:
        return checkpoint_fit(config, arch_info, trust_remote_code=trust_remote_code, fetch=False)
    except Exception as error:  # noqa: BLE001 - mergekit's own error, made one line
        model = references[0].model.path
        names = (arch_info.architectures or ["this architecture"])[0]
        reason = one_line(error)  # mergekit's config errors print the whole config: keep its end
        reason = reason if len(reason) <= 240 else "..." + reason[-240:]
        raise DefinitionError(
            f"mergekit's definition of {names} does not fit the config of {model} ({reason})"
        ) from error


# --------------------------------------------------------------------------- the layout a merge reads
# transformers 5 converts some checkpoints as it loads them (Mixtral's and Qwen-MoE's
# per-expert w1 / w3 or gate_proj / up_proj into one fused gate_up_proj stack of shape
# [experts, 2 * intermediate, hidden] per layer, w2 / down_proj into a down_proj stack),
# and mergekit 0.1.5's loader applies the same conversion (``mergekit.architecture.
# conversion``), so every merge decomposes the converted tensors. The commands that read
# checkpoints themselves (analyze, safelora-adapter) read them through this, so they name
# and measure the matrices the merge works on.


def converted_layout(model_type: Optional[str], stored) -> Dict[str, Tuple[str, ...]]:
    """``{tensor name in the layout mergekit's loader gives: the checkpoint keys it is made
    of}`` for a checkpoint of ``model_type`` storing the keys ``stored``; the identity for
    a model type transformers converts nothing of. Walks transformers' conversion mapping
    for ``model_type`` as ``mergekit.architecture.conversion`` does (its private
    ``_iter_transform_matches`` and ``_expanded_target_keys``): a renaming renames a key, a
    converter fuses every key it matches into its target(s). A fused tensor whose keys
    mergekit could not convert (an incomplete group of experts) stays as its keys."""
    layout: Dict[str, Tuple[str, ...]] = {name: (name,) for name in stored}
    if not model_type:
        return layout
    from mergekit.architecture.conversion import (
        _expanded_target_keys,
        _iter_transform_matches,
        can_convert_checkpoint_keys,
    )
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    for transform in get_checkpoint_conversion_mapping(model_type) or ():
        renamed: Dict[str, Tuple[str, ...]] = {}
        fused: Dict[str, List[str]] = {}
        consumed = set()
        for match in _iter_transform_matches(transform, layout):
            if isinstance(transform, WeightRenaming):
                renamed[match.renamed_key] = match.source_value
            else:
                for target in _expanded_target_keys(match.renamed_key, transform.target_patterns):
                    fused.setdefault(target, []).extend(match.source_value)
            consumed.add(match.source_key)
        for target, keys in fused.items():
            if can_convert_checkpoint_keys(model_type, set(keys), target):
                renamed[target] = tuple(keys)
            else:
                consumed.difference_update(name for name, value in layout.items() if set(value) <= set(keys))
        layout = {name: keys for name, keys in layout.items() if name not in consumed}
        layout.update(renamed)
    return layout


def _definition_names(path: str) -> Optional[set]:
    """The tensor names mergekit 0.1.5's own definition of the model at ``path`` lists
    (its slips repaired as for merging), or None where mergekit has none and infers the
    layout from the transformers model (the converted one), or cannot tell."""
    import logging

    from mergekit.architecture import arch_info_for_config
    from transformers import AutoConfig

    logger = logging.getLogger("mergekit.architecture")
    level = logger.level
    logger.setLevel(logging.ERROR)  # "No JSON architecture found": mergekit then infers, as we do
    try:
        config = AutoConfig.from_pretrained(path)
        arch_info = arch_info_for_config(config)
        if arch_info is None:
            return None
        arch_info, _ = _repaired(arch_info, config)
        return {w.name for w in arch_info.all_weights(config)}
    except Exception:  # noqa: BLE001 - not decidable here: transformers' layout, as mergekit infers it
        return None
    finally:
        logger.setLevel(level)


def _as_defined(layout: Dict[str, Tuple[str, ...]], path: str) -> Dict[str, Tuple[str, ...]]:
    """``layout`` with each converted tensor that mergekit's definition does not list put
    back as its checkpoint keys: where the definition names the checkpoint's own tensors
    (AFMoE's experts one by one, GraniteMoeHybrid's input_linear / output_linear), mergekit
    reads and merges those, not transformers' layout."""
    listed = _definition_names(path)
    if listed is None:
        return layout
    kept: Dict[str, Tuple[str, ...]] = {}
    for name, keys in layout.items():
        if keys == (name,) or name in listed:
            kept[name] = keys
        else:
            kept.update((key, (key,)) for key in keys)
    return kept


class ConvertedCheckpoint:
    """A checkpoint folder read one tensor at a time (mergekit's lazy loader) in the
    layout mergekit's merges read (``converted_layout``; the model type from its
    config.json). ``names``: layout name -> checkpoint keys; ``shard_of``: the shard
    file of each name's first key. ``as_merged=False``: transformers' layout throughout,
    the one a PEFT adapter trained on the model names, even where mergekit's definition
    names the checkpoint's own tensors (AFMoE, GraniteMoeHybrid; see ``_as_defined``)."""

    def __init__(self, path: str, as_merged: bool = True):
        from mergekit.io.lazy_tensor_loader import LazyTensorLoader, ShardedTensorIndex

        from mergekit_lox.layout import saved_model_type

        self.path = path
        index = ShardedTensorIndex.from_disk(path)
        # No or an unreadable config: the checkpoint's own keys.
        self.model_type = saved_model_type(path)
        self.names = converted_layout(self.model_type, index.tensor_paths)
        if as_merged and any(keys != (name,) for name, keys in self.names.items()):
            self.names = _as_defined(self.names, path)
        self.shard_of = {name: index.tensor_paths[keys[0]] for name, keys in self.names.items()}
        self.loader = LazyTensorLoader(index, lazy_unpickle=True)

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def get(self, name: str, device: str = "cpu"):
        """The tensor ``name`` as mergekit's ``LoadTensor`` gives it (read, or converted)."""
        keys = self.names[name]
        if keys == (name,):
            return self.loader.get_tensor(name, device=device)
        from mergekit.architecture.conversion import convert_checkpoint_tensors  # imports transformers

        sources = {key: functools.partial(self.loader.get_tensor, key, device=device) for key in keys}
        tensor = convert_checkpoint_tensors(self.model_type, sources, name)
        if tensor is None:
            raise KeyError(f"transformers' conversion for {self.model_type} gives no {name} from {', '.join(keys)}")
        return tensor

    def flush(self) -> None:
        self.loader.flush()
