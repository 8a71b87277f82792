"""``"elita"``: ELiTA attention and feed-forward (seeds §2) in place of softmax attention / the MLP.

Attention, per query head ``h`` (index dropped), ``x_i`` the attention block's input (``hidden``)::

    s_i = i · position_step                               fixed step: prefix-consistent (seeds 2.10)
    p₁(i) = Σ_r c_r sin(a₁ᵣ s_i + b₁ᵣ),  p₂(i) = Σ_r c_r sin(a₂ᵣ s_i + b₂ᵣ)     (c shared)
    κ_j = k₁·x_j + p₁(j),   δ_i = k₂·x_i + δ₀,   ρ_i = k₃·x_i + p₂(i)
    C, D, Q = exp(clip κ), exp(clip δ), exp(clip ρ)        (separate clips to [−clip, clip])
    y_i = (Q_i Σ_{j≤i} C_j v_j + D_i v_i) / (Q_i Σ_{j≤i} C_j + D_i)

``v`` is the host's value (per head, ``a = head_dim``; GQA kv heads repeated) and the caller applies the
host ``o_proj``, so Wv and Wo are kept exactly; Wq and Wk have no counterpart (one scalar key per head).
``δ₀`` (per head) is an addition to the seed: the seed can only make the self slot vanish through a very
negative ``k₂``, which needs a constant input direction; a bias does it for every input.

Initialisation (seeds 2.5/2.9, constant-query approximation): the row softmax over past keys equals the
host's softmax for a query fixed at ``q̄``: ``k₁ = scale · Wk_gᵀ q̄`` (RoPE and the key bias, constant
along the row, are dropped). ``from_site`` takes ``q̄ = b_q`` of the head, the mean query over zero-mean
inputs (zero for bias-free hosts, so the history starts as a running mean of the values);
:meth:`ElitaAttention.init_from_hidden` re-estimates ``q̄ = mean(Wq x + b_q)`` from sample inputs.
``k₃ = 0``, ``c = 0``, ``k₂ = 0``, ``δ₀ = −clip`` (self slot off), ``a, b ~ U(−0.05, 0.05)``.
Decoding keeps ``(S, Z) = (Σ C_j v_j, Σ C_j)`` and the position counter in ``state``.

Hybrid form (the default, ``local_window > 0``; issue 12): :class:`HybridElita`, an exact window of
``local_window`` keys plus ``sinks`` and the ELiTA sums over the evicted tokens in one normaliser
(:mod:`swapformer.targets.hybrid`)::

    m_i = Q_i Σ_{j ∈ F_i} C_j v_j,   n_i = Q_i Σ_{j ∈ F_i} C_j              (per query head)
    y_i = (Σ_{N_i} e^{scale q_i·k_j − c_i} v_j + g_h m_i) / (Σ_{N_i} e^{…} + g_h n_i)

with ``C, Q`` as above; the self slot ``D`` is dropped (the token itself is in the exact window), so
``k₂, δ₀`` are unused. ``κ_j`` is computed when token ``j`` arrives and kept with the window's keys
until it is evicted (``H`` floats per cached token). ``local_window=0`` keeps the seed form.

Far-memory decay (``decay_half_life``, default 128 in the hybrid; issue 12): ``C`` is unnormalised, so without decay the far
sums grow with every evicted token and a memory fitted on 512-token rows outweighs the window at 2k
(RESULTS.md, session 14: 2k perplexity 41.6 → 49.9 after transfer while 512 improved). A learned
``γ_h = σ(λ_h)`` per head, initialised to ``2^(−1/decay_half_life)``, weighs token ``j`` (available
from query ``avail_j = j + w``) by ``γ_h^(i − avail_j)`` in ``m_i`` and ``n_i`` alike
(:class:`~swapformer.targets.hybrid.LinearFarMemory`, the same rule as fastweight's)::

    m_i = Q_i Σ_{j ∈ F_i} γ^(i − avail_j) C_j v_j,   n_i = Q_i Σ_{j ∈ F_i} γ^(i − avail_j) C_j

which bounds the far mass to ~``half_life / ln 2`` tokens' worth. The decayed prefill's tiles are the
chunked ones of ``LinearFarMemory`` (with decay) instead of one cumulative sum; the state keeps its size.

Feed-forward (seeds 2.2): ``A = swish(x W₁ + b₁)``, ``B = swish(x W₂ + b₂)`` (``r = linear_factor``),
``y = einsum(i,j,ijk->k)(A, B, W₃) + b₃``. From a non-gated swish (SiLU) MLP the mapping is exact
(``W₁ = W_up``, ``W₂ = 0``, ``b₂ = (β, 0, …)`` with ``swish(β) = 1``, ``W₃[:, 0] = W_down``). Other hosts
are approximate: GELU via ``gelu(z) ≈ swish(1.702 z)/1.702``, ReLU via ``swish(8 z)/8``, tanh via
``swish(z)``; gated (SwiGLU) hosts keep ``A = swish(gate x)`` and drop the up branch (``u ≡ 1``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from swapformer.errors import ConfigError
from swapformer.sites import AttentionSite, FFNSite, Site
from swapformer.targets.base import TargetConfig, TargetModule, copy_projection, register_target
from swapformer.targets.hybrid import (
    STATE_ELEMENT_BYTES,
    LinearFarMemory,
    check_cache_option,
    check_hybrid_options,
    hybrid_site_problem,
    own,
    query_rows,
)
from swapformer.targets.reference import (
    attention_site_problem,
    check_full_call,
    ffn_site_problem,
    from_kernel_layout,
    key_keep_from_bias,
    projection_weight,
    repeat_kv,
    require_hidden,
    site_model_dim,
    state_pos,
    to_kernel_layout,
)

logger = logging.getLogger(__name__)

# the hybrid's default: a 512-token training row evicts <= ~444 tokens; this half-life bounds the
# memory's mass to ~185 tokens' worth at any length (RESULTS.md, session 15)
DEFAULT_DECAY_HALF_LIFE = 128.0
# swish(β) = β σ(β) = 1: the constant slot that lets W₃[:, 0] reproduce a plain MLP
SWISH_ONE = 1.2784645427610738
# gelu(z) ≈ swish(1.702 z) / 1.702; relu(z) ≈ swish(8 z) / 8 (max error 0.035)
_SWISH_SHARPNESS = {"silu": 1.0, "gelu": 1.702, "gelu_tanh": 1.702, "relu": 8.0, "tanh": 1.0}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ElitaConfig(TargetConfig):
    """Options of the ``"elita"`` target.

    Args:
        position_width: number P of sinusoid components in each position term.
        position_step: position grid step ``s_i = i * position_step`` (fixed: prefix-consistent).
        clip: logits are clipped to ``[-clip, clip]`` before ``exp``.
        linear_factor: width r of the second FFN branch (the seed uses 8).
        ffn_width: width a_f of the first FFN branch (0 = the host's hidden width).
        local_window: exact window of the hybrid attention (0 = the seed's window-free form).
        sinks: first tokens every query of the hybrid also sees exactly.
        block_size: query block of the hybrid's prefill.
        mix_init: initial per-head mix ``g_h`` of the far memory. Smaller than the other hybrids'
            (1e-3): ``C = e^κ`` is unnormalised, and at 1e-3 its sum over ~2,000 evicted tokens already
            moved SmolLM2-135M's 2,048-token perplexity from 37.9 to 65.7 (benchmarks/RESULTS.md).
        decay_half_life: hybrid: initial half-life, in evicted tokens, of the learned per-head decay
            of the far memory (0 = no decay; see the module docstring). Default: 128 for the hybrid
            (without it a transferred memory fails at 2k: benchmarks/RESULTS.md, session 15), 0
            for the seed form.
        cache: hybrid: ``K`` evicted tokens per kv head also seen exactly, the heavy hitters, with the
            far memory holding the rest (0 = none; see :mod:`swapformer.targets.hybrid`).
    """

    name = "elita"
    position_width: int = 8
    position_step: float = 1.0 / 2048
    clip: float = 20.0
    linear_factor: int = 8
    ffn_width: int = 0
    local_window: int = 64
    sinks: int = 4
    block_size: int = 64
    mix_init: float = 1e-6
    decay_half_life: float | None = None
    cache: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_hybrid_options(self.name, self.local_window, self.sinks, self.block_size)
        check_cache_option(self.name, self.cache, self.local_window)
        if self.decay_half_life is None:  # frozen: resolve the default in place
            object.__setattr__(self, "decay_half_life", DEFAULT_DECAY_HALF_LIFE if self.local_window else 0.0)
        if not self.decay_half_life >= 0:
            raise ConfigError(f"elita decay_half_life must be >= 0 (0 = no decay), got {self.decay_half_life}")
        if self.decay_half_life and not self.local_window:
            raise ConfigError("elita decay_half_life decays the hybrid's far memory: it needs local_window > 0")
        if not self.mix_init > 0:
            raise ConfigError(f"elita mix_init must be > 0, got {self.mix_init}")
        if self.position_width < 0:
            raise ConfigError(f"elita position_width must be >= 0, got {self.position_width}")
        if not self.position_step > 0:
            raise ConfigError(f"elita position_step must be > 0, got {self.position_step}")
        if not self.clip > 0:
            raise ConfigError(f"elita clip must be > 0, got {self.clip}")
        if self.linear_factor < 1:
            raise ConfigError(f"elita linear_factor must be >= 1, got {self.linear_factor}")
        if self.ffn_width < 0:
            raise ConfigError(f"elita ffn_width must be >= 0, got {self.ffn_width}")


@register_target(ElitaConfig)
class ElitaAttention(TargetModule):
    """ELiTA attention core; see the module docstring for the math and the initialisation."""

    site_kind = "attention"
    stateful = True

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        d_model: int,
        value_dim: int,
        config: ElitaConfig | None = None,
    ) -> None:
        super().__init__()
        self.config = config or ElitaConfig()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.d_model, self.value_dim = d_model, value_dim
        h, p = num_heads, self.config.position_width
        self.k1 = nn.Parameter(torch.zeros(h, d_model))
        self.k2 = nn.Parameter(torch.zeros(h, d_model))
        self.k3 = nn.Parameter(torch.zeros(h, d_model))
        self.self_bias = nn.Parameter(torch.full((h,), -self.config.clip))
        self.freq = nn.Parameter(torch.empty(2, h, p).uniform_(-0.05, 0.05))
        self.phase = nn.Parameter(torch.empty(2, h, p).uniform_(-0.05, 0.05))
        self.amp = nn.Parameter(torch.zeros(h, p))
        # host projections kept (not trained, not saved) only to re-estimate k₁ from data
        self.register_buffer("host_q_weight", None, persistent=False)
        self.register_buffer("host_q_bias", None, persistent=False)
        self.register_buffer("host_k_weight", None, persistent=False)
        self.scale = 1.0

    @classmethod
    def unsupported(cls, site: Site, config: TargetConfig) -> str | None:
        return hybrid_site_problem(site, config) or attention_site_problem(site, needs_width=True)

    @classmethod
    def from_site(
        cls, site: Site, config: TargetConfig, weights: Mapping[str, torch.Tensor]
    ) -> TargetModule:
        assert isinstance(site, AttentionSite) and isinstance(config, ElitaConfig)
        if config.local_window and cls is ElitaAttention:
            return HybridElita.from_site(site, config, weights)
        core = cls(site.num_heads, site.num_kv_heads or site.num_heads, site_model_dim(site, weights),
                   site.value_dim or site.head_dim, config)
        core.scale = site.scale
        q = projection_weight(site.q_proj, weights)
        k = projection_weight(site.k_proj, weights)
        if k is not None:
            # in the host's dtype before k₁ is derived from its weights
            core = core.to(k[0].dtype)
        if q is not None:
            core.host_q_weight, core.host_q_bias = q
        if k is not None:
            core.host_k_weight = k[0]
        if k is not None and q is not None and q[1] is not None:
            core.init_keys(q[1].view(site.num_heads, -1))
        return core

    def init_keys(self, q_mean: torch.Tensor) -> None:
        """Set ``k₁ = scale · Wk_gᵀ q̄`` per head from a mean query ``q̄`` ``[H, head_dim]``."""
        if self.host_k_weight is None:
            raise ConfigError("init_keys needs the host key projection (build the core with from_site)")
        wk = self.host_k_weight.view(self.num_kv_heads, -1, self.d_model)
        wk = repeat_kv(wk, self.num_heads // self.num_kv_heads, dim=0)  # [H, Dk, d]
        with torch.no_grad():
            k1 = self.scale * torch.einsum("hd,hdm->hm", q_mean.to(wk.dtype), wk)
            self.k1.copy_(k1)

    def init_from_hidden(self, hidden: torch.Tensor) -> None:
        """Re-estimate ``q̄ = mean(Wq x + b_q)`` over sample block inputs ``[..., d_model]``, set ``k₁``."""
        if self.host_q_weight is None:
            raise ConfigError("init_from_hidden needs the host query projection (from_site)")
        x = hidden.reshape(-1, self.d_model).to(self.host_q_weight.dtype)
        q = F.linear(x, self.host_q_weight, self.host_q_bias).mean(0)
        self.init_keys(q.view(self.num_heads, -1))

    def _positions(self, t: int, start: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``p₁, p₂`` as ``[T, H]`` for positions ``start .. start + t - 1``."""
        s = torch.arange(start, start + t, device=device, dtype=torch.float32) * self.config.position_step
        # [2, T, H, P]: sin(a s + b) for the key (0) and query (1) terms
        waves = torch.sin(self.freq[:, None] * s[None, :, None, None] + self.phase[:, None])
        p = (waves * self.amp).sum(-1)
        return p[0], p[1]

    def position_term(self, t: int, start: int, device: torch.device, index: int) -> torch.Tensor:
        """``p₁`` (``index`` 0) or ``p₂`` (1) alone as ``[T, H]``: the same values as :meth:`_positions`."""
        s = torch.arange(start, start + t, device=device, dtype=torch.float32) * self.config.position_step
        waves = torch.sin(self.freq[index] * s[:, None, None] + self.phase[index])
        return (waves * self.amp).sum(-1)

    def key_logit(self, hidden: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Pre-clip ``κ`` ``[B, T, H]`` alone (what :meth:`logits` returns first)."""
        dt = torch.promote_types(hidden.dtype, torch.float32)
        x = hidden.to(dt)
        return x @ self.k1.to(dt).t() + self.position_term(x.shape[1], start, x.device, 0).to(dt)

    def query_logit(self, hidden: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Pre-clip ``ρ`` ``[B, T, H]`` alone (what :meth:`logits` returns last)."""
        dt = torch.promote_types(hidden.dtype, torch.float32)
        x = hidden.to(dt)
        return x @ self.k3.to(dt).t() + self.position_term(x.shape[1], start, x.device, 1).to(dt)

    def logits(self, hidden: torch.Tensor, start: int = 0) -> tuple[torch.Tensor, ...]:
        """Pre-clip ``(κ, δ, ρ)``, each ``[B, T, H]``."""
        # logits are exponentiated: never compute them below float32
        dt = torch.promote_types(hidden.dtype, torch.float32)
        x = hidden.to(dt)
        p1, p2 = self._positions(x.shape[1], start, x.device)
        kappa = x @ self.k1.to(dt).t() + p1.to(dt)
        delta = x @ self.k2.to(dt).t() + self.self_bias.to(dt)
        rho = x @ self.k3.to(dt).t() + p2.to(dt)
        return kappa, delta, rho

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        hidden: torch.Tensor | None = None,
        state: dict | None = None,
    ) -> torch.Tensor:
        from swapformer.kernels.elita import elita_attention

        hidden = require_hidden(hidden, self.target_name)
        if state is None:
            check_full_call(q, k, self.target_name)
        kappa, delta, rho = self.logits(hidden, state_pos(state))
        vk = to_kernel_layout(repeat_kv(v, self.num_heads // self.num_kv_heads))
        keep = key_keep_from_bias(bias, v.shape[0], v.shape[-2])
        if keep is not None:
            # a padded key gets weight e^{-clip} and a zero value: invisible up to ~1e-9
            kappa = kappa.masked_fill(~keep[..., None], -math.inf)
            vk = vk * keep[:, :, None, None]
        initial = (state["S"], state["Z"]) if state is not None and "S" in state else None
        y, final = elita_attention(
            kappa, delta, rho, vk, clip=self.config.clip, initial_state=initial,
            output_final_state=state is not None,
        )
        if state is not None:
            state["S"], state["Z"] = final
            state["pos"] = state_pos(state) + q.shape[-2]
        return from_kernel_layout(y).to(q.dtype)

    def new_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())

    def flops_per_token(self, context_len: int) -> int:
        """Three logit dot products, the position sines, and the running sums/readout per head."""
        h, p = self.num_heads, self.config.position_width
        return 2 * 3 * h * self.d_model + 2 * 4 * h * p + 6 * h * self.value_dim

    def state_bytes(self, context_len: int) -> int:
        """Bytes per sequence: ``S`` (``H × Dv``) and ``Z`` (``H``) in fp32."""
        return self.num_heads * (self.value_dim + 1) * 4



class HybridElita(LinearFarMemory):
    """Exact window + sinks + ELiTA sums over evicted tokens; see the module docstring."""

    # built through ElitaAttention.from_site (local_window > 0), so not registered itself
    target_name = "elita"
    needs_hidden = True

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, value_dim: int,
                 d_model: int, scale: float | None = None, config: ElitaConfig | None = None) -> None:
        config = config or ElitaConfig()
        if not config.local_window:
            raise ConfigError("HybridElita needs local_window > 0 (0 is ElitaAttention)")
        super().__init__(num_heads, num_kv_heads, head_dim, value_dim, scale, config.local_window,
                         config.sinks, config.block_size, config.mix_init, config.cache)
        self.config = config
        self.memory_heads, self.feature_dim = num_heads, 1
        self.init_decay(config.decay_half_life)
        # the seed core computes κ, ρ (and holds the k₁ initialisation); its self slot is unused
        self.logit_core = ElitaAttention(num_heads, num_kv_heads, d_model, value_dim, config)
        self._freeze_unused()

    @classmethod
    def from_site(
        cls, site: Site, config: TargetConfig, weights: Mapping[str, torch.Tensor]
    ) -> HybridElita:
        assert isinstance(site, AttentionSite) and isinstance(config, ElitaConfig)
        core = cls(site.num_heads, site.num_kv_heads or site.num_heads, site.head_dim,
                   site.value_dim or site.head_dim, site_model_dim(site, weights), site.scale, config)
        seed_form = dataclasses.replace(config, local_window=0, decay_half_life=0.0, cache=0)
        core.logit_core = ElitaAttention.from_site(site, seed_form, weights)
        core._freeze_unused()
        return core.to(core.logit_core.k1.dtype)

    def _unused(self) -> tuple[nn.Parameter, nn.Parameter]:
        """The seed core's self-slot parameters ``k₂, δ₀``: the hybrid never reads them."""
        return self.logit_core.k2, self.logit_core.self_bias

    def _freeze_unused(self) -> None:
        for p in self._unused():
            p.requires_grad_(False)

    def init_from_hidden(self, hidden: torch.Tensor) -> None:
        self.logit_core.init_from_hidden(hidden)

    def _exp(self, logit: torch.Tensor) -> torch.Tensor:
        """``[B, T, H]`` logits -> clipped exponentials ``[B, H, T, 1]``."""
        clip = self.config.clip
        return torch.exp(logit.clamp(-clip, clip)).transpose(1, 2)[..., None]

    def token_inputs(self, k, v, hidden, pos) -> dict[str, torch.Tensor]:
        hidden = require_hidden(hidden, self.target_name)
        kappa = self.logit_core.key_logit(hidden, int(pos[0]) if pos.numel() else 0)
        return {"kappa": kappa.transpose(1, 2)[..., None].to(k.dtype)}  # [B, H, T, 1]

    def query_features(self, q, hidden, pos) -> torch.Tensor:
        hidden = require_hidden(hidden, self.target_name)
        rho = self.logit_core.query_logit(hidden, int(pos[0]) if pos.numel() else 0)
        return self._exp(rho).to(q.dtype)

    def step_features(self, q, k, v, hidden, pos: int):
        """``κ`` and ``Q = e^{clip ρ}`` of one token from one evaluation of both position terms."""
        hidden = require_hidden(hidden, self.target_name)
        core, dt = self.logit_core, torch.promote_types(hidden.dtype, torch.float32)
        x = hidden.to(dt)
        p1, p2 = core._positions(x.shape[1], pos, x.device)
        kappa = x @ core.k1.to(dt).t() + p1.to(dt)
        rho = x @ core.k3.to(dt).t() + p2.to(dt)
        return {"kappa": kappa.transpose(1, 2)[..., None].to(k.dtype)}, self._exp(rho).to(q.dtype)

    def far_tiles_context(self, qf, buf, length, padded_len) -> dict:
        """The memory read by every query of the call, as one cumulative sum: query ``i`` reads
        ``Q_i Σ_{s ≤ j ≤ i − w} C_j [v_j, 1]`` (feature width 1, so no chunking is needed). A
        decayed memory takes the chunked tiles of :class:`LinearFarMemory` instead."""
        if self.decay_logit is not None:
            return super().far_tiles_context(qf, buf, length, padded_len)
        w, s = self.window, self.sinks
        weight, values = self.memory_items(buf)  # C [B, H, T, 1], v [B, H, T, Dv]
        n = max(0, length - w + 1 - s)  # items j = s .. length − w: every one in the memory after the call
        items = weight[:, :, s:s + n] * torch.cat([values[:, :, s:s + n],
                                                   torch.ones_like(values[:, :, s:s + n, :1])], dim=-1)
        sums = items.cumsum(2)
        # query i reads the sum up to item i − w, at index i − w − s of sums
        front = min(w + s, padded_len)
        read = F.pad(sums[:, :, :padded_len - front], (0, 0, front, 0))
        read = F.pad(read, (0, 0, 0, padded_len - read.shape[2]))
        total = sums[:, :, -1] if n else items.new_zeros(items.shape[0], items.shape[1], items.shape[3])
        return {"read": read, "total": total, "padded_len": padded_len}

    def far_tiles(self, ctx, qt, qf, mem, a, e, c):
        """``Q_i`` times the cumulative sum; between segments the memory is passed on untouched, the
        last segment returns the memory after the call."""
        if self.decay_logit is not None:
            return super().far_tiles(ctx, qt, qf, mem, a, e, c)
        b, hk, nb, g, blk, _ = qt.shape
        memory = torch.cat([mem["S"], mem["z"][..., None]], dim=-1)  # [B, H, 1, Dv + 1]
        read = query_rows(qf, a, e) * (memory + ctx["read"][:, :, a:e])
        read = read.view(b, hk, g, nb, blk, -1).transpose(2, 3)
        if e == ctx["padded_len"]:
            total = memory[:, :, 0] + ctx["total"]
            mem = {"S": own(total[:, :, None, :-1]), "z": own(total[:, :, -1:])}
        return read[..., :-1], read[..., -1:], mem

    def memory_items(self, items) -> tuple[torch.Tensor, torch.Tensor]:
        kappa = items["kappa"].clamp(-self.config.clip, self.config.clip)
        return torch.exp(kappa), repeat_kv(items["v"], self.num_heads // self.num_kv_heads)

    def token_bytes(self) -> int:
        return self.num_heads * STATE_ELEMENT_BYTES

    def new_parameters(self) -> list[nn.Parameter]:
        # By identity, not by requires_grad: LoRA (peft) freezes every non-adapter parameter, and a
        # flag-based list then left this memory out of the KL stage's "new+lora".
        unused = {id(p) for p in self._unused()}
        return [p for p in self.parameters() if id(p) not in unused]

    def flops_per_token(self, context_len: int) -> int:
        h, d = self.num_heads, self.logit_core.d_model
        decay = h * (self.value_dim + 1) if self.decay_logit is not None else 0  # S, z scaled per token
        return self.window_flops_per_token(context_len) + 2 * 2 * h * d + 4 * h * (self.value_dim + 1) + decay


@register_target(ElitaConfig)
class ElitaFFN(TargetModule):
    """ELiTA feed-forward ``einsum(i,j,ijk->k)(swish(xW₁+b₁), swish(xW₂+b₂), W₃) + b₃``."""

    site_kind = "ffn"

    def __init__(self, d_model: int, width: int, linear_factor: int = 8) -> None:
        super().__init__()
        self.d_model, self.width, self.linear_factor = d_model, width, linear_factor
        self.w1 = nn.Linear(d_model, width)
        self.w2 = nn.Linear(d_model, linear_factor)
        self.w3 = nn.Parameter(torch.empty(width, linear_factor, d_model))
        self.b3 = nn.Parameter(torch.zeros(d_model))
        # glorot-uniform as in the seed (fan_in = width * r, fan_out = d_model)
        bound = math.sqrt(6.0 / (width * linear_factor + d_model))
        nn.init.uniform_(self.w3, -bound, bound)

    @classmethod
    def unsupported(cls, site: Site, config: TargetConfig) -> str | None:
        if not isinstance(site, FFNSite):
            return f"not an FFN site ({site.kind})"
        if site.activation not in _SWISH_SHARPNESS:
            return f"activation {site.activation!r} has no swish approximation"
        return ffn_site_problem(site)

    @classmethod
    def from_site(
        cls, site: Site, config: TargetConfig, weights: Mapping[str, torch.Tensor]
    ) -> ElitaFFN:
        assert isinstance(site, FFNSite) and isinstance(config, ElitaConfig)
        up = copy_projection(site.gate_proj if site.gated else site.up_proj, weights)
        down = copy_projection(site.down_proj, weights)
        assert up is not None and down is not None
        width = config.ffn_width or up.out_features
        core = cls(up.in_features, width, config.linear_factor).to(up.weight.dtype)
        exact = site.activation == "silu" and not site.gated and width == up.out_features
        if not exact:
            logger.info("elita FFN at %s: %s host mapped approximately (seeds 2.5)",
                        site.name, "gated" if site.gated else site.activation)
        core.load_host(up, down, _SWISH_SHARPNESS[site.activation])
        return core

    def load_host(self, up: nn.Linear, down: nn.Linear, sharpness: float = 1.0) -> None:
        """Copy ``down(act(up x))`` into branch A / slot 0 with ``act(z) ≈ swish(s z) / s``."""
        n = min(self.width, up.out_features)
        s = sharpness
        with torch.no_grad():
            self.w1.weight.zero_()
            self.w1.bias.zero_()
            self.w1.weight[:n] = s * up.weight[:n]
            if up.bias is not None:
                self.w1.bias[:n] = s * up.bias[:n]
            # branch B is the constant (1, 0, …, 0): swish(β) = 1, swish(0) = 0
            self.w2.weight.zero_()
            self.w2.bias.zero_()
            self.w2.bias[0] = SWISH_ONE
            self.w3[:, 0].zero_()
            self.w3[:n, 0] = down.weight[:, :n].t() / s
            self.b3.copy_(down.bias if down.bias is not None else torch.zeros_like(self.b3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.silu(self.w1(x))
        b = F.silu(self.w2(x))
        # contract i (width) first, then j (r): seeds 2.10 order
        ab = torch.einsum("...i,ijk->...jk", a, self.w3)
        return torch.einsum("...j,...jk->...k", b, ab) + self.b3

    def flops_per_token(self, context_len: int = 0) -> int:
        d, w, r = self.d_model, self.width, self.linear_factor
        return 2 * d * (w + r) + 2 * w * r * d + 2 * r * d

    def state_bytes(self, context_len: int = 0) -> int:
        return 0

