"""``torch.library`` custom ops for ELiTA attention (forward, backward, fake and autograd).

``backend="triton"`` runs the chunked-scan kernels of :mod:`.triton` (imported lazily);
``backend="naive"`` runs :func:`naive_elita_attention` and differentiates it with ``torch.func.vjp``.
"""

from __future__ import annotations

import torch

from swapformer.kernels.elita.naive import naive_elita_attention
from swapformer.kernels.utils import acc_dtype

Tensor = torch.Tensor


def _naive(kappa, delta, rho, v, S0, Z0, clip):
    state = None if S0 is None else (S0, Z0)
    y, (S, Z) = naive_elita_attention(kappa, delta, rho, v, clip, state, True)
    return y, S, Z


@torch.library.custom_op("swapformer::elita_attention", mutates_args=())
def elita_attention_op(
    kappa: Tensor,
    delta: Tensor,
    rho: Tensor,
    v: Tensor,
    S0: Tensor | None,
    Z0: Tensor | None,
    clip: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Forward: ``(y [B, T, H, V], S_T [B, H, V], Z_T [B, H])``, states fp32 (fp64 for fp64 inputs)."""
    if backend == "triton":
        from swapformer.kernels.elita import triton as tri

        return tri.elita_fwd(kappa, delta, rho, v, S0, Z0, clip)
    y, S, Z = _naive(kappa, delta, rho, v, S0, Z0, clip)
    acc = acc_dtype(v.dtype)
    # clone: with T = 0 the final sums are the initial-state tensors themselves
    return y.contiguous(), S.to(acc).clone(), Z.to(acc).clone()


@elita_attention_op.register_fake
def _(kappa, delta, rho, v, S0, Z0, clip, backend):
    B, T, H, V = v.shape
    acc = acc_dtype(v.dtype)
    return v.new_empty(v.shape), v.new_empty(B, H, V, dtype=acc), v.new_empty(B, H, dtype=acc)


@torch.library.custom_op("swapformer::elita_attention_bwd", mutates_args=())
def elita_attention_bwd_op(
    dy: Tensor,
    dS: Tensor | None,
    dZ: Tensor | None,
    kappa: Tensor,
    delta: Tensor,
    rho: Tensor,
    v: Tensor,
    S0: Tensor | None,
    Z0: Tensor | None,
    y: Tensor,
    clip: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward: ``(dkappa, ddelta, drho, dv, dS0, dZ0)`` (state grads zero when there is no state)."""
    B, T, H, V = v.shape
    acc = acc_dtype(v.dtype)
    dS = torch.zeros(B, H, V, dtype=acc, device=v.device) if dS is None else dS.to(acc)
    dZ = torch.zeros(B, H, dtype=acc, device=v.device) if dZ is None else dZ.to(acc)
    if backend == "triton":
        from swapformer.kernels.elita import triton as tri

        return tri.elita_bwd(dy, dS, dZ, kappa, delta, rho, v, S0, Z0, y, clip)
    if S0 is None:
        S0, Z0 = v.new_zeros(B, H, V, dtype=acc), v.new_zeros(B, H, dtype=acc)
    fn = lambda *a: _naive(*a, clip)
    _, vjp = torch.func.vjp(fn, kappa, delta, rho, v, S0.to(acc), Z0.to(acc))
    grads = vjp((dy, dS, dZ))
    return tuple(g.contiguous() for g in grads)


@elita_attention_bwd_op.register_fake
def _(dy, dS, dZ, kappa, delta, rho, v, S0, Z0, y, clip, backend):
    B, T, H, V = v.shape
    acc = acc_dtype(v.dtype)
    out = tuple(x.new_empty(x.shape) for x in (kappa, delta, rho, v))
    return out + (v.new_empty(B, H, V, dtype=acc), v.new_empty(B, H, dtype=acc))


def _setup_context(ctx, inputs, output):
    kappa, delta, rho, v, S0, Z0, clip, backend = inputs
    ctx.save_for_backward(kappa, delta, rho, v, S0, Z0, output[0])
    ctx.opts = (clip, backend)
    ctx.has_state = S0 is not None


def _backward(ctx, dy, dS, dZ):
    kappa, delta, rho, v, S0, Z0, y = ctx.saved_tensors
    grads = elita_attention_bwd_op(dy, dS, dZ, kappa, delta, rho, v, S0, Z0, y, *ctx.opts)
    dS0, dZ0 = (grads[4].to(S0.dtype), grads[5].to(Z0.dtype)) if ctx.has_state else (None, None)
    return (*grads[:4], dS0, dZ0, None, None)


elita_attention_op.register_autograd(_backward, setup_context=_setup_context)
