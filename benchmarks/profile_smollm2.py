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

``--peak`` reports what a prefill's memory peak is made of instead of timing it: the kernel's RSS
high-water mark of the prefill over the RSS before it, beside the peak of the tensors the forward
creates (tracked through a ``TorchDispatchMode``), the largest of those live at that peak, and the
attention masks the attention modules receive. Where the two peaks differ, the rest is memory the
allocator kept (glibc: ``MALLOC_MMAP_THRESHOLD_=131072`` in the environment makes them agree)::

    python benchmarks/profile_smollm2.py --length 8192 --targets window --threads 1 --peak

``--free-attention`` adds a row: the original model with its attention function replaced by one that
costs nothing (it returns the values, repeated over the query heads): the prefill time of the rest of
the model, so ``original / free`` bounds the prefill speed-up any attention replacement can reach on
this machine::

    python benchmarks/profile_smollm2.py --length 8192 --targets window --free-attention

``--cores --targets worker`` times worker attention's CPU forms (SDPA blocks, matmul blocks with the
log-sum-exp, the reference) beside the host's causal SDPA, and a one-row against a two-row ``F.linear``::

    python benchmarks/profile_smollm2.py --cores --targets worker --length 8192 --threads 1

``--cores`` times one attention core at SmolLM2-135M's shapes instead of the whole model (no weights
needed): a stateful prefill (``state={}``, as the HF cache calls it) and decode steps of ``window`` and
each hybrid target with its defaults, against the host's causal SDPA on the same ``q, k, v`` and the
host layer's decode step (cache append + one query's SDPA); ``--loop`` adds each core's reference
paths (``tiled_prefill = fast_decode = False``: the block loop, and decode steps through it). Best of
``--repeat`` runs; on a shared machine take ``--threads 1 --clock cpu``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import time
import weakref
from collections import Counter, defaultdict
from functools import partial
from pathlib import Path

import torch

# run as a script from any checkout: import that checkout's swapformer, not an installed one
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from swapformer.cli.options import parse_target_spec as target_spec  # noqa: E402

CLOCK = time.perf_counter

TARGETS = ("window", "fastweight", "elita", "cat")
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


class LiveTensors:
    """A ``TorchDispatchMode`` (built on first use) counting the storage bytes of the tensors created
    under it that are still alive, with a snapshot ``(op, shape, bytes)`` of them at the peak."""

    def __new__(cls):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        class Mode(TorchDispatchMode):
            def __init__(self) -> None:
                super().__init__()
                self.live: dict[int, list] = {}  # storage address -> [tensors alive, op, shape, bytes]
                self.now = self.peak = self.snapped = 0
                self.snapshot: list[tuple[str, tuple, int]] = []

            def _drop(self, key: int) -> None:
                entry = self.live.get(key)
                if entry is not None:
                    entry[0] -= 1
                    if not entry[0]:
                        self.now -= entry[3]
                        del self.live[key]

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                inputs = {a.untyped_storage().data_ptr() for a in tree_flatten(args)[0]
                          if isinstance(a, torch.Tensor)}
                for t in tree_flatten(out)[0]:
                    if not isinstance(t, torch.Tensor) or not t.untyped_storage().nbytes():
                        continue
                    key = t.untyped_storage().data_ptr()
                    if key in self.live:  # a view of a tracked tensor: it keeps the storage alive
                        self.live[key][0] += 1
                    elif key in inputs:  # in place, or a view of a tensor made before the mode
                        continue
                    else:
                        self.live[key] = [1, str(func), tuple(t.shape), t.untyped_storage().nbytes()]
                        self.now += self.live[key][3]
                    weakref.finalize(t, self._drop, key)
                if self.now > self.peak:
                    self.peak = self.now
                    if self.peak > self.snapped + 2**20:  # a new snapshot per MiB of growth
                        self.snapshot = [(op, shape, nbytes) for _, op, shape, nbytes in self.live.values()]
                        self.snapped = self.peak
                return out

        return Mode()


