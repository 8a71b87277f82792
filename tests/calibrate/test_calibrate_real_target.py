"""calibrate() on cores built by swapformer.rewrite itself (not the hand-made tiny core)."""

import pytest
import torch
from _tiny import VOCAB, token_data

import swapformer
from swapformer.calibrate import CalibrationConfig, Stage, calibrate


def test_transfer_loss_decreases_on_a_rewritten_hf_llama() -> None:
    # fastweight: among the learned targets the one whose transfer loss moves within a few dozen
    # steps at this size (elita and cat need far more tokens, as benchmarks/RESULTS.md shows)
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                      max_position_embeddings=64)
    torch.manual_seed(0)
    teacher = transformers.LlamaForCausalLM(config).eval()
    student = swapformer.rewrite(teacher, "fastweight")
    replaced = {r.site.name for r in student.swapformer_report.replaced}
    assert len(replaced) == 2
    result = calibrate(student, teacher, token_data(), CalibrationConfig(
        stages=(Stage("transfer", steps=30, lr=1e-2),), batch_size=4, seq_len=32, progress=False,
        eval_batches=1, log_every=10))
    (transfer,) = result.stages
    assert transfer.steps == 30 and set(transfer.site_losses) == replaced
    first, last = sum(transfer.losses[:5]) / 5, sum(transfer.losses[-5:]) / 5
    assert last < 0.75 * first, transfer.losses
