"""Sweep files: reading, validation (one line per problem, as `check` prints them), points.

A sweep file is one YAML mapping::

    recipe: lox.yml                 # a path relative to the sweep file, or the recipe inline
    grid:                           # all combinations; `points:` takes an explicit list instead
      parameters.alpha: [0.5, 1.25] # in a chain: lox.parameters.alpha (document name first)
      parameters.rank: [2, 4]
    eval: {safety: harm.jsonl, column: prompt, judge: keyword, max_new_tokens: 8}
    keep: none                      # none | best | all: which merged models stay on disk
    tolerance: 0.05                 # the chosen point's refusal rate may be this far below the reference's
    reference: null                 # a model to compare with, or a refusal rate; default: the aligned model
    mergekit_options: [--cuda]      # options for each merge, as for `mergekit-lox run`

Relative paths in the sweep file (``recipe:``, the eval sources, ``reference:``)
are resolved against the sweep file's folder; the recipe's own model paths are read
as `mergekit-lox run` reads them (from the current folder).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import yaml

from mergekit_lox.check.documents import RecipeReadError, load_recipe_documents
from mergekit_lox.check.report import Document, Problem, Report, suggest
from mergekit_lox.errors import one_line
from mergekit_lox.sweep import overrides

KEYS = ("recipe", "grid", "points", "eval", "keep", "tolerance", "reference", "mergekit_options")
STAGED_KEYS = ("defend", "attack", "repair", "baseline")  # a staged sweep (sweep/stages.py)
KEEP = ("none", "best", "all")
# mergekit options that run code from a model's folder: only the command line may give them
# (mergekit-lox sweep --trust-remote-code), so that no YAML file alone runs code.
CODE_RUNNING_OPTIONS = {"trust_remote_code": ("--trust-remote-code", "runs Python code shipped with the models")}
DEFAULT_TOLERANCE = 0.05
# run_eval's arguments that the sweep sets itself.
EVAL_RESERVED = ("models", "out_dir", "progress", "echo")
EVAL_PATHS = ("safety", "utility", "judge", "cache_dir", "over_refusal")  # read from the sweep file's folder when there
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".txt", ".text", ".parquet")
INLINE = "the inline recipe"
KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


class SweepError(ValueError):
    """The sweep file cannot run as written; nothing has been computed."""


@dataclass
class Sweep:
    path: str  # the sweep file
    recipe_label: str  # the recipe's path, or INLINE
    documents: List[Any]
    points: List[Dict[str, Any]]  # address -> value, in run order
    eval: Dict[str, Any]  # run_eval's keyword options, paths resolved
    keep: str = "none"
    tolerance: float = DEFAULT_TOLERANCE
    reference: Any = None  # None: the aligned model; a str: a model; a float: a refusal rate
    mergekit_options: List[str] = field(default_factory=list)
    # Options from the command line, never from the file (--trust-remote-code): outside the fingerprint.
    command_line_options: List[str] = field(default_factory=list)
    # A staged sweep (stages.py): documents are defend's; attack name -> AttackSettings fields.
    attacks: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    repair_documents: Optional[List[Any]] = None
    repair_label: Optional[str] = None
    baseline: Optional[str] = None  # the undefended model attacked as the baseline; None: no baseline

    @property
    def staged(self) -> bool:
        return bool(self.attacks)

    @property
    def addresses(self) -> List[str]:
        seen: Dict[str, None] = {}
        for point in self.points:
            seen.update(dict.fromkeys(point))
        return list(seen)

    def fingerprint(self) -> str:
        """What the points' results depend on (not keep/tolerance/reference: they only choose)."""
        what = {"recipe": self.documents, "points": self.points, "eval": self.eval, "merge": self.mergekit_options}
        if self.staged:
            what.update(attacks=self.attacks, repair=self.repair_documents, baseline=self.baseline)
        return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


# Bounds on what a sweep file (and the recipe it names) may expand to. YAML aliases
# make a few hundred bytes stand for billions of values (an "alias bomb"); the loader
# shares them, but validating, fingerprinting and copying a grid walks them expanded.
MAX_TEXT_BYTES = 1 << 20
MAX_VALUES = 100_000
MAX_POINTS = 10_000


