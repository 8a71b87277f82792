"""Rebuild a saved model by replaying its recipe on a base model (:func:`load`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from swapformer.checkpoint.hashing import architecture_hash, base_parameters, hf_identity
from swapformer.checkpoint.inputs import build_inputs
from swapformer.checkpoint.recipe import (
    FILTER_SKIP,
    RecipeMismatchError,
    check_files,
    excluded_prefixes,
    read_recipe,
    recipe_dir,
    recipe_target,
    site_decisions,
)
from swapformer.checkpoint.weights import check_weights, load_weights
from swapformer.errors import InputError
from swapformer.rewriter.api import rewrite

log = logging.getLogger(__name__)


def load(path: str | Path, base_model: nn.Module, *, example_inputs: Any = None,
         verify: bool = False) -> nn.Module:
    """Rebuild a model saved with :func:`save` by replaying its recipe on ``base_model``.

    Args:
        path: the directory :func:`save` wrote.
        base_model: the model the saved one was rewritten from (same architecture and config; its
            weights should be the same too, else a warning names the tensors that differ). It is
            not modified.
        example_inputs: inputs to capture with; default: rebuilt from the recorded shapes/dtypes.
        verify: let :func:`swapformer.rewrite` run its verification on the replay.

    Returns:
        The rewritten model with the saved cores' weights (and changed base weights) loaded; its
        ``swapformer_report`` comes from the replay and its ``swapformer_recipe`` is the recipe.

    Raises:
        InputError: ``path`` holds no recipe, the recipe names a file outside ``path``, or a
            file is missing or unreadable (each names the file), or the recipe's plan is malformed.
            UnknownTargetError: a target is not registered.
        RecipeMismatchError: a weight file's sha256 differs from the recorded one, the base
            model's class, config or parameters differ from the recipe's, the replay decided
            differently at some site, or the weights do not fit.
    """
    recipe = read_recipe(path)
    target = recipe_target(recipe)
    check_base_model(recipe, base_model)
    check_files(recipe_dir(path), recipe)  # before the replay, the slow step
    inputs = example_inputs if example_inputs is not None else build_inputs(
        recipe["rewrite"]["example_inputs"], base_model)
    log.info("replaying %s on %s", recipe["rewrite"]["target"]["target"], type(base_model).__name__)
    model = rewrite(base_model, target, example_inputs=inputs, kinds=tuple(recipe["rewrite"]["kinds"]),
                    filter_fn=_replay_filter(recipe["sites"]), verify=verify)
    check_decisions(recipe["sites"], site_decisions(model.swapformer_report))
    load_weights(model, recipe_dir(path), recipe)
    check_weights(recipe, model)
    model.swapformer_recipe = recipe
    return model


def _replay_filter(sites: list[dict[str, Any]]) -> Any:
    excluded = {s["name"] for s in sites if s.get("reason") == FILTER_SKIP}
    return lambda site: site.name not in excluded


def check_base_model(recipe: Mapping[str, Any], base_model: nn.Module) -> None:
    """Refuse a base model whose HF config or parameter names/shapes differ from the recipe's.

    Raises:
        InputError: ``base_model`` is not an ``nn.Module``.
        RecipeMismatchError: naming the differing config entries or parameters.
    """
    if not isinstance(base_model, nn.Module):
        raise InputError(f"base_model must be a torch.nn.Module, got {type(base_model).__name__}")
    source = recipe["source"]
    cls = type(base_model)
    here = f"{cls.__module__}.{cls.__qualname__}"
    if source["class"] and source["class"] != here:
        log.warning("the recipe was saved from a %s; the base model is a %s", source["class"], here)
    _check_hf_config(source.get("hf"), base_model)
    skip = excluded_prefixes(recipe["sites"])
    params = base_parameters(base_model, skip)
    if architecture_hash(params) != source["architecture_hash"]:
        raise RecipeMismatchError("the base model's parameters differ from the recipe's: "
                                  + _parameter_diff(source["parameters"], params))


def _check_hf_config(recorded: Mapping[str, Any] | None, base_model: nn.Module) -> None:
    here = hf_identity(base_model)
    if recorded is None or here is None or here["config_hash"] == recorded["config_hash"]:
        return
    old, new = recorded["config"], here["config"]
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    diff = ", ".join(f"{k}: {old.get(k)!r} in the recipe, {new.get(k)!r} here" for k in keys[:6])
    more = f" (and {len(keys) - 6} more)" if len(keys) > 6 else ""
    raise RecipeMismatchError(f"the base model's config differs from the recipe's: {diff}{more}")


def _parameter_diff(recorded: Mapping[str, Any], params: Mapping[str, torch.Tensor]) -> str:
    missing = [n for n in recorded if n not in params]
    extra = [n for n in params if n not in recorded]
    shapes = [f"{n} {tuple(params[n].shape)} vs {tuple(recorded[n][0])} recorded"
              for n in recorded if n in params and list(params[n].shape) != recorded[n][0]]
    parts = []
    for label, names in (("missing here", missing), ("not in the recipe", extra), ("other shape", shapes)):
        if names:
            shown = ", ".join(names[:4]) + (f" (and {len(names) - 4} more)" if len(names) > 4 else "")
            parts.append(f"{len(names)} {label}: {shown}")
    return "; ".join(parts)


def check_decisions(recorded: list[dict[str, Any]], replayed: list[dict[str, Any]]) -> None:
    """Refuse a replay whose sites or per-site decisions differ from the recorded ones.

    Raises:
        RecipeMismatchError: listing the sites that differ.
    """
    keys = ("kind", "decision", "core_name", "core_type", "reason")
    old = {s["name"]: s for s in recorded}
    new = {s["name"]: s for s in replayed}
    problems = [f"site {n} is in the recipe but was not found" for n in old if n not in new]
    problems += [f"site {n} was found but is not in the recipe" for n in new if n not in old]
    for name in old.keys() & new.keys():
        a, b = old[name], new[name]
        # recipes written before per-site targets were recorded have none to compare
        compared = (*keys, "target") if "target" in a else keys
        changed = [k for k in compared if a.get(k) != b.get(k)]
        if changed:
            what = ", ".join(f"{k} {a.get(k)!r} recorded, {b.get(k)!r} now" for k in changed)
            problems.append(f"site {name}: {what}")
    if problems:
        shown = "; ".join(sorted(problems)[:6]) + (f" (and {len(problems) - 6} more)" if len(problems) > 6 else "")
        raise RecipeMismatchError(f"replaying the recipe gave different sites: {shown}")
