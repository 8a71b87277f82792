"""The ``swapformer`` command line: explain, convert, bench, targets, zoo.

``MODEL`` is a local Hugging Face directory, a ``.gguf`` file, ``smollm2``, or
``package.module:factory`` / ``path/to/file.py:factory`` (see :mod:`swapformer.loading.models`).
Failures exit with status 1 and one line ``swapformer: error: <reason>`` (usage errors: status 2);
``-v`` shows progress logs and ``-vv`` debug logs and full tracebacks.

Layout: one module per command (``explain``, ``convert``, ``bench``, ``targets``, ``zoo``), each with its
subparser and a thin ``cmd_*`` that calls the library; ``parser`` assembles them, ``options`` holds
what they share. The measurement behind ``bench`` is :mod:`swapformer.measure.bench`.
"""

from __future__ import annotations

import logging
import sys
import traceback

from swapformer.cli.options import PROG, parse_kinds, parse_option
from swapformer.cli.parser import build_parser
from swapformer.cli.zoo import run_zoo
from swapformer.errors import SwapformerError


def main(argv: list[str] | None = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 1 on a failure (reported on stderr), 2 on a usage error.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["zoo"]:
        return run_zoo(argv[1:])
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help and usage errors: argparse has printed them already
        return e.code if isinstance(e.code, int) else 2
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        fail("interrupted")
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI turns every failure into one line + status 1
        _report_failure(e, args.verbose)
        return 1


def fail(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


def _report_failure(error: Exception, verbose: int) -> None:
    lines = str(error).strip().splitlines() or [""]
    first = lines[0] if isinstance(error, SwapformerError) else f"{type(error).__name__}: {lines[0]}"
    fail(first)
    if verbose >= 2:
        traceback.print_exception(error, file=sys.stderr)
    elif len(lines) > 1 and verbose:
        print("\n".join("  " + line for line in lines[1:]), file=sys.stderr)
    elif len(lines) > 1:
        print(f"{PROG}: (details with --verbose)", file=sys.stderr)


def _setup_logging(verbose: int) -> None:
    if not verbose:
        return
    level = logging.DEBUG if verbose >= 2 else logging.INFO
    logging.basicConfig(stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("swapformer").setLevel(level)


__all__ = ["build_parser", "main", "parse_kinds", "parse_option"]