class SweepTooLarge(ValueError):
    """A sweep file (or its recipe) larger than the bounds above; the message says which."""


def expanded_size(value: Any, limit: int = MAX_VALUES) -> int:
    """How many values ``value`` holds with every shared (aliased) part counted each time
    it appears, up to just past ``limit``: linear in the distinct objects, never expanding."""
    sizes: Dict[int, int] = {}
    stack: List[Tuple[Any, bool]] = [(value, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if key in sizes:
            continue
        children = list(node.items()) if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            sizes[key] = 1
            continue
        items = [part for pair in children for part in pair] if isinstance(node, dict) else children
        if not children_done:
            stack.append((node, True))
            stack.extend((child, False) for child in items if id(child) not in sizes)
            continue
        sizes[key] = min(limit + 1, 1 + sum(sizes.get(id(child), 1) for child in items))
    return sizes[id(value)]


def bound(value: Any, what: str) -> None:
    """SweepTooLarge when ``value`` expands to more than MAX_VALUES values."""
    if expanded_size(value) > MAX_VALUES:
        raise SweepTooLarge(
            f"{what} expands to more than {MAX_VALUES:,} values (YAML aliases repeat their anchor each time "
            "they are used); write the values out"
        )


def _read_text(path: str) -> str:
    from mergekit_lox.check.documents import RecipeReadError, read_recipe_text

    try:
        size = os.path.getsize(path)
    except OSError:
        size = 0
    if size > MAX_TEXT_BYTES:
        raise RecipeReadError(f"{size:,} bytes: a sweep file or its recipe is at most {MAX_TEXT_BYTES:,} bytes")
    return read_recipe_text(path)


def _load(path: str) -> Any:
    """The one YAML document at ``path``, read as every recipe is (check.documents:
    UTF-8, duplicate keys refused). Aliases stay shared: ``bound`` before walking it."""
    from mergekit_lox.check.documents import RecipeLoader

    try:
        return yaml.load(_read_text(path), Loader=RecipeLoader)
    except RecursionError:
        raise SweepTooLarge("nested too deeply to read") from None


def is_sweep_file(path: str) -> bool:
    """A YAML mapping with ``recipe:`` and ``grid:`` or ``points:`` (check.is_sweep_document)."""
    from mergekit_lox.check import is_sweep_document

    try:
        return is_sweep_document(_load(path))  # looks at the top-level keys only: bombs stay unexpanded
    except (ValueError, yaml.YAMLError):
        return False


def _resolve_path(base: str, value: Any) -> Any:
    """``value`` against the sweep file's folder when it names something there."""
    if not isinstance(value, str) or os.path.isabs(value) or value.startswith("~"):
        return os.path.expanduser(value) if isinstance(value, str) else value
    candidate = os.path.normpath(os.path.join(base, value))
    return candidate if os.path.exists(candidate) else value


class _Reader:
    """Collects problems while reading one sweep file."""

    def __init__(self, path: str):
        self.path = path
        self.base = os.path.dirname(os.path.abspath(path))
        self.report = Report(path)

    def problem(self, where: str, field_: str, message: str) -> None:
        self.report.problems.append(Problem(where, field_, message))

    def recipe(
        self, raw: Any, key: str = "recipe", stand_in=None
    ) -> Tuple[Optional[str], Optional[str], Optional[List[Any]]]:
        """(label, text, documents) of the recipe under ``key``, its own problems copied in;
        ``stand_in(documents)`` is what `check` validates in place of the documents (a
        repair recipe's placeholders replaced by real models)."""
        from mergekit_lox.check import check_text

        if isinstance(raw, str):
            path = _resolve_path(self.base, raw)
            try:
                text = _read_text(path)
                bound(load_recipe_documents(text), f"recipe {path}")
            except (RecipeReadError, SweepTooLarge) as error:
                self.problem(key, "", f"cannot read {path}: {str(error).removeprefix('cannot read: ')}")
                return None, None, None
            except yaml.YAMLError:
                pass  # check_text names the YAML problem
            except RecursionError:
                self.problem(key, "", f"cannot read {path}: nested too deeply")
                return None, None, None
            label = path
        elif isinstance(raw, dict) or (isinstance(raw, list) and raw and all(isinstance(d, dict) for d in raw)):
            label = INLINE
            text = overrides.recipe_yaml(raw if isinstance(raw, list) else [raw])
        else:
            self.problem(key, "", "a recipe file path, a recipe mapping, or a list of chain documents")
            return None, None, None
        checked_text = text
        if stand_in is not None:
            try:
                checked_text = overrides.recipe_yaml(stand_in(load_recipe_documents(text)))
            except yaml.YAMLError:
                pass  # check_text names it
        checked = check_text(checked_text, label)
        for kind, items in (("problems", checked.problems), ("notes", checked.notes)):
            for p in items:
                where = f"{key}: {p.document}" if label == INLINE else f"{key} {label}: {p.document}"
                getattr(self.report, kind).append(Problem(where, p.field, p.message))
        if checked.problems:
            return label, text, None
        return label, text, load_recipe_documents(text)

    def points(self, raw: dict) -> List[Tuple[str, Dict[str, Any]]]:
        """(where, overrides) of every point, the grid expanded."""
        if "grid" in raw and "points" in raw:
            self.problem("grid", "", "give grid: or points:, not both")
            return []
        if "grid" in raw:
            grid = raw["grid"]
            if not isinstance(grid, dict) or not grid:
                self.problem("grid", "", "empty grid: map parameter addresses to lists of values")
                return []
            ok = True
            for address, values in grid.items():
                if not isinstance(values, list) or not values:
                    got = "an empty list" if values == [] else repr(values)
                    self.problem("grid", str(address), f"needs a non-empty list of values, got {got}")
                    ok = False
            count = math.prod(len(values) for values in grid.values()) if ok else 0
            if count > MAX_POINTS:
                self.problem("grid", "", f"{count:,} points: a sweep has at most {MAX_POINTS:,}")
                return []
            return [("grid", point) for point in overrides.expand_grid(grid)] if ok else []
        listed = raw.get("points")
        if not isinstance(listed, list) or not listed:
            self.problem("points", "", "empty: give a list of mappings from parameter address to value")
            return []
        if len(listed) > MAX_POINTS:
            self.problem("points", "", f"{len(listed):,} points: a sweep has at most {MAX_POINTS:,}")
            return []
        bad = [i for i, p in enumerate(listed) if not isinstance(p, dict)]
        for i in bad:
            self.problem(f"points[{i}]", "", "a point is a mapping from parameter address to value")
        return [] if bad else [(f"points[{i}]", p) for i, p in enumerate(listed)]

    def overrides(self, documents: List[Any], points: List[Tuple[str, Dict[str, Any]]], prefix: str = "") -> None:
        """Every address against the recipe, every value with the method's ParameterSpec
        (``prefix``: the stage the addresses were given under, ``defend.``)."""
        from mergekit_lox.check.parameters import check_parameters, method_registry

        methods = method_registry()
        checked, bad_addresses = set(), set()
        seen = {str(p) for p in self.report.problems}
        for where, point in points:
            section = "grid" if where == "grid" else where
            for address, value in point.items():
                if address in bad_addresses:
                    continue
                try:
                    index, parts = overrides.resolve(documents, address)
                except overrides.AddressError as error:
                    bad_addresses.add(address)
                    self.problem(section, prefix + str(address), str(error))
                    continue
                key = (address, json.dumps(value, sort_keys=True, default=str))
                if key in checked:
                    continue
                checked.add(key)
                document = overrides.apply(documents, {address: value})[index]
                method = methods.get(document.get("merge_method"))
                if method is None:
                    continue  # the recipe's own check reports it
                scratch = Report(self.path)
                check_parameters(scratch, Document(index + 1, None, document, ""), method)
                target = overrides.field_path(parts)
                for p in scratch.problems:
                    if p.field == target or p.field.startswith((target + "[", target + ".")):
                        problem = Problem(section, prefix + str(address), p.message)
                        if str(problem) not in seen:
                            seen.add(str(problem))
                            self.report.problems.append(problem)
                        if "has no parameter" in p.message:
                            bad_addresses.add(address)

    def stages(self, raw: dict, documents: Optional[List[Any]], points) -> Dict[str, Any]:
        """attack:, repair:, baseline: of a staged sweep, and the stage-prefixed addresses."""
        from mergekit_lox.sweep import stages

        attacks = self.attacks(raw.get("attack"))
        aligned = overrides.aligned_model(documents) if documents else None
        baseline = raw.get("baseline", aligned)
        if "baseline" in raw and not (baseline is False or (isinstance(baseline, str) and baseline)):
            self.problem("baseline", "", f"{baseline!r}: a model (path or hub id) to attack undefended, or false")
        elif baseline is None and documents is not None:
            self.problem(
                "baseline",
                "",
                "the defend recipe has no plain aligned model: name the undefended model "
                "(baseline: MODEL), or baseline: false",
            )
        repair_label, repair_documents = None, None
        if "repair" in raw:
            stand_in = aligned if aligned is not None else (baseline if isinstance(baseline, str) else None)

            def check_with_models(loaded: List[Any]) -> List[Any]:
                return stages.stand_in_documents(loaded, stand_in)

            repair_label, _, repair_documents = self.recipe(raw["repair"], "repair", check_with_models)
            if repair_documents is not None:
                for message in stages.placeholder_problems(repair_documents, attacks):
                    self.problem("repair", "", message)
        by_stage: Dict[str, List[Tuple[str, Dict[str, Any]]]] = {stage: [] for stage in stages.STAGES}
        for where, point in points:
            split: Dict[str, Dict[str, Any]] = {stage: {} for stage in stages.STAGES}
            for address, value in point.items():
                stage, _, rest = str(address).partition(".")
                if stage not in stages.STAGES or not rest or (stage == "repair" and "repair" not in raw):
                    section = "grid" if where == "grid" else where
                    given = " or repair." if "repair" in raw else ""
                    self.problem(
                        section,
                        str(address),
                        f"in a staged sweep an address starts with defend.{given} (defend.parameters.alpha)",
                    )
                    continue
                split[stage][rest] = value
            for stage in stages.STAGES:
                by_stage[stage].append((where, split[stage]))
        for stage, stage_documents in (("defend", documents), ("repair", repair_documents)):
            if stage_documents is not None:
                self.overrides(stage_documents, by_stage[stage], prefix=stage + ".")
        return {
            "attacks": attacks,
            "repair_documents": repair_documents,
            "repair_label": repair_label,
            # given in the sweep file: read from its folder; the recipe's aligned model: as `run` reads it
            "baseline": (_resolve_path(self.base, baseline) if "baseline" in raw else baseline)
            if isinstance(baseline, str)
            else None,
        }

    def attacks(self, raw: Any) -> Dict[str, Dict[str, Any]]:
        """attack: NAME -> the fields of AttackSettings, each checked by constructing it."""
        from mergekit_lox.sweep import stages

        if not isinstance(raw, dict) or not raw:
            self.problem("attack", "", "a mapping of attack names to settings: {benign: {data: ft.jsonl, lora: 8}}")
            return {}
        result = {}
        for name, fields in raw.items():
            if not isinstance(name, str) or not stages.ATTACK_NAME.match(name):
                self.problem("attack", str(name), "an attack's name is letters, digits, _ . - (it names a folder)")
                continue
            if not isinstance(fields, dict):
                self.problem("attack", name, "the attack's settings: a mapping (data:, lora: or full:, ...)")
                continue
            resolved = {k: _resolve_path(self.base, v) if k in stages.ATTACK_PATHS else v for k, v in fields.items()}
            try:
                stages.attack_settings(resolved)
            except ImportError:
                self.problem("attack", name, "needs `mergekit-lox attack` (mergekit_lox.attack), not installed here")
                continue
            except (TypeError, ValueError) as error:
                self.problem("attack", name, one_line(error))
                continue
            data = resolved.get("data")
            if isinstance(data, str) and data.endswith(FILE_SUFFIXES) and not os.path.exists(data):
                self.problem("attack", name, f"data: {data}: no such file (relative paths are read from {self.base})")
                continue
            result[name] = resolved
        return result

    def eval(self, raw: Any) -> Dict[str, Any]:
        from mergekit_lox.evaluate import run_eval

        if not isinstance(raw, dict):
            self.problem("eval", "", "a mapping of `mergekit-lox eval` options (safety: required)")
            return {}
        signature = inspect.signature(run_eval).parameters
        options = {n: p for n, p in signature.items() if p.kind == p.KEYWORD_ONLY and n not in EVAL_RESERVED}
        result: Dict[str, Any] = {}
        for key, value in raw.items():
            if key not in options:
                known = ", ".join(options)
                self.problem("eval", str(key), f"not an eval option{suggest(key, options)}; options: {known}")
                continue
            kind = type(options[key].default)  # the default's type, where it has one
            if kind in KINDS and type(value) is not kind and not (kind is float and type(value) is int):
                self.problem("eval", key, f"must be {KINDS[kind]}, got {value!r}")
                continue
            result[key] = _resolve_path(self.base, value) if key in EVAL_PATHS else value
        for name, parameter in options.items():
            if parameter.default is inspect.Parameter.empty and name not in raw:
                self.problem("eval", name, "required (the safety prompts: a JSONL/JSON/CSV/text file or a dataset)")
        for key in ("safety", "utility"):
            value = result.get(key)
            if isinstance(value, str) and value.endswith(FILE_SUFFIXES) and not os.path.exists(value):
                self.problem("eval", key, f"{value}: no such file (relative paths are read from {self.base})")
        return result

    def settings(self, raw: dict, chain: bool) -> Dict[str, Any]:
        keep = raw.get("keep", "none")
        if keep not in KEEP:
            self.problem("keep", "", f"{keep!r}: one of {', '.join(KEEP)}")
        tolerance = raw.get("tolerance", DEFAULT_TOLERANCE)
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance <= 1:
            self.problem("tolerance", "", f"{tolerance!r}: a refusal-rate difference between 0 and 1")
        reference = raw.get("reference")
        rate = isinstance(reference, (int, float)) and not isinstance(reference, bool) and 0 <= reference <= 1
        if not (reference is None or isinstance(reference, str) or rate):
            self.problem("reference", "", f"{reference!r}: a model (path or hub id) or a refusal rate between 0 and 1")
        options = raw.get("mergekit_options", [])
        if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
            self.problem("mergekit_options", "", "a list of mergekit options (strings), e.g. [--cuda]")
            options = []
        else:
            self._merge_options(options, chain)
        return {
            "keep": keep,
            "tolerance": float(tolerance) if isinstance(tolerance, (int, float)) else DEFAULT_TOLERANCE,
            "reference": _resolve_path(self.base, reference) if isinstance(reference, str) else reference,
            "mergekit_options": list(options),
        }

    def _merge_options(self, options: List[str], chain: bool) -> None:
        from mergekit_lox.run.document import command_options

        if chain:
            from mergekit.scripts.multimerge import main as command

            argv = [self.path, "--intermediate-dir", "i", "--out-path", "o", *options]
        else:
            from mergekit.scripts.run_yaml import main as command

            argv = [self.path, "out", *options]
        try:
            parsed = command_options(command, argv)
        except Exception as error:  # click's usage errors
            message = error.format_message() if hasattr(error, "format_message") else str(error)
            self.problem("mergekit_options", "", f"{message} (see `mergekit-yaml --help`)")
            return
        # Read from what mergekit parsed, not from the spelling: no form of the option passes.
        for name, (flag, why) in CODE_RUNNING_OPTIONS.items():
            if parsed.get(name):
                self.problem(
                    "mergekit_options",
                    flag,
                    f"{why}: a sweep file cannot ask for it; pass {flag} to `mergekit-lox sweep` on the command line",
                )


def read_sweep(path: str) -> Tuple[Optional[Sweep], Report]:
    """The sweep at ``path`` and its report; the sweep is None when it has problems."""
    reader = _Reader(path)
    try:
        raw = _load(path)
        bound(raw, "the sweep file")
    except (RecipeReadError, SweepTooLarge) as error:
        reader.problem("sweep", "", str(error))
        return None, reader.report
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "yaml"
        reader.problem("sweep", where, f"YAML syntax error: {getattr(error, 'problem', None) or error}")
        return None, reader.report
    if not isinstance(raw, dict):
        reader.problem("sweep", "", "a sweep file is a mapping with recipe:, grid: or points:, eval:")
        return None, reader.report
    staged = any(key in raw for key in STAGED_KEYS)
    known = KEYS + STAGED_KEYS
    for key in raw:
        if key not in known:
            reader.problem(str(key), "", f"unknown key{suggest(key, known)}; keys: {', '.join(known)}")
    recipe_key = "defend" if staged else "recipe"
    if staged and "recipe" in raw:
        reader.problem("recipe", "", "a staged sweep (attack:) names its recipe defend:, not recipe:")
    if recipe_key not in raw:
        what = (
            "the defense recipe (LoX, say): a path or an inline recipe"
            if staged
            else "a recipe path or an inline recipe"
        )
        reader.problem(recipe_key, "", f"missing: {what}")
    if staged and "attack" not in raw:
        reader.problem("attack", "", "missing: a staged sweep (defend:, repair:) needs attack: NAME: {data: ..., ...}")
    if "grid" not in raw and "points" not in raw:
        reader.problem("grid", "", "missing: give grid: (all combinations) or points: (a list)")
    if "eval" not in raw:
        reader.problem("eval", "", "missing: the eval options (safety: a prompt source, judge, ...)")
    label, _, documents = reader.recipe(raw[recipe_key], recipe_key) if recipe_key in raw else (None, None, None)
    points = reader.points(raw) if ("grid" in raw or "points" in raw) else []
    stages: Dict[str, Any] = {}
    if staged:
        stages = reader.stages(raw, documents, points)
    elif documents is not None and points:
        reader.overrides(documents, points)
    evaluation = reader.eval(raw["eval"]) if "eval" in raw else {}
    settings = reader.settings(raw, chain=bool(documents) and len(documents) > 1)
    if reader.report.problems:
        return None, reader.report
    sweep = Sweep(path, label, documents, [p for _, p in points], evaluation, **settings, **stages)
    return sweep, reader.report


def load_sweep(path: str) -> Sweep:
    """The sweep at ``path``, or SweepError naming its first problem."""
    sweep, report = read_sweep(path)
    if sweep is None:
        more = len(report.problems) - 1
        tail = f" (and {more} more problem(s): run `mergekit-lox check {path}`)" if more else ""
        raise SweepError(f"{path}: {report.problems[0]}{tail}")
    return sweep


def sweep_summary(sweep: Sweep) -> str:
    docs = len(sweep.documents)
    shape = f"{docs} documents" if docs > 1 else f"1 document, {sweep.documents[0].get('merge_method')}"
    line = (
        f"ok: {sweep.path}: {len(sweep.points)} point(s) over {', '.join(sweep.addresses) or 'no parameter'} "
        f"of {sweep.recipe_label} ({shape})"
    )
    if sweep.staged:
        line += f"; attacks: {', '.join(sweep.attacks)}"
        if sweep.repair_documents:
            line += f"; repair: {sweep.repair_documents[-1].get('merge_method')}"
        line += f"; baseline: {sweep.baseline}" if sweep.baseline else "; no baseline"
    return line


def check_file(path: str) -> Tuple[Report, str]:
    """`mergekit-lox check PATH`: a sweep file or a recipe; (report, the line printed when valid)."""
    from mergekit_lox.check import check_recipe, summary

    if is_sweep_file(path):
        sweep, report = read_sweep(path)
        return report, sweep_summary(sweep) if sweep is not None else ""
    report = check_recipe(path)
    return report, summary(report) if report.ok else ""


__all__ = ["Sweep", "SweepError", "check_file", "load_sweep", "read_sweep"]
