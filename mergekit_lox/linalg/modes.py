"""Choosing a decomposition (``svd: auto | exact | randomized``), its settings, and
the counters of which path each matrix took."""

from __future__ import annotations

import atexit
import json
import math
import os
import threading
from dataclasses import dataclass
from typing import Dict, Tuple

from typing_extensions import Literal, get_args

SvdMode = Literal["auto", "exact", "randomized"]
SVD_MODES: Tuple[str, ...] = get_args(SvdMode)


@dataclass(frozen=True)
class RandomizedSettings:
    """The randomized range finder and its certificate (docs/performance.md).

    ``tolerance``: the "Agreement" bound on the relative Frobenius error of the
    low-rank term. ``power_iterations`` to start with, at most
    ``max_power_iterations`` in all. ``probes`` Gaussian vectors and at most
    ``probe_steps`` applications of ``FᵀF`` bound the spectral norm of the part
    ``F`` of the matrix outside the top-k term; ``failure_probability`` is the
    chance, over those probes, that this bound is wrong for a given matrix.
    ``min_relative_gap``: a matrix whose Ritz values show less relative gap at k
    falls back without probing (no bound could be shown). ``auto_fraction``:
    ``auto`` sketches when ``auto_fraction * (k + oversample) <= min(m, n)``.
    ``seed``: the sketch and the probes are drawn from generators seeded by it and
    the matrix shape, so the same inputs give the same outputs, run after run.
    """

    oversample: int = 10
    power_iterations: int = 2
    max_power_iterations: int = 10
    tolerance: float = 1e-3
    seed: int = 20250615
    auto_fraction: int = 4
    probes: int = 16
    probe_steps: int = 4
    failure_probability: float = 1e-9
    min_relative_gap: float = 0.2

    def probe_threshold(self) -> float:
        """``t`` with ``P(max_i c_i² < t) <= failure_probability`` for ``probes``
        independent standard normal ``c_i``: ``P(c² < t) <= sqrt(2 t / π)``."""
        return (math.pi / 2) * self.failure_probability ** (2.0 / self.probes)


RANDOMIZED = RandomizedSettings()


def check_svd_mode(svd: str) -> str:
    if svd not in SVD_MODES:
        raise ValueError(f"svd must be one of {', '.join(SVD_MODES)}, got {svd!r}")
    return svd


def uses_randomized(shape, k: int, svd: str = "auto", settings: RandomizedSettings = RANDOMIZED) -> bool:
    """Whether the top-``k`` subspace of a ``shape`` matrix is sketched (before the certificate).

    A sketch as wide as the smaller dimension is no sketch: such matrices
    always take the exact path, whatever ``svd`` says.
    """
    small = min(shape[-2], shape[-1])
    sketch = k + settings.oversample
    if check_svd_mode(svd) == "exact" or sketch >= small:
        return False
    return svd == "randomized" or settings.auto_fraction * sketch <= small


# --- Counters: how many matrices took which path -------------------------------

_COUNTS: Dict[str, int] = {"exact": 0, "randomized": 0, "fallback": 0, "gram": 0}
_COUNTS_LOCK = threading.Lock()  # mergekit's --multi-gpu runs kernels in threads
_STATS_ENV = "MERGEKIT_LOX_SVD_STATS"
_stats_registered = False


def _count(path: str, matrices: int) -> None:
    global _stats_registered
    with _COUNTS_LOCK:
        _COUNTS[path] += matrices
        # MERGEKIT_LOX_SVD_STATS=FILE: the counters go to FILE as JSON when the
        # process exits (a merge run as `mergekit-yaml` says how many matrices were
        # certified). Registered at the first count, never at import.
        if not _stats_registered and os.environ.get(_STATS_ENV):
            atexit.register(write_svd_counts, os.environ[_STATS_ENV])
            _stats_registered = True


def svd_counts() -> Dict[str, int]:
    """Matrices decomposed so far in this process: ``exact`` (no sketch: chosen),
    ``randomized`` (sketched and certified), ``fallback`` (sketched, not
    certified, recomputed without a sketch); ``gram``: how many of the ``exact``
    and ``fallback`` ones the certified float64 Gram path did (linalg/gram.py;
    the rest went to LAPACK's SVD)."""
    with _COUNTS_LOCK:
        return dict(_COUNTS)


def reset_svd_counts() -> None:
    with _COUNTS_LOCK:
        for key in _COUNTS:
            _COUNTS[key] = 0


def write_svd_counts(path: str) -> None:
    with open(path, "w") as f:
        json.dump(svd_counts(), f)
