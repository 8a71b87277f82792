"""``swapformer zoo``: hands its arguments to the zoo batch runner (:mod:`swapformer.zoo`)."""

from __future__ import annotations

import argparse
from typing import Any

from swapformer.cli.options import add_command
from swapformer.zoo import main as zoo_main


def add_zoo(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``zoo`` subparser (for ``--help``; :func:`main` hands ``zoo`` over first)."""
    add_command(sub, common, "zoo", "run the model-zoo batch runner (arguments go to swapformer.zoo)",
                "Everything after 'zoo' is passed to swapformer.zoo.main; see 'swapformer zoo --help'.",
                "  swapformer zoo --help\n", lambda args: run_zoo([]))


def run_zoo(argv: list[str]) -> int:
    """Run ``swapformer zoo`` with the arguments after ``zoo``; returns the exit status."""
    return int(zoo_main(argv) or 0)
