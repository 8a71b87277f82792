"""Every Triton kernel compiles for a real CUDA target (sm_90), checked on CPU via ``cuda_compile.py``."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from swapformer.kernels.utils import triton_available

SCRIPT = pathlib.Path(__file__).with_name("cuda_compile.py")
pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


def _run(*args: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True)
    if proc.returncode == 3:
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_kernels_compile_for_sm90():
    _run("--dtypes", "bf16")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["80", "90"])
def test_all_configs_and_dtypes_compile(arch):
    _run("--arch", arch, "--dtypes", "bf16,fp16,fp32", "--all-configs")
