"""Load the models `analyze` compares: local folders or hub ids, one tensor at a time."""

from __future__ import annotations

import os
from typing import Dict

import torch

from mergekit_lox.errors import one_line
from mergekit_lox.files.hub import looks_like_hub_id


class AnalysisError(ValueError):
    """Bad input to `analyze`: the message names the model, file or tensor."""


def resolve_model(role: str, path: str) -> str:
    """A local model directory, or a Hugging Face id resolved as mergekit does
    (its cache, or a download of the weights and configs only)."""
    if os.path.isdir(path):
        return os.path.abspath(path)
    if os.path.exists(path):
        raise AnalysisError(f"{role} model {path}: not a directory")
    if not looks_like_hub_id(path):
        raise AnalysisError(f"{role} model {path}: no such directory")
    from mergekit_lox.files.hub import HubModelError, fetch_hub_model

    try:
        return fetch_hub_model(f"{role} model {path}", path)
    except HubModelError as error:
        raise AnalysisError(str(error)) from error


class ModelTensors:
    """One model directory, read one tensor at a time (mergekit's lazy loader), in the
    layout mergekit's merges read: a checkpoint transformers converts on loading
    (Mixtral's and Qwen-MoE's per-expert matrices into fused stacks) is converted as
    mergekit's loader converts it (``mergekit_compat.ConvertedCheckpoint``), so every
    tensor analyze reports is one a merge decomposes."""

    def __init__(self, role: str, path: str):
        from mergekit_lox.mergekit_compat import ConvertedCheckpoint

        self.role = role
        self.path = resolve_model(role, path)
        try:
            self.checkpoint = ConvertedCheckpoint(self.path)
        except Exception as error:  # noqa: BLE001 - any unreadable index is bad input
            raise AnalysisError(
                f"{role} model {path}: cannot read its weights (need model.safetensors, "
                f"model.safetensors.index.json or pytorch_model.bin): {one_line(error)}"
            ) from error
        self.shard_of: Dict[str, str] = self.checkpoint.shard_of

    def __contains__(self, name: str) -> bool:
        return name in self.checkpoint

    def get(self, name: str) -> torch.Tensor:
        try:
            return self.checkpoint.get(name)
        except Exception as error:  # noqa: BLE001
            shard = os.path.join(self.path, self.shard_of.get(name, "?"))
            raise AnalysisError(
                f"{self.role} model {self.path}: cannot read tensor {name} from {shard}: {one_line(error)}"
            ) from error


def resolve_device(device: str) -> torch.device:
    try:
        resolved = torch.device(device)
        torch.empty(0, device=resolved)
    except Exception as error:  # noqa: BLE001
        raise AnalysisError(f"device {device!r} is not usable: {one_line(error)}") from error
    return resolved
