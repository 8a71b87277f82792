"""``torch.library`` custom ops for the T2FW decay rule (forward, backward, fake and autograd).

The op body picks the implementation from its ``backend`` argument: ``"triton"`` (CUDA, or CPU under
``TRITON_INTERPRET=1``) imports :mod:`.triton` lazily; ``"naive"`` runs the PyTorch references. Because
the op is opaque to ``torch.compile`` either way, compiled graphs contain one node per call, no break.

Backward (see ``README.md``): the three adjoint recurrences are themselves decay-rule recurrences, so
the backward reuses the forward primitive three times (on transposed / time-reversed inputs) and gets
the gate gradients from the closed form ``d log f_s = Σ_{t≥s} (g_t ⊙ o_t − v_t ⊙ dv_t)``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from swapformer.kernels.fastweight.chunked import chunked_fastweight_decay
from swapformer.kernels.fastweight.naive import naive_fastweight_decay_recurrent
from swapformer.kernels.utils import LOG_GATE_MIN, acc_dtype

Tensor = torch.Tensor
Primitive = Callable[..., tuple[Tensor, Tensor]]


def _primitive(backend: str, chunk_size: int, recurrent: bool) -> Primitive:
    """``fn(q, k, v, f, fhat, h0, out_dtype) -> (o, h_T)``: one forward pass of the chosen backend."""
    if backend == "triton":
        from swapformer.kernels.fastweight import triton as tri

        return partial(tri.fastweight_decay_fwd, recurrent=recurrent)

    def run(q, k, v, f, fhat, h0, out_dtype):
        wd = acc_dtype(out_dtype)
        q, k, v, f, fhat = (x.to(wd) for x in (q, k, v, f, fhat))
        h0 = None if h0 is None else h0.to(wd)
        if recurrent:
            o, ht = naive_fastweight_decay_recurrent(q, k, v, f, fhat, h0, True)
        else:
            # the factorised chunked form: same math as the naive spec, without [C, C, D] tensors
            o, ht = chunked_fastweight_decay(q, k, v, f, fhat, h0, True, chunk_size)
        return o.to(out_dtype).contiguous(), ht

    return run


@torch.library.custom_op("swapformer::fastweight_decay", mutates_args=())
def fastweight_decay_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    f: Tensor,
    fhat: Tensor,
    initial_state: Tensor | None,
    chunk_size: int,
    recurrent: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """Forward: ``(o [B, T, H, V], S_T [B, H, V, K] fp32 (fp64 for fp64 inputs))``."""
    o, ht = _primitive(backend, chunk_size, recurrent)(q, k, v, f, fhat, initial_state, q.dtype)
    ht = ht.to(acc_dtype(q.dtype))
    # a custom op's outputs may not alias its inputs (T = 0 returns the initial state itself)
    return o, (ht.clone() if initial_state is not None and ht.data_ptr() == initial_state.data_ptr() else ht)


@fastweight_decay_op.register_fake
def _(q, k, v, f, fhat, initial_state, chunk_size, recurrent, backend):
    B, T, H, K = q.shape
    V = v.shape[-1]
    return q.new_empty(B, T, H, V), q.new_empty(B, H, V, K, dtype=acc_dtype(q.dtype))


@torch.library.custom_op("swapformer::fastweight_decay_bwd", mutates_args=())
def fastweight_decay_bwd_op(
    do: Tensor,
    dht: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    f: Tensor,
    fhat: Tensor,
    initial_state: Tensor | None,
    o: Tensor,
    ht: Tensor,
    chunk_size: int,
    recurrent: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward: ``(dq, dk, dv, df, dfhat, dh0)``; ``dh0`` is all zeros when there is no initial state."""
    fwd = _primitive(backend, chunk_size, recurrent)
    grads = fastweight_decay_backward(fwd, do, dht, q, k, v, f, fhat, initial_state, o, ht)
    dh0 = grads[5].to(initial_state.dtype if initial_state is not None else torch.float32)
    return tuple(g.to(x.dtype) for g, x in zip(grads[:5], (q, k, v, f, fhat))) + (dh0,)


@fastweight_decay_bwd_op.register_fake
def _(do, dht, q, k, v, f, fhat, initial_state, o, ht, chunk_size, recurrent, backend):
    B, _, H, K = q.shape
    V = v.shape[-1]
    dh0 = q.new_empty(B, H, V, K, dtype=torch.float32 if initial_state is None else initial_state.dtype)
    return tuple(x.new_empty(x.shape) for x in (q, k, v, f, fhat)) + (dh0,)


