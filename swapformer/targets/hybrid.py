"""Hybrid attention: an exact sliding window with sinks plus a target's far memory, ONE normaliser.

Shared by the hybrid forms of ``fastweight``, ``elita`` and ``cat`` (``local_window > 0``,
quality-recipes §4.1). For query ``i`` (0-based), sinks ``s``, window ``w``, host scale::

    N_i = {j ≤ i : i − j < w  or  j < s}                 exact keys (the ``window`` target's set)
    F_i = {j : s ≤ j ≤ i − w}                            far keys: evicted from the window, not sinks
    c_i = max_{j ∈ N_i} scale · q_i·k_j
    y_i = (Σ_{N_i} e^{scale·q_i·k_j − c_i} v_j + g_h m_i) / (Σ_{N_i} e^{…} + g_h n_i)

``g_h = softplus(θ_h)`` per query head; ``(m_i, n_i)`` is the far memory's read-out and normaliser
over ``F_i`` (fast-weight / ELiTA sums through :class:`LinearFarMemory`, CAT's compressed chunks).
Degenerate cases, checked by the tests: ``g = 0`` is the ``window`` target exactly; ``w ≥ T`` leaves
``F`` empty, so the host's softmax attention exactly.

A far item (a token, or a CAT chunk) becomes visible at query position ``avail = j + w`` (its last
token's). The forward runs in query blocks ``[a, b)``: the exact part attends to the sinks plus keys
``a − w + 1 .. b − 1`` (``O(T·(w + block))``, never ``T²``); the far part reads the memory, which holds
every item with ``avail ≤ a``, plus the items with ``avail ∈ (a, b]`` masked by ``avail ≤ i``, and
then absorbs those. Prefill and decoding run the same code: decoding keeps the memory plus the sinks
and the last ``w − 1`` tokens (``k``, ``v``, their positions and padding flags, and any per-token
inputs the memory needs later, e.g. ELiTA's key logits) in ``state``, every tensor batch-first.
Padding (keys the mask marks as padding) is skipped in both parts; positions are tensor positions,
as in the ``window`` target.

A prefill from position 0 without padding (the one a model's prompt takes) computes the same sums
as tiles instead (:meth:`HybridAttention._tiled`): the queries run in segments of ``segment_len``
(256), and within a segment every query block is one tile of one batched matmul (its queries, the
sinks and its ``w + block − 1`` window keys, an unfolded view of the keys), with the mask built once
and the far memory for all its blocks at once (:meth:`HybridAttention.far_tiles`: chunked linear
attention for fast weights and a decayed ELiTA, one cumulative sum for an undecayed ELiTA, CAT's
chunks compressed once). The block loop stays for decoding, continued prefills and padding, and is
the reference the tests pin the tiles to (outputs, gradients, state); ``tiled_prefill = False``
selects it.

A decoding step of one token after the window has filled, without padding (the step ``generate()``
takes) runs :meth:`HybridAttention._decode_step` instead of the block loop: the state holds exactly
the keys the new query sees exactly (the sinks and the last ``w − 1`` tokens), so the exact part is
one softmax over the cached keys and the new one with no mask; the far part reads the whole memory
(:meth:`HybridAttention.far_step`) and then absorbs the one evicted token (position ``i − w + 1``,
readable from query ``i + 1`` on). One concatenation per cached per-token tensor, with the evicted
token put first, gives the keys, and the state keeps the rest as a view (one row more storage).
The same sums as the block loop in another order (equal to rounding, checked by the tests);
``fast_decode = False`` selects the loop.

Heavy-hitter cache (``cache=K``: elita, and fastweight with ``update="sum"``; LoLA's layout,
quality-recipes §1.4). The exact part also sees ``C_i``, the ``K`` evicted tokens per kv head that drew
the most attention while in the window (the rule of ``window`` with ``cache``,
:mod:`swapformer.targets.window_cache`), and the far memory reads only the evicted tokens the cache
does not hold::

    c_i = max_{j ∈ N_i ∪ C_i} scale · q_i·k_j
    y_i = (Σ_{N_i ∪ C_i} e^{…} v_j + g_h m_i) / (Σ_{N_i ∪ C_i} e^{…} + g_h n_i),   (m_i, n_i) over F_i ∖ C_i

The memory still takes every token at its eviction; a read subtracts what the cached tokens add to it
(:meth:`LinearFarMemory.cached_far`: ``φq_i·φk_j [v_j, 1]``, times ``γ^(i − avail_j)`` with decay),
which is exact for a memory of sums. A delta-rule write depends on what the memory held before it,
so it cannot be taken back out: refused. ``g = 0`` is ``window`` with ``cache``; ``K ≥ T`` the
host's attention whatever ``g`` (the memory holds nothing). Every call runs the block loop (no tiles,
no one-token step); the state adds each window token's score and ``K`` slots (key, value, score,
position and the memory's per-token inputs).

Block size (the configs' ``block_size``, default 64), measured on SmolLM2-135M's cores (9 / 3 kv
heads, d 64, window 64 + 4 sinks, fastweight's Hedgehog memory, 1 thread, CPU time of a stateful
prefill per layer): with the block loop, block 32: 93 ms at 2k; 64: 65 ms at 2k, 304 ms at 8k; 128:
65 / 311 ms; 256: 417 ms at 8k (the host's causal SDPA: 49 ms at 2k, 665 at 8k). With tiles, blocks
32 and 64 and segments 256 and 512 measured within the noise of a loaded machine at 2k and 8k, 16
and 128 slower (``benchmarks/profile_smollm2.py --cores``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from swapformer.errors import ConfigError, InputError
from swapformer.kernels.window import window_attention, window_kernel_applies
from swapformer.sites import Site
from swapformer.targets.base import TargetConfig, TargetModule
from swapformer.targets.heavy_cache import add_window_scores, choose, empty_slots, merge
from swapformer.targets.reference import (
    STATE_ELEMENT_BYTES,
    adds_to_scores,
    check_full_call,
    evicted_first,
    full_window_step,
    key_keep_from_bias,
    repeat_kv,
    require_hidden,
    score_terms_problem,
    state_keys_real,
    state_pos,
    window_buffer_slices,
    window_keep,
    window_position_step,
)

Tokens = dict[str, torch.Tensor]  # per-token tensors, token axis 2, batch first
Memory = dict[str, torch.Tensor]
FarRead = tuple[torch.Tensor, torch.Tensor, Memory]

# per-token tensors every hybrid keeps for its exact window
WINDOW_KEYS = ("k", "v")
# state and memory keys of the heavy-hitter cache's slots (``cache > 0``)
SLOT = "cache_"


def check_hybrid_options(target: str, local_window: int, sinks: int, block_size: int) -> None:
    if local_window < 0:
        raise ConfigError(f"{target} local_window must be >= 0 (0 = no exact window), got {local_window}")
    if sinks < 0:
        raise ConfigError(f"{target} sinks must be >= 0, got {sinks}")
    if block_size < 1:
        raise ConfigError(f"{target} block_size must be >= 1, got {block_size}")


def hybrid_site_problem(site: Site, config: TargetConfig) -> str | None:
    """Why the hybrid form (``config.local_window > 0``) cannot replace ``site``, or None: it reads only
    the causal structure and the key padding of a mask (:func:`score_terms_problem`)."""
    return score_terms_problem(site, "the hybrid") if getattr(config, "local_window", 0) else None


def check_cache_option(target: str, cache: int, local_window: int) -> None:
    if cache < 0:
        raise ConfigError(f"{target} cache must be >= 0 (0 = no heavy-hitter cache), got {cache}")
    if cache and not local_window:
        raise ConfigError(f"{target} cache keeps tokens evicted from the hybrid's window: it needs local_window > 0")


def inverse_softplus(x: float) -> float:
    return x + math.log(-math.expm1(-x))


def local_terms(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shifted exact sums over the visible keys: ``(Σ e v, Σ e, c, e)``.

    ``q [..., G, Tq, D]``, ``k, v [..., Tk, D]`` with the same leading dims (``[B, Hkv]`` for one
    query block, ``[B, Hkv, blocks]`` for a tiled prefill), ``bias`` (0 where a key is seen, −inf
    where not: :func:`mask_bias`) broadcastable to ``[..., G, Tq, Tk]``; returns ``[..., G, Tq, Dv]``,
    ``[..., G, Tq, 1]``, ``[..., G, Tq, 1]`` (``c = 0`` on rows that see no key, whose sums are then
    0), and the weights ``e [..., G, Tq, Tk]`` (the window cache scores keys by them). One batched matmul per product (the scale goes on the keys, the smaller operand), the mask
    added (a broadcast ``masked_fill`` measured 20× slower) and the exponential taken in place when
    no gradient is recorded.
    """
    *lead, g, tq, d = q.shape
    tk = k.shape[-2]
    s = torch.matmul(q.reshape(*lead, g * tq, d), (k * scale).transpose(-1, -2))
    s = s.view(*lead, g, tq, tk)
    inplace = not torch.is_grad_enabled()  # autograd needs the scores that amax and exp read
    s = s.add_(bias) if inplace else s + bias
    c = s.amax(-1, keepdim=True)
    c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
    e = s.sub_(c).exp_() if inplace else torch.exp(s - c)
    num = torch.matmul(e.view(*lead, g * tq, tk), v)
    return num.view(*lead, g, tq, -1), e.sum(-1, keepdim=True), c, e


