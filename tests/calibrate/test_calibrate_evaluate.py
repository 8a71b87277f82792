"""Perplexity and the quality report."""

import math

import pytest
import torch
from torch import nn

from swapformer.errors import InputError
from swapformer.loading.data import TokenSplits
from swapformer.measure import perplexity, quality_report


class Uniform(nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids):
        return torch.zeros(*input_ids.shape, self.vocab) + self.dummy


class Bigram(nn.Module):
    """logits[t] = table[token t]; returns an object with .logits like HF models."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab, vocab))

    def forward(self, input_ids, use_cache=True):
        assert use_cache is False  # HF-style models are called without a KV cache
        return type("Out", (), {"logits": self.table[input_ids]})()


def test_uniform_logits_give_vocab_size():
    seqs = torch.randint(0, 50, (7, 16))
    assert perplexity(Uniform(50), seqs, seq_len=16, batch_size=3) == pytest.approx(50.0, rel=1e-6)


def test_perplexity_is_token_weighted_and_respects_max_batches():
    torch.manual_seed(0)
    model = Bigram(20)
    seqs = torch.randint(0, 20, (6, 9))
    logp = torch.log_softmax(model.table.detach()[seqs[:, :-1]], -1)
    nll = -logp.gather(-1, seqs[:, 1:, None]).squeeze(-1)
    assert perplexity(model, seqs, seq_len=9, batch_size=4) == pytest.approx(math.exp(nll.mean()), rel=1e-5)
    first = math.exp(nll[:2].mean())
    assert perplexity(model, seqs, seq_len=9, batch_size=2, max_batches=1) == pytest.approx(first, rel=1e-5)
    assert model.training  # mode restored


def test_perplexity_uses_the_heldout_part_of_splits():
    splits = TokenSplits(torch.zeros(0, 4, dtype=torch.long), torch.randint(0, 8, (2, 4)))
    assert perplexity(Uniform(8), splits, seq_len=4, batch_size=2) == pytest.approx(8.0)
    with pytest.raises(InputError, match="no sequences"):
        perplexity(Uniform(8), TokenSplits(splits.heldout, splits.train), seq_len=4, batch_size=2)


def test_quality_report_ratios():
    seqs = torch.randint(0, 10, (4, 8))
    report = quality_report({"ref": Uniform(10), "worse": Uniform(20)}, seqs, seq_len=8, batch_size=2)
    assert [r.name for r in report.rows] == ["ref", "worse"]
    assert report.rows[1].ratio == pytest.approx(2.0)
    assert "| worse | 20.00 | 2.000 |" in report.to_markdown()


class CopyFrom(nn.Module):
    """Predicts the token ``lag − 1`` positions back with certainty (the copy a recalling model makes)."""

    def __init__(self, vocab: int, lag: int) -> None:
        super().__init__()
        self.vocab, self.lag = vocab, lag
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids):
        logits = torch.full((*input_ids.shape, self.vocab), -30.0) + self.dummy
        # logits at t name the token at t − lag + 1: in the second copy, the next token
        source = torch.cat([input_ids[:, :1].expand(-1, self.lag - 1), input_ids], 1)[:, : input_ids.shape[1]]
        return logits.scatter(-1, source[..., None], 30.0)


def test_recall_probe_separates_a_copying_model_from_a_uniform_one():
    from swapformer.measure import recall_nll

    vocab, length = 300, 24
    assert recall_nll(Uniform(vocab), length, samples=2, vocab=vocab) == pytest.approx(math.log(vocab), rel=1e-5)
    # the token after position t in the second copy is the one length − 1 positions before t
    assert recall_nll(CopyFrom(vocab, length), length, samples=2, vocab=vocab) < 1e-6
    with pytest.raises(InputError, match="recall"):
        recall_nll(Uniform(vocab), 0, samples=2, vocab=vocab)
