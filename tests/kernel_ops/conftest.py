"""Kernel tests run the Triton kernels on CPU through the Triton interpreter.

``TRITON_INTERPRET`` is read when a ``@triton.jit`` function is decorated, i.e. when a
``swapformer.kernels.<op>.triton`` module is first imported (lazily, on the first Triton-backend call).
Setting it here, before any test runs, is therefore enough; nothing else in the test session launches
Triton kernels on CPU.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from swapformer.kernels.utils import triton_available  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(42)


@pytest.fixture
def nan_empty(monkeypatch):
    """NaN-filled ``torch.empty``/``empty_like``: a kernel that leaves output memory unwritten fails loudly."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))


def pytest_collection_modifyitems(config, items):
    if triton_available():
        return
    skip = pytest.mark.skip(reason="triton is not installed")
    for item in items:
        if "interpret" in item.keywords:
            item.add_marker(skip)