def tile_terms(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float, row_max: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """:func:`local_terms` for rows that each see at least one key, as ``(o, 1 / Σ e, c, p)``.

    ``o = Σ e v / Σ e`` comes from one softmax, and ``1 / Σ e`` is its largest weight (``e^0 / Σ e``),
    so ``(Σ e v, Σ e) = (o, 1) / (1 / Σ e)``: the softmax kernel takes the masked (−inf) scores at
    full speed where ``exp`` of −inf measured 4× slower than of finite scores. ``c`` (the row max)
    only when ``row_max`` (a far memory that reads it); ``p`` the softmax weights (the window cache
    scores keys by them); shapes as in :func:`local_terms`.
    """
    *lead, g, tq, d = q.shape
    s = torch.matmul(q.reshape(*lead, g * tq, d), (k * scale).transpose(-1, -2))
    s = s.view(*lead, g, tq, -1)
    s = s + bias if torch.is_grad_enabled() else s.add_(bias)
    c = s.amax(-1, keepdim=True) if row_max else None
    p = torch.softmax(s, dim=-1)
    inv_den = p.amax(-1, keepdim=True)
    o = torch.matmul(p.view(*lead, g * tq, -1), v)
    return o.view(*lead, g, tq, -1), inv_den, c, p


def tile_keys(xp: torch.Tensor, sinks: torch.Tensor, a: int, e: int, block: int, window: int) -> torch.Tensor:
    """The keys (or values) of the tiles of queries ``a .. e − 1``, ``[B, Hkv, blocks, S + span, X]``: the
    sinks ``[B, Hkv, S, X]``, then an unfolded view of ``xp`` (padded by ``window − 1`` in front), tile
    ``β`` (queries from ``p = a + β·block``) holding positions ``p − window + 1 .. p + block − 1``."""
    span = block + window - 1
    xt = xp[:, :, a:e + window - 1].unfold(2, span, block).transpose(-1, -2)
    if not sinks.shape[2]:
        return xt
    return torch.cat([sinks[:, :, None].expand(-1, -1, xt.shape[2], -1, -1), xt], dim=3)


def decay_powers(log_gamma: torch.Tensor, age: torch.Tensor) -> torch.Tensor:
    """``γ^age`` where ``age >= 0`` and 0 where it is negative (not yet visible), broadcast over
    ``log γ``'s and ``age``'s shapes; the exponent is clamped first so that no ``inf · 0`` arises."""
    return torch.exp(log_gamma * age.clamp_min(0)) * (age >= 0)


def with_ones(x: torch.Tensor) -> torch.Tensor:
    """``[x, 1]``: values with the normaliser as one more column."""
    return torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)


def delta_values(fk: torch.Tensor, fv: torch.Tensor, beta: torch.Tensor, prior: torch.Tensor,
                 log_gamma: torch.Tensor | None) -> torch.Tensor:
    """What a run of consecutive delta-rule writes adds: ``u`` with ``M_after = Σ_j (decay) fk_j u_jᵀ``.

    Item ``j`` (one position after ``j − 1``) writes ``u_j = β_j (fv_j − prior_j − Σ_{l<j} γ^(j−l)
    (fk_j·fk_l) u_l)``: its value minus what the memory already returns for its key (``prior_j``, the
    memory before the run read at ``j``'s key and position). One unit-lower-triangular solve of the run's
    length. ``fk [B, Hm, n, F]``, ``fv``, ``prior [B, Hm, n, X]``, ``beta [B, Hm, n]``, ``log γ [Hm]``.
    """
    gram = torch.matmul(fk, fk.transpose(-1, -2)).tril(-1)
    if log_gamma is not None:
        r = torch.arange(fk.shape[-2], device=fk.device, dtype=fk.dtype)
        gram = gram * decay_powers(log_gamma.to(fk.dtype)[:, None, None], r[:, None] - r[None, :])
    # the solve ignores the diagonal (unitriangular): the system is I + β·(strictly lower gram)
    return torch.linalg.solve_triangular(gram * beta[..., None], beta[..., None] * (fv - prior),
                                         upper=False, unitriangular=True)


def delta_chunks(fk: torch.Tensor, fv: torch.Tensor, beta: torch.Tensor, log_gamma: torch.Tensor | None,
                 chunk: int) -> torch.Tensor:
    """:func:`delta_values` of ``n`` consecutive writes into an empty memory, ``chunk`` at a time (the
    solves stay ``chunk²``, not ``n²``); the memory between chunks is referenced to the next chunk's
    first item."""
    b, hm, n, f = fk.shape
    memory = fk.new_zeros(b, hm, f, fv.shape[-1])
    outs = []
    for a in range(0, n, chunk):
        kc, vc, bc = fk[:, :, a:a + chunk], fv[:, :, a:a + chunk], beta[:, :, a:a + chunk]
        prior, written = torch.matmul(kc, memory), kc
        if log_gamma is not None:  # item r reads the memory γ^r on; it weighs γ^(c − r) at the end
            lg, c = log_gamma.to(fk.dtype)[:, None, None], kc.shape[2]
            r = torch.arange(c, device=fk.device, dtype=fk.dtype)[:, None]
            prior, written, memory = prior * torch.exp(lg * r), kc * torch.exp(lg * (c - r)), memory * torch.exp(lg * c)
        u = delta_values(kc, vc, bc, prior, log_gamma)
        memory = memory + torch.matmul(written.transpose(-1, -2), u)
        outs.append(u)
    return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]


def own(x: torch.Tensor) -> torch.Tensor:
    """A copy of ``x`` in storage of its own: what a decoding state keeps must not hold a larger
    tensor alive through a view (a long prompt's keys, a memory's normaliser column)."""
    return x.clone(memory_format=torch.contiguous_format)


def query_rows(x: torch.Tensor, a: int, e: int) -> torch.Tensor:
    """``x[:, :, a:e]`` (token axis 2), zero-padded at the end to ``e − a`` rows."""
    part = x[:, :, a:e]
    return part if part.shape[2] == e - a else F.pad(part, (0, 0, 0, e - a - part.shape[2]))


