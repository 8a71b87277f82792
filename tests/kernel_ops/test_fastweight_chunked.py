"""The factorised CPU chunked form equals the step-by-step reference, also when decays are deep."""

from __future__ import annotations

import pytest
import torch

from swapformer.kernels.fastweight.chunked import chunked_fastweight_decay
from swapformer.kernels.fastweight.naive import naive_fastweight_decay_recurrent


def _inputs(T: int, gate_shift: float, dtype=torch.float64):
    g = torch.Generator().manual_seed(T)
    B, H, K, V = 2, 3, 5, 4
    q, k, fhat = (torch.randn(B, T, H, K, generator=g, dtype=dtype) for _ in range(3))
    v, f = (torch.randn(B, T, H, V, generator=g, dtype=dtype) for _ in range(2))
    f, fhat = torch.sigmoid(f + gate_shift), torch.sigmoid(fhat + gate_shift)
    h0 = torch.randn(B, H, V, K, generator=g, dtype=dtype)
    return q, k, v, f, fhat, h0


@pytest.mark.parametrize("chunk", [1, 16, 64])
@pytest.mark.parametrize("T", [1, 15, 16, 33, 70])
@pytest.mark.parametrize("gate_shift", [2.0, -3.0, -12.0, -70.0])  # open, uniform-init-like, deep, clamped
def test_chunked_matches_recurrence(T: int, gate_shift: float, chunk: int) -> None:
    q, k, v, f, fhat, h0 = _inputs(T, gate_shift)
    o, s = chunked_fastweight_decay(q, k, v, f, fhat, h0, True, chunk)
    o_ref, s_ref = naive_fastweight_decay_recurrent(q, k, v, f, fhat, h0, True)
    torch.testing.assert_close(o, o_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(s, s_ref, rtol=1e-9, atol=1e-9)


def _chunk_lengths(monkeypatch) -> list[int]:
    """Records the chunk length of every chunk-state computation (its ``k`` is ``[B, H, N, C, K]``)."""
    from swapformer.kernels.fastweight import chunked

    seen: list[int] = []
    real = chunked._chunk_states

    def spy(a, b, k, v, initial_state, acc):
        seen.append(k.shape[3])
        assert acc == torch.float32 or k.dtype == torch.float64
        return real(a, b, k, v, initial_state, acc)

    monkeypatch.setattr(chunked, "_chunk_states", spy)
    return seen


@pytest.mark.parametrize("chunk", [8, 32, 128])
def test_chunk_size_is_honoured(chunk: int, monkeypatch) -> None:
    seen = _chunk_lengths(monkeypatch)
    q, k, v, f, fhat, h0 = (x.float() for x in _inputs(300, 2.0))  # open gates: no halving needed
    chunked_fastweight_decay(q, k, v, f, fhat, h0, True, chunk)
    assert seen == [chunk]


def test_config_chunk_size_reaches_the_kernel(monkeypatch) -> None:
    from swapformer.targets.fastweight import FastWeightAttention, FastWeightConfig

    seen = _chunk_lengths(monkeypatch)
    core = FastWeightAttention(4, 2, 8, 8, 24, config=FastWeightConfig(local_window=0, chunk_size=32))
    q, k, v = torch.randn(1, 4, 100, 8), torch.randn(1, 2, 100, 8), torch.randn(1, 2, 100, 8)
    core(q, k, v, hidden=torch.randn(1, 100, 24))
    assert seen == [32]


@pytest.mark.parametrize("gate_shift", [-9.0, -12.0])  # 64-step chunks decay past the fp32 range
def test_deep_decays_stay_float32_in_shorter_chunks(gate_shift: float, monkeypatch) -> None:
    from swapformer.kernels.fastweight import chunked

    def no_fallback(*args, **kwargs):
        raise AssertionError("fell back to the pairwise reference")

    monkeypatch.setattr(chunked, "naive_fastweight_decay_chunked", no_fallback)
    seen = _chunk_lengths(monkeypatch)
    q, k, v, f, fhat, h0 = (x.float() for x in _inputs(70, gate_shift))
    o, s = chunked.chunked_fastweight_decay(q, k, v, f, fhat, h0, True, 64)
    assert 1 <= seen[0] < 64  # halved until the chunks' decays fit float32 (the spy checks the dtype)
    o_ref, s_ref = naive_fastweight_decay_recurrent(*(x.double() for x in (q, k, v, f, fhat, h0)), True)
    assert o.dtype == torch.float32 and s.dtype == torch.float32
    torch.testing.assert_close(o.double(), o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.double(), s_ref, rtol=1e-5, atol=1e-5)