def _setup_context(ctx, inputs, output):
    q, k, v, f, fhat, h0, chunk_size, recurrent, backend = inputs
    ctx.save_for_backward(q, k, v, f, fhat, h0, *output)
    ctx.opts = (chunk_size, recurrent, backend)
    ctx.has_h0 = h0 is not None


def _backward(ctx, do, dht):
    q, k, v, f, fhat, h0, o, ht = ctx.saved_tensors
    grads = fastweight_decay_bwd_op(do, dht, q, k, v, f, fhat, h0, o, ht, *ctx.opts)
    dh0 = grads[5] if ctx.has_h0 else None
    return (*grads[:5], dh0, None, None, None)


fastweight_decay_op.register_autograd(_backward, setup_context=_setup_context)


def _shift_back(x: Tensor) -> Tensor:
    """``x_{t+1}`` at position t with a unit gate after the last step, then time-reversed."""
    return F.pad(x[:, 1:], (0, 0, 0, 0, 0, 1), value=1.0).flip(1)


def fastweight_decay_backward(
    fwd: Primitive,
    do: Tensor,
    dht: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    f: Tensor,
    fhat: Tensor,
    h0: Tensor | None,
    o: Tensor,
    ht: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """All gradients of the decay rule from three forward passes of ``fwd`` plus O(T·(K+V)) torch work.

    With ``G_t = f_t f̂_tᵀ`` and ``g_t = dL/do_t``, the state adjoint ``dS_t = g_t q_tᵀ + dS_{t+1} ⊙ G_{t+1}``
    (``dS_T`` starts from ``dht``) is a decay-rule recurrence run backwards in time with gates shifted by one:

        dq_t = S_tᵀ g_t      forward run with (q, k, v, f, f̂) = (g, v, k, f̂, f), S_0ᵀ
        dv_t = dS_t k_t      reversed run with (k, q, g, f_{t+1}, f̂_{t+1}), dhtᵀ... = dht
        dk_t = dS_tᵀ v_t     reversed run with (v, g, q, f̂_{t+1}, f_{t+1}), dhtᵀ
        d log f_s  = Σ_{t≥s} (g_t ⊙ o_t − v_t ⊙ dv_t) + Σ_m (dht ⊙ S_T)[:, m]
        d log f̂_s = Σ_{t≥s} (q_t ⊙ dq_t − k_t ⊙ dk_t) + Σ_d (dht ⊙ S_T)[d, :]
        dS_0 = dS_1 ⊙ G_1

    Returns ``(dq, dk, dv, df, dfhat, dh0)`` in the accumulation dtype (float32, or float64 for float64
    inputs); ``dh0`` is zeros when ``h0`` is None.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    f32 = acc_dtype(q.dtype)
    g = do.to(f32)
    tr = lambda s: None if s is None else s.transpose(-1, -2).contiguous()
    rev = lambda x: x.flip(1)
    dq, _ = fwd(g, v, k, fhat, f, tr(h0), f32)
    dv, dS1 = fwd(rev(k), rev(q), rev(g), _shift_back(f), _shift_back(fhat), dht, f32)
    dk, _ = fwd(rev(v), rev(g), rev(q), _shift_back(fhat), _shift_back(f), tr(dht), f32)
    dv, dk = rev(dv), rev(dk)
    # the gates enter only through their logs (clamped at LOG_GATE_MIN, where the gradient is zero)
    dlf = (g * o.to(f32) - v.to(f32) * dv).flip(1).cumsum(1).flip(1)
    dlfh = (q.to(f32) * dq - k.to(f32) * dk).flip(1).cumsum(1).flip(1)
    if dht is not None:
        M = dht.to(f32) * ht
        dlf = dlf + M.sum(-1)[:, None]
        dlfh = dlfh + M.sum(-2)[:, None]
    df = _dlog_to_dgate(dlf, f)
    dfhat = _dlog_to_dgate(dlfh, fhat)
    dh0 = dS1 * f[:, 0].to(f32)[..., None] * fhat[:, 0].to(f32)[..., None, :] if T > 0 else dS1
    if h0 is None:
        dh0 = torch.zeros(B, H, V, K, dtype=f32, device=q.device)
    return dq, dk, dv, df, dfhat, dh0


def _dlog_to_dgate(dlog: Tensor, gate: Tensor) -> Tensor:
    """Chain rule through ``log(gate)`` clamped at :data:`LOG_GATE_MIN`."""
    g32 = gate.to(dlog.dtype)
    live = torch.log(g32) > LOG_GATE_MIN
    return torch.where(live, dlog / g32.clamp_min(1e-37), torch.zeros_like(dlog))
