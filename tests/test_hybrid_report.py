"""The KL stage of the hybrid report (``benchmarks/hybrid_report.py``), on a tiny Llama instead of SmolLM2."""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import swapformer

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import hybrid_report  # noqa: E402


def _tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      max_position_embeddings=256)
    return transformers.LlamaForCausalLM(config).eval()


def test_the_kl_stage_trains_lora_on_value_and_output_projections_only():
    teacher = _tiny_llama()
    student = swapformer.rewrite(copy.deepcopy(teacher), "fastweight", local_window=8)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    lora = hybrid_report.lora_projections(student)
    assert sorted(lora) == [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("o_proj", "v_proj")]
    assert sorted(hybrid_report.lora_projections(student, "qkvo")) == [
        f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "koqv"]
    args = argparse.Namespace(distill_lr=1e-2, distill_train="lora", distill_schedule="constant", seed=0,
                              device="cpu", lora_rank=4,
                              train_batch_size=2, batch_size=2, seq_len=32, train_len=32, distill_len=32, mix_lr=None)
    train = torch.randint(0, 128, (8, 32))
    stage = hybrid_report._calibrate_rows(student, teacher, train, used=64, tokens=128,
                                          config=hybrid_report.distill_config(args, 128, lora))
    assert stage.tokens == 128 and torch.isfinite(torch.tensor(stage.last_loss))
    changed = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    # the adapters were merged into v/o; nothing else moved
    assert changed == {f"{m}.weight" for m in lora}


def test_recall_rows_replace_the_given_share_with_a_repeated_random_half():
    train = torch.arange(8 * 10).reshape(8, 10)
    mixed = hybrid_report.with_recall_rows(train, 0.5, vocab=1000, seed=0)
    assert torch.equal(mixed[1::2], train[1::2])  # every other row is text, untouched
    assert torch.equal(mixed[0::2, :5], mixed[0::2, 5:])  # the others: a random half twice
    assert bool((mixed[0::2] >= 100).all()) and not torch.equal(mixed[0], mixed[2])
    assert torch.equal(train, torch.arange(8 * 10).reshape(8, 10))  # the input is not modified
    with pytest.raises(SystemExit, match="recall-train-share"):
        hybrid_report.with_recall_rows(train, 1.5, vocab=1000, seed=0)


def test_mix_lr_opens_the_far_memory_that_the_stage_lr_leaves_shut():
    """With the distill lr the mixes stay at their start; with ``--mix-lr`` they move (the summary
    line the report logs after each segment says by how much)."""
    teacher = _tiny_llama()
    train = torch.randint(0, 128, (8, 32))
    spans = []  # the largest factor any head's mix moved by
    for mix_lr in (None, 0.5):
        student = swapformer.rewrite(copy.deepcopy(teacher), "fastweight", local_window=8)
        start = hybrid_report.mix_summary(student)
        args = argparse.Namespace(distill_lr=1e-3, distill_train="new", distill_schedule="constant", seed=0,
                                  device="cpu", lora_rank=0,
                                  train_batch_size=2, batch_size=2, seq_len=32, train_len=32, distill_len=32, mix_lr=mix_lr)
        hybrid_report._calibrate_rows(student, teacher, train, used=0, tokens=256,
                                      config=hybrid_report.distill_config(args, 256, ()))
        g = torch.cat([m.mix() for m in student.modules() if isinstance(m, hybrid_report.HybridAttention)])
        change = g.detach() / 1e-3  # every mix starts at mix_init = 1e-3
        spans.append(float(torch.maximum(change, 1 / change).max()))
        assert start.startswith("mix g over 8 heads: median 0.001")
    assert spans[0] < 1.1 and spans[1] > 2


