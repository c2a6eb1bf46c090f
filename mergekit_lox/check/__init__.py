"""`mergekit-lox check`: validate a recipe without loading a single tensor.

Every rule is read from what mergekit itself uses, so `check` cannot drift
from what a run would accept:

- the schema is mergekit's ``MergeConfiguration`` (pydantic) -- plus the keys
  it would silently ignore (pydantic drops unknown fields, so a misspelt
  ``paramters:`` would otherwise just vanish);
- methods, parameter names, scopes, defaults and types come from the
  registered ``MergeMethodSpec`` objects, and every scalar is validated with
  ``ParameterSpec.validate``, the very call the planner makes;
- input counts and base handling go through the method's ``validate_inputs``,
  roles through ``RoleRequirement.resolve`` (what the planner hook calls);
- chains follow ``mergekit-multi``: a document may carry ``name:`` and later
  documents refer to its output by that name.

A problem is reported as one line naming the document and the field.
"""

from __future__ import annotations

from mergekit_lox.check.documents import check_cycles, load_documents, split_documents
from mergekit_lox.check.files import (
    VOCABULARY_MISMATCH,
    check_architecture_fit,
    check_layer_counts,
    check_references,
    check_shapes,
    check_vocabularies,
)
from mergekit_lox.check.parameters import (
    check_dtypes,
    check_inputs,
    check_no_op,
    check_parameters,
    check_precision,
    method_registry,
)
from mergekit_lox.check.report import Document, Problem, Report, suggest
from mergekit_lox.check.schema import check_schema

# --------------------------------------------------------------------------
# Schema


# --------------------------------------------------------------------------
# Model references: local paths, Hugging Face IDs, earlier documents


def is_sweep_document(raw) -> bool:
    """A `mergekit-lox sweep` file, not a recipe: a mapping with ``recipe:`` (or a staged
    sweep's ``defend:``) and ``grid:`` or ``points:``."""
    return isinstance(raw, dict) and ("recipe" in raw or "defend" in raw) and ("grid" in raw or "points" in raw)


def check_text(text: str, recipe: str = "recipe") -> Report:
    """Validate recipe source text; paths are resolved against the working directory."""
    report = Report(recipe)
    loaded = load_documents(report, text)
    if loaded is None:
        return report
    if not loaded:
        report.problems.append(Problem("recipe", "", "no documents"))
        return report
    if len(loaded) == 1 and is_sweep_document(loaded[0]):
        report.problems.append(
            Problem("recipe", "", "a sweep file, not a recipe: run it with `mergekit-lox sweep FILE -o DIR`")
        )
        return report
    split_documents(report, loaded)
    methods = method_registry()
    chain = len(loaded) > 1
    names = {d.name for d in report.documents if d.name is not None} if chain else set()
    for doc in report.documents:
        if not isinstance(doc.raw, dict) or ("name" in doc.raw and doc.name is None):
            continue
        check_schema(report, doc)
        method_name = doc.raw.get("merge_method")
        method = methods.get(method_name) if isinstance(method_name, str) else None
        if isinstance(method_name, str) and method is None:
            report.problems.append(
                Problem(
                    doc.label,
                    "merge_method",
                    f"unknown merge method {method_name!r}"
                    + (suggest(method_name, methods) or " (see `mergekit-lox methods`)"),
                )
            )
        if doc.config is None:
            continue
        check_dtypes(report, doc)
        check_precision(report, doc)
        check_references(report, doc, names)
        check_vocabularies(report, doc)
        check_shapes(report, doc)
        check_layer_counts(report, doc)
        if report.ok:
            check_architecture_fit(report, doc)
        if method is None:
            continue
        check_parameters(report, doc, method)
        check_inputs(report, doc, method)
        check_no_op(report, doc)
    if chain:
        check_cycles(report, report.documents)
    return report


def check_recipe(path: str) -> Report:
    """Validate the recipe file at ``path`` without computing anything."""
    from mergekit_lox.check.documents import RecipeReadError, read_recipe_text

    try:
        text = read_recipe_text(path)
    except RecipeReadError as error:
        report = Report(path)
        report.problems.append(Problem("recipe", "", str(error)))
        return report
    return check_text(text, path)


def summary(report: Report) -> str:
    """One line for a valid recipe: what runs, in which order."""
    docs = report.documents
    if len(docs) == 1:
        return f"ok: {report.recipe}: 1 document, {docs[0].config.merge_method}"
    stages = ", ".join(f"{d.name or 'final'} ({d.config.merge_method})" for d in docs)
    return f"ok: {report.recipe}: chain of {len(docs)} documents: {stages}"


__all__ = [
    "VOCABULARY_MISMATCH",
    "Document",
    "Problem",
    "Report",
    "check_recipe",
    "check_text",
    "is_sweep_document",
    "summary",
]
