"""Would a sparse cache of evicted keys buy SmolLM2-135M quality or recall at equal state? (issue 12)

A training-free probe of the lever quality-recipes.md §1.4 names (LoLA: keep the evicted tokens a far
memory recalls worst as exact keys). Before building such a cache into the hybrid cores, this asks what
exact keys beyond the window can give at all: the teacher's own weights run with exact softmax attention
restricted, per kv head, to the sinks, the last ``w`` tokens and ``K`` of the evicted tokens, chosen by
one rule:

- ``recent``: none; the window is ``w + K`` instead (the window of equal state);
- ``heavy``: the ``K`` evicted tokens that received the most attention (summed over the kv head's query
  heads) while inside the window; fixed once a token is evicted, so a decoder can keep it (H2O's
  heavy-hitter rule, scored over the window only);
- ``keynorm``: the ``K`` evicted tokens with the largest key norm;
- ``random``: ``K`` evicted tokens by a seeded random score (the control for any rule);
- ``oracle``: per query head and per query, the ``K`` evicted keys with the highest score for that query.
  Not a cache (it needs every key): the most ``K`` exact keys beyond the window can give.

Dense masks (``[B, Hkv, G, T, T]``), so only for evaluation lengths. Columns as in the hybrid report:
perplexity at ``--long-len`` on held-out Shakespeare and wiki (× teacher), recall NLL (nats/token).

    python benchmarks/sparse_cache_probe.py --caches 64,192 --write
"""

from __future__ import annotations

import argparse
import datetime
import logging
import math
import shlex
import sys
import time
from pathlib import Path

import torch

from swapformer.loading.offline import load_smollm2

log = logging.getLogger("sparse_cache_probe")
RESULTS = Path(__file__).with_name("RESULTS.md")
RULES = ("recent", "heavy", "keynorm", "random", "oracle")
IMPLEMENTATION = "swapformer_sparse_cache_probe"


def token_scores(rule: str, s: torch.Tensor, k: torch.Tensor, near: torch.Tensor, window: int,
                 seed: int) -> torch.Tensor:
    """Per-token cache score ``[B, Hkv, T]`` of a fixed rule (``s`` the scaled scores ``[B, Hkv, G, T, T]``,
    ``near`` the window-and-sinks mask ``[T, T]``, ``k`` the keys ``[B, Hkv, T, D]``)."""
    if rule == "keynorm":
        return k.norm(dim=-1)
    if rule == "random":
        g = torch.Generator().manual_seed(seed)
        return torch.rand(k.shape[:3], generator=g).to(k.device)
    if rule == "heavy":
        t = s.shape[-1]
        i, j = torch.arange(t, device=s.device)[:, None], torch.arange(t, device=s.device)[None, :]
        in_window = (j <= i) & (i - j < window)  # the queries that see token j through the window
        p = s.masked_fill(~near, -math.inf).softmax(-1).nan_to_num(0.0)  # padding rows see nothing
        return (p * in_window).sum(dim=(2, 3))
    raise ValueError(f"unknown cache rule {rule!r}; expected one of {RULES}")


