"""One JSON record per model × target under ``DIR/entries/``: paths, atomic writes, what is pending."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from swapformer.zoo.spec import ZooEntry

log = logging.getLogger(__name__)
FINAL = ("ok", "no-sites", "skipped")  # statuses a rerun keeps even with --retry-failed


def record_path(out: Path, name: str, target: str) -> Path:
    """Where the record of ``name`` × ``target`` lives."""
    return out / "entries" / f"{slug(name)}__{target}.json"


def slug(name: str) -> str:
    """``name`` made safe as a file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def read_record(out: Path, name: str, target: str) -> dict[str, Any] | None:
    """The record of ``name`` × ``target``, or ``None`` when there is none (or it is unreadable)."""
    path = record_path(out, name, target)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def pending_targets(out: Path, entry: ZooEntry, targets: list[str], retry: bool) -> list[str]:
    """The targets of ``entry`` that have no record yet (or a failed one, with ``retry``)."""
    todo = []
    for target in entry_targets(entry, targets):
        rec = read_record(out, entry.name, target)
        status = rec and rec.get("status")
        # an entry skipped for want of timm runs once an interpreter with timm comes along
        runnable_now = status == "skipped" and not entry.skip_reason
        if rec is None or runnable_now or (retry and status not in FINAL):
            todo.append(target)
    return todo


def entry_targets(entry: ZooEntry, targets: list[str]) -> list[str]:
    """The run's targets that ``entry`` takes (its ``targets`` key restricts them)."""
    only = entry.settings.get("targets")
    return [t for t in targets if not only or t in only]


def record_all(out: Path, entry: ZooEntry, targets: list[str], status: str, reason: str,
                extra: dict[str, Any] | None = None) -> None:
    """Write the same ``status``/``reason`` record for each of ``targets``."""
    for target in targets:
        write_json(record_path(out, entry.name, target),
                   {**identity(entry), "target": target, "status": status, "reason": reason, **(extra or {})})
    log.info("%s: %s (%s)", entry.name, status, reason.splitlines()[0] if reason else "")


def identity(entry: ZooEntry) -> dict[str, Any]:
    """The fields that name a record's model."""
    return {"model": entry.name, "source": {"model": entry.model, "hf_config": entry.hf_config}}
