"""`mergekit-lox attack`: a fine-tuning attack, the way the papers measure robustness.

    run_attack(MODEL, AttackSettings(data=..., lora=8 | full=True, preset=...), OUT)

fine-tunes MODEL on (prompt, answer) pairs with transformers' ``Trainer`` (PEFT for
``lora``), the loss on the answer only, the chat template applied where the model has one,
and writes OUT through a staging folder:

    OUT/model/        a whole model transformers loads (for LoRA: the adapter merged)
    OUT/adapter/      the PEFT adapter (LoRA attacks)
    OUT/attack.json   the settings, the data's sha256, the loss curve, the figures

An OUT that holds a finished attack with the same model, settings and data is returned as
it is (an attack is never run twice); one with other settings is refused, never replaced.
Presets (presets.py) carry the papers' settings.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple, Union

from mergekit_lox.attack.examples import AttackDataError, data_hash, load_examples, tokenize
from mergekit_lox.attack.presets import PRESETS, Preset
from mergekit_lox.attack.training import AttackTrainingError

RECORD = "attack.json"
# Defaults where neither an option nor a preset says.
DEFAULT_EPOCHS, DEFAULT_LR, DEFAULT_BATCH_SIZE = 1.0, 2e-5, 8


class AttackError(ValueError):
    """Bad input to an attack; the message names the option, file or model."""


@dataclass(frozen=True)
class AttackSettings:
    data: Optional[str] = None  # local JSONL/CSV/parquet file or folder, or a `datasets` id (a preset may give it)
    lora: Optional[int] = None  # LoRA rank -> PEFT adapter; mutually exclusive with full
    # LoRA modules: names, or "all-linear" (a comma-separated string or a sequence); None: PEFT's defaults
    target_modules: Optional[Union[str, Tuple[str, ...]]] = None
    full: bool = False  # full fine-tune -> whole model
    preset: Optional[str] = None  # the papers' attacks, filling unset settings
    epochs: Optional[float] = None
    lr: Optional[float] = None
    max_steps: Optional[int] = None
    batch_size: Optional[int] = None
    seed: int = 0
    device: str = "cpu"
    prompt_column: Optional[str] = None
    answer_column: Optional[str] = None
    limit: Optional[int] = None  # first N examples
    split: str = "train"


@dataclass(frozen=True)
class AttackResult:
    out: Path  # the attack's output folder
    model_dir: Path  # a folder transformers can load: the full model, or the adapter merged into the model
    adapter_dir: Optional[Path]  # the PEFT adapter folder for LoRA, else None
    record: dict  # what out/attack.json holds


def _module_names(target_modules) -> Optional[list]:
    """``--target-modules`` / a sweep's ``target_modules:``: a comma-separated string or a list."""
    if not target_modules:
        return None
    if isinstance(target_modules, str):
        target_modules = target_modules.split(",")
    return [str(name).strip() for name in target_modules if str(name).strip()] or None


def resolve(settings: AttackSettings) -> dict:
    """The settings the attack runs with: the options, the preset for what they leave
    unset, the defaults for the rest; checked (one error line each)."""
    preset: Optional[Preset] = None
    if settings.preset is not None:
        preset = PRESETS.get(settings.preset)
        if preset is None:
            raise AttackError(f"--preset {settings.preset!r} is not a preset; presets: {', '.join(PRESETS)}")

    def pick(value, preset_value, default):
        return value if value is not None else (preset_value if preset_value is not None else default)

    lora = settings.lora if settings.lora is not None else (None if settings.full else getattr(preset, "lora", None))
    full = settings.full or (lora is None and preset is not None)
    resolved = {
        "data": pick(settings.data, getattr(preset, "data", None), None),
        "prompt_column": pick(settings.prompt_column, getattr(preset, "prompt_column", None), None),
        "answer_column": pick(settings.answer_column, getattr(preset, "answer_column", None), None),
        "lora": lora,
        "target_modules": _module_names(settings.target_modules),
        "full": full,
        "preset": settings.preset,
        "epochs": float(pick(settings.epochs, getattr(preset, "epochs", None), DEFAULT_EPOCHS)),
        "lr": float(pick(settings.lr, getattr(preset, "lr", None), DEFAULT_LR)),
        "max_steps": settings.max_steps,
        "batch_size": int(pick(settings.batch_size, getattr(preset, "batch_size", None), DEFAULT_BATCH_SIZE)),
        "seed": settings.seed,
        "device": settings.device,
        "limit": settings.limit,
        "split": settings.split,
    }
    if resolved["data"] is None:
        raise AttackError("--data is required (this preset names no data set)" if preset else "--data is required")
    if settings.lora is not None and settings.full:
        raise AttackError("--lora and --full exclude each other: a LoRA attack writes an adapter, --full a model")
    if lora is None and not full:
        raise AttackError("choose --lora RANK (a PEFT adapter) or --full (a whole model), or a --preset")
    if lora is not None and lora < 1:
        raise AttackError(f"--lora must be a rank of at least 1, got {lora}")
    if settings.target_modules and lora is None:
        raise AttackError("--target-modules names the modules of a LoRA attack: give --lora RANK with it")
    if not (math.isfinite(resolved["lr"]) and resolved["lr"] > 0):
        raise AttackError(f"--lr must be a finite number above 0, got {resolved['lr']}")
    if not (math.isfinite(resolved["epochs"]) and resolved["epochs"] > 0):
        raise AttackError(f"--epochs must be a finite number above 0, got {resolved['epochs']}")
    if resolved["max_steps"] is not None and resolved["max_steps"] < 1:
        raise AttackError(f"--max-steps must be at least 1, got {resolved['max_steps']}")
    if resolved["batch_size"] < 1:
        raise AttackError(f"--batch-size must be at least 1, got {resolved['batch_size']}")
    return resolved


