"""Staged sweeps: each point is a pipeline ``defend`` -> ``attack`` -> ``repair`` -> ``eval``.

A staged sweep file has ``defend:`` (a recipe, LoX say) instead of ``recipe:``, an
``attack:`` mapping (name -> the fields of ``mergekit_lox.attack.AttackSettings``) and
optionally ``repair:`` (a recipe that takes the attacked model: LSSF, or Safe LoRA on the
attack's adapter). In the repair recipe three names stand for a point's models::

    $defended   the point's defended model (the merge of ``defend:``)
    $attacked   the attacked model (for a LoRA attack: the adapter merged in)
    $adapter    the attack's PEFT adapter, written MODEL+$adapter (LoRA attacks only)

Addresses start with the stage they set: ``defend.parameters.alpha``,
``repair.parameters.scale``. Points with the same defend settings share one defended
model and one run of each attack (``DIR/defenses/NNN/``, NNN the first such point); the
undefended aligned model is attacked once as the baseline (``DIR/baseline/``).

Per point and attack the numbers are the eval of the defended model (before), of the
attacked model (after the attack) and of the repaired model (after repair); the point's
**worst case** is the lowest refusal rate over the attacks (after repair where there is
one) and the highest perplexity; the chosen point is chosen on the worst case.
"""

from __future__ import annotations

import copy
import os
import re
from typing import Any, Dict, List, Optional

STAGES = ("defend", "repair")
DEFENDED, ATTACKED, ADAPTER = "$defended", "$attacked", "$adapter"
PLACEHOLDERS = (DEFENDED, ATTACKED, ADAPTER)
# An attack's name is a folder name under DIR: no separators, no dot first.
ATTACK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
ATTACK_PATHS = ("data",)


