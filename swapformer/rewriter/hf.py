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
from typing import Any

import torch
from torch import nn

from swapformer.targets.sdpa import window_mask

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
    state = context.get("state")
    tq = query.shape[-2]
    if state is not None:
        key, value = key[..., -tq:, :], value[..., -tq:, :]
    scaling, site_scale = kwargs.get("scaling"), getattr(module, "_swapformer_scale", None)
    if scaling is not None and site_scale and not math.isclose(scaling, site_scale, rel_tol=1e-6):
        # the host scaled q upstream (OPT: q_proj(x) * scale, then scaling=1.0): the site's scale
        # already counts that factor, so the core must see the unscaled q
        query = query * (scaling / site_scale)
    bias = _bias_from_hf_mask(attention_mask, query.dtype)
    position_bias = kwargs.get("position_bias")  # T5 passes its relative bias beside the mask
    if position_bias is not None:
        if bias is None and tq > 1 and kwargs.get("is_causal", getattr(module, "is_causal", True)):
            # HF skipped materialising a causal mask; once a bias is added it must carry the causal part
            keep = window_mask(tq, key.shape[-2], None, query.device)
            position_bias = position_bias.masked_fill(~keep, float("-inf"))
        bias = position_bias if bias is None else bias + position_bias
    if bias is not None and bias.shape[-1] != key.shape[-2]:
        bias = bias[..., -key.shape[-2]:]
    out = core(query, key, value, bias, hidden=context.get("hidden"), **({"state": state} if state is not None else {}))
    return out.transpose(1, 2).contiguous(), None


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
    core = module.swapformer_core
    state = None
    # the cache reaches attention modules under different names (GPT-NeoX: layer_past)
    cache = next((kwargs[k] for k in ("past_key_values", "past_key_value", "layer_past") if kwargs.get(k) is not None), None)
    if getattr(core, "stateful", False) and cache is not None:
        store = cache.__dict__.setdefault("_swapformer_states", {})
        state = store.setdefault(id(core), {})
    module._swapformer_context = {"hidden": hidden, "state": state}


def _clear_context(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    module._swapformer_context = {}


def attach_attention_core(attn: nn.Module, core: nn.Module, scale: float | None = None) -> None:
    attn.add_module("swapformer_core", core)
    attn._swapformer_scale = scale
    attn.register_forward_pre_hook(_capture_context, with_kwargs=True)
    attn.register_forward_hook(_clear_context, with_kwargs=True)


class FFNSwap(nn.Module):
    """Stands in for a host MLP module: the whole ``down(act(up(x)))`` is the core."""

    def __init__(self, core: nn.Module) -> None:
        super().__init__()
        self.core = core

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.core(hidden_states)


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
