"""Backend resolution and the comparison helper."""

from __future__ import annotations

import pytest
import torch

from swapformer.kernels.testing import assert_close, error_ratio
from swapformer.kernels.utils import resolve_backend, triton_available


def test_auto_is_naive_on_cpu(monkeypatch):
    monkeypatch.delenv("SWAPFORMER_KERNELS", raising=False)
    assert resolve_backend("auto", torch.zeros(1)) == "naive"


def test_env_overrides_auto(monkeypatch):
    monkeypatch.setenv("SWAPFORMER_KERNELS", "naive")
    assert resolve_backend("auto", torch.zeros(1)) == "naive"
    if triton_available():
        monkeypatch.setenv("SWAPFORMER_KERNELS", "triton")
        assert resolve_backend("auto", torch.zeros(1)) == "triton"


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    if not triton_available():
        pytest.skip("triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        resolve_backend("triton", torch.zeros(1))


def test_unknown_backend():
    with pytest.raises(ValueError):
        resolve_backend("cuda", torch.zeros(1))


def test_assert_close():
    ref = torch.ones(10)
    assert error_ratio(ref, ref) == 0.0
    assert_close("same", ref, ref + 1e-7, ratio=1e-6)
    with pytest.raises(AssertionError, match="relative RMS"):
        assert_close("far", ref, ref * 1.1, ratio=1e-3)
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close("nan", ref, torch.full_like(ref, float("nan")))