def sparse_cache_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, *,
                           window: int, sinks: int, cache: int, rule: str, seed: int = 0,
                           keep: torch.Tensor | None = None) -> torch.Tensor:
    """Causal softmax attention over the sinks, the last ``window`` tokens and ``cache`` evicted tokens per
    kv head chosen by ``rule`` (see the module docstring); ``q [B, H, T, D]``, ``k, v [B, Hkv, T, D]``,
    ``keep [B, T]`` False for padding keys (never seen, never cached), returns ``[B, H, T, Dv]``.
    ``cache = 0`` is the ``window`` target's attention; ``cache ≥ T`` or ``window ≥ T`` the host's."""
    if rule not in RULES:
        raise ValueError(f"unknown cache rule {rule!r}; expected one of {RULES}")
    if rule == "recent":
        window, cache = window + cache, 0
    b, h, t, d = q.shape
    hk = k.shape[1]
    s = torch.einsum("bkgtd,bksd->bkgts", q.reshape(b, hk, h // hk, t, d), k) * scale
    i, j = torch.arange(t, device=q.device)[:, None], torch.arange(t, device=q.device)[None, :]
    causal = j <= i
    if keep is not None:
        causal = causal & keep[:, None, None, None, :]
    near = causal & ((i - j < window) | (j < sinks))
    keep = near
    if cache:
        far = causal & ~near
        if rule == "oracle":
            score = s.masked_fill(~far, -math.inf)
        else:
            per_token = token_scores(rule, s, k, near, window, seed)
            score = per_token[:, :, None, None, :].masked_fill(~far, -math.inf)
        # rows with fewer than `cache` far keys keep them all: their k-th largest score is −inf
        kth = score.topk(min(cache, t), dim=-1).values[..., -1:]
        keep = near | (far & (score >= kth))
    p = s.masked_fill(~keep, -math.inf).softmax(-1)
    return torch.einsum("bkgts,bksd->bkgtd", p, v).reshape(b, h, t, -1)


class ProbeAttention:
    """transformers' attention-interface function running :func:`sparse_cache_attention` with the
    current row's settings (the evaluation inputs carry no padding, so the mask is the causal one)."""

    def __init__(self) -> None:
        self.window, self.sinks, self.cache, self.rule, self.seed = 64, 4, 0, "recent", 0

    def __call__(self, module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        out = sparse_cache_attention(query.float(), key.float(), value.float(), scaling, window=self.window,
                                     sinks=self.sinks, cache=self.cache, rule=self.rule,
                                     seed=self.seed * 1000 + module.layer_idx)
        return out.to(query.dtype).transpose(1, 2).contiguous(), None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--caches", default="64,192", help="comma-separated cache sizes K per kv head")
    p.add_argument("--rules", default=",".join(RULES))
    p.add_argument("--long-len", type=int, default=2048)
    p.add_argument("--long-batches", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=512, help="the held-out split's packing (as the hybrid report)")
    p.add_argument("--eval-fraction", type=float, default=0.05)
    p.add_argument("--recall", default="64,256,1024")
    p.add_argument("--recall-samples", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write", action="store_true", help=f"append the table to {RESULTS}")
    return p.parse_args(argv)


def markdown(rows: list[tuple[str, int, float, dict]], teacher: dict, args, machine: str) -> str:
    cols = list(teacher)
    head = ["rule", "exact keys per query (sinks + window + cache)", "s", *cols]
    lines = [f"### Sparse-cache probe on SmolLM2-135M (issue 12), {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
             "", f"Machine: {machine}. Command: `python benchmarks/sparse_cache_probe.py {shlex.join(sys.argv[1:])}`", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]

    def cell(col: str, x: float) -> str:
        return f"{x:.2f}" if col.startswith("recall") else f"{x:.2f} ({x / teacher[col]:.3f}×)"

    lines.append("| teacher | all | - | " + " | ".join(f"{teacher[c]:.2f}" for c in cols) + " |")
    for rule, keys, seconds, scores in rows:
        lines.append(f"| {rule} | {keys} | {seconds:.0f} | " + " | ".join(cell(c, scores[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from hybrid_report import EVAL_CORPORA, load_corpus
    from pareto_smollm2 import evaluate  # long-context perplexity and recall, the columns here
    from quality_smollm2 import machine
    from transformers import AttentionInterface

    args = parse_args(argv)
    torch.manual_seed(args.seed)
    model, tokenizer = load_smollm2()
    model.eval()
    vocab = int(model.config.vocab_size)
    corpora = {name: load_corpus(name, tokenizer, args) for name in EVAL_CORPORA}
    teacher = evaluate(model, corpora, vocab, args)
    log.info("teacher %s", teacher)
    probe = ProbeAttention()
    AttentionInterface.register(IMPLEMENTATION, probe)
    model.set_attn_implementation(IMPLEMENTATION)
    probe.window, probe.sinks, probe.seed = args.window, args.sinks, args.seed
    settings = [("window", 0)] + [(rule, int(c)) for c in args.caches.split(",") for rule in args.rules.split(",")]
    rows = []
    for rule, cache in settings:
        probe.rule, probe.cache = ("recent", 0) if rule == "window" else (rule, cache)
        start = time.perf_counter()
        scores = evaluate(model, corpora, vocab, args)
        label = f"`window={args.window}`" if rule == "window" else (
            f"`window={args.window + cache}`" if rule == "recent" else f"{rule}, K={cache}")
        rows.append((label, args.sinks + args.window + cache, time.perf_counter() - start, scores))
        log.info("%s: %s", label, scores)
    table = markdown(rows, teacher, args, machine())
    print(table)
    if args.write:
        with RESULTS.open("a") as f:
            f.write("\n" + table)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    raise SystemExit(main())
