"""Shared target helpers: reading key padding out of host masks."""

from __future__ import annotations

import math

import pytest
import torch
from target_helpers import padding_bias

from swapformer.errors import InputError
from swapformer.targets.reference import (
    key_keep_from_bias,
    sdpa_with_lse,
    state_keys_real,
    uniform_gate_bias,
)


def test_right_padding_is_read_from_an_hf_mask():
    keep = key_keep_from_bias(padding_bias([6, 4], 6), 2, 6)
    assert keep.tolist() == [[True] * 6, [True] * 4 + [False] * 2]


def test_left_padding_with_unmasked_rows():
    # hosts fill fully masked (left-pad) rows with zeros so SDPA does not return NaN
    t, pad = 6, 2
    real = torch.arange(t) >= pad
    keep = torch.ones(t, t).tril().bool() & real[None, :]
    keep[:pad] = True
    bias = torch.zeros(1, 1, t, t).masked_fill(~keep, float("-inf"))
    assert key_keep_from_bias(bias, 1, t).tolist() == [[False] * pad + [True] * (t - pad)]


def test_sliding_window_mask_is_not_padding():
    t = 8
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    window = (j <= i) & (i - j < 3)
    assert key_keep_from_bias(window[None, None], 1, t) is None
    assert key_keep_from_bias(None, 1, t) is None


def test_decode_call_reads_the_new_keys_only():
    bias = torch.zeros(2, 1, 1, 5)
    bias[1, ..., 4] = float("-inf")
    # one new token whose key is padding in row 1 (its own row hides it)
    assert key_keep_from_bias(bias, 2, 1).tolist() == [[True], [False]]


def test_uniform_gate_bias_range():
    u = torch.sigmoid(uniform_gate_bias(16, torch.Generator().manual_seed(0)))
    assert u.min() >= 1 / 16 - 1e-6 and u.max() <= 1 - 1 / 16 + 1e-6


def test_a_chunk_after_a_past_reads_its_own_corner():
    """A 3-token chunk after 5 cached tokens, row 1's last token padding: the answer comes from the
    chunk's own [3, 3] corner of the [Tq, past + Tq] mask, per row, heads merged."""
    past, t = 5, 3
    keep = (torch.arange(past + t)[None, :] <= torch.arange(past, past + t)[:, None]).repeat(2, 2, 1, 1)
    keep[1, :, :, -1] = False
    assert key_keep_from_bias(keep, 2, t).tolist() == [[True] * 3, [True, True, False]]


def test_the_hf_mask_is_read_once_per_forward():
    from swapformer.rewriter.hf import _key_keep

    query, memo = torch.zeros(2, 1, 6, 4), {}
    mask = padding_bias([6, 4], 6) > -1  # a boolean 4-D mask, as HF's SDPA path passes it
    first = _key_keep(None, mask, query, memo)
    assert first.tolist() == [[True] * 6, [True] * 4 + [False] * 2]
    assert _key_keep(None, mask, query, memo) is first  # the next layers: the same answer, not read again
    mask.copy_(padding_bias([6, 6], 6) > -1)  # changed in place: read again
    assert _key_keep(None, mask, query, memo) is None


class _CountingKeep(torch.Tensor):
    """A keep mask that counts how often its values are read (``.all()``)."""

    reads = 0

    def all(self, *args, **kwargs):
        type(self).reads += 1
        return super().all(*args, **kwargs)


def test_the_padding_flag_spares_device_reads_and_clears_once_padding_left():
    keep = torch.tensor([[True, False, True]]).as_subclass(_CountingKeep)
    state = {"keep": keep, "padded": False}
    assert state_keys_real(state) and _CountingKeep.reads == 0  # the flag answers: nothing read
    state["padded"] = True
    assert not state_keys_real(state) and _CountingKeep.reads == 1  # padded: read, and still padded
    state["keep"] = torch.ones(1, 3, dtype=torch.bool).as_subclass(_CountingKeep)
    assert state_keys_real(state) and state["padded"] is False and _CountingKeep.reads == 2
    assert state_keys_real(state) and _CountingKeep.reads == 2  # cleared: no more reads
    assert state_keys_real(None) and state_keys_real({"pos": 3})  # nothing cached: all real
    unknown = {"keep": torch.tensor([[True, False]])}  # a state written without the flag: read once
    assert not state_keys_real(unknown) and unknown["padded"] is True


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sdpa_with_lse_is_the_softmax_and_its_log_normaliser(dtype):
    """The fused CPU kernel the cat hybrid's far read uses: output and row log-sum-exp, with an additive
    mask and unscaled scores, equal the dense formula (rows that see a key; others the caller zeroes)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g, dtype=dtype) for n in (7, 5, 5))
    bias = torch.zeros(7, 5, dtype=dtype)
    bias[:, 3:] = -math.inf
    bias[0] = -math.inf  # a row that sees nothing
    with torch.no_grad():
        out, lse = sdpa_with_lse(q, k, v, bias)
    s = q @ k.transpose(-1, -2) + bias
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}
    torch.testing.assert_close(lse[..., 1:], torch.logsumexp(s, -1)[..., 1:], **tol)
    torch.testing.assert_close(out[..., 1:, :], (s.softmax(-1) @ v)[..., 1:, :], **tol)
    with pytest.raises(InputError, match="no_grad"):
        sdpa_with_lse(q, k, v)
