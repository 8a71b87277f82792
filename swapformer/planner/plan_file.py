"""A plan on its own, as a JSON file: written after planning, replayed later by ``rewrite(model, plan)``.

A plan file holds exactly what a recipe of format 2 (:func:`swapformer.save` of a model rewritten by a
plan) holds about the plan, under the same keys, without the weights and the site records::

    {"format": "swapformer-plan", "format_version": 1,
     "rewrite": {"target": {"target": "auto"}, "plan": {"label": ..., "summary": ..., "choices": [...]}},
     "metadata": {...}}

so that one reader (:func:`~swapformer.checkpoint.recipe.recipe_target`, which rebuilds every target
config through the registry) reads both. Planning a large model takes minutes (every candidate is
measured); a plan file lets a benchmark apply the same plan in a fresh process without planning again.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from swapformer.checkpoint.hashing import jsonable
from swapformer.checkpoint.recipe import FORMAT as RECIPE_FORMAT
from swapformer.checkpoint.recipe import FORMAT_VERSION as RECIPE_VERSION
from swapformer.checkpoint.recipe import RECIPE_FILE, read_json, read_recipe, recipe_target
from swapformer.errors import InputError
from swapformer.rewriter.plan import Plan
from swapformer.targets.base import TargetConfig

PLAN_FORMAT = "swapformer-plan"
PLAN_FILE_VERSION = 1


def save_plan(plan: Plan, path: str | Path, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``plan`` (and JSON-serialisable ``metadata``, e.g. the budget) to the JSON file ``path``.

    Raises:
        InputError: ``plan`` is not a :class:`Plan`.
    """
    if not isinstance(plan, Plan):
        raise InputError(f"save_plan writes a swapformer.Plan, got {type(plan).__name__}")
    record = {"format": PLAN_FORMAT, "format_version": PLAN_FILE_VERSION,
              "rewrite": {"target": {"target": plan.label}, "plan": jsonable(plan.to_dict())},
              "metadata": jsonable(dict(metadata or {}))}
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    return out


def read_plan(path: str | Path) -> Plan | TargetConfig:
    """What ``path`` says to rewrite with: a plan file's plan, or a recipe's plan or target config
    (``path`` a directory written by :func:`swapformer.save` or its ``swapformer.json``).

    Raises:
        InputError: no such file, not JSON, neither a plan file nor a recipe, a newer plan-file
            version, or a malformed plan. UnknownTargetError, ConfigError, RecipeMismatchError: a
            target that does not rebuild here.
    """
    p = Path(path)
    if p.is_dir() or p.name == RECIPE_FILE:
        return recipe_target(read_recipe(p))
    if not p.is_file():
        raise InputError(f"no plan file {p}: expected a plan JSON (swapformer.planner.save_plan) or a "
                         "directory written by swapformer.save")
    record = read_json(p)
    kind = record.get("format") if isinstance(record, dict) else None
    if kind not in (PLAN_FORMAT, RECIPE_FORMAT):
        raise InputError(f"{p} is neither a swapformer plan file (format {PLAN_FORMAT!r}) nor a recipe "
                         f"(format {RECIPE_FORMAT!r})")
    newest = PLAN_FILE_VERSION if kind == PLAN_FORMAT else RECIPE_VERSION
    if record.get("format_version", 0) > newest:
        raise InputError(f"{p} has {kind} version {record['format_version']}; this swapformer reads up "
                         f"to {newest}: upgrade swapformer")
    rewrite = record.get("rewrite")
    if not isinstance(rewrite, dict) or not isinstance(rewrite.get("plan", rewrite.get("target")), dict):
        raise InputError(f"{p} holds no plan or target (rewrite.plan / rewrite.target is missing)")
    if kind == PLAN_FORMAT and not isinstance(rewrite.get("plan"), dict):
        raise InputError(f"{p} holds no plan (rewrite.plan is missing or not an object)")
    return recipe_target(record)
