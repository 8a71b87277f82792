"""Saved plans in the whole-model speed benchmark (``benchmarks/speed_smollm2.py --plan NAME=PATH``) and
the plan files ``benchmarks/pareto_smollm2.py`` writes, on a tiny Llama instead of SmolLM2."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import swapformer
from swapformer import InputError, Plan
from swapformer.planner import read_plan, save_plan
from swapformer.targets.base import resolve_target

transformers = pytest.importorskip("transformers")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
LOCAL, FAR = "model.layers.0.self_attn", "model.layers.1.self_attn"
PLAN = Plan.of({LOCAL: resolve_target("window", window=8), FAR: None}, label="auto", summary="by hand")


def _script(name: str):
    """A benchmark script as a module (registered, as dataclasses need, under a name of its own)."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def speed():
    return _script("speed_smollm2")


def _tiny_llama() -> torch.nn.Module:
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                      pad_token_id=0, eos_token_id=None)
    torch.manual_seed(0)  # the same weights at every call: the "freshly loaded" model
    return transformers.LlamaForCausalLM(config).eval()


def _load():
    return _tiny_llama(), None


def _ids() -> torch.Tensor:
    return torch.randint(3, 100, (1, 40), generator=torch.Generator().manual_seed(1))


def _decisions(model) -> dict[str, str]:
    report = model.swapformer_report
    out = {r.site.module: r.core_type for r in report.replaced}
    out.update({s.site.module: s.reason for s in report.skipped})
    return out


def test_a_saved_plan_round_trips_into_the_benchmark_model(speed, tmp_path: Path) -> None:
    path = save_plan(PLAN, tmp_path / "plan.json", {"budget": "decode@4096=1.5"})
    assert read_plan(path) == PLAN
    built, tokenizer = speed.build_model("auto", path, load=_load)
    assert tokenizer is None and built.swapformer_report.plan == PLAN
    assert _decisions(built) == {LOCAL: "WindowAttention", FAR: "kept by the plan"}
    direct = swapformer.rewrite(_tiny_llama(), PLAN)
    with torch.no_grad():
        torch.testing.assert_close(built(_ids()).logits, direct(_ids()).logits)


def test_a_saved_model_directory_is_replayed_with_its_weights(speed, tmp_path: Path) -> None:
    plan = Plan.of({LOCAL: resolve_target("window", window=8), FAR: "fastweight"})
    student = swapformer.rewrite(_tiny_llama(), plan)
    with torch.no_grad():
        student.get_submodule(f"{FAR}.swapformer_core").mix_logit.add_(0.5)  # a trained value
    swapformer.save(student, tmp_path)
    for where in (tmp_path, tmp_path / "swapformer.json"):
        built, _ = speed.build_model("saved", where, load=_load)
        with torch.no_grad():
            torch.testing.assert_close(built(_ids()).logits, student(_ids()).logits)


def test_original_and_uniform_rows_are_unchanged(speed) -> None:
    original, _ = speed.build_model("original", load=_load)
    assert not hasattr(original, "swapformer_report")
    window, _ = speed.build_model("window", load=_load)
    assert set(_decisions(window).values()) == {"WindowAttention"}


def test_a_row_takes_target_options(speed) -> None:
    assert speed.target_spec("fastweight:update=sum;decay_half_life=0") == (
        "fastweight", {"update": "sum", "decay_half_life": 0})
    window, _ = speed.build_model("window:window=8;sinks=0", load=_load)
    cores = [window.get_submodule(r.core_name) for r in window.swapformer_report.replaced]
    assert [(c.window, c.sinks) for c in cores] == [(8, 0), (8, 0)]


def test_a_plus_ffn_row_converts_the_ffn_sites_too(speed) -> None:
    worker, _ = speed.build_model("worker", load=_load)
    assert set(_decisions(worker).values()) == {"WorkerAttention"}
    both, _ = speed.build_model("worker+ffn", load=_load)
    assert set(_decisions(both).values()) == {"WorkerAttention", "WorkerFFN"}