def as_tiles(x: torch.Tensor, a: int, e: int, kv_heads: int, block: int) -> torch.Tensor:
    """Rows ``a .. e − 1`` of ``x [B, H, T, X]`` in the tile layout ``[B, Hkv, blocks, G, block, X]``
    (a view unless :func:`query_rows` pads the last segment)."""
    b, h, _, width = x.shape
    rows = query_rows(x, a, e)
    return rows.view(b, kv_heads, h // kv_heads, (e - a) // block, block, width).transpose(2, 3)


def mask_bias(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive form of a keep mask: 0 where True, −inf where False."""
    return torch.where(keep, 0.0, -math.inf).to(dtype)


def tile_bias(a: int, e: int, block: int, window: int, sinks: int, dtype: torch.dtype,
              device: torch.device) -> torch.Tensor:
    """``[blocks, 1, block, sinks + window + block − 1]``: :func:`mask_bias` of the keys of its tile
    that each query sees.

    Queries ``a .. e − 1`` in tiles of ``block``; tile ``β`` (queries from ``p = a + β·block``) holds
    the sinks ``0 .. sinks − 1`` then the keys ``p − window + 1 .. p + block − 1``. A window column is
    seen when it is a real position within the window (:func:`window_keep`), a sink column when the
    sink has left the window (else its window column holds it): together exactly ``N_i``.
    """
    span = block + window - 1
    i = torch.arange(a, e, device=device).view(-1, block, 1)
    j = (torch.arange(a, e, block, device=device) - (window - 1)).view(-1, 1, 1) + torch.arange(span, device=device)
    keep = (j >= 0) & (j <= i) & (i - j < window)
    if sinks:
        p = torch.arange(sinks, device=device)
        keep = torch.cat([(p <= i) & (i - p >= window), keep], dim=-1)
    return mask_bias(keep[:, None], dtype)


class HybridAttention(TargetModule):
    """Base class of the hybrid cores; subclasses supply the far memory (see the module docstring).

    Subclass hooks: :meth:`token_inputs` (per-token tensors the memory reads when a token is
    evicted, beyond ``k``/``v``), :meth:`query_features`, :meth:`memory_init`, :meth:`far_block`,
    :meth:`memory_bytes` and :meth:`token_bytes` (per cached token, beyond ``k``/``v``/pos/flag).
    """

    site_kind = "attention"
    stateful = True

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, value_dim: int,
                 scale: float | None, local_window: int, sinks: int, block_size: int,
                 mix_init: float, cache: int = 0) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim, self.value_dim = head_dim, value_dim
        self.scale = scale if scale is not None else head_dim**-0.5
        self.window, self.sinks, self.block_size = local_window, sinks, block_size
        self.cache = cache  # heavy-hitter slots per kv head in the exact part (LinearFarMemory only)
        self.mix_logit = nn.Parameter(torch.full((num_heads,), inverse_softplus(mix_init)))
        self._far_ratios: list[torch.Tensor] | None = None

    # ---- far-memory hooks -------------------------------------------------------------------
    def token_inputs(self, k, v, hidden, pos) -> Tokens:
        return {}

    def query_features(self, q, hidden, pos) -> torch.Tensor:
        raise NotImplementedError

    def memory_init(self, batch: int, ref: torch.Tensor) -> Memory:
        raise NotImplementedError

    def far_block(self, mem: Memory, qf: torch.Tensor, items: Tokens, avail: torch.Tensor,
                  item_keep: torch.Tensor, q_pos: torch.Tensor, c: torch.Tensor) -> FarRead:
        """``(m [B, H, Tq, Dv], n [B, H, Tq, 1], memory after absorbing items)`` for one block."""
        raise NotImplementedError

    def memory_bytes(self, context_len: int) -> int:
        raise NotImplementedError

    def token_bytes(self) -> int:
        return 0

    # ---- hooks of the one-token decoding step (see :meth:`_decode_step`) -----------------------
    def step_features(self, q, k, v, hidden, pos: int) -> tuple[Tokens, torch.Tensor]:
        """``(token_inputs, query_features)`` of one token at position ``pos`` (one call, so that a
        subclass can share work between the two)."""
        at = torch.arange(pos, pos + 1, device=q.device)
        return self.token_inputs(k, v, hidden, at), self.query_features(q, hidden, at)

    def far_step(self, state: dict, qf: torch.Tensor, item: Tokens, pos: int,
                 c: torch.Tensor | None) -> FarRead:
        """:meth:`far_block` of one query at ``pos`` that reads the whole memory in ``state`` (read
        only), then absorbs ``item`` (the token at ``pos − w + 1``, one row of every per-token
        tensor, real, readable from ``pos + 1`` on). ``c`` ``[B, H, 1, 1]``; returns ``m [B, H, 1, Dv]``,
        ``n [B, H, 1, 1]`` and the memory after. This default runs :meth:`far_block`; subclasses
        override it with the few ops a single query needs."""
        b = qf.shape[0]
        q_pos = torch.arange(pos, pos + 1, device=qf.device)
        keep = torch.ones(b, 1, dtype=torch.bool, device=qf.device)
        return self.far_block(self._memory_from(state, b, qf), qf, item, q_pos + 1, keep, q_pos, c)

    # ---- far-memory hooks of the tiled prefill (see :meth:`_tiled`) ----------------------------
    def far_tiles_supported(self) -> bool:
        """Whether :meth:`far_tiles` computes this memory (else a prefill runs the block loop)."""
        return False

    def far_tiles_context(self, qf: torch.Tensor, buf: Tokens, length: int, padded_len: int) -> dict:
        """What every segment of a tiled prefill reads (e.g. the memory items of the whole call)."""
        raise NotImplementedError

    def far_tiles(self, ctx: dict, qt: torch.Tensor, qf: torch.Tensor, mem: Memory, a: int, e: int,
                  c: torch.Tensor) -> FarRead:
        """``(m, n, memory after)`` of queries ``a .. e − 1`` of a prefill from position 0, in tiles.

        ``qt [B, Hkv, blocks, G, block, D]`` the queries, ``qf [B, H, length, F]`` the query features
        of the whole call (:func:`query_rows` pads the last segment; None when
        ``queries_from_tiles``: the memory maps ``qt`` itself), ``c`` the exact part's row max
        in the layout of ``qt`` (None unless ``far_reads_row_max``); returns
        ``m [B, Hkv, blocks, G, block, Dv]``, ``n [..., 1]`` and the memory the next segment needs;
        after the last segment (``e`` = the padded length), the block loop's final memory.
        """
        raise NotImplementedError

    # ---- shared machinery --------------------------------------------------------------------
    def mix(self) -> torch.Tensor:
        """``g_h = softplus(θ_h)`` ``[H]``."""
        return F.softplus(self.mix_logit.float())

    def set_mix(self, g: torch.Tensor) -> None:
        """Set ``g_h`` (``[H]`` or scalar; > 0) in closed form."""
        g = torch.as_tensor(g, dtype=torch.float64).clamp_min(1e-12).expand(self.num_heads)
        with torch.no_grad():
            self.mix_logit.copy_((g + torch.log(-torch.expm1(-g))).to(self.mix_logit.dtype))

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, H, T, D]`` -> ``[B, Hkv, G, T, D]``."""
        b, _, t, d = x.shape
        return x.reshape(b, self.num_kv_heads, -1, t, d)

    def _buffer(self, state, k, v, hidden, keep_new, start) -> tuple[Tokens, torch.Tensor, torch.Tensor]:
        """The cached window tokens followed by this call's: ``(tokens, pos [R], keep [B, R])``."""
        pos_new = torch.arange(start, start + k.shape[-2], device=k.device)
        tokens = {"k": k, "v": v, **self.token_inputs(k, v, hidden, pos_new)}
        if self.cache:  # each token's attention drawn while in the window (the cache's a_j)
            tokens["score"] = k.new_zeros(k.shape[:3])
        if state is None or "k" not in state:
            return tokens, pos_new, keep_new
        buf = {n: torch.cat([state[n], t.to(state[n].dtype)], dim=2) for n, t in tokens.items()}
        pos = torch.cat([state["k_pos"][0], pos_new])
        return buf, pos, torch.cat([state["keep"], keep_new], dim=1)

    def _block(self, q, qf, buf, pos, keep, mem, qa: int, qb: int, last: int,
               padded: bool) -> tuple[torch.Tensor, Memory]:
        """Output ``[B, H, Tq, Dv]`` of the queries at positions ``qa .. qb − 1``.

        ``buf`` holds the sinks then one contiguous run of positions ending at ``last`` (the
        layout :func:`window_buffer_slices` reads), so the block's exact keys and its newly evicted
        items are index slices, not boolean gathers; ``padded`` is False when ``keep`` is all True.
        """
        w, s, dev = self.window, self.sinks, q.device
        length = pos.shape[0]
        q_pos = torch.arange(qa, qb, device=dev)
        lo = max(0, qa - w + 1)
        sink_end, run_start, run_end = window_buffer_slices(last, length, s, lo, qb)
        k_pos = pos[run_start:run_end]
        kb, vb, kept = buf["k"][:, :, run_start:run_end], buf["v"][:, :, run_start:run_end], None
        if sink_end:  # sinks before the window (right before it in a decoding step: one view)
            adjacent = sink_end == run_start
            k_pos = pos[:run_end] if adjacent else torch.cat([pos[:sink_end], k_pos])
            kb, vb = ((t[:, :, :run_end] if adjacent else torch.cat([t[:, :, :sink_end], t[:, :, run_start:run_end]], 2))
                      for t in (buf["k"], buf["v"]))
            if padded:
                kept = keep[:, :run_end] if adjacent else torch.cat([keep[:, :sink_end], keep[:, run_start:run_end]], 1)
        elif padded:
            kept = keep[:, run_start:run_end]
        vis = window_keep(q_pos, k_pos, w, s)
        vis = vis if kept is None else vis[None, None, None] & kept[:, None, None, None]
        num, den, c, e = local_terms(self._grouped(q), kb, vb, mask_bias(vis, q.dtype), self.scale)
        slots = {n[len(SLOT):]: mem.pop(n) for n in list(mem) if n.startswith(SLOT)} if self.cache else {}
        if self.cache:
            buf["score"] = add_window_scores(buf["score"], e, den, sink_end, run_start, run_end)
            cand, member, slots = self._cache_choice(slots, buf, pos, keep, qa, qb, last)
            num_c, den_c, c_c, _ = local_terms(self._grouped(q), cand["k"], cand["v"],
                                               mask_bias(member[:, :, None], q.dtype), self.scale)
            num, den, c = merge(num, den, c, num_c, den_c, c_c)
        # items evicted inside this block: positions max(s, qa − w + 1) .. qb − w, all in the run
        _, ev_start, ev_end = window_buffer_slices(last, length, 0, max(s, lo), qb - w + 1)
        items = {n: t[:, :, ev_start:ev_end] for n, t in buf.items()}
        m, n, mem = self.far_block(mem, qf, items, pos[ev_start:ev_end] + w, keep[:, ev_start:ev_end],
                                   q_pos, c.flatten(1, 2))
        if self.cache:  # the memory holds every evicted token: take out those the exact part sees
            m_c, n_c = self.cached_far(qf, cand, member, q_pos)
            m, n = m - m_c, (n - n_c).clamp_min(0.0)
            mem.update({SLOT + name: t for name, t in slots.items()})
        g = self.mix()[None, :, None, None]
        b, h, tq = q.shape[0], self.num_heads, qb - qa
        num, den = num.reshape(b, h, tq, -1), den.reshape(b, h, tq, 1)
        if self._far_ratios is not None:  # far normaliser per unit mix / exact mass (init_mix)
            self._far_ratios.append(n / den.clamp_min(torch.finfo(den.dtype).tiny))
        num, den = num + g * m, den + g * n
        return num / den.clamp_min(torch.finfo(den.dtype).tiny), mem

    def _cache_choice(self, slots: Tokens, buf: Tokens, pos, keep, qa: int, qb: int, last: int):
        """:func:`~swapformer.targets.heavy_cache.choose` over the buffer's per-token tensors and positions
        (empty slots on the first call)."""
        tokens = {**buf, "pos": pos.expand(keep.shape[0], self.num_kv_heads, -1)}
        if not slots:
            slots = empty_slots(tokens, self.cache)
        return choose(slots, tokens, keep, qa, qb, last, self.window, self.sinks, self.cache)

    def cached_far(self, qf: torch.Tensor, cand: Tokens, member: torch.Tensor,
                   q_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the memory's read ``(m, n)`` holds of the cached tokens a query sees exactly."""
        raise NotImplementedError(f"{self.target_name}: a far memory that takes no cache")

    def _store(self, state: dict, buf: Tokens, pos, keep, mem: Memory, end: int, padded: bool) -> None:
        """Keep the sinks and the last ``w − 1`` tokens (the rest is in the memory) and the memory."""
        sink_end, run_start, run_end = window_buffer_slices(end - 1, pos.shape[0], self.sinks,
                                                            end - self.window + 1, end)
        kept = [(0, sink_end), (run_start, run_end)] if sink_end else [(run_start, run_end)]
        # copies, never views: a view of a long prefill's tensors would keep all of them alive
        for n, t in buf.items():
            state[n] = torch.cat([t[:, :, i:j] for i, j in kept], dim=2)
        # every state tensor is batch-first (caches reorder beams); positions agree across rows
        state["k_pos"] = torch.cat([pos[i:j] for i, j in kept]).expand(keep.shape[0], -1)
        state["keep"] = torch.cat([keep[:, i:j] for i, j in kept], dim=1)
        state["padded"] = padded  # may be stale-True once the padding has left: re-read then
        state.update(mem)
        state["pos"] = end

    def _memory_from(self, state: dict | None, batch: int, ref: torch.Tensor) -> Memory:
        fresh = self.memory_init(batch, ref)
        if state is None or "k" not in state:
            return fresh
        return {n: state[n] for n in (*fresh, *(n for n in state if n.startswith(SLOT)))}

    # the far memory reads the attention block's input (elita's logits)
    needs_hidden: bool = False
    # a prefill from position 0 without padding runs as tiles (False: the block loop, which the
    # tests take as the reference); queries per segment of tiles, chosen by measurement (see below)
    tiled_prefill: bool = True
    segment_len: int = 256
    # with the exact part from the window kernel (CUDA, no gradient) a segment is only the far
    # memory's tiles: longer segments mean fewer launches (not tuned; see benchmarks/RESULTS.md)
    cuda_segment_len: int = 4096
    # the far memory reads the exact part's row max c_i (cat's chunks are shifted by it)
    far_reads_row_max: bool = False
    # far_tiles maps each segment's query tiles itself (qf is None): no [B, H, T, F] features of
    # the whole prompt and no copy of them into the tile layout per segment
    queries_from_tiles: bool = False
    # a one-token decoding step with a full window and no padding runs _decode_step (False: the
    # block loop, which the tests take as the reference)
    fast_decode: bool = True

    def _decode_step_applies(self, q, k, bias, state: dict | None) -> bool:
        """Whether this call is a step :meth:`_decode_step` computes: one token, no mask, no
        gradient, a state whose window has filled (``w − 1`` run keys after ``s`` sinks), no padding."""
        return (self.fast_decode and self._far_ratios is None and not self.cache
                and full_window_step(q, k, bias, state, self.sinks, self.window))

    def _decode_step(self, q, k, v, hidden, state: dict) -> torch.Tensor:
        """One token at position ``i = state["pos"]`` after the window has filled, without padding.

        The state holds the sinks and tokens ``i − w + 1 .. i − 1``: with the new token, exactly
        ``N_i``, so the exact part is one softmax over them, unmasked (as :func:`tile_terms`). Token
        ``i − w + 1`` leaves the window after this query: each cached per-token tensor is
        concatenated once as ``[token i − w + 1, sinks, i − w + 2 .. i − 1, new]`` (the order of the
        keys does not change the sums) and the state keeps the view from row 1 on, the layout the
        block loop keeps. The far part reads the memory, which holds exactly ``F_i``, and absorbs
        the evicted token (:meth:`far_step`). Positions advance by one except the sinks'.
        """
        b, hk, s, pos = q.shape[0], self.num_kv_heads, self.sinks, state["pos"]
        extra, qf = self.step_features(q, k, v, hidden, pos)
        buf = {name: evicted_first(state[name], new, s) for name, new in {"k": k, "v": v, **extra}.items()}
        qg = q.view(b, hk, -1, q.shape[-1])  # [B, Hkv, G, D]: the one query of each head
        scores = torch.matmul(qg * self.scale, buf["k"].transpose(-1, -2))  # [B, Hkv, G, s + w]
        c = scores.amax(-1, keepdim=True) if self.far_reads_row_max else None
        p = torch.softmax(scores, dim=-1)
        inv_den = p.amax(-1, keepdim=True)  # e^0 / Σ e
        o = torch.matmul(p, buf["v"])  # Σ e v / Σ e
        item = {name: t[:, :, :1] for name, t in buf.items()}
        m, n, mem = self.far_step(state, qf, item, pos, None if c is None else c.view(b, -1, 1, 1))
        # (Σ e v + g m) / (Σ e + g n), numerator and denominator divided by Σ e (≥ 1)
        r = self.mix().to(q.dtype).view(1, hk, -1, 1) * inv_den
        g = r.shape[2]
        out = torch.div(o.addcmul_(m.view(b, hk, g, -1), r), (n.view(b, hk, g, 1) * r).add_(1))
        for name, t in buf.items():
            state[name] = t[:, :, 1:]
        state["k_pos"] = state["k_pos"] + window_position_step(state["k_pos"].device, s, self.window)
        state.update(mem)
        state["pos"] = pos + 1
        return out.view(b, self.num_heads, 1, -1)

    def _tiled(self, q: torch.Tensor, qf: torch.Tensor | None, buf: Tokens, mem: Memory) -> tuple[torch.Tensor, Memory]:
        """The block loop of a prefill from position 0 without padding, computed tile by tile at once.

        Queries run in segments of ``segment_len`` (a multiple of the block); within one, every
        query block is a tile: its queries, the sinks and its keys ``p − w + 1 .. p + block − 1``
        (an unfolded view of the keys padded by ``w − 1`` in front), so each product is one batched
        matmul over ``[B, Hkv, blocks]`` with no per-block Python; the mask (:func:`tile_bias`) is
        the same for every segment past the first. The far memory comes from :meth:`far_tiles`. Same sums as the loop,
        in another order (equal to rounding, checked by the tests).
        """
        b, h, t, d = q.shape
        blk, w, hk = self.block_size, self.window, self.num_kv_heads
        g, sinks, dv = h // hk, min(self.sinks, t), buf["v"].shape[-1]
        tp = -(-t // blk) * blk
        seg = max(blk, self.segment_len // blk * blk)
        fused = window_kernel_applies(q, buf["k"], buf["v"])
        if fused:  # the exact part of every tile from one kernel call: (o, c, 1 / Σ e) per query
            o_all, c_all, den = window_attention(q, buf["k"], buf["v"], window=w, sinks=sinks, scale=self.scale)
            inv_all = den.reciprocal().to(q.dtype)[..., None]
            c_all = c_all.to(q.dtype)[..., None] if self.far_reads_row_max else None
            seg = max(blk, self.cuda_segment_len // blk * blk)
        else:
            kp, vp = (F.pad(buf[n], (0, 0, w - 1, tp - t)) for n in WINDOW_KEYS)
            sink_k, sink_v = buf["k"][:, :, :sinks], buf["v"][:, :, :sinks]
        ctx = self.far_tiles_context(qf, buf, t, tp)
        mix = self.mix().to(q.dtype).view(1, hk, 1, g, 1, 1)
        # from position w + sinks − 1 on, every tile sees its keys the same way: one mask for all
        settled = -(-(w + sinks - 1) // blk) * blk
        interior = None
        if tp > settled and not fused:
            interior = tile_bias(settled, settled + seg, blk, w, sinks, q.dtype, q.device)
        grad = torch.is_grad_enabled()
        outs, out = [], None if grad else q.new_empty(b, h, tp, dv)
        for a in range(0, tp, seg):
            e = min(tp, a + seg)
            nb = (e - a) // blk
            # [B, Hkv, blocks, G, block, D]: one copy, so that the products below are views
            qt = query_rows(q, a, e).view(b, hk, g, nb, blk, d).transpose(2, 3).contiguous()
            if fused:
                o, inv_den = as_tiles(o_all, a, e, hk, blk), as_tiles(inv_all, a, e, hk, blk)
                c = None if c_all is None else as_tiles(c_all, a, e, hk, blk)
            else:
                o, inv_den, c, _ = self._tile_exact(qt, kp, vp, sink_k, sink_v, interior, a, e, settled)
            m, n, mem = self.far_tiles(ctx, qt, qf, mem, a, e, c)
            if self._far_ratios is not None:  # far normaliser per unit mix / exact mass (init_mix)
                ratio = (n * inv_den).transpose(2, 3).reshape(b, h, e - a, 1)
                self._far_ratios.append(ratio[:, :, :t - a])
            # (Σ e v + g m) / (Σ e + g n), numerator and denominator divided by Σ e (≥ 1)
            r = mix * inv_den
            if grad:
                tile = (o + m * r) / (1 + n * r)
                outs.append(tile.transpose(2, 3).reshape(b, h, e - a, dv))
            else:
                dest = out[:, :, a:e].view(b, hk, g, nb, blk, dv).transpose(2, 3)
                torch.div(o.addcmul_(m, r), (n * r).add_(1), out=dest)
        if grad:
            out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
        return out[:, :, :t], mem

    def _tile_exact(self, qt, kp, vp, sink_k, sink_v, interior, a: int, e: int, settled: int):
        """:func:`tile_terms` of the tiles of queries ``a .. e − 1``: their keys are an unfolded view of
        the keys padded by ``w − 1`` in front (``kp``, ``vp``), after the sinks."""
        blk, w, sinks = self.block_size, self.window, sink_k.shape[2]
        nb = (e - a) // blk
        kt, vt = tile_keys(kp, sink_k, a, e, blk, w), tile_keys(vp, sink_v, a, e, blk, w)
        if not sinks:
            vt = vt.contiguous()
        bias = interior[:nb] if a >= settled else tile_bias(a, e, blk, w, sinks, qt.dtype, qt.device)
        return tile_terms(qt, kt, vt, bias, self.scale, self.far_reads_row_max)

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
        if self.needs_hidden:
            hidden = require_hidden(hidden, self.target_name)
        if state is None:
            check_full_call(q, k, self.target_name)
        if bias is not None and adds_to_scores(bias):
            raise InputError(f"the {self.target_name} hybrid reads only the causal structure and key padding of "
                             "a mask; this one adds terms to the scores (a position bias?), which it would ignore")
        return self.hybrid_forward(q, k, v, bias, hidden, state).to(q.dtype)

    def hybrid_forward(self, q, k, v, bias, hidden, state: dict | None) -> torch.Tensor:
        """The whole hybrid computation (prefill or decoding); returns ``[B, H, Tq, Dv]``."""
        dt = torch.promote_types(q.dtype, torch.float32)
        hidden = hidden.to(dt) if hidden is not None else None
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
        if self._decode_step_applies(q, k, bias, state):
            return self._decode_step(q, k, v, hidden, state)
        b, tq = q.shape[0], q.shape[-2]
        start = state_pos(state)
        keep_new = key_keep_from_bias(bias, b, k.shape[-2])
        # known without reading the device: this call's padding, the state's flag (state_keys_real)
        padded = keep_new is not None or not state_keys_real(state)
        if keep_new is None:
            keep_new = torch.ones(b, k.shape[-2], dtype=torch.bool, device=q.device)
        buf, pos, keep = self._buffer(state, k, v, hidden, keep_new, start)
        mem = self._memory_from(state, b, q)
        tiled = (self.tiled_prefill and start == 0 and not padded and tq > self.block_size
                 and self.far_tiles_supported() and not self.cache)
        qf = None
        if not (tiled and self.queries_from_tiles):
            qf = self.query_features(q, hidden, torch.arange(start, start + tq, device=q.device))
        outs, last = [], start + tq - 1
        if tiled:
            out, mem = self._tiled(q, qf, buf, mem)
            if state is not None:
                self._store(state, buf, pos, keep, mem, tq, padded)
            return out
        for a in range(0, tq, self.block_size):
            e = min(tq, a + self.block_size)
            out, mem = self._block(q[:, :, a:e], qf[:, :, a:e], buf, pos, keep, mem, start + a, start + e,
                                   last, padded)
            outs.append(out)
        if state is not None:
            self._store(state, buf, pos, keep, mem, start + tq, padded)
        return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]

    def new_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())

    @torch.no_grad()
    def init_from_inputs(self, q, k, v, bias=None, *, hidden=None, small: float = 0.02) -> torch.Tensor:
        """Set ``g_h`` in closed form from sample inputs (quality-recipes §4.2); returns it ``[H]``.

        ``ρ_h``, the host softmax's mass beyond the window over its mass inside it, and ``r_h``, the
        far normaliser ``n`` at ``g = 1`` over the exact mass, are averaged over the queries that have
        a far set; ``g_h = ρ_h / r_h`` gives the far memory its share of the normaliser. Per head, the
        one of ``{g_h, small·g_h, current g_h}`` whose output is closest (MSE) to the host attention
        is kept: the far read-out of an untrained memory can hurt more than the missing mass.
        """
        t = q.shape[-2]
        if t <= self.window + self.sinks:
            return self.mix()  # no query has a far set: nothing to measure
        exact, rho = self._host_far_mass(q, k, v, bias)
        current = self.mix().clone()
        self.set_mix(torch.ones(self.num_heads))
        self._far_ratios = []
        try:
            self.hybrid_forward(q, k, v, bias, hidden, None)
            ratios = torch.cat(self._far_ratios, dim=2)[:, :, self.window + self.sinks:]
        finally:
            self._far_ratios = None
        r = ratios.mean(dim=(0, 2, 3)).clamp_min(1e-12)
        fitted = (rho / r).clamp(1e-6, 1e4)
        candidates = [fitted, small * fitted, current]
        errors = []
        for g in candidates:
            self.set_mix(g)
            out = self.hybrid_forward(q, k, v, bias, hidden, None)
            errors.append((out - exact).square().mean(dim=(0, 2, 3)))
        best = torch.stack(errors).argmin(0)
        chosen = torch.stack(candidates).gather(0, best[None])[0]
        self.set_mix(chosen)
        return chosen

    def _host_far_mass(self, q, k, v, bias) -> tuple[torch.Tensor, torch.Tensor]:
        """The host's attention output and ``ρ_h`` ``[H]`` (dense: for calibration-sized inputs)."""
        dt = torch.promote_types(q.dtype, torch.float32)
        b, _, t, _ = q.shape
        qg, k, v = self._grouped(q.to(dt)), k.to(dt), v.to(dt)
        pos = torch.arange(t, device=q.device)
        causal = pos[None, :] <= pos[:, None]
        keep = key_keep_from_bias(bias, b, t)
        real = causal[None] if keep is None else causal[None] & keep[:, None, :]
        near = window_keep(pos, pos, self.window, self.sinks)
        s = torch.einsum("bkgtd,bksd->bkgts", qg, k) * self.scale
        p = s.masked_fill(~real[:, None, None], -math.inf).softmax(-1).nan_to_num(0.0)
        exact = torch.einsum("bkgts,bksd->bkgtd", p, v).flatten(1, 2)
        mass_near = (p * near).sum(-1).flatten(1, 2)[:, :, self.window + self.sinks:]
        mass_far = (p * ~near).sum(-1).flatten(1, 2)[:, :, self.window + self.sinks:]
        rho = (mass_far / mass_near.clamp_min(1e-12)).mean(dim=(0, 2))
        return exact, rho

    def state_bytes(self, context_len: int) -> int:
        """Sinks + last ``w − 1`` tokens (fp32 ``k``/``v`` of every kv head, int64 position, padding
        flag, any cached memory inputs) plus the fixed-size far memory, and the cache's slots."""
        rows = min(context_len, self.window - 1 + self.sinks)
        per_row = self.num_kv_heads * (self.head_dim + self.value_dim) * STATE_ELEMENT_BYTES + 8 + 1
        total = rows * (per_row + self.token_bytes()) + self.memory_bytes(context_len)
        if self.cache:  # a score per window row and kv head; per slot and kv head k, v, score, int64 position
            slot = self.num_kv_heads * ((self.head_dim + self.value_dim + 1) * STATE_ELEMENT_BYTES + 8) + self.token_bytes()
            total += rows * self.num_kv_heads * STATE_ELEMENT_BYTES + (self.cache * slot if context_len else 0)
        return total

    def evicted(self, context_len: int) -> int:
        """Tokens in the far memory after ``context_len`` tokens (ready for the next query)."""
        return max(0, context_len - self.window + 1 - self.sinks)

    def window_flops_per_token(self, context_len: int) -> int:
        visible = min(context_len, self.window + self.sinks)
        return 2 * self.num_heads * visible * (self.head_dim + self.value_dim)



class LinearFarMemory(HybridAttention):
    """Far memory ``S = Σ_F φk_j v_jᵀ``, ``z = Σ_F φk_j`` per memory head, read ``m = φq S``, ``n = φq z``.

    Memory heads are the kv heads (query head ``h`` reads memory head ``h // G``) or the query heads.
    Subclasses give :meth:`memory_items` (``φk [B, Hm, Te, Fk]``, values ``[B, Hm, Te, Dv]``) and the
    feature width ``self.feature_dim`` and memory head count ``self.memory_heads``.
    """

    feature_dim: int
    memory_heads: int
    decay_logit: nn.Parameter | None
    # delta-rule writes (init_delta): each item writes its value minus what the memory returns for it
    delta_rule: bool = False

    def init_decay(self, half_life: float) -> None:
        """A learned decay ``γ_u = σ(λ_u)`` per memory head starting at ``2^(−1/half_life)``: an item
        that became available at ``avail`` weighs ``γ^(i − avail)`` for query ``i``, in ``m`` and ``n``
        alike. ``half_life = 0``: no decay and no parameter. Subclasses call it once ``memory_heads``
        is set."""
        logit = None
        if half_life:
            gamma = 2.0 ** (-1.0 / half_life)
            logit = nn.Parameter(torch.full((self.memory_heads,), math.log(gamma / (1.0 - gamma))))
        self.register_parameter("decay_logit", logit)

    def init_delta(self, enabled: bool) -> None:
        """Delta-rule writes when ``enabled``: item ``j`` writes ``u_j = β_j ([v_j, 1] − M_jᵀ φk_j)``
        instead of ``[v_j, 1]``, with ``M_j = [S, z]`` the memory just before it and a write strength
        ``β_j = σ(w_u·k_j + b_u)`` per memory head from the raw key (``w = 0``, ``b = 0``: ``β = ½``).
        Keys are unit vectors (:meth:`memory_items`), so a write with ``β = 1`` replaces what the key
        returned; the normaliser ``n`` read from the written ``1`` column is floored at 0. No parameter
        when disabled. Needs ``memory_heads == num_kv_heads``."""
        self.delta_rule = enabled
        weight = bias = None
        if enabled:
            if self.memory_heads != self.num_kv_heads:
                raise ConfigError("delta-rule writes need one memory per kv head")
            weight = nn.Parameter(torch.zeros(self.memory_heads, self.head_dim))
            bias = nn.Parameter(torch.zeros(self.memory_heads))
        self.register_parameter("write_weight", weight)
        self.register_parameter("write_bias", bias)

    def write_strength(self, items: Tokens) -> torch.Tensor:
        """``β [B, Hm, Te]`` of the items (delta rule only)."""
        k = items["k"]
        return torch.sigmoid(torch.matmul(k, self.write_weight.to(k.dtype)[:, :, None])[..., 0]
                             + self.write_bias.to(k.dtype)[:, None])

    def log_decay(self) -> torch.Tensor | None:
        """``log γ_u`` per memory head ``[Hm]`` (None without decay)."""
        if self.decay_logit is None:
            return None
        return F.logsigmoid(self.decay_logit.to(torch.promote_types(self.decay_logit.dtype, torch.float32)))

    def memory_items(self, items: Tokens) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def tile_query_features(self, qt: torch.Tensor) -> torch.Tensor:
        """:meth:`query_features` of query tiles ``[B, Hkv, blocks, G, block, D]`` in their layout
        (only where ``queries_from_tiles``; needs ``memory_heads == num_kv_heads``)."""
        raise NotImplementedError

    def memory_init(self, batch: int, ref: torch.Tensor) -> Memory:
        hm, f, dv = self.memory_heads, self.feature_dim, self.value_dim
        return {"S": ref.new_zeros(batch, hm, f, dv), "z": ref.new_zeros(batch, hm, f)}

    def memory_bytes(self, context_len: int) -> int:
        return self.memory_heads * self.feature_dim * (self.value_dim + 1) * STATE_ELEMENT_BYTES

    def far_tiles_supported(self) -> bool:
        return True

    def far_tiles_context(self, qf, buf, length, padded_len) -> dict:
        """The memory items of the call at their read index ``j' = j + w − 1`` (zero elsewhere).

        Token ``j ≥ s`` is read by query ``i`` iff ``j ≤ i − w``, i.e. ``j' < i``: with ``j'``
        blocked like the queries, tile ``β`` reads every item of the earlier item blocks (the memory)
        and those of item block ``β`` strictly below the diagonal. Items with ``j' ≥ length`` are
        read by no query of this call and not yet in the memory after it: left out.
        """
        w, s = self.window, self.sinks
        fk, fv = self.memory_items(buf)  # [B, Hm, T, F], [B, Hm, T, Dv]
        lead = w - 1 + s  # j' of token s
        n = max(0, length - lead)  # items read within this call
        front = min(lead, padded_len)
        back = padded_len - front - n
        fk, fv = fk[:, :, s:s + n], with_ones(fv[:, :, s:s + n])
        if self.delta_rule and n:  # the memory starts empty: a prefill from position 0
            beta = self.write_strength({"k": buf["k"][:, :, s:s + n]})
            fv = delta_chunks(fk, fv, beta, self.log_decay(), self.block_size)
        return {"fk": F.pad(fk, (0, 0, front, back)), "fv": F.pad(fv, (0, 0, front, back)), "length": length}

    def far_tiles(self, ctx, qt, qf, mem, a, e, c) -> FarRead:
        """Chunked linear attention: each tile reads the memory before it (``S``, ``z`` plus the
        exclusive cumulative sum of the item blocks' ``φkᵀ[v, 1]``) and its own item block.

        With decay every sum is referenced to a position: an item block's to the block's end, the
        memory before tile ``β`` to its first query ``t_β`` (``before_β = γ^block before_{β−1} +
        block_{β−1}``), which query ``t_β + r`` reads times ``γ^r``; an own item at offset ``r'``
        (read index ``j' = j + w − 1``, available from ``j' + 1``) weighs ``γ^(r − r' − 1)``."""
        b, h = qt.shape[0], self.num_heads
        hm, blk = self.memory_heads, self.block_size
        gm, nb = h // hm, (e - a) // blk
        fk = ctx["fk"][:, :, a:e].view(b, hm, nb, blk, -1)
        fv = ctx["fv"][:, :, a:e].view(b, hm, nb, blk, -1)
        dv = fv.shape[-1] - 1
        if qf is None:  # [B, Hkv, blocks, G, block, F]: already the layout below (Hm = Hkv)
            qm = self.tile_query_features(qt).view(b, hm, nb, gm * blk, -1)
        else:
            f = qf.shape[-1]
            qm = query_rows(qf, a, e).view(b, hm, gm, nb, blk, f).transpose(2, 3).reshape(b, hm, nb, gm * blk, f)
        memory = torch.cat([mem["S"], mem["z"][..., None]], dim=-1)[:, :, None]
        decay = self._tile_decay(qm.dtype, qm.device, nb)
        if decay is None:
            blocks = torch.matmul(fk.transpose(-1, -2), fv)  # [B, Hm, blocks, F, Dv + 1]
            before = torch.cat([memory, blocks[:, :, :-1]], dim=2).cumsum(2)
            below = torch.ones(blk, blk, dtype=qm.dtype, device=qm.device).tril(-1)
        else:
            to_end, across, row_read, below = decay
            blocks = torch.matmul((fk * to_end).transpose(-1, -2), fv)
            stacked = torch.cat([memory, blocks[:, :, :-1]], dim=2)  # before_β = Σ_{k ≤ β} γ^(block (β − k)) ·
            before = torch.einsum("hik,bhkfd->bhifd", across, stacked)
        scores = torch.matmul(qm, fk.transpose(-1, -2)).view(b, hm, nb, gm, blk, blk)
        scores = scores * below if torch.is_grad_enabled() else scores.mul_(below)
        # memory read plus the own item block's, the second product added by baddbmm (one pass fewer)
        rows = b * hm * nb
        read_before = torch.matmul(qm, before)
        if decay is not None:
            read_before = read_before * row_read
        read = torch.baddbmm(read_before.view(rows, gm * blk, -1),
                             scores.view(rows, gm * blk, blk), fv.reshape(rows, blk, -1))
        if decay is None:
            memory = before[:, :, -1] + blocks[:, :, -1]
        else:  # referenced to the call's last position + 1 (not the padded end), as the block loop's
            memory = self._decayed_end(before[:, :, -1], fk[:, :, -1], fv[:, :, -1], min(e, ctx["length"]) - (e - blk))
        mem = {"S": own(memory[..., :dv]), "z": own(memory[..., dv])}
        read = self._kv_tiles(read.view(b, hm, nb, gm, blk, dv + 1))
        return read[..., :dv], self._floor(read[..., dv:]), mem

    def cached_far(self, qf, cand, member, q_pos):
        """``(m, n)`` of the candidates each query keeps (``member [B, Hkv, Tq, C]``), read as the memory
        reads them: ``φq_i φk_j [v_j, 1]``, times ``γ^(i − avail_j)`` with decay (``avail_j = j + w``)."""
        b, h, tq, f = qf.shape
        hm = self.memory_heads
        fk, fv = self.memory_items(cand)  # [B, Hm, C, F], [B, Hm, C, Dv]
        weight = member.to(qf.dtype)[:, :, None]  # [B, Hkv, 1, Tq, C]: memory heads share their kv head's choice
        weight = weight.expand(-1, -1, hm // self.num_kv_heads, -1, -1).reshape(b, hm, 1, tq, -1)
        log_gamma = self.log_decay()
        if log_gamma is not None:
            avail = repeat_kv(cand["pos"], hm // self.num_kv_heads) + self.window  # [B, Hm, C]
            age = (q_pos[:, None] - avail[:, :, None]).clamp_min(0).to(qf.dtype)  # [B, Hm, Tq, C]
            weight = weight * torch.exp(log_gamma.to(qf.dtype)[:, None, None] * age)[:, :, None]
        a = torch.matmul(qf.reshape(b, hm, -1, tq, f), fk[:, :, None].transpose(-1, -2)) * weight
        m = torch.matmul(a, fv[:, :, None])
        return m.reshape(b, h, tq, -1), a.sum(-1).reshape(b, h, tq, 1)

    def _floor(self, n: torch.Tensor) -> torch.Tensor:
        """The read normaliser, floored at 0 for delta-rule writes (which can subtract from it)."""
        return n.clamp_min(0.0) if self.delta_rule else n

    def _decayed_end(self, before: torch.Tensor, fk: torch.Tensor, fv: torch.Tensor, tail: int) -> torch.Tensor:
        """The memory ``tail`` positions after the last tile's first query: ``γ^tail before`` plus
        the last item block's items ``r < tail`` at weight ``γ^(tail − 1 − r)`` (the rest are zero)."""
        lg = self.log_decay().to(fk.dtype)[:, None]
        r = torch.arange(fk.shape[-2], device=fk.device, dtype=fk.dtype)
        age = tail - 1 - r
        weight = decay_powers(lg, age)[..., None]  # [Hm, block, 1]
        return before * torch.exp(lg * tail)[..., None] + torch.matmul((fk * weight).transpose(-1, -2), fv)

    def _tile_decay(self, dtype: torch.dtype, device: torch.device, blocks: int):
        """The decay factors of :meth:`far_tiles` (None without decay), per memory head ``u``:
        an item at block offset ``r`` to the block end ``γ^(block − 1 − r)`` ``[Hm, 1, block, 1]``;
        across blocks ``γ^(block (β − k))`` for ``k ≤ β`` ``[Hm, blocks, blocks]``; the memory read
        by the query at offset ``r`` of every query group ``γ^r`` ``[Hm, 1, G·block, 1]``; own items
        ``γ^(r − r' − 1)`` for ``r' < r`` ``[Hm, 1, 1, block, block]``."""
        log_gamma = self.log_decay()
        if log_gamma is None:
            return None
        blk, g = self.block_size, self.num_heads // self.memory_heads
        lg = log_gamma.to(dtype)[:, None, None]
        r = torch.arange(blk, device=device, dtype=dtype)
        to_end = torch.exp(lg * (blk - 1 - r)[:, None])[:, None]
        beta = torch.arange(blocks, device=device, dtype=dtype)
        gap = beta[:, None] - beta[None, :]
        across = decay_powers(lg, blk * gap)
        row_read = torch.exp(lg * r.repeat(g)[:, None])[:, None]
        age = r[:, None] - r[None, :] - 1
        own_items = decay_powers(lg, age)[:, None, None]
        return to_end, across, row_read, own_items

    def far_step(self, state, qf, item, pos, c) -> FarRead:
        """``m = φq S``, ``n = φq z``, then ``S + φk vᵀ``, ``z + φk`` of the evicted token; with decay,
        read as it is (age 0), then carried one position (``γ S + φk vᵀ``, ``γ z + φk``)."""
        b, h, _, f = qf.shape
        qg = qf.view(b, self.memory_heads, -1, f)  # [B, Hm, H / Hm, F]
        S, z = state["S"], state["z"]
        m = torch.matmul(qg, S)
        n = torch.matmul(qg, z[..., None])
        fk, fv = self.memory_items(item)  # [B, Hm, 1, F], [B, Hm, 1, Dv]
        log_gamma = self.log_decay()
        if log_gamma is not None:
            gamma = torch.exp(log_gamma.to(qf.dtype))[:, None]  # [Hm, 1]
            S, z = S * gamma[..., None], z * gamma
        if self.delta_rule:  # u = β ([v, 1] − Mᵀ φk), M the memory carried to the item's position
            beta = self.write_strength(item)[..., None]
            memory = torch.cat([S, z[..., None]], dim=-1)
            u = beta * (with_ones(fv) - torch.matmul(fk, memory))
            memory = torch.addcmul(memory, fk.transpose(-1, -2), u)
            mem = {"S": memory[..., :-1], "z": memory[..., -1]}
        else:
            mem = {"S": torch.addcmul(S, fk.transpose(-1, -2), fv), "z": z + fk[:, :, 0]}
        return m.view(b, h, 1, -1), self._floor(n.view(b, h, 1, 1)), mem

    def _kv_tiles(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, Hm, blocks, H/Hm, block, X]`` (memory-head tiles) -> ``[B, Hkv, blocks, G, block, X]``."""
        if self.memory_heads == self.num_kv_heads:
            return x
        b, _, nb, _, blk, width = x.shape  # one memory head per query head
        return x.view(b, self.num_kv_heads, -1, nb, blk, width).transpose(2, 3)

    def far_block(self, mem, qf, items, avail, item_keep, q_pos, c) -> FarRead:
        """The block's queries read the memory (every item with ``avail <= start``) and the block's
        own items with ``avail <= i``; the memory then absorbs those items.

        With decay the memory is referenced to the block start: query ``i`` reads it times
        ``γ^(i − start)``, an own item times ``γ^(i − avail)``, and the memory after the block is
        ``γ^(end − start) S + Σ γ^(end − avail_j) φk_j v_jᵀ`` (likewise ``z``), so block size, prefill
        length and decoding do not change the output."""
        b, h, tq, f = qf.shape
        qg = qf.reshape(b, self.memory_heads, -1, tq, f)
        S, z = mem["S"], mem["z"]
        m = torch.einsum("bkgtf,bkfd->bkgtd", qg, S)
        n = torch.einsum("bkgtf,bkf->bkgt", qg, z)[..., None]
        log_gamma = self.log_decay()
        if log_gamma is not None:
            log_gamma = log_gamma.to(qf.dtype)
            start, end = q_pos[0], q_pos[-1] + 1
            read = torch.exp(log_gamma[:, None] * (q_pos - start).to(qf.dtype))[None, :, None, :, None]
            m, n = m * read, n * read
            carry = torch.exp(log_gamma * (end - start).to(qf.dtype))[None, :, None]
            S, z = S * carry[..., None], z * carry
        if avail.numel():
            fk, fv = self.memory_items(items)
            fk = fk * item_keep[:, None, :, None]
            age = (q_pos[:, None] - avail[None, :]).to(qf.dtype)  # [Tq, Te]; visible where >= 0
            if log_gamma is None:
                weight = (age >= 0).to(qf.dtype)
                written = fk
            else:
                weight = decay_powers(log_gamma[:, None, None], age)[None, :, None]
                written = fk * torch.exp(log_gamma[:, None] * (end - avail).to(qf.dtype))[None, :, :, None]
            a = torch.einsum("bkgtf,bkef->bkgte", qg, fk) * weight
            if self.delta_rule:
                fv, ones = self._delta_block(mem, fk, fv, items, avail, q_pos[0])
                n = n + torch.einsum("bkgte,bked->bkgtd", a, ones)
                z = z + torch.einsum("bkef,bke->bkf", written, ones[..., 0])
            else:
                n = n + a.sum(-1, keepdim=True)
                z = z + written.sum(2)
            m = m + torch.einsum("bkgte,bked->bkgtd", a, fv)
            S = S + torch.einsum("bkef,bked->bkfd", written, fv)
        return m.reshape(b, h, tq, -1), self._floor(n.reshape(b, h, tq, 1)), {"S": S, "z": z}

    def _delta_block(self, mem: Memory, fk, fv, items: Tokens, avail: torch.Tensor, start: torch.Tensor):
        """The delta-rule values ``(u[..., :Dv], u[..., Dv:])`` of a block's items (consecutive
        positions) given the memory before the block (referenced to ``start``, the block's first query,
        with decay)."""
        memory = torch.cat([mem["S"], mem["z"][..., None]], dim=-1)
        prior = torch.matmul(fk, memory)
        log_gamma = self.log_decay()
        if log_gamma is not None:
            age = (avail - start).to(fk.dtype)
            prior = prior * torch.exp(log_gamma.to(fk.dtype)[:, None] * age)[None, :, :, None]
        u = delta_values(fk, with_ones(fv), self.write_strength(items), prior, log_gamma)
        return u[..., :-1], u[..., -1:]
