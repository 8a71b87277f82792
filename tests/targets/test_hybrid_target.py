"""Hybrid forms (exact window + sinks + far memory, one normaliser) of fastweight, elita and cat:
the degenerate cases of the math, decoding, padding, state size, and the long-prefill memory bound."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from target_helpers import (
    assert_same_decode,
    attention_site,
    build,
    decode,
    hypothesis_settings,
    padding_bias,
    qkv_inputs,
    randomize,
)

from swapformer.errors import ConfigError
from swapformer.targets.cat import CatAttention, CatConfig, HybridCat
from swapformer.targets.elita import ElitaConfig, HybridElita
from swapformer.targets.fastweight import FastWeightAttention, FastWeightConfig, HybridFastWeight
from swapformer.targets.hybrid import HybridAttention
from swapformer.targets.sdpa import SdpaAttention, SdpaConfig
from swapformer.targets.window import WindowAttention, WindowConfig

D_MODEL = 24
# "+decay": the hybrid with a decaying far memory, through every property test
# ("elita" without decay, not its default: the cumulative-sum tiles; "elita+decay" the chunked ones)
HYBRIDS = {"fastweight": {"update": "sum", "decay_half_life": 0.0},
           "fastweight+decay": {"update": "sum", "decay_half_life": 3.0}, "elita": {"decay_half_life": 0.0},
           "elita+decay": {"decay_half_life": 3.0}, "cat": {"chunk_size": 3},
           "fastweight+delta": {"update": "delta", "decay_half_life": 3.0}}
# delta-rule writes without decay: only where the decayed and undecayed code paths differ
VARIANTS = {**HYBRIDS, "fastweight+delta-nodecay": {"update": "delta", "decay_half_life": 0.0}}
TARGETS = ("fastweight", "elita", "cat")


def _hybrid(target, window, sinks, block=3, seed=1, dtype=torch.float64, heads=(4, 2, 8), **options):
    num_heads, num_kv_heads, head_dim = heads
    site, weights = attention_site(num_heads, num_kv_heads, head_dim, d_model=D_MODEL, qkv_bias=True,
                                   dtype=dtype)
    options = {**VARIANTS[target], **options}
    core = build(target.split("+")[0], site, weights, local_window=window, sinks=sinks, block_size=block,
                 **options)
    assert isinstance(core, HybridAttention)
    return randomize(core, seed=seed), site


def _strong_mix(core):
    core.set_mix(torch.linspace(0.3, 2.0, core.num_heads))
    return core


@pytest.mark.parametrize("target", TARGETS)
def test_defaults_build_the_hybrid_and_zero_keeps_the_seed_form(target):
    site, weights = attention_site(d_model=D_MODEL)
    assert isinstance(build(target, site, weights), HybridAttention)
    seed_form = build(target, site, weights, local_window=0)
    assert not isinstance(seed_form, HybridAttention)
    core = build(target, site, weights)
    assert (core.window, core.sinks) == (64, 4)
    expected = core.config.mix_init
    assert expected == (1e-6 if target == "elita" else 1e-3)
    assert torch.allclose(core.mix(), torch.full((site.num_heads,), expected, dtype=core.mix().dtype))


@pytest.mark.parametrize("target", HYBRIDS)
@hypothesis_settings()
@given(window=st.integers(1, 7), sinks=st.integers(0, 3), length=st.integers(1, 30),
       block=st.integers(1, 8), seed=st.integers(0, 5))
def test_zero_mix_is_the_window_target_exactly(target, window, sinks, length, block, seed):
    core, site = _hybrid(target, window, sinks, block, seed=seed)
    with torch.no_grad():
        core.mix_logit.fill_(-1e4)  # softplus underflows to exactly 0
    ref = WindowAttention(site.num_heads, site.num_kv_heads, site.head_dim, scale=site.scale,
                          config=WindowConfig(window=window, sinks=sinks))
    q, k, v, h = qkv_inputs(site, 2, length, D_MODEL, seed=seed)
    torch.testing.assert_close(core(q, k, v, hidden=h), ref(q, k, v), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("target", HYBRIDS)
@hypothesis_settings(8)
@given(length=st.integers(1, 20), sinks=st.integers(0, 3), seed=st.integers(0, 5))
def test_window_covering_the_input_is_the_host_attention(target, length, sinks, seed):
    core, site = _hybrid(target, 20, sinks, seed=seed)
    _strong_mix(core)
    ref = SdpaAttention.from_site(site, SdpaConfig(), {})
    q, k, v, h = qkv_inputs(site, 2, length, D_MODEL, seed=seed)
    torch.testing.assert_close(core(q, k, v, hidden=h), ref(q, k, v), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("target", HYBRIDS)
def test_far_memory_changes_the_output(target):
    """Beyond the window the mix matters (else the degenerate tests above would prove nothing)."""
    core, site = _hybrid(target, 3, 1)
    q, k, v, h = qkv_inputs(site, 1, 16, D_MODEL)
    with torch.no_grad():
        core.mix_logit.fill_(-1e4)
        base = core(q, k, v, hidden=h)
        far = _strong_mix(core)(q, k, v, hidden=h)
    assert torch.equal(far[:, :, :4], base[:, :, :4])  # nothing evicted before position 4
    assert (far[:, :, 4:] - base[:, :, 4:]).abs().max() > 1e-3


@pytest.mark.parametrize("target", HYBRIDS)
@hypothesis_settings()
@given(window=st.integers(1, 6), sinks=st.integers(0, 2), length=st.integers(2, 26),
       prefill=st.integers(0, 12), step=st.integers(1, 5), seed=st.integers(0, 5))
def test_recurrent_decode_equals_the_parallel_forward(target, window, sinks, length, prefill, step, seed):
    core, site = _hybrid(target, window, sinks, block=4, seed=seed)
    _strong_mix(core)
    q, k, v, h = qkv_inputs(site, 2, length, D_MODEL, seed=seed)
    full = core(q, k, v, hidden=h)
    torch.testing.assert_close(decode(core, q, k, v, h, min(prefill, length - 1), step), full,
                               rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("target", HYBRIDS)
def test_padding_leaves_real_positions_as_alone(target):
    core, site = _hybrid(target, 4, 1)
    _strong_mix(core)
    q, k, v, h = qkv_inputs(site, 2, 19, D_MODEL)
    padded = core(q, k, v, padding_bias([19, 11], 19), hidden=h)
    alone = core(q[1:, :, :11], k[1:, :, :11], v[1:, :, :11], hidden=h[1:, :11])
    torch.testing.assert_close(padded[1:, :, :11], alone, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(padded[:1], core(q[:1], k[:1], v[:1], hidden=h[:1]), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("target", HYBRIDS)
@pytest.mark.parametrize("length", [1, 5, 9, 23])
def test_state_bytes_are_what_the_state_holds(target, length):
    core, site = _hybrid(target, 5, 2, dtype=torch.float32)
    q, k, v, h = qkv_inputs(site, 1, length, D_MODEL, dtype=torch.float32)
    state: dict = {}
    decode_state = {}
    core(q, k, v, hidden=h, state=state)
    decode(core, q, k, v, h, 0, 1)  # token by token reaches the same size
    for t in range(length):
        core(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], hidden=h[:, t:t + 1], state=decode_state)
    for s in (state, decode_state):
        held = sum(x.numel() * x.element_size() for x in s.values() if isinstance(x, torch.Tensor))
        assert held == core.state_bytes(length)
        assert all(x.shape[0] == 1 for x in s.values() if isinstance(x, torch.Tensor))  # batch-first


def test_fastweight_state_is_per_kv_head_and_fixed():
    core = HybridFastWeight(9, 3, 64, 64, config=FastWeightConfig())
    window = (64 - 1 + 4) * (3 * 128 * 4 + 9)
    assert core.state_bytes(8192) == window + 3 * 128 * 65 * 4
    assert core.state_bytes(8192) == core.state_bytes(100_000)
    # Hedgehog maps per query and per kv head, the mix per head, decay and write strength per kv head
    assert sum(p.numel() for p in core.new_parameters()) == (9 + 3) * 64 * 64 + 9 + 3 + 3 * (64 + 1)


def test_long_prefill_is_not_dense(monkeypatch):
    """The exact part never scores more keys than sinks + window + block per query block."""
    from swapformer.targets import hybrid

    seen = []
    for name in ("local_terms", "tile_terms"):  # the block loop's and the tiled prefill's
        original = getattr(hybrid, name)

        def spy(q, k, *args, original=original):
            seen.append(k.shape[-2])
            return original(q, k, *args)

        monkeypatch.setattr(hybrid, name, spy)
    core, site = _hybrid("fastweight", 8, 2, block=4, dtype=torch.float32)
    q, k, v, h = qkv_inputs(site, 1, 200, D_MODEL, dtype=torch.float32)
    for tiled in (True, False):
        seen.clear()
        core.tiled_prefill = tiled
        core(q, k, v, hidden=h)
        assert seen and max(seen) <= 2 + 8 + 4 - 1


def test_seed_form_classes_refuse_a_window():
    with pytest.raises(ConfigError, match="local_window"):
        FastWeightAttention(4, 2, 8, 8, d_model=16, config=FastWeightConfig())
    with pytest.raises(ConfigError, match="local_window"):
        CatAttention(4, 2, 8, config=CatConfig())
    assert isinstance(HybridCat(4, 2, 8), HybridAttention)
    site, weights = attention_site(d_model=D_MODEL)
    assert isinstance(build("elita", site, weights), HybridElita)


@pytest.mark.parametrize("target", HYBRIDS)
def test_gradients_reach_the_memory_and_the_mix(target):
    core, site = _hybrid(target, 3, 1)
    q, k, v, h = qkv_inputs(site, 1, 14, D_MODEL)
    core(q, k, v, hidden=h).square().sum().backward()
    assert core.mix_logit.grad is not None and core.mix_logit.grad.abs().min() > 0
    for p in core.new_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()


@pytest.mark.parametrize("target", HYBRIDS)
def test_closed_form_mix_init_does_not_move_away_from_the_host(target):
    core, site = _hybrid(target, 4, 1, seed=0)
    q, k, v, h = qkv_inputs(site, 2, 40, D_MODEL)
    ref = SdpaAttention.from_site(site, SdpaConfig(), {})(q, k, v)
    before = (core(q, k, v, hidden=h) - ref).square().mean()
    g = core.init_from_inputs(q, k, v, hidden=h)
    assert g.shape == (site.num_heads,) and torch.allclose(core.mix(), g.to(core.mix().dtype))
    assert (core(q, k, v, hidden=h) - ref).square().mean() <= before + 1e-12


BLOCK_TARGETS = ["fastweight", "fastweight+decay", "cat", "elita", "elita+decay", "fastweight+delta",
                 "fastweight+delta-nodecay"]


@pytest.mark.parametrize("target", BLOCK_TARGETS)
@hypothesis_settings(8)
@given(window=st.integers(1, 6), sinks=st.integers(0, 2), length=st.integers(1, 30),
       block=st.integers(2, 9), seed=st.integers(0, 5))
def test_block_size_does_not_change_the_output(target, window, sinks, length, block, seed):
    one, site = _hybrid(target, window, sinks, block=1, seed=seed)
    many, _ = _hybrid(target, window, sinks, block=block, seed=seed)
    # the same parameters (elita draws its Fourier positions at construction, outside the seed)
    many.load_state_dict(one.state_dict())
    _strong_mix(one), _strong_mix(many)
    q, k, v, h = qkv_inputs(site, 2, length, D_MODEL, seed=seed)
    torch.testing.assert_close(many(q, k, v, hidden=h), one(q, k, v, hidden=h), rtol=1e-10, atol=1e-10)


def _dense_decayed(core, q, k, v, hidden) -> torch.Tensor:
    """A decayed hybrid (fastweight's or elita's memory) of the module docstrings, query by query, key
    by key."""
    w, s, g = core.window, core.sinks, core.mix()
    kv_group, memory_group = core.num_heads // core.num_kv_heads, core.num_heads // core.memory_heads
    pos = torch.arange(q.shape[-2])
    qf = core.query_features(q, hidden, pos)
    kf, fv = core.memory_items({"k": k, "v": v, **core.token_inputs(k, v, hidden, pos)})
    gamma = core.log_decay().exp()
    q, k, v, qf, kf, fv = q[0], k[0], v[0], qf[0], kf[0], fv[0]  # one sequence
    out = torch.zeros_like(q)
    for hq in range(core.num_heads):
        u, hm = hq // kv_group, hq // memory_group
        for i in range(q.shape[-2]):
            near = [j for j in range(i + 1) if i - j < w or j < s]
            far = range(s, i - w + 1)
            logits = torch.stack([core.scale * q[hq, i] @ k[u, j] for j in near])
            e = (logits - logits.max()).exp()
            num = sum(e[n] * v[u, j] for n, j in enumerate(near))
            den = e.sum()
            for j in far:
                weight = gamma[hm] ** (i - (j + w)) * (qf[hq, i] @ kf[hm, j])
                num, den = num + g[hq] * weight * fv[hm, j], den + g[hq] * weight
            out[hq, i] = num / den
    return out[None]


@pytest.mark.parametrize("target", ["fastweight+decay", "elita+decay"])
def test_decayed_memory_is_the_docstring_formula(target):
    core, site = _hybrid(target, 3, 1, block=4, seed=2)
    _strong_mix(core)
    with torch.no_grad():
        core.decay_logit.copy_(torch.linspace(-1.0, 2.0, core.memory_heads))  # γ differs per memory head
    q, k, v, h = qkv_inputs(site, 1, 17, D_MODEL, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(core(q, k, v, hidden=h), _dense_decayed(core, q, k, v, h),
                                   rtol=1e-10, atol=1e-10)


def _dense_delta(core, q, k, v, hidden) -> torch.Tensor:
    """fastweight's delta-rule hybrid as its module docstring writes it: position by position, the
    memory decays, query ``i`` reads it, then the token leaving the window is written."""
    w, s, g = core.window, core.sinks, core.mix()
    kv_group = core.num_heads // core.num_kv_heads
    length = q.shape[-2]
    pos = torch.arange(length)
    qf = core.query_features(q, hidden, pos)[0]
    kf, _ = core.memory_items({"k": k, "v": v})
    beta = core.write_strength({"k": k})[0]
    gamma = torch.ones(core.memory_heads, dtype=q.dtype) if core.decay_logit is None else core.log_decay().exp()
    q, k, v, kf = q[0], k[0], v[0], kf[0]
    out = torch.zeros_like(q)
    memory = torch.zeros(core.num_kv_heads, kf.shape[-1], v.shape[-1] + 1, dtype=q.dtype)
    for i in range(length):
        j = i - w  # F_i gains token j at position i (avail = j + w)
        memory = memory * gamma[:, None, None]
        if j >= s:
            for u in range(core.num_kv_heads):
                value = torch.cat([v[u, j], torch.ones(1, dtype=q.dtype)])
                write = beta[u, j] * (value - memory[u].T @ kf[u, j])
                memory[u] = memory[u] + torch.outer(kf[u, j], write)
        for hq in range(core.num_heads):
            u = hq // kv_group
            near = [jj for jj in range(i + 1) if i - jj < w or jj < s]
            logits = torch.stack([core.scale * q[hq, i] @ k[u, jj] for jj in near])
            e = (logits - logits.max()).exp()
            num = sum(e[n] * v[u, jj] for n, jj in enumerate(near))
            read = qf[hq, i] @ memory[u]
            out[hq, i] = (num + g[hq] * read[:-1]) / (e.sum() + g[hq] * read[-1].clamp_min(0))
    return out[None]


@pytest.mark.parametrize("target", ["fastweight+delta", "fastweight+delta-nodecay"])
@pytest.mark.parametrize("tiled", [True, False])
def test_delta_rule_memory_is_the_docstring_formula(target, tiled):
    core, site = _hybrid(target, 3, 1, block=4, seed=2)
    _strong_mix(core)
    core.tiled_prefill = tiled
    q, k, v, h = qkv_inputs(site, 1, 19, D_MODEL, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(core(q, k, v, hidden=h), _dense_delta(core, q, k, v, h),
                                   rtol=1e-10, atol=1e-10)


def test_delta_rule_with_no_write_is_the_window_and_validates():
    core, site = _hybrid("fastweight+delta", 3, 1, seed=5)
    _strong_mix(core)
    with torch.no_grad():
        core.write_bias.fill_(-1e4)  # β = σ(−1e4) = 0 exactly in float64: nothing is written
    ref = WindowAttention(site.num_heads, site.num_kv_heads, site.head_dim, scale=site.scale,
                          config=WindowConfig(window=3, sinks=1))
    q, k, v, h = qkv_inputs(site, 2, 21, D_MODEL)
    torch.testing.assert_close(core(q, k, v, hidden=h), ref(q, k, v), rtol=1e-10, atol=1e-10)
    assert HybridFastWeight(9, 3, 8, 8, config=FastWeightConfig(update="sum")).write_weight is None
    with pytest.raises(ConfigError, match="update"):
        FastWeightConfig(update="overwrite")
    with pytest.raises(ConfigError, match="local_window"):
        FastWeightConfig(update="delta", local_window=0)
    # signed (identity) features: only the delta rule, whose normaliser is a written value, takes them
    assert HybridFastWeight(9, 3, 8, 8, config=FastWeightConfig(update="delta", feature_map="identity")).q_map is None
    with pytest.raises(ConfigError, match="identity"):
        FastWeightConfig(feature_map="identity", update="sum")


def test_fastweight_defaults_are_the_measured_hybrid_recipe():
    """The hybrid defaults to decay 128 and delta writes (RESULTS.md, session 19); the seed form to
    neither, and explicit values are kept."""
    hybrid, seed = FastWeightConfig(), FastWeightConfig(local_window=0)
    assert (hybrid.feature_map, hybrid.decay_half_life, hybrid.update) == ("hedgehog", 128.0, "delta")
    assert (seed.feature_map, seed.decay_half_life, seed.update) == ("elu1", 0.0, "sum")
    explicit = FastWeightConfig(decay_half_life=0.0, update="sum")
    assert (explicit.decay_half_life, explicit.update) == (0.0, "sum")
    core = HybridFastWeight(9, 3, 8, 8, config=hybrid)
    assert core.delta_rule and core.decay_logit is not None and core.write_weight is not None


def test_no_decay_is_todays_form_and_decay_changes_the_far_part():
    undecayed, site = _hybrid("fastweight", 3, 1, seed=4)
    assert undecayed.decay_logit is None and undecayed.config.decay_half_life == 0
    decayed, _ = _hybrid("fastweight+decay", 3, 1, seed=4)
    decayed.load_state_dict(undecayed.state_dict(), strict=False)  # same maps and mix
    for core in (undecayed, decayed):
        _strong_mix(core)
    q, k, v, h = qkv_inputs(site, 2, 24, D_MODEL)
    with torch.no_grad():
        base = undecayed(q, k, v, hidden=h)
        decayed.decay_logit.fill_(60.0)  # γ = σ(60) = 1 − 1e-26: no decay within float64
        torch.testing.assert_close(decayed(q, k, v, hidden=h), base, rtol=1e-12, atol=1e-12)
        decayed.decay_logit.fill_(0.0)  # γ = 1/2
        fast = decayed(q, k, v, hidden=h)
    # nothing evicted before position 4 (equal to rounding: the undecayed prefill runs as tiles, the
    # decayed one as the block loop)
    torch.testing.assert_close(fast[:, :, :4], base[:, :, :4], rtol=1e-12, atol=1e-12)
    assert (fast[:, :, 5:] - base[:, :, 5:]).abs().max() > 1e-3


def test_decay_half_life_sets_gamma_per_kv_head_and_is_validated():
    core = HybridFastWeight(9, 3, 8, 8, config=FastWeightConfig(decay_half_life=512.0))
    assert core.log_decay().shape == (3,)
    torch.testing.assert_close(core.log_decay().exp() ** 512, torch.full((3,), 0.5), rtol=1e-4, atol=0)
    with pytest.raises(ConfigError, match="decay_half_life"):
        FastWeightConfig(decay_half_life=-1.0)
    elita = HybridElita(9, 3, 8, 8, D_MODEL, config=ElitaConfig(decay_half_life=512.0))
    assert elita.log_decay().shape == (9,)  # elita's memory is per query head
    assert ElitaConfig().decay_half_life == 128.0 and ElitaConfig(local_window=0).decay_half_life == 0.0
    assert HybridElita(9, 3, 8, 8, D_MODEL, config=ElitaConfig(decay_half_life=0.0)).decay_logit is None
    with pytest.raises(ConfigError, match="decay_half_life"):
        ElitaConfig(decay_half_life=-1.0)
    with pytest.raises(ConfigError, match="local_window"):
        ElitaConfig(decay_half_life=64.0, local_window=0)


@pytest.mark.parametrize("target", ["fastweight", "fastweight+decay", "elita", "elita+decay", "cat",
                                    "fastweight+delta", "fastweight+delta-nodecay"])
@hypothesis_settings(10)
@given(window=st.integers(1, 7), sinks=st.integers(0, 3), length=st.integers(2, 40),
       block=st.integers(1, 9), segment=st.integers(1, 24), seed=st.integers(0, 5))
def test_tiled_prefill_equals_the_block_loop(target, window, sinks, length, block, segment, seed):
    """A prefill from position 0 runs as tiles; the per-block loop (the formula block by block) is
    the reference: outputs, gradients of every input and parameter, and the decoding state."""
    core, site = _hybrid(target, window, sinks, block=block, seed=seed)
    _strong_mix(core)
    core.segment_len = segment
    q, k, v, h = qkv_inputs(site, 2, length, D_MODEL, seed=seed)
    inputs = [x.requires_grad_(True) for x in (q, k, v, h)]
    names, params = zip(*[(n, p) for n, p in core.named_parameters() if p.requires_grad])
    results = []
    for tiled in (True, False):
        core.tiled_prefill = tiled
        out = core(q, k, v, hidden=h)
        grads = torch.autograd.grad(out.square().sum(), inputs + list(params), allow_unused=True)
        state: dict = {}
        with torch.no_grad():  # inference takes other kernels (cat: the fused CPU attention)
            inference = core(q, k, v, hidden=h, state=state)
        results.append((out, grads, state, inference))
    (fast, fast_grads, fast_state, fast_inf), (slow, slow_grads, slow_state, slow_inf) = results
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fast_inf, slow_inf, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fast_inf, slow.detach(), rtol=1e-10, atol=1e-10)
    for name, got, want in zip(("q", "k", "v", "hidden", *names), fast_grads, slow_grads):
        if got is None and want is None:
            continue
        # a parameter one path never reached (no far item) has no gradient there: zero
        got = torch.zeros_like(want) if got is None else got
        want = torch.zeros_like(got) if want is None else want
        tol = 1e-6 if name == "mix_logit" else 1e-9  # the mix is computed in float32 (mix())
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * max(1.0, float(want.abs().max())))
    assert fast_state.keys() == slow_state.keys()
    for name, value in fast_state.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(value, slow_state[name], rtol=1e-10, atol=1e-10)
        else:
            assert value == slow_state[name]


@pytest.mark.parametrize("target", ["fastweight", "elita", "cat"])
def test_tiled_prefill_runs_for_a_long_call(target, monkeypatch):
    """The test above compares against the loop only if the tiled path runs: check it does."""
    core, site = _hybrid(target, 4, 2, block=4)
    calls = []
    original = core._tiled
    monkeypatch.setattr(core, "_tiled", lambda *a: calls.append(1) or original(*a))
    q, k, v, h = qkv_inputs(site, 1, 30, D_MODEL)
    core(q, k, v, hidden=h)
    core.tiled_prefill = False
    core(q, k, v, hidden=h)
    assert calls == [1]


def _run_calls(core, q, k, v, h, bounds):
    """Outputs and a copy of the state after each call ``bounds[i] .. bounds[i + 1]`` of a decode."""
    state: dict = {}
    outs, states = [], []
    with torch.no_grad():
        for a, e in zip(bounds[:-1], bounds[1:]):
            outs.append(core(q[:, :, a:e], k[:, :, a:e], v[:, :, a:e], hidden=h[:, a:e], state=state))
            states.append(dict(state))
    return outs, states


@pytest.mark.parametrize("target", HYBRIDS)
@hypothesis_settings(10)
@given(window=st.integers(1, 7), sinks=st.integers(0, 3), prefill=st.integers(0, 12),
       steps=st.lists(st.sampled_from([1, 1, 1, 1, 2, 3]), min_size=1, max_size=24),
       heads=st.sampled_from([(4, 2, 8), (6, 3, 4), (3, 1, 8), (2, 2, 6)]), batch=st.integers(1, 2),
       seed=st.integers(0, 5))
def test_decode_step_equals_the_block_loop(target, window, sinks, prefill, steps, heads, batch, seed):
    """One-token steps after the window fills run ``_decode_step``; the block loop is the reference:
    every output and the state after every call (steps before the window fills, multi-token calls
    in between and GQA shapes included, so the loop also continues from the fast path's states)."""
    core, site = _hybrid(target, window, sinks, block=3, seed=seed, heads=heads)
    _strong_mix(core)
    bounds = [0, prefill] if prefill else [0]
    for n in steps:
        bounds.append(bounds[-1] + n)
    q, k, v, h = qkv_inputs(site, batch, bounds[-1], D_MODEL, seed=seed)
    results = []
    for fast in (True, False):
        core.fast_decode = fast
        results.append(_run_calls(core, q, k, v, h, bounds))
    (fast_outs, fast_states), (slow_outs, slow_states) = results
    assert_same_decode(fast_outs, fast_states, slow_outs, slow_states)


@pytest.mark.parametrize("target", HYBRIDS)
def test_decode_step_runs_once_the_window_fills(target, monkeypatch):
    """The test above compares against the loop only if the fast step runs: check when it does."""
    window, sinks = 4, 2
    core, site = _hybrid(target, window, sinks)
    calls = []
    original = core._decode_step
    monkeypatch.setattr(core, "_decode_step", lambda *a: calls.append(a[-1]["pos"]) or original(*a))
    q, k, v, h = qkv_inputs(site, 1, 12, D_MODEL)
    _run_calls(core, q, k, v, h, list(range(13)))
    assert calls == list(range(window + sinks - 1, 12))  # from position s + w − 1 on
    calls.clear()
    with torch.no_grad():
        core(q, k, v, hidden=h, state={})  # a prefill is not a step
        core.fast_decode = False
        _run_calls(core, q, k, v, h, list(range(13)))
    assert calls == []


@pytest.mark.parametrize("target", TARGETS)
def test_a_position_bias_is_refused_at_the_site_and_at_run_time(target):
    """The hybrids read only a mask's causal structure and padding: a site or a mask that adds terms to
    the scores is refused rather than silently ignored."""
    import dataclasses

    from swapformer.errors import InputError
    from swapformer.targets.base import core_class, resolve_target

    site, _ = attention_site(d_model=D_MODEL)
    biased = dataclasses.replace(site, mask="bias")
    hybrid, seed_form = resolve_target(target), resolve_target(target, local_window=0)
    assert "position bias" in core_class(hybrid, "attention").unsupported(biased, hybrid)
    assert core_class(seed_form, "attention").unsupported(biased, seed_form) is None
    core, site = _hybrid(target, 3, 1)
    q, k, v, h = qkv_inputs(site, 1, 10, D_MODEL)
    i, j = torch.arange(10)[:, None], torch.arange(10)[None, :]
    alibi = torch.where(j <= i, -0.1 * (i - j).double(), -torch.inf)
    with pytest.raises(InputError, match="adds terms to the scores"):
        core(q, k, v, alibi, hidden=h)
    causal = torch.where(j <= i, 0.0, -torch.inf).double()
    torch.testing.assert_close(core(q, k, v, causal, hidden=h), core(q, k, v, hidden=h), rtol=1e-10, atol=1e-10)
