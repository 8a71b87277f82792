"""``Stage.rope_shift``: transfer steps that see their rows at later RoPE positions (RESULTS.md, session 13)."""

import pytest
import torch
import torch.nn.functional as F
from _tiny import VOCAB, token_data

import swapformer
from swapformer.calibrate import CalibrationConfig, Stage, calibrate
from swapformer.calibrate.transfer import TransferHooks, rope_frequencies, rope_shift
from swapformer.errors import ConfigError

transformers = pytest.importorskip("transformers")


def _llama():
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                      max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def test_rope_shift_is_the_hf_rotation_at_a_later_position_and_leaves_attention_unchanged() -> None:
    """``rope_shift(RoPE_p(x), δ) = RoPE_{p+δ}(x)`` against transformers' own ``apply_rotary_pos_emb``
    (rotate-half layout), and attention over shifted ``q``, ``k`` is the unshifted one."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    g = torch.Generator().manual_seed(0)
    d, t, delta = 8, 6, 1000
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    q, k, v = (torch.randn(1, 2, t, d, generator=g, dtype=torch.float64) for _ in range(3))

    def hf_rope(x, start):
        angle = torch.arange(start, start + t, dtype=torch.float64)[:, None] * inv_freq
        emb = torch.cat([angle, angle], dim=-1)[None]
        return apply_rotary_pos_emb(x, x, emb.cos(), emb.sin())[0]

    shifted = rope_shift(hf_rope(q, 0), delta, inv_freq)
    torch.testing.assert_close(shifted, hf_rope(q, delta))
    assert not torch.allclose(shifted, hf_rope(q, 0))
    want = F.scaled_dot_product_attention(hf_rope(q, 0), hf_rope(k, 0), v, is_causal=True)
    got = F.scaled_dot_product_attention(shifted, rope_shift(hf_rope(k, 0), delta, inv_freq), v, is_causal=True)
    torch.testing.assert_close(got, want)


def test_a_shifted_transfer_pass_feeds_the_core_rotated_inputs_and_keeps_the_targets() -> None:
    """With ``hooks.shift`` the cores receive rotated ``q, k`` and so compute another output; what they
    pass on (the reference: the teacher-forced activations) is the unshifted pass's."""
    teacher = _llama()
    student = swapformer.rewrite(teacher, "fastweight", local_window=8, sinks=2, block_size=8)
    core = student.get_submodule(student.swapformer_report.replaced[0].core_name)
    torch.manual_seed(1)
    core.set_mix(1.0)  # open the far memory and sharpen its maps, which (unlike q·k) see the rotation
    with torch.no_grad():
        for fmap in (core.q_map, core.k_map):
            fmap.weight.normal_(std=300.0)
    ids = torch.stack([doc[:32] for doc in token_data()[:2]])
    seen: dict[str, list] = {"q": [], "raw": [], "passed_on": []}
    # hooks run in the order registered: the core's own output before TransferHooks replaces it
    handles = [core.register_forward_hook(lambda m, a, kw, out: seen["raw"].append(out), with_kwargs=True)]
    try:
        with TransferHooks(student, student.swapformer_report.replaced, teacher, early_exit=False) as hooks:
            handles += [core.register_forward_pre_hook(lambda m, a, kw: seen["q"].append(a[0]), with_kwargs=True),
                        core.register_forward_hook(lambda m, a, kw, out: seen["passed_on"].append(out),
                                                   with_kwargs=True)]
            plain = hooks.run(lambda: student(ids))
            hooks.shift = (700, rope_frequencies(student))
            shifted = hooks.run(lambda: student(ids))
    finally:
        for h in handles:
            h.remove()
    q0, q1 = seen["q"]
    assert not torch.allclose(q0, q1)
    torch.testing.assert_close(q1.norm(dim=-1), q0.norm(dim=-1))  # a rotation
    assert (seen["raw"][1] - seen["raw"][0]).abs().max() > 1e-2  # the core saw it
    torch.testing.assert_close(seen["passed_on"][1], seen["passed_on"][0], rtol=1e-4, atol=1e-5)
    assert set(plain) == set(shifted)


def _transfer(rope_shift: int):
    teacher = _llama()
    # the sum rule without decay: its far part moves most with the shift at this size (12 steps of
    # 32 tokens); with delta writes and decay the losses differ by ~1e-5, too little to test
    student = swapformer.rewrite(teacher, "fastweight", local_window=8, sinks=2, block_size=8, update="sum",
                                 decay_half_life=0.0)
    result = calibrate(student, teacher, token_data(), CalibrationConfig(
        stages=(Stage("transfer", steps=12, lr=1e-2, rope_shift=rope_shift),), batch_size=4, seq_len=32,
        progress=False, eval_batches=1, log_every=1))
    (transfer,) = result.stages
    return transfer


def test_transfer_with_rope_shift_trains_and_validates_its_input() -> None:
    transfer = _transfer(4096)
    assert transfer.steps == 12 and all(torch.isfinite(torch.tensor(transfer.losses)))
    # the stage reaches the hooks: the first step (the mix init) is unshifted, later ones are not
    plain = _transfer(0)
    assert transfer.losses[0] == pytest.approx(plain.losses[0], rel=1e-5)
    assert transfer.losses[1:] != pytest.approx(plain.losses[1:], rel=1e-3)
    with pytest.raises(ConfigError, match="rope_shift must be >= 0"):
        Stage("transfer", rope_shift=-1)
    with pytest.raises(ConfigError, match="no 'inv_freq' buffer"):
        rope_frequencies(torch.nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="partial rotary"):
        rope_shift(torch.randn(1, 1, 3, 8), 5, torch.ones(2))
