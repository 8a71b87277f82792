"""``swapformer zoo`` end to end on ``examples/zoo_small.toml`` plus three entries that go wrong.

One batch run (module-scoped fixture) builds the records; the tests read them. Workers are real
subprocesses, so this is the slowest file of the fast suite (about a minute on 2 cores).
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from swapformer import zoo

ROOT = Path(__file__).resolve().parents[1]
SMALL = ROOT / "examples" / "zoo_small.toml"
HERE = Path(__file__).resolve()
TARGETS = ["sdpa", "window"]

BAD_ENTRIES = f"""
[[model]]
name = "broken"
model = "{HERE}:broken_model"

[[model]]
name = "crashing"
model = "{HERE}:crashing_model"

[[model]]
name = "hanging"
model = "{HERE}:hanging_model"
timeout = 6
"""


def broken_model() -> Any:
    raise RuntimeError("this factory is broken on purpose")


def crashing_model() -> Any:
    os._exit(3)


def hanging_model() -> Any:
    time.sleep(120)


def _run(*args: str) -> int:
    return zoo.main([*args, "--quiet"])


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("zoo")
    toml = tmp / "zoo.toml"
    toml.write_text(SMALL.read_text() + BAD_ENTRIES)
    out = tmp / "out"
    assert _run(str(toml), "--target", ",".join(TARGETS), "--out", str(out), "--jobs", "2") == 0
    report = json.loads((out / "report.json").read_text())
    records = {(r["model"], r["target"]): r for r in report["records"]}
    return {"toml": toml, "out": out, "report": report, "records": records}


def test_every_entry_and_target_is_recorded(batch: dict[str, Any]) -> None:
    names = [e.name for e in zoo.read_zoo(batch["toml"]).entries]
    assert set(batch["records"]) == {(n, t) for n in names for t in TARGETS}
    files = sorted(p.name for p in (batch["out"] / "entries").glob("*.json"))
    assert len(files) == len(names) * len(TARGETS)
    assert (batch["out"] / "report.md").read_text().startswith("# swapformer zoo")


def test_sdpa_is_exact_and_saved(batch: dict[str, Any]) -> None:
    for name in ("llama-tiny", "bert-tiny"):
        rec = batch["records"][(name, "sdpa")]
        assert rec["status"] == "ok", rec.get("reason")
        assert rec["detection"]["attention"] == rec["detection"]["expected"] == 2
        assert rec["rewrite"]["replaced"] == 2
        assert rec["verify"]["exact"] and rec["verify"]["max_abs_diff"] <= 1e-5
        assert (batch["out"] / rec["save"]["path"] / "swapformer.json").is_file()
        assert rec["params"]["ratio"] == pytest.approx(1.0)
        assert rec["speed"]["prefill"]["original"] > 0


def test_window_keeps_causality_and_skips_encoders(batch: dict[str, Any]) -> None:
    llama = batch["records"][("llama-tiny", "window")]
    assert llama["status"] == "ok", llama.get("reason")
    assert llama["verify"]["causal"] is True and llama["verify"]["batch_independent"] is True
    assert llama["verify"]["output_rel_err"] > 0  # window 4 < 16 tokens: not the original
    assert llama["flops_per_token"]["by_context"]["4096"]["ratio"] < 0.01
    bert = batch["records"][("bert-tiny", "window")]
    assert bert["status"] == "no-sites" and "bidirectional" in bert["reason"]
    assert bert["verify"]["causal"] is None  # BERT is not causal to begin with


def test_failures_are_recorded_and_do_not_stop_the_batch(batch: dict[str, Any]) -> None:
    records = batch["records"]
    for target in TARGETS:
        broken = records[("broken", target)]
        assert broken["status"] == "failed"
        assert "broken on purpose" in broken["reason"]
        assert records[("crashing", target)]["status"] == "crashed"
        assert "status 3" in records[("crashing", target)]["reason"]
        assert records[("hanging", target)]["status"] == "timeout"
    summary = batch["report"]["summary"]["sdpa"]
    assert summary["status"]["ok"] == 2 and summary["exact"] == 2


def test_timm_entries_are_skipped_without_timm(batch: dict[str, Any]) -> None:
    if importlib.util.find_spec("timm") is not None:
        pytest.skip("timm is importable here")
    rec = batch["records"][("timm-vit_tiny_patch16_224", "sdpa")]
    assert rec["status"] == "skipped" and ".venv-timm" in rec["reason"]


def test_second_run_skips_finished_entries(batch: dict[str, Any], capsys: pytest.CaptureFixture) -> None:
    entries = batch["out"] / "entries"
    before = {p.name: p.stat().st_mtime_ns for p in entries.glob("*.json")}
    start = time.monotonic()
    assert _run(str(batch["toml"]), "--target", ",".join(TARGETS), "--out", str(batch["out"])) == 0
    assert time.monotonic() - start < 30  # no worker started
    assert {p.name: p.stat().st_mtime_ns for p in entries.glob("*.json")} == before
    capsys.readouterr()
    _run(str(batch["toml"]), "--target", ",".join(TARGETS), "--out", str(batch["out"]), "--dry-run",
         "--retry-failed")
    states = dict(line.split("\t")[::2] for line in capsys.readouterr().out.splitlines())
    assert states["llama-tiny"] == "done" and states["broken"] == "sdpa,window"


def test_shards_split_the_entries(batch: dict[str, Any], capsys: pytest.CaptureFixture) -> None:
    names = []
    for i in (1, 2):
        _run(str(batch["toml"]), "--out", str(batch["out"]), "--dry-run", "--shard", f"{i}/2")
        names.append([line.split("\t")[0] for line in capsys.readouterr().out.splitlines()])
    everything = [e.name for e in zoo.read_zoo(batch["toml"]).entries]
    assert not set(names[0]) & set(names[1])
    assert sorted(names[0] + names[1]) == sorted(everything)
    assert names[0] == everything[0::2]


def test_bad_arguments_are_usage_errors(tmp_path: Path) -> None:
    assert zoo.main([str(SMALL), "--out", str(tmp_path), "--shard", "3/2"]) == 2
    assert zoo.main([str(SMALL), "--out", str(tmp_path), "--target", "nope"]) == 2
