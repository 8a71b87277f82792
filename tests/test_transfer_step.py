"""``benchmarks/transfer_step.py`` reads each step's throughput from calibrate's own log lines."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

import swapformer
from swapformer.calibrate import CalibrationConfig, Stage, calibrate
from swapformer.loading.data import TokenSplits

transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import transfer_step  # noqa: E402


def test_step_rates_collects_one_rate_per_logged_step():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    teacher = transformers.LlamaForCausalLM(config).eval()
    student = swapformer.rewrite(copy.deepcopy(teacher), "fastweight", local_window=8)
    rows = torch.randint(0, 128, (6, 32))
    stage = CalibrationConfig(stages=(Stage("transfer", steps=3),), batch_size=2, seq_len=32, eval_batches=0,
                              progress=False, log_every=1)
    with transfer_step.StepRates() as rates:
        calibrate(student, teacher, TokenSplits(rows, rows[:0]), stage)
    assert len(rates.rates) == 3 and all(r > 0 for r in rates.rates)
