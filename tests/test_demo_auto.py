"""The demo's ``auto`` row and its Pareto plot (``python -m swapformer.demo``), on a tiny Llama."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

import swapformer
from swapformer import demo
from swapformer.demo import Row
from swapformer.planner import read_plan

transformers = pytest.importorskip("transformers")

EVAL_LEN = 96  # windows 32 and 64 are candidates, 128 is not


def _tiny_llama() -> torch.nn.Module:
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                      pad_token_id=0, eos_token_id=None)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


class _Tokenizer:
    """What ``demo.sample`` uses of a tokenizer."""

    def __call__(self, text: str, return_tensors: str) -> argparse.Namespace:
        return argparse.Namespace(input_ids=torch.tensor([[5, 6, 7, 8]]))

    def decode(self, ids: torch.Tensor, skip_special_tokens: bool) -> str:
        return " ".join(map(str, ids.tolist()))


def _args(tmp_path: Path, **changes) -> argparse.Namespace:
    args = demo.parse_args(["--eval-len", str(EVAL_LEN), "--seq-len", "32", "--steps", "1", "--sample-tokens", "2",
                            "--out", str(tmp_path), "--auto-budget", "decode@4096=1.5"])
    return argparse.Namespace(**{**vars(args), **changes})


def _rows(n: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 100, (n, length), generator=torch.Generator().manual_seed(seed))


def test_auto_windows_are_shorter_than_the_evaluated_text(tmp_path: Path) -> None:
    options = demo.auto_options(_args(tmp_path), _rows(2, EVAL_LEN, 0))
    windows = [c.window for c in options["candidates"] if c.name == "window"]
    assert windows == [32, 64] and all(w < EVAL_LEN for w in windows)
    assert [c.name for c in options["candidates"]][2:] == ["fastweight", "elita", "cat"]
    assert next(c for c in options["candidates"] if c.name == "cat").chunk_size == 16  # the cat row's options
    assert options["budget"] == "decode@4096=1.5"
    assert [c.window for c in demo.auto_options(_args(tmp_path, eval_len=256), _rows(1, 8, 0))["candidates"]
            if c.name == "window"] == [32, 64, 128]
    with pytest.raises(swapformer.ConfigError, match="no window candidate"):
        demo.auto_options(_args(tmp_path, eval_len=32), _rows(1, 8, 0))


def test_the_auto_row_plans_under_the_budget_and_saves_its_plan(tmp_path: Path) -> None:
    args = _args(tmp_path)
    teacher = _tiny_llama()
    prepared = swapformer.prepare(teacher, kinds=("attention",))
    data = (_Tokenizer(), _rows(24, 32, 1), _rows(4, EVAL_LEN, 2))
    options = demo.auto_options(args, _rows(2, EVAL_LEN, 3))
    row = demo.run_target("auto", prepared, teacher, data, args, {"kv_bytes": 1.0}, options)
    assert not row.error and row.replaced >= 1 and row.replaced + row.skipped == 2
    assert row.flop_speedup >= 1.5  # the budget, in the plot's cost model
    assert row.ppl_after is not None and row.decode_ratio is not None and row.sample
    assert row.plan and sum(int(part.split()[0]) for part in row.plan.split(", ")) == 2
    plan = read_plan(tmp_path / "auto_plan.json")
    assert plan.label == "auto" and len(plan.choices) == 2
    assert "decode@4096 >= 1.5x" in (tmp_path / "auto_plan.txt").read_text()
    uniform = demo.run_target("window", prepared, teacher, data, args, {"kv_bytes": 1.0})
    assert uniform.flop_speedup > row.flop_speedup and not uniform.plan  # every layer replaced, no plan


def test_pareto_front_keeps_the_rows_nothing_beats() -> None:
    rows = [Row("sdpa", flop_speedup=1.0, ppl_after=46.0), Row("auto", flop_speedup=3.0, ppl_after=48.0),
            Row("worker", flop_speedup=2.0, ppl_after=50.0), Row("window", flop_speedup=9.0, ppl_after=55.0),
            Row("cat", flop_speedup=9.0, ppl_after=60.0), Row("broken", error="x")]
    points = demo.pareto_points(rows, 46.0)
    assert [p[0] for p in points] == ["original", "sdpa", "auto", "worker", "window", "cat"]
    assert [p[0] for p in demo.pareto_front(points)] == ["original", "sdpa", "auto", "window"]


def test_the_plot_labels_every_row_and_the_original(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes

    labels = []
    annotate = Axes.annotate
    monkeypatch.setattr(Axes, "annotate", lambda self, text, *a, **k: labels.append(text) or annotate(self, text, *a, **k))
    rows = [Row("window", flop_speedup=9.0, ppl_after=55.0), Row("auto", flop_speedup=3.0, ppl_after=48.0),
            Row("cat", error="failed")]
    assert demo.plot(rows, 46.0, tmp_path / "quality_vs_speed.png")
    assert (tmp_path / "quality_vs_speed.png").stat().st_size > 0
    assert labels == ["original", "window", "auto"]


def test_the_table_has_the_32k_speed_up_and_results_json_the_rows(tmp_path: Path) -> None:
    text = demo.table([Row("auto", replaced=23, skipped=7, ppl_before=48.7, ppl_after=48.7, flop_speedup=3.15)], 46.3)
    assert "decode × @32k (FLOPs)" in text.splitlines()[0]
    assert "| auto | 23 (+7 skipped) | 48.7 | 48.7 |" in text and "| 3.15 |" in text
    assert json.loads(json.dumps(vars(Row("auto", flop_speedup=3.15, plan="1 keep"))))["plan"] == "1 keep"
