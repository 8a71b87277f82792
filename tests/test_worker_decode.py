"""Exact worker decoding: a call's repeated last tokens are transient workers that leave nothing in the
state, so decoding equals the full forward of each prefix (``targets/worker.py``, "Decoding")."""

from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import swapformer
from swapformer.targets.worker import WorkerAttention, WorkerConfig

transformers = pytest.importorskip("transformers")

from test_hf_generate import (  # noqa: E402  (after the transformers skip)
    _decode_matches_prefix_forwards,
    _greedy,
    _host,
    _ids,
    _left_padded_batch_matches_each_prompt_alone,
)


def _core(interval: int, local_window: int = 64, sinks: int = 4) -> WorkerAttention:
    torch.manual_seed(interval)
    config = WorkerConfig(interval=interval, local_window=local_window, sinks=sinks)
    core = WorkerAttention(4, 2, 8, 16, config=config).double()
    with torch.no_grad():
        for p in core.parameters():
            p.normal_()
    return core


@settings(max_examples=60)  # the window adds two dimensions to the seed's four
@given(interval=st.integers(1, 4), prompt=st.integers(1, 7), repeats=st.integers(1, 3),
       steps=st.integers(1, 4), local_window=st.sampled_from([0, 1, 2, 3, 64]), sinks=st.integers(0, 2))
def test_repeats_equal_the_full_forward_of_their_prefix(interval, prompt, repeats, steps, local_window,
                                                        sinks):
    """In a model a repeat's inputs differ from its token's (the repeat was a worker in the layers
    below): its output is the full forward of the prefix ending with the repeat's inputs. The stored
    non-worker rows read their local window from the state (windows shorter than the input here)."""
    core, repeats = _core(interval, local_window, sinks), min(repeats, prompt)
    g = torch.Generator().manual_seed(prompt * 7 + steps)
    n = prompt + steps

    def inputs(length: int) -> list[torch.Tensor]:
        shapes = [(2, 4, length, 8), (2, 2, length, 8), (2, 2, length, 8), (2, length, 16)]
        return [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes]

    tokens, repeated = inputs(n), inputs(n)  # q, k, v, hidden of each token and of its repeat

    def call(start: int, end: int, m: int, state: dict) -> torch.Tensor:
        rows = [torch.cat([x[..., start:end, :], r[..., end - m:end, :]], -2) for x, r in zip(tokens, repeated)]
        return core(*rows[:3], hidden=rows[3], state=state, transients=m)

    def prefix_ending_with_repeat(p: int) -> torch.Tensor:
        rows = [torch.cat([x[..., :p, :], r[..., p:p + 1, :]], -2) for x, r in zip(tokens, repeated)]
        return core(*rows[:3], hidden=rows[3])[:, :, -1]

    with torch.no_grad():
        state: dict = {}
        out = call(0, prompt, repeats, state)
        longer = core(*tokens[:3], hidden=tokens[3])  # stored rows: as in the full forward of a longer input
        torch.testing.assert_close(out[:, :, :prompt], longer[:, :, :prompt], rtol=1e-12, atol=1e-12)
        for j in range(repeats):
            want = prefix_ending_with_repeat(prompt - repeats + j)
            torch.testing.assert_close(out[:, :, prompt + j], want, rtol=1e-12, atol=1e-12)
        assert state["pos"] == prompt and state["k"].shape[1] == prompt
        for t in range(prompt, n):
            out = call(t, t + 1, 1, state)
            torch.testing.assert_close(out[:, :, -1], prefix_ending_with_repeat(t), rtol=1e-12, atol=1e-12)
            if t < n - 1:  # the stored row (its window read from the state), as in the longer input
                torch.testing.assert_close(out[:, :, 0], longer[:, :, t], rtol=1e-12, atol=1e-12)
        plain: dict = {}  # the state holds the stored rows only: the same as a call without repeats
        core(*tokens[:3], hidden=tokens[3], state=plain)
        torch.testing.assert_close(state["k"], plain["k"], rtol=0, atol=0)
        torch.testing.assert_close(state["conv_in"], plain["conv_in"], rtol=0, atol=0)