def test_the_kl_stage_follows_distill_schedule():
    args = argparse.Namespace(distill_lr=1e-3, distill_train="new+lora", distill_schedule="cosine", seed=0,
                              device="cpu", lora_rank=4, train_batch_size=2, batch_size=2, seq_len=32,
                              train_len=32, distill_len=32, mix_lr=None)
    stage = hybrid_report.distill_config(args, 640, ()).stages[0]
    steps = stage.num_steps(2 * 32)
    factors = [stage.lr_factor(i, steps) for i in range(steps)]
    assert factors[0] == 1.0 and factors == sorted(factors, reverse=True) and 0.1 <= factors[-1] < 0.2
    assert hybrid_report.kl_schedule_label(args) == " cosine"
    args.distill_schedule = "constant"
    assert hybrid_report.kl_schedule_label(args) == ""


def test_kl_rows_of_another_length_start_after_every_transfer_token():
    """``--distill-len``: the KL stage takes rows of its own length, as many tokens per step, and
    starts past the whole rows (of each corpus) that the transfer used."""
    args = argparse.Namespace(train_len=512, distill_len=2048, batch_size=4, seq_len=512, train_batch_size=None)
    assert hybrid_report.distill_batch_size(args) == 1 and hybrid_report.train_batch_size(args) == 4
    assert hybrid_report.kl_start(307_200, args, corpora=2) == 307_200  # 75 rows of 2,048 per corpus
    # 3 transfer rows of 512: 2 from the first corpus, 1 from the second -> one 2,048 row each skipped
    assert hybrid_report.kl_start(3 * 512, args, corpora=2) == 2 * 2048
    assert hybrid_report.kl_start(0, args, corpora=2) == 0
    assert hybrid_report.kl_len_label(args) == ", 2048-token rows"
    args.distill_len = 512
    assert hybrid_report.kl_start(1536, args, corpora=2) == 1536 and hybrid_report.kl_len_label(args) == ""
    assert hybrid_report.distill_batch_size(args) == 4
    # tokens of each corpus in the report's two layouts: the KL rows never hold a token the transfer used
    corpora = {name: SimpleNamespace(train=torch.arange(c * 10_000, c * 10_000 + 8192))
               for c, name in enumerate(("shakespeare", "wiki"))}
    layout = {n: hybrid_report.mixed_train(corpora, n) for n in (512, 2048)}
    args.distill_len = 2048
    for used in (512, 1536, 4096, 5120):
        seen = set(layout[512].flatten()[:used].tolist())
        start = hybrid_report.kl_start(used, args, corpora=2)
        assert not seen & set(layout[2048].flatten()[start:].tolist())


def test_a_curve_point_past_the_training_rows_is_marked_in_its_row():
    teacher = _tiny_llama()
    student = swapformer.rewrite(copy.deepcopy(teacher), "fastweight", local_window=8)
    args = argparse.Namespace(distill_lr=1e-3, distill_train="new", distill_schedule="constant", seed=0,
                              device="cpu", lora_rank=0, train_batch_size=2, batch_size=2, seq_len=32,
                              train_len=32, distill_len=32, mix_lr=None)
    train = torch.randint(0, 128, (8, 32))
    config = hybrid_report.distill_config(args, 128, ())
    inside = hybrid_report._calibrate_rows(student, teacher, train, used=64, tokens=128, config=config)
    assert inside.passes == 1.0 and hybrid_report.repeat_note(inside) == ""  # rows 2-5, each once
    past = hybrid_report._calibrate_rows(student, teacher, train, used=192, tokens=128, config=config)
    assert hybrid_report.repeat_note(past) == " [rows repeat: 2.00 passes]"  # rows 6-7 read twice


def test_quality_options_read_the_benchmarks_one_target_spec():
    import quality_smollm2

    args = quality_smollm2.parse_args(["-o", "fastweight:update=sum;decay_half_life=0", "-o", "cat:chunk_size=32",
                                       "-o", "fastweight:local_window=128"])
    assert quality_smollm2.target_options(args) == {
        "fastweight": {"update": "sum", "decay_half_life": 0, "local_window": 128}, "cat": {"chunk_size": 32}}
    for bad in ("fastweight", "fastweight:update"):
        with pytest.raises(SystemExit, match="TARGET:KEY=VALUE|KEY=VALUE"):
            quality_smollm2.target_options(quality_smollm2.parse_args(["-o", bad]))
