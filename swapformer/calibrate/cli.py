"""Command line of ``python -m swapformer.calibrate`` (and ``torchrun ... -m swapformer.calibrate``).

Two ways to say what to calibrate:

* ``--job SPEC``: ``SPEC`` is ``package.module:factory`` or ``path/to/file.py:factory``; the factory
  takes no arguments and returns a dict (or an object with attributes) with ``student``, ``teacher``,
  ``data`` and optionally ``tokenizer``;
* ``--model smollm2|SPEC --target NAME --data CORPUS|PATH``: the teacher (SmolLM2-135M from
  :mod:`swapformer.loading.offline`, or a factory returning a model or ``(model, tokenizer)``) is rewritten
  with ``swapformer.rewrite`` into the student.

Stages: ``--stage KIND[:key=value,...]``, repeatable (``--stage transfer:steps=50,lr=0.01
--stage distill:tokens=200000``); the keys are :class:`~swapformer.calibrate.Stage` fields.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib
import importlib.util
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from swapformer.calibrate.config import CalibrationConfig, Stage
from swapformer.errors import ConfigError, InputError

logger = logging.getLogger("swapformer.calibrate")


def load_factory(spec: str) -> Callable[..., Any]:
    """``module:attr`` or ``file.py:attr`` → the attribute.

    Raises:
        InputError: malformed spec, or nothing importable under that name.
    """
    where, _, attr = spec.rpartition(":")
    if not where or not attr:
        raise InputError(f"expected MODULE:FACTORY or FILE.py:FACTORY, got {spec!r}")
    if where.endswith(".py"):
        path = Path(where).resolve()
        if not path.exists():
            raise InputError(f"no such file: {path}")
        module_spec = importlib.util.spec_from_file_location(f"_swapformer_job_{path.stem}", path)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_spec.name] = module
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    if not hasattr(module, attr):
        raise InputError(f"{where} has no attribute {attr!r}")
    return getattr(module, attr)


def parse_stage(text: str) -> Stage:
    """``"distill:tokens=1000,lr=1e-4"`` → ``Stage("distill", tokens=1000, lr=1e-4)``."""
    kind, _, rest = text.partition(":")
    fields = {f.name: f for f in dataclasses.fields(Stage)}
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in fields or key == "kind":
            raise ConfigError(f"bad stage option {item!r}; options are {sorted(set(fields) - {'kind'})}")
        options[key] = _coerce(key, value)
    return Stage(kind, **options)  # type: ignore[arg-type]


def _coerce(key: str, value: str) -> Any:
    if key in ("steps", "tokens", "warmup_steps"):
        return int(float(value))
    if key in ("train", "schedule"):
        return value
    if key in ("normalize", "init_mix"):
        if value.lower() not in ("true", "false", "1", "0"):
            raise ConfigError(f"stage option {key} must be true or false, got {value!r}")
        return value.lower() in ("true", "1")
    if key == "short_windows":  # '16/32': commas separate the options
        return tuple(int(w) for w in filter(None, value.split("/")))
    return float(value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m swapformer.calibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("what to calibrate")
    src.add_argument("--job", help="MODULE:FACTORY or FILE.py:FACTORY returning student/teacher/data")
    src.add_argument("--model", help="'smollm2' or MODULE:FACTORY returning the teacher model")
    src.add_argument("--target", help="swapformer target name for --model (e.g. fastweight)")
    src.add_argument("--data", help="corpus name (shakespeare, wiki), text file/folder, or .pt tokens")
    opt = p.add_argument_group("calibration")
    opt.add_argument("--stage", action="append", type=parse_stage, help="KIND[:key=value,...]")
    for name, kind in (("batch-size", int), ("seq-len", int), ("lora-rank", int), ("seed", int),
                       ("checkpoint-every", int), ("log-every", int), ("eval-batches", int),
                       ("eval-fraction", float), ("lora-alpha", float), ("grad-clip", float)):
        opt.add_argument(f"--{name}", type=kind)
    opt.add_argument("--device", help="cpu, cuda (cuda:LOCAL_RANK under torchrun), ...")
    opt.add_argument("--autocast", dest="autocast_dtype", choices=["bfloat16", "float16"])
    opt.add_argument("--checkpoint-dir")
    opt.add_argument("--resume", action="store_true", default=None)
    opt.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    opt.add_argument("--compile-cores", action="store_true", default=None,
                     help="torch.compile the replaced cores in transfer stages (CalibrationConfig.compile_cores)")
    out = p.add_argument_group("output")
    out.add_argument("--save", help="safetensors path for the calibrated student's state dict, tied "
                                    "weights once (load with safetensors.torch.load_model; '{rank}' in "
                                    "the path: every rank writes its own)")
    out.add_argument("--result-json", help="write the run summary as JSON (rank 0)")
    out.add_argument("--threads", type=int, help="torch intra-op threads")
    return p


def config_from_args(args: argparse.Namespace) -> CalibrationConfig:
    """The :class:`CalibrationConfig` given by the parsed arguments (defaults where not given)."""
    names = {f.name for f in dataclasses.fields(CalibrationConfig)}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if args.stage:
        given["stages"] = tuple(args.stage)
    return CalibrationConfig(**given)


def load_job(args: argparse.Namespace) -> dict[str, Any]:
    """``{"student", "teacher", "data", "tokenizer"}`` from ``--job`` or ``--model/--target/--data``."""
    if args.job:
        made = load_factory(args.job)()
        if isinstance(made, dict):
            job = dict(made)
        elif isinstance(made, (tuple, list)):
            job = dict(zip(("student", "teacher", "data", "tokenizer"), made))
        else:
            job = {k: getattr(made, k, None) for k in ("student", "teacher", "data", "tokenizer")}
        missing = [k for k in ("student", "data") if job.get(k) is None]
        if missing:
            raise InputError(f"job factory {args.job} returned no {missing}")
        job.setdefault("teacher", None)
        job.setdefault("tokenizer", None)
        return job
    if not (args.model and args.target and args.data):
        raise InputError("give --job, or all of --model, --target and --data")
    teacher, tokenizer = _load_model(args.model)
    return {"student": rewrite_copy(teacher, args.target), "teacher": teacher,
            "data": load_data(args.data, tokenizer), "tokenizer": tokenizer}


def _load_model(spec: str) -> tuple[torch.nn.Module, Any]:
    if spec == "smollm2":
        from swapformer.loading.offline import load_smollm2

        return load_smollm2()
    made = load_factory(spec)()
    return made if isinstance(made, tuple) else (made, None)


def rewrite_copy(teacher: torch.nn.Module, target: str, **options: Any) -> torch.nn.Module:
    """``swapformer.rewrite`` of a deep copy of ``teacher`` (the student never shares its weights)."""
    from swapformer import rewrite

    return rewrite(copy.deepcopy(teacher), target, **options)


def load_data(spec: str, tokenizer: Any) -> Any:
    """A corpus name (via :func:`swapformer.loading.offline.corpus_tokens`), a ``.pt`` / ``.safetensors``
    token file, or a text file or folder (returned as a path, tokenized later)."""
    from swapformer.loading.offline import CORPORA, corpus_tokens

    if spec in CORPORA:
        if tokenizer is None:
            raise InputError(f"corpus {spec!r} needs a model with a tokenizer")
        return corpus_tokens(spec, tokenizer)
    path = Path(spec)
    if path.suffix == ".pt":
        return torch.load(path, weights_only=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return list(load_file(str(path)).values())
    return path


def save_outputs(args: argparse.Namespace, result: Any, rank: int) -> None:
    if args.save and ("{rank}" in args.save or rank == 0):
        from safetensors.torch import save_model

        path = Path(args.save.format(rank=rank))
        path.parent.mkdir(parents=True, exist_ok=True)
        # save_model keeps one name per shared storage: tied weights (embedding = LM head) would make
        # save_file refuse the state dict
        save_model(result.model, str(path))
    if args.result_json and rank == 0:
        summary = {"stages": [dataclasses.asdict(s) for s in result.stages], "tokens": result.tokens,
                   "seconds": result.seconds, "eval_perplexity": result.eval_perplexity,
                   "resumed_from_step": result.resumed_from_step}
        Path(args.result_json).write_text(json.dumps(summary, indent=1))


def main(argv: list[str] | None = None) -> int:
    import os

    import torch.distributed as dist

    from swapformer.calibrate.trainer import calibrate

    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        config = config_from_args(args)
        job = load_job(args)
        result = calibrate(job["student"], job["teacher"], job["data"], config, tokenizer=job["tokenizer"])
        if rank == 0:
            print(result.summary())
        save_outputs(args, result, rank)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
