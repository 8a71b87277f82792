"""The GPU whole-model benchmark (``benchmarks/speed_gpu.py``), exercised on the CPU with a tiny Llama."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "speed_gpu.py"
sys.path.insert(0, str(SCRIPT.parent))  # it imports speed_smollm2 beside it


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_speed_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


def test_target_options_are_parsed_and_a_bad_one_is_named(bench):
    assert bench.parse_target("fastweight:local_window=0;sinks=4;feature_map=elu1") == (
        "fastweight", {"local_window": 0, "sinks": 4, "feature_map": "elu1"})
    assert bench.parse_target("window") == ("window", {})
    with pytest.raises(ValueError, match="sinks4"):
        bench.parse_target("window:sinks4")


def _args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"dtype": "float32", "reps": 1, "steps": 2, "check_len": 16,
                                 "lengths": [24, 40], **kw})


def test_rows_side_by_side_and_a_failing_target_reported_not_raised(bench):
    cpu, tiny = torch.device("cpu"), dict(bench.TINY, max_position_embeddings=64)
    rows, checks = [], {}
    for spec in ("original", "window:window=8", "no-such-target"):
        got, err, gen = bench.run_model(spec, _args(), tiny, cpu)
        rows += got
        checks[spec] = (err, gen)
    assert [(r.model, r.length) for r in rows][:4] == [("original", 24), ("original", 40),
                                                       ("window:window=8", 24),
                                                       ("window:window=8", 40)]
    assert checks["original"] == (0.0, "ok")  # fp32 against fp32: the same computation
    assert checks["window:window=8"][1] == "ok"
    window = rows[2]
    assert window.prefill_ms > 0 and window.decode_ms > 0 and window.cache_mib > 0
    failed = [r for r in rows if r.model == "no-such-target"]
    assert failed and all("no-such-target" in r.error for r in failed)
    text = bench.table(rows, checks)
    assert "| window:window=8 | 24 |" in text and "failed:" in text
    original_rows = "\n".join(line for line in text.splitlines() if line.startswith("| original |"))
    # the original's own prefill and decode ratios at both lengths; only its rows, since a tiny
    # window's CPU speed-up may round to 1.00× too
    assert original_rows.count("1.00×") == 4
