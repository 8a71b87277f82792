"""Quality of each target on SmolLM2-135M: perplexity of the teacher, of each target right after the
rewrite, and after calibration (attention transfer, then KL distillation with LoRA), with the tokens
and wall time the calibration took.

    python benchmarks/quality_smollm2.py --targets fastweight,elita --tokens 100000 --write
    python benchmarks/quality_smollm2.py --targets '' --eval-batches 16        # teacher only
    python benchmarks/quality_smollm2.py --device cuda --autocast bfloat16 --tokens 20000000

Held-out perplexity is token-weighted over ``--eval-batches`` batches of ``--seq-len``-token
sequences: every 20th packed sequence of the corpus (``--eval-fraction 0.05``), never trained on.
The table goes to stdout; ``--write`` appends it to ``benchmarks/RESULTS.md``.
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
from dataclasses import dataclass
from pathlib import Path

import torch

from swapformer.calibrate import CalibrationConfig, Stage, calibrate
from swapformer.data import TokenSplits, prepare
from swapformer.evaluate import perplexity
from swapformer.offline import corpus_tokens, load_smollm2

log = logging.getLogger("quality_smollm2")
RESULTS = Path(__file__).with_name("RESULTS.md")
DEFAULT_TARGETS = "fastweight,elita,cat,worker,window"


@dataclass
class Row:
    corpus: str
    model: str
    sites: str = ""
    ppl_rewrite: float | None = None
    ppl_calibrated: float | None = None
    tokens: int = 0
    seconds: float = 0.0
    notes: str = ""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default=DEFAULT_TARGETS, help="comma-separated targets ('' = teacher only)")
    p.add_argument("--corpora", default="shakespeare", help="comma-separated: shakespeare, wiki")
    p.add_argument("--tokens", type=int, default=100_000, help="calibration token budget per target")
    p.add_argument("--transfer-share", type=float, default=0.5, help="share of --tokens for transfer")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--eval-fraction", type=float, default=0.05)
    p.add_argument("--transfer-lr", type=float, default=1e-2)
    p.add_argument("--distill-lr", type=float, default=1e-4)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--autocast", choices=["bfloat16", "float16"], default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write", action="store_true", help=f"append the table to {RESULTS}")
    return p.parse_args(argv)


def load_splits(corpus: str, tokenizer, args: argparse.Namespace) -> TokenSplits:
    docs = corpus_tokens(corpus, tokenizer)
    return prepare(docs, seq_len=args.seq_len, eval_fraction=args.eval_fraction,
                   sep_token=tokenizer.eos_token_id)


def held_out_ppl(model: torch.nn.Module, splits: TokenSplits, args: argparse.Namespace) -> float:
    with _autocast(args):
        return perplexity(model, splits, seq_len=args.seq_len, batch_size=args.batch_size,
                          max_batches=args.eval_batches)


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


def run_target(target: str, teacher, splits: TokenSplits, corpus: str, args: argparse.Namespace) -> Row:
    from swapformer import rewrite

    row = Row(corpus, target)
    try:
        student = rewrite(copy.deepcopy(teacher).cpu(), target)
    except Exception as e:  # report the failure in the table and go on with the other targets
        log.exception("rewrite to %s failed", target)
        row.notes = f"rewrite failed: {type(e).__name__}: {str(e)[:120]}"
        return row
    report = student.swapformer_report
    row.sites = f"{len(report.replaced)}/{len(report.sites)}"
    student.to(args.device)
    row.ppl_rewrite = held_out_ppl(student, splits, args)
    t0 = time.perf_counter()
    result = calibrate(student, teacher, splits, calibration_config(args))
    row.seconds = time.perf_counter() - t0
    row.tokens = result.tokens
    row.ppl_calibrated = held_out_ppl(result.model, splits, args)
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
    lines = [
        f"### SmolLM2-135M quality, {date}",
        "",
        f"- machine: {machine()}; device {args.device}"
        + (f", autocast {args.autocast}" if args.autocast else ""),
        f"- command: `{command}`",
        f"- held-out perplexity: {args.eval_batches} x {args.batch_size} sequences of {args.seq_len} "
        f"tokens (every {round(1 / args.eval_fraction)}th packed sequence); calibration: "
        f"{args.transfer_share:.0%} transfer (lr {args.transfer_lr:g}), rest KL distill + LoRA "
        f"r={args.lora_rank} (lr {args.distill_lr:g})",
        "",
        "| corpus | model | sites | ppl as is | ppl calibrated | × teacher | calib tokens | calib s | notes |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for corpus, ppl in teacher_ppl.items():
        lines.append(f"| {corpus} | teacher | - | {ppl:.2f} | - | 1.000 | - | - | |")
    for r in rows:
        best = r.ppl_calibrated if r.ppl_calibrated is not None else r.ppl_rewrite
        ratio = "-" if best is None else f"{best / teacher_ppl[r.corpus]:.3f}"
        lines.append(f"| {r.corpus} | {r.model} | {r.sites} | {_fmt(r.ppl_rewrite)} | {_fmt(r.ppl_calibrated)} "
                     f"| {ratio} | {r.tokens:,} | {r.seconds:.0f} | {r.notes} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    teacher, tokenizer = load_smollm2()
    teacher.to(args.device)
    targets = [t for t in args.targets.split(",") if t]
    rows: list[Row] = []
    teacher_ppl: dict[str, float] = {}
    for corpus in [c for c in args.corpora.split(",") if c]:
        splits = load_splits(corpus, tokenizer, args)
        t0 = time.perf_counter()
        teacher_ppl[corpus] = held_out_ppl(teacher, splits, args)
        log.info("%s: teacher perplexity %.3f (%.0f s)", corpus, teacher_ppl[corpus], time.perf_counter() - t0)
        for target in targets:
            rows.append(run_target(target, teacher, splits, corpus, args))
            log.info("%s", rows[-1])
    table = markdown(rows, teacher_ppl, args)
    print(table)
    if args.write:
        with RESULTS.open("a") as f:
            f.write("\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
