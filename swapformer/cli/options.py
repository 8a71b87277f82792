"""What the commands share: the program name, subparser set-up, the MODEL/target options and their
parsing."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

import torch

from swapformer.errors import ConfigError, InputError
from swapformer.planner.budget import Budget
from swapformer.targets.base import TargetConfig, resolve_target

PROG = "swapformer"
KINDS = ("attention", "ffn")
AUTO = "auto"


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
                   help="replacement target (see 'swapformer targets'), or 'auto': a per-site plan under --budget"
                        + ("" if target_required else "; default: sdpa"))
    p.add_argument("--option", "-o", metavar="KEY=VALUE", action="append", default=[], type=parse_option,
                   help="target option, repeatable (values are JSON: 32, true, \"elu1\"; bare words are strings)")
    p.add_argument("--kinds", type=parse_kinds, default=None,
                   help="site kinds, comma-separated: attention, ffn (default: attention)")


def add_auto_options(p: argparse.ArgumentParser, *, with_data: bool) -> None:
    """``--budget`` and ``--plan-batches`` (and, ``with_data``, the corpus options) for ``--target auto``."""
    group = p.add_argument_group("--target auto: a plan per site, measured on --corpus text (needs a tokenizer)")
    group.add_argument("--budget", type=parse_budget, default=None, metavar="KIND@CONTEXT=VALUE",
                       help="what the plan must reach: decode@32768=3 (3x fewer FLOPs per decoded token at "
                            "32k context), prefill@4096=2, or state@32768=64MiB (decoding state per sequence)")
    group.add_argument("--plan-batches", type=int, default=2, metavar="N",
                       help="batches of --corpus text each candidate is measured on (default 2)")
    if with_data:
        group.add_argument("--corpus", default="shakespeare",
                           help="text the candidates are measured on: a corpus name or a text file/folder")
        group.add_argument("--seq-len", type=int, default=256, help="sequence length (default 256)")
        group.add_argument("--batch-size", type=int, default=4, help="batch size (default 4)")


def parse_budget(text: str) -> Budget:
    """``"decode@32768=3"`` → :class:`~swapformer.Budget`.

    Raises:
        argparse.ArgumentTypeError: the budget's own message.
    """
    try:
        return Budget.parse(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


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


def parse_target_spec(text: str) -> tuple[str, dict[str, Any]]:
    """``"fastweight:update=sum;decay_half_life=0"`` → ``("fastweight", {"update": "sum", ...})``, each
    value read as :func:`parse_option` reads it; a bare name has no options. The benchmarks' one syntax
    for a target with its options."""
    name, _, rest = text.partition(":")
    return name, dict(parse_option(item) for item in rest.split(";") if item)


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


def target_and_options(args: argparse.Namespace) -> TargetConfig | str:
    """The target config named by ``--target`` with the ``--option`` values, or ``"auto"`` (whose
    options :func:`auto_options` gives once the model is loaded).

    Raises:
        InputError: ``--target auto`` without ``--budget``, or ``--budget`` for another target.
    """
    budget = getattr(args, "budget", None)
    if args.target == AUTO:
        if budget is None:
            raise InputError("--target auto needs --budget KIND@CONTEXT=VALUE, e.g. --budget decode@32768=3")
        return AUTO
    if budget is not None:
        raise InputError(f"--budget chooses a plan for --target auto, not for --target {args.target}")
    return resolve_target(args.target, **dict(args.option))


def auto_options(args: argparse.Namespace, tokenizer: Any) -> dict[str, Any]:
    """The options of ``rewrite(model, "auto", ...)``: the budget, the ``--option`` values and the
    first ``--plan-batches`` batches of ``--corpus`` text."""
    return {"budget": args.budget, "calibration_data": plan_batches(args, tokenizer), **dict(args.option)}


def plan_batches(args: argparse.Namespace, tokenizer: Any) -> list[torch.Tensor]:
    """``--plan-batches`` batches of ``[--batch-size, --seq-len]`` tokens of ``--corpus`` (fewer when the
    text is short).

    Raises:
        InputError: MODEL has no tokenizer, an unknown corpus, or too little text for one sequence.
    """
    from swapformer.loading.data import as_documents, pack
    from swapformer.measure.bench import corpus_data

    if args.plan_batches < 1:
        raise InputError(f"--plan-batches must be >= 1, got {args.plan_batches}")
    data = corpus_data(args.corpus, tokenizer, "--target auto (measuring candidates)")
    sequences = pack(as_documents(data, tokenizer), args.seq_len)[: args.batch_size * args.plan_batches]
    return list(sequences.split(args.batch_size))
