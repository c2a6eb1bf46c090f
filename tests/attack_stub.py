"""TEMPORARY stand-in for helper h24a's `mergekit_lox.attack` (same interface), used until
it lands on main; delete it then. A real (tiny) fine-tune with PEFT: LoRA on every
linear layer, or the full model, a few steps of SGD on the data's text."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import types
from pathlib import Path
from typing import Optional

RUNS = []  # every attack that trained (not resumed), in this process


@dataclasses.dataclass
class AttackSettings:
    data: str
    lora: Optional[int] = None
    full: bool = False
    preset: Optional[str] = None
    epochs: Optional[float] = None
    lr: Optional[float] = None
    max_steps: Optional[int] = None
    batch_size: Optional[int] = None
    seed: int = 0
    device: str = "cpu"
    prompt_column: Optional[str] = None
    answer_column: Optional[str] = None
    limit: Optional[int] = None

    def __post_init__(self):
        if (self.lora is None) == (not self.full):
            raise ValueError("give lora: RANK or full: true")
        if self.lr is not None and not math.isfinite(self.lr):
            raise ValueError(f"lr: {self.lr} is not a finite number")


@dataclasses.dataclass
class AttackResult:
    out: Path
    model_dir: Path
    adapter_dir: Optional[Path]
    record: dict


def run_attack(model, settings: AttackSettings, out: Path, verbose=False) -> AttackResult:
    import torch
    import transformers

    out = Path(out)
    with open(settings.data, "rb") as f:
        data_hash = hashlib.sha256(f.read()).hexdigest()
    key = {"model": str(model), "settings": dataclasses.asdict(settings), "data": data_hash}
    adapter = out / "adapter" if settings.lora else None
    if (out / "record.json").exists():
        record = json.loads((out / "record.json").read_text())
        if record["key"] == key:
            return AttackResult(out, out / "model", adapter, record)
    RUNS.append(str(out))
    torch.manual_seed(settings.seed)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model)
    net = transformers.AutoModelForCausalLM.from_pretrained(model, torch_dtype=torch.float32)
    if settings.lora:
        import peft

        config = peft.LoraConfig(r=settings.lora, lora_alpha=2 * settings.lora, target_modules="all-linear")
        net = peft.get_peft_model(net, config)
    texts = []
    with open(settings.data) as f:
        for line in f:
            row = json.loads(line)
            texts.append(f"{row[settings.prompt_column or 'prompt']} {row[settings.answer_column or 'answer']}")
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=settings.lr or 0.5)
    losses = []
    for step in range(settings.max_steps or 2):
        batch = tokenizer(texts[step % len(texts)], return_tensors="pt")
        loss = net(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    out.mkdir(parents=True, exist_ok=True)
    if settings.lora:
        net.save_pretrained(adapter)
        net = net.merge_and_unload()
    net.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    record = {"key": key, "loss": losses}
    (out / "record.json").write_text(json.dumps(record))
    return AttackResult(out, out / "model", adapter, record)


def install() -> None:
    """Make this module `mergekit_lox.attack` (also in Ray workers: worker_process_setup_hook)."""
    module = types.ModuleType("mergekit_lox.attack")
    module.AttackSettings, module.AttackResult, module.run_attack = AttackSettings, AttackResult, run_attack
    module.RUNS = RUNS
    sys.modules["mergekit_lox.attack"] = module
    import mergekit_lox

    mergekit_lox.attack = module


if os.environ.get("MERGEKIT_LOX_ATTACK_STUB"):
    install()
