"""Grammar fuzzing of detection: generated attention and FFN programs through the exact target.

Each program from :func:`swapformer.testing.attention_programs` / :func:`ffn_programs` is rewritten to
``"sdpa"`` at its example length and the result is compared with the original there and at a second,
longer length. Outcomes: ``exact`` (replaced, equal at both lengths), ``refused`` (no site replaced,
reason in the report), ``error`` (a swapformer error was raised: loud), ``silent`` (the rewrite returned
and differs somewhere: the bug this hunts). Exits 1 on any silent mismatch.

    python benchmarks/fuzz_detect.py -n 10000 [--seed 0]
"""

from __future__ import annotations

import argparse
import collections
import logging
import sys
import time
import warnings

import torch
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

import swapformer
from swapformer.errors import SwapformerError
from swapformer.testing import SCORE_MODS, Program, attention_programs, ffn_programs

SECOND_LENGTH_EXTRA = 7  # the grammar draws 3-12 tokens; RoPE tables hold 32


def _longer(program: Program) -> tuple[torch.Tensor, ...]:
    (x,) = program.example_inputs
    gen = torch.Generator().manual_seed(program.choices.seed + 1)
    return (torch.randn(x.shape[0], x.shape[1] + SECOND_LENGTH_EXTRA, x.shape[2], generator=gen),)


def _same(a: torch.nn.Module, b: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> bool:
    with torch.no_grad():
        ref, out = a(*inputs), b(*inputs)
    scale = max(ref.abs().max().item(), 1e-6)
    return out.shape == ref.shape and (out - ref).abs().max().item() <= 1e-5 * scale


def outcome(program: Program) -> str:
    kinds = ("attention",) if "Attention" in type(program.choices).__name__ else ("ffn",)
    try:
        out = swapformer.rewrite(program.module, "sdpa", example_inputs=program.example_inputs, kinds=kinds)
    except SwapformerError:
        return "error"
    if not out.swapformer_report.replaced:
        return "refused"
    same = _same(program.module, out, program.example_inputs) and _same(program.module, out, _longer(program))
    return "exact" if same else "silent"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=10000, help="programs to run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    counts: collections.Counter[str] = collections.Counter()
    silent: list[str] = []
    start = time.perf_counter()

    @seed(args.seed)
    @settings(max_examples=args.n, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(st.one_of(attention_programs(score_mods=SCORE_MODS), ffn_programs()))
    def run(program: Program) -> None:
        result = outcome(program)
        counts[result] += 1
        if result == "silent":
            silent.append(repr(program))
        if sum(counts.values()) % 100 == 0:
            print(f"{sum(counts.values())} programs, {dict(counts)}", flush=True)

    run()
    total = sum(counts.values())
    print(f"programs: {total}  exact: {counts['exact']}  refused: {counts['refused']}  "
          f"error: {counts['error']}  silent mismatch: {counts['silent']}  "
          f"({time.perf_counter() - start:.0f} s)")
    for line in silent[:20]:
        print("silent:", line)
    return 1 if counts["silent"] else 0


if __name__ == "__main__":
    sys.exit(main())
