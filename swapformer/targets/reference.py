"""Helpers shared by the replacement targets: head layouts, masks, gate init, the host FFN, checks.

Nothing here is a target. The functions encode the conventions of :mod:`swapformer.targets.base`
(core tensors are ``[B, H, T, D]``; kernels take ``[B, T, H, D]``) and the few decisions every
target makes the same way:

* ``bias`` for causal-only targets is read as *causal + key padding*: a key is padding when its own
  query row cannot see it (Hugging Face masks with left or right padding, with or without a window;
  see :func:`key_keep_from_bias`). Other mask content is not representable by these targets.
* the decoding ``state`` dict always carries ``"pos"``, the number of tokens seen so far.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from swapformer.errors import ConfigError, InputError
from swapformer.sites import AttentionSite, FFNSite, ProjectionRef, Site
from swapformer.targets.base import copy_projection

# bytes per element used by ``state_bytes`` reports: caches and states are counted at float32.
STATE_ELEMENT_BYTES = 4


def to_kernel_layout(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, T, D]`` (core convention) -> ``[B, T, H, D]`` (kernel convention)."""
    return x.transpose(1, 2)


def from_kernel_layout(x: torch.Tensor) -> torch.Tensor:
    """``[B, T, H, D]`` -> ``[B, H, T, D]``."""
    return x.transpose(1, 2)


