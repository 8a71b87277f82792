"""``torch.library`` custom ops for worker attention and the causal depthwise conv (+ worker gather).

``backend="triton"`` runs the kernels of :mod:`.triton` (imported lazily); ``backend="naive"`` runs the
references and differentiates them with ``torch.func.vjp``.
"""

from __future__ import annotations

import torch

from swapformer.kernels.utils import acc_dtype
from swapformer.kernels.worker.blocked import blocked_worker_attention_lse
from swapformer.kernels.worker.naive import naive_causal_dwconv, naive_worker_attention

Tensor = torch.Tensor


@torch.library.custom_op("swapformer::worker_attention", mutates_args=())
def worker_attention_op(
    q_w: Tensor, k: Tensor, v: Tensor, worker_idx: Tensor, scale: float, backend: str
) -> tuple[Tensor, Tensor]:
    """Forward: ``(o [B, W, H, D], lse [B, H, W] fp32)``."""
    if backend == "triton":
        from swapformer.kernels.worker import triton as tri

        return tri.worker_fwd(q_w, k, v, worker_idx, scale)
    # same math as the reference (tests/kernel_ops/test_worker.py), blocked and in one pass
    o, lse = blocked_worker_attention_lse(q_w, k, v, worker_idx, scale)
    return o.contiguous(), lse.contiguous()


@worker_attention_op.register_fake
def _(q_w, k, v, worker_idx, scale, backend):
    B, W, H, _ = q_w.shape
    return q_w.new_empty(q_w.shape), q_w.new_empty(B, H, W, dtype=torch.float32)


@torch.library.custom_op("swapformer::worker_attention_bwd", mutates_args=())
def worker_attention_bwd_op(
    do: Tensor,
    q_w: Tensor,
    k: Tensor,
    v: Tensor,
    worker_idx: Tensor,
    o: Tensor,
    lse: Tensor,
    scale: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward: ``(dq_w, dk, dv)``."""
    if backend == "triton":
        from swapformer.kernels.worker import triton as tri

        return tri.worker_bwd(do, q_w, k, v, worker_idx, o, lse, scale)
    fn = lambda q_w, k, v: naive_worker_attention(q_w, k, v, worker_idx, scale)
    _, vjp = torch.func.vjp(fn, q_w, k, v)
    return tuple(g.contiguous() for g in vjp(do))


@worker_attention_bwd_op.register_fake
def _(do, q_w, k, v, worker_idx, o, lse, scale, backend):
    return q_w.new_empty(q_w.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _worker_setup(ctx, inputs, output):
    q_w, k, v, worker_idx, scale, backend = inputs
    ctx.save_for_backward(q_w, k, v, worker_idx, *output)
    ctx.opts = (scale, backend)


def _worker_backward(ctx, do, dlse):
    q_w, k, v, worker_idx, o, lse = ctx.saved_tensors
    dq, dk, dv = worker_attention_bwd_op(do, q_w, k, v, worker_idx, o, lse, *ctx.opts)
    return dq, dk, dv, None, None, None


worker_attention_op.register_autograd(_worker_backward, setup_context=_worker_setup)


@torch.library.custom_op("swapformer::causal_dwconv", mutates_args=())
def causal_dwconv_op(
    x: Tensor, weight: Tensor, bias: Tensor | None, worker_idx: Tensor | None, backend: str
) -> tuple[Tensor, Tensor]:
    """Forward: ``(u [B, T, d], u[:, worker_idx] [B, W, d])`` (``W = 0`` without indices)."""
    if backend == "triton":
        from swapformer.kernels.worker import triton as tri

        return tri.dwconv_fwd(x, weight, bias, worker_idx)
    u = naive_causal_dwconv(x, weight, bias).contiguous()
    uw = u[:, worker_idx].contiguous() if worker_idx is not None else u.new_empty(u.shape[0], 0, u.shape[2])
    return u, uw


@causal_dwconv_op.register_fake
def _(x, weight, bias, worker_idx, backend):
    W = 0 if worker_idx is None else worker_idx.shape[0]
    return x.new_empty(x.shape), x.new_empty(x.shape[0], W, x.shape[2])


@torch.library.custom_op("swapformer::causal_dwconv_bwd", mutates_args=())
def causal_dwconv_bwd_op(
    du: Tensor,
    duw: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    worker_idx: Tensor | None,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward: ``(dx, dweight, dbias)`` (``dbias`` is zeros without a bias)."""
    if worker_idx is not None:
        # u[:, idx] is a gather, so its gradient lands on the gathered rows of du
        du = du.index_add(1, worker_idx, duw.to(du.dtype))
    if backend == "triton":
        from swapformer.kernels.worker import triton as tri

        dx, dw, db = tri.dwconv_bwd(du, x, weight)
    else:
        fn = lambda x, w: naive_causal_dwconv(x, w, None)
        _, vjp = torch.func.vjp(fn, x, weight)
        dx, dw = vjp(du)
        db = du.to(acc_dtype(du.dtype)).sum((0, 1))
    db = db.to(bias.dtype) if bias is not None else db.to(weight.dtype)
    return dx.contiguous(), dw.contiguous(), db


@causal_dwconv_bwd_op.register_fake
def _(du, duw, x, weight, bias, worker_idx, backend):
    db = bias.new_empty(bias.shape) if bias is not None else weight.new_empty(weight.shape[0])
    return x.new_empty(x.shape), weight.new_empty(weight.shape), db


def _dwconv_setup(ctx, inputs, output):
    x, weight, bias, worker_idx, backend = inputs
    ctx.save_for_backward(x, weight, bias, worker_idx)
    ctx.backend = backend
    ctx.has_bias = bias is not None


def _dwconv_backward(ctx, du, duw):
    x, weight, bias, worker_idx = ctx.saved_tensors
    if du is None:
        du = torch.zeros_like(x)
    if duw is None:
        W = 0 if worker_idx is None else worker_idx.shape[0]
        duw = x.new_zeros(x.shape[0], W, x.shape[2])
    dx, dw, db = causal_dwconv_bwd_op(du, duw, x, weight, bias, worker_idx, ctx.backend)
    return dx, dw, (db if ctx.has_bias else None), None, None


causal_dwconv_op.register_autograd(_dwconv_backward, setup_context=_dwconv_setup)
