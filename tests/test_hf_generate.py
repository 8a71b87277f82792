"""A converted Hugging Face decoder through ``generate()``: every decoding mode equals the full forward,
and the cache holds the targets' state alone (no host keys/values for replaced layers)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import swapformer

transformers = pytest.importorskip("transformers")

TARGETS = {
    "sdpa": {},
    "window": {"window": 4, "sinks": 1},
    "fastweight": {},
    "elita": {},
    "cat": {"chunk_size": 4},
    "worker": {"interval": 2},
}
LEARNED = [t for t in TARGETS if t != "sdpa"]
def _host(kind: str = "llama", dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=100, pad_token_id=0, eos_token_id=None)
    if kind == "mistral":  # a sliding-window host
        model = transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=6, **common))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    return model.eval().to(dtype)


@pytest.fixture(scope="module")
def llama():
    return swapformer.prepare(_host(), kinds=("attention",))


def _converted(analysis, target: str):
    out = analysis.rewrite(target, **TARGETS[target])
    assert len(out.swapformer_report.replaced) == 2, out.swapformer_report
    return out


def _ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def _greedy(model, ids, mask=None, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, **kwargs)


def _decode_matches_prefix_forwards(model, ids: torch.Tensor) -> None:
    """Prefill, then one token per call; each step's logits equal the full forward of the prefix."""
    with torch.no_grad():
        out = model(ids[:, :5], use_cache=True)
        cache, steps = out.past_key_values, [out.logits[:, -1]]
        for t in range(5, ids.shape[1]):
            out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits[:, -1])
        for i, t in enumerate(range(4, ids.shape[1])):
            full = model(ids[:, :t + 1]).logits[:, -1]
            torch.testing.assert_close(steps[i], full, atol=1e-5, rtol=1e-5)


def _left_padded_batch_matches_each_prompt_alone(model) -> None:
    prompts = [_ids(1, 9, seed=4)[0], _ids(1, 5, seed=5)[0]]
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, 9 - len(p):], mask[i, 9 - len(p):] = p, 1
    batched = _greedy(model, ids, mask)
    for i, p in enumerate(prompts):
        alone = _greedy(model, p[None])
        assert torch.equal(batched[i, 9:], alone[0, len(p):]), (i, batched, alone)


def _cache_after(model, prompt: int, steps: int = 3):
    """The cache after a prompt of ``prompt`` tokens and ``steps`` single-token calls."""
    with torch.no_grad():
        cache = model(_ids(1, prompt), use_cache=True).past_key_values
        for step in range(steps):
            cache = model(_ids(1, 1, seed=step), past_key_values=cache, use_cache=True).past_key_values
    return cache


@pytest.mark.parametrize("target", TARGETS)
def test_decode_equals_the_full_forward_token_by_token(llama, target: str) -> None:
    _decode_matches_prefix_forwards(_converted(llama, target), _ids(2, 12))


@pytest.mark.parametrize("target", TARGETS)
def test_sliding_window_host(target: str) -> None:
    model = swapformer.rewrite(_host("mistral"), target, **TARGETS[target])
    _decode_matches_prefix_forwards(model, _ids(1, 14, seed=3))


@pytest.mark.parametrize("target", TARGETS)
def test_left_padded_batch_equals_each_prompt_alone(llama, target: str) -> None:
    _left_padded_batch_matches_each_prompt_alone(_converted(llama, target))


@pytest.mark.parametrize("target", TARGETS)
def test_static_cache_equals_dynamic_cache(llama, target: str) -> None:
    model = _converted(llama, target)
    ids = _ids(2, 7, seed=6)
    static = _greedy(model, ids, cache_implementation="static")
    assert torch.equal(static, _greedy(model, ids))


@pytest.mark.parametrize("target", TARGETS)
def test_beam_scores_equal_prefix_forward_log_probs(llama, target: str) -> None:
    model = _converted(llama, target)
    ids = _ids(1, 6, seed=7)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, num_beams=3, num_return_sequences=3, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)
        steps = model.compute_transition_scores(out.sequences, out.scores, out.beam_indices)
        for seq, score in zip(out.sequences, steps):
            # each step against the forward of its own prefix: a worker scores a token from the
            # transient last worker, which a longer input computes as a non-worker
            logp = torch.stack([model(seq[None, :t]).logits[0, -1] for t in range(6, len(seq))])
            expected = logp.log_softmax(-1).gather(-1, seq[6:, None])[:, 0]
            torch.testing.assert_close(score, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("target", TARGETS)
def test_prompt_lookup_decoding_equals_greedy(llama, target: str) -> None:
    model = _converted(llama, target)
    ids = torch.cat([_ids(1, 6, seed=8)] * 3, dim=1)  # repeats give the lookup candidates
    looked_up = _greedy(model, ids, prompt_lookup_num_tokens=3)
    assert torch.equal(looked_up, _greedy(model, ids))


@pytest.mark.parametrize("target", LEARNED)
def test_cache_holds_only_the_target_state(llama, target: str) -> None:
    model = _converted(llama, target)
    cores = [model.get_submodule(r.core_name) for r in model.swapformer_report.replaced]
    for prompt in (9, 17):
        cache = _cache_after(model, prompt)
        context = prompt + 3
        assert cache.get_seq_length() == context
        assert cache.nbytes() == sum(core.state_bytes(context) for core in cores), target


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)) or dataclasses.is_dataclass(value):
        items = vars(value).values() if dataclasses.is_dataclass(value) else value
        for v in items:
            yield from _tensors(v)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("target", ["window", "fastweight"])
