"""Quality versus decode speed-up on SmolLM2-135M (issue 16): the teacher, each uniform target, and
``target="auto"`` at several decode budgets, every arm with the same attention-transfer budget.

    python benchmarks/pareto_smollm2.py                        # 16,384 transfer tokens per arm
    python benchmarks/pareto_smollm2.py --quick                # seconds-to-minutes smoke run
    python benchmarks/pareto_smollm2.py --compare-measures ''  # skip the quality-measure comparison

Data: Shakespeare and the wiki excerpt packed to ``--long-len`` tokens, every 20th sequence held out
(``hybrid_report.load_corpus``); the planner measures on the first ``--plan-tokens`` tokens of the
interleaved *training* rows and every trainable arm is calibrated on the training rows (transfer
only, ``hybrid_report.transfer_config``), so no held-out token is planned or trained on. Arms whose
cores have no new parameters (``window``) are evaluated as they are.

Per arm: perplexity at ``--long-len`` on held-out Shakespeare and wiki, the recall probe, and the decode
speed-up at ``--context`` tokens under ``--cost``: ``model`` (the default,
:class:`swapformer.planner.ModelTimedCost`: the whole model's decode step timed through its HF forward
for the original and for each candidate at every layer, split per layer, so a plan's budget holds when
``speed_smollm2.py`` measures it) or ``flop`` (the cores' own FLOP accounting, the original at dense
softmax cost, ``2 * weights`` for the rest). ``auto`` chooses per attention layer among keep, ``window``
at ``--windows`` and the hybrids (defaults), from one measurement of every candidate reused for every
budget.

``--compare-measures W`` measures both per-layer quality costs of the planner for ``window=W`` only
(teacher-forced output error, and the calibration loss change with only that layer replaced), their
rank correlation and seconds, and evaluates the plan each gives at ``--compare-budget`` as it is.

Writes ``pareto_smollm2.md`` (the table), ``pareto_smollm2.png`` (the plot; needs matplotlib, the
``demo`` extra) ``pareto_plan.txt`` (``explain`` of the 3x plan), ``pareto_plan_<B>x.json`` (each budget's
plan, a ``swapformer.planner.save_plan`` file: ``speed_smollm2.py --plan auto3x=pareto_plan_3x.json``
measures it) and ``pareto_measured.json`` (every candidate's per-layer quality cost and cost) into ``--out``.

``--plans-only`` stops after the plans (no arm is trained or evaluated, no comparison): the cheap way to
get the plan files, e.g. the 3x plan of the RESULTS.md run::

    python pareto_smollm2.py --plans-only --plan-tokens 1024 --windows 64,512 --budgets 3,5,8 --out RUN
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import swapformer
from swapformer.calibrate import calibrate
from swapformer.errors import ConfigError
from swapformer.loading.data import TokenSplits
from swapformer.loading.offline import load_smollm2
from swapformer.measure import perplexity, recall_nll
from swapformer.planner import (
    AutoOptions,
    Budget,
    Measured,
    MeasuredCost,
    ModelTimedCost,
    flop_cost,
    measure,
    model_cost,
    recost,
    save_plan,
    select_plan,
)
from swapformer.planner.auto import HYBRIDS
from swapformer.rewriter.plan import target_label
from swapformer.targets.base import resolve_target

log = logging.getLogger("pareto_smollm2")
COST_MODELS = {"model": "whole-model decode steps timed on this machine (ModelTimedCost)",
               "flop": "FLOP model (swapformer.planner.costs.flop_cost)"}
HERE = Path(__file__).parent


@dataclass
class Arm:
    name: str
    kind: str  # teacher, uniform or auto
    speedup: float = 1.0
    replaced: str = ""
    tokens: int = 0
    seconds: float = 0.0
    scores: dict[str, float] = field(default_factory=dict)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=16384, help="attention-transfer tokens per trainable arm")
    p.add_argument("--context", type=int, default=32768, help="context of the decode speed-up")
    p.add_argument("--cost", choices=tuple(COST_MODELS), default="model",
                   help="cost model of the plans and the speed-up column: 'model' = the whole model's decode "
                        "step timed per candidate (ModelTimedCost, what speed_smollm2.py measures), 'flop' = "
                        "the cores' FLOP accounting")
    p.add_argument("--budgets", default="2,3,5,8", help="auto's decode speed-ups at --context")
    p.add_argument("--windows", default="64,128,512", help="window sizes (uniform arms and auto candidates)")
    p.add_argument("--hybrids", default=",".join(HYBRIDS), help="learned hybrid targets (defaults)")
    p.add_argument("--plan-tokens", type=int, default=2048, help="calibration tokens the planner measures on")
    p.add_argument("--quality", choices=("error", "perplexity"), default="error",
                   help="auto's per-layer quality measure (AutoOptions.quality)")
    p.add_argument("--compare-measures", default="64", help="window sizes for the measure comparison ('' = off)")
    p.add_argument("--compare-budget", type=float, default=3.0)
    p.add_argument("--long-len", type=int, default=2048, help="evaluation (and packing) length")
    p.add_argument("--long-batches", type=int, default=1, help="held-out sequences per corpus")
    p.add_argument("--train-len", type=int, default=2048, help="transfer sequence length")
    p.add_argument("--recall", default="64,256", help="recall probe lengths ('' = off)")
    p.add_argument("--recall-samples", type=int, default=1)
    p.add_argument("--transfer-lr", type=float, default=1e-2)
    p.add_argument("--short-windows", default="16,32", help="SWAX windows during transfer ('' = off)")
    p.add_argument("--eval-fraction", type=float, default=0.05)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=HERE, help="folder for the table, plot and plan")
    p.add_argument("--uniform", default=None,
                   help="comma-separated labels of the uniform arms to run (default: every candidate)")
    p.add_argument("--reuse-measured", type=Path, default=None, metavar="MEASURED_JSON",
                   help="plan from a previous run's pareto_measured.json instead of measuring again")
    p.add_argument("--merge", type=Path, nargs="+", default=None, metavar="TABLE_MD",
                   help="only merge the pareto_smollm2.md tables of several runs (the first's teacher) into "
                        "one table and plot in --out")
    p.add_argument("--skip-arms", action="store_true", help="only the comparisons (no arm is trained or evaluated)")
    p.add_argument("--plans-only", action="store_true",
                   help="only measure (or --reuse-measured) and write each budget's plan (pareto_plan_<B>x.json, "
                        "pareto_plan.txt, pareto_measured.json); no comparison, no arm")
    p.add_argument("--compare-costs", type=Path, default=None, metavar="MEASURED_JSON",
                   help="plan from a previous run's pareto_measured.json under the FLOP model and under "
                        "measured times (MeasuredCost, torch's threads), and compare the plans")
    p.add_argument("--quick", action="store_true",
                   help="256-token contexts, 256 transfer tokens, window 64 + cat, auto at 3x (error measure), "
                        "no comparison")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.long_len, args.train_len, args.plan_tokens = 256, 256, 256, 256
        args.windows, args.hybrids, args.budgets, args.recall = "64", "cat", "3", "32"
        args.compare_measures, args.quality, args.cost = "", "error", "flop"
    args.cost_fn = ModelTimedCost() if args.cost == "model" else flop_cost
    # hybrid_report's transfer_config reads these: one --train-len sequence per step
    args.batch_size, args.seq_len, args.train_batch_size = 1, args.train_len, None
    return args


def evaluate(model: torch.nn.Module, corpora: dict, vocab: int, args: argparse.Namespace) -> dict[str, float]:
    model.eval()
    scores = {f"{name} {args.long_len}": perplexity(model, c.long, seq_len=args.long_len, batch_size=1,
                                                    max_batches=args.long_batches)
              for name, c in corpora.items()}
    for length in (int(x) for x in args.recall.split(",") if x):
        scores[f"recall {length}"] = recall_nll(model, length, args.recall_samples, vocab, args.seed)
    return scores


def trainable(student: torch.nn.Module) -> bool:
    return any(student.get_submodule(r.core_name).new_parameters() for r in student.swapformer_report.replaced)


def run_arm(name: str, kind: str, student: torch.nn.Module, teacher: torch.nn.Module, train: torch.Tensor,
            corpora: dict, vocab: int, args: argparse.Namespace) -> Arm:
    from hybrid_report import transfer_config  # benchmarks/ is on sys.path when run as a script

    cost, original = model_cost(student, teacher, "decode", args.context, cost_fn=args.cost_fn)
    report = student.swapformer_report
    arm = Arm(name, kind, original / cost, f"{len(report.replaced)}/{sum(s.kind == 'attention' for s in report.sites)}")
    if args.tokens > 0 and trainable(student):
        rows = -(-args.tokens // args.train_len)
        data = TokenSplits(train=train[:rows], heldout=train[:0])
        result = calibrate(student, teacher, data, transfer_config(args, args.tokens, True))
        student = result.model
        arm.tokens, arm.seconds = result.stages[0].tokens, result.stages[0].seconds
    arm.scores = evaluate(student, corpora, vocab, args)
    log.info("%s: %.2fx decode@%d, %s", name, arm.speedup, args.context, arm.scores)
    return arm


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def compare_measures(analysis, teacher, plan_data, corpora, vocab, args) -> list[str]:
    """Both quality measures for each ``--compare-measures`` window: rank agreement, cost, and the
    held-out quality of the plan each gives (evaluated as is: windows have nothing to train)."""
    lines = []
    budget = Budget.decode(args.compare_budget, args.context)
    for w in (int(x) for x in args.compare_measures.split(",") if x):
        candidate = resolve_target("window", window=w)
        measured, seconds = {}, {}
        for quality in ("error", "perplexity"):
            options = AutoOptions(budget, plan_data, (candidate,), quality=quality)
            t0 = time.perf_counter()
            measured[quality] = measure(analysis, options)
            seconds[quality] = time.perf_counter() - t0
        per_site = {q: [m.options[s.name][1][2] for s in m.sites] for q, m in measured.items()}
        rho = spearman(per_site["error"], per_site["perplexity"])
        layers = {q: [i for i in np.argsort(v)[::-1][:8]] for q, v in per_site.items()}
        lines.append(f"- window={w}: Spearman rank correlation of the two per-layer measures over "
                     f"{len(per_site['error'])} layers: {rho:.2f}; measuring took {seconds['error']:.0f} s "
                     f"(error) vs {seconds['perplexity']:.0f} s (perplexity)")
        for q in ("error", "perplexity"):
            lines.append(f"  - {q}: most costly layers {layers[q]}; values "
                         + ", ".join(f"{v:.3g}" for v in per_site[q]))
        for q, m in measured.items():
            plan = select_plan(m, budget)
            student = analysis.rewrite(plan)
            kept = [i for i, c in enumerate(plan.choices) if c.target is None]
            scores = evaluate(student, corpora, vocab, args)
            lines.append(f"  - plan from {q} at {budget.describe()}: keeps layers {kept}; held out "
                         + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()))
            log.info("measure comparison: %s", lines[-1])
    return lines


def load_measured(analysis, path: Path, candidates) -> Measured:
    """A ``pareto_measured.json`` back as :class:`Measured` (costs as saved, ``fixed`` 0: recost it)."""
    configs = {target_label(c): c for c in candidates}
    data = json.loads(path.read_text())
    sites = [s for s in analysis.sites if s.name in data]
    return Measured(sites, {name: [(label, configs.get(label), quality, cost) for label, quality, cost in rows]
                            for name, rows in data.items()}, 0.0)


def compare_costs(analysis, path: Path, candidates, budgets: list[float], args) -> list[str]:
    """Plans from one quality measurement (``path``) under the FLOP model, the cores' step times
    (MeasuredCost) and the whole model's timed decode (ModelTimedCost); each plan's speed-up under all."""
    loaded = load_measured(analysis, path, candidates)
    sites = loaded.sites
    first = Budget.decode(budgets[0], args.context)
    t0 = time.perf_counter()
    tables = {"FLOP": recost(analysis, loaded, first, flop_cost),
              "core-timed": recost(analysis, loaded, first, MeasuredCost()),
              "model-timed": recost(analysis, loaded, first, ModelTimedCost())}
    lines = [f"- timing took {time.perf_counter() - t0:.0f} s, {torch.get_num_threads()} threads"]

    def total(table: Measured, plan) -> float:
        chosen = {c.site: c.label for c in plan.choices}
        return table.fixed + sum(next(o[3] for o in table.options[s.name] if o[0] == chosen[s.name]) for s in sites)

    def speedup(table: Measured, plan) -> float:
        return (table.fixed + sum(table.options[s.name][0][3] for s in sites)) / total(table, plan)

    for name in ("core-timed", "model-timed"):
        table = tables[name]
        per_layer = {label: cost for label, _, _, cost in table.options[sites[0].name]}
        lines.append(f"- {name} decode at {args.context:,} tokens, ms/token of the model with every layer as: "
                     + ", ".join(f"{label} {1e3 * (table.fixed + len(sites) * c):.1f}" for label, c in per_layer.items()))
    for b in budgets:
        budget = Budget.decode(b, args.context)
        for name, table in tables.items():
            try:
                plan = select_plan(table, budget)
            except ConfigError as e:
                lines.append(f"- {b:g}×, {name} plan: none ({e})")
                continue
            lines.append(f"- {b:g}×, {name} plan ({_mix(plan)}): "
                         + ", ".join(f"{speedup(t, plan):.2f}× {n}" for n, t in tables.items())
                         + f"; {1e3 * total(tables['model-timed'], plan):.1f} ms/token model-timed")
            log.info("cost comparison: %s", lines[-1])
    return lines


def markdown(arms: list[Arm], args: argparse.Namespace, machine: str) -> str:
    teacher = arms[0]
    keys = list(teacher.scores)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"### Pareto, SmolLM2-135M, {date}",
        "",
        f"- machine: {machine}; device {args.device}",
        f"- command: `python {shlex.join([sys.argv[0], *sys.argv[1:]])}`",
        f"- every trainable arm: {args.tokens:,} attention-transfer tokens ({args.train_len}-token rows of "
        f"Shakespeare + wiki training text, lr {args.transfer_lr:g}); auto planned on {args.plan_tokens:,} "
        f"tokens of the same training text; held out: {args.long_batches} x {args.long_len} tokens per "
        f"corpus; recall: NLL (nats/token) on the second copy; speed-up: decode at {args.context:,} tokens, "
        f"{COST_MODELS[args.cost]}",
        "",
        f"| arm | attention replaced | decode speed-up @{args.context} | transfer tokens | s | "
        + " | ".join(keys) + " |",
        "|---|---:|---:|---:|---:|" + "---:|" * len(keys),
    ]
    for a in arms:
        cells = []
        for k in keys:
            v = a.scores[k]
            ratio = "" if k.startswith("recall") or a is teacher else f" ({v / teacher.scores[k]:.3f}×)"
            cells.append(f"{v:.2f}{ratio}")
        lines.append(f"| {a.name} | {a.replaced or '-'} | {a.speedup:.2f}× | {a.tokens:,} | {a.seconds:.0f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def goal(arms: list[Arm], budget: float, args: argparse.Namespace) -> list[str]:
    """Whether auto at ``budget`` beats every uniform arm that meets it, within 1.05x of the teacher."""
    teacher = arms[0]
    auto = next((a for a in arms if a.kind == "auto" and a.name == f"auto decode@{args.context}={budget:g}"), None)
    if auto is None:
        return [f"- no auto arm at {budget:g}x"]
    ppl = [k for k in teacher.scores if not k.startswith("recall")]
    meeting = [a for a in arms if a.kind == "uniform" and a.speedup >= budget]
    lines = []
    for k in ppl:
        ratio = auto.scores[k] / teacher.scores[k]
        best = min(meeting, key=lambda a: a.scores[k], default=None)
        beats = best is None or auto.scores[k] < best.scores[k]
        versus = f"best uniform arm meeting {budget:g}x: {best.name} {best.scores[k]:.2f}" if best else "none"
        lines.append(f"- {k}: auto {auto.scores[k]:.2f} = {ratio:.3f}× teacher "
                     f"({'within' if ratio <= 1.05 else 'outside'} 1.05×); {versus} "
                     f"({'auto lower' if beats else 'auto NOT lower'})")
    return lines


def plot(arms: list[Arm], path: Path, args: argparse.Namespace) -> bool:
    try:
        import matplotlib
    except ImportError:
        log.warning("no matplotlib (pip install 'swapformer[demo]'): %s not drawn", path)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in arms[0].scores if not k.startswith("recall")]
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4.2), squeeze=False)
    for ax, k in zip(axes[0], keys):
        base = arms[0].scores[k]
        auto = sorted((a for a in arms if a.kind == "auto"), key=lambda a: a.speedup)
        ax.plot([a.speedup for a in auto], [a.scores[k] / base for a in auto], "o-", color="k", label="auto")
        for a in auto:
            ax.annotate(a.name.split("=")[-1] + "×", (a.speedup, a.scores[k] / base), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
        for i, a in enumerate(x for x in arms if x.kind == "uniform"):
            ax.scatter(a.speedup, a.scores[k] / base, marker="s", color=f"C{i % 10}", label=a.name)
        ax.scatter(1.0, 1.0, marker="*", s=140, color="gold", edgecolors="k", label="teacher")
        ax.axhline(1.05, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_xlabel(f"decode speed-up at {args.context:,} tokens ({args.cost} cost model)")
        ax.set_ylabel(f"perplexity / teacher ({k})")
        ax.set_title(f"SmolLM2-135M, {k}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def read_table(path: Path) -> list[Arm]:
    """The arms of a ``pareto_smollm2.md`` table (scores without their ``(x teacher)`` ratios)."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("| ")]
    keys = [k.strip() for k in lines[0].strip("|").split("|")][5:]
    arms = []
    for line in lines[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        name = cells[0]
        kind = "teacher" if name == "teacher" else "auto" if name.startswith("auto") else "uniform"
        arms.append(Arm(name, kind, float(cells[2].rstrip("×")), cells[1].replace("-", ""),
                        int(cells[3].replace(",", "")), float(cells[4]),
                        {k: float(c.split()[0]) for k, c in zip(keys, cells[5:])}))
    return arms


def merge(paths: list[Path], args: argparse.Namespace) -> int:
    """One table and plot from several runs' tables: the first run's teacher, every other arm once."""
    arms: list[Arm] = []
    for path in paths:
        arms += [a for a in read_table(path) if a.name not in {b.name for b in arms}]
    arms = [arms[0], *sorted(arms[1:], key=lambda a: (a.kind != "auto", a.speedup))]
    from quality_smollm2 import machine

    text = "\n".join(f"- merged from {', '.join(map(str, paths))} (each run's settings in its own header)"
                     if line.startswith("- every trainable arm") else line
                     for line in markdown(arms, args, machine()).splitlines()) + "\n"
    (args.out / "pareto_smollm2.md").write_text(text)
    plot(arms, args.out / "pareto_smollm2.png", args)
    print(text + "\n" + "\n".join(goal(arms, 3.0, args)))
    return 0


def main(argv: list[str] | None = None) -> int:
    from hybrid_report import load_corpus, mixed_train
    from quality_smollm2 import machine

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.merge:
        args.out.mkdir(parents=True, exist_ok=True)
        return merge(args.merge, args)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    teacher, tokenizer = load_smollm2()
    teacher.to(args.device).eval()
    vocab = int(teacher.config.vocab_size)
    corpora = {name: load_corpus(name, tokenizer, args) for name in ("shakespeare", "wiki")}
    train = mixed_train(corpora, args.train_len)
    plan_len = min(args.plan_tokens, args.train_len)
    plan_data = tuple(train[i : i + 1, :plan_len] for i in range(max(1, args.plan_tokens // plan_len)))
    analysis = swapformer.prepare(teacher)
    windows = [int(w) for w in args.windows.split(",") if w]
    hybrids = [h for h in args.hybrids.split(",") if h]
    candidates = (*(resolve_target("window", window=w) for w in windows), *(resolve_target(h) for h in hybrids))
    budgets = [float(b) for b in args.budgets.split(",") if b]
    if args.plans_only:
        plans = plan_budgets(analysis, plan_data, candidates, budgets, args)
        print("\n".join(f"{b:g}x: {p.summary} ({_mix(p)}) -> {args.out / plan_file_name(b)}" for b, p in plans.items()))
        return 0
    comparison = compare_measures(analysis, teacher, plan_data, corpora, vocab, args) if args.compare_measures else []
    if args.compare_costs:
        comparison += compare_costs(analysis, args.compare_costs, candidates, budgets, args)
    if args.skip_arms:
        text = "\n".join(comparison) + "\n"
        (args.out / "pareto_comparison.md").write_text(text)
        print(text)
        return 0
    arms = [Arm("teacher", "teacher", scores=evaluate(teacher, corpora, vocab, args))]
    log.info("teacher: %s", arms[0].scores)
    plans = plan_budgets(analysis, plan_data, candidates, budgets, args)
    # auto at the goal's budget first, then every uniform target, then the other budgets; the table
    # so far is written after each arm
    order = sorted(plans, key=lambda b: b != args.compare_budget)
    jobs = [(f"auto decode@{args.context}={order[0]:g}", "auto", plans[order[0]])]
    uniform = [c for c in candidates if args.uniform is None or arm_label(c) in args.uniform.split(",")]
    jobs += [(arm_label(c), "uniform", c) for c in uniform]
    jobs += [(f"auto decode@{args.context}={b:g}", "auto", plans[b]) for b in order[1:]]
    for name, kind, target in jobs:
        arms.append(run_arm(name, kind, analysis.rewrite(target), teacher, train, corpora, vocab, args))
        (args.out / "pareto_smollm2.md").write_text(markdown(arms, args, machine()))
    table = markdown(arms, args, machine())
    verdict = goal(arms, args.compare_budget, args)
    mix = ["- auto's choices: " + "; ".join(f"{b:g}× → {_mix(p)}" for b, p in plans.items())]
    text = table + "\n" + "\n".join(mix + verdict + comparison) + "\n"
    (args.out / "pareto_smollm2.md").write_text(text)
    plot(arms, args.out / "pareto_smollm2.png", args)
    print(text)
    return 0


def plan_budgets(analysis, plan_data, candidates, budgets: list[float], args: argparse.Namespace) -> dict:
    """Measure every candidate once (or reuse ``--reuse-measured``), then the plan of each budget; writes
    ``pareto_measured.json``, ``pareto_plan.txt`` and every plan's file (:func:`save_budget_plans`)."""
    t0 = time.perf_counter()
    if args.reuse_measured:
        measured = recost(analysis, load_measured(analysis, args.reuse_measured, candidates),
                          Budget.decode(budgets[0], args.context), args.cost_fn)
    else:
        measured = measure(analysis, AutoOptions(Budget.decode(budgets[0], args.context), plan_data, candidates,
                                                 quality=args.quality, cost_fn=args.cost_fn))
    log.info("auto: measured %d candidates in %.0f s", len(candidates), time.perf_counter() - t0)
    (args.out / "pareto_measured.json").write_text(json.dumps(
        {s.name: [(label, quality, cost) for label, _, quality, cost in measured.options[s.name]]
         for s in measured.sites}, indent=1))
    plans = {}
    for b in budgets:
        plans[b] = select_plan(measured, Budget.decode(b, args.context))
        if b == args.compare_budget or len(plans) == 1:
            (args.out / "pareto_plan.txt").write_text(str(analysis.explain(plans[b])) + "\n")
    save_budget_plans(plans, [arm_label(c) for c in candidates], args)
    return plans


def plan_file_name(budget: float) -> str:
    """``pareto_plan_3x.json`` for a decode speed-up of 3."""
    return f"pareto_plan_{budget:g}x.json"


def save_budget_plans(plans: dict, candidates: list[str], args: argparse.Namespace) -> list[Path]:
    """Each budget's plan as a plan file in ``--out`` (``speed_smollm2.py --plan NAME=PATH`` reads it),
    with the budget and how it was planned as metadata."""
    written = []
    for b, plan in plans.items():
        metadata = {"model": "SmolLM2-135M", "budget": f"decode@{args.context}={b:g}", "candidates": candidates,
                    "quality": args.quality, "cost": COST_MODELS[args.cost], "plan_tokens": args.plan_tokens,
                    "command": shlex.join(["python", sys.argv[0], *sys.argv[1:]])}
        written.append(save_plan(plan, args.out / plan_file_name(b), metadata))
        log.info("auto %gx: plan written to %s", b, written[-1])
    return written


def arm_label(config) -> str:
    """``target_label``, with the window size even when it is the default."""
    label = target_label(config)
    return f"window(window={config.window})" if label == "window" else label


def _mix(plan) -> str:
    counts: dict[str, int] = {}
    for c in plan.choices:
        label = "keep" if c.target is None else arm_label(c.target)
        counts[label] = counts.get(label, 0) + 1
    return ", ".join(f"{n} {label}" for label, n in sorted(counts.items(), key=lambda x: -x[1]))


if __name__ == "__main__":
    sys.exit(main())
