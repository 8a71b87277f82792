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


def _cuda_like():
    # resolve_backend reads only .is_cuda and .device: a CPU machine can still take the CUDA branch
    from types import SimpleNamespace

    return SimpleNamespace(is_cuda=True, device=torch.device("cuda"))


def test_fallback_without_triton_is_warned_once(monkeypatch, caplog):
    from swapformer.kernels import utils

    monkeypatch.delenv("SWAPFORMER_KERNELS", raising=False)
    monkeypatch.setattr(utils, "_ANNOUNCED", set())
    monkeypatch.setattr(utils, "triton_status", lambda: (False, "the triton package is not installed"))
    with caplog.at_level("INFO", logger="swapformer.kernels.utils"):
        assert resolve_backend("auto", _cuda_like()) == "naive"
        assert resolve_backend("auto", _cuda_like()) == "naive"
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "reference" in warnings[0].getMessage() and "not installed" in warnings[0].getMessage()


def test_cpu_path_is_logged_once_at_info(monkeypatch, caplog):
    from swapformer.kernels import utils

    monkeypatch.delenv("SWAPFORMER_KERNELS", raising=False)
    monkeypatch.setattr(utils, "_ANNOUNCED", set())
    with caplog.at_level("INFO", logger="swapformer.kernels.utils"):
        resolve_backend("auto", torch.zeros(1))
        resolve_backend("auto", torch.zeros(1))
    (record,) = caplog.records
    assert record.levelname == "INFO" and "reference" in record.getMessage() and "cpu" in record.getMessage()


def test_broken_triton_install_counts_as_unavailable(monkeypatch):
    import importlib

    from swapformer.kernels import utils

    real = importlib.import_module

    def fail_triton(name, *args):
        if name == "triton":
            raise ImportError("libcuda.so.1: cannot open shared object file")
        return real(name, *args)

    monkeypatch.setattr(utils.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(utils.importlib, "import_module", fail_triton)
    utils.triton_status.cache_clear()
    try:
        usable, why = utils.triton_status()
        assert not usable and "libcuda" in why
        with pytest.raises(RuntimeError, match="importing triton failed.*libcuda"):
            resolve_backend("triton", torch.zeros(1))
    finally:
        utils.triton_status.cache_clear()
