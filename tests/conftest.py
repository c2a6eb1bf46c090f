"""Shared fixtures: small local model families with planted structure."""

from __future__ import annotations

import os

# One BLAS/OpenMP thread per process, for the NumPy references and torch alike:
# on these tiny matrices a thread pool only spins, and on a busy 2-core machine
# that made each SVD ~70-100x slower. The suite's parallelism comes from
# pytest-xdist workers instead (README: `-n 2`). Must be set before NumPy and
# torch load; subprocesses (mergekit-yaml, ...) inherit it.
for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

torch.set_num_threads(1)

from mergekit_lox.demo.synthetic import FamilySpec, build_family, load_state_dict  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# transformers creates its log handler on first use, bound to the sys.stderr of that moment:
# created inside a test's capsys, it writes to a closed stream in every later test
# ("--- Logging error ---"). Created now, it is bound to pytest's session-long stream.
import transformers.utils.logging  # noqa: E402

transformers.utils.logging.get_verbosity()


@pytest.fixture(scope="session")
def family(tmp_path_factory):
    """float32 base / aligned / finetuned, planted safety rank 4."""
    return build_family(str(tmp_path_factory.mktemp("family")), FamilySpec(), finetune=True)


@pytest.fixture(scope="session")
def family_bf16_sharded(tmp_path_factory):
    """The same structure, stored as bfloat16 and split into several shards."""
    return build_family(
        str(tmp_path_factory.mktemp("family_bf16")),
        FamilySpec(seed=3),
        finetune=True,
        dtype=torch.bfloat16,
        max_shard_size="60KB",
    )


def run_merge_recipe(recipe: dict, out_dir: str, **options) -> dict:
    """Run a recipe in-process through mergekit's own run_merge; return the output tensors."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    import mergekit_lox  # noqa: F401 - registration (the .pth does it too)

    source = yaml.safe_dump(recipe, sort_keys=False)
    run_merge(
        MergeConfiguration.model_validate(yaml.safe_load(source)),
        str(out_dir),
        options=MergeOptions(quiet=True, **options),
        config_source=source,
    )
    return load_state_dict(str(out_dir))


@pytest.fixture
def run_recipe():
    return run_merge_recipe


@pytest.fixture(scope="session")
def states(family):
    """Loaded state dicts of the float32 family, by role."""
    return {
        "base": load_state_dict(family.base),
        "aligned": load_state_dict(family.aligned),
        "finetuned": load_state_dict(family.finetuned),
    }


# LoRA fine-tune of the float32 family's aligned model (Safe LoRA tests).
LORA_TARGETS = ["q_proj", "v_proj", "down_proj"]
LORA_RANK, LORA_ALPHA, LORA_ALPHA_PATTERN = 4, 8, {"down_proj": 16}


@pytest.fixture(scope="session")
def lora_adapter(family, tmp_path_factory):
    """A PEFT LoRA adapter on `family.aligned`, built locally with PEFT.

    r=4, lora_alpha=8 (scaling 2), down_proj alpha 16 (scaling 4, via
    alpha_pattern); lora_B set to random non-zero values (PEFT starts it at 0).
    Returns the adapter directory.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(family.aligned, dtype=torch.float32)
    config = LoraConfig(
        r=LORA_RANK, lora_alpha=LORA_ALPHA, alpha_pattern=LORA_ALPHA_PATTERN, target_modules=LORA_TARGETS
    )
    # PEFT draws lora_A from torch's global generator, whose state depends on which tests
    # ran before in this worker: seeded here, the adapter (and every cosine gap the
    # Safe LoRA tests check before asserting) is the same in every run.
    with torch.random.fork_rng():
        torch.manual_seed(7)
        peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
    path = str(tmp_path_factory.mktemp("lora") / "adapter")
    peft_model.save_pretrained(path)
    return path


def run_cli(args, capsys):
    """Run `mergekit-lox ARGS` in-process: (exit code, stdout, stderr)."""
    from mergekit_lox.cli import main

    code = 0
    try:
        main(args)
    except SystemExit as done:
        code = done.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err