def split_params(params: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """``{"defend": {address: value}, "repair": {...}}`` from a staged point's addresses."""
    parts: Dict[str, Dict[str, Any]] = {stage: {} for stage in STAGES}
    for address, value in params.items():
        stage, _, rest = address.partition(".")
        parts[stage][rest] = value
    return parts


def _strings(node: Any):
    """Every string in ``node`` (documents), with a setter to replace it."""
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(value, str):
                yield value, (lambda v, n=node, k=key: n.__setitem__(k, v))
            else:
                yield from _strings(value)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            if isinstance(value, str):
                yield value, (lambda v, n=node, k=i: n.__setitem__(k, v))
            else:
                yield from _strings(value)


def placeholders_used(documents: List[Any]) -> List[str]:
    found = {p for text, _ in _strings(documents) for p in PLACEHOLDERS if p in text}
    return [p for p in PLACEHOLDERS if p in found]


def substitute(documents: List[Any], models: Dict[str, Optional[str]], adapter_stand_in: str = "") -> List[Any]:
    """A copy of ``documents`` with each placeholder replaced by ``models[placeholder]``;
    ``models[ADAPTER] = None`` replaces ``+$adapter`` by ``adapter_stand_in`` (what `check`
    validates with: no adapter, but a spelling of its own)."""
    result = copy.deepcopy(documents)
    for text, put in list(_strings(result)):
        if not any(p in text for p in PLACEHOLDERS):
            continue
        if models.get(ADAPTER) is None:
            text = text.replace("+" + ADAPTER, adapter_stand_in)
        for placeholder, model in models.items():
            if model is not None:
                text = text.replace(placeholder, model)
        put(text)
    return result


def stand_in_documents(documents: List[Any], model: Optional[str]) -> List[Any]:
    """What `check` validates the repair recipe with: the undefended model (same architecture
    as the defended and attacked ones) in place of each placeholder, spelled differently
    for each, so that mergekit sees distinct inputs ("MODEL/.", "MODEL/./." for a folder,
    "MODEL@REVISION" for a hub id); ``X+$adapter`` becomes X spelled once more."""
    if model is None:
        return documents
    if os.path.isdir(model):
        models = {DEFENDED: os.path.join(model, "."), ATTACKED: os.path.join(model, ".", "."), ADAPTER: None}
        return substitute(documents, models, adapter_stand_in="/./././.")
    models = {DEFENDED: f"{model}@defended", ATTACKED: f"{model}@attacked", ADAPTER: None}
    return substitute(documents, models, adapter_stand_in="-adapter")


def placeholder_problems(documents: List[Any], attacks: Dict[str, Dict[str, Any]]) -> List[str]:
    """What is wrong with the repair recipe's use of the placeholders (empty: nothing)."""
    used = placeholders_used(documents)
    problems = []
    if ATTACKED not in used and ADAPTER not in used:
        problems.append(
            f"never names the attacked model: use {ATTACKED}, or MODEL+{ADAPTER} for a LoRA attack's adapter"
        )
    bare = [text for text, _ in _strings(documents) if ADAPTER in text and f"+{ADAPTER}" not in text]
    if bare:
        problems.append(
            f"{bare[0]!r}: {ADAPTER} is a PEFT adapter, written MODEL+{ADAPTER} (e.g. {DEFENDED}+{ADAPTER})"
        )
    if ADAPTER in used:
        full = [name for name, settings in attacks.items() if not settings.get("lora")]
        if full:
            problems.append(f"uses {ADAPTER}, but attack {full[0]!r} writes no adapter (give it lora: RANK)")
    return problems


def attack_settings(fields: Dict[str, Any]):
    """``AttackSettings(**fields)``, checked as `mergekit-lox attack` checks its options before
    training (``resolve``); TypeError or ValueError (AttackError) naming what is wrong."""
    from mergekit_lox.attack import AttackSettings, resolve

    settings = AttackSettings(**fields)
    resolve(settings)
    return settings


def defend_texts(sweep) -> List[str]:
    """Each point's defend recipe, as written to its defense's recipe.yml."""
    from mergekit_lox.sweep.overrides import apply, recipe_yaml

    return [recipe_yaml(apply(sweep.documents, split_params(params)["defend"])) for params in sweep.points]


def repair_documents(sweep, params: Dict[str, Any]) -> Optional[List[Any]]:
    from mergekit_lox.sweep.overrides import apply

    if sweep.repair_documents is None:
        return None
    return apply(sweep.repair_documents, split_params(params)["repair"])


def group_leaders(defend_texts: List[str]) -> List[int]:
    """For each point, the first point with the same defend recipe: they share a defense."""
    first: Dict[str, int] = {}
    return [first.setdefault(text, index) for index, text in enumerate(defend_texts)]


def defense_dir(leader: int) -> str:
    return os.path.join("defenses", f"{leader:03d}")


def final_eval(outcome: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """What an attack left: the repaired model's eval where there is a repair, else the attacked model's."""
    return outcome.get("repaired") if outcome.get("repaired") is not None else outcome.get("eval")


def worst_case(attacks: Any) -> Optional[Dict[str, Any]]:
    """The lowest refusal rate and the highest perplexity over the attacks (after repair), and
    which attack gave each; None when an attack has no refusal rate."""
    from mergekit_lox.sweep.numbers import number

    if not isinstance(attacks, dict) or not attacks:
        return None
    refusal, utility = [], []
    for name, outcome in attacks.items():
        entry = final_eval(outcome) if isinstance(outcome, dict) else None
        if not isinstance(entry, dict):
            return None
        rate = number((entry.get("safety") or {}).get("refusal_rate"))
        if rate is None:
            return None
        refusal.append((rate, name))
        ppl = number((entry.get("utility") or {}).get("perplexity"))
        if ppl is not None:
            utility.append((ppl, name))
    rate, by = min(refusal, key=lambda item: item[0])
    worst = {"refusal_rate": rate, "refusal_attack": by, "perplexity": None, "perplexity_attack": None}
    if len(utility) == len(refusal):
        worst["perplexity"], worst["perplexity_attack"] = max(utility, key=lambda item: item[0])
    return worst
