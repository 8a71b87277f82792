"""CPU benchmark of the replacement targets against the SDPA original on a SmolLM2-sized stack.

The model is a few pre-norm attention layers of SmolLM2-135M's shape (d_model 576, 9 heads, 3 kv
heads, head dim 64, RoPE): ``x += o_proj(core(rope(q_proj(n(x))), rope(k_proj(n(x))), v_proj(n(x))))``.
Every variant shares the same projection weights; only the core differs. Measured per target:

* prefill: wall time of one forward over T tokens (``state=None``), the fastest of the repeats (the
  least disturbed by other processes), the variants interleaved so that the ratios to SDPA are
  taken side by side;
* peak memory of that prefill: the high-water RSS of a fresh child process above its RSS before the
  forward (CPU has no allocator peak counter);
* decode: median wall time per generated token after a prefill of ``context`` tokens (SDPA: a
  growing KV cache; targets: their own ``state``).

Usage::

    python benchmarks/targets_cpu.py --quick            # T in {512, 2048}, 2 layers, 2 repeats
    python benchmarks/targets_cpu.py --write            # T in {512, 2048, 8192}; append to RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from swapformer.sites import AttentionSite, ProjectionRef
from swapformer.targets.base import core_class, resolve_target

logger = logging.getLogger("targets_cpu")

D_MODEL, HEADS, KV_HEADS, HEAD_DIM = 576, 9, 3, 64

# name -> (registry target, options)
VARIANTS: dict[str, tuple[str, dict]] = {
    "sdpa": ("sdpa", {}),
    "fastweight": ("fastweight", {}),
    "elita": ("elita", {}),
    "cat": ("cat", {"chunk_size": 16}),
    "cat-layer": ("cat", {"mode": "layer", "chunk_size": 16}),
    "window": ("window", {"window": 256, "sinks": 4}),
    "worker": ("worker", {"interval": 4}),
}


def _site() -> AttentionSite:
    ref = lambda name: ProjectionRef(weight=f"{name}.weight")
    return AttentionSite(
        kind="attention", name="attn:0", module="attn", module_type="Bench", num_heads=HEADS,
        num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, value_dim=HEAD_DIM, scale=HEAD_DIM**-0.5,
        causal=True, mask="causal", rope=True, q_proj=ref("q"), k_proj=ref("k"), v_proj=ref("v"),
        o_proj=ref("o"), form="sdpa",
    )


def _rope(x: torch.Tensor, start: int) -> torch.Tensor:
    """Half-split RoPE of ``[B, H, T, D]`` at positions ``start ..``."""
    d, t = x.shape[-1], x.shape[-2]
    inv = 10000.0 ** (-torch.arange(0, d // 2, dtype=torch.float32) * 2 / d)
    ang = torch.arange(start, start + t, dtype=torch.float32)[:, None] * inv
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    return x * cos + torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1) * sin


class Layer(nn.Module):
    """One pre-norm attention layer around a swappable core."""

    def __init__(self, weights: dict[str, torch.Tensor], core: nn.Module) -> None:
        super().__init__()
        self.w = weights
        self.core = core
        self.norm = nn.RMSNorm(D_MODEL)

    def forward(self, x: torch.Tensor, state: dict | None, start: int, cache: dict | None):
        b, t, _ = x.shape
        h = self.norm(x)
        heads = lambda name, n: F.linear(h, self.w[f"{name}.weight"]).view(b, t, n, HEAD_DIM).transpose(1, 2)
        q, k, v = _rope(heads("q", HEADS), start), _rope(heads("k", KV_HEADS), start), heads("v", KV_HEADS)
        if cache is not None:
            # the SDPA original decodes with a growing KV cache
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
            gqa = dict(enable_gqa=True, scale=HEAD_DIM**-0.5)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, **gqa)
        elif state is not None:
            o = self.core(q, k, v, hidden=h, state=state)
        else:
            o = self.core(q, k, v, hidden=h)
        return x + F.linear(o.transpose(1, 2).reshape(b, t, -1), self.w["o.weight"])


class Stack(nn.Module):
    def __init__(self, variant: str, layers: int, seed: int = 0) -> None:
        super().__init__()
        target, options = VARIANTS[variant]
        config = resolve_target(target, **options)
        site = _site()
        g = torch.Generator().manual_seed(seed)
        self.variant = variant
        self.layers = nn.ModuleList()
        for _ in range(layers):
            w = {
                "q.weight": torch.randn(HEADS * HEAD_DIM, D_MODEL, generator=g) / D_MODEL**0.5,
                "k.weight": torch.randn(KV_HEADS * HEAD_DIM, D_MODEL, generator=g) / D_MODEL**0.5,
                "v.weight": torch.randn(KV_HEADS * HEAD_DIM, D_MODEL, generator=g) / D_MODEL**0.5,
                "o.weight": torch.randn(D_MODEL, HEADS * HEAD_DIM, generator=g) / D_MODEL**0.5,
            }
            core = core_class(config, "attention").from_site(site, config, w).float().eval()
            self.layers.append(Layer(w, core))

    def forward(self, x, states=None, start=0):
        sdpa_cache = self.variant == "sdpa" and states is not None
        for i, layer in enumerate(self.layers):
            st = None if states is None else states[i]
            x = layer(x, None if sdpa_cache else st, start, st if sdpa_cache else None)
        return x

    def core_stats(self, context: int) -> tuple[int, int, int]:
        core = self.layers[0].core
        if self.variant == "sdpa":
            return 4 * HEADS * HEAD_DIM * context, context * 2 * KV_HEADS * HEAD_DIM * 4, 0
        params = sum(p.numel() for p in core.parameters())
        return core.flops_per_token(context), core.state_bytes(context), params


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child_peak(variant: str, length: int, layers: int) -> None:
    """Run in a fresh process: print the prefill's RSS high-water mark above the starting RSS."""
    torch.manual_seed(0)
    model = Stack(variant, layers)
    x = torch.randn(1, length, D_MODEL)
    with torch.inference_mode():
        model(x[:, :16])  # load lazy code paths before the baseline is read
        base = _rss_bytes()
        if not _reset_peak():
            logger.warning("cannot reset the RSS high-water mark: peaks include start-up")
        model(x)
    print(json.dumps({"peak": _peak_bytes() - base}))


