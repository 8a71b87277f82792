"""The zoo file: TOML parsing into :class:`Zoo` / :class:`ZooEntry`, ``timm:`` globs, shards."""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]
TIMM_ENV_HINT = ("timm is not importable in this interpreter (it needs torch==2.14.1 and "
                 "torchvision==0.29.1): run the zoo with .venv-timm/bin/python -m swapformer.zoo")
DEFAULTS: dict[str, Any] = {
    "seq_len": 32, "batch_size": 1, "repeats": 3, "decode_tokens": 8, "ppl_batches": 2,
    "ppl_seq_len": 128, "corpus": "shakespeare", "kinds": ["attention"], "timeout": 900,
    "img_size": 64, "calib_seq_len": 128, "calib_batch_size": 4, "lora_rank": 8,
    "flops_contexts": [32, 4096],
}


@dataclass
class ZooEntry:
    """One model of the zoo (after ``timm:`` globs are expanded).

    Attributes:
        name: unique name; names the records ``entries/<name>__<target>.json``.
        model: a ``MODEL`` spec (HF dir, ``.gguf``, ``smollm2``, ``minilm``, ``module:factory``,
            ``timm:<name>``), or ``None`` for an ``hf_config`` entry.
        hf_config: keyword arguments of ``transformers.AutoConfig.for_model``.
        settings: the other keys of the entry, over the ``[zoo]`` defaults.
        skip_reason: why the entry cannot run in this interpreter (it is recorded as skipped).
    """

    name: str
    model: str | None = None
    hf_config: dict[str, Any] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    skip_reason: str | None = None


@dataclass
class Zoo:
    """A parsed zoo file: defaults, per-target options and the expanded entries."""

    path: Path
    defaults: dict[str, Any]
    target_options: dict[str, dict[str, Any]]
    entries: list[ZooEntry]


def read_zoo(path: str | Path) -> Zoo:
    """Parse a zoo TOML file and expand its ``timm:`` globs.

    Raises:
        ValueError: an entry names no model, two entries share a name, or a key is unknown.
    """
    path = Path(path)
    data = tomllib.loads(path.read_text())
    defaults = {**DEFAULTS, **data.get("zoo", {})}
    raw = data.get("model", [])
    entries: list[ZooEntry] = []
    for item in raw:
        entries += _expand(_entry(item, defaults, path.parent))
    names = [e.name for e in entries]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{path}: duplicate model names {dupes}")
    return Zoo(path, defaults, dict(data.get("targets", {})), entries)


def _entry(item: dict[str, Any], defaults: dict[str, Any], base: Path) -> ZooEntry:
    item = dict(item)
    name, model, hf_config = item.pop("name", None), item.pop("model", None), item.pop("hf_config", None)
    if (model is None) == (hf_config is None):
        raise ValueError(f"zoo entry {item!r} needs exactly one of 'model' or 'hf_config'")
    if model is not None:
        model = _resolve_spec(str(model), base)
    if name is None and model is None:
        raise ValueError("an hf_config entry needs a 'name'")
    return ZooEntry(str(name or default_name(model)), model, hf_config, {**defaults, **item})


def default_name(spec: str) -> str:
    """``timm-<name>`` for timm models, the factory's name, a path's stem, else the spec itself."""
    if spec.startswith("timm:"):
        return "timm-" + spec.split(":", 1)[1]
    where, sep, attr = spec.rpartition(":")
    if sep and where:
        return attr
    return Path(spec).stem or spec


def _resolve_spec(spec: str, base: Path) -> str:
    """Make a relative file, directory or ``file.py:factory`` spec absolute against the zoo file."""
    where, sep, attr = spec.rpartition(":")
    if sep and where.endswith(".py") and not Path(where).is_absolute():
        return f"{(base / where).resolve()}:{attr}"
    if not sep and not Path(spec).is_absolute() and (base / spec).exists():
        return str((base / spec).resolve())
    return spec


def _expand(entry: ZooEntry) -> list[ZooEntry]:
    """``timm:<glob>`` → one entry per matching timm model (or one skipped entry without timm)."""
    if not (entry.model or "").startswith("timm:"):
        return [entry]
    pattern = entry.model.split(":", 1)[1]
    timm = import_timm()
    if timm is None:
        return [dataclasses.replace(entry, skip_reason=TIMM_ENV_HINT)]
    if not any(c in pattern for c in "*?["):
        return [entry]
    names = [n for n in timm.list_models(pattern)
             if not any(fnmatch.fnmatchcase(n, x) for x in entry.settings.get("exclude", []))]
    limit = entry.settings.get("limit")
    names = names[:limit] if limit else names
    return [dataclasses.replace(entry, name=f"timm-{n}", model=f"timm:{n}") for n in names]


def import_timm() -> Any:
    """The timm module, or ``None`` when it does not import in this interpreter."""
    try:
        import timm
    except Exception as e:  # noqa: BLE001 - timm fails to import in many ways beside a bad torch
        log.debug("timm is not importable: %s", e)
        return None
    return timm


def shard(entries: list[ZooEntry], spec: str | None) -> list[ZooEntry]:
    """The ``i/n`` shard of ``entries``: every n-th entry starting at the i-th (1-based)."""
    if not spec:
        return entries
    i, n = parse_shard(spec)
    return entries[i - 1 :: n]


def parse_shard(spec: str) -> tuple[int, int]:
    """``"i/n"`` → ``(i, n)``.

    Raises:
        argparse.ArgumentTypeError: not of the form ``i/n`` with ``1 <= i <= n``.
    """
    m = re.fullmatch(r"(\d+)/(\d+)", spec.strip())
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise argparse.ArgumentTypeError(f"--shard must be i/n with 1 <= i <= n, got {spec!r}")
    return int(m.group(1)), int(m.group(2))
