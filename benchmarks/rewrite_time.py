"""Time of ``swapformer.rewrite(smollm2, target)`` against ``torch.export`` of the same model, in one run.

``torch.export`` is given what swapformer's capture gives it (non-strict, every input dim
``Dim.AUTO``, ``use_cache=False``), so the ratio is the price of detection, planning, building the
cores and verification on top of the one capture. Both are timed ``--repeats`` times, interleaved,
and the medians reported. ``--profile`` prints where the rewrite spends its time (cProfile,
cumulative). Usage::

    python benchmarks/rewrite_time.py                  # sdpa, 2 repeats
    python benchmarks/rewrite_time.py --target window --profile
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time

import torch


def export_seconds(model: torch.nn.Module, inputs: dict) -> float:
    from torch.export import Dim

    dims = {name: {d: Dim.AUTO for d in range(t.dim())} for name, t in inputs.items()}
    start = time.perf_counter()
    torch.export.export(model, (), {**inputs, "use_cache": False}, strict=False,
                        dynamic_shapes={**dims, "use_cache": None})
    return time.perf_counter() - start


def rewrite_seconds(model: torch.nn.Module, target: str, profile: bool) -> float:
    import swapformer

    profiler = cProfile.Profile() if profile else None
    start = time.perf_counter()
    if profiler:
        profiler.enable()
    swapformer.rewrite(model, target)
    if profiler:
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats("swapformer", 40)
        print(out.getvalue())
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="sdpa")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    from swapformer.loading.offline import load_smollm2
    from swapformer.rewriter.api import default_example_inputs

    model, _ = load_smollm2()
    model.eval()
    inputs = default_example_inputs(model)  # what rewrite captures with
    exports, rewrites = [], []
    for i in range(args.repeats):
        exports.append(export_seconds(model, inputs))
        rewrites.append(rewrite_seconds(model, args.target, args.profile and i == args.repeats - 1))
    e, r = statistics.median(exports), statistics.median(rewrites)
    print(f"torch.export {e:.1f}s  swapformer.rewrite({args.target!r}) {r:.1f}s  ratio {r / e:.2f}x "
          f"(medians of {args.repeats}: export {exports}, rewrite {rewrites})")


if __name__ == "__main__":
    main()
