"""CAT attention through ``torch.nn.attention.flex_attention``, for comparison with the fused kernel.

Keys are laid out as ``[sink? | kc (N slots) | k (T tokens)]`` and the CAT visibility rule becomes a
``mask_mod``; the block mask lets FlexAttention skip every block that is entirely masked.
"""

from __future__ import annotations

import functools

import torch

Tensor = torch.Tensor


def flex_available() -> bool:
    """True when this torch build ships FlexAttention."""
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def _mask_mod(n_sink: int, n_comp: int, chunk_size: int):
    def mask(b, h, q_idx, kv_idx):
        slot = kv_idx - n_sink
        tok = kv_idx - n_sink - n_comp
        chunk = q_idx // chunk_size
        is_sink = kv_idx < n_sink
        is_comp = (slot >= 0) & (slot < n_comp) & (slot < chunk)
        is_tok = (tok >= 0) & (tok <= q_idx) & (tok // chunk_size == chunk)
        return is_sink | is_comp | is_tok

    return mask


@functools.lru_cache(maxsize=32)
def _block_mask(T: int, n_sink: int, n_comp: int, chunk_size: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    mask = _mask_mod(n_sink, n_comp, chunk_size)
    return create_block_mask(mask, None, None, T, n_sink + n_comp + T, device=device)


def cat_attention_flex(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kc: Tensor,
    vc: Tensor,
    *,
    chunk_size: int,
    scale: float,
    sink_k: Tensor | None = None,
    sink_v: Tensor | None = None,
    compile: bool = False,
) -> Tensor:
    """CAT attention computed by FlexAttention with a block mask (same contract as ``cat_attention``).

    Args:
        compile: wrap ``flex_attention`` in ``torch.compile`` (needed for speed on GPU; eager flex is
            a slow reference path).

    Returns:
        ``o [B, T, H, D]`` in q's dtype.

    Raises:
        RuntimeError: FlexAttention is missing from this torch build.
    """
    if not flex_available():
        raise RuntimeError("torch.nn.attention.flex_attention is not available in this torch build")
    from torch.nn.attention.flex_attention import flex_attention

    B, T, H, D = q.shape
    keys, vals = [kc, k], [vc, v]
    n_sink = 0
    if sink_k is not None:
        n_sink = 1
        keys.insert(0, sink_k.to(k.dtype).expand(B, 1, *sink_k.shape))
        vals.insert(0, sink_v.to(v.dtype).expand(B, 1, *sink_v.shape))
    keys = torch.cat(keys, 1).transpose(1, 2)  # [B, Hkv, S, D]
    vals = torch.cat(vals, 1).transpose(1, 2)
    block_mask = _block_mask(T, n_sink, kc.shape[1], chunk_size, str(q.device))
    fn = _compiled_flex() if compile else flex_attention
    gqa = H != k.shape[2]
    o = fn(q.transpose(1, 2), keys, vals, block_mask=block_mask, scale=scale, enable_gqa=gqa)
    return o.transpose(1, 2)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)