def _fake_children(speed, monkeypatch, commands: list) -> None:
    """Replace the children by a fixed row each; ``commands`` collects their command lines (the
    parent's side: which rows, each in its own process, with which options)."""

    def child(cmd, **kwargs):
        commands.append(cmd)
        row = {"target": cmd[cmd.index("--child") + 1], "length": 1024, "steps": 4, "prefill_s": 1.0,
               "decode_ms": 2.0, "decode_ms_all": [2.0], "cache_bytes": 0, "peak_rss_mib": 10.0,
               "rss_before_mib": 9.0}
        return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps(row) + "\n", stderr="")

    monkeypatch.setattr(speed.subprocess, "run", child)


def test_plan_rows_run_in_fresh_children_with_their_plan(speed, tmp_path: Path, monkeypatch, capsys) -> None:
    path = save_plan(PLAN, tmp_path / "plan.json")
    commands = []

    _fake_children(speed, monkeypatch, commands)
    speed.main(["--quick", "--targets", "window", "--plan", f"auto3x={path}"])
    assert [c[c.index("--child") + 1] for c in commands] == ["original", "window", "auto3x"]
    assert "--child-plan" not in commands[0] and "--child-plan" not in commands[1]
    assert commands[2][commands[2].index("--child-plan") + 1] == str(path.resolve())
    assert "| auto3x | 1024 |" in capsys.readouterr().out

    # the child's side: the plan's model, prefilled and decoded through the HF forward
    monkeypatch.setattr(speed, "_load_smollm2", _load)
    monkeypatch.setattr(speed, "_text_ids", lambda tokenizer, length: _ids()[:, :length])
    speed.main(["--child", "auto3x", "--child-plan", str(path), "--lengths", "32", "--steps", "2"])
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["target"] == "auto3x" and len(row["decode_ms_all"]) == 2 and row["cache_bytes"] > 0


