"""The ops are opaque custom ops: ``torch.compile(fullgraph=True)`` traces them with no graph break."""

from __future__ import annotations

import pytest
import torch

from swapformer.kernels import (
    cat_attention,
    causal_dwconv_gather,
    elita_attention,
    fastweight_decay,
    worker_attention,
)


def block(x, w, b, idx, state):
    """A toy layer touching every op (values are meaningless, only the plumbing matters)."""
    B, T, d = x.shape
    u, u_w = causal_dwconv_gather(x, w, b, idx)
    h = u.view(B, T, 2, d // 2)
    o1, s = fastweight_decay(h, h, h, h.sigmoid(), h.sigmoid(), initial_state=state, output_final_state=True)
    y, _ = elita_attention(h[..., 0], h[..., 1], h[..., 2], h)
    kc = h.view(B, T // 4, 4, 2, d // 2).mean(2)
    o2 = cat_attention(h, h, h, kc, kc, chunk_size=4, scale=0.5)
    o3 = worker_attention(u_w.view(B, -1, 2, d // 2), h, h, idx, scale=0.5)
    return o1.sum() + s.sum() + y.sum() + o2.sum() + o3.sum()


def test_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    x = torch.randn(2, 8, 8, requires_grad=True)
    w = torch.randn(8, 3, requires_grad=True)
    b = torch.randn(8, requires_grad=True)
    idx = torch.tensor([3, 7])
    state = torch.zeros(2, 2, 4, 4)
    eager = block(x, w, b, idx, state)
    g_eager = torch.autograd.grad(eager, (x, w, b))
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = compiled(x, w, b, idx, state)
    g_out = torch.autograd.grad(out, (x, w, b))
    torch.testing.assert_close(out, eager)
    for a, e in zip(g_out, g_eager):
        torch.testing.assert_close(a, e)


@pytest.mark.slow
def test_compile_inductor():
    torch._dynamo.reset()
    x, w, b = (torch.randn(*s, requires_grad=True) for s in ((2, 8, 8), (8, 3), (8,)))
    idx, state = torch.tensor([3, 7]), torch.zeros(2, 2, 4, 4)
    eager = block(x, w, b, idx, state)
    g_eager = torch.autograd.grad(eager, (x, w, b))
    out = torch.compile(block, fullgraph=True)(x, w, b, idx, state)
    g_out = torch.autograd.grad(out, (x, w, b))
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)
    for a, e in zip(g_out, g_eager):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)
