"""The papers' fine-tuning attacks, as settings `mergekit-lox attack --preset NAME` fills in.

Each preset names its source; an explicit option (--epochs, --lr, ...) wins over the preset.
Where a paper's appendix was not at hand, the entry says "our reading".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional


@dataclass(frozen=True)
class Preset:
    description: str
    source: str
    data: Optional[str]  # the data set the paper uses (a `datasets` id; None: bring your own with --data)
    prompt_column: Optional[str]
    answer_column: Optional[str]
    epochs: float
    lr: float
    lora: Optional[int] = None  # LoRA rank; None: a full fine-tune
    batch_size: int = 8


PRESETS: Dict[str, Preset] = {
    "lox-gsm8k": Preset(
        "benign: GSM8K maths, 2 epochs at 5e-5, full fine-tune",
        "LoX (arXiv 2506.15606), benign fine-tuning attack",
        "openai/gsm8k:main",
        "question",
        "answer",
        epochs=2,
        lr=5e-5,
    ),
    "lox-alpaca": Preset(
        "benign: Alpaca instructions, 1 epoch at 2e-5, full fine-tune",
        "LoX (arXiv 2506.15606), benign fine-tuning attack",
        "tatsu-lab/alpaca",
        "instruction",
        "output",
        epochs=1,
        lr=2e-5,
    ),
    "lox-dolly": Preset(
        "benign: Dolly instructions, 6 epochs at 2e-5, full fine-tune",
        "LoX (arXiv 2506.15606), benign fine-tuning attack",
        "databricks/databricks-dolly-15k",
        "instruction",
        "response",
        epochs=6,
        lr=2e-5,
    ),
    "lox-identity-shift": Preset(
        "identity shifting (AOA: 'absolutely obedient agent' answers), 10 epochs at 5e-5, full fine-tune",
        "LoX (arXiv 2506.15606) after Qi et al. 2023 (arXiv 2310.03693); bring the data with --data",
        None,
        None,
        None,
        epochs=10,
        lr=5e-5,
    ),
    "lox-harmful": Preset(
        "harmful examples (a few behaviours with compliant answers, e.g. AdvBench goal,target), 5 epochs at 5e-5",
        "LoX (arXiv 2506.15606) after Qi et al. 2023 (arXiv 2310.03693), our reading of the epochs",
        None,
        "goal",
        "target",
        epochs=5,
        lr=5e-5,
    ),
    "safelora-harmful-lora": Preset(
        "harmful examples through a LoRA (rank 8), 5 epochs at 5e-5",
        "Safe LoRA (arXiv 2405.16833), LoRA fine-tuning on harmful data, our reading of rank and epochs",
        None,
        "goal",
        "target",
        epochs=5,
        lr=5e-5,
        lora=8,
    ),
    "safelora-alpaca-lora": Preset(
        "benign: Alpaca through a LoRA (rank 8), 1 epoch at 2e-5",
        "Safe LoRA (arXiv 2405.16833), LoRA fine-tuning on benign data, our reading of rank and epochs",
        "tatsu-lab/alpaca",
        "instruction",
        "output",
        epochs=1,
        lr=2e-5,
        lora=8,
    ),
}
