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
its own (safelora-select's per-tensor cosines).
"""

from __future__ import annotations

import contextlib
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
# mergekit 0.1.5's architecture definitions list tensors that current checkpoints of the
# same architecture do not store: GPT-NeoX's attention bias buffer (no longer saved),
# Cohere's q/k norms (only with use_qk_norm), the norms of the other Falcon layout, a
# lm_head tied to the embeddings. Every merge then stops with "Tensor ... required but not
# present". The definition is fitted to the checkpoints here, once for every command: a
# tensor that no input stores *and* that the transformers model built from the config
# does not have (or has only as a tie to another tensor) is marked optional, so mergekit
# skips it. A tensor the model does need and no input stores is a damaged or foreign
# checkpoint: `checkpoint_fit` names it, and check / run refuse before computing.


def _model_keys(model_config) -> Optional[Tuple[set, set]]:
    """(state-dict keys, tied keys) of the transformers model ``model_config`` builds, on
    the meta device (no memory); None when transformers cannot build it as a causal LM."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config)
    except Exception:  # noqa: BLE001 - not a causal LM transformers knows: no fitting
        return None
    tied = getattr(model, "_tied_weights_keys", None) or ()
    tied = set(tied.keys() if isinstance(tied, dict) else tied)
    if not getattr(model_config, "tie_word_embeddings", False):
        tied = set()
    return set(model.state_dict().keys()), tied


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


def checkpoint_fit(
    config, arch_info, trust_remote_code: bool = False, fetch: bool = True
) -> Tuple[List[Tuple[str, str, bool]], List[str]]:
    """How mergekit's definition ``arch_info`` fits the checkpoints of ``config`` (a
    MergeConfiguration), each checkpoint's index read once and the transformers model built
    (on the meta device) at most once:

    - ``missing``: ``(tensor, model, skippable)`` for each tensor the definition requires
      that an input does not store; skippable when no input stores it and the transformers
      model of that config has no such tensor, or has it only tied;
    - ``unlisted``: tensors every input stores and the transformers model uses that the
      definition does not list (Falcon-7B's input_layernorm under the 40B-layout
      definition): a merge would leave them out of its output.
    """
    from mergekit.architecture.conversion import can_convert_checkpoint_keys

    references = list(config.referenced_models())
    stored = {str(r.model.path): _stored_names(r, fetch) for r in references}
    known = [names for names in stored.values() if names is not None]
    if not known:
        return [], []
    model_config = references[0].config(trust_remote_code=trust_remote_code)
    model_type = getattr(model_config, "model_type", None)
    built: List[Tuple[Optional[set], set]] = []

    def model_keys() -> Tuple[Optional[set], set]:
        if not built:
            built.append(_model_keys(model_config) or (None, set()))
        return built[0]

    def holds(present: set, names: set) -> bool:
        # mergekit's loader renames and fuses checkpoint keys (transformers' conversion
        # mapping: Mixtral's per-expert w1/w3 into gate_up_proj): a key it can produce counts.
        return any(can_convert_checkpoint_keys(model_type, present, name) for name in names)

    missing, listed = [], set()
    for weight in arch_info.all_weights(model_config):
        names = {weight.name, *(weight.aliases or ()), *(weight.tied_names or ())}
        listed |= names
        if weight.optional:
            continue
        absent = [path for path, present in stored.items() if present is not None and not holds(present, names)]
        if not absent:
            continue
        if len(absent) < len(known):  # stored by another input: this one is damaged or foreign
            missing.append((weight.name, absent[0], False))
            continue
        state, tied = model_keys()
        skippable = state is not None and (weight.name not in state or weight.name in tied)
        missing.append((weight.name, absent[0], skippable))
    unlisted: List[str] = []
    if len(known) == len(stored):
        common = set.intersection(*known) - listed
        state = model_keys()[0] if common else None
        unlisted = sorted(common & state) if state else []
    return missing, unlisted


def fitted_architecture(arch_info, skip: set, extra: Tuple[str, ...] = ()):
    """``arch_info`` with the weights named in ``skip`` marked optional and the tensors
    ``extra`` added after the last layer (single-module architectures)."""
    from mergekit.architecture import ModelArchitecture, ModuleArchitecture, WeightInfo
    from mergekit.architecture.base import ModuleDefinition

    class Fitted(ModuleArchitecture):
        def __init__(self, inner, prefix: str):
            self._inner, self._prefix = inner, prefix

        def __getattr__(self, name):
            return getattr(self._inner, name)

        def _fit(self, weights):
            if weights is None:
                return None
            return [w.model_copy(update={"optional": True}) if self._prefix + w.name in skip else w for w in weights]

        def pre_weights(self, config):
            return self._fit(self._inner.pre_weights(config))

        def post_weights(self, config):
            added = [WeightInfo(name=name[len(self._prefix) :]) for name in extra if name.startswith(self._prefix)]
            return self._fit(self._inner.post_weights(config)) + added

        def layer_weights(self, index, config):
            return self._fit(self._inner.layer_weights(index, config))

        def num_layers_config_key(self):
            return self._inner.num_layers_config_key()

        def num_layers(self, config):
            return self._inner.num_layers(config)

    modules = {
        key: ModuleDefinition(
            architecture=Fitted(module.architecture, module.weight_prefix or ""),
            weight_prefix=module.weight_prefix,
            subfolder=module.subfolder,
        )
        for key, module in arch_info.modules.items()
    }
    return ModelArchitecture(
        modules=modules,
        architectures=arch_info.architectures,
        model_type=arch_info.expected_model_type,
        tagalong_files=arch_info.tagalong_files,
        vocab_size_config_key=arch_info.vocab_size_config_key,
    )


def install_checkpoint_fit() -> bool:
    """Fit mergekit's architecture definitions to the checkpoints (the section above):
    ``mergekit.architecture.get_architecture_info`` and the name ``mergekit.merge`` took."""
    import sys

    import mergekit.architecture as architecture

    def wrap(original):
        def get_architecture_info(config, options):
            arch_info = original(config, options)
            missing, unlisted = checkpoint_fit(config, arch_info, trust_remote_code=options.trust_remote_code)
            skip = {name for name, _, skippable in missing if skippable}
            extra = tuple(unlisted) if len(arch_info.modules) == 1 else ()  # one module: they can be added
            return fitted_architecture(arch_info, skip, extra) if skip or extra else arch_info

        return get_architecture_info

    installed = _install(architecture, "get_architecture_info", wrap)
    merge = sys.modules.get("mergekit.merge")
    if installed and merge is not None and hasattr(merge, "get_architecture_info"):
        merge.get_architecture_info = architecture.get_architecture_info
    return installed


def checkpoint_gaps(config, trust_remote_code: bool = False):
    """For `check`: ``(missing, unlisted, addable)`` of ``checkpoint_fit`` against mergekit's own
    (unfitted) definition of the recipe's architecture; empty when mergekit cannot tell
    the architecture without more (a hub model offline, mixed architectures: the run
    reports those). ``addable``: unlisted tensors can be added to the definition (one
    module); otherwise the output would lack them."""
    import os

    import mergekit.architecture as architecture
    from mergekit.options import MergeOptions

    if not all(os.path.isdir(r.model.path) for r in config.referenced_models()):
        return [], [], True  # a hub model (check downloads nothing) or a chain stage not yet computed
    original = getattr(architecture.get_architecture_info, "__wrapped__", architecture.get_architecture_info)
    try:
        arch_info = original(config, MergeOptions(trust_remote_code=trust_remote_code))
        missing, unlisted = checkpoint_fit(config, arch_info, trust_remote_code=trust_remote_code, fetch=False)
    except Exception:  # noqa: BLE001 - not decidable before the run; mergekit says why then
        return [], [], True
    return missing, unlisted, len(arch_info.modules) == 1
