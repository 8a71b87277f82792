"""``"worker"``: worker-sparse attention and FFN (WorkerTransformer, seeds §1) at a pretrained block.

Worker set of a call covering positions ``p0 .. p0+T-1`` with interval ``k``::

    W = { t : t mod k = k−1 } ∪ { p0+T−1 }        (the last position is a worker: forced, or transient)

Attention core (``q, k, v`` are the host's, post-RoPE)::

    [k'|v']_t = β + a₀⊙[k|v]_{t−2} + a₁⊙[k|v]_{t−1} + a₂⊙[k|v]_t     causal depthwise conv, all t
    o_w = 2 σ(x_w W_G) ⊙ Σ_{j≤w} softmax_j(scale · q_w·k'_j) v'_j         w ∈ W (per head, GQA)
    o_t = Σ_{j∈N_t} softmax_j(scale · q_t·k'_j) v'_j                       t ∉ W, local_window > 0
    o_t = 0                                                                t ∉ W, local_window = 0

    N_t = { j ≤ t : t − j < local_window  or  j < sinks }                  (the ``window`` target's set)

Mapping: the seed convolves the residual stream before the norm and the projections; a core only
sees the projected ``k, v``, so the conv runs on them instead (the same map at the identity taps, and
a linear token mixer either way). The gate reads ``hidden`` (the block input) and multiplies the
per-head output before the host ``o_proj``; the factor 2 stands in for the seed's ``W_O ← 2·Wo``.
Start (seeds 1.3): taps ``(0, 0, 1)``, ``β = 0``, ``W_G = 0`` — at ``k = 1`` exactly the host's causal
attention; for ``k > 1`` no start preserves the host (non-worker rows see only their local window,
or, with ``local_window = 0``, stop being updated).

Local window (``local_window > 0``, the default 64 + 4 sinks; a departure from the seed). In the seed
a non-worker row reads nothing: its output is 0 and its residual stream stays its embedding, so its
logits are a function of its own token only (seeds 1.1), and on a converted pretrained model 3/4 of
the rows (``k = 4``) lose all context. Here a non-worker row reads its local window with the host's
softmax, over the same keys/values ``k', v'`` the workers read (the host's ``k, v`` at the start
taps), with the host's query and scale: the whole layer is then ONE masked
softmax attention over one key set, each row with its own visible set (``j ≤ t`` at a worker,
``N_t`` elsewhere) — a row-sparse pattern; nothing else (no summary of the far keys) enters a
non-worker's normaliser, so what lies beyond its window reaches it only through the keys of the
workers inside the window (their residual streams carry the context of the layers below). The gate
stays worker-only (``W_G`` is computed at worker rows, as in the seed; at its start ``2σ(0) = 1``
is the same as no gate). Kept from the seed: the worker set, the workers' dense attention, gate and
FFN (the FFN core is unchanged: non-workers still skip the FFN). Cost: ``O(T·(window + sinks))`` on
the non-worker rows, beside the workers' ``O(T²/k)``; no new parameters; no state of its own (the
window's keys are in the workers' full cache). Degenerate cases (tests): ``local_window = 0`` is the
seed bit for bit; ``local_window ≥ T`` gives every non-worker row the causal softmax attention over
``k', v'``, hence, at the start (taps ``(0, 0, 1)``, ``β = 0``, ``W_G = 0``), the attention core
equals the host's causal attention at every row for every ``k`` (the seed's start does only at
``k = 1``). Prefix consistency is as before: the stored rows' outputs are causal, only the last
(forced worker) row depends on where the input ends. Padding keys (from the mask) are skipped and the
window and sinks count tensor positions, as in the ``window`` target (right padding gives each
sequence what it gives alone; a Hugging Face model runs a padded sequence on its real tokens only).

FFN core: ``y_t = FFN(x_t)`` for ``t ∈ W`` and ``y_t = 0`` otherwise, with the host FFN copied.
Residual stream: a non-worker row gets ``x + o_proj(o_t) + 0``: with ``local_window = 0`` it is not
updated except for the host's o_proj bias (zero in Llama-family hosts), so as in the seed it stays
(close to) its embedding and acts only as a key/value source; with the local window it carries its
window's attention (but never an FFN update). Positions count real tokens: the FFN core takes the call's
``positions`` and ``keep`` ``[B, T]`` (a Hugging Face model passes them from its 2-D mask, so left
padding gives each prompt what it gives alone); without them it counts from the state's, or from 0.

Decoding (seeds 1.2, exact). The state keeps the conv'd keys/values of every stored token, the last
two raw ``[k|v]`` rows (conv inputs) and ``pos``. A token decoded as the last of its call must be a
worker (its output is the next-token prediction), but in the full forward of any longer input it is a
non-worker (unless a residue), and in a multi-layer model the keys/values the deeper layers store for
it must be the non-worker ones. So a call can end with ``transients`` repeats of its last tokens:

- the call's own tokens (the rows before the repeats) are processed as in the full forward of a
  longer input (workers at residues only, no forced last worker; the other rows over their local
  window of stored keys) and are the only ones stored;
- repeat ``j`` of token ``p`` is a transient worker at position ``p``: it attends over the stored keys
  before ``p`` and over its own conv'd key/value (conv of the stored raw rows before ``p`` and its own
  raw row), which stands in for ``p``'s stored one; nothing of it is stored.

Through the layers, the repeat carries the worker version of ``p``'s residual stream and the stored
row the non-worker one, so the repeat's output equals the full forward of the prefix ``0 .. p`` at its
last position, and the state equals that of the full forward of any longer input: decoding token by
token equals the full forward of each prefix, beams and crop (replay of stored rows) stay exact.
A Hugging Face model does the repeating for the user (``rewriter/hf_cache.py``): every call that uses
the cache repeats its last token (its last ``logits_to_keep`` tokens when more logits are asked for:
assisted decoding verifies each candidate as a decoded token) and drops the stored copies from its
outputs; the FFN core is told the count too, and runs at the repeats and at the stored residues
(:func:`worker_rows`). Cost: each decode step runs two rows through the model (projections, norms,
host FFN) instead of one; the stored row attends, and runs a worker FFN, only at residues. If some
attention layer of the model is not a worker core (a partial conversion, worker FFN under host
attention included), its host cache would store the repeat: there the model does not repeat and
decoding is approximate (the decoded token keeps its worker keys/values in deeper layers; warned).
A plain call without ``transients`` (the full forward) makes its last position a forced worker.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Mapping

import torch
from torch import nn

from swapformer.errors import ConfigError, InputError
from swapformer.sites import AttentionSite, FFNSite, Site
from swapformer.targets.base import TargetConfig, TargetModule, register_target
from swapformer.targets.reference import (
    HostFFN,
    attention_site_problem,
    check_full_call,
    ffn_site_problem,
    from_kernel_layout,
    key_keep_from_bias,
    masked_sdpa,
    require_hidden,
    site_model_dim,
    state_pos,
    to_kernel_layout,
    window_keep,
)

logger = logging.getLogger(__name__)

# query block of the non-worker local window (the hybrids' measured best at window 64)
_LOCAL_BLOCK = 64


@functools.cache
def _note_local_window_path() -> None:
    logger.info("worker: the non-worker local window runs on PyTorch SDPA; the Triton worker kernel "
                "computes the worker rows only")


@dataclasses.dataclass(frozen=True, kw_only=True)
class WorkerConfig(TargetConfig):
    """Options of the ``"worker"`` target.

    Args:
        interval: worker interval k (every k-th position and the last are workers; 1 = all).
        conv_kernel: taps of the causal depthwise conv on keys/values (the seed uses 3).
        gate: learn the output gate ``2 σ(x W_G)`` (False: no gate, output as the host).
        local_window: keys a non-worker row sees, counting itself (``t − j < local_window``), with
            the host's softmax; 0 = the seed's context-free non-workers (module docstring, "Local
            window").
        sinks: first positions every non-worker row also sees (with ``local_window > 0``).
    """

    name = "worker"
    interval: int = 4
    conv_kernel: int = 3
    gate: bool = True
    local_window: int = 64
    sinks: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.interval < 1:
            raise ConfigError(f"worker interval must be >= 1, got {self.interval}")
        if self.conv_kernel < 1:
            raise ConfigError(f"worker conv_kernel must be >= 1, got {self.conv_kernel}")
        if self.local_window < 0:
            raise ConfigError(f"worker local_window must be >= 0 (0 = the seed), got {self.local_window}")
        if self.sinks < 0:
            raise ConfigError(f"worker sinks must be >= 0, got {self.sinks}")


def worker_positions(start: int, length: int, interval: int, device: torch.device,
                     forced_last: bool = True) -> torch.Tensor:
    """Absolute worker positions among ``start .. start+length-1``: the residues, plus the last
    position when ``forced_last``."""
    t = torch.arange(start, start + length, device=device)
    is_worker = t % interval == interval - 1
    if forced_last:
        is_worker |= t == start + length - 1
    return t[is_worker]


def worker_rows(positions: torch.Tensor, keep: torch.Tensor | None, interval: int,
                transients: int = 0) -> torch.Tensor:
    """``[B, T]`` True at the worker rows of a call: residues among the real stored tokens, the real
    repeats (the last ``transients`` rows), and, in a row without a real repeat, its last real token
    (the forced last worker).

    Args:
        positions: ``[B, T]`` (or ``[T]``) position of each token counted over real tokens only.
        keep: ``[B, T]`` True at real tokens (None: all real).
        interval: the worker interval k.
        transients: how many of the last rows repeat the tokens before them (module docstring).
    """
    positions = positions if positions.dim() == 2 else positions[None]
    if keep is None:
        keep = torch.ones(positions.shape, dtype=torch.bool, device=positions.device)
    col = torch.arange(keep.shape[-1], device=keep.device)
    stored = keep & (col < keep.shape[-1] - transients)
    repeat = keep & ~stored
    last_real = torch.where(stored, col, -1).amax(dim=-1, keepdim=True)
    forced = (col == last_real) & ~repeat.any(dim=-1, keepdim=True)
    return (stored & (positions % interval == interval - 1)) | repeat | forced


def _cat_keep(old: torch.Tensor | None, new: torch.Tensor | None, t_old: int, t_new: int,
              batch: int) -> torch.Tensor | None:
    """Padding flags of old keys followed by new keys (None: all real)."""
    if old is None and new is None:
        return None
    old = old if old is not None else torch.ones(batch, t_old, dtype=torch.bool, device=new.device)
    new = new if new is not None else torch.ones(batch, t_new, dtype=torch.bool, device=old.device)
    return torch.cat([old, new], 1)


@register_target(WorkerConfig)
class WorkerAttention(TargetModule):
    """Worker-sparse attention core; see the module docstring."""

    site_kind = "attention"
    stateful = True
    # decoding through Hugging Face repeats each call's last token as the transient worker
    carries_last_token = True

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        d_model: int,
        scale: float | None = None,
        config: WorkerConfig | None = None,
    ) -> None:
        super().__init__()
        self.config = config or WorkerConfig()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.d_model = d_model
        self.scale = scale if scale is not None else head_dim**-0.5
        channels = 2 * num_kv_heads * head_dim
        taps = torch.zeros(channels, self.config.conv_kernel)
        taps[:, -1] = 1.0
        self.conv_weight = nn.Parameter(taps)
        self.conv_bias = nn.Parameter(torch.zeros(channels))
        self.gate = nn.Linear(d_model, num_heads * head_dim, bias=False) if self.config.gate else None
        if self.gate is not None:
            nn.init.zeros_(self.gate.weight)

    @classmethod
    def unsupported(cls, site: Site, config: TargetConfig) -> str | None:
        reason = attention_site_problem(site, needs_width=True)
        if reason is None and site.value_dim not in (0, site.head_dim):
            return "value head width differs from the key head width"
        return reason

    @classmethod
    def from_site(
        cls, site: Site, config: TargetConfig, weights: Mapping[str, torch.Tensor]
    ) -> WorkerAttention:
        assert isinstance(site, AttentionSite) and isinstance(config, WorkerConfig)
        return cls(site.num_heads, site.num_kv_heads or site.num_heads, site.head_dim,
                   site_model_dim(site, weights), site.scale, config)

    def _conv(self, raw: torch.Tensor) -> torch.Tensor:
        """The causal conv over ``[k|v]`` rows ``[B, T, 2·Hkv·D]``."""
        from swapformer.kernels.worker import causal_dwconv

        return causal_dwconv(raw, self.conv_weight.to(raw.dtype), self.conv_bias.to(raw.dtype))

    def _split(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k2, v2 = u.split(u.shape[-1] // 2, dim=-1)
        shape = u.shape[:2] + (self.num_kv_heads, self.head_dim)
        return k2.reshape(shape), v2.reshape(shape)

    def _conv_inputs(self, raw: torch.Tensor, state: dict | None) -> torch.Tensor:
        """This call's raw rows after the state's last ones (the conv's left context); stores the
        new last rows in the state."""
        if state is not None and "conv_in" in state:
            raw = torch.cat([state["conv_in"], raw], dim=1)
        if state is not None:
            state["conv_in"] = raw[:, raw.shape[1] - min(self.config.conv_kernel - 1, raw.shape[1]):]
        return raw

    def _cache(self, k, v, keep, state):
        """Append this call's keys/values (and padding flags) to the state; return the full ones."""
        if state is None:
            return k, v, keep
        if "k" in state:
            keep = _cat_keep(state.get("keep"), keep, state["k"].shape[1], k.shape[1], k.shape[0])
            k, v = torch.cat([state["k"], k], 1), torch.cat([state["v"], v], 1)
        state["k"], state["v"], state["keep"] = k, v, keep
        return k, v, keep

    def _workers(self, start: int, t: int, keep: torch.Tensor | None, device: torch.device,
                 forced_last: bool):
        """Worker positions of the call, and per-row flags when padding makes them differ by row.

        With right padding the forced-last worker of a row is its last real token, not position
        ``T-1``: those positions join the union, and ``rows [B, W]`` says which row each serves.
        """
        idx = worker_positions(start, t, self.config.interval, device, forced_last)
        if keep is None or not forced_last:
            return idx, None
        pos = torch.arange(start, start + t, device=device)
        last_real = torch.where(keep, pos, -1).amax(dim=1)  # [B]
        residue = pos % self.config.interval == self.config.interval - 1
        per_row = residue[None] | (pos[None] == last_real[:, None])  # [B, T]
        if bool((per_row[:, idx - start].all(0)).all()) and bool(per_row.sum(1).eq(len(idx)).all()):
            return idx, None
        union = per_row.any(0)
        return pos[union], per_row[:, union]

    def _attend(self, q_w, k, v, idx, keep):
        from swapformer.kernels.worker import worker_attention

        if keep is None:
            return worker_attention(q_w, k, v, idx, scale=self.scale)
        # padded keys: the kernel has no mask, use SDPA with causal ∧ key-padding rows
        mask = (torch.arange(k.shape[1], device=k.device)[None, :] <= idx[:, None])[None, None]
        mask = mask & keep[:, None, None, :]
        out = masked_sdpa(q_w.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, self.scale)
        return out.transpose(1, 2)

    def _gated(self, o_w: torch.Tensor, hidden: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
        if self.gate is None:
            return o_w
        g = 2.0 * torch.sigmoid(self.gate(hidden[:, rows].to(o_w.dtype)))
        return o_w * g.view(o_w.shape)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        hidden: torch.Tensor | None = None,
        state: dict | None = None,
        transients: int = 0,
    ) -> torch.Tensor:
        """``transients``: the call's last rows repeat that many tokens before them (see "Decoding"
        in the module docstring); the rows before them are stored with workers at residues only, the
        repeats are transient workers and leave nothing in the state."""
        if state is None:
            check_full_call(q, k, self.target_name)
        if self.gate is not None:
            hidden = require_hidden(hidden, self.target_name)
        b, h, t, _ = q.shape
        stored = t - transients
        if not 0 <= transients <= stored:
            raise InputError(f"a worker call of {t} rows cannot end with {transients} repeated tokens")
        start = state_pos(state)
        keep = key_keep_from_bias(bias, b, t)
        raw = torch.cat([to_kernel_layout(k).reshape(b, t, -1), to_kernel_layout(v).reshape(b, t, -1)], -1)
        u = self._conv(self._conv_inputs(raw[:, :stored], state))[:, -stored:]
        keep_stored = None if keep is None else keep[:, :stored]
        k_all, v_all, keep_all = self._cache(*self._split(u), keep_stored, state)
        q_in = to_kernel_layout(q)
        out = q_in.new_zeros(b, t, h, self.head_dim)
        idx, rows = self._workers(start, stored, keep_stored, q.device, forced_last=not transients)
        if len(idx):
            o_w = self._gated(self._attend(q_in[:, idx - start], k_all, v_all, idx, keep_all), hidden,
                              idx - start)
            out[:, idx - start] = o_w if rows is None else o_w * rows[:, :, None, None]
        if self.config.local_window and stored:
            local = self._local(q_in[:, :stored], k_all, v_all, keep_all, start)
            is_worker = torch.zeros(b, stored, dtype=torch.bool, device=q.device)
            is_worker[:, idx - start] = True if rows is None else rows
            out[:, :stored] = torch.where(is_worker[:, :, None, None], out[:, :stored], local.to(out.dtype))
        if transients:
            own_u = u[:, stored - transients:] + self.conv_weight[:, -1].to(raw.dtype) * (
                raw[:, stored:] - raw[:, stored - transients:stored])  # the last tap reads the repeat
            own_keep = None if keep is None else keep[:, stored:]
            o_t = self._attend_transients(q_in[:, stored:], own_u, k_all, v_all, keep_all, own_keep,
                                          start + stored - transients)
            out[:, stored:] = self._gated(o_t, hidden, slice(stored, None))
        if state is not None:
            state["pos"] = start + stored
        return from_kernel_layout(out)

    def _local(self, q, k_all, v_all, keep_all, start):
        """The stored rows' queries ``q [B, S, H, D]`` (positions ``start ..``) over the sinks and their
        window of the stored keys (``k_all`` holds every position from 0), one query block at a
        time: ``O(S·(window + block))``, never ``S × T``."""
        if q.is_cuda:
            _note_local_window_path()
        w, s, dev = self.config.local_window, self.config.sinks, q.device
        qh, kh, vh = q.transpose(1, 2), k_all.transpose(1, 2), v_all.transpose(1, 2)
        outs = []
        for a in range(0, q.shape[1], _LOCAL_BLOCK):
            qa, qb = start + a, start + min(q.shape[1], a + _LOCAL_BLOCK)
            lo = max(0, qa - w + 1)
            k_pos = torch.cat([torch.arange(min(s, lo), device=dev), torch.arange(lo, qb, device=dev)])
            visible = window_keep(torch.arange(qa, qb, device=dev), k_pos, w, s)[None, None]
            if keep_all is not None:
                visible = visible & keep_all[:, k_pos][:, None, None]
            outs.append(masked_sdpa(qh[:, :, a:a + qb - qa], kh[:, :, k_pos], vh[:, :, k_pos], visible,
                                    self.scale))
        return torch.cat(outs, 2).transpose(1, 2)

    # one repeat without padding (every decoding step) runs _attend_one_transient (False: the masked
    # SDPA over a copy of the whole cache, which the tests take as the reference)
    one_transient_fast = True

    def _attend_one_transient(self, q_t, own_k, own_v, k_seen, v_seen):
        """The one repeat's softmax over the stored keys before its token (``k_seen``, a view of the
        cache) and its own key, as two products, so the cache is never concatenated nor copied.
        ``q_t [B, 1, H, D]``, ``own_k, own_v [B, 1, Hkv, D]``, ``k_seen, v_seen [B, P, Hkv, D]``."""
        b, _, h, d = q_t.shape
        hk = own_k.shape[2]
        qg = q_t.reshape(b, hk, h // hk, d) * self.scale  # [B, Hkv, G, D]
        stored = torch.matmul(qg, k_seen.permute(0, 2, 3, 1))  # [B, Hkv, G, P]
        own = torch.matmul(qg, own_k.view(b, hk, d, 1))  # [B, Hkv, G, 1]
        p = torch.softmax(torch.cat([stored, own], -1), dim=-1)
        out = torch.matmul(p[..., :-1], v_seen.transpose(1, 2)).addcmul_(p[..., -1:], own_v.view(b, hk, 1, d))
        return out.reshape(b, 1, h, d)

    def _attend_transients(self, q_t, own_u, k_all, v_all, keep_all, own_keep, first_pos):
        """Repeat ``j`` (of the token at ``first_pos + j``) attends over the stored keys before its
        token and over its own conv'd key/value, which stands in for its token's stored one."""
        m, n = q_t.shape[1], k_all.shape[1]
        own_k, own_v = self._split(own_u)
        if self.one_transient_fast and m == 1 and keep_all is None and own_keep is None:
            return self._attend_one_transient(q_t, own_k, own_v, k_all[:, :first_pos], v_all[:, :first_pos])
        k_t, v_t = torch.cat([k_all, own_k], 1), torch.cat([v_all, own_v], 1)
        pos = first_pos + torch.arange(m, device=q_t.device)
        stored_seen = torch.arange(n, device=q_t.device)[None] < pos[:, None]  # [m, n]
        own_seen = torch.eye(m, dtype=torch.bool, device=q_t.device)
        mask = torch.cat([stored_seen, own_seen], 1)[None, None]  # [1, 1, m, n + m]
        keep_t = _cat_keep(keep_all, own_keep, n, m, q_t.shape[0])
        if keep_t is not None:
            mask = mask & keep_t[:, None, None, :]
        out = masked_sdpa(q_t.transpose(1, 2), k_t.transpose(1, 2), v_t.transpose(1, 2), mask, self.scale)
        return out.transpose(1, 2)

    def flops_per_token(self, context_len: int) -> int:
        """Average per token: conv on every row; attention and gate on 1/interval of the rows; the
        local window (sinks + window keys) on the other rows."""
        h, d, k = self.num_heads, self.head_dim, self.config.interval
        conv = 2 * self.config.conv_kernel * self.conv_bias.numel()
        attend = 4 * h * d * context_len
        gate = 0 if self.gate is None else 2 * self.d_model * h * d + h * d
        local = 0
        if self.config.local_window:
            visible = min(context_len, self.config.local_window + self.config.sinks)
            local = 4 * h * d * visible * (k - 1) // k
        return conv + (attend + gate) // k + local

    def state_bytes(self, context_len: int) -> int:
        """Full (conv'd) KV cache of every past token plus the conv's last raw rows, fp32 (the local
        window reads from the same cache: no state of its own)."""
        rows = context_len + self.config.conv_kernel - 1
        return rows * self.conv_bias.numel() * 4



@register_target(WorkerConfig)
class WorkerFFN(TargetModule):
    """Host FFN applied at worker rows only; 0 elsewhere (see the module docstring)."""

    site_kind = "ffn"
    stateful = True

    def __init__(
        self,
        d_model: int,
        hidden_size: int,
        activation: str = "gelu",
        gated: bool = False,
        bias: bool = True,
        config: WorkerConfig | None = None,
    ) -> None:
        super().__init__()
        self.config = config or WorkerConfig()
        self.ffn = HostFFN(d_model, hidden_size, activation, gated, bias)

    @classmethod
    def unsupported(cls, site: Site, config: TargetConfig) -> str | None:
        return ffn_site_problem(site)

    @classmethod
    def from_site(
        cls, site: Site, config: TargetConfig, weights: Mapping[str, torch.Tensor]
    ) -> WorkerFFN:
        assert isinstance(site, FFNSite) and isinstance(config, WorkerConfig)
        host = HostFFN.from_site(site, weights)
        core = cls(host.up.in_features, host.up.out_features, site.activation, site.gated,
                   config=config)
        core.ffn = host
        return core

    # the Hugging Face FFN module passes the call's token positions and padding (rewriter/hf.py)
    reads_call_positions = True
    # its decoding is exact only with the repeated last tokens (module docstring)
    carries_last_token = True

    def forward(self, x: torch.Tensor, *, state: dict | None = None, positions: torch.Tensor | None = None,
                keep: torch.Tensor | None = None, transients: int = 0) -> torch.Tensor:
        """``positions`` ``[B, T]``: each token's position over real tokens (default: counted from the
        state's, or from 0); ``keep`` ``[B, T]``: real tokens; ``transients``: the last rows that
        repeat tokens. Workers: :func:`worker_rows`."""
        if x.dim() < 2:
            raise InputError("the worker FFN needs a token axis: x must be [..., T, d_model]")
        start, t = state_pos(state), x.shape[-2]
        if positions is None:
            positions = torch.arange(start, start + t, device=x.device)
        rows = worker_rows(positions.to(x.device), None if keep is None else keep.to(x.device),
                           self.config.interval, transients)
        rows = rows[0] if x.dim() == 2 else rows.expand(x.shape[:-1])
        y = x.new_zeros(x.shape[:-1] + (self.ffn.down.out_features,))
        y[rows] = self.ffn(x[rows]).to(y.dtype)
        if state is not None:
            state["pos"] = start + t
        return y

    def new_parameters(self) -> list[nn.Parameter]:
        return []

    def flops_per_token(self, context_len: int = 0) -> int:
        return self.ffn.flops_per_token() // self.config.interval

    def state_bytes(self, context_len: int = 0) -> int:
        return 0


