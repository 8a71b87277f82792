"""The recipe format: file names, :class:`RecipeMismatchError`, site decisions, and reading a recipe
back."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from swapformer.checkpoint.hashing import file_sha256, jsonable
from swapformer.errors import InputError, SwapformerError
from swapformer.rewriter.plan import Plan, PlanChoice
from swapformer.rewriter.report import RewriteReport
from swapformer.targets.base import TargetConfig, resolve_target

log = logging.getLogger(__name__)
FORMAT = "swapformer-recipe"
FORMAT_VERSION = 2  # the newest this version reads; 2 added per-site plans (rewrite.plan)
TARGET_FORMAT_VERSION = 1  # a single-target recipe: older versions read it too
PLAN_FORMAT_VERSION = 2  # a recipe with a plan
RECIPE_FILE = "swapformer.json"
CORES_FILE = "cores.safetensors"
HOST_FILE = "host.safetensors"


# top-level recipe entries load() reads, and their JSON types
_RECIPE_KEYS: dict[str, type] = {"source": dict, "rewrite": dict, "sites": list, "files": dict}
FILTER_SKIP = "excluded by filter_fn"


class RecipeMismatchError(SwapformerError, ValueError):
    """A saved recipe does not fit the base model it is loaded onto; the message names what differs."""


def site_decisions(report: RewriteReport) -> list[dict[str, Any]]:
    """One JSON record per detected site, in report order: replaced (with ``core_name``,
    ``core_type``, ``how`` and its ``target`` config) or skipped (with ``reason``)."""
    replaced = {r.site.name: r for r in report.replaced}
    skipped = {s.site.name: s for s in report.skipped}
    records = []
    for site in report.sites:
        record: dict[str, Any] = {"name": site.name, "kind": site.kind, "module": site.module}
        if site.name in replaced:
            r = replaced[site.name]
            record.update(decision="replaced", core_name=r.core_name, core_type=r.core_type, how=r.how)
            if r.config is not None:
                record["target"] = jsonable(r.config.to_dict())
        elif site.name in skipped:
            record.update(decision="skipped", reason=skipped[site.name].reason)
        else:
            record.update(decision="none")
        record["detected"] = jsonable(dataclasses.asdict(site))
        records.append(record)
    return records


def excluded_prefixes(sites: list[dict[str, Any]]) -> tuple[str, ...]:
    """Name prefixes that are not base weights: cores, and modules replaced as a whole (HF FFNs)."""
    prefixes = []
    for s in sites:
        if s["decision"] != "replaced":
            continue
        prefixes.append(s["core_name"] + ".")
        if s["how"] == "module" and s["kind"] == "ffn" and s["module"]:
            prefixes.append(s["module"] + ".")
    return tuple(prefixes)


def read_json(file: Path) -> Any:
    """``file``'s JSON, or an :class:`InputError` naming the file and what was wrong."""
    try:
        return json.loads(file.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {file}: {e}") from e
    except json.JSONDecodeError as e:
        raise InputError(f"{file} is not valid JSON: {e}") from e


def recipe_dir(path: str | Path) -> Path:
    """The directory of a recipe: ``path`` itself, or its parent when ``path`` is the JSON file."""
    p = Path(path)
    return p.parent if p.is_file() and p.name == RECIPE_FILE else p


def read_recipe(path: str | Path) -> dict[str, Any]:
    """The recipe in ``path/swapformer.json`` (``path`` may also name the JSON file itself).

    Raises:
        InputError: no recipe there, not a swapformer recipe, or a newer format than this version reads.
    """
    file = recipe_dir(path) / RECIPE_FILE
    if not file.is_file():
        raise InputError(f"no {RECIPE_FILE} in {file.parent}: not a directory written by swapformer.save")
    recipe = read_json(file)
    if not isinstance(recipe, dict) or recipe.get("format") != FORMAT:
        raise InputError(f"{file} is not a swapformer recipe")
    if recipe.get("format_version", 0) > FORMAT_VERSION:
        raise InputError(f"{file} has format version {recipe['format_version']}; this swapformer "
                         f"reads up to {FORMAT_VERSION}: upgrade swapformer")
    missing = [k for k in _RECIPE_KEYS if not isinstance(recipe.get(k), _RECIPE_KEYS[k])]
    if missing:
        raise InputError(f"{file} is not a complete swapformer recipe: missing or malformed {missing}")
    return recipe


def recipe_file(directory: Path, recipe: Mapping[str, Any], key: str) -> Path | None:
    """The path of the file the recipe names under ``files[key]`` (``None`` when it names none).

    The recipe is data read from disk: a name that is absolute, holds a path separator or is
    ``.``/``..`` could reach outside ``directory``, so only bare file names are accepted.

    Raises:
        InputError: the name is not a bare file name.
    """
    name = recipe["files"].get(key)
    if name is None and key != "cores":
        return None
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or Path(name).name != name or Path(name).is_absolute()):
        raise InputError(f"{directory / RECIPE_FILE} names {name!r} as its {key} file; recipe file "
                         f"names must be bare names of files inside {directory}")
    return directory / name


