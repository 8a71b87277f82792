"""Calibration across processes: a killed run resumed from its checkpoint ends bitwise equal to an
uninterrupted one, and a 2-process torchrun (gloo) run keeps both ranks identical.

Runs go through the CLI (``python -m swapformer.calibrate --job tests/calibrate/_tiny.py:job``);
independent runs are started together to keep the wall time down on small machines.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from swapformer.calibrate.trainer import CRASH_ENV

ROOT = Path(__file__).resolve().parents[2]
JOB = str(Path(__file__).with_name("_tiny.py")) + ":job"
COMMON = ["--stage", "transfer:steps=5,lr=0.01", "--stage", "distill:steps=5,lr=0.003",
          "--seq-len", "32", "--batch-size", "4", "--no-progress", "--threads", "1",
          "--eval-batches", "0", "--checkpoint-every", "2", "--job", JOB]
CRASHES = (3, 7)  # global steps: inside the transfer stage, inside the LoRA distill stage
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]


def _start(args: list[str], *, launcher: list[str] | None = None, env: dict | None = None) -> subprocess.Popen:
    cmd = [*(launcher or [sys.executable, "-m"]), "swapformer.calibrate", *COMMON, *args]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, expect: int = 0) -> tuple[str, str]:
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == expect, out[-3000:] + err[-3000:]
    return out, err


def _same(a: Path, b: Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _args(root: Path, name: str) -> list[str]:
    return ["--checkpoint-dir", str(root / f"ckpt-{name}"), "--save", str(root / f"{name}.safetensors")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """An uninterrupted run and one run per crash point, killed by os._exit after that step."""
    root = tmp_path_factory.mktemp("calib")
    procs = [(_start(_args(root, "full")), 0)]
    procs += [(_start(_args(root, f"crash{k}"), env={CRASH_ENV: str(k)}), 77) for k in CRASHES]
    for proc, expect in procs:
        _finish(proc, expect)
    return root


def test_killed_runs_resume_bitwise(runs):
    for k in CRASHES:
        assert not (runs / f"crash{k}.safetensors").exists()
        assert (runs / f"ckpt-crash{k}" / "state.json").exists()
    procs = {k: _start([*_args(runs, f"crash{k}"), "--resume"]) for k in CRASHES}
    for k, proc in procs.items():
        out, _ = _finish(proc)
        assert f"resumed at step {k - 1}" in out  # checkpoints every 2 steps
        assert _same(runs / "full.safetensors", runs / f"crash{k}.safetensors")


def test_torchrun_two_ranks_gloo(runs, tmp_path):
    out = tmp_path / "rank{rank}.safetensors"
    _, err = _finish(_start(["--save", str(out), "--batch-size", "2"], launcher=TORCHRUN))
    assert "gloo process group of 2 ranks" in err
    assert _same(tmp_path / "rank0.safetensors", tmp_path / "rank1.safetensors")
    # 2 ranks x 2 sequences is the global batch of the single-process run, up to reduction order.
    a, b = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(runs / "full.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
