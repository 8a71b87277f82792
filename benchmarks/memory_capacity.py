"""Can a hybrid's far memory retrieve at all? One layer at a time, trained long on the teacher's inputs.

Issue 12's whole-model runs (≤ 102k tokens) never taught a hybrid's memory to recall past its window
(RESULTS.md, session 11), and they cannot tell a budget that is too small from a memory that cannot
retrieve. This benchmark removes the budget. It captures the teacher's own inputs (q, k, v, hidden) and
attention outputs at a few layers on copy rows (a random ``L``-token sequence repeated twice), trains
each of those layers' new cores alone on them for many steps (teacher-forced: the transfer stage's
per-sequence normalised MSE, closed-form mix init, Adam), and scores held-out copy rows on the second
copy, where the teacher retrieves from ``L`` tokens back. Two training-free cores on the same inputs
bound it: ``window=64, sinks=4`` (the hybrid at mix 0) and the window whose K/V bytes equal the
hybrid's state (equal memory).

The layers are the ``--layers`` whose teacher attention puts the most mass beyond the 64-token window
on the training rows (the copying layers). With ``--varied`` the training copies sit at distances
96-224 and the held-out ones at ``--length``: a memory that fits one fixed offset from positions
(which a fixed ``L`` allows) then no longer passes.

``--whole`` then asks whether what one layer learns this way carries to the model: every layer's core
is trained the same way (many steps over one captured set of rows: ``--text-rows`` of general English,
every other one replaced by a copy row whose copy distance varies, none at the probe's 64 or 256),
and the whole student is evaluated as the hybrid report does
(perplexity on held-out Shakespeare and wiki at 512 and 2,048 tokens, recall at ``L`` = 64 and 256)
beside ``window=64`` and the equal-memory window. With ``--rope-shift N`` each training step sees its
rows as if they started at a random position ``0 .. N − 1`` (``q`` and ``k`` rotated on alike, which
leaves the teacher's attention unchanged): the learned feature maps read post-RoPE ``q, k``, whose
slower rotations a 512-token row covers only in part, so this asks whether the longer contexts'
unseen angles are what a memory trained on short rows trips over. Usage::

    python benchmarks/memory_capacity.py --variants fastweight,cat --steps 600
    python benchmarks/memory_capacity.py --variants 'fastweight,fastweight:hedgehog_dim=256' --length 128
    python benchmarks/memory_capacity.py --whole --variants fastweight --text-rows 48 --steps 300
    python benchmarks/memory_capacity.py --whole --variants fastweight --text-rows 48 --steps 300 --rope-shift 8192
"""

from __future__ import annotations

import argparse
import copy
import datetime
import logging
import shlex
import sys
import time
from pathlib import Path

import torch

from swapformer import rewrite
from swapformer.calibrate.trainer import replacements
from swapformer.calibrate.transfer import (
    TransferHooks,
    _site_loss,
    attention_reference,
    rope_frequencies,
    shift_qk,
)
from swapformer.cli.options import parse_target_spec as parse_variant
from swapformer.loading.offline import load_smollm2
from swapformer.targets.window import WindowAttention, WindowConfig

RESULTS = Path(__file__).with_name("RESULTS.md")
COPY_LENGTHS = [96, 128, 160, 192, 224]  # --varied / --whole training copies: none at 64 or 256
log = logging.getLogger("memory_capacity")


