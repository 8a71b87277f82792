"""``torch.library`` custom ops for CAT attention (forward, backward, fake and autograd).

``backend="triton"`` runs the flash-style kernels of :mod:`.triton` (imported lazily);
``backend="naive"`` runs :func:`naive_cat_attention` and differentiates it with ``torch.func.vjp``.
"""

from __future__ import annotations

import torch

from swapformer.kernels.cat.naive import naive_cat_attention

Tensor = torch.Tensor


@torch.library.custom_op("swapformer::cat_attention", mutates_args=())
def cat_attention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kc: Tensor,
    vc: Tensor,
    sink_k: Tensor | None,
    sink_v: Tensor | None,
    chunk_size: int,
    scale: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """Forward: ``(o [B, T, H, D], lse [B, H, T] fp32)``."""
    if backend == "triton":
        from swapformer.kernels.cat import triton as tri

        return tri.cat_fwd(q, k, v, kc, vc, sink_k, sink_v, chunk_size, scale)
    o, lse = naive_cat_attention(q, k, v, kc, vc, chunk_size, scale, sink_k, sink_v, return_lse=True)
    return o.contiguous(), lse.float().contiguous()


@cat_attention_op.register_fake
def _(q, k, v, kc, vc, sink_k, sink_v, chunk_size, scale, backend):
    B, T, H, _ = q.shape
    return q.new_empty(q.shape), q.new_empty(B, H, T, dtype=torch.float32)


@torch.library.custom_op("swapformer::cat_attention_bwd", mutates_args=())
def cat_attention_bwd_op(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kc: Tensor,
    vc: Tensor,
    sink_k: Tensor | None,
    sink_v: Tensor | None,
    o: Tensor,
    lse: Tensor,
    chunk_size: int,
    scale: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward: ``(dq, dk, dv, dkc, dvc, dsink_k, dsink_v)``; sink grads are zeros without a sink."""
    if backend == "triton":
        from swapformer.kernels.cat import triton as tri

        return tri.cat_bwd(do, q, k, v, kc, vc, sink_k, sink_v, o, lse, chunk_size, scale)
    Hkv, D = k.shape[2], k.shape[3]
    has_sink = sink_k is not None
    if not has_sink:
        sink_k = sink_v = None
        fn = lambda q, k, v, kc, vc: naive_cat_attention(q, k, v, kc, vc, chunk_size, scale)
        _, vjp = torch.func.vjp(fn, q, k, v, kc, vc)
        zeros = q.new_zeros(Hkv, D)
        return tuple(g.contiguous() for g in vjp(do)) + (zeros, zeros.clone())
    fn = lambda *a: naive_cat_attention(*a[:5], chunk_size, scale, a[5], a[6])
    _, vjp = torch.func.vjp(fn, q, k, v, kc, vc, sink_k, sink_v)
    return tuple(g.contiguous() for g in vjp(do))


@cat_attention_bwd_op.register_fake
def _(do, q, k, v, kc, vc, sink_k, sink_v, o, lse, chunk_size, scale, backend):
    Hkv, D = k.shape[2], k.shape[3]
    grads = tuple(x.new_empty(x.shape) for x in (q, k, v, kc, vc))
    if sink_k is None:
        return grads + (q.new_empty(Hkv, D), q.new_empty(Hkv, D))
    return grads + (sink_k.new_empty(sink_k.shape), sink_v.new_empty(sink_v.shape))


def _setup_context(ctx, inputs, output):
    q, k, v, kc, vc, sink_k, sink_v, chunk_size, scale, backend = inputs
    ctx.save_for_backward(q, k, v, kc, vc, sink_k, sink_v, *output)
    ctx.opts = (chunk_size, scale, backend)
    ctx.has_sink = sink_k is not None


def _backward(ctx, do, dlse):
    q, k, v, kc, vc, sink_k, sink_v, o, lse = ctx.saved_tensors
    grads = cat_attention_bwd_op(do, q, k, v, kc, vc, sink_k, sink_v, o, lse, *ctx.opts)
    sinks = grads[5:] if ctx.has_sink else (None, None)
    return (*grads[:5], *sinks, None, None, None)


cat_attention_op.register_autograd(_backward, setup_context=_setup_context)
