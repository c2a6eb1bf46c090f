"""mergekit-lox: safety-subspace weight surgery as native mergekit merge methods.

Importing this package is cheap (no torch, no mergekit): it makes sure the
methods `lox_extrapolate`, `lssf_fusion`, `safelora_project` and `safemerge` are registered
with mergekit as soon as mergekit's registry is imported, or at once if it
already is. The method objects themselves load lazily as attributes.
"""

from mergekit_lox import _hook

__version__ = "0.1.0"

_hook.install()


def __getattr__(name):
    # Lazily: `mergekit_lox.register_all`, and each method object by its name
    # (`mergekit_lox.lox_extrapolate`, ...), from the one list in methods/.
    import importlib

    # import_module, not `from mergekit_lox import methods`: that would ask this
    # very __getattr__ for "methods" before the submodule is imported.
    methods = importlib.import_module("mergekit_lox.methods")
    if name == "register_all":
        return methods.register_all
    module = methods.by_name().get(name)
    if module is None:
        raise AttributeError(f"module 'mergekit_lox' has no attribute {name!r}")
    return module.METHOD
