"""Save a rewritten model as a recipe plus its cores' weights (:func:`save`)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from swapformer.checkpoint.hashing import jsonable, recipe_hash, source_identity
from swapformer.checkpoint.inputs import input_spec_for
from swapformer.checkpoint.recipe import (
    FORMAT,
    PLAN_FORMAT_VERSION,
    RECIPE_FILE,
    TARGET_FORMAT_VERSION,
    excluded_prefixes,
    site_decisions,
)
from swapformer.checkpoint.weights import write_weights
from swapformer.errors import InputError
from swapformer.rewriter.hf import is_hf_model
from swapformer.rewriter.report import RewriteReport
from swapformer.targets.base import TargetConfig, resolve_target

log = logging.getLogger(__name__)


def save(model: nn.Module, path: str | Path, *, base_model: nn.Module | None = None,
         example_inputs: Any = None, target: str | TargetConfig | None = None,
         kinds: tuple[str, ...] | None = None, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` (returned by :func:`swapformer.rewrite`) as a recipe plus its cores' weights.

    Args:
        model: the rewritten model (it carries ``swapformer_report``), calibrated or not.
        path: directory to write ``swapformer.json`` and ``cores.safetensors`` into (created).
        base_model: the model ``model`` was rewritten from. Optional; when given, base weights that
            changed since (e.g. LoRA merged by calibration) are saved too, in ``host.safetensors``.
        example_inputs: the inputs ``model`` was captured with. Needed only for plain models
            captured by ``torch.fx`` (exported graphs record their input shapes, and Hugging Face
            models are rewritten with default inputs).
        target: the target config (or name) used; default: the config the cores carry. A model
            rewritten by a plan records its plan (every site's config) and takes no ``target``.
        kinds: the site kinds the rewrite looked for; default: the kinds of the detected sites.
        metadata: extra JSON-serialisable facts to store under ``"metadata"``.

    Returns:
        The directory written.

    Raises:
        InputError: ``model`` has no rewrite report or its report is a dry run, the input shapes
            are unknown, ``metadata`` is not JSON-serialisable, or ``target`` is given for a plan.
    """
    report = report_of(model)
    targets = _recorded_targets(model, report, target)
    extra = _checked_metadata(metadata)
    sites = site_decisions(report)
    skip = excluded_prefixes(sites)
    recipe = {
        "format": FORMAT,
        "format_version": TARGET_FORMAT_VERSION if report.plan is None else PLAN_FORMAT_VERSION,
        "versions": _versions(),
        "source": source_identity(model, skip, base_model),
        "rewrite": {
            **targets,
            "kinds": list(kinds) if kinds else _site_kinds(report),
            "hf": is_hf_model(model),
            "capture": report.capture,
            "example_inputs": input_spec_for(model, example_inputs),
        },
        "sites": sites,
    }
    recipe["recipe_hash"] = recipe_hash(recipe)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    recipe["files"] = write_weights(model, out, sites, skip, base_model)
    recipe["metadata"] = extra
    (out / RECIPE_FILE).write_text(json.dumps(recipe, indent=1) + "\n")
    log.info("saved %d replaced sites of %s to %s", len(report.replaced), report.target, out)
    return out


def report_of(model: nn.Module) -> RewriteReport:
    report = getattr(model, "swapformer_report", None)
    if not isinstance(report, RewriteReport):
        raise InputError("the model has no swapformer_report: save the model swapformer.rewrite returned")
    if report.dry_run:
        raise InputError("the model's report is a dry run (from explain): nothing was replaced")
    return report


def _recorded_targets(model: nn.Module, report: RewriteReport,
                      target: str | TargetConfig | None) -> dict[str, Any]:
    """``{"target": config}``, and for a plan ``{"target": {"target": label}, "plan": plan}``."""
    if report.plan is None:
        return {"target": jsonable(_target_config(model, report, target).to_dict())}
    if target is not None:
        raise InputError(f"the model was rewritten by a plan ({report.target!r}), which the recipe "
                         "records with every site's target: pass no target")
    return {"target": {"target": report.target}, "plan": jsonable(report.plan.to_dict())}


def _target_config(model: nn.Module, report: RewriteReport,
                   target: str | TargetConfig | None) -> TargetConfig:
    """The config the rewrite used: given, else the one the cores carry, else the defaults."""
    if target is not None:
        config = resolve_target(target)
    else:
        carried = [getattr(model.get_submodule(r.core_name), "config", None) for r in report.replaced]
        configs = [c for c in carried if isinstance(c, TargetConfig)]
        config = configs[0] if configs else resolve_target(report.target)
    if config.name != report.target:
        raise InputError(f"target {config.name!r} is not the target {report.target!r} the model was rewritten to")
    return config


def _site_kinds(report: RewriteReport) -> list[str]:
    kinds = {s.kind for s in report.sites}
    return [k for k in ("attention", "ffn") if k in kinds] or ["attention"]


def _versions() -> dict[str, str | None]:
    import swapformer

    try:
        import transformers

        hf_version: str | None = transformers.__version__
    except ImportError:
        hf_version = None
    return {"swapformer": swapformer.__version__, "torch": torch.__version__, "transformers": hf_version}


def _checked_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    data = dict(metadata or {})
    try:
        json.dumps(data)
    except TypeError as e:
        raise InputError(f"metadata must be JSON-serialisable: {e}") from e
    return data
