"""Pure PyTorch reference for ELiTA attention (``shared/spec/seeds.md`` §2.1, §2.4). This file is the spec.

Per batch row and head, with scalar pre-clip logits κ_j (key), δ_i (self), ρ_i (query) and values
``v_j ∈ R^V``::

    C_j = e^{clip κ_j},  D_i = e^{clip δ_i},  Q_i = e^{clip ρ_i}       (clip to [-clip, clip])
    y_i = (Q_i Σ_{j≤i} C_j v_j + D_i v_i) / (Q_i Σ_{j≤i} C_j + D_i)       (inclusive cumulative sums)

The running sums ``S = Σ C_j v_j ∈ R^V`` and ``Z = Σ C_j`` are the recurrent state (``[B, H, V]`` and
``[B, H]``). Layout ``[B, T, H]`` for logits and ``[B, T, H, V]`` for values; float32 accumulation.
"""

from __future__ import annotations

import torch

from swapformer.kernels.utils import acc_dtype


def naive_elita_attention(
    kappa: torch.Tensor,
    delta: torch.Tensor,
    rho: torch.Tensor,
    v: torch.Tensor,
    clip: float = 20.0,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Cumulative-sum form of ELiTA.

    Args:
        kappa, delta, rho: ``[B, T, H]`` pre-clip logits.
        v: ``[B, T, H, V]`` values.
        clip: symmetric clip applied to each logit before ``exp``.
        initial_state: ``(S [B, H, V], Z [B, H])`` sums carried from earlier tokens, or None.
        output_final_state: also return the sums after the last token.

    Returns:
        ``(y [B, T, H, V] in v's dtype, (S, Z) in the accumulation dtype or None)``.
    """
    acc = acc_dtype(v.dtype)
    C, D, Q = (x.to(acc).clamp(-clip, clip).exp() for x in (kappa, delta, rho))
    va = v.to(acc)
    S = torch.cumsum(C[..., None] * va, dim=1)  # [B, T, H, V]
    Z = torch.cumsum(C, dim=1)  # [B, T, H]
    if initial_state is not None:
        S = S + initial_state[0].to(acc)[:, None]
        Z = Z + initial_state[1].to(acc)[:, None]
    y = (Q[..., None] * S + D[..., None] * va) / (Q * Z + D)[..., None]
    if not output_final_state:
        return y.to(v.dtype), None
    if v.shape[1] == 0:
        B, _, H, V = v.shape
        zeros = (va.new_zeros(B, H, V), va.new_zeros(B, H))
        return y.to(v.dtype), zeros if initial_state is None else tuple(s.to(acc) for s in initial_state)
    return y.to(v.dtype), (S[:, -1], Z[:, -1])


def naive_elita_attention_softmax(
    kappa: torch.Tensor, delta: torch.Tensor, rho: torch.Tensor, v: torch.Tensor, clip: float = 20.0
) -> torch.Tensor:
    """The same map as an explicit masked softmax over ``i + 2`` slots (``seeds.md`` §2.1, "softmax view").

    Row i attends to slots ``j ≤ i`` with logit ``clip κ_j + clip ρ_i`` and value ``v_j``, plus one
    "self" slot with logit ``clip δ_i`` and value ``v_i``. O(T²); an independent check of the cumsum form.
    """
    acc = acc_dtype(v.dtype)
    T = v.shape[1]
    kc, dc, rc = (x.to(acc).clamp(-clip, clip) for x in (kappa, delta, rho))
    logits = kc[:, None, :, :] + rc[:, :, None, :]  # [B, Ti, Tj, H]
    causal = torch.ones(T, T, dtype=torch.bool, device=v.device).tril()
    logits = logits.masked_fill(~causal[None, :, :, None], float("-inf"))
    logits = torch.cat([logits, dc[:, :, None, :]], dim=2)  # self slot last
    p = logits.softmax(dim=2)
    va = v.to(acc)
    y = torch.einsum("bijh,bjhv->bihv", p[:, :, :T], va) + p[:, :, T, :, None] * va
    return y.to(v.dtype)
