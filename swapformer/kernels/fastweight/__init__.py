"""T2FW decaying fast weights: ``S_t = S_{t-1} ⊙ (f_t f̂_tᵀ) + v_t k_tᵀ``, ``o_t = S_t q_t``.

Public entry points (layout ``[B, T, H, D]``):

- :func:`fastweight_decay`: chunked form, for training and prefill.
- :func:`fastweight_decay_recurrent`: token-by-token form, for decoding (T small, typically 1).
- :func:`naive_fastweight_decay_recurrent`, :func:`naive_fastweight_decay_chunked`: the references.
"""

from __future__ import annotations

import torch

from swapformer.kernels.fastweight.naive import (
    naive_fastweight_decay_chunked,
    naive_fastweight_decay_recurrent,
)
from swapformer.kernels.fastweight.op import fastweight_decay_op
from swapformer.kernels.utils import resolve_backend

__all__ = [
    "fastweight_decay",
    "fastweight_decay_recurrent",
    "naive_fastweight_decay_chunked",
    "naive_fastweight_decay_recurrent",
]


def _check(q, k, v, f, fhat, initial_state) -> None:
    if q.shape != k.shape or q.shape != fhat.shape:
        raise ValueError(f"q, k, fhat must share [B, T, H, K]; got {q.shape}, {k.shape}, {fhat.shape}")
    if v.shape != f.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v, f must be [B, T, H, V] matching q; got {v.shape}, {f.shape}")
    if initial_state is not None:
        B, _, H, K = q.shape
        want = (B, H, v.shape[-1], K)
        if tuple(initial_state.shape) != want:
            raise ValueError(f"initial_state must be {list(want)}, got {list(initial_state.shape)}")


def _run(q, k, v, f, fhat, initial_state, output_final_state, chunk_size, backend, recurrent):
    _check(q, k, v, f, fhat, initial_state)
    backend = resolve_backend(backend, q)
    o, ht = fastweight_decay_op(q, k, v, f, fhat, initial_state, chunk_size, recurrent, backend)
    return o, (ht if output_final_state else None)


def fastweight_decay(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    f: torch.Tensor,
    fhat: torch.Tensor,
    *,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decay-rule fast weights, chunkwise parallel (``seeds.md`` §4.1).

    Per head, ``S_t = S_{t-1} ⊙ (f_t f̂_tᵀ) + v_t k_tᵀ`` and ``o_t = S_t q_t`` (state after the update).

    Args:
        q, k: ``[B, T, H, K]`` queries and keys (no feature map, no normaliser).
        v: ``[B, T, H, V]`` values.
        f: ``[B, T, H, V]`` value-side gates in (0, 1] (sigmoid applied by the caller).
        fhat: ``[B, T, H, K]`` key-side gates in (0, 1].
        initial_state: ``[B, H, V, K]`` (float32 preferred) or None for zeros.
        output_final_state: return ``S_T`` as the second element.
        chunk_size: chunk length of the reference chunked form (the Triton kernel uses 16-token blocks).
        backend: ``"auto"`` (Triton on CUDA, reference on CPU; env ``SWAPFORMER_KERNELS`` overrides),
            ``"triton"`` or ``"naive"``.

    Returns:
        ``(o [B, T, H, V] in q's dtype, S_T [B, H, V, K] float32 or None)``.

    Raises:
        ValueError: inconsistent shapes or unknown backend.
    """
    return _run(q, k, v, f, fhat, initial_state, output_final_state, chunk_size, backend, False)


def fastweight_decay_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    f: torch.Tensor,
    fhat: torch.Tensor,
    *,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same map as :func:`fastweight_decay`, computed token by token (fused recurrent kernel).

    Meant for decoding (``T`` small, usually 1, with ``initial_state`` carried between calls); it is
    exact for any ``T`` but sequential in time. ``chunk_size`` is accepted for signature parity and
    ignored. Arguments and returns as :func:`fastweight_decay`.
    """
    return _run(q, k, v, f, fhat, initial_state, output_final_state, chunk_size, backend, True)
