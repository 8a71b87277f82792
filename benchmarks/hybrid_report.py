"""The ``--hybrid`` report of ``quality_smollm2.py`` (issue 12): hybrid targets at step 0 and along a
transfer calibration curve (then, with ``--distill-curve``, end-to-end KL), against ``window=64, sinks=4`` and the equal-memory window.

Columns: perplexity at 512 and ``--long-len`` tokens on held-out Shakespeare and wiki (× teacher in
brackets), the recall probe's NLL (nats/token) on the second copy of a random L-token sequence, the
decoding state per layer at ``--long-len`` tokens, and for calibrated rows the transfer tokens,
seconds and tokens/s next to the teacher's own no-grad forward throughput.
"""

from __future__ import annotations

import copy
import datetime
import logging
import math
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from swapformer import rewrite
from swapformer.calibrate import CalibrationConfig, Stage, calibrate
from swapformer.loading.data import TokenSplits, heldout_split, pack
from swapformer.loading.offline import corpus_tokens, load_smollm2
from swapformer.measure import forward_logits, perplexity, recall_nll
from swapformer.targets.hybrid import HybridAttention

log = logging.getLogger("quality_smollm2.hybrid")
EVAL_CORPORA = ("shakespeare", "wiki")
BASELINE = {"window": 64, "sinks": 4}


@dataclass
class Corpus:
    train: torch.Tensor  # [N, long_len], the training long sequences
    short: torch.Tensor  # [M, seq_len], cut from the held-out long sequences
    long: torch.Tensor  # [K, long_len], held out


@dataclass
class Row:
    model: str
    tokens: int = 0
    seconds: float = 0.0
    tok_s: float = 0.0
    state_bytes: int = 0
    scores: dict[str, float] = field(default_factory=dict)


def load_corpus(name: str, tokenizer, args) -> Corpus:
    packed = pack(corpus_tokens(name, tokenizer), args.long_len, sep_token=tokenizer.eos_token_id)
    train, held = heldout_split(packed, args.eval_fraction)
    return Corpus(train, held.reshape(-1, args.seq_len), held)


def mixed_train(corpora: dict[str, Corpus], length: int) -> torch.Tensor:
    """``length``-token rows of every corpus interleaved (general English: Shakespeare + wiki), as
    many from each as the shortest has."""
    rows = [c.train.reshape(-1, length) for c in corpora.values()]
    n = min(r.shape[0] for r in rows)
    return torch.stack([r[:n] for r in rows], dim=1).flatten(0, 1)


def with_recall_rows(train: torch.Tensor, share: float, vocab: int, seed: int) -> torch.Tensor:
    """``train`` with every ``round(1 / share)``-th row replaced by a random half-row repeated twice (the
    recall probe's format, other random ids): KL to a teacher that copies the first half teaches copying
    from ``length / 2`` tokens back, which a 64-token window cannot do and a far memory might. A
    capability test of the memory, not general-English calibration (the table says so)."""
    if not 0 < share <= 1:
        raise SystemExit(f"--recall-train-share must be in (0, 1], got {share}")
    train, half = train.clone(), train.shape[1] // 2
    g = torch.Generator().manual_seed(seed + 1_000_003)  # never the probe's seed + length
    rows = torch.arange(0, train.shape[0], max(1, round(1 / share)))
    x = torch.randint(100, vocab, (len(rows), half), generator=g)
    train[rows] = torch.cat([x, x], dim=1)[:, : train.shape[1]]
    return train


def training_rows(corpora: dict[str, Corpus], length: int, vocab: int, args) -> torch.Tensor:
    """:func:`mixed_train` rows of ``length``, with ``--recall-train-share`` of them copy rows."""
    rows = mixed_train(corpora, length)
    return with_recall_rows(rows, args.recall_train_share, vocab, args.seed) if args.recall_train_share else rows


