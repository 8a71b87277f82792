"""``swapformer bench``: a converted model next to its original, speed and perplexity."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from swapformer import checkpoint
from swapformer.cli.options import add_command
from swapformer.errors import InputError
from swapformer.loading.models import load_model
from swapformer.measure.bench import BenchSettings, bench_perplexity, bench_speed, format_rows

log = logging.getLogger("swapformer.cli")


def add_bench(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``bench`` subparser."""
    p = add_command(sub, common, "bench", "compare a converted model with its original: speed and perplexity",
                    "Load the converted model saved in DIR and its original, and measure both side by side: "
                    "prefill throughput (tokens/s), per-token decode time (models with a KV cache), and, "
                    "when MODEL has a tokenizer, perplexity on a corpus. Ratios are converted / original.",
                    "  swapformer bench smol-fw --base ./smol\n"
                    "  swapformer bench smol-window            # DIR written with --full, or MODEL recorded\n"
                    "  swapformer bench fw --seq-len 256 --batch-size 2 --decode-tokens 64 --json bench.json\n",
                    cmd_bench)
    p.add_argument("dir", metavar="DIR", help="directory written by 'swapformer convert' or swapformer.save")
    p.add_argument("--base", metavar="MODEL",
                   help="the original model (default: the MODEL recorded at convert, else DIR itself)")
    p.add_argument("--seq-len", type=int, default=128, help="prefill / perplexity sequence length (default 128)")
    p.add_argument("--batch-size", type=int, default=1, help="batch size (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per model (default 3)")
    p.add_argument("--decode-tokens", type=int, default=16, help="tokens to decode per round (default 16)")
    p.add_argument("--corpus", default="shakespeare", help="perplexity corpus name or text file")
    p.add_argument("--ppl-batches", type=int, default=4, help="perplexity batches (0: skip; default 4)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")


def cmd_bench(args: argparse.Namespace) -> int:
    """``swapformer bench``: speed and perplexity of the converted model vs its original."""
    recipe = checkpoint.read_recipe(args.dir)
    base = _bench_base(args, recipe)
    converted = checkpoint.load(args.dir, base.model)
    models = {"original": base.model, "converted": converted}
    settings = BenchSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BenchSettings)})
    rows = bench_speed(models, recipe, settings)
    rows += bench_perplexity(models, base.tokenizer, settings)
    print(f"converted: {args.dir} (target {recipe['rewrite']['target']['target']}, "
          f"{sum(s['decision'] == 'replaced' for s in recipe['sites'])} sites replaced); original: {base.spec}")
    print(format_rows(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([{**dataclasses.asdict(r), "ratio": r.ratio} for r in rows], indent=1))
    return 0


def _bench_base(args: argparse.Namespace, recipe: dict[str, Any]) -> Any:
    if args.base:
        return load_model(args.base)
    spec = recipe.get("metadata", {}).get("model_spec")
    has_hf = (Path(args.dir) / "config.json").is_file()
    if spec:
        try:
            return load_model(spec)
        except InputError as e:
            if not has_hf:
                raise InputError(f"the recorded MODEL does not load ({e}); pass --base MODEL") from e
            log.warning("the recorded MODEL %s does not load (%s); using %s", spec, e, args.dir)
    if has_hf:
        return load_model(args.dir)
    raise InputError(f"{args.dir} holds no base model and records no MODEL: pass --base MODEL")
