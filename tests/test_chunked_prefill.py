"""Chunked prefill of a converted Hugging Face decoder: the prompt fed in chunks of ``C`` tokens with the
cache carried between calls (what ``generate(..., prefill_chunk_size=C)`` does) equals one prefill call.

Chunking is how a long prompt's peak memory stays at one chunk's activations: a converted model's state
is fixed-size, so after a chunked prefill only that state is left. Every state update must therefore
accept a multi-token call on top of existing state, across window, chunk and interval boundaries."""

from __future__ import annotations

import pytest
import torch

import swapformer
from tests.test_hf_generate import HYBRID_EVICTING, _host, _ids

transformers = pytest.importorskip("transformers")

# small windows so that the chunks cross them: the window evicts, the hybrids' far memory fills
CASES = {
    "original": None,
    "window": {"window": 4, "sinks": 1},
    **HYBRID_EVICTING,
    "worker": {"interval": 2},
}
PROMPT = 19  # no chunk size below divides it: the last chunk is a short one
CHUNKS = (3, 5, 8)


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    """Every case's model, once: the float64 tiny Llama (the original) and its conversions."""
    host = _host(dtype=torch.float64)
    analysis = swapformer.prepare(host, kinds=("attention",))
    out = {"original": host}
    for case, options in CASES.items():
        if options is not None:
            out[case] = analysis.rewrite(case, **options)
            assert len(out[case].swapformer_report.replaced) == 2, out[case].swapformer_report
    return out


def _cache_keyword(model) -> str:
    """transformers renamed ``past_key_values`` to ``cache``; pass it by the model's own name."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(out):
    return getattr(out, "cache", None) or out.past_key_values


def _chunked_logits(model, ids: torch.Tensor, chunk: int, mask: torch.Tensor | None = None):
    """The logits of every prompt position, the prompt fed ``chunk`` tokens per call; and the cache."""
    keyword, cache, logits = _cache_keyword(model), None, []
    with torch.no_grad():
        for start in range(0, ids.shape[1], chunk):
            end = min(start + chunk, ids.shape[1])
            kwargs = {} if mask is None else {"attention_mask": mask[:, :end]}
            out = model(ids[:, start:end], use_cache=True, **{keyword: cache}, **kwargs)
            cache = _cache_of(out)
            logits.append(out.logits)
    return torch.cat(logits, dim=1), cache


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("case", CASES)
def test_chunked_prefill_logits_equal_one_call(models, case: str, chunk: int) -> None:
    model = models[case]
    ids = _ids(2, PROMPT)
    with torch.no_grad():
        whole = model(ids, use_cache=True)
    chunked, cache = _chunked_logits(model, ids, chunk)
    torch.testing.assert_close(chunked, whole.logits, atol=1e-10, rtol=1e-10)
    assert cache.get_seq_length() == PROMPT == _cache_of(whole).get_seq_length()
    # the decode step after either prefill sees the same context
    keyword, step = _cache_keyword(model), _ids(2, 1, seed=9)
    with torch.no_grad():
        after_chunks = model(step, use_cache=True, **{keyword: cache}).logits
        after_whole = model(step, use_cache=True, **{keyword: _cache_of(whole)}).logits
    torch.testing.assert_close(after_chunks, after_whole, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("case", CASES)
def test_chunked_prefill_of_a_left_padded_batch(models, case: str) -> None:
    """The attention mask grows with the chunks; the padding sits in the first chunk only."""
    model = models[case]
    ids = _ids(2, PROMPT, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    with torch.no_grad():
        whole = model(ids, attention_mask=mask, use_cache=True).logits
    chunked, _ = _chunked_logits(model, ids, 5, mask)
    real = mask.bool()  # a padded position's logits are whatever the model makes of padding
    torch.testing.assert_close(chunked[real], whole[real], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("case", CASES)
def test_generate_with_prefill_chunks_equals_without(models, case: str, chunk: int) -> None:
    model = models[case]
    ids = _ids(2, PROMPT, seed=5)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    with torch.no_grad():
        plain = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        chunked = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                 prefill_chunk_size=chunk)
    assert plain.shape == (2, PROMPT + 6)
    assert torch.equal(chunked, plain), (case, chunk)
