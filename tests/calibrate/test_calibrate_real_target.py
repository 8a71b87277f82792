"""calibrate() on cores built by swapformer.rewrite itself (not the hand-made tiny core)."""

import pytest
import torch
from _tiny import VOCAB, token_data

import swapformer
from swapformer.calibrate import CalibrationConfig, Stage, calibrate


def _tiny_llama():
    """A 2-layer random Llama (GQA 4:2) small enough for a few calibration steps; seeded."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                      max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def test_transfer_loss_decreases_on_a_rewritten_hf_llama() -> None:
    # fastweight: among the learned targets the one whose transfer loss moves within a few dozen
    # steps at this size (elita and cat need far more tokens, as benchmarks/RESULTS.md shows)
    teacher = _tiny_llama()
    # the seed form: the hybrid's exact window would cover these 32-token sequences
    student = swapformer.rewrite(teacher, "fastweight", local_window=0)
    replaced = {r.site.name for r in student.swapformer_report.replaced}
    assert len(replaced) == 2
    result = calibrate(student, teacher, token_data(), CalibrationConfig(
        stages=(Stage("transfer", steps=30, lr=1e-2),), batch_size=4, seq_len=32, progress=False,
        eval_batches=1, log_every=10))
    (transfer,) = result.stages
    assert transfer.steps == 30 and set(transfer.site_losses) == replaced
    first, last = sum(transfer.losses[:5]) / 5, sum(transfer.losses[-5:]) / 5
    assert last < 0.75 * first, transfer.losses


@pytest.mark.parametrize("target", ["fastweight", "elita", "cat"])
def test_hybrid_transfer_with_short_windows_fits_the_far_memory(target) -> None:
    """All layers in one forward: the closed-form mix init, then SWAX steps; the loss falls."""
    teacher = _tiny_llama()
    extra = {"chunk_size": 2} if target == "cat" else {}
    student = swapformer.rewrite(teacher, target, local_window=8, sinks=2, block_size=8, **extra)
    cores = [student.get_submodule(r.core_name) for r in student.swapformer_report.replaced]
    mix0 = [c.mix().clone() for c in cores]
    stage = Stage("transfer", steps=20, lr=1e-2, short_windows=(4,), short_window_share=0.5)
    result = calibrate(student, teacher, token_data(), CalibrationConfig(
        stages=(stage,), batch_size=4, seq_len=32, progress=False, eval_batches=1, log_every=10))
    (transfer,) = result.stages
    assert all(not torch.equal(m, c.mix()) for m, c in zip(mix0, cores))  # init + training moved g
    assert all(c.window == 8 for c in cores)  # the short windows were undone
    first, last = sum(transfer.losses[:3]) / 3, sum(transfer.losses[-3:]) / 3
    assert last < first, transfer.losses


@pytest.mark.parametrize("target", ["fastweight", "elita", "cat"])
def test_new_plus_lora_distill_trains_every_new_parameter_of_a_hybrid(target) -> None:
    """The KL stage's default ``new+lora``: the adapters and every core's new parameters move."""
    pytest.importorskip("peft")
    teacher = _tiny_llama()
    extra = {"chunk_size": 2} if target == "cat" else {}
    student = swapformer.rewrite(teacher, target, local_window=8, sinks=2, block_size=8, **extra)
    cores = [student.get_submodule(r.core_name) for r in student.swapformer_report.replaced]
    new = [(p, p.detach().clone()) for c in cores for p in c.new_parameters()]
    result = calibrate(student, teacher, token_data(), CalibrationConfig(
        stages=(Stage("distill", steps=3, lr=1e-2),), batch_size=4, seq_len=32, progress=False,
        eval_batches=0, lora_rank=4))
    (distill,) = result.stages
    assert distill.train == "new+lora"
    assert distill.trainable_parameters > sum(p.numel() for p, _ in new)  # the adapters as well
    unmoved = [tuple(p.shape) for p, p0 in new if torch.equal(p, p0)]
    assert not unmoved, f"{target}: new parameters the KL stage left untouched: {unmoved}"


def test_a_new_plus_lora_stage_with_no_new_parameters_says_only_the_lora_trains(caplog) -> None:
    pytest.importorskip("peft")
    teacher = _tiny_llama()
    student = swapformer.rewrite(teacher, "window", window=8, sinks=2)  # a window has no new parameters
    calibrate(student, teacher, token_data(), CalibrationConfig(
        stages=(Stage("distill", steps=1),), batch_size=4, seq_len=32, progress=False, eval_batches=0,
        lora_rank=4))
    assert "no new parameters: only the LoRA adapters train" in caplog.text
