"""Whole-model speed on the real SmolLM2-135M: the original and each converted model, side by side.

For every model and context length T, in a fresh child process (so its peak RSS is its own), through
the model's normal Hugging Face forward, exactly as ``generate()`` calls it:

* prefill: one ``model(ids[:, :T], use_cache=True, logits_to_keep=1)`` call on Shakespeare text
  (after a 64-token warm-up call), wall seconds; with ``--prefill-chunk N``, ``ceil(T / N)`` calls
  ``model(ids[:, i:i + N], use_cache=True, logits_to_keep=1, cache=cache)`` with the cache carried
  between them (what ``generate(..., prefill_chunk_size=N)`` does), the wall seconds of them all: the
  activations then span one chunk, not T tokens, for every row alike; with ``--prefill-repeat R``
  the prefill runs R times in the child (each from an empty cache) and the fastest counts: the first
  large call of a fresh process also pays for the memory it touches first;
* decode: ``--steps`` greedy steps ``model(next_token, past_key_values=cache)`` after that prefill;
  the median ms/token;
* peak RSS: the largest resident memory of the child sampled every 5 ms during prefill + decode (the
  model's weights included; the converted model's original is dropped before), and the bytes the
  returned cache holds (host K/V for unreplaced layers, the targets' states for replaced ones);
* max RSS: the kernel's own high-water mark of the same stretch (``ru_maxrss``, restarted before the
  prefill through ``/proc/self/clear_refs``: exact, where the sampler can miss a short peak), and
  ``load_max_rss_mib``, the mark before that restart (loading, converting with the original still
  alive, the warm-up), which a process without the restart would report instead.

With ``--synthetic-above N`` the ORIGINAL model skips prefill for T > N and decodes from a
``DynamicCache`` filled with random keys/values of the right size (decode time and memory do not depend
on the values); its prefill cell then says "-" and the table says so. Converted models always prefill.

Ratios are original / converted (> 1 means faster or smaller), measured in the same run. Usage::

    python benchmarks/speed_smollm2.py --quick                      # T = 1024, 4 decode steps
    python benchmarks/speed_smollm2.py --lengths 2048,8192 --write  # append a table to RESULTS.md
    python benchmarks/speed_smollm2.py --lengths 32768 --targets window,fastweight --synthetic-above 8192
    python benchmarks/speed_smollm2.py --lengths 32768 --targets window,fastweight --prefill-chunk 2048
    python benchmarks/speed_smollm2.py --lengths 2048 --targets worker,worker+ffn  # FFN sites converted too
    python benchmarks/speed_smollm2.py --lengths 2048 --targets 'fastweight,fastweight:update=sum;decay_half_life=0'
    python benchmarks/speed_smollm2.py --lengths 32768 --targets '' --plan auto3x=pareto_plan_3x.json \
        --synthetic-above 8192                                      # a saved per-layer plan

``--plan NAME=PATH`` (repeatable, or a comma list) adds a row ``NAME`` whose model is the freshly loaded
SmolLM2 rewritten by the plan saved at ``PATH``: a plan file (``swapformer.planner.save_plan``, e.g.
``pareto_smollm2.py``'s ``pareto_plan_3x.json``) is applied by ``swapformer.rewrite(model, plan)``; a
directory written by ``swapformer.save`` (or its ``swapformer.json``) is replayed by ``swapformer.load``,
its trained weights included. No training is needed for speed: a core's step costs the same whatever
its weights.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from swapformer.cli.options import parse_target_spec as target_spec
from swapformer.measure.speed import (
    PeakRss,
    max_rss_mib,
    release_freed_memory,
    reset_max_rss,
    rss_mib,
)
from swapformer.planner.timing import random_dynamic_cache

TARGETS = ("window", "fastweight", "elita", "cat", "worker")
RESULTS = Path(__file__).with_name("RESULTS.md")
WARMUP_TOKENS = 64


def _text_ids(tokenizer, length: int) -> torch.Tensor:
    """``[1, length]`` Shakespeare token ids (the corpus repeated if it is shorter)."""
    from swapformer.loading.offline import corpus_tokens

    text = torch.cat(corpus_tokens("shakespeare", tokenizer))
    reps = -(-length // text.numel())
    return text.repeat(reps)[:length][None]


def cache_keyword(model) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` in 5.2x; pass it by the model's own name."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def prefill(model, ids: torch.Tensor, chunk: int = 0) -> tuple[Any, torch.Tensor]:
    """``(cache, last logits [1, 1, vocab])`` after the prompt ``ids``: one call (``chunk`` 0), or calls of
    ``chunk`` tokens each, the cache of one passed to the next (``generate``'s ``prefill_chunk_size``)."""
    keyword, cache, out = cache_keyword(model), None, None
    for start in range(0, ids.shape[1], chunk or ids.shape[1]):
        piece = ids[:, start:start + chunk] if chunk else ids
        carried = {} if cache is None else {keyword: cache}
        out = model(piece, use_cache=True, logits_to_keep=1, **carried)
        cache = getattr(out, "cache", None) or out.past_key_values
    return cache, out.logits[:, -1:]


def _decode(model, cache, first: torch.Tensor, steps: int) -> list[float]:
    """Greedy steps from ``first`` ``[1, 1]``; the wall time of each step in ms."""
    times, token, keyword = [], first, cache_keyword(model)
    for _ in range(steps):
        start = time.perf_counter()
        out = model(token, use_cache=True, **{keyword: cache})
        times.append(1000 * (time.perf_counter() - start))
        token = out.logits[:, -1:].argmax(-1)
    return times


def _load_smollm2() -> tuple[torch.nn.Module, Any]:
    from swapformer.loading.offline import load_smollm2

    return load_smollm2()


def build_model(target: str, plan: Path | None = None,
                load: Callable[[], tuple[torch.nn.Module, Any]] | None = None) -> tuple[torch.nn.Module, Any]:
    """``(model, tokenizer)`` of one row, as the child measures it: ``load()`` afresh (default: SmolLM2),
    then rewritten to ``target`` ("original": as loaded; "NAME+ffn": its attention and FFN sites), or,
    with ``plan``, rewritten by the saved plan (a plan file: ``rewrite(model, plan)``; a
    ``swapformer.save`` directory: ``swapformer.load``)."""
    import swapformer
    from swapformer.planner import read_plan

    torch.manual_seed(0)
    model, tokenizer = (load or _load_smollm2)()
    model.eval()
    if plan is not None:
        saved = Path(plan)
        recipe = saved.is_dir() or saved.name == "swapformer.json"
        model = swapformer.load(saved, model) if recipe else swapformer.rewrite(model, read_plan(saved))
    elif target.endswith("+ffn"):  # the FFN sites too (the worker target's sparse FFN)
        model = swapformer.rewrite(model, target.removesuffix("+ffn"), kinds=("attention", "ffn"))
    elif target != "original":
        name, options = target_spec(target)
        model = swapformer.rewrite(model, name, **options)
    gc.collect()  # the original's weights go before anything is measured
    return model.eval(), tokenizer


def measure(target: str, length: int, steps: int, synthetic_above: int, plan: Path | None = None,
            prefill_chunk: int = 0, prefill_repeat: int = 1) -> dict:
    """Runs in the child: load, convert, prefill (in one call, or in calls of ``prefill_chunk`` tokens),
    decode ``steps`` tokens, report."""
    from swapformer.rewriter.hf_cache import cache_nbytes

    model, tokenizer = build_model(target, plan)
    ids = _text_ids(tokenizer, length)
    synthetic = target == "original" and synthetic_above and length > synthetic_above
    with torch.no_grad():
        model(ids[:, :WARMUP_TOKENS], use_cache=True, logits_to_keep=1)
        gc.collect()
        release_freed_memory()  # every row starts from its live memory, not what loading/rewriting left
        load_max_rss = max_rss_mib()
        restarted = reset_max_rss()
        before, sampler = rss_mib(), PeakRss()
        sampler.start()
        prefill_s, prefill_all = None, []
        if synthetic:
            cache = random_dynamic_cache(model, length)
            first = ids[:, -1:]
        else:
            for _ in range(prefill_repeat):
                cache = last = None  # the previous call's cache goes before the next is built
                start = time.perf_counter()
                cache, last = prefill(model, ids, prefill_chunk)
                prefill_all.append(time.perf_counter() - start)
            prefill_s = min(prefill_all)
            first = last.argmax(-1)
        step_ms = _decode(model, cache, first, steps)
    sampler.running = False
    sampler.join()
    return {
        "target": target, "length": length, "steps": steps, "prefill_s": prefill_s,
        "prefill_chunk": prefill_chunk, "prefill_s_all": [round(t, 2) for t in prefill_all],
        "decode_ms": statistics.median(step_ms), "decode_ms_all": [round(t, 1) for t in step_ms],
        "cache_bytes": cache_nbytes(cache), "peak_rss_mib": sampler.peak, "rss_before_mib": before,
        # None where the mark could not be restarted: it would count the loading too
        "max_rss_mib": max_rss_mib() if restarted else None, "load_max_rss_mib": load_max_rss,
    }


def _child(target: str, length: int, steps: int, synthetic_above: int, plan: Path | None = None,
           prefill_chunk: int = 0, prefill_repeat: int = 1) -> dict:
    cmd = [sys.executable, __file__, "--child", target, "--lengths", str(length), "--steps", str(steps),
           "--synthetic-above", str(synthetic_above), "--prefill-chunk", str(prefill_chunk),
           "--prefill-repeat", str(prefill_repeat),
           *(["--child-plan", str(plan)] if plan else [])]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{target} at T={length} failed:\n{done.stderr[-3000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(row), file=sys.stderr, flush=True)  # progress: one line per finished child
    return row


def _ratio(base: float | None, value: float | None) -> str:
    return "-" if base is None or value is None else f"{base / value:.2f}×"


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _prefill_label(chunk: int) -> str:
    return f"prefill s (chunks of {chunk})" if chunk else "prefill s"


def table(rows: list[dict], prefill_chunk: int = 0) -> str:
    base = {r["length"]: r for r in rows if r["target"] == "original"}
    lines = [f"| model | T | {_prefill_label(prefill_chunk)} | prefill speed-up | decode ms/token | "
             "decode speed-up | cache MiB | peak RSS MiB | RSS ratio | max RSS MiB | max RSS ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        b = base.get(r["length"], {})
        prefill = "-" if r["prefill_s"] is None else f"{r['prefill_s']:.2f}"
        lines.append(
            f"| {r['target']} | {r['length']} | {prefill} | {_ratio(b.get('prefill_s'), r['prefill_s'])} | "
            f"{r['decode_ms']:.1f} | {_ratio(b.get('decode_ms'), r['decode_ms'])} | "
            f"{r['cache_bytes'] / 2**20:.1f} | {r['peak_rss_mib']:.0f} | "
            f"{_ratio(b.get('peak_rss_mib'), r['peak_rss_mib'])} | {_mib(r.get('max_rss_mib'))} | "
            f"{_ratio(b.get('max_rss_mib'), r.get('max_rss_mib'))} |")
    return "\n".join(lines)


def flatness(rows: list[dict]) -> str:
    """Per model: decode ms/token at each length over the shortest length's (fixed state ⇒ ≈ 1)."""
    lines = []
    for target in dict.fromkeys(r["target"] for r in rows):
        mine = sorted((r["length"], r["decode_ms"]) for r in rows if r["target"] == target)
        if len(mine) > 1:
            parts = ", ".join(f"{n}: {ms / mine[0][1]:.2f}" for n, ms in mine)
            lines.append(f"- {target}: decode ms/token relative to T={mine[0][0]} — {parts}")
    return "\n".join(lines)


def _prefill_words(chunk: int) -> str:
    if not chunk:
        return "prefill = one `model(ids, use_cache=True, logits_to_keep=1)` on Shakespeare text"
    return (f"prefill = chunks of {chunk} tokens, `model(ids[:, i:i+{chunk}], use_cache=True, "
            "logits_to_keep=1, cache=cache)` with the cache carried (as `generate(..., "
            f"prefill_chunk_size={chunk})`), on Shakespeare text, the time of all chunks")


def _header(args_line: str, load_start: float, load_end: float, synthetic_above: int,
            plans: dict[str, Path] | None = None, prefill_chunk: int = 0) -> str:
    cpu = platform.processor() or platform.machine()
    note = (f" The original's rows above T={synthetic_above} decode from a synthetic cache of the right "
            "size (random values) and have no prefill." if synthetic_above else "")
    return (f"\n### Whole-model speed, SmolLM2-135M, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC\n\n"
            f"- machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; 1-min load average at start / end {load_start:.1f} / "
            f"{load_end:.1f}\n"
            f"- command: `python benchmarks/speed_smollm2.py {args_line}`\n"
            f"- each row a fresh process: {_prefill_words(prefill_chunk)}; decode = median of the greedy "
            "steps after it; peak RSS = whole process (weights included) during prefill + decode, "
            "sampled every 5 ms; max RSS = the kernel's high-water mark (ru_maxrss) of the same stretch, "
            "after the heap's freed pages went back to the OS (glibc malloc_trim, every row); default "
            "options of every target, batch 1, "
            f"fp32.{note}\n"
            + "".join(f"- row {name}: the plan saved in `{path.name}`\n" for name, path in (plans or {}).items())
            + "\n")


def parse_plans(values: list[str], taken: list[str]) -> dict[str, Path]:
    """``--plan`` values (each ``NAME=PATH`` or a comma list of them) → ``{name: path}``, every file
    read once here so that a bad one fails before any child runs.

    Raises:
        ValueError: a value that is not ``NAME=PATH``, a name used twice or by a target (``taken``),
            or a path that holds no readable plan (the reader's message says why).
    """
    from swapformer.errors import SwapformerError
    from swapformer.planner import read_plan

    plans: dict[str, Path] = {}
    for item in (x.strip() for value in values for x in value.split(",")):
        if not item:
            continue
        name, sep, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise ValueError(f"--plan takes NAME=PATH (e.g. auto3x=pareto_plan_3x.json), got {item!r}")
        if name in plans or name in taken:
            raise ValueError(f"--plan name {name!r} is already a row ({', '.join([*taken, *plans])}): "
                             "give each plan its own name")
        try:
            read_plan(path)
        except (SwapformerError, ValueError) as e:
            raise ValueError(f"--plan {name}={path}: {e}") from e
        plans[name] = Path(path).resolve()
    return plans


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="2048,8192")
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--plan", action="append", default=[], metavar="NAME=PATH",
                        help="a row NAME: SmolLM2 rewritten by the plan saved at PATH (a plan JSON or a "
                             "swapformer.save directory); repeatable or a comma list")
    parser.add_argument("--steps", type=int, default=8, help="greedy decode steps after the prefill")
    parser.add_argument("--synthetic-above", type=int, default=0,
                        help="the original decodes from a synthetic cache (no prefill) for T above this")
    parser.add_argument("--prefill-chunk", type=int, default=0, metavar="N",
                        help="prefill in calls of N tokens, the cache carried (0: one call)")
    parser.add_argument("--prefill-repeat", type=int, default=1, metavar="R",
                        help="prefill R times per row (each from an empty cache), the fastest counts")
    parser.add_argument("--quick", action="store_true", help="T = 1024, 4 decode steps")
    parser.add_argument("--write", action="store_true", help=f"append the table to {RESULTS.name}")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-plan", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        row = measure(args.child, int(args.lengths), args.steps, args.synthetic_above, args.child_plan,
                      args.prefill_chunk, args.prefill_repeat)
        print(json.dumps(row))
        return
    lengths = [1024] if args.quick else [int(x) for x in args.lengths.split(",")]
    steps = 4 if args.quick else args.steps
    targets = ["original", *[t for t in args.targets.split(",") if t]]
    try:
        plans = parse_plans(args.plan, targets)
    except ValueError as e:
        parser.error(str(e))
    if args.prefill_repeat < 1:
        parser.error(f"--prefill-repeat takes a count >= 1, got {args.prefill_repeat}")
    if args.prefill_chunk < 0:
        parser.error(f"--prefill-chunk takes a token count >= 0 (0: one call), got {args.prefill_chunk}")
    load_start = os.getloadavg()[0]
    rows = [_child(t, n, steps, args.synthetic_above, plans.get(t), args.prefill_chunk, args.prefill_repeat)
            for n in lengths for t in [*targets, *plans]]
    text = table(rows, args.prefill_chunk) + "\n\n" + flatness(rows)
    print(text)
    if args.write:
        header = _header(" ".join(sys.argv[1:]), load_start, os.getloadavg()[0], args.synthetic_above, plans,
                         args.prefill_chunk)
        with RESULTS.open("a") as f:
            f.write(header + text + "\n")


if __name__ == "__main__":
    main()