def copy_rows(n: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    """``n`` random ``length``-token sequences (ids ``100 .. vocab − 1``), each repeated twice."""
    x = torch.randint(100, vocab, (n, length), generator=torch.Generator().manual_seed(seed))
    return torch.cat([x, x], dim=1)


def varied_copy_rows(n: int, total: int, lengths: list[int], vocab: int, seed: int) -> torch.Tensor:
    """``n`` rows of ``total`` random ids ending in a random ``L``-token sequence repeated twice, ``L`` drawn
    from ``lengths``: the copy distance varies, so a memory cannot pass by attending to a fixed offset."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(100, vocab, (n, total), generator=g)
    for row, i in zip(rows, torch.randint(len(lengths), (n,), generator=g).tolist()):
        length = lengths[i]
        row[total - length:] = row[total - 2 * length:total - length]
    return rows


@torch.no_grad()
def capture(student, ids: torch.Tensor, batch: int, names: set[str] | None, *, keep_hidden: bool = True,
            keep_target: bool = True) -> dict[str, list]:
    """Per site in ``names`` (None: all), per batch: the core's inputs ``(args, kwargs)`` and the host
    attention's output on them (None without ``keep_target``: recomputed from the inputs), every layer
    fed the teacher's own output (the transfer stage's hooks)."""
    replaced = replacements(student)
    kept = [r for r in replaced if names is None or r.site.name in names]
    refs = {r.site.name: attention_reference(r.site) for r in kept}
    found: dict[str, list] = {name: [] for name in refs}

    def grab(name):
        def hook(module, args, kwargs):
            kw = {k: v for k, v in kwargs.items() if k == "hidden" and keep_hidden}
            found[name].append((args, kw, refs[name](*args, **kwargs) if keep_target else None))
        return hook

    hooks = TransferHooks(student, replaced, None, early_exit=True)
    with hooks:
        handles = [student.get_submodule(r.core_name).register_forward_pre_hook(grab(r.site.name), with_kwargs=True)
                   for r in kept]
        try:
            for i in range(0, ids.shape[0], batch):
                hooks.run(lambda rows=ids[i:i + batch]: student(rows, use_cache=False))
        finally:
            for h in handles:
                h.remove()
    return found


def far_mass(core, samples: list) -> float:
    """The host softmax's mass beyond the core's window over its mass inside it, mean over heads."""
    args, kw, _ = samples[0]
    return float(core._host_far_mass(*args[:3], args[3] if len(args) > 3 else None)[1].mean())


def copy_error(core, samples: list, length: int) -> float:
    """MSE to the host attention on the second copy (queries ``L .. 2L − 1``) over the host output's
    variance across those queries (per head and channel, averaged): 1 is what a constant would score."""
    err = ref_var = 0.0
    with torch.no_grad():
        for args, kw, target in samples:
            out = core(*args, **kw)[:, :, length:]
            want = target[:, :, length:]
            err += float((out - want).square().mean())
            ref_var += float(want.var(dim=(0, 2)).mean())
    return err / ref_var


def train_core(core, train: list, steps: int, lr: float, reference=None, shift=None) -> float:
    """Adam on the core's new parameters over the captured batches, cycled; seconds spent.
    ``reference(q, k, v, bias)`` gives the targets the capture did not keep. ``shift = (N, inv_freq)``
    moves each step's ``q`` and ``k`` by a random ``0 .. N − 1`` positions (``shift_qk``), so a
    map of post-RoPE ``q, k`` sees the angles of positions past the captured rows' length."""
    args, kw, _ = train[0]
    core.init_from_inputs(*args, **kw)
    params = [p for p in core.new_parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for step in range(steps):
        args, kw, target = train[step % len(train)]
        if shift is not None:
            args = shift_qk(args, int(torch.randint(shift[0], (1,), generator=gen)), shift[1])
        if target is None:
            with torch.no_grad():
                target = reference(*args)
        loss = _site_loss(core(*args, **kw), target, normalize=True)  # the transfer stage's loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    return time.perf_counter() - start


def window_core(core, window: int) -> WindowAttention:
    return WindowAttention(core.num_heads, core.num_kv_heads, core.head_dim, core.value_dim, core.scale,
                           WindowConfig(window=window, sinks=4))


def whole_model(teacher, tokenizer, target: str, options: dict, args) -> str:
    """Every layer's core trained alone on one captured set of rows, then the whole student evaluated
    beside ``window=64`` and the equal-memory window; returns the markdown table."""
    from types import SimpleNamespace

    from hybrid_report import EVAL_CORPORA, equal_memory_window, evaluate, load_corpus, mixed_train

    vocab = teacher.config.vocab_size
    ev = SimpleNamespace(seq_len=512, long_len=2048, eval_fraction=0.05, batch_size=4, eval_batches=2,
                         long_batches=2, recall="64,256", recall_samples=2, seed=0)
    corpora = {name: load_corpus(name, tokenizer, ev) for name in EVAL_CORPORA}
    rows = mixed_train(corpora, 2 * args.length)[: args.text_rows].clone()
    copies = rows[::2].shape[0]
    rows[::2] = varied_copy_rows(copies, rows.shape[1], COPY_LENGTHS, vocab, seed=3)
    student = rewrite(copy.deepcopy(teacher), target, **options)
    label = target + "".join(f" {k}={v}" for k, v in options.items())
    results = [("window=64, sinks=4", 0, evaluate(rewrite(copy.deepcopy(teacher), "window", window=64, sinks=4),
                                                  corpora, vocab, ev))]
    w_eq = equal_memory_window(student, ev.long_len)
    results.append((f"window={w_eq}, sinks=4 (equal memory)", 0,
                    evaluate(rewrite(copy.deepcopy(teacher), "window", window=w_eq, sinks=4), corpora, vocab, ev)))
    results.append((f"{label} hybrid, step 0", 0, evaluate(student, corpora, vocab, ev)))
    needs_hidden = any(getattr(m, "needs_hidden", False) for m in student.modules())
    captured = capture(student, rows, args.batch, None, keep_hidden=needs_hidden, keep_target=False)
    shift = (args.rope_shift, rope_frequencies(teacher)) if args.rope_shift else None
    if shift:
        label += f", RoPE shifts < {args.rope_shift}"
    start = time.perf_counter()
    for r in replacements(student):
        core = student.get_submodule(r.core_name)
        train_core(core, captured[r.site.name], args.steps, args.lr, attention_reference(r.site), shift)
        log.info("%s trained (%.0f s so far)", r.site.name, time.perf_counter() - start)
    seconds = time.perf_counter() - start
    results.append((f"{label} hybrid, {args.steps} steps per layer", seconds, evaluate(student, corpora, vocab, ev)))
    keys = list(results[0][2])
    table = ["| model | s | " + " | ".join(keys) + " |", "|---|---:|" + "---:|" * len(keys)]
    table += [f"| {name} | {sec:.0f} | " + " | ".join(f"{sc[k]:.2f}" for k in keys) + " |"
              for name, sec, sc in results]
    return "\n".join(table)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="fastweight,cat",
                   help="comma list of target[:key=value;...] (hybrid defaults)")
    p.add_argument("--length", type=int, default=256, help="L: the copy distance")
    p.add_argument("--train-rows", type=int, default=64)
    p.add_argument("--eval-rows", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--layers", type=int, default=3, help="how many of the most far-attending layers")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--varied", action="store_true",
                   help="train on copy rows whose distance varies (COPY_LENGTHS), held out at --length")
    p.add_argument("--whole", action="store_true", help="train every layer, then evaluate the whole model")
    p.add_argument("--text-rows", type=int, default=48, help="--whole: captured rows (half copy rows)")
    p.add_argument("--rope-shift", type=int, default=0,
                   help="--whole: shift each training step's q, k by a random 0 .. N − 1 positions (see above)")
    p.add_argument("--write", action="store_true", help=f"append the table to {RESULTS.name}")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(0)
    teacher, tokenizer = load_smollm2()
    teacher.eval()
    vocab = teacher.config.vocab_size
    train_ids = (varied_copy_rows(args.train_rows, 2 * args.length, COPY_LENGTHS, vocab, seed=1) if args.varied
                 else copy_rows(args.train_rows, args.length, vocab, seed=1))
    eval_ids = copy_rows(args.eval_rows, args.length, vocab, seed=2)
    variants = [parse_variant(v) for v in args.variants.split(",") if v]
    from hybrid_report import equal_memory_window  # benchmarks/ is on sys.path when run as a script

    if args.whole:
        text = whole_model(teacher, tokenizer, *variants[0], args)
        print(text)
        if args.write:
            _append(f"whole model, every layer trained alone ({variants[0][0]})", args, text)
        return

    first = rewrite(copy.deepcopy(teacher), variants[0][0], **variants[0][1])
    probe = capture(first, train_ids[: args.batch], args.batch, None)
    cores = {r.site.name: first.get_submodule(r.core_name) for r in replacements(first)}
    mass = {name: far_mass(cores[name], s) for name, s in probe.items()}
    layers = sorted(mass, key=mass.get, reverse=True)[: args.layers]
    log.info("far/near mass per layer: %s; chosen %s", {k: round(v, 3) for k, v in mass.items()}, layers)
    del probe
    train = capture(first, train_ids, args.batch, set(layers))
    held = capture(first, eval_ids, args.batch, set(layers))

    rows = []
    for name in layers:
        base = window_core(cores[name], 64)
        rows.append((name, "window=64, sinks=4", "-", 0, 0.0, copy_error(base, held[name], args.length)))
    for target, options in variants:
        student = first if (target, options) == variants[0] else rewrite(copy.deepcopy(teacher), target, **options)
        label = target + "".join(f" {k}={v}" for k, v in options.items())
        w_eq = equal_memory_window(student, 2 * args.length)
        for name in layers:
            core = student.get_submodule(next(r.core_name for r in replacements(student) if r.site.name == name))
            eq = copy_error(window_core(core, w_eq), held[name], args.length)
            rows.append((name, f"window={w_eq}, sinks=4 (equal memory to {label})", "-", 0, 0.0, eq))
            step0 = copy_error(core, held[name], args.length)
            seconds = train_core(core, train[name], args.steps, args.lr)
            trained = copy_error(core, held[name], args.length)
            rows.append((name, f"{label} hybrid", f"{step0:.3f}", args.steps, seconds, trained))
            log.info("%s %s: step 0 %.3f -> %.3f after %d steps (%.0f s); equal-memory window %.3f",
                     name, label, step0, trained, args.steps, seconds, eq)
    table = ["| layer | core | step 0 | steps | s | held-out copy error |", "|---|---|---:|---:|---:|---:|"]
    table += [f"| {n} | {c} | {s0} | {st} | {sec:.0f} | {err:.3f} |" for n, c, s0, st, sec, err in rows]
    text = "\n".join(table)
    print(text)
    if args.write:
        _append("one layer at a time", args, text)


def _append(what: str, args, text: str) -> None:
    head = (f"\n### Far-memory capacity, {what} (issue 12), "
            f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC\n\n"
            f"- command: `python benchmarks/memory_capacity.py {shlex.join(sys.argv[1:])}`\n"
            f"- copy rows: L = {args.length} random tokens repeated twice; error = MSE to the host attention on "
            "the second copy over its variance across those queries (0: exact; 1: a constant)\n\n")
    with RESULTS.open("a") as f:
        f.write(head + text + "\n")


if __name__ == "__main__":
    main()
