"""Detection coverage on the hand-written zoo: swapformer's detector vs Inductor's fuse_attention.

For every zoo case this counts the attention sites the case really has, the sites swapformer finds,
whether the ``"sdpa"`` rewrite is exact, and how many attention patterns Inductor's own pass fuses
into SDPA (``counters["inductor"]["fuse_attention"]`` after ``torch.compile``), side by side.

    python benchmarks/detection.py [--cases NAME ...] [--write]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import swapformer  # noqa: E402
from swapformer.rewriter.capture import normalize_inputs  # noqa: E402
from swapformer.rewriter.verify import first_tensor, relative_diff  # noqa: E402
from tests.models_zoo import ZOO  # noqa: E402


def inductor_fused(model: torch.nn.Module, inputs) -> int:
    """How many attention patterns Inductor's fuse_attention pass rewrote while compiling ``model``."""
    from torch._dynamo.utils import counters
    from torch._inductor import config as inductor_config

    # a cache hit skips Inductor's pattern passes and would count 0 fusions
    inductor_config.force_disable_caches = True
    torch._dynamo.reset()
    counters.clear()
    args, kwargs = normalize_inputs(inputs)
    with torch.no_grad():
        torch.compile(model, backend="inductor")(*args, **kwargs)
    return int(counters["inductor"]["fuse_attention"])


def ours(model: torch.nn.Module, inputs) -> tuple[int, str]:
    sites = [s for s in swapformer.find_sites(model, inputs, kinds=("attention",))]
    if not sites:
        return 0, "-"
    out = swapformer.rewrite(model, "sdpa", example_inputs=inputs, verify=False)
    args, kwargs = normalize_inputs(inputs)
    with torch.no_grad():
        _, rel = relative_diff(first_tensor(model(*args, **kwargs)), first_tensor(out(*args, **kwargs)))
    return len(sites), "yes" if rel <= 1e-5 else f"no ({rel:.1e})"


def through_backend(model: torch.nn.Module, inputs) -> tuple[int, str]:
    """Sites the ``swapformer`` torch.compile backend replaced in Dynamo's graphs, and exactness."""
    torch._dynamo.reset()
    b = swapformer.backend("sdpa", inner="eager")
    args, kwargs = normalize_inputs(inputs)
    with torch.no_grad():
        out = torch.compile(model, backend=b)(*args, **kwargs)
        _, rel = relative_diff(first_tensor(model(*args, **kwargs)), first_tensor(out))
    replaced = sum(len(r.replaced) for r in b.reports)
    return replaced, ("yes" if rel <= 1e-5 else f"no ({rel:.1e})") if replaced else "-"


def run(names: list[str] | None) -> str:
    rows = ["| case | form | attention sites | swapformer found | sdpa exact | backend replaced (exact) | Inductor fused |",
            "| --- | --- | ---: | ---: | --- | --- | ---: |"]
    totals = [0, 0, 0, 0]
    for case in ZOO:
        if names and case.name not in names:
            continue
        torch.manual_seed(0)
        model, inputs = case.make_model().eval(), case.make_inputs()
        expected = len(case.expected_attention)
        found, exact = ours(model, inputs)
        via_backend, backend_exact = through_backend(model, inputs)
        fused = inductor_fused(model, inputs)
        totals = [totals[0] + expected, totals[1] + min(found, expected), totals[2] + min(via_backend, expected),
                  totals[3] + min(fused, expected)]
        rows.append(f"| {case.name} | {case.form} | {expected} | {found} | {exact} | {via_backend} ({backend_exact}) | {fused} |")
    rows.append(f"| **total** | | {totals[0]} | {totals[1]} | | {totals[2]} | {totals[3]} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", help="zoo case names (default: all)")
    parser.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    start = time.time()
    table = run(args.cases)
    header = (f"## Detection: swapformer vs Inductor fuse_attention (hand-written zoo)\n\n"
              f"{datetime.date.today()}, {platform.machine()} CPU ({torch.get_num_threads()} threads), "
              f"torch {torch.__version__}, {time.time() - start:.0f} s. Command: "
              f"`python benchmarks/detection.py{' --cases ' + ' '.join(args.cases) if args.cases else ''}`\n")
    text = f"{header}\n{table}\n"
    print(text)
    if args.write:
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
