"""Shared fixtures: small local model families with planted structure."""

from __future__ import annotations

import os

import pytest
import torch
import yaml

from mergekit_lox.synthetic import FamilySpec, build_family, load_state_dict

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


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
