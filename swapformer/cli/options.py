"""What the commands share: the program name, subparser set-up, the MODEL/target options and their
parsing."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from swapformer.targets.base import resolve_target

PROG = "swapformer"
KINDS = ("attention", "ffn")


def add_command(sub: Any, common: argparse.ArgumentParser, name: str, summary: str, description: str,
                examples: str, func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    """Add one command's subparser: the common options, an examples epilog, ``func`` as its handler."""
    p = sub.add_parser(name, help=summary, description=description, parents=[common],
                       epilog="examples:\n" + examples,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=func)
    return p


def add_model_options(p: argparse.ArgumentParser, *, target_required: bool) -> None:
    """MODEL, ``--target``, ``--option`` and ``--kinds``: the options of explain and convert."""
    p.add_argument("model", metavar="MODEL", help="HF directory, .gguf file, 'smollm2' or MODULE:FACTORY")
    p.add_argument("--target", "-t", required=target_required, default=None if target_required else "sdpa",
                   help="replacement target (see 'swapformer targets')"
                        + ("" if target_required else "; default: sdpa"))
    p.add_argument("--option", "-o", metavar="KEY=VALUE", action="append", default=[], type=parse_option,
                   help="target option, repeatable (values are JSON: 32, true, \"elu1\"; bare words are strings)")
    p.add_argument("--kinds", type=parse_kinds, default=None,
                   help="site kinds, comma-separated: attention, ffn (default: attention)")


def parse_option(text: str) -> tuple[str, Any]:
    """``"key=value"`` → ``(key, value)``; the value is read as JSON, else kept as a string.

    Raises:
        argparse.ArgumentTypeError: no ``=`` or an empty key.
    """
    key, eq, raw = text.partition("=")
    if not eq or not key.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    aliases = {"True": True, "False": False, "None": None}
    if raw in aliases:
        return key.strip(), aliases[raw]
    try:
        return key.strip(), json.loads(raw)
    except json.JSONDecodeError:
        return key.strip(), raw


def parse_kinds(text: str) -> tuple[str, ...]:
    """``"attention,ffn"`` → ``("attention", "ffn")``.

    Raises:
        argparse.ArgumentTypeError: an unknown kind.
    """
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise argparse.ArgumentTypeError(f"kinds must be a comma-separated subset of {', '.join(KINDS)}")
    return kinds


def target_and_options(args: argparse.Namespace) -> Any:
    """The target config named by ``--target`` with the ``--option`` values."""
    return resolve_target(args.target, **dict(args.option))
