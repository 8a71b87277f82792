"""Correctness and throughput of the swapformer Triton kernels on a CUDA GPU.

    python benchmarks/kernels_gpu.py                  # all ops, T ∈ {1k, 4k, 8k, 16k}, D ∈ {64, 128}
    python benchmarks/kernels_gpu.py --ops cat --write  # append the table to benchmarks/RESULTS.md
    python benchmarks/kernels_gpu.py --dry-run         # CPU, TRITON_INTERPRET=1, tiny shapes

1. Correctness: every op in bf16 / fp16 / fp32 against its PyTorch reference run in float64 on the same
   rounded inputs, outputs and all gradients, as relative RMS errors, beside the reference's own error
   at the kernel's dtype.
2. Speed: forward and forward+backward at a fixed token budget (``B·T = --tokens``) and model width
   (``H·D = --width``), against SDPA (FlashAttention backend where available), fla ``chunk_gla`` /
   ``fused_recurrent_gla`` (when ``fla`` is importable) for the fast-weight op, and compiled
   FlexAttention for CAT.

FLOP conventions (forward; forward+backward counts 3× forward, as FlashAttention does):
softmax ops count ``4·D`` per visible (query, key) pair (causal SDPA: half of ``4·B·H·T²·D``); the
fast-weight op counts its recurrent form, ``6·K·V`` per token and head; ELiTA ``6·V`` per token and
head. GB/s divides the bytes of the inputs and outputs (plus gradients for forward+backward) by the
time: a lower bound on the traffic, meaningful for the memory-bound ops (ELiTA, conv).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger("kernels_gpu")
RESULTS = Path(__file__).with_name("RESULTS.md")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# relative RMS error allowed against the float64 reference on the same rounded inputs
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}

Inputs = dict[str, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Shape:
    B: int
    T: int
    H: int
    D: int

    def __str__(self) -> str:
        return f"B{self.B}-T{self.T}-H{self.H}-D{self.D}"


@dataclasses.dataclass
class OpSpec:
    """One kernel under test: inputs, the kernel, its reference, its cost model and its baselines."""

    name: str
    make: Callable[[Shape, torch.dtype, torch.device], Inputs]
    run: Callable[[Inputs, str], torch.Tensor]
    flops: Callable[[Shape], float]
    baselines: Callable[[Inputs, Shape], dict[str, Callable[[], torch.Tensor]]]
    decode: bool = False
    # a forward-only kernel: checked without gradients, timed forward only
    forward_only: bool = False
    # what the correctness check compares, when more than ``run``'s output (e.g. row statistics)
    check_run: Callable[[Inputs, str], torch.Tensor] | None = None


def _leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().requires_grad_(x.is_floating_point())


# ---------------------------------------------------------------------------------------------
# op specifications


def _fastweight_make(s: Shape, dtype, device) -> Inputs:
    q, k, v = (torch.randn(s.B, s.T, s.H, s.D, device=device) / s.D**0.25 for _ in range(3))
    # gates near 1 as after the uniform gate init; logits kept for the fla baselines
    gk = F.logsigmoid(torch.randn(s.B, s.T, s.H, s.D, device=device) + 3)
    gv = F.logsigmoid(torch.randn(s.B, s.T, s.H, s.D, device=device) + 3)
    return {
        "q": q.to(dtype), "k": k.to(dtype), "v": v.to(dtype),
        "f": gv.exp().to(dtype), "fhat": gk.exp().to(dtype), "gk": gk.to(dtype), "gv": gv.to(dtype),
    }  # fmt: skip


def _fastweight_run(x: Inputs, backend: str) -> torch.Tensor:
    from swapformer.kernels import fastweight_decay

    return fastweight_decay(x["q"], x["k"], x["v"], x["f"], x["fhat"], backend=backend)[0]


def _fastweight_decode_make(s: Shape, dtype, device) -> Inputs:
    x = _fastweight_make(Shape(s.B, 1, s.H, s.D), dtype, device)
    x["state"] = torch.randn(s.B, s.H, s.D, s.D, device=device) * 0.1
    return x


def _fastweight_decode_run(x: Inputs, backend: str) -> torch.Tensor:
    from swapformer.kernels import fastweight_decay_recurrent

    args = (x["q"], x["k"], x["v"], x["f"], x["fhat"])
    return fastweight_decay_recurrent(*args, initial_state=x["state"], backend=backend)[0]


def _fla_baselines(x: Inputs, s: Shape, decode: bool = False) -> dict[str, Callable[[], torch.Tensor]]:
    try:
        from fla.ops.gla import chunk_gla, fused_recurrent_gla
    except Exception:  # fla missing or broken on this machine: no baseline
        return {}
    out = {}
    if not decode:
        out["fla chunk_gla"] = lambda: chunk_gla(x["q"], x["k"], x["v"], x["gk"], scale=1.0)[0]
    out["fla fused_recurrent_gla"] = lambda: fused_recurrent_gla(
        x["q"], x["k"], x["v"], gk=x["gk"], gv=x["gv"], scale=1.0
    )[0]
    return out


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    gqa = q.shape[2] != k.shape[2]
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=gqa
    )
    return o.transpose(1, 2)


def _sdpa_baseline(x: Inputs, s: Shape) -> dict[str, Callable[[], torch.Tensor]]:
    q = x.get("q", x.get("v"))
    if "q" not in x:
        # ELiTA replaces a full attention of the same width
        return {"SDPA causal": lambda: _sdpa(q, q, q)}
    return {"SDPA causal": lambda: _sdpa(x["q"], x.get("k", x["q"]), x.get("v", x["q"]))}


def _elita_make(s: Shape, dtype, device) -> Inputs:
    logits = {n: (4 * torch.randn(s.B, s.T, s.H, device=device)).to(dtype) for n in ("kappa", "delta", "rho")}
    return {**logits, "v": torch.randn(s.B, s.T, s.H, s.D, device=device).to(dtype)}


def _elita_run(x: Inputs, backend: str) -> torch.Tensor:
    from swapformer.kernels import elita_attention

    return elita_attention(x["kappa"], x["delta"], x["rho"], x["v"], backend=backend)[0]


CAT_CHUNK = 16


def _cat_make(s: Shape, dtype, device) -> Inputs:
    N = -(-s.T // CAT_CHUNK)
    mk = lambda *shape: torch.randn(*shape, device=device).to(dtype)
    return {
        "q": mk(s.B, s.T, s.H, s.D), "k": mk(s.B, s.T, s.H, s.D), "v": mk(s.B, s.T, s.H, s.D),
        "kc": mk(s.B, N, s.H, s.D), "vc": mk(s.B, N, s.H, s.D), "sink_k": mk(s.H, s.D), "sink_v": mk(s.H, s.D),
    }  # fmt: skip


def _cat_args(x: Inputs) -> tuple:
    return x["q"], x["k"], x["v"], x["kc"], x["vc"]


def _cat_run(x: Inputs, backend: str) -> torch.Tensor:
    from swapformer.kernels import cat_attention

    scale = x["q"].shape[-1] ** -0.5
    return cat_attention(
        *_cat_args(x), chunk_size=CAT_CHUNK, scale=scale, sink_k=x["sink_k"], sink_v=x["sink_v"], backend=backend
    )


def _cat_flops(s: Shape) -> float:
    t = torch.arange(s.T, dtype=torch.float64)
    visible = (t % CAT_CHUNK + 1) + t // CAT_CHUNK + 1  # own chunk + earlier slots + sink
    return 4.0 * s.B * s.H * s.D * float(visible.sum())


def _cat_baselines(x: Inputs, s: Shape) -> dict[str, Callable[[], torch.Tensor]]:
    from swapformer.kernels.cat import cat_attention_flex, flex_available

    out = _sdpa_baseline(x, s)
    if flex_available():
        scale = s.D**-0.5
        on_gpu = x["q"].is_cuda
        # FlexAttention on CPU refuses inputs that require grad (no CPU backward): forward only there
        y = x if on_gpu else {n: t.detach() for n, t in x.items()}
        out["FlexAttention (compiled)" if on_gpu else "FlexAttention (eager)"] = lambda: cat_attention_flex(
            *_cat_args(y), chunk_size=CAT_CHUNK, scale=scale, sink_k=y["sink_k"], sink_v=y["sink_v"],
            compile=on_gpu,
        )  # fmt: skip
    return out


WORKER_INTERVAL = 4


def _worker_idx(T: int, device) -> torch.Tensor:
    idx = sorted(set(range(WORKER_INTERVAL - 1, T, WORKER_INTERVAL)) | {T - 1})
    return torch.tensor(idx, device=device)


def _worker_make(s: Shape, dtype, device) -> Inputs:
    idx = _worker_idx(s.T, device)
    mk = lambda *shape: torch.randn(*shape, device=device).to(dtype)
    return {"q_w": mk(s.B, len(idx), s.H, s.D), "k": mk(s.B, s.T, s.H, s.D), "v": mk(s.B, s.T, s.H, s.D), "idx": idx}


def _worker_run(x: Inputs, backend: str) -> torch.Tensor:
    from swapformer.kernels import worker_attention

    return worker_attention(x["q_w"], x["k"], x["v"], x["idx"], scale=x["k"].shape[-1] ** -0.5, backend=backend)


def _worker_flops(s: Shape) -> float:
    return 4.0 * s.B * s.H * s.D * float((_worker_idx(s.T, "cpu") + 1).sum())


def _worker_baselines(x: Inputs, s: Shape) -> dict[str, Callable[[], torch.Tensor]]:
    return {"SDPA causal (all rows)": lambda: _sdpa(x["k"], x["k"], x["v"])}


def _conv_make(s: Shape, dtype, device) -> Inputs:
    d = s.H * s.D
    return {
        "x": torch.randn(s.B, s.T, d, device=device).to(dtype),
        "w": torch.randn(d, 3, device=device).to(dtype),
        "b": torch.randn(d, device=device).to(dtype),
        "idx": _worker_idx(s.T, device),
    }


def _conv_run(x: Inputs, backend: str) -> torch.Tensor:
    from swapformer.kernels import causal_dwconv_gather

    u, uw = causal_dwconv_gather(x["x"], x["w"], x["b"], x["idx"], backend=backend)
    return torch.cat([u, uw], 1)


def _conv_baselines(x: Inputs, s: Shape) -> dict[str, Callable[[], torch.Tensor]]:
    def conv1d():
        d = x["x"].shape[-1]
        u = F.conv1d(F.pad(x["x"].transpose(1, 2), (2, 0)), x["w"][:, None, :], x["b"], groups=d).transpose(1, 2)
        return torch.cat([u, u[:, x["idx"]]], 1)

    return {"F.conv1d + gather": conv1d}


WINDOW, WINDOW_SINKS = 512, 4  # the window target's defaults


def _window_make(s: Shape, dtype, device) -> Inputs:
    group = next(g for g in (3, 4, 2, 1) if s.H % g == 0)  # SmolLM2's 3:1 grouping where the width allows
    kv_heads = s.H // group
    mk = lambda *shape: torch.randn(*shape, device=device).to(dtype)
    return {"q": mk(s.B, s.H, s.T, s.D), "k": mk(s.B, kv_heads, s.T, s.D), "v": mk(s.B, kv_heads, s.T, s.D)}


def _window_call(x: Inputs, backend: str):
    from swapformer.kernels.window import window_attention

    return window_attention(x["q"], x["k"], x["v"], window=WINDOW, sinks=WINDOW_SINKS,
                            scale=x["q"].shape[-1] ** -0.5, backend=backend)


def _window_check(x: Inputs, backend: str) -> torch.Tensor:
    # the output and both row statistics the hybrids read (log den: the same scale as c)
    o, c, den = _window_call(x, backend)
    return torch.cat([o.to(c.dtype), c[..., None], den.log()[..., None]], dim=-1)


def _window_flops(s: Shape) -> float:
    i = torch.arange(s.T, dtype=torch.float64)
    visible = torch.clamp(i + 1, max=WINDOW) + torch.clamp(i - WINDOW + 1, min=0, max=WINDOW_SINKS)
    return 4.0 * s.B * s.H * s.D * float(visible.sum())


def _window_baselines(x: Inputs, s: Shape) -> dict[str, Callable[[], torch.Tensor]]:
    q, k, v = x["q"], x["k"], x["v"]
    gqa = q.shape[1] != k.shape[1]
    out = {"SDPA causal (full attention)": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                  enable_gqa=gqa)}
    if q.is_cuda:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def visible(b, h, i, j):
            return (j <= i) & ((i - j < WINDOW) | (j < WINDOW_SINKS))

        mask = create_block_mask(visible, None, None, s.T, s.T, device=q.device)
        flex = torch.compile(flex_attention)
        out["FlexAttention (compiled, same mask)"] = lambda: flex(q, k, v, block_mask=mask, enable_gqa=gqa)
    return out


OPS = {
    "fastweight": OpSpec(
        "fastweight", _fastweight_make, _fastweight_run, lambda s: 6.0 * s.B * s.T * s.H * s.D * s.D,
        lambda x, s: {**_sdpa_baseline(x, s), **_fla_baselines(x, s)},
    ),
    "fastweight-decode": OpSpec(
        "fastweight-decode", _fastweight_decode_make, _fastweight_decode_run,
        lambda s: 6.0 * s.B * s.H * s.D * s.D, lambda x, s: _fla_baselines(x, s, decode=True), decode=True,
    ),
    "elita": OpSpec(
        "elita", _elita_make, _elita_run, lambda s: 6.0 * s.B * s.T * s.H * s.D, _sdpa_baseline
    ),
    "cat": OpSpec("cat", _cat_make, _cat_run, _cat_flops, _cat_baselines),
    "worker": OpSpec("worker", _worker_make, _worker_run, _worker_flops, _worker_baselines),
    "dwconv": OpSpec("dwconv", _conv_make, _conv_run, lambda s: 6.0 * s.B * s.T * s.H * s.D, _conv_baselines),
    "window": OpSpec("window", _window_make, lambda x, b: _window_call(x, b)[0], _window_flops, _window_baselines,
                     forward_only=True, check_run=_window_check),
}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# correctness


def _error_ratio(ref: torch.Tensor, out: torch.Tensor) -> float:
    from swapformer.kernels.testing import error_ratio

    return error_ratio(ref.float(), out.float())


def _fwd_bwd(fn: Callable[[Inputs], torch.Tensor], x: Inputs, grad: torch.Tensor) -> list[torch.Tensor]:
    leaves = {n: _leaf(t) for n, t in x.items()}
    out = fn(leaves)
    out.backward(grad.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves.values() if t.grad is not None]


def _errors(ref: list[torch.Tensor], out: list[torch.Tensor]) -> list[float]:
    return [_error_ratio(r, o) for r, o in zip(ref, out)]


def check(spec: OpSpec, shape: Shape, dtype: torch.dtype, device: torch.device) -> tuple[float, float, bool]:
    """Worst relative RMS error over the output and every gradient against a float64 reference on the
    same rounded inputs, for the kernel and for the PyTorch reference run at the kernel's dtype; the
    kernel is within tolerance when it is within ``TOLERANCE`` or no worse than twice the reference
    (some gradients, ELiTA's dκ, are ill-conditioned at any precision)."""
    x = spec.make(shape, dtype, device)
    x64 = {n: (t.double() if t.is_floating_point() else t) for n, t in x.items()}
    if spec.forward_only:
        return _check_forward(spec, shape, x, x64, dtype)
    probe = spec.run(x64, "naive")
    grad = torch.randn_like(probe)
    ref = _fwd_bwd(lambda t: spec.run(t, "naive"), x64, grad)
    out = _errors(ref, _fwd_bwd(lambda t: spec.run(t, "triton"), x, grad))
    naive = _errors(ref, _fwd_bwd(lambda t: spec.run(t, "naive"), x, grad))
    names = ["out", *(n for n, t in x.items() if t.is_floating_point())]
    log.info("  %s %s kernel: %s", spec.name, shape, ", ".join(f"{n} {e:.1e}" for n, e in zip(names, out)))
    log.info("  %s %s naive:  %s", spec.name, shape, ", ".join(f"{n} {e:.1e}" for n, e in zip(names, naive)))
    worst, worst_naive = max(out), max(naive)
    return worst, worst_naive, worst <= max(TOLERANCE[dtype], 2 * worst_naive)


def _check_forward(spec: OpSpec, shape: Shape, x: Inputs, x64: Inputs, dtype) -> tuple[float, float, bool]:
    run = spec.check_run or spec.run
    with torch.no_grad():
        ref = run(x64, "naive")
        out, naive = _error_ratio(ref, run(x, "triton")), _error_ratio(ref, run(x, "naive"))
    log.info("  %s %s forward: kernel %.1e, naive %.1e", spec.name, shape, out, naive)
    return out, naive, out <= max(TOLERANCE[dtype], 2 * naive)


# ---------------------------------------------------------------------------------------------
# timing


def _timer(dry_run: bool) -> Callable[[Callable[[], object]], float]:
    """Milliseconds per call: ``triton.testing.do_bench`` on GPU, one wall-clock call in a dry run."""
    if dry_run:

        def once(fn):
            t0 = time.perf_counter()
            fn()
            return 1e3 * (time.perf_counter() - t0)

        return once
    from triton.testing import do_bench

    return lambda fn: do_bench(fn, warmup=25, rep=100)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _forward_backward(fn: Callable[[], torch.Tensor], leaves: list[torch.Tensor]) -> Callable[[], None]:
    out = fn()
    grad = torch.randn_like(out)

    def step():
        for t in leaves:
            t.grad = None
        fn().backward(grad)

    return step


@dataclasses.dataclass
class Row:
    op: str
    shape: Shape
    dtype: str
    impl: str
    fwd_ms: float
    fwdbwd_ms: float
    tflops_fwd: float
    tflops_fwdbwd: float
    gbs_fwd: float
    speedup_fwd: float
    speedup_fwdbwd: float


def _no_grad(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    def run():
        with torch.no_grad():
            return fn()

    return run


def _measure(fn, leaves, bench, decode) -> tuple[float, float]:
    # forward alone is timed as inference (no autograd graph), as FlashAttention's benchmarks do
    try:
        fwd = bench(_no_grad(fn))
    except Exception as err:  # a baseline that cannot run at this shape (OOM, unsupported) is skipped
        log.warning("forward failed: %s", err)
        return math.nan, math.nan
    if decode:
        return fwd, math.nan
    try:
        both = bench(_forward_backward(fn, leaves))
    except Exception as err:
        log.warning("forward+backward failed: %s", err)
        both = math.nan
    return fwd, both


def benchmark(spec: OpSpec, shape: Shape, dtype_name: str, device, dry_run: bool) -> list[Row]:
    dtype = DTYPES[dtype_name]
    bench = _timer(dry_run)
    x = {n: _leaf(t) for n, t in spec.make(shape, dtype, device).items()}
    leaves = [t for t in x.values() if t.requires_grad]
    backend = "triton"
    impls = {"swapformer": lambda: spec.run(x, backend), **spec.baselines(x, shape)}
    flops = spec.flops(shape)
    out = spec.run(x, backend)
    io_bytes = _nbytes(leaves) + _nbytes([out])
    forward_only = spec.decode or spec.forward_only
    timings = {name: _measure(fn, leaves, bench, forward_only) for name, fn in impls.items()}
    ours = timings["swapformer"]
    rows = []
    for name, (fwd, both) in timings.items():
        rows.append(
            Row(
                op=spec.name, shape=shape, dtype=dtype_name, impl=name, fwd_ms=fwd, fwdbwd_ms=both,
                tflops_fwd=flops / fwd / 1e9, tflops_fwdbwd=3 * flops / both / 1e9,
                gbs_fwd=io_bytes / fwd / 1e6, speedup_fwd=fwd / ours[0], speedup_fwdbwd=both / ours[1],
            )  # fmt: skip
        )
    return rows


# ---------------------------------------------------------------------------------------------
# report


def _fmt(v: float, digits: int = 3) -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}g}"


