"""``"fastweight"``: decaying fast weights (T2FW decay rule, seeds §4) in place of softmax attention.

Per query head ``h`` (index dropped), with ``x_t`` the attention block's input (``hidden``)::

    f_t = σ(W_z x_t + b_z) ∈ (0,1)^Dv          value-side decay
    f̂_t = σ(W_f x_t + b_f) ∈ (0,1)^K           key-side decay
    S_t = S_{t-1} ⊙ (f_t f̂_tᵀ) + v_t φ(k_t)ᵀ    S ∈ R^{Dv×K}, S_0 = 0 (fp32)
    o_t = S_t φ(q_t)                            inclusive: token t sees itself

and, with ``normalize=True``, ``o_t = S_t φ(q_t) / (z_t · φ(q_t))`` where
``z_t = z_{t-1} ⊙ f̂_t + φ(k_t)`` (the decayed key sum; T2FW itself has no normaliser, seeds 4.1).

Mapping onto a pretrained block: ``q, k, v`` are the host's (already projected, RoPE'd and normed),
so Wq/Wk/Wv/Wo are all kept; GQA k/v heads are repeated to the query heads. ``φ`` sees
``q·√scale`` and ``k·√scale`` so that the identity map computes ``scale · qᵀk`` like the host's logits.
New parameters: the two gate projections (zero weights, uniform-gate biases, seeds 4.4) and, for
``feature_map="hedgehog"``, a per-head map ``φ(x) = [softmax(xW), softmax(−xW)]`` (Hedgehog /
LoLCATs) with ``W`` initialised to the identity. Prefill runs the chunked kernel, decoding the
recurrent one; both carry the state ``S`` ``[B, H, Dv, K]`` in ``state["S"]``.

Padding: keys the mask marks as padding are skipped exactly (``v = k = 0``, ``f = f̂ = 1``), so left
and right padding leave the real positions unchanged (seeds 4.8).

Hybrid form (the default, ``local_window > 0``; issue 12, quality-recipes §4.1):
:class:`HybridFastWeight`, an exact window of ``local_window`` keys plus ``sinks`` with a fast-weight
memory of the evicted tokens in the same normaliser (:mod:`swapformer.targets.hybrid`)::

    S_i = Σ_{j ∈ F_i} φk(k_j) v_jᵀ,   z_i = Σ_{j ∈ F_i} φk(k_j)          per KV head (Hkv × 2F × Dv)
    m_i = φq(q_i)ᵀ S_i,   n_i = φq(q_i)ᵀ z_i                          per query head
    y_i = (Σ_{N_i} e^{scale q_i·k_j − c_i} v_j + g_h m_i) / (Σ_{N_i} e^{…} + g_h n_i)

φq per query head and φk per KV head (so the state is counted per KV head) are Hedgehog maps with
identity init by default, fed the post-RoPE ``q·√scale``, ``k·√scale``. No data-dependent decay gates
(they are per-query-head, which would multiply the state by the GQA group size); the mixing
``g_h = softplus(θ_h)`` starts at ``mix_init`` so the converted model starts at the window baseline.
``local_window=0`` keeps the seed-exact decaying form above.

Far-memory decay (``decay_half_life > 0``, quality-recipes §4.2): a learned ``γ_u = σ(λ_u) ∈ (0, 1)``
per KV (memory) head ``u``, initialised to ``γ = 2^(−1/decay_half_life)``. A token ``j`` becomes part
of the memory at ``avail_j = j + w`` and weighs ``γ_u^(i − avail_j)`` for query ``i``, in the read-out
and in the normaliser alike::

    S_i = Σ_{j ∈ F_i} γ^(i − avail_j) φk(k_j) v_jᵀ,   z_i = Σ_{j ∈ F_i} γ^(i − avail_j) φk(k_j)

so a memory that has absorbed everything available at a block start ``a`` is advanced to the end
``b`` of the block exactly by ``S_b = γ^(b − a) S_a + Σ_{avail_j ∈ (a, b]} γ^(b − avail_j) φk_j v_jᵀ``
(likewise ``z``), and query ``i ∈ [a, b)`` reads ``γ^(i − a) φq_iᵀ S_a`` plus the block's own items
with ``avail_j ≤ i``. The state keeps its size (``S``, ``z`` are referenced to the next query's
position, which the hybrid already tracks), so decoding, block size and prefill length do not change
the output. Without decay, a model trained on 512-token sequences sees a normaliser at 2k context
that sums ~4× more evicted tokens than in training; the decay bounds it to ~``half_life / ln 2``.
``decay_half_life=0`` is the undecayed form above exactly (no parameter is created); the hybrid
defaults to 128.

Delta-rule writes (``update="delta"``, hybrid only and its default; DeltaNet / Gated DeltaNet, a
departure from T2FW's additive rule): an evicted token overwrites what its key already returns instead
of adding to it, so a later query that matches it reads its value rather than an average of everything
stored under similar keys. With ``M = [S, z]`` (the normaliser as one more value column), unit keys ``k̂_j = φk_j / ‖φk_j‖``
and a write strength ``β_j = σ(w_u·k_j + b_u) ∈ (0, 1)`` per KV head (``β = ½`` at init)::

    M ← γ M                                       once per position (decay, as above)
    u_j = β_j ([v_j, 1] − Mᵀ k̂_j)                  what the memory lacks for this key
    M ← M + k̂_j u_jᵀ                               i.e. M ← (I − β_j k̂_j k̂_jᵀ) M + β_j k̂_j [v_j, 1]

read as above (``m = φq S``, ``n = max(0, φq z)``: the subtraction can make ``z`` negative along some
directions). ``β → 0`` writes nothing (the window target); orthogonal keys make it the sum rule scaled
by ``β``. Prefill solves the writes of each block of items as one unit-lower-triangular system
(:func:`~swapformer.targets.hybrid.delta_values`), decoding takes them one at a time; the state is
the sum rule's.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from swapformer.errors import ConfigError
from swapformer.sites import AttentionSite, Site
from swapformer.targets.base import TargetConfig, TargetModule, register_target
from swapformer.targets.hybrid import (
    LinearFarMemory,
    check_cache_option,
    check_hybrid_options,
    hybrid_site_problem,
)
from swapformer.targets.reference import (
    attention_site_problem,
    check_full_call,
    from_kernel_layout,
    key_keep_from_bias,
    repeat_kv,
    require_hidden,
    site_model_dim,
    state_pos,
    to_kernel_layout,
    uniform_gate_bias,
)

logger = logging.getLogger(__name__)

FeatureMapName = Literal["identity", "elu1", "relu", "hedgehog"]
UpdateRule = Literal["sum", "delta"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class FastWeightConfig(TargetConfig):
    """Options of the ``"fastweight"`` target.

    The default is ``elu1`` with the normaliser, not T2FW's own identity map without one: on a
    pretrained host (SmolLM2-135M, ``benchmarks/RESULTS.md``) the identity map's unnormalised sums
    give held-out perplexity ~1e7 that 120k calibration tokens do not move, against ~1e4 falling to
    ~6e3 for ``elu1`` + normaliser. ``feature_map="identity"`` gives the seed's exact rule.

    Args:
        feature_map: map applied to q and k: ``"identity"`` (T2FW; in the hybrid only with
            ``update="delta"``), ``"elu1"`` (elu + 1), ``"relu"``, ``"hedgehog"`` (learned, per head,
            feature width ``2 * hedgehog_dim``).
        hedgehog_dim: projection width of the hedgehog map (0 = the head dim).
        normalize: divide by the decayed key sum; default on, off for ``"identity"`` (it needs a
            non-negative feature map).
        chunk_size: chunk length of the parallel prefill kernel.
        eps: floor of the normaliser.
        local_window: exact window of the hybrid form (keys seen exactly, counting the query);
            0 = the window-free seed form.
        sinks: first tokens every query of the hybrid also sees exactly.
        block_size: query block of the hybrid's prefill.
        mix_init: initial per-head mix ``g_h`` of the far memory (small: starts at the window).
        decay_half_life: hybrid: initial half-life, in tokens, of the learned per-KV-head decay of
            the far memory (0 = no decay); default 128 for the hybrid, 0 for the seed form.
        update: hybrid: how an evicted token enters the far memory: ``"sum"`` adds ``φk vᵀ``,
            ``"delta"`` overwrites what its key returned (see the module docstring); default
            ``"delta"`` for the hybrid, ``"sum"`` for the seed form.
        cache: hybrid: ``K`` evicted tokens per kv head also seen exactly, the heavy hitters, with the
            far memory holding the rest (0 = none; needs ``update="sum"``: see
            :mod:`swapformer.targets.hybrid`).

    The hybrid's defaults (Hedgehog maps, half-life 128, delta rule) are the best measured recipe on
    SmolLM2-135M (benchmarks/RESULTS.md, issue 12, sessions 13-19): after 307k transfer + 204k KL
    tokens, 32.41 / 15.90 perplexity at 2k against the sum rule's 33.53 / 16.42.
    """

    name = "fastweight"
    feature_map: FeatureMapName | None = None
    hedgehog_dim: int = 0
    normalize: bool | None = None
    chunk_size: int = 64
    eps: float = 1e-6
    local_window: int = 64
    sinks: int = 4
    block_size: int = 64
    mix_init: float = 1e-3
    decay_half_life: float | None = None
    update: UpdateRule | None = None
    cache: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_hybrid_options(self.name, self.local_window, self.sinks, self.block_size)
        check_cache_option(self.name, self.cache, self.local_window)
        hybrid = bool(self.local_window)
        if self.decay_half_life is None:  # frozen: resolve the defaults in place
            object.__setattr__(self, "decay_half_life", 128.0 if hybrid else 0.0)
        if self.update is None:
            object.__setattr__(self, "update", "delta" if hybrid else "sum")
        if not self.decay_half_life >= 0:
            raise ConfigError(f"fastweight decay_half_life must be >= 0 (0 = no decay), got "
                              f"{self.decay_half_life}")
        if self.update not in ("sum", "delta"):
            raise ConfigError(f"fastweight update {self.update!r} is not one of 'sum', 'delta'")
        if self.update == "delta" and self.cache:
            raise ConfigError("fastweight cache needs update='sum': the memory reads the cached tokens' "
                              "share out of its sums, and a delta-rule write is no sum")
        if self.update == "delta" and not self.local_window:
            raise ConfigError("fastweight update='delta' is a far-memory rule of the hybrid: it needs "
                              "local_window > 0")
        if not self.mix_init > 0:
            raise ConfigError(f"fastweight mix_init must be > 0, got {self.mix_init}")
        if self.feature_map is None:  # frozen: resolve the default in place
            object.__setattr__(self, "feature_map", "hedgehog" if self.local_window else "elu1")
        if self.local_window and self.feature_map == "identity" and self.update != "delta":
            # the sum rule's normaliser z sums the keys: signed keys can cancel it to 0
            raise ConfigError("the fastweight hybrid (local_window > 0) needs a non-negative feature "
                              "map ('hedgehog', 'elu1' or 'relu'), not 'identity', unless update='delta'")
        if self.feature_map not in ("identity", "elu1", "relu", "hedgehog"):
            raise ConfigError(f"fastweight feature_map {self.feature_map!r} is not one of "
                              "'identity', 'elu1', 'relu', 'hedgehog'")
        if self.normalize is None:  # frozen: resolve the default in place
            object.__setattr__(self, "normalize", self.feature_map != "identity")
        if self.normalize and self.feature_map == "identity":
            raise ConfigError("fastweight normalize=True needs a non-negative feature map "
                              "('elu1', 'relu' or 'hedgehog'), not 'identity'")
        if self.hedgehog_dim < 0:
            raise ConfigError(f"fastweight hedgehog_dim must be >= 0, got {self.hedgehog_dim}")
        if self.chunk_size < 1 or self.chunk_size & (self.chunk_size - 1):
            raise ConfigError(f"fastweight chunk_size must be a power of two, got {self.chunk_size}")
        if not self.eps > 0:
            raise ConfigError(f"fastweight eps must be > 0, got {self.eps}")


class HedgehogFeatureMap(nn.Module):
    """``φ(x) = [softmax(x W_h), softmax(−x W_h)]`` per head; ``W_h`` starts as the identity."""

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int) -> None:
        super().__init__()
        weight = torch.zeros(num_heads, head_dim, feature_dim)
        n = min(head_dim, feature_dim)
        weight[:, torch.arange(n), torch.arange(n)] = 1.0
        self.weight = nn.Parameter(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, T, H, D] -> [B, T, H, 2F]
        z = torch.einsum("bthd,hdf->bthf", x, self.weight.to(x.dtype))
        return torch.cat([z.softmax(-1), (-z).softmax(-1)], dim=-1)

    def head_major(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """``φ(scale · x)`` for ``x [B, H, T, D]`` -> ``[B, H, T, 2F]``, as one matmul per head.

        No permute and no concatenation of the activations for long inputs: the product with
        ``[W, −W]`` gives ``z`` and ``−z`` side by side and one softmax over the view ``[..., 2, F]``
        takes both (stacking ``z`` and ``−z`` costs two passes over the largest tensor of the map);
        without autograd the softmax runs in place. A short input (a decoding step, fewer rows than
        ``W``) stacks its few ``z`` instead: building ``[W, −W]`` would cost more than the step.
        """
        w = self.weight.to(x.dtype)
        if x[..., :1].numel() < w[:, :, :1].numel():  # fewer rows in x than in W
            z = torch.matmul(x * scale, w)
            return torch.stack([z, -z], dim=-2).softmax(-1).flatten(-2)
        return _paired_softmax(torch.matmul(x, torch.cat([w, -w], dim=-1) * scale))

    def tiles(self, qt: torch.Tensor, scale: float) -> torch.Tensor:
        """:meth:`head_major` of query tiles ``[B, Hkv, blocks, G, block, D]`` (head ``h`` at
        ``(h // G, h % G)``) -> ``[B, Hkv, blocks, G, block, 2F]``, in that layout."""
        hk, g, d = qt.shape[1], qt.shape[3], qt.shape[-1]
        w = self.weight.to(qt.dtype)
        w = (torch.cat([w, -w], dim=-1) * scale).view(hk, 1, g, d, -1)
        return _paired_softmax(torch.matmul(qt, w))


def _paired_softmax(z: torch.Tensor) -> torch.Tensor:
    """``[softmax(z₁), softmax(z₂)]`` of ``z = [z₁, z₂]`` (two halves of the last axis), in place of
    ``z`` when no gradient is recorded (one pass fewer over the largest tensor of the map)."""
    z = z.view(*z.shape[:-1], 2, -1)
    if torch.is_grad_enabled():
        return z.softmax(-1).flatten(-2)
    z.sub_(z.amax(-1, keepdim=True)).exp_()
    return z.div_(z.sum(-1, keepdim=True)).flatten(-2)


def _simple_feature_map(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "elu1":
        return torch.nn.functional.elu(x) + 1.0
    if name == "relu":
        return torch.relu(x)
    return x


def _kernels():
    # imported on first use so the target registers even where a kernel package is missing
    from swapformer.kernels.fastweight import fastweight_decay, fastweight_decay_recurrent

    return fastweight_decay, fastweight_decay_recurrent


@register_target(FastWeightConfig)
class FastWeightAttention(TargetModule):
    """Decaying fast-weight core; see the module docstring for the math."""

    site_kind = "attention"
    stateful = True

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        value_dim: int,
        d_model: int,
        scale: float | None = None,
        config: FastWeightConfig | None = None,
    ) -> None:
        super().__init__()
        self.config = config or FastWeightConfig(local_window=0)
        if self.config.local_window:
            raise ConfigError("FastWeightAttention is the window-free form: pass local_window=0, or "
                              "build the hybrid with HybridFastWeight / from_site")
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim, self.value_dim, self.d_model = head_dim, value_dim, d_model
        self.scale = scale if scale is not None else head_dim**-0.5
        self.feature_map: HedgehogFeatureMap | None = None
        if self.config.feature_map == "hedgehog":
            width = self.config.hedgehog_dim or head_dim
            self.feature_map = HedgehogFeatureMap(num_heads, head_dim, width)
            self.key_dim = 2 * width
        else:
            self.key_dim = head_dim
        self.value_gate = nn.Linear(d_model, num_heads * value_dim)
        self.key_gate = nn.Linear(d_model, num_heads * self.key_dim)
        self.reset_gates()

    def reset_gates(self, generator: torch.Generator | None = None) -> None:
        """Zero gate weights and uniform-gate biases, spread per head over its channels."""
        with torch.no_grad():
            for gate, width in ((self.value_gate, self.value_dim), (self.key_gate, self.key_dim)):
                gate.weight.zero_()
                bias = torch.stack([uniform_gate_bias(width, generator) for _ in range(self.num_heads)])
                gate.bias.copy_(bias.flatten())

    @classmethod
    def unsupported(cls, site: Site, config: TargetConfig) -> str | None:
        return hybrid_site_problem(site, config) or attention_site_problem(site, needs_width=True)

    @classmethod
    def from_site(
        cls, site: Site, config: TargetConfig, weights: Mapping[str, torch.Tensor]
    ) -> TargetModule:
        assert isinstance(site, AttentionSite) and isinstance(config, FastWeightConfig)
        if config.local_window:
            return HybridFastWeight.from_site(site, config, weights)
        # q/k/v/o stay the host's; only the model width is read to size the new gates
        return cls(
            site.num_heads, site.num_kv_heads or site.num_heads, site.head_dim,
            site.value_dim or site.head_dim, site_model_dim(site, weights), site.scale, config,
        )

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        x = x * math.sqrt(self.scale)
        if self.feature_map is not None:
            return self.feature_map(x)
        return _simple_feature_map(self.config.feature_map, x)

    def _gates(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, _ = hidden.shape
        f = torch.sigmoid(self.value_gate(hidden)).view(b, t, self.num_heads, self.value_dim)
        fhat = torch.sigmoid(self.key_gate(hidden)).view(b, t, self.num_heads, self.key_dim)
        return f, fhat

    def _inputs(self, q, k, v, bias, hidden):
        """Kernel-layout ``(q, k, v, f, f̂)``, with padded keys turned into no-op steps."""
        groups = self.num_heads // self.num_kv_heads
        qf = self._features(to_kernel_layout(q))
        kf = self._features(to_kernel_layout(repeat_kv(k, groups)))
        vk = to_kernel_layout(repeat_kv(v, groups))
        f, fhat = self._gates(hidden.to(q.dtype))
        keep = key_keep_from_bias(bias, q.shape[0], k.shape[-2])
        if keep is not None:
            m = keep[:, :, None, None]
            kf, vk = kf * m, vk * m
            f, fhat = torch.where(m, f, 1.0), torch.where(m, fhat, 1.0)
        if self.config.normalize:
            # a constant-1 value channel that never decays accumulates the normaliser z_t
            vk = torch.cat([vk, torch.ones_like(vk[..., :1])], dim=-1)
            f = torch.cat([f, torch.ones_like(f[..., :1])], dim=-1)
        return qf, kf, vk, f, fhat

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
        hidden = require_hidden(hidden, self.target_name)
        if state is None:
            check_full_call(q, k, self.target_name)
        qf, kf, vk, f, fhat = self._inputs(q, k, v, bias, hidden)
        chunked, recurrent = _kernels()
        initial = state.get("S") if state is not None else None
        if state is not None and q.shape[-2] == 1:
            o, final = recurrent(qf, kf, vk, f, fhat, initial_state=initial, output_final_state=True)
        else:
            o, final = chunked(
                qf, kf, vk, f, fhat, initial_state=initial, output_final_state=state is not None,
                chunk_size=self.config.chunk_size,
            )
        if state is not None:
            state["S"] = final
            state["pos"] = state_pos(state) + q.shape[-2]
        if self.config.normalize:
            o = o[..., :-1] / o[..., -1:].clamp_min(self.config.eps)
        return from_kernel_layout(o).to(q.dtype)

    def flops_per_token(self, context_len: int) -> int:
        """Core FLOPs for one token (independent of the context): gates, feature map, state."""
        h, dv, dk, d = self.num_heads, self.value_dim + self.config.normalize, self.key_dim, self.d_model
        gates = 2 * d * h * (dv + dk)
        fmap = 0 if self.feature_map is None else 2 * 2 * h * self.head_dim * (dk // 2)
        # decay (1 mul), write (1 mul-add), read (1 mul-add) per state entry
        return gates + fmap + 5 * h * dv * dk

    def state_bytes(self, context_len: int) -> int:
        """Bytes of decoding state per sequence: the fp32 fast-weight matrix of every head."""
        return self.num_heads * (self.value_dim + self.config.normalize) * self.key_dim * 4




class HybridFastWeight(LinearFarMemory):
    """Exact window + sinks + fast-weight memory of evicted tokens; see the module docstring."""

    # built through FastWeightAttention.from_site (local_window > 0), so not registered itself
    target_name = "fastweight"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, value_dim: int,
                 scale: float | None = None, config: FastWeightConfig | None = None) -> None:
        config = config or FastWeightConfig()
        if not config.local_window:
            raise ConfigError("HybridFastWeight needs local_window > 0 (0 is FastWeightAttention)")
        super().__init__(num_heads, num_kv_heads, head_dim, value_dim, scale, config.local_window,
                         config.sinks, config.block_size, config.mix_init, config.cache)
        self.config = config
        self.memory_heads = num_kv_heads
        self.q_map: HedgehogFeatureMap | None = None
        self.k_map: HedgehogFeatureMap | None = None
        if config.feature_map == "hedgehog":
            width = config.hedgehog_dim or head_dim
            self.q_map = HedgehogFeatureMap(num_heads, head_dim, width)
            self.k_map = HedgehogFeatureMap(num_kv_heads, head_dim, width)
            self.feature_dim = 2 * width
        else:
            self.feature_dim = head_dim
        self.init_decay(config.decay_half_life)
        self.init_delta(config.update == "delta")

    @classmethod
    def from_site(
        cls, site: Site, config: TargetConfig, weights: Mapping[str, torch.Tensor]
    ) -> HybridFastWeight:
        assert isinstance(site, AttentionSite) and isinstance(config, FastWeightConfig)
        return cls(site.num_heads, site.num_kv_heads or site.num_heads, site.head_dim,
                   site.value_dim or site.head_dim, site.scale, config)

    def _map(self, fmap: HedgehogFeatureMap | None, x: torch.Tensor) -> torch.Tensor:
        """``[B, H, T, D]`` -> features ``[B, H, T, F]`` of ``x·√scale``."""
        if fmap is not None:
            return fmap.head_major(x, math.sqrt(self.scale))
        return _simple_feature_map(self.config.feature_map, x * math.sqrt(self.scale))

    def query_features(self, q, hidden, pos) -> torch.Tensor:
        return self._map(self.q_map, q)

    # the tiled prefill maps each segment's query tiles (LinearFarMemory.far_tiles), memory heads
    # being the kv heads
    queries_from_tiles = True

    def tile_query_features(self, qt: torch.Tensor) -> torch.Tensor:
        if self.q_map is not None:
            return self.q_map.tiles(qt, math.sqrt(self.scale))
        return _simple_feature_map(self.config.feature_map, qt * math.sqrt(self.scale))

    def memory_items(self, items) -> tuple[torch.Tensor, torch.Tensor]:
        fk = self._map(self.k_map, items["k"])
        if self.delta_rule:  # unit keys: a write with β = 1 replaces what the key returned
            fk = F.normalize(fk, dim=-1)
        return fk, items["v"]

    def flops_per_token(self, context_len: int) -> int:
        """Exact window attention, both feature maps, and the memory write + read."""
        h, hkv, d, f, dv = self.num_heads, self.num_kv_heads, self.head_dim, self.feature_dim, self.value_dim
        fmap = 2 * (h + hkv) * d * (f // 2) if self.q_map is not None else 0
        decay = hkv * f * (dv + 1) if self.decay_logit is not None else 0  # S, z scaled once per token
        delta = 2 * hkv * f * (dv + 1) + 2 * hkv * d if self.delta_rule else 0  # Mᵀ k̂ and β per write
        return (self.window_flops_per_token(context_len) + fmap + 2 * hkv * f * (dv + 1)
                + 2 * h * f * (dv + 1) + decay + delta)