def repeat_kv(x: torch.Tensor, groups: int, dim: int = 1) -> torch.Tensor:
    """Repeat each kv head ``groups`` times along ``dim`` (GQA -> one kv head per query head)."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=dim)


def key_keep_from_bias(bias: torch.Tensor | None, batch: int, tk: int) -> torch.Tensor | None:
    """``[B, Tk]`` bool, False for padded keys among the call's last ``tk`` keys, or None if all real.

    Key ``j`` is real when its own query row sees it (the diagonal of a causal mask) and that row sees
    no later key. The second condition catches padding rows that a host "unmasked" (filled with
    zeros so SDPA does not return NaN); reading the diagonal rather than the last row keeps keys that
    a sliding-window mask hides from later queries.
    """
    if bias is None:
        return None
    keep = bias_to_keep(bias)
    while keep.dim() < 4:
        keep = keep.unsqueeze(0)
    tq_b, tk_b = keep.shape[-2:]
    if tq_b < tk:
        # a broadcast row: only the last-row reading is possible
        real = keep[:, :, -1, tk_b - tk :].any(dim=1)  # heads agree on padding
    else:
        # the rows of this call's tokens, bottom-right aligned; a later key can only be one of the
        # call's own (the last tk columns), so only that [tk, tk] corner is read
        rows = keep[:, :, tq_b - tk :, tk_b - tk :].any(dim=1)  # [B | 1, tk, tk]
        own = torch.arange(tk, device=keep.device)
        real = rows[:, own, own] & ~(rows & (own[None, :] > own[:, None])).any(-1)
    real = real.expand(batch, tk)
    return None if bool(real.all()) else real


def bias_to_keep(bias: torch.Tensor) -> torch.Tensor:
    """A boolean ``keep`` mask (True = may attend) from a boolean or additive mask."""
    if bias.dtype == torch.bool:
        return bias
    return bias > torch.finfo(bias.dtype).min / 2


def adds_to_scores(bias: torch.Tensor) -> bool:
    """Whether an additive mask holds finite non-zero terms where it lets a query attend (a position
    bias such as ALiBi's), beyond the causal, window and padding structure of its −inf entries."""
    if bias.dtype == torch.bool:
        return False
    return bool((bias.masked_fill(~bias_to_keep(bias), 0) != 0).any())


def score_terms_problem(site: object, reader: str) -> str | None:
    """The skip reason for a core (``reader``) that reads only a mask's causal structure and key padding,
    when ``site``'s mask adds terms to the scores (a position bias, learned terms, a sink key); else None."""
    if getattr(site, "mask", None) == "bias":
        return (f"the mask adds terms to the scores (a position bias, learned terms or a sink key), which "
                f"{reader} does not read")
    return None


def require_hidden(hidden: torch.Tensor | None, target: str) -> torch.Tensor:
    if hidden is None:
        raise InputError(
            f"the {target!r} core reads the attention block's input (hidden=[B, T, d_model]) for its "
            "gates/logits, but it was called with hidden=None"
        )
    return hidden


def check_full_call(q: torch.Tensor, k: torch.Tensor, target: str) -> None:
    """Without ``state`` a core runs a full causal forward: queries and keys are the same tokens."""
    if q.shape[-2] != k.shape[-2]:
        raise InputError(
            f"the {target!r} core got {q.shape[-2]} queries for {k.shape[-2]} keys without a state; "
            "a host-side KV cache cannot be used with this target, pass state= for decoding"
        )


def attention_site_problem(site: Site, *, needs_width: bool = False) -> str | None:
    """The reason a causal-only target cannot serve ``site``, or None."""
    if not isinstance(site, AttentionSite):
        return f"not an attention site ({site.kind})"
    if site.cross:
        return "cross-attention (keys from another sequence) has no causal state to replace it"
    if not site.causal:
        return "bidirectional attention: this target is causal only"
    if site.softcap is not None:
        return "logit soft-capping is not supported by this target"
    if site.num_kv_heads and site.num_heads % site.num_kv_heads:
        return f"{site.num_heads} query heads do not split into {site.num_kv_heads} kv groups"
    if needs_width and all(p is None for p in (site.q_proj, site.k_proj, site.v_proj)):
        return "no q/k/v projection weights to read the model width (d_model) from"
    return None


def _projection_in_features(ref: ProjectionRef, weights: Mapping[str, torch.Tensor]) -> int:
    w = weights[ref.weight]
    return int(w.shape[0] if ref.transposed else w.shape[1])


def site_model_dim(site: AttentionSite, weights: Mapping[str, torch.Tensor]) -> int:
    """``d_model`` of an attention site: the input width of its q (else k, v) projection."""
    for ref in (site.q_proj, site.k_proj, site.v_proj):
        if ref is not None:
            return _projection_in_features(ref, weights)
    raise ConfigError(f"site {site.name} has no q/k/v projection to read d_model from")


def projection_weight(
    ref: ProjectionRef | None, weights: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """A detached copy of a host projection as ``(weight [out, in], bias [out] | None)``."""
    linear = copy_projection(ref, weights)
    if linear is None:
        return None
    bias = linear.bias.detach().clone() if linear.bias is not None else None
    return linear.weight.detach().clone(), bias


def uniform_gate_bias(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``logit(u)``, ``u ~ U[1/n, 1 - 1/n]``: the uniform gate initialisation (seeds 4.4).

    The sigmoid of the result is spread uniformly over (0, 1), so the gates start with every
    time scale from ~1 token to ~n tokens.
    """
    lo = 1.0 / max(n, 2)
    u = lo + (1 - 2 * lo) * torch.rand(n, generator=generator, dtype=torch.float64)
    return torch.log(u / (1 - u)).float()


# the one table of FFN activations by the names the detectors give them
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}


def ffn_site_problem(site: Site) -> str | None:
    if not isinstance(site, FFNSite):
        return f"not an FFN site ({site.kind})"
    if site.activation not in ACTIVATIONS:
        return f"activation {site.activation!r} is not one of {sorted(ACTIVATIONS)}"
    if site.up_proj is None or site.down_proj is None:
        return "the FFN site has no up/down projection weights"
    if site.gated and site.gate_proj is None:
        return "gated FFN without a gate projection"
    return None


class HostFFN(nn.Module):
    """A copy of a host feed-forward block: ``down(act(up(x)))`` or ``down(act(gate(x)) * up(x))``."""

    def __init__(
        self,
        d_model: int,
        hidden_size: int,
        activation: str = "gelu",
        gated: bool = False,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ConfigError(f"activation {activation!r} is not one of {sorted(ACTIVATIONS)}")
        self.activation = activation
        self.up = nn.Linear(d_model, hidden_size, bias=bias)
        self.gate = nn.Linear(d_model, hidden_size, bias=bias) if gated else None
        self.down = nn.Linear(hidden_size, d_model, bias=bias)

    @classmethod
    def from_site(cls, site: FFNSite, weights: Mapping[str, torch.Tensor]) -> HostFFN:
        up = copy_projection(site.up_proj, weights)
        down = copy_projection(site.down_proj, weights)
        gate = copy_projection(site.gate_proj, weights) if site.gated else None
        assert up is not None and down is not None
        ffn = cls(up.in_features, up.out_features, site.activation, site.gated)
        ffn.up, ffn.down, ffn.gate = up, down, gate
        return ffn

    @property
    def gated(self) -> bool:
        return self.gate is not None

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        act = ACTIVATIONS[self.activation]
        if self.gate is None:
            return act(self.up(x))
        return act(self.gate(x)) * self.up(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.hidden(x))

    def flops_per_token(self) -> int:
        n_in = 3 if self.gated else 2
        return 2 * n_in * self.up.in_features * self.up.out_features


def sdpa_flops_per_token(num_heads: int, head_dim: int, value_dim: int, context_len: int) -> int:
    """Core FLOPs of dense softmax attention for one query over ``context_len`` keys."""
    return 2 * num_heads * context_len * (head_dim + value_dim)


def window_keep(
    q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None = None, sinks: int = 0
) -> torch.Tensor:
    """``[Tq, Tk]`` bool from absolute query/key positions, True where a query may attend: causal
    (``j ≤ i``) and, with a window, ``i − j < window`` or ``j < sinks`` (the window counts the query).

    The one window rule of the package: the ``window`` target, the hybrids' exact part and the exact
    target's causal / host-window masks (``causal_window_keep``) all read it.
    """
    i, j = q_pos[:, None], k_pos[None, :]
    keep = j <= i
    if window is not None:
        keep = keep & ((i - j < window) | (j < sinks))
    return keep


def causal_window_keep(tq: int, tk: int, window: int | None, device: torch.device) -> torch.Tensor:
    """:func:`window_keep` for a call's ``tq`` queries over ``tk`` keys, bottom-right aligned (the
    queries are the last ``tq`` of the ``tk`` positions), no sinks."""
    return window_keep(torch.arange(tk - tq, tk, device=device), torch.arange(tk, device=device), window)


def window_buffer_slices(
    last: int, length: int, sinks: int, lo: int, hi: int
) -> tuple[int, int, int]:
    """Where keys ``lo .. hi − 1`` and the sinks before ``lo`` lie in a key buffer, as index slices.

    The buffer holds ``length`` keys whose positions increase and end at ``last``: the sinks
    ``0 .. min(sinks, last + 1) − 1`` first, then one contiguous run (what the window and hybrid
    states keep: every position from the window's start on, so ``lo`` must not fall in a gap between
    the sinks and the run). Returns ``(sink_end, run_start, run_end)``: ``buffer[:sink_end]`` are the
    sinks with positions ``< lo`` and ``buffer[run_start:run_end]`` the positions ``lo .. hi − 1``.
    """
    offset = length - 1 - last  # buffer index of a run position p is p + offset
    lo = max(lo, 0)
    return min(sinks, lo, last + 1), lo + offset, max(lo, hi) + offset


def masked_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, scale: float
) -> torch.Tensor:
    """SDPA with a boolean keep mask and GQA; rows that see nothing return zeros, not NaN."""
    gqa = k.shape[-3] != q.shape[-3]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale, enable_gqa=gqa)
    empty = ~keep.any(dim=-1, keepdim=True)
    if bool(empty.any()):
        out = out.masked_fill(empty, 0.0)
    return out


def sdpa_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax(q kᵀ + bias) v`` and each row's log-sum-exp ``log Σ e^{q kᵀ + bias}`` (no scaling:
    fold it into ``q`` or ``k``), from PyTorch's fused CPU attention kernel, for inference only.

    The kernel is the one SDPA runs on CPU; it never materialises the scores, which is why the cat
    hybrid's far read uses it (its prefill core at SmolLM2's shapes, 32k tokens: 1,643 → 874 ms per
    layer, ``benchmarks/profile_smollm2.py --cores --targets cat``). Rows whose keys are all masked
    come back with an undefined log-sum-exp: the caller must zero them. CPU tensors, no autograd.
    """
    if q.device.type != "cpu" or torch.is_grad_enabled():
        raise InputError("sdpa_with_lse runs the CPU inference kernel: CPU tensors under torch.no_grad()")
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=bias, scale=1.0)


def next_power_of_two(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def state_pos(state: dict | None) -> int:
    return 0 if state is None else int(state.get("pos", 0))


def evicted_first(old: torch.Tensor, new: torch.Tensor, sinks: int) -> torch.Tensor:
    """A full window's cache and the new token as one tensor (token axis 2), evicted token first.

    ``old`` holds the sinks then tokens ``i − w + 1 .. i − 1``; with ``new`` (token ``i``) those are
    exactly the keys query ``i`` sees. The result is ``[token i − w + 1, sinks, i − w + 2 .. i − 1,
    new]``: one concatenation, an order the softmax ignores, and the cache after the step is the
    view from row 1 on (one row more storage than it needs).
    """
    parts = [old, new] if not sinks else [old[:, :, sinks:sinks + 1], old[:, :, :sinks], old[:, :, sinks + 1:], new]
    return torch.cat(parts, dim=2)


def full_window_step(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, state: dict | None,
                     sinks: int, window: int) -> bool:
    """Whether a call is one token after the window has filled (``sinks + window − 1`` cached keys,
    the layout :func:`evicted_first` reads), with no mask, no gradient and no padding: the decoding
    step ``generate()`` takes, which the ``window`` and hybrid cores run as one unmasked softmax."""
    return (state is not None and bias is None and q.shape[-2] == 1 and k.shape[-2] == 1 and window > 1
            and not torch.is_grad_enabled() and "k" in state and state_pos(state) >= sinks + window - 1
            and state["k"].shape[2] == sinks + window - 1 and state["k"].dtype == k.dtype
            and state_keys_real(state))


@functools.lru_cache(maxsize=64)
def window_position_step(device: torch.device, sinks: int, window: int) -> torch.Tensor:
    """``[sinks + window − 1]`` int64: 0 for the sinks, 1 for the run, what a full window's cached
    positions gain per decoding step (built once per device and shape; read, never written)."""
    return (torch.arange(sinks + window - 1, device=device) >= sinks).long()


def state_keys_real(state: dict | None) -> bool:
    """Whether every key a decoding state holds is real (no padding).

    ``state["padded"]`` (a Python bool the cores write with ``keep``) answers without reading the
    device: a GPU sync per layer and step stalls the launch queue. Where it says padded or is
    missing, ``keep`` is read once and the answer remembered (padding leaves the window in time).
    """
    if state is None or "keep" not in state:
        return True
    if state.get("padded", True):
        state["padded"] = not bool(state["keep"].all())
    return not state["padded"]
