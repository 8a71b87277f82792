"""``swapformer targets``: the registered targets with their options."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from swapformer.cli.options import KINDS, add_command
from swapformer.targets.base import available_targets, core_class, resolve_target


def add_targets(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``targets`` subparser."""
    add_command(sub, common, "targets", "list the replacement targets and their options",
                "List every registered target: the site kinds it replaces, whether it is exact, and its "
                "options with their defaults (set them with --option KEY=VALUE).",
                "  swapformer targets\n", cmd_targets)


def cmd_targets(args: argparse.Namespace) -> int:
    """``swapformer targets``: one block per target with its options."""
    print("\n\n".join(describe_target(name) for name in available_targets()))
    print("\nset options with: swapformer convert MODEL --target NAME --option KEY=VALUE ...")
    return 0


def describe_target(name: str) -> str:
    """Name, site kinds, exactness, summary and options (with defaults and help) of a target."""
    config = resolve_target(name)
    cls = type(config)
    kinds = [k for k in KINDS if core_class(config, k) is not None]
    doc = (cls.__doc__ or "").strip()
    summary = doc.splitlines()[0] if doc else ""
    head = f"{name}  [{', '.join(kinds)}{', exact' if cls.exact else ''}]  {summary}"
    helps = _arg_help(doc)
    options = [(f.name, _show(getattr(config, f.name))) for f in dataclasses.fields(cls) if f.name != "version"]
    width = max((len(n) + len(v) + 1 for n, v in options), default=0)
    lines = [head.replace("``", "")]
    for name, value in options:
        lines.append(f"    {f'{name}={value}'.ljust(width)}  {helps.get(name, '')}".rstrip().replace("``", ""))
    if not options:
        lines.append("    (no options)")
    return "\n".join(lines)


def _show(value: Any) -> str:
    if value is None or isinstance(value, (bool, int, float, str)):
        return json.dumps(value)
    return repr(value)


def _arg_help(doc: str) -> dict[str, str]:
    """First line of each entry of a Google-style ``Args:`` section."""
    helps: dict[str, str] = {}
    in_args = False
    for line in doc.splitlines():
        stripped = line.strip()
        if stripped == "Args:":
            in_args = True
            continue
        if in_args and stripped.endswith(":") and " " not in stripped:
            break
        name, colon, text = stripped.partition(": ")
        if in_args and colon and all(n.strip().isidentifier() for n in name.split(",")):
            for n in name.split(","):
                helps[n.strip()] = text
    return helps
