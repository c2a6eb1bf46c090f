"""The project's merge methods: THE list, and what the rest of the package asks of it.

Adding a method is one module in this folder plus one line in ``METHOD_MODULES``
(docs/contributing.md has a worked example). A method module defines:

- ``NAME``: the mergekit method name;
- ``ROLES``: an ``inputs.RoleRequirement`` (the roles its non-base models carry);
- ``METHOD``: the mergekit ``MergeMethod`` (a ``@merge_method`` kernel), and ends
  with ``register_method(METHOD)``.

Nothing here imports torch or mergekit at import time: the start-up hook and
``mergekit-lox --help`` stay cheap.
"""

from __future__ import annotations

import importlib
from typing import Dict, List

# In documentation order: `mergekit-lox methods` lists them in this order.
METHOD_MODULES = (
    "mergekit_lox.methods.lox",
    "mergekit_lox.methods.lssf",
    "mergekit_lox.methods.safelora",
    "mergekit_lox.methods.safemerge",
)


def method_modules() -> List:
    """The method modules, imported (each registers its method as it finishes).

    A module that is still half-imported (its own import is what pulled in
    mergekit's registry) is returned as is and registers itself when done.
    """
    return [importlib.import_module(name) for name in METHOD_MODULES]


def register_all() -> None:
    """Make sure every method is registered with mergekit (idempotent)."""
    method_modules()


def by_name() -> Dict[str, object]:
    """Method name -> its module."""
    return {module.NAME: module for module in method_modules()}


def method_objects() -> List:
    """The project's MergeMethod objects, in documentation order."""
    return [module.METHOD for module in method_modules()]


def role_requirement(name: str):
    """The ``RoleRequirement`` of method ``name``, or None when it is not ours."""
    module = by_name().get(name)
    return None if module is None else module.ROLES
