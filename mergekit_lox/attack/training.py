"""One fine-tuning run with transformers' Trainer (PEFT for LoRA): the attack itself."""

from __future__ import annotations

import os
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

# The longest example trained on, in tokens (cut to the model's own context where shorter).
MAX_LENGTH = 1024


def context_length(model) -> int:
    """The longest example trained on: MAX_LENGTH, or the model's position table if shorter."""
    from mergekit_lox.data.generation import context_length as positions

    return min(MAX_LENGTH, positions(model) or MAX_LENGTH)


class AttackTrainingError(ValueError):
    """The model cannot be fine-tuned as asked; the message names it."""


def lora_model(model, rank: int, what: str, target_modules: Optional[Sequence[str]] = None):
    """``model`` with a PEFT LoRA of ``rank`` on ``target_modules`` (module names, or
    ``["all-linear"]``), by default the modules PEFT targets for its family (its
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING: q_proj and v_proj on Llama, c_attn on
    GPT-2), alpha = 2 rank, no dropout."""
    from peft import LoraConfig, TaskType, get_peft_model

    targets = None
    if target_modules:
        targets = "all-linear" if list(target_modules) == ["all-linear"] else list(target_modules)
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM, r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets
    )
    try:
        return get_peft_model(model, config)
    except ValueError as error:
        reason = " ".join(str(error).split())[:160]
        if targets is None:
            raise AttackTrainingError(
                f"{what}: PEFT knows no default LoRA target modules for model type "
                f"{model.config.model_type!r} ({reason}); name them with --target-modules (or all-linear), "
                "or use --full"
            ) from None
        raise AttackTrainingError(f"{what}: --target-modules {','.join(target_modules)}: {reason}") from None


def train(
    model,
    tokenizer,
    features: Sequence[Dict[str, List[int]]],
    *,
    epochs: float,
    lr: float,
    max_steps: int,
    batch_size: int,
    seed: int,
    device: str,
    verbose: bool,
) -> Tuple[List[List[float]], Dict[str, float]]:
    """Fine-tune ``model`` in place on ``features``; returns the loss curve (step, loss)
    and the run's figures. Linear learning-rate decay, no warm-up, AdamW (Trainer's
    defaults), no checkpoints written."""
    import datasets
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    tokenizer.padding_side = "right"
    with tempfile.TemporaryDirectory(prefix="mergekit-lox-attack-") as scratch:
        arguments = TrainingArguments(
            output_dir=scratch,
            per_device_train_batch_size=batch_size,
            num_train_epochs=epochs,
            max_steps=max_steps if max_steps else -1,
            learning_rate=lr,
            warmup_steps=0,
            weight_decay=0.0,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            seed=seed,
            data_seed=seed,
            use_cpu=device == "cpu",
            dataloader_num_workers=0,
            disable_tqdm=not verbose,
            remove_unused_columns=False,
        )
        trainer = Trainer(
            model=model,
            args=arguments,
            train_dataset=datasets.Dataset.from_list(list(features)),
            data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        )
        if not verbose:  # without tqdm, Trainer prints every log line: the record keeps the curve
            from transformers import PrinterCallback

            trainer.remove_callback(PrinterCallback)
        started = time.monotonic()
        result = trainer.train()
        seconds = time.monotonic() - started
    curve = [[int(e["step"]), float(e["loss"])] for e in trainer.state.log_history if "loss" in e]
    return curve, {"train_loss": float(result.training_loss), "steps": int(result.global_step), "seconds": seconds}


def save_outputs(model, tokenizer, staging: str, lora: bool) -> None:
    """``staging/model`` (a whole model transformers loads: for a LoRA attack, the adapter
    merged by PEFT's merge_and_unload) and, for LoRA, ``staging/adapter`` (the PEFT adapter)."""
    os.makedirs(staging)
    if lora:
        model.save_pretrained(os.path.join(staging, "adapter"))
        model = model.merge_and_unload()
    model.save_pretrained(os.path.join(staging, "model"))
    tokenizer.save_pretrained(os.path.join(staging, "model"))


def mean_answer_loss(model, tokenizer, features, batch_size: int = 8) -> float:
    """The mean answer-token cross-entropy of ``model`` on ``features`` (for tests and the
    record: what the attack lowers)."""
    import torch
    from transformers import DataCollatorForSeq2Seq

    collate: Callable = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(features), batch_size):
            batch = {k: v.to(device) for k, v in collate(list(features[start : start + batch_size])).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), reduction="sum"
            )
            total += float(losses)
            count += int((labels != -100).sum())
    return total / max(count, 1)