def render(rows: list[Row], checks: list[tuple[str, str, str, float, float, bool]], device_name: str, args) -> str:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"## swapformer kernels on {device_name} ({stamp})",
        "",
        f"torch {torch.__version__}, triton {_triton_version()}, python {platform.python_version()}"
        + (", **dry run (CPU interpreter, timings meaningless)**" if args.dry_run else ""),
        "",
        "### Correctness (worst relative RMS error over output and all gradients vs a float64 reference)",
        "",
        "ok: within the tolerance, or within twice the PyTorch reference's own error at the same dtype.",
        "",
        "| op | shape | dtype | kernel max rel. RMS err | reference at this dtype | tolerance | ok |",
        "|---|---|---|---|---|---|---|",
    ]
    for op, shape, dtype, err, naive, ok in checks:
        lines.append(f"| {op} | {shape} | {dtype} | {err:.2e} | {naive:.2e} | {TOLERANCE[DTYPES[dtype]]:.0e} | "
                     f"{'yes' if ok else '**NO**'} |")
    lines += [
        "",
        "### Speed (ratio = time of this implementation / time of swapformer; > 1 means swapformer is faster)",
        "",
        "| op | shape | dtype | implementation | fwd ms | fwd TFLOP/s | fwd GB/s | fwd ratio | fwd+bwd ms | fwd+bwd TFLOP/s | fwd+bwd ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.op} | {r.shape} | {r.dtype} | {r.impl} | {_fmt(r.fwd_ms)} | {_fmt(r.tflops_fwd)} | "
            f"{_fmt(r.gbs_fwd)} | {_fmt(r.speedup_fwd)} | {_fmt(r.fwdbwd_ms)} | {_fmt(r.tflops_fwdbwd)} | "
            f"{_fmt(r.speedup_fwdbwd)} |"
        )
    return "\n".join(lines) + "\n"


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "missing"
    return triton.__version__


