"""What a hybrid target's attention-transfer stage costs, and whether ``torch.compile`` of its cores pays.

Issue 12 asks the transfer stage to run at ≥ 0.8× the teacher's no-grad forward. Two measurements, each
side by side in one process:

* default (the product's figure): SmolLM2-135M's no-grad forward (LM head included, as the quality
  report measures it), then ``--steps`` transfer steps of a ``--target`` conversion (4 × 512 tokens,
  SWAX windows 16 / 32 on half the steps, RoPE shifts, as ``quality_smollm2.py --hybrid`` runs them),
  once with eager cores and once with every core's forward compiled
  (``CalibrationConfig(compile_cores=True)``: one graph serves all 30 layers, one more per SWAX window).
  The median step (``StageResult.step_seconds``) is the steady state; the total includes the compilations.
* ``--cores`` (a unit benchmark, no weights): one core's transfer step at the same shape (forward and
  the backward of an MSE), eager and compiled interleaved, beside the host's causal SDPA forward.

Usage::

    python benchmarks/transfer_step.py --steps 12
    python benchmarks/transfer_step.py --cores --target fastweight
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# run as a script from any checkout: import that checkout's swapformer, not an installed one
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))

from swapformer import rewrite  # noqa: E402
from swapformer.calibrate import CalibrationConfig, Stage, calibrate  # noqa: E402
from swapformer.loading.data import TokenSplits  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, D_MODEL = 9, 3, 64, 576  # SmolLM2-135M's attention
BATCH, LENGTH = 4, 512


def teacher_tok_s(teacher, rows: torch.Tensor, batches: int = 3) -> float:
    with torch.no_grad():
        teacher(rows[:BATCH])  # warm-up
        t0 = time.perf_counter()
        for i in range(batches):
            teacher(rows[i * BATCH:(i + 1) * BATCH])
    return batches * BATCH * LENGTH / (time.perf_counter() - t0)


def transfer_run(teacher, rows: torch.Tensor, target: str, steps: int, compiled: bool) -> dict:
    student = rewrite(copy.deepcopy(teacher), target)
    stage = Stage("transfer", steps=steps, lr=1e-2, short_windows=(16, 32), rope_shift=8192)
    config = CalibrationConfig(stages=(stage,), batch_size=BATCH, seq_len=LENGTH, eval_batches=0, seed=0,
                               progress=False, compile_cores=compiled)
    result = calibrate(student, teacher, TokenSplits(rows[:BATCH * steps], rows[:0]), config).stages[0]
    median_step = statistics.median(result.step_seconds[1:])  # the first step also initialises the mixes
    return {"median": BATCH * LENGTH / median_step, "total": result.tokens / result.seconds,
            "seconds": result.seconds}


def model_rows(args) -> list[str]:
    from swapformer.loading.offline import corpus_tokens, load_smollm2

    teacher, tokenizer = load_smollm2()
    teacher.eval()
    ids = torch.cat(corpus_tokens("shakespeare", tokenizer))
    rows = ids[: (ids.numel() // LENGTH) * LENGTH].view(-1, LENGTH)
    before = teacher_tok_s(teacher, rows)
    runs = {}  # alternated, so that a drifting machine weighs on both alike
    for round_ in range(1, args.rounds + 1):
        for name in ("eager", "compiled"):
            label = f"{name} cores" + ("" if args.rounds == 1 else f", round {round_}")
            runs[label] = transfer_run(teacher, rows, args.target, args.steps, name == "compiled")
    after = teacher_tok_s(teacher, rows)
    teacher_fwd = (before + after) / 2  # the machine may drift between the two
    lines = [f"teacher no-grad forward: {before:.0f} tok/s before, {after:.0f} after",
             f"| {args.target} transfer, {args.steps} steps of {BATCH} × {LENGTH} | s | tok/s, all steps "
             "(× teacher) | tok/s, median step (× teacher) |", "|---|---:|---:|---:|"]
    for label, r in runs.items():
        lines.append(f"| {label} | {r['seconds']:.0f} | {r['total']:.0f} ({r['total'] / teacher_fwd:.2f}×) | "
                     f"{r['median']:.0f} ({r['median'] / teacher_fwd:.2f}×) |")
    return lines


def core_rows(args) -> list[str]:
    # the hybrid cores at SmolLM2's shapes with their default options
    from profile_smollm2 import _core as hybrid_core

    torch.manual_seed(0)
    q = torch.randn(BATCH, HEADS, LENGTH, HEAD_DIM)
    k, v = (torch.randn(BATCH, KV_HEADS, LENGTH, HEAD_DIM) for _ in range(2))
    hidden, reference = torch.randn(BATCH, LENGTH, D_MODEL), torch.randn(BATCH, HEADS, LENGTH, HEAD_DIM)
    eager, compiled = hybrid_core(args.target), hybrid_core(args.target)
    compiled.compile(dynamic=False)

    def step(core) -> None:
        F.mse_loss(core(q, k, v, None, hidden=hidden), reference).backward()

    def sdpa() -> None:
        with torch.no_grad():
            kk, vv = (x.repeat_interleave(HEADS // KV_HEADS, 1) for x in (k, v))
            F.scaled_dot_product_attention(q, kk, vv, is_causal=True)

    t0 = time.perf_counter()
    step(compiled)
    compile_s = time.perf_counter() - t0
    runs = {"eager": lambda: step(eager), "compiled": lambda: step(compiled), "host SDPA forward": sdpa}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeat):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    lines = [f"first compiled step (compilation): {compile_s:.1f} s",
             f"| one {args.target} core, {BATCH} × {LENGTH} | median ms | best ms |", "|---|---:|---:|"]
    for name, ts in times.items():
        lines.append(f"| {name} | {statistics.median(ts[1:]) * 1e3:.1f} | {min(ts[1:]) * 1e3:.1f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="fastweight")
    parser.add_argument("--cores", action="store_true", help="one core at the transfer's shape, no weights")
    parser.add_argument("--steps", type=int, default=12, help="transfer steps per run (the first is not timed)")
    parser.add_argument("--rounds", type=int, default=1, help="eager and compiled runs, alternated")
    parser.add_argument("--repeat", type=int, default=11, help="--cores: interleaved runs (the first is not timed)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    print("\n".join(core_rows(args) if args.cores else model_rows(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
