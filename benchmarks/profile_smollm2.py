"""Profile SmolLM2-135M converted to each target through its normal HF forward, beside the original.

What it measures, like ``benchmarks/speed_smollm2.py`` does: prefill is ``model(ids, use_cache=True,
logits_to_keep=1)`` (the cores run with a state, through ``SwapformerCache``), then greedy decode
steps with the returned cache. Times are the best of ``--repeat`` runs (prefill) and the mean of the
decode steps after the first; ratio = original / converted (> 1: faster). ``--clock cpu`` reads the
process's CPU time instead of the wall clock: on a shared, loaded machine that is the stable figure
(with ``--threads 1`` it is the work done; with more threads it sums them). With ``--profile`` each
target's prefill and decode are also run under ``torch.profiler`` and the top operators by self CPU
time are printed. Usage::

    python benchmarks/profile_smollm2.py --length 2048 --threads 2
    python benchmarks/profile_smollm2.py --length 2048 --targets window,cat --profile
    python benchmarks/profile_smollm2.py --length 8192 --targets window --steps 3
    python benchmarks/profile_smollm2.py --length 2048 --threads 1 --clock cpu   # loaded machine
    python benchmarks/profile_smollm2.py --cores --length 2048,8192 --threads 1 --clock cpu

``--cores`` times one attention core at SmolLM2-135M's shapes instead of the whole model (no weights
needed): a stateful prefill (``state={}``, as the HF cache calls it) and decode steps of each hybrid
target with its defaults, against the host's causal SDPA on the same ``q, k, v``; ``--loop`` adds
each hybrid's block loop (``tiled_prefill=False``, the reference of the tiled prefill). Best of
``--repeat`` runs; on a shared machine take ``--threads 1 --clock cpu``.
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import torch

# run as a script from any checkout: import that checkout's swapformer, not an installed one
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
CLOCK = time.perf_counter

TARGETS = ("window", "fastweight", "elita", "cat")
HYBRIDS = ("fastweight", "elita", "cat")
# SmolLM2-135M's attention: 9 query heads, 3 kv heads, head dim 64, model width 576
HEADS, KV_HEADS, HEAD_DIM, D_MODEL = 9, 3, 64, 576


def _tokens(tok, length: int) -> torch.Tensor:
    from swapformer.loading.offline import corpus_tokens

    docs = corpus_tokens("shakespeare", tok)
    ids = torch.cat(docs)[:length]
    return ids[None]


@torch.no_grad()
def _prefill(model, ids: torch.Tensor):
    out = model(ids, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1:].argmax(-1), out.past_key_values


@torch.no_grad()
def _decode(model, nxt: torch.Tensor, cache, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        t0 = CLOCK()
        out = model(nxt, past_key_values=cache, use_cache=True)
        times.append(CLOCK() - t0)
        nxt, cache = out.logits[:, -1:].argmax(-1), out.past_key_values
    return times


def measure(model, ids: torch.Tensor, steps: int, repeat: int) -> tuple[float, float]:
    """``(prefill ms, decode ms/token)``: best prefill of ``repeat``, mean decode after the first step."""
    best, cache, nxt = float("inf"), None, None
    for _ in range(repeat):
        t0 = CLOCK()
        nxt, cache = _prefill(model, ids)
        best = min(best, CLOCK() - t0)
    times = _decode(model, nxt, cache, steps)
    decode = sum(times[1:]) / max(1, len(times) - 1) if len(times) > 1 else times[0]
    return 1e3 * best, 1e3 * decode


def profile(model, ids: torch.Tensor, steps: int, rows: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        nxt, cache = _prefill(model, ids)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        _decode(model, nxt, cache, steps)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def _core(name: str):
    from swapformer.targets.cat import CatConfig, HybridCat
    from swapformer.targets.elita import ElitaConfig, HybridElita
    from swapformer.targets.fastweight import FastWeightConfig, HybridFastWeight

    scale = HEAD_DIM**-0.5
    if name == "fastweight":
        return HybridFastWeight(HEADS, KV_HEADS, HEAD_DIM, HEAD_DIM, scale, FastWeightConfig())
    if name == "elita":
        return HybridElita(HEADS, KV_HEADS, HEAD_DIM, HEAD_DIM, D_MODEL, scale, ElitaConfig())
    if name == "cat":
        return HybridCat(HEADS, KV_HEADS, HEAD_DIM, scale, CatConfig())
    raise SystemExit(f"--cores times the hybrids {HYBRIDS}, not {name!r}")


def _best_ms(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = CLOCK()
        fn()
        best = min(best, CLOCK() - t0)
    return 1e3 * best


def _stateful_prefill(core, q, k, v, hidden) -> None:
    core(q, k, v, hidden=hidden, state={})  # a fresh state: a prefill from position 0


def _decode_steps(core, state: dict, step: list[torch.Tensor], hidden: torch.Tensor, steps: int) -> None:
    for _ in range(steps):
        core(*step, hidden=hidden, state=state)


@torch.no_grad()
def time_cores(lengths: list[int], names: list[str], steps: int, repeat: int, loop: bool) -> None:
    """Per-layer prefill ms and decode ms/token of each hybrid core beside the host's causal SDPA."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    cores = {name: _core(name) for name in names}
    print(f"{'T':>6} {'core':<18}{'prefill ms':>12}{'vs sdpa':>9}{'decode ms/tok':>15}")
    for t in lengths:
        q = torch.randn(1, HEADS, t, HEAD_DIM, generator=gen)
        k, v = (torch.randn(1, KV_HEADS, t, HEAD_DIM, generator=gen) for _ in range(2))
        hidden = torch.randn(1, t, D_MODEL, generator=gen)
        sdpa = _best_ms(partial(F.scaled_dot_product_attention, q, k, v, is_causal=True, enable_gqa=True),
                        repeat)
        print(f"{t:>6} {'sdpa (host)':<18}{sdpa:>12.1f}{1.0:>9.2f}{'-':>15}")
        step = [torch.randn(1, h, 1, HEAD_DIM, generator=gen) for h in (HEADS, KV_HEADS, KV_HEADS)]
        step_hidden = torch.randn(1, 1, D_MODEL, generator=gen)
        for name, core in cores.items():
            for tiled in (True, False) if loop else (True,):
                core.tiled_prefill = tiled
                prefill = _best_ms(partial(_stateful_prefill, core, q, k, v, hidden), repeat)
                state: dict = {}
                core(q, k, v, hidden=hidden, state=state)
                per_token = _best_ms(partial(_decode_steps, core, state, step, step_hidden, steps), repeat) / steps
                label = name if tiled else f"{name} (loop)"
                print(f"{t:>6} {label:<18}{prefill:>12.1f}{sdpa / prefill:>9.2f}{per_token:>15.3f}")
            core.tiled_prefill = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", default="2048", help="tokens (--cores: a comma-separated list)")
    parser.add_argument("--cores", action="store_true", help="time the hybrid cores alone (see above)")
    parser.add_argument("--loop", action="store_true", help="--cores: also time the block loop")
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="decode steps (the first is not timed)")
    parser.add_argument("--repeat", type=int, default=1, help="prefill runs, best kept")
    parser.add_argument("--no-original", action="store_true", help="skip the original model")
    parser.add_argument("--profile", action="store_true", help="torch.profiler tables per target")
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    if args.cores:
        lengths = [int(n) for n in args.length.split(",")]
        names = [t for t in args.targets.split(",") if t in HYBRIDS]
        time_cores(lengths, names, max(1, args.steps) * 10, max(2, args.repeat), args.loop)
        return
    args.length = int(args.length)

    import swapformer
    from swapformer.loading.offline import load_smollm2

    model, tok = load_smollm2()
    ids = _tokens(tok, args.length)
    rows = []
    if not args.no_original:
        rows.append(("original", *measure(model, ids, args.steps, args.repeat)))
    for name in [t for t in args.targets.split(",") if t]:
        converted = swapformer.rewrite(model, name)
        rows.append((name, *measure(converted, ids, args.steps, args.repeat)))
        if args.profile:
            print(f"=== {name} T={args.length}")
            profile(converted, ids, args.steps, args.rows)
        del converted
    base = rows[0] if rows and rows[0][0] == "original" else None
    print(f"T={args.length} threads={args.threads} clock={args.clock} torch={torch.__version__}")
    print(f"{'model':<12}{'prefill ms':>12}{'ratio':>8}{'decode ms/tok':>15}{'ratio':>8}")
    for name, pre, dec in rows:
        rp = f"{base[1] / pre:.2f}" if base else "-"
        rd = f"{base[2] / dec:.2f}" if base else "-"
        print(f"{name:<12}{pre:>12.0f}{rp:>8}{dec:>15.1f}{rd:>8}")


if __name__ == "__main__":
    main()