@torch.no_grad()
def peak(model, ids: torch.Tensor, rows: int) -> None:
    """Print the prefill's kernel RSS peak, its live-tensor peak and what the latter holds."""
    from swapformer.measure.speed import max_rss_mib, reset_max_rss, rss_mib

    masks: Counter = Counter()

    def seen(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        masks["None" if mask is None else f"{tuple(mask.shape)} {mask.dtype}"] += 1

    hooks = [m.register_forward_pre_hook(seen, with_kwargs=True) for m in model.modules()
             if type(m).__name__.endswith("Attention") and hasattr(m, "q_proj")]
    model(ids[:, :64], use_cache=True, logits_to_keep=1)
    masks.clear()
    gc.collect()
    restarted, before, mode = reset_max_rss(), rss_mib(), LiveTensors()
    with mode:
        model(ids, use_cache=True, logits_to_keep=1)
    for hook in hooks:
        hook.remove()
    mark = f"{max_rss_mib() - before:.0f}" if restarted else "- (no /proc/self/clear_refs)"
    print(f"  RSS before {before:.0f} MiB; prefill high-water mark over it {mark} MiB; live tensors "
          f"created by the forward at their peak {mode.peak / 2**20:.0f} MiB")
    print(f"  attention masks: {dict(masks)}")
    groups: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])
    for op, shape, nbytes in mode.snapshot:
        groups[op, shape][0] += 1
        groups[op, shape][1] += nbytes
    for (op, shape), (count, nbytes) in sorted(groups.items(), key=lambda g: -g[1][1])[:rows]:
        print(f"  {nbytes / 2**20:9.1f} MiB {count:4d} x {op} {shape}")


@contextlib.contextmanager
def free_attention(model):
    """The model's attention function replaced by one that returns ``v`` (repeated over the query
    heads of each KV head): everything else of the forward is unchanged."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = model.config._attn_implementation

    def free(module, query, key, value, attention_mask, **kwargs):
        groups = query.shape[1] // value.shape[1]
        out = value[:, :, -query.shape[2]:].repeat_interleave(groups, 1)
        return out.transpose(1, 2).contiguous(), None

    saved = ALL_ATTENTION_FUNCTIONS[name]
    ALL_ATTENTION_FUNCTIONS[name] = free
    try:
        yield
    finally:
        ALL_ATTENTION_FUNCTIONS[name] = saved


def _core(spec: str):
    """The core of ``spec`` (a target with options, ``"window:window=64;cache=64"``) at SmolLM2's shapes."""
    from swapformer.targets.cat import CatConfig, HybridCat
    from swapformer.targets.elita import ElitaConfig, HybridElita
    from swapformer.targets.fastweight import FastWeightConfig, HybridFastWeight

    name, options = target_spec(spec)
    scale = HEAD_DIM**-0.5
    if name == "fastweight":
        return HybridFastWeight(HEADS, KV_HEADS, HEAD_DIM, HEAD_DIM, scale, FastWeightConfig(**options))
    if name == "elita":
        return HybridElita(HEADS, KV_HEADS, HEAD_DIM, HEAD_DIM, D_MODEL, scale, ElitaConfig(**options))
    if name == "cat":
        return HybridCat(HEADS, KV_HEADS, HEAD_DIM, scale, CatConfig(**options))
    if name == "window":
        from swapformer.targets.window import WindowAttention, WindowConfig
        from swapformer.targets.window_cache import CachedWindowAttention

        config = WindowConfig(**options)
        cls = CachedWindowAttention if config.cache else WindowAttention
        return cls(HEADS, KV_HEADS, HEAD_DIM, HEAD_DIM, scale, config)
    raise SystemExit(f"--cores times {TARGETS}, not {name!r}")


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


def _host_decode_steps(k: torch.Tensor, v: torch.Tensor, step: list[torch.Tensor], steps: int) -> None:
    """What the host layer does per decoded token: append to its cache (``DynamicCache`` concatenates)
    and one query's SDPA over every cached key."""
    import torch.nn.functional as F

    q1, k1, v1 = step
    for _ in range(steps):
        k, v = torch.cat([k, k1], dim=2), torch.cat([v, v1], dim=2)
        F.scaled_dot_product_attention(q1, k, v, enable_gqa=True)


@torch.no_grad()
def time_cores(lengths: list[int], names: list[str], steps: int, repeat: int, loop: bool) -> None:
    """Per-layer prefill ms and decode ms/token of each core beside the host's causal SDPA and decode step."""
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
        step = [torch.randn(1, h, 1, HEAD_DIM, generator=gen) for h in (HEADS, KV_HEADS, KV_HEADS)]
        host = _best_ms(partial(_host_decode_steps, k, v, step, steps), repeat) / steps
        print(f"{t:>6} {'sdpa (host)':<18}{sdpa:>12.1f}{1.0:>9.2f}{host:>15.3f}")
        step_hidden = torch.randn(1, 1, D_MODEL, generator=gen)
        for name, core in cores.items():
            for tiled in (True, False) if loop else (True,):
                core.tiled_prefill = core.fast_decode = tiled
                prefill = _best_ms(partial(_stateful_prefill, core, q, k, v, hidden), repeat)
                state: dict = {}
                core(q, k, v, hidden=hidden, state=state)
                per_token = _best_ms(partial(_decode_steps, core, state, step, step_hidden, steps), repeat) / steps
                label = name if tiled else f"{name} (loop)"
                print(f"{t:>6} {label:<18}{prefill:>12.1f}{sdpa / prefill:>9.2f}{per_token:>15.3f}")
            core.tiled_prefill = core.fast_decode = True


