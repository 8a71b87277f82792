"""ELiTA attention: a normalised linear attention with scalar feature maps plus a self slot.

``y_i = (Q_i Σ_{j≤i} C_j v_j + D_i v_i) / (Q_i Σ_{j≤i} C_j + D_i)`` with ``C, D, Q = exp(clip(κ, δ, ρ))``.
Layout ``[B, T, H]`` for the logits, ``[B, T, H, V]`` for values.
"""

from __future__ import annotations

import torch

from swapformer.kernels.elita.naive import naive_elita_attention, naive_elita_attention_softmax
from swapformer.kernels.elita.op import elita_attention_op
from swapformer.kernels.utils import resolve_backend

__all__ = ["elita_attention", "naive_elita_attention", "naive_elita_attention_softmax"]


def elita_attention(
    kappa: torch.Tensor,
    delta: torch.Tensor,
    rho: torch.Tensor,
    v: torch.Tensor,
    *,
    clip: float = 20.0,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """ELiTA attention (``seeds.md`` §2.1) as a chunked scan.

    Args:
        kappa: ``[B, T, H]`` key logits κ (pre-clip).
        delta: ``[B, T, H]`` self logits δ (pre-clip).
        rho: ``[B, T, H]`` query logits ρ (pre-clip).
        v: ``[B, T, H, V]`` values.
        clip: each logit is clipped to ``[-clip, clip]`` before ``exp``.
        initial_state: ``(S [B, H, V], Z [B, H])`` running sums ``Σ C_j v_j`` and ``Σ C_j`` of earlier
            tokens, or None.
        output_final_state: return the sums after the last token.
        backend: ``"auto"`` | ``"triton"`` | ``"naive"`` (see :func:`swapformer.kernels.utils.resolve_backend`).

    Returns:
        ``(y [B, T, H, V] in v's dtype, (S, Z) float32 or None)``.

    Raises:
        ValueError: inconsistent shapes or unknown backend.
    """
    B, T, H, V = v.shape
    for name, x in (("kappa", kappa), ("delta", delta), ("rho", rho)):
        if tuple(x.shape) != (B, T, H):
            raise ValueError(f"{name} must be [B, T, H] = {[B, T, H]}, got {list(x.shape)}")
    S0, Z0 = (None, None) if initial_state is None else initial_state
    if S0 is not None and (tuple(S0.shape) != (B, H, V) or tuple(Z0.shape) != (B, H)):
        raise ValueError(f"initial_state must be ([B, H, V], [B, H]), got {S0.shape}, {Z0.shape}")
    backend = resolve_backend(backend, v)
    y, S, Z = elita_attention_op(kappa, delta, rho, v, S0, Z0, float(clip), backend)
    return y, ((S, Z) if output_final_state else None)