# ---------------------------------------------------------------------------------------------
# driver


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", default=",".join(OPS), help=f"comma list from {list(OPS)}")
    p.add_argument("--seqlens", default="1024,4096,8192,16384")
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--dtypes", default="bf16", help="dtypes timed (correctness: --check-dtypes)")
    p.add_argument("--tokens", type=int, default=16384, help="B·T per timed call")
    p.add_argument("--width", type=int, default=2048, help="H·D per timed call")
    p.add_argument("--decode-batch", type=int, default=64, help="batch of the decode (T = 1) op")
    p.add_argument("--skip-check", action="store_true", help="timings only")
    p.add_argument("--skip-timing", action="store_true", help="correctness only")
    p.add_argument("--check-dtypes", default=",".join(DTYPES), help="dtypes of the correctness check")
    p.add_argument("--write", action="store_true", help=f"append the tables to {RESULTS}")
    p.add_argument("--dry-run", action="store_true", help="CPU + TRITON_INTERPRET=1 with tiny shapes")
    return p.parse_args(argv)


def _shapes(args, spec: OpSpec) -> list[Shape]:
    if args.dry_run:
        return [Shape(1, 1 if spec.decode else 37, 2, 16)]
    out = []
    for D in (int(d) for d in args.head_dims.split(",")):
        H = max(1, args.width // D)
        if spec.decode:
            out.append(Shape(args.decode_batch, 1, H, D))
            continue
        for T in (int(t) for t in args.seqlens.split(",")):
            out.append(Shape(max(1, args.tokens // T), T, H, D))
    return out


def _check_shapes(args, spec: OpSpec) -> list[Shape]:
    if args.dry_run:
        return [Shape(1, 1 if spec.decode else 21, 2, 16)]
    T = 1 if spec.decode else 1000  # not a multiple of any block or chunk size
    return [Shape(2, T, 4, D) for D in (int(d) for d in args.head_dims.split(","))]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.dry_run:
        # must precede the first (lazy) import of a kernels triton module
        os.environ["TRITON_INTERPRET"] = "1"
        device, device_name = torch.device("cpu"), f"CPU ({platform.processor() or platform.machine()})"
        check_dtypes, time_dtypes = ["fp32"], ["fp32"]
    else:
        if not torch.cuda.is_available():
            log.error("no CUDA device; use --dry-run to exercise the script on CPU")
            return 2
        device, device_name = torch.device("cuda"), torch.cuda.get_device_name()
        check_dtypes, time_dtypes = args.check_dtypes.split(","), args.dtypes.split(",")
    torch.manual_seed(0)
    specs = [OPS[name] for name in args.ops.split(",")]
    checks = []
    if not args.skip_check:
        for spec in specs:
            for shape in _check_shapes(args, spec):
                for dt in check_dtypes:
                    err, naive, ok = check(spec, shape, DTYPES[dt], device)
                    log.info("check %-18s %-22s %s: %.2e (naive %.2e) %s", spec.name, shape, dt, err, naive,
                             "ok" if ok else "FAIL")
                    checks.append((spec.name, str(shape), dt, err, naive, ok))
    rows = []
    try:
        for spec in [] if args.skip_timing else specs:
            for shape in _shapes(args, spec):
                for dt in time_dtypes:
                    rows += benchmark(spec, shape, dt, device, args.dry_run)
                    log.info("timed %s %s %s", spec.name, shape, dt)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    except KeyboardInterrupt:  # `timeout -s INT`: report what was timed so far
        log.warning("interrupted: the speed table holds the rows timed before")
    report = render(rows, checks, device_name, args)
    sys.stdout.write(report)
    if args.write:
        with RESULTS.open("a") as fh:
            fh.write("\n" + report)
        log.info("appended to %s", RESULTS)
    return 0 if all(c[-1] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
