"""Quality of each target on SmolLM2-135M: perplexity of the teacher, of each target right after the
rewrite, and after calibration (attention transfer, then KL distillation with LoRA), with the tokens
and wall time the calibration took.

    python benchmarks/quality_smollm2.py --targets fastweight,elita --tokens 100000 --write
    python benchmarks/quality_smollm2.py --targets '' --eval-batches 16        # teacher only
    python benchmarks/quality_smollm2.py --eval-corpora wiki                   # needs `pip install gensim`
    python benchmarks/quality_smollm2.py --targets fastweight -o fastweight:feature_map=elu1 \
        -o fastweight:normalize=true                                           # target options
    python benchmarks/quality_smollm2.py --device cuda --autocast bfloat16 --tokens 20000000

Hybrid report (issue 12): ``--hybrid`` evaluates each target's step-0 model and a transfer-only
calibration curve on general English (``--corpus mix``: Shakespeare and the wiki excerpt interleaved),
at 512 and ``--long-len`` (2,048) tokens on held-out Shakespeare and wiki, plus the in-context recall
probe (a random token sequence of length L repeated twice; NLL on the second copy), against
``window=64, sinks=4`` and the window whose KV bytes equal the target's whole state (equal memory):

    python benchmarks/quality_smollm2.py --hybrid --targets fastweight,elita,cat --curve 0,100000 --write
    python benchmarks/quality_smollm2.py --hybrid --targets fastweight --train-len 2048 \
        -o fastweight:decay_half_life=512 --curve 0,100000,300000      # train at the long length
    python benchmarks/quality_smollm2.py --hybrid --targets fastweight -o fastweight:decay_half_life=128 \
        --rope-shift 8192 --curve 0,102400,307200,1024000   # fastweight's best transfer (RESULTS.md, session 14)
    python benchmarks/quality_smollm2.py --hybrid --targets elita -o elita:decay_half_life=128 \
        --curve 0,102400,307200,1024000                     # elita's best transfer (RESULTS.md, session 15)

``--distill-curve 51200,102400`` then continues each target with end-to-end KL distillation to the
teacher's logits (cumulative KL tokens, on the training rows after the transfer's; ``--distill-train``
chooses what trains, default the new parameters plus LoRA on the v/o projections; ``--distill-lr``;
``--distill-schedule cosine`` decays each segment's lr to 10 % at its end; ``--distill-len 2048`` gives
the KL stage rows of its own length, as many tokens per step, past every row the transfer used)::

    python benchmarks/quality_smollm2.py --hybrid --targets fastweight --curve 0,102400 \
        --distill-curve 51200,102400 --distill-lr 1e-3
    python benchmarks/quality_smollm2.py --hybrid --targets elita --curve 0,307200 \
        --distill-curve 204800 --distill-lr 1e-3 --distill-schedule cosine  # elita's best (session 17)

In that mode every corpus is packed to ``--long-len`` tokens first and every 20th sequence is held
out; the 512-token held-out and ``--train-len`` (``--distill-len``) training sequences are cut from those, so no
calibration token is ever evaluated. ``-o TARGET:KEY=VALUE`` options apply to the hybrid targets too.

Calibration uses ``--corpus``; held-out perplexity is measured on it and on every ``--eval-corpora``
entry (out of domain: never calibrated on), token-weighted over ``--eval-batches`` batches of
``--seq-len``-token sequences: every 20th packed sequence (``--eval-fraction 0.05``), never trained on.
Targets in ``--as-is`` (default: window, which has no new parameters) are only evaluated.
The table so far is logged after each target; ``--write`` appends the final one to RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import logging
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from swapformer.calibrate import CalibrationConfig, Stage, calibrate
from swapformer.loading.data import TokenSplits, prepare
from swapformer.loading.offline import corpus_tokens, load_smollm2
from swapformer.measure import perplexity

log = logging.getLogger("quality_smollm2")
RESULTS = Path(__file__).with_name("RESULTS.md")
DEFAULT_TARGETS = "fastweight,elita,cat,worker,window"


@dataclass
class Row:
    model: str
    sites: str = ""
    ppl_rewrite: dict[str, float] = field(default_factory=dict)
    ppl_calibrated: dict[str, float] = field(default_factory=dict)
    tokens: int = 0
    seconds: float = 0.0
    notes: str = ""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default=DEFAULT_TARGETS, help="comma-separated targets ('' = teacher only)")
    p.add_argument("--corpus", default="shakespeare", help="calibration corpus (also evaluated)")
    p.add_argument("--eval-corpora", default="", help="comma-separated extra held-out corpora, e.g. wiki")
    p.add_argument("--as-is", default="window", help="comma-separated targets evaluated without calibration")
    p.add_argument("-o", "--option", action="append", default=[], metavar="TARGET:KEY=VALUE",
                   help="target options (values read as JSON), e.g. fastweight:update=sum;decay_half_life=0 "
                        "(the other benchmarks' target spec); repeatable")
    p.add_argument("--tokens", type=int, default=100_000, help="calibration token budget per target")
    p.add_argument("--transfer-share", type=float, default=0.5, help="share of --tokens for transfer")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--eval-fraction", type=float, default=0.05)
    p.add_argument("--transfer-lr", type=float, default=1e-2)
    p.add_argument("--transfer-schedule", choices=("constant", "cosine"), default="constant",
                   help="--hybrid: the lr of each curve segment's transfer stage (cosine: to 10%% at its end)")
    p.add_argument("--distill-lr", type=float, default=1e-4)
    p.add_argument("--distill-schedule", choices=("constant", "cosine"), default="constant",
                   help="--hybrid: the lr of each --distill-curve segment's KL stage (cosine: to 10%% at its end)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-modules", default="vo", choices=["vo", "qkvo"],
                   help="hybrid: the attention projections the KL stage's LoRA adapts (issue 12: v/o)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--autocast", choices=["bfloat16", "float16"], default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write", action="store_true", help=f"append the table to {RESULTS}")
    p.add_argument("--hybrid", action="store_true", help="the hybrid report (see the module docstring)")
    p.add_argument("--long-len", type=int, default=2048, help="hybrid: long evaluation context")
    p.add_argument("--long-batches", type=int, default=2, help="hybrid: long sequences per corpus")
    p.add_argument("--recall", default="64,256,1024", help="hybrid: recall probe lengths L")
    p.add_argument("--recall-samples", type=int, default=2)
    p.add_argument("--curve", default="0,100000", help="hybrid: cumulative transfer-token budgets")
    p.add_argument("--short-windows", default="16,32", help="hybrid: SWAX windows ('' = off)")
    p.add_argument("--rope-shift", type=int, default=0,
                   help="hybrid: transfer steps see their rows at a random 0 .. N − 1 positions later (Stage.rope_shift)")
    p.add_argument("--compile-cores", action="store_true",
                   help="hybrid: torch.compile the cores for the transfer stages (CalibrationConfig.compile_cores)")
    p.add_argument("--distill-curve", default="",
                   help="hybrid: cumulative KL-distillation token budgets after the transfer curve ('' = none)")
    p.add_argument("--recall-train-share", type=float, default=0.0,
                   help="hybrid: share of training rows replaced by repeated random sequences (capability test)")
    p.add_argument("--mix-lr", type=float, default=None,
                   help="hybrid: lr of the far-memory mixes in both stages (default: the stage's lr)")
    p.add_argument("--distill-train", default="new+lora", choices=["new", "lora", "new+lora", "all"],
                   help="hybrid: what the KL stage trains (LoRA on v/o only)")
    p.add_argument("--train-len", type=int, default=None,
                   help="hybrid: transfer sequence length (default --seq-len; e.g. 2048 = --long-len)")
    p.add_argument("--train-batch-size", type=int, default=None,
                   help="hybrid: transfer sequences per step (default: --batch-size x --seq-len tokens)")
    p.add_argument("--distill-len", type=int, default=None,
                   help="hybrid: KL-stage sequence length (default --train-len; e.g. 2048 = --long-len), "
                        "as many tokens per step as --batch-size x --seq-len")
    args = p.parse_args(argv)
    if args.train_len is None:
        args.train_len = args.seq_len
    if args.distill_len is None:
        args.distill_len = args.train_len
    return args


def target_options(args: argparse.Namespace) -> dict[str, dict]:
    """``{target: {key: value}}`` from the ``--option TARGET:KEY=VALUE[;KEY=VALUE...]`` arguments, read
    as every benchmark reads a target spec (:func:`~swapformer.cli.options.parse_target_spec`)."""
    from swapformer.cli.options import parse_target_spec

    options: dict[str, dict] = {}
    for text in args.option:
        if ":" not in text:
            raise SystemExit(f"--option expects TARGET:KEY=VALUE, got {text!r}")
        try:
            target, values = parse_target_spec(text)
        except argparse.ArgumentTypeError as err:
            raise SystemExit(f"--option {text!r}: {err}") from err
        options.setdefault(target, {}).update(values)
    return options


def load_splits(corpus: str, tokenizer, args: argparse.Namespace) -> TokenSplits:
    docs = corpus_tokens(corpus, tokenizer)
    return prepare(docs, seq_len=args.seq_len, eval_fraction=args.eval_fraction,
                   sep_token=tokenizer.eos_token_id)


def held_out_ppl(model: torch.nn.Module, splits: TokenSplits, args: argparse.Namespace) -> float:
    with _autocast(args):
        return perplexity(model, splits, seq_len=args.seq_len, batch_size=args.batch_size,
                          max_batches=args.eval_batches)


def held_out_ppls(model: torch.nn.Module, corpora: dict[str, TokenSplits],
                  args: argparse.Namespace) -> dict[str, float]:
    return {name: held_out_ppl(model, splits, args) for name, splits in corpora.items()}


def _autocast(args: argparse.Namespace) -> contextlib.AbstractContextManager:
    if args.autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(args.device).type, dtype=getattr(torch, args.autocast))


def calibration_config(args: argparse.Namespace) -> CalibrationConfig:
    transfer = int(args.tokens * args.transfer_share)
    stages = (Stage("transfer", tokens=transfer, lr=args.transfer_lr),
              Stage("distill", tokens=args.tokens - transfer, lr=args.distill_lr))
    return CalibrationConfig(stages=stages, batch_size=args.batch_size, seq_len=args.seq_len,
                             eval_batches=0, lora_rank=args.lora_rank, device=args.device,
                             autocast_dtype=args.autocast, seed=args.seed, log_every=25)


def run_target(target: str, teacher, corpora: dict[str, TokenSplits], args: argparse.Namespace) -> Row:
    from swapformer import rewrite

    options = target_options(args).get(target, {})
    row = Row(target + "".join(f", {k}={v}" for k, v in options.items()))
    try:
        student = rewrite(copy.deepcopy(teacher).cpu(), target, **options)
    except Exception as e:  # report the failure in the table and go on with the other targets
        log.exception("rewrite to %s failed", target)
        row.notes = f"rewrite failed: {type(e).__name__}: {str(e)[:120]}"
        return row
    report = student.swapformer_report
    row.sites = f"{len(report.replaced)}/{len(report.sites)}"
    student.to(args.device)
    row.ppl_rewrite = held_out_ppls(student, corpora, args)
    if target in args.as_is.split(","):
        row.notes = "not calibrated (--as-is)"
        return row
    t0 = time.perf_counter()
    result = calibrate(student, teacher, corpora[args.corpus], calibration_config(args))
    row.seconds = time.perf_counter() - t0
    row.tokens = result.tokens
    row.ppl_calibrated = held_out_ppls(result.model, corpora, args)
    row.notes = "; ".join(s.describe().split(":")[0] + f" loss {s.first_loss:.3g}->{s.last_loss:.3g}"
                          for s in result.stages if s.losses)
    return row


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    parts = [f"{cpu}, {os.cpu_count()} cores", f"torch {torch.__version__}"]
    if torch.cuda.is_available():
        parts.insert(1, torch.cuda.get_device_name())
    return "; ".join(parts)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def markdown(rows: list[Row], teacher_ppl: dict[str, float], args: argparse.Namespace) -> str:
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    command = "python " + shlex.join([sys.argv[0], *sys.argv[1:]])
    corpora = list(teacher_ppl)
    ppl_heads = " | ".join(f"{c} as is | {c} calibrated | {c} × teacher" for c in corpora)
    lines = [
        f"### SmolLM2-135M quality, {date}",
        "",
        f"- machine: {machine()}; device {args.device}"
        + (f", autocast {args.autocast}" if args.autocast else ""),
        f"- command: `{command}`",
        f"- calibrated on {args.corpus}; held-out perplexity on {', '.join(corpora)}: {args.eval_batches} x "
        f"{args.batch_size} sequences of {args.seq_len} tokens each (every {round(1 / args.eval_fraction)}th "
        f"packed sequence); calibration: {args.transfer_share:.0%} transfer (lr {args.transfer_lr:g}), rest KL "
        f"distill + LoRA r={args.lora_rank} (lr {args.distill_lr:g}), batch {args.batch_size} x {args.seq_len}",
        "",
        f"| model | sites | {ppl_heads} | calib tokens | calib s | notes |",
        "|---|---|" + "---:|---:|---:|" * len(corpora) + "---:|---:|---|",
    ]
    teacher_cells = " | ".join(f"{teacher_ppl[c]:.2f} | - | 1.000" for c in corpora)
    lines.append(f"| teacher | - | {teacher_cells} | - | - | |")
    for r in rows:
        cells = []
        for c in corpora:
            best = r.ppl_calibrated.get(c, r.ppl_rewrite.get(c))
            ratio = "-" if best is None else f"{best / teacher_ppl[c]:.3f}"
            cells.append(f"{_fmt(r.ppl_rewrite.get(c))} | {_fmt(r.ppl_calibrated.get(c))} | {ratio}")
        lines.append(f"| {r.model} | {r.sites} | {' | '.join(cells)} | {r.tokens:,} | {r.seconds:.0f} | {r.notes} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.hybrid:
        from hybrid_report import hybrid_main  # benchmarks/ is on sys.path when run as a script

        return hybrid_main(args, RESULTS)
    torch.manual_seed(args.seed)
    teacher, tokenizer = load_smollm2()
    teacher.to(args.device)
    targets = [t for t in args.targets.split(",") if t]
    names = [args.corpus] + [c for c in args.eval_corpora.split(",") if c and c != args.corpus]
    corpora = {name: load_splits(name, tokenizer, args) for name in names}
    t0 = time.perf_counter()
    teacher_ppl = held_out_ppls(teacher, corpora, args)
    log.info("teacher perplexity %s (%.0f s)", teacher_ppl, time.perf_counter() - t0)
    rows: list[Row] = []
    for target in targets:
        rows.append(run_target(target, teacher, corpora, args))
        log.info("table so far:\n%s", markdown(rows, teacher_ppl, args))
    table = markdown(rows, teacher_ppl, args)
    print(table)
    if args.write:
        with RESULTS.open("a") as f:
            f.write("\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
