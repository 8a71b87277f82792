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
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

# run as a script from any checkout: import that checkout's swapformer, not an installed one
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
CLOCK = time.perf_counter

TARGETS = ("window", "fastweight", "elita", "cat")


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=2048)
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