def test_a_call_cannot_repeat_more_tokens_than_it_stores():
    core = _core(2)
    q, k, v = torch.randn(1, 4, 3, 8).double(), torch.randn(1, 2, 3, 8).double(), torch.randn(1, 2, 3, 8).double()
    with pytest.raises(swapformer.InputError, match="repeated tokens"):
        core(q, k, v, hidden=torch.randn(1, 3, 16).double(), state={}, transients=2)


@pytest.fixture(scope="module")
def attention_and_ffn():
    """A window shorter than the test inputs, so decoding reads it from the state."""
    return swapformer.prepare(_host(), kinds=("attention", "ffn")).rewrite("worker", interval=3, local_window=4,
                                                                            sinks=1)


def test_worker_ffn_decodes_exactly(attention_and_ffn) -> None:
    model = attention_and_ffn
    assert {r.site.kind for r in model.swapformer_report.replaced} == {"attention", "ffn"}
    _decode_matches_prefix_forwards(model, _ids(2, 12))
    _left_padded_batch_matches_each_prompt_alone(model)
    ids = torch.cat([_ids(1, 6, seed=8)] * 3, dim=1)
    assert torch.equal(_greedy(model, ids, prompt_lookup_num_tokens=3), _greedy(model, ids))


def test_a_crop_snapshot_shares_the_grown_keys_and_still_rolls_back(attention_and_ffn) -> None:
    """The state kept for ``crop`` does not hold a second copy of the worker's growing keys/values: it
    names their first rows (``_Prefix``); cropping back inside the last call restores them exactly."""
    from swapformer.rewriter.hf_cache import _Prefix

    model, ids = attention_and_ffn, _ids(1, 30)
    with torch.no_grad():
        cache = model(ids[:, :20], use_cache=True).past_key_values
        cache = model(ids[:, 20:], past_key_values=cache, use_cache=True).past_key_values
        before, _ = cache.core_layers()[0].replay
        assert before["k"] == _Prefix(20) and before["v"] == _Prefix(20)
        cache.crop(25)
        cropped = model(ids[:, 25:26], past_key_values=cache, use_cache=True).logits
        fresh = model(ids[:, :25], use_cache=True).past_key_values
        torch.testing.assert_close(cropped, model(ids[:, 25:26], past_key_values=fresh, use_cache=True).logits)


def test_cached_call_outputs_equal_the_uncached_ones(attention_and_ffn) -> None:
    model, ids = attention_and_ffn, _ids(2, 7)
    with torch.no_grad():
        full = model(ids, output_hidden_states=True)
        cached = model(ids, use_cache=True, output_hidden_states=True)
        as_tuple = model(ids, use_cache=True, return_dict=False)
    assert len(cached.hidden_states) == len(full.hidden_states)
    for got, want in zip(cached.hidden_states, full.hidden_states):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(as_tuple[0], full.logits, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("kinds", "replaced"), [(("attention",), 1), (("ffn",), 2)])
def test_partial_conversion_decodes_without_repeats_and_warns(caplog, kinds, replaced) -> None:
    """One worker attention of two, or worker FFNs under the host's attention."""
    model = swapformer.rewrite(_host(), "worker", interval=2, kinds=kinds,
                               filter_fn=lambda site: "ffn" in kinds or site.module.startswith("model.layers.0."))
    assert len(model.swapformer_report.replaced) == replaced
    with caplog.at_level(logging.WARNING, logger="swapformer.rewriter.hf_cache"):
        out = _greedy(model, _ids(1, 5))
    assert out.shape == (1, 10)
    assert sum("approximate" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize("kinds", [("attention",), ("attention", "ffn")])
def test_each_kept_logit_is_the_prefix_forward(kinds) -> None:
    """Asking a cached call for its last n logits (assisted decoding verifies candidates so) gives
    each of them as if its token had been decoded: the forward of its prefix."""
    model = swapformer.prepare(_host(), kinds=kinds).rewrite("worker", interval=3)
    ids = _ids(2, 11)
    with torch.no_grad():
        cache = model(ids[:, :5], use_cache=True).past_key_values
        kept = model(ids[:, 5:], past_key_values=cache, use_cache=True, logits_to_keep=4).logits
        assert cache.get_seq_length() == 11
        for j, t in enumerate(range(7, 11)):
            torch.testing.assert_close(kept[:, j], model(ids[:, :t + 1]).logits[:, -1], rtol=1e-5, atol=1e-5)