def _result(out: str, record: dict) -> AttackResult:
    lora = record["settings"]["lora"] is not None
    return AttackResult(Path(out), Path(out) / "model", Path(out) / "adapter" if lora else None, record)


def finished_attack(out: str) -> Optional[dict]:
    """The record of the finished attack in ``out``, or None."""
    try:
        with open(os.path.join(out, RECORD), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("written_by") == "mergekit-lox attack" else None


def run_attack(
    model: Union[str, Path],
    settings: AttackSettings,
    out: Union[str, Path],
    *,
    verbose: bool = False,
    echo: Callable[[str], None] = print,
) -> AttackResult:
    """Fine-tune ``model`` as ``settings`` say and write the result to ``out`` (module doc)."""
    import torch

    from mergekit_lox.attack import training
    from mergekit_lox.data.generation import ModelLoadError, check_tokenizer, load_causal_lm, resolve_device
    from mergekit_lox.evaluate.answers import check_model, model_fingerprint
    from mergekit_lox.files.output import OutputError, refuse_inside_inputs, staged_output

    model, out = str(model), os.path.abspath(str(out))
    s = resolve(settings)
    try:
        resolve_device(s["device"])
        check_model(model)
        refuse_inside_inputs(out, [p for p in (model, s["data"]) if os.path.isdir(p)])
        pairs = load_examples(
            s["data"],
            prompt_column=s["prompt_column"],
            answer_column=s["answer_column"],
            split=s["split"],
            limit=s["limit"],
        )
    except (ModelLoadError, OutputError, AttackDataError) as error:
        raise AttackError(str(error)) from None
    fingerprint = model_fingerprint(model)
    digest = data_hash(pairs)
    key = hashlib.sha256(json.dumps([fingerprint, s, digest], sort_keys=True).encode()).hexdigest()
    done = finished_attack(out)
    if done is not None:
        if done.get("key") == key and os.path.isdir(os.path.join(out, "model")):
            echo(f"{out}: this attack is finished already ({done['steps']} steps); not run again")
            return _result(out, done)
        raise AttackError(
            f"output {out} holds a finished attack with other settings, data or model: choose another -o "
            "(a finished attack is never replaced)"
        )

    from transformers import set_seed

    set_seed(s["seed"])
    try:
        loaded, tokenizer = load_causal_lm(model, device=s["device"], what="model")
        check_tokenizer(tokenizer, [p for p, _ in pairs], f"model {model}", echo)
    except ModelLoadError as error:
        raise AttackError(str(error)) from None
    features = tokenize(tokenizer, pairs, training.context_length(loaded))
    if not features:
        raise AttackError(f"{s['data']}: every example's prompt fills the model's context: nothing to train on")
    torch.manual_seed(s["seed"])
    try:
        if s["lora"] is not None:
            loaded = training.lora_model(loaded, s["lora"], f"model {model}", s.get("target_modules"))
    except AttackTrainingError as error:
        raise AttackError(str(error)) from None
    kind = f"LoRA rank {s['lora']}" if s["lora"] is not None else "full fine-tune"
    echo(f"{model}: {kind} on {len(features)} examples of {s['data']} ({s['epochs']:g} epochs at lr {s['lr']:g})")
    loaded.train()
    curve, figures = training.train(
        loaded,
        tokenizer,
        features,
        epochs=s["epochs"],
        lr=s["lr"],
        max_steps=s["max_steps"] or 0,
        batch_size=s["batch_size"],
        seed=s["seed"],
        device=s["device"],
        verbose=verbose,
    )
    record = {
        "written_by": "mergekit-lox attack",
        "key": key,
        "model": model,
        "model_fingerprint": fingerprint,
        "settings": s,
        "preset": asdict(PRESETS[s["preset"]]) if s["preset"] else None,
        "data": {"source": s["data"], "examples": len(features), "sha256": digest},
        "loss": curve,
        **figures,
        "versions": _versions(),
    }
    with staged_output(out, markers=(RECORD,), writer="mergekit-lox attack") as staging:
        training.save_outputs(loaded, tokenizer, staging, lora=s["lora"] is not None)
        with open(os.path.join(staging, RECORD), "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)
    first, last = (curve[0][1], curve[-1][1]) if curve else (float("nan"), float("nan"))
    echo(f"wrote {out}: {figures['steps']} steps, loss {first:.4f} -> {last:.4f}")
    return _result(out, record)


def _versions() -> dict:
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


__all__ = ["PRESETS", "AttackError", "AttackResult", "AttackSettings", "resolve", "run_attack"]