def test_cache_keeps_no_view_of_a_long_prompt(llama, target: str, padded: bool) -> None:
    """What a cache keeps for crop (the last call's tail) owns its memory: a view of the prompt's
    q/k/v/hidden kept 1.5 GB alive after an 8k prefill of SmolLM2."""
    model = _converted(llama, target)
    ids = _ids(2, 150)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :7] = 0
    with torch.no_grad():
        cache = model(ids, attention_mask=mask, use_cache=True).past_key_values
    held = [t for layer in cache.core_layers() for part in (layer.state, layer.rows, layer.replay)
            for t in _tensors(part)]
    assert held
    for t in held:
        assert t.untyped_storage().nbytes() <= t.numel() * t.element_size(), (target, tuple(t.shape))


def test_a_host_cache_with_tokens_is_refused(llama) -> None:
    model = _converted(llama, "fastweight")
    cache = transformers.DynamicCache()
    with torch.no_grad():
        llama.model(_ids(1, 4), past_key_values=cache, use_cache=True)
        with pytest.raises(swapformer.InputError, match="already holds 4 tokens"):
            model(_ids(1, 1), past_key_values=cache, use_cache=True)


@pytest.mark.parametrize("target", TARGETS)
def test_bf16_host(target: str) -> None:
    model = swapformer.rewrite(_host(dtype=torch.bfloat16), target, **TARGETS[target])
    cores = [model.get_submodule(r.core_name) for r in model.swapformer_report.replaced]
    assert all(p.dtype == torch.bfloat16 for core in cores for p in core.parameters())
    with torch.no_grad():
        logits = model(_ids(2, 8)).logits
        assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
        assert _greedy(model, _ids(1, 5)).shape == (1, 10)


# the hybrids with a window short enough that decoding evicts tokens into the far memory
HYBRID_EVICTING = {"fastweight": {"local_window": 3, "sinks": 1, "mix_init": 0.5},
                   "elita": {"local_window": 3, "sinks": 1, "mix_init": 0.5},
                   "cat": {"local_window": 3, "sinks": 1, "chunk_size": 2, "mix_init": 0.5}}


@pytest.mark.parametrize("target", HYBRID_EVICTING)
def test_evicting_hybrids_decode_batch_and_count_their_state(llama, target: str) -> None:
    model = llama.rewrite(target, **HYBRID_EVICTING[target])
    _decode_matches_prefix_forwards(model, _ids(2, 12))
    _left_padded_batch_matches_each_prompt_alone(model)
    cores = [model.get_submodule(r.core_name) for r in model.swapformer_report.replaced]
    cache = _cache_after(model, 9)
    assert cache.nbytes() == sum(core.state_bytes(12) for core in cores)


@pytest.mark.parametrize(("target", "options"), [("window", {"window": 3}), ("elita", {"local_window": 3}),
                                                 ("fastweight", {"local_window": 3, "update": "sum"})])
def test_a_heavy_hitter_cache_decodes_batches_and_counts_its_state(llama, target, options) -> None:
    """``cache`` (heavy hitters kept past the window; in a hybrid, the far memory holds the rest):
    decoding, left-padded batches and the state counted, with a window short enough that decoding evicts
    into the cache."""
    model = llama.rewrite(target, sinks=1, cache=2, **options)
    _decode_matches_prefix_forwards(model, _ids(2, 12))
    _left_padded_batch_matches_each_prompt_alone(model)
    cores = [model.get_submodule(r.core_name) for r in model.swapformer_report.replaced]
    cache = _cache_after(model, 9)
    assert cache.nbytes() == sum(core.state_bytes(12) for core in cores)
    with torch.no_grad():
        cache = model(_ids(2, 40), use_cache=True).past_key_values
    for t in (t for layer in cache.core_layers() for part in (layer.state, layer.rows, layer.replay)
              for t in _tensors(part)):
        assert t.untyped_storage().nbytes() <= t.numel() * t.element_size(), tuple(t.shape)
