"""Sliding-window attention with sinks: the reference against masked softmax, the Triton forward kernel
(interpreter) against the reference, and the targets that call it (``window`` prefill, the hybrids'
tiled prefill) against their PyTorch paths."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from swapformer.kernels.window import naive_window_attention, window_attention, window_visible

sys.path.insert(0, str(Path(__file__).parents[1] / "targets"))
from target_helpers import attention_site, build, qkv_inputs, randomize  # noqa: E402

# (B, H, Hkv, T, D, Dv, window, sinks): GQA, Dv ≠ D, D below the 16-wide dot, a window of one, sinks
# inside / beyond the window and beyond T, T not a multiple of the blocks
SHAPES = [
    (1, 4, 2, 70, 16, 16, 8, 3),
    (2, 3, 3, 37, 16, 32, 64, 4),
    (1, 2, 1, 50, 8, 8, 1, 0),
    (1, 2, 2, 100, 32, 16, 17, 5),
    (2, 2, 1, 5, 16, 16, 2, 9),
]


def _inputs(b, h, hkv, t, d, dv, dtype=torch.float32):
    return (torch.randn(b, h, t, d, dtype=dtype), torch.randn(b, hkv, t, d, dtype=dtype),
            torch.randn(b, hkv, t, dv, dtype=dtype))


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_is_the_masked_softmax(shape):
    b, h, hkv, t, d, dv, window, sinks = shape
    q, k, v = _inputs(b, h, hkv, t, d, dv, torch.float64)
    o, c, den = naive_window_attention(q, k, v, window, sinks, d**-0.5)
    keep = window_visible(t, window, sinks)
    kg, vg = k.repeat_interleave(h // hkv, 1), v.repeat_interleave(h // hkv, 1)
    want = F.scaled_dot_product_attention(q, kg, vg, attn_mask=keep, scale=d**-0.5)
    torch.testing.assert_close(o, want)
    s = (q @ kg.transpose(-1, -2) * d**-0.5).masked_fill(~keep, float("-inf"))
    torch.testing.assert_close(c, s.amax(-1))
    torch.testing.assert_close(den * c.exp(), s.exp().sum(-1))  # den = Σ e^{s − c}


@pytest.mark.interpret
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_forward_matches_the_reference(shape, nan_empty):
    b, h, hkv, t, d, dv, window, sinks = shape
    q, k, v = _inputs(b, h, hkv, t, d, dv)
    got = window_attention(q, k, v, window=window, sinks=sinks, scale=d**-0.5, backend="triton")
    want = naive_window_attention(q, k, v, window, sinks, d**-0.5)
    for name, x, y in zip(("o", "c", "den"), got, want):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.interpret
def test_triton_reads_strided_inputs():
    """The targets pass views (a transposed ``[B, T, H, D]`` projection): strides, no copies."""
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in _inputs(1, 4, 2, 40, 16, 16))
    assert not q.is_contiguous()
    got = window_attention(q, k, v, window=8, sinks=2, scale=0.25, backend="triton")
    want = naive_window_attention(q, k, v, 8, 2, 0.25)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_gradients_run_the_reference():
    q, k, v = (x.requires_grad_(True) for x in _inputs(1, 2, 1, 20, 16, 16, torch.float64))
    o, _, _ = window_attention(q, k, v, window=4, sinks=1, scale=0.25, backend="triton")
    assert o.grad_fn is not None
    # gradients through the public function (the kernel has no backward: the reference must run)
    torch.autograd.gradcheck(
        lambda *x: window_attention(*x, window=4, sinks=1, scale=0.25, backend="triton")[0], (q, k, v)
    )


def test_bad_arguments_name_what_is_wrong():
    q, k, v = _inputs(1, 3, 2, 10, 16, 16)
    with pytest.raises(ValueError, match="H % Hkv"):
        window_attention(q, k, v, window=4, scale=1.0)
    q, k, v = _inputs(1, 2, 1, 10, 16, 16)
    with pytest.raises(ValueError, match="window must be >= 1"):
        window_attention(q, k, v, window=0, scale=1.0)


# ---- the targets on the kernel (SWAPFORMER_KERNELS=triton on CPU: the interpreter) ------------

HYBRIDS = {"fastweight": {}, "elita": {}, "cat": {"chunk_size": 3}}


def _core(target, **options):
    site, weights = attention_site(4, 2, 16, d_model=24, qkv_bias=True, dtype=torch.float32)
    return randomize(build(target, site, weights, **options), seed=2), site


def _spy_kernel(monkeypatch, module):
    calls = []
    original = module.window_attention
    monkeypatch.setattr(module, "window_attention", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    return calls


@pytest.mark.interpret
def test_window_target_prefill_runs_the_kernel_and_equals_the_blocks(monkeypatch):
    import swapformer.targets.window as window_module

    core, site = _core("window", window=8, sinks=2, block_size=4)
    q, k, v, _ = qkv_inputs(site, 2, 29, 24, dtype=torch.float32)
    with torch.no_grad():
        want, want_state = core(q, k, v), {}
        core(q, k, v, state=want_state)
        monkeypatch.setenv("SWAPFORMER_KERNELS", "triton")
        calls = _spy_kernel(monkeypatch, window_module)
        got, got_state = core(q, k, v), {}
        core(q, k, v, state=got_state)
    assert len(calls) == 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got_state.keys() == want_state.keys()
    for name, value in want_state.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(got_state[name], value)
        else:
            assert got_state[name] == value


@pytest.mark.interpret
@pytest.mark.parametrize("target", list(HYBRIDS))
@pytest.mark.parametrize("segment", [8, 4096])
def test_hybrid_tiled_prefill_on_the_kernel_equals_the_tiles(target, segment, monkeypatch):
    """Same outputs and decoding state as the PyTorch tiles, over several segments (the last padded)."""
    import swapformer.targets.hybrid as hybrid_module

    core, site = _core(target, local_window=6, sinks=2, block_size=4, **HYBRIDS[target])
    core.set_mix(torch.linspace(0.3, 2.0, core.num_heads))
    core.cuda_segment_len = segment
    q, k, v, h = qkv_inputs(site, 2, 31, 24, dtype=torch.float32)
    with torch.no_grad():
        want, want_state = core(q, k, v, hidden=h), {}
        core(q, k, v, hidden=h, state=want_state)
        monkeypatch.setenv("SWAPFORMER_KERNELS", "triton")
        calls = _spy_kernel(monkeypatch, hybrid_module)
        got, got_state = core(q, k, v, hidden=h), {}
        core(q, k, v, hidden=h, state=got_state)
    assert len(calls) == 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got_state.keys() == want_state.keys()
    for name, value in want_state.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(got_state[name], value, rtol=1e-5, atol=1e-5)
        else:
            assert got_state[name] == value


@pytest.mark.interpret
def test_hybrid_with_autograd_keeps_the_pytorch_tiles(monkeypatch):
    import swapformer.targets.hybrid as hybrid_module

    core, site = _core("fastweight", local_window=6, sinks=2, block_size=4)
    monkeypatch.setenv("SWAPFORMER_KERNELS", "triton")
    calls = _spy_kernel(monkeypatch, hybrid_module)
    q, k, v, h = qkv_inputs(site, 1, 20, 24, dtype=torch.float32)
    core(q.requires_grad_(True), k, v, hidden=h).sum().backward()
    assert calls == [] and q.grad is not None
