"""Streaming activation Grams of every linear layer, and the SVD of ``Z = W X^`` from them.

For a linear weight ``W [out, in]`` (a Conv1D's stored ``[in, out]`` weight transposed:
its output is ``x W_s + b = W x + b`` all the same) and the normalised inputs ``X^ [in, tokens]`` the
layer sees, ``Z Z^T = W (X^ X^T) W^T``: the left singular vectors of Z and its
singular values need only a Gram matrix, never the activations. Each layer keeps the
smaller of the two Grams, summed over every token as batches stream through:

- ``in <= out``: ``G = X^ X^T`` (in x in), from the layer's input;
- ``in > out``: ``K = Z Z^T`` (out x out), from its output (minus the bias), since
  ``W x^ = (W x) / ||x||`` for a per-token normalisation.

State: one ``min(in, out)^2`` float64 matrix per linear weight, whatever the number of
samples (``state_elements``). float64 because a Gram squares the spectrum: in float32
every singular value below about ``sqrt(eps) S_1 = 3.5e-4 S_1`` would be noise. Finalising
takes the eigenvectors of K, or those of G followed by the SVD of ``W Q diag(sqrt(lambda))``
(which has Z's left singular vectors and singular values, as its Gram is ``W G W^T``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from mergekit_lox.layout import is_conv1d

# How X is normalised before the Gram (docs/lssf.md, "Our reading"): "token" scales every
# token's input vector to unit L2 norm; "none" keeps the raw activations.
NORMALIZATIONS = ("token", "none")


@dataclass
class LayerGram:
    """The running Gram of one linear layer."""

    weight_name: str
    module: torch.nn.Module
    side: str  # "input" (G, in x in) or "output" (K, out x out)
    gram: torch.Tensor
    tokens: int = 0
    transposed: bool = False  # a Conv1D: its weight is stored [in, out] (layout.py)

    def linear_weight(self) -> torch.Tensor:
        """The layer's ``W [out, in]`` (a Conv1D's stored weight transposed)."""
        weight = self.module.weight.detach()
        return weight.mT if self.transposed else weight


class GramAccumulator:
    """Forward hooks on the given linear layers that add each batch to their Grams.

    ``modules`` maps module names (``model.named_modules()``) to the weight names the
    subspace is written under. Set ``mask`` (a ``[batch, tokens]`` bool tensor) before
    each forward pass so that padding never enters a Gram.
    """

    def __init__(self, model: torch.nn.Module, modules: Dict[str, str], normalization: str = "token"):
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, got {normalization!r}")
        self.normalization = normalization
        self.mask: Optional[torch.Tensor] = None
        self.layers: List[LayerGram] = []
        named = dict(model.named_modules())
        for module_name, weight_name in modules.items():
            module = named[module_name]
            transposed = is_conv1d(module)
            in_features, out_features = module.weight.shape[:: 1 if transposed else -1]
            side = "input" if in_features <= out_features else "output"
            size = min(in_features, out_features)
            gram = torch.zeros(size, size, dtype=torch.float64, device=module.weight.device)
            self.layers.append(LayerGram(weight_name, module, side, gram, transposed=transposed))
        self._handles: list = []

    def __enter__(self) -> "GramAccumulator":
        for layer in self.layers:
            self._handles.append(layer.module.register_forward_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def state_elements(self) -> int:
        """Numbers held across batches: one Gram per layer, independent of the sample count."""
        return sum(layer.gram.numel() for layer in self.layers)

    def _rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """The ``[tokens, features]`` rows of a hook's tensor, padding dropped, float64."""
        mask = self.mask
        if mask is not None and tensor.shape[:-1] == mask.shape:
            tensor = tensor[mask.to(tensor.device)]
        return tensor.reshape(-1, tensor.shape[-1]).to(torch.float64)

    def _hook(self, layer: LayerGram):
        def hook(module, args, output):
            x = self._rows(args[0])
            if self.normalization == "token":
                norms = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
                scale = torch.where(norms > 0, 1 / torch.where(norms > 0, norms, 1.0), 0.0)
            else:
                scale = torch.ones(x.shape[0], 1, device=x.device, dtype=x.dtype)
            if layer.side == "input":
                rows = x * scale
            else:
                z = self._rows(output)
                if module.bias is not None:
                    z = z - module.bias.to(torch.float64)
                rows = z * scale
            layer.gram.addmm_(rows.mT, rows)
            layer.tokens += int(x.shape[0])

        return hook


def left_factors(weight: torch.Tensor, layer: LayerGram) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(U, S)`` of ``Z = W X^``: every left singular vector (``[out, min(out, in)]``)
    and singular value (descending), in float64, from the layer's Gram."""
    gram = layer.gram
    gram = (gram + gram.mT) / 2  # symmetric up to the rounding of the sums
    values, vectors = torch.linalg.eigh(gram)  # ascending
    values = values.clamp(min=0)
    if layer.side == "output":
        return vectors.flip(-1), values.flip(-1).sqrt()
    # Z Z^T = W G W^T = M M^T with M = W Q diag(sqrt(lambda)) [out, in]: Z's left factors.
    M = weight.to(torch.float64) @ (vectors * values.sqrt())
    U, S, _ = torch.linalg.svd(M, full_matrices=False)
    return U, S
