"""``generate()`` on the real SmolLM2-135M: the original and each converted model, side by side.

For every model and prompt length T (Shakespeare text), one greedy ``generate()`` call with its
default cache, in a fresh child process (so its peak RSS is its own):

* decode ms/token: time between the first and the last generated token over the steps between them
  (a streamer stamps each token), i.e. what a user waits per token after the prompt;
* cache bytes: what the cache returned by ``generate()`` holds (host K/V for layers that keep them,
  the targets' states for replaced layers);
* RSS growth during ``generate()``: the peak resident memory sampled every 5 ms while it runs, minus
  the resident memory just before (the converted model's original is dropped first).

Ratios are to the original measured in the same run. Usage::

    python benchmarks/generate_cpu.py --quick                 # T = 512, 4 new tokens
    python benchmarks/generate_cpu.py --lengths 2048,8192 --write   # append a table to RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from swapformer.measure.speed import PeakRss, rss_mib

TARGETS = ("window", "fastweight", "elita", "cat", "worker")
RESULTS = Path(__file__).with_name("RESULTS.md")


class _Stamps:
    """A generate() streamer that records when each chunk of tokens arrives (the prompt first)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        return None


def measure(target: str, length: int, new_tokens: int) -> dict:
    """Runs in the child: load, convert, generate once, report."""
    import swapformer
    from swapformer.loading.offline import corpus_tokens, load_smollm2
    from swapformer.rewriter.hf_cache import cache_nbytes

    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    model.eval()
    if target != "original":
        model = swapformer.rewrite(model, target)
        gc.collect()
    text = torch.cat(corpus_tokens("shakespeare", tokenizer))
    ids = text[:length][None]
    stamps, before, sampler = _Stamps(), rss_mib(), PeakRss()
    sampler.start()
    with torch.no_grad():
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             streamer=stamps, return_dict_in_generate=True)
    sampler.running = False
    sampler.join()
    generated = stamps.times[1:]  # the first put is the prompt
    cache = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
    return {
        "target": target, "length": length, "new_tokens": new_tokens,
        "first_token_s": generated[0] - start,
        "decode_ms": 1000 * (generated[-1] - generated[0]) / max(len(generated) - 1, 1),
        "cache_bytes": cache_nbytes(cache),
        "rss_growth_mib": sampler.peak - before,
    }


def _child(target: str, length: int, new_tokens: int) -> dict:
    cmd = [sys.executable, __file__, "--child", target, "--lengths", str(length), "--new-tokens", str(new_tokens)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{target} at T={length} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    base = {r["length"]: r for r in rows if r["target"] == "original"}
    lines = ["| model | T | first token s | decode ms/token | decode speed-up | cache MiB | cache ratio | generate RSS growth MiB | ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        b = base[r["length"]]
        lines.append(
            f"| {r['target']} | {r['length']} | {r['first_token_s']:.1f} | {r['decode_ms']:.0f} | "
            f"{b['decode_ms'] / r['decode_ms']:.2f}× | {r['cache_bytes'] / 2**20:.2f} | "
            f"{r['cache_bytes'] / b['cache_bytes']:.4f} | {r['rss_growth_mib']:.0f} | "
            f"{r['rss_growth_mib'] / b['rss_growth_mib']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="2048,8192")
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--new-tokens", type=int, default=9)
    parser.add_argument("--quick", action="store_true", help="T = 512, 4 new tokens")
    parser.add_argument("--write", action="store_true", help=f"append the table to {RESULTS.name}")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, int(args.lengths), args.new_tokens)))
        return
    lengths = [512] if args.quick else [int(x) for x in args.lengths.split(",")]
    new_tokens = 4 if args.quick else args.new_tokens
    targets = ["original", *[t for t in args.targets.split(",") if t]]
    rows = [_child(t, n, new_tokens) for n in lengths for t in targets]
    text = table(rows)
    print(text)
    if args.write:
        load = os.getloadavg()
        cmd = " ".join(["python", "benchmarks/generate_cpu.py", *sys.argv[1:]])
        header = (f"\n## generate() on SmolLM2-135M: decode, cache and RSS per target\n\n"
                  f"{datetime.date.today()}, {platform.machine()} {os.cpu_count()} cores, torch "
                  f"{torch.__version__}, load average before the run {load[0]:.1f}; command: `{cmd}`. "
                  "Default options of every target; greedy, batch 1, fp32; each row a fresh process.\n\n")
        with RESULTS.open("a") as f:
            f.write(header + text + "\n")


if __name__ == "__main__":
    main()
