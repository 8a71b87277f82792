"""Packing, held-out split, batch order, and the data forms calibrate accepts."""

import pytest
import torch

from swapformer.errors import InputError
from swapformer.loading.data import (
    BatchStream,
    TokenSplits,
    as_documents,
    heldout_split,
    pack,
    prepare,
)


class CharTokenizer:
    """A stand-in for a Hugging Face tokenizer: one token per character."""

    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[ord(c) % 250 + 1 for c in t] for t in texts]}


def test_pack_concatenates_with_separator_and_drops_tail():
    docs = [torch.arange(1, 6), torch.arange(10, 13)]
    seqs = pack(docs, 4, sep_token=0)
    assert seqs.tolist() == [[1, 2, 3, 4], [5, 0, 10, 11]]  # tail [12, 0] dropped


def test_pack_rejects_too_little_data():
    with pytest.raises(InputError, match="cannot fill"):
        pack([torch.arange(3)], 8)


def test_heldout_split_is_every_kth_sequence():
    seqs = torch.arange(40).reshape(20, 2)
    train, held = heldout_split(seqs, 0.25)
    assert held[:, 0].tolist() == [6, 14, 22, 30, 38]  # sequences 3, 7, 11, 15, 19
    assert train.shape[0] == 15
    assert set(train[:, 0].tolist()).isdisjoint(held[:, 0].tolist())
    assert heldout_split(seqs, 0.25)[1].equal(held)  # deterministic


def test_heldout_split_zero_fraction_keeps_everything():
    seqs = torch.arange(10).reshape(5, 2)
    train, held = heldout_split(seqs, 0.0)
    assert train.equal(seqs) and held.shape == (0, 2)


def test_batch_stream_is_a_function_of_seed_and_index():
    seqs = torch.arange(10).reshape(10, 1)
    a, b = BatchStream(seqs, 3, seed=1), BatchStream(seqs, 3, seed=1)
    assert [a.batch(i).tolist() for i in range(7)] == [b.batch(i).tolist() for i in reversed(range(7))][::-1]
    first_epoch = torch.cat([a.batch(i) for i in range(3)]).flatten().tolist() + a.batch(3)[:1].flatten().tolist()
    assert sorted(first_epoch) == list(range(10))  # one epoch visits every sequence once


def test_batch_stream_counts_passes_over_the_data():
    seqs = torch.arange(10).reshape(10, 1)
    assert BatchStream(seqs, 2).passes(5) == 1.0  # the first epoch exactly
    assert BatchStream(seqs, 2).passes(6) == pytest.approx(1.2)  # batch 5 starts the second epoch
    assert BatchStream(seqs, 2, rank=1, world_size=2).passes(3) == pytest.approx(1.2)  # global batches


def test_batch_stream_ranks_split_the_global_batch():
    seqs = torch.arange(16).reshape(16, 1)
    single = BatchStream(seqs, 4, seed=0)
    ranks = [BatchStream(seqs, 2, seed=0, rank=r, world_size=2) for r in range(2)]
    for i in range(3):
        assert torch.cat([r.batch(i) for r in ranks]).equal(single.batch(i))
    assert ranks[0].tokens_per_step == 4


def test_as_documents_reads_a_text_folder(tmp_path):
    (tmp_path / "a.txt").write_text("abc")
    (tmp_path / "b.md").write_text("de")
    (tmp_path / "skip.bin").write_bytes(b"zz")
    docs = as_documents(tmp_path, CharTokenizer())
    assert [d.tolist() for d in docs] == [[98, 99, 100], [101, 102]]


def test_as_documents_errors_are_clear(tmp_path):
    with pytest.raises(InputError, match="tokenizer"):
        as_documents(tmp_path, None)
    with pytest.raises(InputError, match="no such file"):
        as_documents(tmp_path / "missing.txt", CharTokenizer())
    with pytest.raises(InputError, match="integers"):
        as_documents(torch.rand(3, 4))


def test_prepare_accepts_packed_tensors_iterables_and_splits():
    packed = torch.arange(64).reshape(8, 8)
    assert prepare(packed, seq_len=8).train.equal(packed)
    from_docs = prepare([list(range(30)), list(range(30))], seq_len=8, eval_fraction=0.5)
    assert from_docs.train.shape == (4, 8) and from_docs.heldout.shape == (3, 8)
    splits = TokenSplits(packed[:6], packed[6:])
    assert prepare(splits, seq_len=8) is splits
    with pytest.raises(InputError, match="packed to 8"):
        prepare(splits, seq_len=4)


def test_prepare_uses_tokenizer_eos_as_separator(tmp_path):
    (tmp_path / "a.txt").write_text("ab")
    (tmp_path / "b.txt").write_text("cd")
    seqs = prepare(tmp_path, seq_len=3, tokenizer=CharTokenizer()).train
    assert seqs.tolist() == [[98, 99, 0], [100, 101, 0]]


class FakeDataset:
    """Duck-types a Hugging Face ``datasets.Dataset`` (column_names + column access)."""

    def __init__(self, columns: dict) -> None:
        self.columns = columns
        self.column_names = list(columns)

    def __getitem__(self, key):
        return self.columns[key]


def test_datasets_objects_by_column():
    ids = FakeDataset({"input_ids": [[1, 2, 3], [4, 5]]})
    assert [d.tolist() for d in as_documents(ids)] == [[1, 2, 3], [4, 5]]
    text = FakeDataset({"text": ["ab"]})
    assert as_documents(text, CharTokenizer())[0].tolist() == [98, 99]
    with pytest.raises(InputError, match="'input_ids' or 'text'"):
        as_documents(FakeDataset({"label": [0]}))
