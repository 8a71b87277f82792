"""``swapformer convert``: rewrite a model to a target, optionally calibrate, and save it."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from swapformer import checkpoint, rewrite
from swapformer.cli.options import (
    AUTO,
    add_auto_options,
    add_command,
    add_model_options,
    auto_options,
    target_and_options,
)
from swapformer.errors import InputError
from swapformer.loading.models import load_model
from swapformer.measure.bench import check_corpus, corpus_data, progress_bar
from swapformer.rewriter.hf import is_hf_model

log = logging.getLogger("swapformer.cli")


def add_convert(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``convert`` subparser."""
    p = add_command(sub, common, "convert", "rewrite MODEL to a target, optionally calibrate, and save it",
                    "Rewrite MODEL's sites to TARGET, optionally calibrate the result on a corpus "
                    "(attention transfer, then distillation from MODEL), and save it to DIR as a recipe "
                    "plus the replacement cores' weights (swapformer.json, cores.safetensors). "
                    "Load it with swapformer.load(DIR, base_model=...) or 'swapformer bench DIR'.",
                    "  swapformer convert ./smol --target sdpa --out smol-sdpa\n"
                    "  swapformer convert ./smol -t fastweight -o feature_map=elu1 --kinds attention --out fw\n"
                    "  swapformer convert smollm2 -t window -o window=128 --calibrate-tokens 50000 \\\n"
                    "      --corpus shakespeare --out smol-window --full\n"
                    "  swapformer convert smollm2 --target auto --budget decode@32768=3 --corpus wiki --out smol-auto\n",
                    cmd_convert)
    add_model_options(p, target_required=True)
    add_auto_options(p, with_data=False)
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--full", action="store_true",
                   help="Hugging Face models: also write the base model into DIR (save_pretrained), "
                        "so DIR loads on its own with swapformer.from_pretrained(DIR)")
    cal = p.add_argument_group("calibration (needs a MODEL with a tokenizer)")
    cal.add_argument("--calibrate-tokens", type=int, default=0, metavar="N",
                     help="calibrate on N tokens in all: half attention transfer, half distillation "
                          "(default 0: no calibration)")
    cal.add_argument("--corpus", default="shakespeare",
                     help="calibration text: a corpus name (shakespeare, shakespeare-folio, wiki) or a "
                          "text file/folder (default: shakespeare)")
    cal.add_argument("--seq-len", type=int, default=128, help="calibration sequence length (default 128)")
    cal.add_argument("--batch-size", type=int, default=4, help="calibration batch size (default 4)")
    cal.add_argument("--lora-rank", type=int, default=8,
                     help="LoRA rank on the attention projections during distillation (0: off; default 8)")


@contextmanager
def _steps(args: argparse.Namespace, names: list[str]) -> Any:
    """A bar over named steps; ``advance(name)`` starts the next one."""
    bar = progress_bar(total=len(names), enabled=args.progress, unit="step", delay=0.1,
                       bar_format="{desc}: {n_fmt}/{total_fmt} [{elapsed}]")
    started = []

    def advance(name: str) -> None:
        if started:
            bar.update(1)
        started.append(name)
        bar.set_description_str(name)

    try:
        yield advance
        bar.update(bar.total - bar.n)
    finally:
        bar.close()


def cmd_convert(args: argparse.Namespace) -> int:
    """``swapformer convert``: rewrite, optionally calibrate, save."""
    config = target_and_options(args)
    calibrating = args.calibrate_tokens > 0
    if calibrating or config == AUTO:
        check_corpus(args.corpus)
    names = ["load", "rewrite"] + (["calibrate"] if calibrating else []) + ["save"]
    with _steps(args, names) as advance:
        advance(f"loading {args.model}")
        loaded = load_model(args.model)
        _check_convertible(args, loaded)
        data = corpus_data(args.corpus, loaded.tokenizer, "calibration") if calibrating else None
        advance(f"rewriting to {AUTO if config == AUTO else config.name}")
        kinds = args.kinds or ("attention",)
        options = auto_options(args, loaded.tokenizer) if config == AUTO else {}
        student = rewrite(loaded.model, config, example_inputs=loaded.example_inputs, kinds=kinds, **options)
        meta: dict[str, Any] = {"model_spec": _portable_spec(args.model)}
        if calibrating:
            advance("calibrating")
            student, meta["calibration"] = _calibrate(args, student, loaded, data)
        advance(f"saving to {args.out}")
        _save_converted(args, student, loaded, kinds, meta)
    print(student.swapformer_report)
    print(f"saved to {args.out} ({_size(Path(args.out))})")
    return 0


def _check_convertible(args: argparse.Namespace, loaded: Any) -> None:
    if args.full and not is_hf_model(loaded.model):
        raise InputError("--full needs a Hugging Face MODEL; other models are saved as recipe + cores")


def _save_converted(args: argparse.Namespace, student: nn.Module, loaded: Any, kinds: tuple[str, ...],
                    meta: dict[str, Any]) -> None:
    if args.full:
        checkpoint.save_pretrained(student, args.out, base_model=loaded.model, tokenizer=loaded.tokenizer,
                           metadata=meta)
    else:
        checkpoint.save(student, args.out, base_model=loaded.model, example_inputs=loaded.example_inputs,
                kinds=kinds, metadata=meta)


def _portable_spec(spec: str) -> str:
    """The spec with its path made absolute, so it still resolves from another directory."""
    path = Path(spec).expanduser()
    if path.exists():
        return str(path.resolve())
    where, sep, attr = spec.rpartition(":")
    if sep and where.endswith(".py") and Path(where).exists():
        return f"{Path(where).resolve()}:{attr}"
    return spec


def _size(directory: Path) -> str:
    size = sum(f.stat().st_size for f in directory.iterdir() if f.is_file())
    return f"{size / 2**20:.1f} MB" if size >= 2**20 else f"{size / 2**10:.1f} KB"


def _calibrate(args: argparse.Namespace, student: nn.Module, loaded: Any,
               data: Any) -> tuple[nn.Module, dict[str, Any]]:
    try:
        from swapformer.calibrate import CalibrationConfig, Stage, calibrate
    except ImportError as e:
        raise InputError(f"calibration is not available in this installation ({e})") from e
    transfer = args.calibrate_tokens // 2
    stages = (Stage("transfer", tokens=transfer), Stage("distill", tokens=args.calibrate_tokens - transfer))
    config = CalibrationConfig(stages=stages, seq_len=args.seq_len, batch_size=args.batch_size,
                               lora_rank=args.lora_rank, progress=args.progress)
    result = calibrate(student, loaded.model, data, config, tokenizer=loaded.tokenizer)
    log.info("calibration: %s", result.summary())
    summary = {"tokens": result.tokens, "seconds": round(result.seconds, 1), "corpus": args.corpus,
               "eval_perplexity": result.eval_perplexity, "config": _jsonable_config(config)}
    return result.model, summary


def _jsonable_config(config: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))