@pytest.mark.parametrize("value, message", [
    ("auto3x", "NAME=PATH"),
    ("=plan.json", "NAME=PATH"),
    ("auto3x=", "NAME=PATH"),
    ("original=plan.json", "already a row"),
    ("a=plan.json,a=plan.json", "already a row"),
    ("a=missing.json", "no plan file"),
    ("a=not_a_plan.json", "neither a swapformer plan file"),
    ("a=broken.json", "not valid JSON"),
])
def test_a_bad_plan_argument_is_a_clear_error_before_any_child(speed, tmp_path: Path, monkeypatch, capsys,
                                                                value: str, message: str) -> None:
    monkeypatch.chdir(tmp_path)
    save_plan(PLAN, "plan.json")
    Path("not_a_plan.json").write_text(json.dumps({"choices": []}))
    Path("broken.json").write_text("{")
    monkeypatch.setattr(speed.subprocess, "run", lambda *a, **k: pytest.fail("a child ran"))
    with pytest.raises(SystemExit) as exit_info:
        speed.main(["--quick", "--targets", "", "--plan", value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--plan" in err and message in err


def test_read_plan_refuses_a_newer_version_and_a_file_without_a_plan(tmp_path: Path) -> None:
    path = save_plan(PLAN, tmp_path / "plan.json")
    record = json.loads(path.read_text())
    path.write_text(json.dumps(dict(record, format_version=99)))
    with pytest.raises(InputError, match="upgrade swapformer"):
        read_plan(path)
    path.write_text(json.dumps(dict(record, rewrite={"target": {"target": "auto"}})))
    with pytest.raises(InputError, match="holds no plan"):
        read_plan(path)
    with pytest.raises(InputError, match="writes a swapformer.Plan"):
        save_plan("window", tmp_path / "x.json")


def test_pareto_writes_every_budgets_plan_as_a_plan_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["pareto_smollm2.py", "--plans-only"])
    pareto = _script("pareto_smollm2")
    other = Plan.of({LOCAL: resolve_target("window", window=8), FAR: resolve_target("window", window=8)},
                    label="auto")
    args = argparse.Namespace(context=4096, quality="error", cost="model", plan_tokens=96, out=tmp_path)
    written = pareto.save_budget_plans({3.0: PLAN, 2.5: other}, ["window(window=8)"], args)
    assert [p.name for p in written] == ["pareto_plan_3x.json", "pareto_plan_2.5x.json"]
    assert read_plan(written[0]) == PLAN and read_plan(written[1]) == other
    metadata = json.loads(written[0].read_text())["metadata"]
    assert metadata["budget"] == "decode@4096=3" and metadata["candidates"] == ["window(window=8)"]
    assert "ModelTimedCost" in metadata["cost"]  # how the plan was costed travels with it
    parsed = pareto.parse_args(["--plans-only"])
    assert parsed.plans_only and parsed.cost == "model" and type(parsed.cost_fn).__name__ == "ModelTimedCost"
    assert pareto.parse_args(["--quick"]).cost_fn is pareto.flop_cost


@pytest.mark.parametrize("target", ["original", "window", "fastweight"])
def test_a_chunked_prefill_gives_the_one_call_cache_and_next_token(speed, target: str) -> None:
    model, _ = speed.build_model(target, load=_load)
    ids = _ids()[:, :37]  # 37 = 3 chunks of 12 and a last one of 1
    with torch.no_grad():
        whole, whole_last = speed.prefill(model, ids)
        chunked, chunked_last = speed.prefill(model, ids, chunk=12)
        torch.testing.assert_close(chunked_last, whole_last, atol=1e-4, rtol=1e-4)
        assert chunked.get_seq_length() == whole.get_seq_length() == 37
        step = {speed.cache_keyword(model): chunked}
        after = model(chunked_last.argmax(-1), use_cache=True, **step).logits
        step = {speed.cache_keyword(model): whole}
        torch.testing.assert_close(after, model(whole_last.argmax(-1), use_cache=True, **step).logits,
                                   atol=1e-4, rtol=1e-4)


def test_prefill_chunk_reaches_every_child_and_the_table(speed, monkeypatch, capsys) -> None:
    assert "chunks of 256 tokens" in speed._header("", 0.0, 0.0, 0, prefill_chunk=256)
    assert "chunks of" not in speed._header("", 0.0, 0.0, 0)
    commands = []

    _fake_children(speed, monkeypatch, commands)
    speed.main(["--quick", "--targets", "window", "--prefill-chunk", "256"])
    assert [c[c.index("--prefill-chunk") + 1] for c in commands] == ["256", "256"]
    assert "prefill s (chunks of 256)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        speed.main(["--quick", "--prefill-chunk", "-1"])

    # the child's side: prefilled chunk by chunk through the HF forward, then decoded
    monkeypatch.setattr(speed, "_load_smollm2", _load)
    monkeypatch.setattr(speed, "_text_ids", lambda tokenizer, length: _ids()[:, :length])
    speed.main(["--child", "window", "--lengths", "30", "--steps", "2", "--prefill-chunk", "8"])
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["prefill_chunk"] == 8 and row["prefill_s"] > 0 and len(row["decode_ms_all"]) == 2



def test_prefill_repeat_reaches_every_child_which_keeps_the_fastest(speed, monkeypatch, capsys) -> None:
    commands = []
    _fake_children(speed, monkeypatch, commands)
    speed.main(["--quick", "--targets", "window", "--prefill-repeat", "3"])
    assert [c[c.index("--prefill-repeat") + 1] for c in commands] == ["3", "3"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        speed.main(["--quick", "--prefill-repeat", "0"])
    assert exit_info.value.code == 2 and "--prefill-repeat" in capsys.readouterr().err

    # the child's side: three prefills from an empty cache each, the fastest reported, then decoded
    monkeypatch.setattr(speed, "_load_smollm2", _load)
    monkeypatch.setattr(speed, "_text_ids", lambda tokenizer, length: _ids()[:, :length])
    speed.main(["--child", "window", "--lengths", "30", "--steps", "2", "--prefill-repeat", "3"])
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(row["prefill_s_all"]) == 3 and round(row["prefill_s"], 2) == min(row["prefill_s_all"])
    assert len(row["decode_ms_all"]) == 2
