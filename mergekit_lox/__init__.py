"""mergekit-lox: safety-subspace weight surgery as native mergekit merge methods.

Importing this package is cheap (no torch, no mergekit): it makes sure the
methods `lox_extrapolate`, `lssf_fusion` and `safelora_project` are registered
with mergekit as soon as mergekit's registry is imported, or at once if it
already is. The method objects themselves load lazily as attributes.
"""

from mergekit_lox import _hook

__version__ = "0.1.0"

_hook.install()

_LAZY = {
    "lox_extrapolate": "mergekit_lox.lox",
    "lssf_fusion": "mergekit_lox.lssf",
    "safelora_project": "mergekit_lox.safelora",
    "register_all": "mergekit_lox.registration",
}


def __getattr__(name):
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'mergekit_lox' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module_name), name)


__all__ = ["__version__", *_LAZY]
