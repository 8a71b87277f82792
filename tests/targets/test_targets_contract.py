"""Contract checks every attention target must pass: build, refuse, causality, decoding, padding."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from target_helpers import (
    attention_site,
    build,
    decode,
    hypothesis_settings,
    padding_bias,
    qkv_inputs,
    randomize,
)

from swapformer.errors import ConfigError, InputError
from swapformer.targets.base import core_class, resolve_target

D_MODEL = 24

# (target, options): every mode that has its own code path
CASES = [
    ("fastweight", {"feature_map": "identity", "local_window": 0}),
    ("fastweight", {"feature_map": "hedgehog", "normalize": True, "chunk_size": 4, "local_window": 0}),
    ("fastweight", {"feature_map": "elu1", "normalize": True, "local_window": 0}),
    ("fastweight", {"local_window": 3, "sinks": 1, "block_size": 2}),
    ("fastweight", {"local_window": 4, "sinks": 0, "feature_map": "elu1"}),
    ("elita", {"local_window": 0}),
    ("elita", {"local_window": 3, "sinks": 2, "block_size": 3}),
    ("elita", {"local_window": 3, "sinks": 1, "cache": 2, "block_size": 3}),
    ("fastweight", {"local_window": 3, "sinks": 1, "cache": 2, "update": "sum", "block_size": 2}),
    ("cat", {"chunk_size": 4, "local_window": 0}),
    ("cat", {"chunk_size": 4, "sink": True, "local_window": 0}),
    ("cat", {"chunk_size": 2, "local_window": 3, "sinks": 1, "block_size": 2}),
    ("cat", {"mode": "layer", "chunk_size": 4, "head_dim": 8}),
    ("window", {"window": 5, "sinks": 2}),
    ("window", {"window": 4, "sinks": 0, "block_size": 3}),
    ("window", {"window": 4, "sinks": 1, "cache": 3, "block_size": 3}),
    ("worker", {"interval": 3}),
    ("worker", {"interval": 1}),
]
IDS = [t + "".join(f"-{k}={v}" for k, v in o.items()) for t, o in CASES]


def _core(target, options, seed=0):
    site, weights = attention_site(d_model=D_MODEL, qkv_bias=True)
    return randomize(build(target, site, weights, **options), seed=seed + 1), site


def _workers(t, options):
    """Positions whose output a full forward of any longer input reproduces (all but worker's)."""
    pos = torch.arange(t)
    k = options.get("interval", 4)
    return (pos % k == k - 1) | (pos == t - 1)


@pytest.mark.parametrize(("target", "options"), CASES, ids=IDS)
def test_from_site_registers_and_copies(target, options):
    site, weights = attention_site(d_model=D_MODEL, qkv_bias=True)
    core = build(target, site, weights, **options)
    assert core.target_name == target
    host = {t.data_ptr() for t in weights.values()}
    for tensor in list(core.parameters()) + list(core.buffers()):
        assert tensor.data_ptr() not in host, "a core must copy host weights, never share them"
    assert isinstance(core.flops_per_token(128), int) and core.flops_per_token(128) > 0
    assert isinstance(core.state_bytes(128), int) and core.state_bytes(128) >= 0
    assert core.parameter_count() == sum(p.numel() for p in core.parameters())


@pytest.mark.parametrize("target", ["fastweight", "elita", "cat", "window", "worker"])
def test_refuses_bidirectional_cross_and_softcap(target):
    config = resolve_target(target)
    cls = core_class(config, "attention")
    for kwargs in ({"causal": False}, {"cross": True}):
        site, _ = attention_site(**kwargs)
        assert isinstance(cls.unsupported(site, config), str)
    site, _ = attention_site()
    assert cls.unsupported(site, config) is None
    assert isinstance(cls.unsupported(dataclasses.replace(site, softcap=30.0), config), str)


@pytest.mark.parametrize(("target", "options"), CASES, ids=IDS)
@hypothesis_settings(8)
@given(length=st.integers(2, 13), cut=st.integers(0, 12), seed=st.integers(0, 2**16))
def test_causality(target, options, length, cut, seed):
    cut = min(cut, length - 1)
    core, site = _core(target, options)
    q, k, v, h = qkv_inputs(site, 2, length, D_MODEL, seed=seed)
    out = core(q, k, v, hidden=h)
    q2, k2, v2, h2 = (x.clone() for x in (q, k, v, h))
    q2[:, :, cut + 1 :] += 1.0
    k2[:, :, cut + 1 :] -= 2.0
    v2[:, :, cut + 1 :] *= 3.0
    h2[:, cut + 1 :] += 1.5
    out2 = core(q2, k2, v2, hidden=h2)
    keep = torch.arange(length) <= cut
    torch.testing.assert_close(out[:, :, keep], out2[:, :, keep], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("target", "options"), CASES, ids=IDS)
@hypothesis_settings(8)
@given(length=st.integers(1, 14), prefill=st.integers(0, 14), step=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_decode_matches_full_forward(target, options, length, prefill, step, seed):
    core, site = _core(target, options)
    q, k, v, h = qkv_inputs(site, 2, length, D_MODEL, seed=seed)
    full = core(q, k, v, hidden=h)
    cached = decode(core, q, k, v, h, min(prefill, length), step)
    tol = {"rtol": 1e-5, "atol": 1e-5} if target == "elita" else {"rtol": 1e-9, "atol": 1e-9}
    if target != "worker":
        torch.testing.assert_close(cached, full, **tol)
        return
    # worker: a step ending at t makes t a transient worker (seeds 1.2); residues always agree
    residue = _workers(length, options)
    torch.testing.assert_close(cached[:, :, residue], full[:, :, residue], **tol)
    if step == 1:
        for t in range(min(prefill, length), length):
            prefix = core(q[:, :, : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], hidden=h[:, : t + 1])
            torch.testing.assert_close(cached[:, :, t], prefix[:, :, t], **tol)


@pytest.mark.parametrize(("target", "options"), CASES, ids=IDS)
def test_right_padding_leaves_real_positions_unchanged(target, options):
    core, site = _core(target, options)
    lengths, total = [11, 7], 11
    q, k, v, h = qkv_inputs(site, 2, total, D_MODEL, seed=3)
    padded = core(q, k, v, padding_bias(lengths, total), hidden=h)
    for b, n in enumerate(lengths):
        alone = core(q[b : b + 1, :, :n], k[b : b + 1, :, :n], v[b : b + 1, :, :n], hidden=h[b : b + 1, :n])
        tol = 1e-5 if target == "elita" else 1e-9
        torch.testing.assert_close(padded[b : b + 1, :, :n], alone, rtol=tol, atol=tol)


@pytest.mark.parametrize(("target", "options"), CASES, ids=IDS)
def test_backward_reaches_new_parameters(target, options):
    core, site = _core(target, options)
    core.train()
    q, k, v, h = qkv_inputs(site, 2, 9, D_MODEL, seed=4)
    inputs = [x.requires_grad_(True) for x in (q, k, v, h)]
    core(q, k, v, hidden=h).square().sum().backward()
    grads = [x.grad for x in inputs if x.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    for p in core.new_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()


@pytest.mark.parametrize(("target", "options"), CASES, ids=IDS)
def test_new_parameters_do_not_depend_on_requires_grad(target, options):
    # calibrate's LoRA (peft) freezes every non-adapter parameter before it selects what trains
    core, _ = _core(target, options)
    before = [id(p) for p in core.new_parameters()]
    core.requires_grad_(False)
    assert [id(p) for p in core.new_parameters()] == before


@pytest.mark.parametrize("target", ["fastweight", "elita", "cat", "worker"])
def test_full_call_needs_matching_queries_and_keys(target):
    core, site = _core(target, {})
    q, k, v, h = qkv_inputs(site, 1, 6, D_MODEL)
    with pytest.raises(InputError):
        core(q[:, :, -2:], k, v, hidden=h[:, -2:])


@pytest.mark.parametrize("target", ["fastweight", "elita", "worker"])
def test_hidden_is_required(target):
    core, site = _core(target, {"local_window": 0} if target == "fastweight" else {})
    q, k, v, _ = qkv_inputs(site, 1, 4, D_MODEL)
    with pytest.raises(InputError, match="hidden"):
        core(q, k, v)


@pytest.mark.parametrize(
    ("target", "options"),
    [("fastweight", {"feature_map": "nope"}), ("fastweight", {"feature_map": "identity", "normalize": True}),
     ("fastweight", {"chunk_size": 3}), ("elita", {"clip": 0.0}), ("elita", {"linear_factor": 0}),
     ("cat", {"mode": "dense"}), ("cat", {"chunk_size": 0}), ("cat", {"chunk_size": 6, "max_chunk_size": 8}),
     ("cat", {"chunk_size": 16, "max_chunk_size": 8}), ("window", {"window": 0}),
     ("window", {"sinks": -1}), ("fastweight", {"local_window": -1}),
     ("fastweight", {"feature_map": "identity", "normalize": False, "update": "sum"}), ("elita", {"sinks": -1}),
     ("cat", {"mode": "layer", "local_window": 8}), ("cat", {"block_size": 0}), ("cat", {"mix_init": 0.0}), ("worker", {"interval": 0}), ("worker", {"conv_kernel": 0})],
)
def test_invalid_options_raise_config_error(target, options):
    with pytest.raises(ConfigError):
        resolve_target(target, **options)