def _peak_in_child(variant: str, length: int, layers: int) -> float:
    cmd = [sys.executable, __file__, "--child", variant, str(length), str(layers)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak"] / 2**20


def _prefill_times(models: dict[str, Stack], x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Fastest forward per variant (robust to other processes); variants interleaved per repeat."""
    times: dict[str, list[float]] = {v: [] for v in models}
    for model in models.values():
        model(x)  # warm-up
    for _ in range(repeats):
        for v, model in models.items():
            times[v].append(_time(lambda model=model: model(x)))
    return {v: min(t) for v, t in times.items()}


def _decode_time(model: Stack, x: torch.Tensor, layers: int, steps: int) -> float:
    """Seconds per generated token after a prefill of ``x``: the median step (one warm-up step)."""
    states = [{} for _ in range(layers)]
    model(x, states, 0)
    tok = torch.randn(1, 1, D_MODEL)
    pos = x.shape[1]
    model(tok, states, pos)
    times = [_time(lambda i=i: model(tok, states, pos + 1 + i)) for i in range(steps)]
    return statistics.median(times)


def measure(lengths, variants, layers, repeats, decode_steps) -> list[dict]:
    models = {v: Stack(v, layers) for v in variants}
    rows = []
    for length in lengths:
        x = torch.randn(1, length, D_MODEL)
        with torch.inference_mode():
            prefill = _prefill_times(models, x, repeats)
            decode = {v: _decode_time(m, x, layers, decode_steps) for v, m in models.items()}
        for v in variants:
            flops, state, params = models[v].core_stats(length)
            rows.append({
                "variant": v, "T": length, "prefill_s": prefill[v],
                "peak_mb": _peak_in_child(v, length, layers), "decode_s": decode[v],
                "flops": flops, "state": state, "params": params,
            })
            logger.info("%s T=%d done", v, length)
    return rows


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 else "–"


def table(rows: list[dict], command: str, layers: int, load: tuple[float, float]) -> str:
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    machine = (f"{platform.machine()}, {os.cpu_count()} cores ({platform.processor() or 'cpu'}), "
               f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    lines = [
        f"### targets on CPU — {now}", "",
        f"- machine: {machine}",
        f"- command: `{command}`",
        f"- 1-min load average at start / end: {load[0]:.1f} / {load[1]:.1f} (other processes share the "
        "cores: compare ratios, not absolute times, when it exceeds the core count)",
        f"- stack: {layers} layers, d_model {D_MODEL}, {HEADS} heads / {KV_HEADS} kv heads, head dim "
        f"{HEAD_DIM}, batch 1, fp32; kernels: naive PyTorch references (CPU)",
        "- prefill = fastest of the repeated forwards over T tokens; peak = RSS high-water above the pre-forward RSS (child "
        "process); decode = median per token after a T-token prefill; core flops/state per token at context T "
        "(one layer, one sequence)", "",
        "| target | T | prefill ms | ×sdpa | peak MiB | ×sdpa | decode ms/tok | ×sdpa | core MFLOP/tok | "
        "state KiB | new params |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = {r["T"]: r for r in rows if r["variant"] == "sdpa"}
    for r in rows:
        b = base[r["T"]]
        lines.append(
            f"| {r['variant']} | {r['T']} | {r['prefill_s'] * 1e3:.1f} | {_ratio(r['prefill_s'], b['prefill_s'])} "
            f"| {r['peak_mb']:.1f} | {_ratio(r['peak_mb'], b['peak_mb'])} | {r['decode_s'] * 1e3:.2f} "
            f"| {_ratio(r['decode_s'], b['decode_s'])} | {r['flops'] / 1e6:.2f} | {r['state'] / 1024:.1f} "
            f"| {r['params']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T in {512, 2048}, 2 layers, 2 repeats")
    parser.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    parser.add_argument("--child", nargs=3, metavar=("VARIANT", "T", "LAYERS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_peak(args.child[0], int(args.child[1]), int(args.child[2]))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    variants = args.variants.split(",")
    if "sdpa" not in variants:
        variants.insert(0, "sdpa")
    lengths, layers, repeats, steps = ((512, 2048), 2, 2, 9) if args.quick else ((512, 2048, 8192), 4, 3, 17)
    load_start = os.getloadavg()[0]
    rows = measure(lengths, variants, layers, repeats, steps)
    command = "python benchmarks/targets_cpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = table(rows, command.strip(), layers, (load_start, os.getloadavg()[0]))
    sys.stdout.write(text)
    if args.write:
        path = Path(__file__).with_name("RESULTS.md")
        with path.open("a") as f:
            f.write("\n" + text)
        logger.info("appended to %s", path)


if __name__ == "__main__":
    main()