@torch.no_grad()
def time_worker_forms(lengths: list[int], repeat: int, interval: int = 4) -> None:
    """Worker attention (interval 4) in each CPU form beside the host's causal SDPA over all rows, and
    the one-row vs two-row projection a worker decode step pays for (``kernels/worker/blocked.py``)."""
    import torch.nn.functional as F

    from swapformer.kernels.worker.blocked import (
        blocked_worker_attention,
        blocked_worker_attention_lse,
    )
    from swapformer.kernels.worker.naive import naive_worker_attention

    gen = torch.Generator().manual_seed(0)
    for t in lengths:
        q = torch.randn(1, t, HEADS, HEAD_DIM, generator=gen)
        k, v = (torch.randn(1, t, KV_HEADS, HEAD_DIM, generator=gen) for _ in range(2))
        idx = torch.arange(interval - 1, t, interval)
        forms = {
            "sdpa (host, all rows)": partial(F.scaled_dot_product_attention, q.transpose(1, 2), k.transpose(1, 2),
                                             v.transpose(1, 2), is_causal=True, enable_gqa=True),
            "worker: SDPA blocks": partial(blocked_worker_attention, q[:, idx], k, v, idx, HEAD_DIM**-0.5),
            "worker: matmul + lse": partial(blocked_worker_attention_lse, q[:, idx], k, v, idx, HEAD_DIM**-0.5),
            "worker: reference": partial(naive_worker_attention, q[:, idx], k, v, idx, HEAD_DIM**-0.5),
        }
        for name, fn in forms.items():
            print(f"{t:>6} {name:<24}{_best_ms(fn, repeat):>10.1f} ms")
    weight = torch.randn(1536, D_MODEL, generator=gen)  # SmolLM2's MLP up projection
    for rows in (1, 2):
        x = torch.randn(rows, D_MODEL, generator=gen)
        ms = _best_ms(lambda x=x: [F.linear(x, weight) for _ in range(100)], repeat) / 100
        print(f"F.linear [{rows}, {D_MODEL}] x [{D_MODEL}, {weight.shape[0]}]: {1e3 * ms:.0f} µs")


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
    parser.add_argument("--peak", action="store_true",
                        help="what each prefill's memory peak is made of, instead of timings (see above)")
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--free-attention", action="store_true",
                        help="add the original with a zero-cost attention (the bound, see above)")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    if args.cores:
        lengths = [int(n) for n in args.length.split(",")]
        names = [t for t in args.targets.split(",") if target_spec(t)[0] in TARGETS]
        if names:
            time_cores(lengths, names, max(1, args.steps) * 10, max(2, args.repeat), args.loop)
        if "worker" in args.targets.split(","):
            time_worker_forms(lengths, max(2, args.repeat))
        return
    args.length = int(args.length)

    import swapformer
    from swapformer.loading.offline import load_smollm2

    model, tok = load_smollm2()
    ids = _tokens(tok, args.length)
    if args.peak:
        names = ([] if args.no_original else ["original"]) + [t for t in args.targets.split(",") if t]
        for name in names:
            print(f"=== {name} T={args.length} (one process: the RSS figures include what earlier rows left)")
            peak(model if name == "original" else swapformer.rewrite(model, name), ids, args.rows)
        return
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
    if args.free_attention:
        with free_attention(model):
            rows.append(("free attn", *measure(model, ids, args.steps, args.repeat)))
    base = rows[0] if rows and rows[0][0] == "original" else None
    print(f"T={args.length} threads={args.threads} clock={args.clock} torch={torch.__version__}")
    print(f"{'model':<12}{'prefill ms':>12}{'ratio':>8}{'decode ms/tok':>15}{'ratio':>8}")
    for name, pre, dec in rows:
        rp = f"{base[1] / pre:.2f}" if base else "-"
        rd = f"{base[2] / dec:.2f}" if base else "-"
        print(f"{name:<12}{pre:>12.0f}{rp:>8}{dec:>15.1f}{rd:>8}")


if __name__ == "__main__":
    main()
