"""``swapformer explain``: the sites of a model and what a target would do with each."""

from __future__ import annotations

import argparse
from typing import Any

from swapformer import explain
from swapformer.cli.options import (
    AUTO,
    add_auto_options,
    add_command,
    add_model_options,
    auto_options,
    target_and_options,
)
from swapformer.loading.models import load_model


def add_explain(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``explain`` subparser."""
    p = add_command(sub, common, "explain", "show the sites of MODEL and what a target would do with each",
                    "Detect the attention/FFN sites of MODEL and print, for each, what TARGET would "
                    "replace it with or why it would be skipped. Nothing is converted.",
                    "  swapformer explain ./smol\n"
                    "  swapformer explain model.gguf --target fastweight --kinds attention,ffn\n"
                    "  swapformer explain mypkg.models:tiny_gpt --target window -o window=64\n"
                    "  swapformer explain smollm2 --target auto --budget decode@32768=3 --corpus wiki\n", cmd_explain)
    add_model_options(p, target_required=False)
    add_auto_options(p, with_data=True)


def cmd_explain(args: argparse.Namespace) -> int:
    """``swapformer explain``: print the sites table."""
    config = target_and_options(args)
    loaded = load_model(args.model)
    options = auto_options(args, loaded.tokenizer) if config == AUTO else {}
    report = explain(loaded.model, config, loaded.example_inputs, kinds=args.kinds or ("attention",), **options)
    print(report)
    return 0