def train_batch_size(args) -> int:
    """Sequences per transfer step: ``--train-batch-size``, else as many tokens as the eval batch."""
    return args.train_batch_size or max(1, args.batch_size * args.seq_len // args.train_len)


def distill_batch_size(args) -> int:
    """Sequences per KL step: the transfer's when both stages use the same length, else as many tokens
    as the eval batch."""
    if args.distill_len == args.train_len:
        return train_batch_size(args)
    return max(1, args.batch_size * args.seq_len // args.distill_len)


def kl_start(used: int, args, corpora: int) -> int:
    """Where the KL rows start, in tokens of the ``--distill-len`` layout: after every token the
    transfer used. Both layouts interleave the corpora row by row (:func:`mixed_train`), so the
    transfer took ``used / corpora`` tokens of each, in whole ``--train-len`` rows; the KL skips as
    many whole ``--distill-len`` rows of each as cover them."""
    if args.distill_len == args.train_len:
        return used
    per_corpus = math.ceil(used / (corpora * args.train_len)) * args.train_len
    return math.ceil(per_corpus / args.distill_len) * corpora * args.distill_len


def evaluate(model, corpora: dict[str, Corpus], vocab: int, args) -> dict[str, float]:
    model.eval()
    scores = {}
    for name, c in corpora.items():
        scores[f"{name} {args.seq_len}"] = perplexity(model, c.short, seq_len=args.seq_len,
                                                      batch_size=args.batch_size,
                                                      max_batches=args.eval_batches)
        scores[f"{name} {args.long_len}"] = perplexity(model, c.long, seq_len=args.long_len,
                                                       batch_size=1, max_batches=args.long_batches)
    for length in (int(x) for x in args.recall.split(",") if x):
        scores[f"recall {length}"] = recall_nll(model, length, args.recall_samples, vocab, args.seed)
    return scores


def cores(model) -> list:
    return [model.get_submodule(r.core_name) for r in model.swapformer_report.replaced]


def state_per_layer(model, context: int) -> int:
    found = cores(model)
    return sum(c.state_bytes(context) for c in found) // max(1, len(found))


def equal_memory_window(student, context: int, sinks: int = 4) -> int:
    """The window (with ``sinks``) whose cached K/V per layer holds the hybrid's state bytes."""
    core = cores(student)[0]
    per_row = core.num_kv_heads * (core.head_dim + core.value_dim) * 4 + 9
    return max(1, state_per_layer(student, context) // per_row - sinks + 1)


@torch.no_grad()
def teacher_throughput(teacher, train: torch.Tensor, args, batches: int = 3) -> float:
    x = train[: args.batch_size]
    forward_logits(teacher, x)  # warm-up
    t0 = time.perf_counter()
    for i in range(batches):
        forward_logits(teacher, train[i * args.batch_size : (i + 1) * args.batch_size])
    return batches * x.numel() / (time.perf_counter() - t0)


def transfer_config(args, tokens: int, first: bool) -> CalibrationConfig:
    short = tuple(int(w) for w in args.short_windows.split(",") if w)
    stage = Stage("transfer", tokens=tokens, lr=args.transfer_lr, init_mix=first, short_windows=short,
                  schedule=args.transfer_schedule, mix_lr=args.mix_lr, rope_shift=args.rope_shift)
    return CalibrationConfig(stages=(stage,), batch_size=train_batch_size(args), seq_len=args.train_len,
                             eval_batches=0, seed=args.seed, log_every=25, progress=False,
                             device=args.device,
                             # pareto_smollm2.py calls this with its own arguments, which have no --compile-cores
                             compile_cores=getattr(args, "compile_cores", False))


def kl_schedule_label(args) -> str:
    return "" if args.distill_schedule == "constant" else f" {args.distill_schedule}"


def kl_len_label(args) -> str:
    return "" if args.distill_len == args.train_len else f", {args.distill_len}-token rows"


def mix_lr_label(args) -> str:
    return "" if args.mix_lr is None else f", mix lr {args.mix_lr:g}"


def lora_projections(student, letters: str = "vo") -> tuple[str, ...]:
    """The attention projections named by ``letters`` (of ``q, k, v, o``) in every layer: LoRA's
    targets in the KL stage (issue 12 asks for v/o; ``--lora-modules qkvo`` adds q and k)."""
    ends = tuple(f"self_attn.{c}_proj" for c in letters)
    return tuple(n for n, _ in student.named_modules() if n.endswith(ends))


def distill_config(args, tokens: int, lora_targets: tuple[str, ...]) -> CalibrationConfig:
    """End-to-end KL to the teacher's logits: the per-layer transfer leaves errors that compound over
    30 layers; this stage sees the whole model's output. LoRA on ``lora_targets`` (v/o: issue 12)."""
    stage = Stage("distill", tokens=tokens, lr=args.distill_lr, train=args.distill_train, schedule=args.distill_schedule,
                  mix_lr=args.mix_lr)
    return CalibrationConfig(stages=(stage,), batch_size=distill_batch_size(args), seq_len=args.distill_len,
                             eval_batches=0, seed=args.seed, log_every=25, progress=False,
                             device=args.device, lora_rank=args.lora_rank, lora_targets=lora_targets)


def _calibrate_rows(student, teacher, train, used: int, tokens: int, config) -> tuple:
    """One calibration segment on the training rows after the ``used`` tokens: its stage result."""
    batch = config.batch_size
    rows_needed = math.ceil(tokens / (batch * config.seq_len)) * batch
    start = used // config.seq_len
    data = TokenSplits(train=train[start : start + rows_needed], heldout=train[:0])
    return calibrate(student, teacher, data, config).stages[0]


def repeat_note(stage) -> str:
    """A row's note where its segment ran out of training rows and read some twice (a curve point
    beyond the corpus must say so in the table, not only in the log)."""
    return f" [rows repeat: {stage.passes:.2f} passes]" if stage.passes > 1 else ""


def mix_summary(student) -> str:
    """The hybrid cores' far-memory mixes ``g_h``: median and range over every head of every layer."""
    mixes = [m.mix().detach().flatten() for m in student.modules() if isinstance(m, HybridAttention)]
    if not mixes:
        return "no hybrid core"
    g = torch.cat(mixes)
    return f"mix g over {g.numel()} heads: median {g.median():.3g}, min {g.min():.3g}, max {g.max():.3g}"


def target_rows(target: str, teacher, corpora, train, kl_train, vocab: int, args) -> list[Row]:
    """Step 0, each transfer budget and each KL budget of one target. ``kl_train``: the KL stage's
    rows (``--distill-len`` long; ``train`` itself when that is ``--train-len``)."""
    from quality_smollm2 import target_options

    options = target_options(args).get(target, {})
    # "window" is the control: no far memory, the same KL stage (LoRA on v/o only)
    label = target + ("" if target == "window" else " hybrid") + "".join(f", {k}={v}" for k, v in options.items())
    student = rewrite(copy.deepcopy(teacher), target, **options)
    state = state_per_layer(student, args.long_len)
    row = Row(f"{label}, step 0", state_bytes=state, scores=evaluate(student, corpora, vocab, args))
    log.info("%s: %s", row.model, row.scores)
    rows, used, seconds = [row], 0, 0.0
    budgets = [int(float(b)) for b in args.curve.split(",") if b]
    for budget in (b for b in budgets if b > 0):
        stage = _calibrate_rows(student, teacher, train, used, budget - used,
                                transfer_config(args, budget - used, used == 0))
        used += stage.tokens
        seconds += stage.seconds
        row = Row(f"{label}, transfer{repeat_note(stage)}", used, seconds, stage.tokens / max(stage.seconds, 1e-9),
                  state, evaluate(student, corpora, vocab, args))
        log.info("%s %d tokens (%.0f s, %.0f tok/s, loss %.3g -> %.3g): %s", target, used, seconds,
                 row.tok_s, stage.first_loss, stage.last_loss, row.scores)
        log.info("%s", mix_summary(student))
        rows.append(row)
    kl_used, lora = 0, lora_projections(student, args.lora_modules)
    kl_from = kl_start(used, args, len(corpora))
    for budget in (int(float(b)) for b in args.distill_curve.split(",") if b):
        stage = _calibrate_rows(student, teacher, kl_train, kl_from + kl_used, budget - kl_used,
                                distill_config(args, budget - kl_used, lora))
        kl_used += stage.tokens
        seconds += stage.seconds
        row = Row(f"{label}, transfer {used:,} + KL {kl_used:,} ({args.distill_train}{'' if args.lora_modules == 'vo' else ' ' + args.lora_modules}, lr {args.distill_lr:g}{kl_schedule_label(args)}{mix_lr_label(args)}{kl_len_label(args)}){repeat_note(stage)}",
                  used + kl_used, seconds, stage.tokens / max(stage.seconds, 1e-9), state,
                  evaluate(student, corpora, vocab, args))
        log.info("%s +%d KL tokens (%.0f s, %.0f tok/s, loss %.3g -> %.3g): %s", target, kl_used, seconds,
                 row.tok_s, stage.first_loss, stage.last_loss, row.scores)
        log.info("%s", mix_summary(student))
        rows.append(row)
    return rows


def window_row(teacher, corpora, vocab: int, args, window: int, label: str) -> Row:
    model = rewrite(copy.deepcopy(teacher), "window", window=window, sinks=4)
    row = Row(f"window={window}, sinks=4 ({label})", state_bytes=state_per_layer(model, args.long_len),
              scores=evaluate(model, corpora, vocab, args))
    log.info("%s: %s", row.model, row.scores)
    return row


def _transfer_words(args) -> str:
    if not any(int(float(b)) > 0 for b in args.curve.split(",") if b):
        return "no attention transfer"
    return (f"attention transfer, all layers in one teacher forward, lr {args.transfer_lr:g} "
            f"({args.transfer_schedule}), SWAX windows "
            f"{args.short_windows or 'off'} on half the steps, closed-form mix init"
            + (f", RoPE shifts < {args.rope_shift}" if args.rope_shift else ""))


def markdown(rows: list[Row], teacher: Row, teacher_tok_s: float, args, machine: str) -> str:
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    keys = list(teacher.scores)
    head = " | ".join(keys)
    lines = [
        f"### SmolLM2-135M hybrids (issue 12), {date}",
        "",
        f"- machine: {machine}; device {args.device}",
        f"- command: `python {shlex.join([sys.argv[0], *sys.argv[1:]])}`",
        f"- calibrated ({_transfer_words(args)}) on general English: Shakespeare and the wiki excerpt interleaved"
        + (f", 1 in {round(1 / args.recall_train_share)} rows replaced by a random {args.train_len // 2}-token "
           f"sequence repeated twice (a recall capability test)" if args.recall_train_share else "")
        + f", batch {train_batch_size(args)} x "
        f"{args.train_len}; "
        f"held out: every {round(1 / args.eval_fraction)}th {args.long_len}-token sequence of each corpus "
        f"({args.eval_batches} x {args.batch_size} x {args.seq_len} and {args.long_batches} x "
        f"{args.long_len} tokens per corpus); recall: NLL (nats/token) on the second copy, "
        f"{args.recall_samples} samples; teacher no-grad forward {teacher_tok_s:.0f} tok/s"
        + (f"; then KL to the teacher's logits (the rows '+ KL', on the next training rows, "
           f"batch {distill_batch_size(args)} x {args.distill_len}, LoRA rank "
           f"{args.lora_rank} on {'/'.join(args.lora_modules)} where trained)" if args.distill_curve else ""),
        "",
        f"| model | calibration tokens | s | tok/s (× teacher fwd) | state/layer @{args.long_len} | {head} |",
        "|---|---:|---:|---:|---:|" + "---:|" * len(keys),
    ]
    for r in [teacher, *rows]:
        cells = []
        for k in keys:
            v = r.scores.get(k)
            ratio = "" if k.startswith("recall") or r is teacher else f" ({v / teacher.scores[k]:.3f}×)"
            cells.append("-" if v is None else f"{v:.2f}{ratio}")
        speed = f"{r.tok_s:.0f} ({r.tok_s / teacher_tok_s:.2f}×)" if r.tok_s else "-"
        lines.append(f"| {r.model} | {r.tokens:,} | {r.seconds:.0f} | {speed} | {r.state_bytes:,} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def hybrid_main(args, results: Path) -> int:
    from quality_smollm2 import machine

    torch.manual_seed(args.seed)
    teacher, tokenizer = load_smollm2()
    teacher.to(args.device).eval()
    vocab = int(teacher.config.vocab_size)
    corpora = {name: load_corpus(name, tokenizer, args) for name in EVAL_CORPORA}
    if any(args.long_len % n for n in (args.train_len, args.seq_len, args.distill_len)):
        raise SystemExit(f"--train-len {args.train_len}, --distill-len {args.distill_len} and --seq-len "
                         f"{args.seq_len} must divide --long-len {args.long_len}")
    train = training_rows(corpora, args.train_len, vocab, args)
    kl_train = train if args.distill_len == args.train_len else training_rows(corpora, args.distill_len, vocab, args)
    teacher_tok_s = teacher_throughput(teacher, mixed_train(corpora, args.seq_len), args)
    teacher_row = Row("teacher", scores=evaluate(teacher, corpora, vocab, args))
    log.info("teacher %s, %.0f tok/s no-grad forward", teacher_row.scores, teacher_tok_s)
    rows = [window_row(teacher, corpora, vocab, args, BASELINE["window"], "baseline")]
    windows_done = {BASELINE["window"]}
    for target in (t for t in args.targets.split(",") if t):
        target_rows_ = target_rows(target, teacher, corpora, train, kl_train, vocab, args)
        rows += target_rows_
        if target != "window":  # a window's own step-0 row is already the window of its state
            from quality_smollm2 import target_options

            options = target_options(args).get(target, {})
            w = equal_memory_window(rewrite(copy.deepcopy(teacher), target, **options), args.long_len)
            if w not in windows_done:
                windows_done.add(w)
                rows.append(window_row(teacher, corpora, vocab, args, w, f"equal memory to {target}"))
        log.info("table so far:\n%s", markdown(rows, teacher_row, teacher_tok_s, args, machine()))
    table = markdown(rows, teacher_row, teacher_tok_s, args, machine())
    print(table)
    if args.write:
        with results.open("a") as f:
            f.write("\n" + table)
    return 0
