"""The linear algebra every method shares, written once.

All functions take a matrix or a stack of matrices (``[..., m, n]``: tensors
with more than 2 dimensions are batches over the leading dimensions, never
flattened) and stay on the input's device, so they run unchanged on
mergekit's CPU or GPU executor. Nothing loops over the matrices of a stack in
Python.

Top-k subspaces come from one of two paths, chosen by ``svd`` (``modes``):

- ``exact``: LAPACK / cuSOLVER thin SVD (``exact``);
- ``randomized``: a Gaussian sketch with power iterations, certified per matrix
  (``randomized``, ``certificate``); a matrix whose bound on the error of the
  low-rank term cannot be shown below 1e-3 is recomputed without a sketch;
- ``auto`` (what the methods default to): randomized where its sketch is at
  most a quarter of the smaller dimension; everything else (and the fallbacks)
  through the smaller Gram matrix in float64 on CPU (``gram``, with a proven
  rounding bound), LAPACK where that bound is above 1e-3, for float64 inputs
  and on CUDA.

``spectra`` has the entropies and the ranks chosen from them (LSSF's rule,
with a path that needs no full SVD). docs/performance.md has the derivations
and the measurements.
"""

from mergekit_lox.linalg.exact import (
    Decomposition,
    add_product,
    compose,
    compute_dtype,
    frobenius,
    full_rank_of,
    left_project,
    lowrank_per_matrix,
    nonzero_mask,
    rank_mask,
    singular_values,
    sum_of_squares,
    svd,
    truncates,
)
from mergekit_lox.linalg.lowrank import add_lowrank, lowrank, top_k
from mergekit_lox.linalg.modes import (
    RANDOMIZED,
    SVD_MODES,
    RandomizedSettings,
    SvdMode,
    check_svd_mode,
    reset_svd_counts,
    svd_counts,
    uses_randomized,
    write_svd_counts,
)
from mergekit_lox.linalg.randomized import GuardedTopK, guarded_top_k
from mergekit_lox.linalg.spectra import (
    EntropyLowRank,
    EntropyRank,
    EntropyTopK,
    effective_rank,
    energy_entropy_lowrank,
    energy_entropy_rank,
    energy_entropy_ranks,
    energy_entropy_top_k,
    entropy_rank,
    singular_value_entropy,
)

__all__ = [
    "Decomposition",
    "EntropyRank",
    "EntropyLowRank",
    "EntropyTopK",
    "GuardedTopK",
    "RANDOMIZED",
    "RandomizedSettings",
    "SVD_MODES",
    "SvdMode",
    "add_lowrank",
    "add_product",
    "check_svd_mode",
    "compose",
    "compute_dtype",
    "effective_rank",
    "energy_entropy_lowrank",
    "energy_entropy_rank",
    "energy_entropy_ranks",
    "energy_entropy_top_k",
    "entropy_rank",
    "frobenius",
    "full_rank_of",
    "guarded_top_k",
    "left_project",
    "lowrank",
    "lowrank_per_matrix",
    "nonzero_mask",
    "rank_mask",
    "reset_svd_counts",
    "singular_value_entropy",
    "singular_values",
    "svd",
    "sum_of_squares",
    "svd_counts",
    "top_k",
    "truncates",
    "uses_randomized",
    "write_svd_counts",
]
