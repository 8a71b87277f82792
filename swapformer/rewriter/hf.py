"""Apply stage for Hugging Face transformers v5 models: swap cores at module level.

Detection runs on the exported graph; the rewrite keeps the model class (``generate``,
``save_pretrained``, ``config``) by routing attention through transformers' ``AttentionInterface``:
each detected attention module gets a ``swapformer_core`` submodule, and the model's attention
implementation becomes ``swapformer_<original>``, a registered function that calls the module's core
and falls back to the original implementation for modules without one. The mask function of the
original implementation is registered under the same name, so cores receive the masks they expect.
FFN sites that are a whole module (``LlamaMLP``) are replaced by a module calling the core.
"""

from __future__ import annotations

import logging
import math
import sys
import weakref
from typing import Any

import torch
from torch import nn

from swapformer.errors import InputError
from swapformer.rewriter import hf_cache
from swapformer.targets.reference import causal_window_keep, key_keep_from_bias

log = logging.getLogger(__name__)
PREFIX = "swapformer_"


def is_hf_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


def _bias_from_hf_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros((), dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


def swapformer_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The registered attention function: the module's core, or the original implementation."""
    core = getattr(module, "swapformer_core", None)
    if core is None:
        return _fallback(module)(module, query, key, value, attention_mask, **kwargs)
    context = getattr(module, "_swapformer_context", {})
    scaling, site_scale = kwargs.get("scaling"), getattr(module, "_swapformer_scale", None)
    if scaling is not None and site_scale and not math.isclose(scaling, site_scale, rel_tol=1e-6):
        # the host scaled q upstream (OPT: q_proj(x) * scale, then scaling=1.0): the site's scale
        # already counts that factor, so the core must see the unscaled q
        query = query * (scaling / site_scale)
    if getattr(core, "stateful", False):
        keep = _key_keep(context.get("keep"), attention_mask, query, getattr(module, "_swapformer_call", None))
        call = hf_cache.CoreCall(query, key, value, context.get("hidden"),
                                 context.get("transients", 0))
        out = hf_cache.call_core(core, call, keep, context.get("layer"))
    else:
        key, value, attention_mask = _valid_keys(key, value, attention_mask, context.get("layer"))
        out = core(query, key, value, _host_bias(query, key, attention_mask, kwargs, module),
                   hidden=context.get("hidden"))
    return out.transpose(1, 2).contiguous(), None


def _valid_keys(key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                layer: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A static host cache hands over its whole buffer (unwritten slots too, with ``mask=None`` when
    nothing is padded): keep the keys written so far, which the layer counts."""
    seen = layer.get_seq_length() if layer is not None else key.shape[-2]
    if not 0 < seen < key.shape[-2]:
        return key, value, mask
    if mask is not None and mask.shape[-1] == key.shape[-2]:
        mask = mask[..., :seen]
    return key[..., :seen, :], value[..., :seen, :], mask


def _key_keep(keep_2d: torch.Tensor | None, attention_mask: torch.Tensor | None,
              query: torch.Tensor, memo: dict | None = None) -> torch.Tensor | None:
    """``[B, Tq]`` True at this call's real tokens (None: all real), from the model's 2-D mask when
    it was given one (its last columns are this call's tokens), else from the 4-D mask's diagonal.

    Every layer of a forward gets the same 4-D mask (``[B, 1, Tq, Tk]``: 16 MiB for a 512-token
    chunk after 32k tokens): it is read once, as booleans, and the answer kept in ``memo`` (the
    model-wide call context) for the next layers."""
    b, tq = query.shape[0], query.shape[-2]
    if keep_2d is not None and keep_2d.shape[-1] >= tq:
        keep = keep_2d[:, keep_2d.shape[-1] - tq:].expand(b, tq)
        return None if bool(keep.all()) else keep
    if attention_mask is None:
        return None
    seen = memo.get("mask_keep") if memo is not None else None
    if seen is not None and seen[0]() is attention_mask and seen[1] == (attention_mask._version, b, tq):
        return seen[2]
    keep = key_keep_from_bias(attention_mask, b, tq)  # a boolean mask or an additive bias
    if memo is not None:
        memo["mask_keep"] = (weakref.ref(attention_mask), (attention_mask._version, b, tq), keep)
    return keep


def _host_bias(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
               kwargs: dict, module: nn.Module) -> torch.Tensor | None:
    """The additive bias a stateless (exact) core gets: the host mask plus T5's position bias."""
    tq = query.shape[-2]
    bias = _bias_from_hf_mask(attention_mask, query.dtype)
    position_bias = kwargs.get("position_bias")  # T5 passes its relative bias beside the mask
    if position_bias is not None:
        if bias is None and tq > 1 and kwargs.get("is_causal", getattr(module, "is_causal", True)):
            # HF skipped materialising a causal mask; once a bias is added it must carry the causal part
            keep = causal_window_keep(tq, key.shape[-2], None, query.device)
            position_bias = position_bias.masked_fill(~keep, float("-inf"))
        bias = position_bias if bias is None else bias + position_bias
    if bias is not None and bias.shape[-1] != key.shape[-2]:
        bias = bias[..., -key.shape[-2]:]
    return bias


def _fallback(module: nn.Module) -> Any:
    """The original implementation; for ``eager`` the host model's own eager function."""
    from transformers import AttentionInterface

    name = module.config._attn_implementation.removeprefix(PREFIX)
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        from transformers.models.llama.modeling_llama import eager_attention_forward as eager
    return AttentionInterface().get_interface(name, eager)


def register_implementation(original: str) -> str:
    """Register ``swapformer_<original>`` for attention and masks; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    original = original or "sdpa"
    name = PREFIX + original.removeprefix(PREFIX)
    AttentionInterface.register(name, swapformer_attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original.removeprefix(PREFIX)])
    return name


def _capture_context(module: nn.Module, args: tuple, kwargs: dict) -> None:
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    shared = getattr(module, "_swapformer_call", {})
    cache, layer = shared.get("cache"), None
    stateful = getattr(module.swapformer_core, "stateful", False)
    if cache is not None and (not stateful or isinstance(cache, hf_cache.swapformer_cache_class())):
        layers, index = getattr(cache, "layers", []), getattr(module, "layer_idx", None)
        layer = layers[index] if isinstance(index, int) and index < len(layers) else None
    module._swapformer_context = {"hidden": hidden, "layer": layer, "keep": shared.get("keep"),
                                  "transients": shared.get("transients", 0)}


def _clear_context(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    module._swapformer_context = {}


def attach_attention_core(attn: nn.Module, core: nn.Module, scale: float | None = None,
                          shared: dict | None = None) -> None:
    """Give ``attn`` its core; ``shared`` is the model-wide call context (cache, 2-D padding mask)."""
    attn.add_module("swapformer_core", core)
    attn._swapformer_scale = scale
    attn._swapformer_call = shared if shared is not None else {}
    attn.register_forward_pre_hook(_capture_context, with_kwargs=True)
    attn.register_forward_hook(_clear_context, with_kwargs=True)


class FFNSwap(nn.Module):
    """Stands in for a host MLP module: the whole ``down(act(up(x)))`` is the core.

    A core that depends on token positions (worker) gets the call's ``positions`` and ``keep``
    ``[B, T]`` and the number of repeated last tokens (``transients``) from the model-wide call
    context, which :func:`hf_cache.install` hands to this module.
    """

    def __init__(self, core: nn.Module) -> None:
        super().__init__()
        self.core = core
        self._swapformer_call: dict = {}

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        positions = self._swapformer_call.get("positions")
        if not getattr(self.core, "reads_call_positions", False) or positions is None:
            return self.core(hidden_states)
        if positions.shape[-1] != hidden_states.shape[-2]:
            raise InputError(f"the call context has {positions.shape[-1]} positions for "
                             f"{hidden_states.shape[-2]} tokens: call the whole model, not one FFN")
        return self.core(hidden_states, positions=positions, keep=self._swapformer_call.get("tokens_keep"),
                         transients=self._swapformer_call.get("transients", 0))


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def set_implementation(model: nn.Module) -> str:
    """Route every config of the model to the swapformer implementation of its current one."""
    original = model.config._attn_implementation or "sdpa"
    name = register_implementation(original)
    model.set_attn_implementation(name)
    for module in model.modules():  # encoder/decoder stacks may hold their own config copies
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation") and config._attn_implementation != name:
            config._attn_implementation = name
    return name