def check_files(directory: Path, recipe: Mapping[str, Any]) -> None:
    """Refuse weight files whose sha256 differs from the one :func:`save` recorded.

    Raises:
        InputError: a file name is not a bare name, or a file is missing or unreadable.
        RecipeMismatchError: a file changed after saving (corruption, an edit, another save).
    """
    for key in ("cores", "host"):
        path = recipe_file(directory, recipe, key)
        if path is None:
            continue
        recorded = recipe["files"].get(f"{key}_sha256")
        if recorded is None:
            if key == "cores":
                raise RecipeMismatchError(f"{directory / RECIPE_FILE} records no checksum of {path.name}")
            # recipes written before host checksums existed: say so rather than pass silently
            log.warning("%s has no recorded checksum; it is loaded unchecked", path)
            continue
        actual = file_sha256(path)
        if actual != recorded:
            raise RecipeMismatchError(f"{path} does not match the sha256 recorded in {RECIPE_FILE} "
                                      f"({recorded[:12]}... recorded, {actual[:12]}... now): the file "
                                      "was corrupted or replaced after saving")


def target_config(recipe: Mapping[str, Any]) -> TargetConfig:
    """The recipe's target config, rebuilt through the target registry (the only classes allowed).

    Raises:
        UnknownTargetError: the target is not registered here. ConfigError: its options are invalid.
        RecipeMismatchError: it does not rebuild identically.
    """
    return config_from_dict(recipe["rewrite"]["target"])


def recipe_target(recipe: Mapping[str, Any]) -> TargetConfig | Plan:
    """What the recipe was rewritten with: its per-site plan when it has one, else its target config.

    Raises:
        As :func:`target_config`, for the plan's every target; InputError: a malformed plan.
    """
    plan = recipe["rewrite"].get("plan")
    if plan is None:
        return target_config(recipe)
    try:
        choices = tuple(PlanChoice(c["site"], None if c["target"] is None else config_from_dict(c["target"]),
                                   c.get("reason", "")) for c in plan["choices"])
        return Plan(choices, label=plan["label"], summary=plan.get("summary", ""))
    except (KeyError, TypeError) as e:
        raise InputError(f"the recipe's plan is malformed ({type(e).__name__}: {e})") from e


def config_from_dict(recorded: Mapping[str, Any]) -> TargetConfig:
    """A target config from its ``to_dict()`` record, through the registry, checked to rebuild identically."""
    options = dict(recorded)
    name = options.pop("target")
    config = resolve_target(name, **{k: _tuples(v) for k, v in options.items()})
    if jsonable(config.to_dict()) != recorded:
        raise RecipeMismatchError(f"target config {recorded} does not rebuild identically here "
                                  f"(got {config.to_dict()})")
    return config


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value
