"""The far-memory capacity benchmark's pieces (``benchmarks/memory_capacity.py``) on a tiny core."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import swapformer
from swapformer.targets.fastweight import FastWeightConfig, HybridFastWeight

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "memory_capacity.py"


def _script():
    spec = importlib.util.spec_from_file_location("benchmark_memory_capacity", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _samples(core, batches: int, length: int, seed: int) -> list:
    """Copy-row-like inputs: keys of the second half equal to the first's, host attention as target."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        half = [torch.randn(2, h, length, 8, generator=g) for h in (3, 1, 1)]
        q, k, v = (torch.cat([x, x], dim=2) for x in half)
        target = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, scale=core.scale)
        out.append(((q, k, v, None), {}, target))
    return out


def test_parse_variant_and_copy_rows() -> None:
    bench = _script()
    assert bench.parse_variant("fastweight") == ("fastweight", {})
    assert bench.parse_variant("fastweight:hedgehog_dim=256;decay_half_life=0.5;feature_map=elu1") == (
        "fastweight", {"hedgehog_dim": 256, "decay_half_life": 0.5, "feature_map": "elu1"})
    # the same reading as ``-o`` and speed_smollm2.target_spec: JSON booleans, not the string "true"
    assert bench.parse_variant("fastweight:normalize=true") == ("fastweight", {"normalize": True})
    rows = bench.copy_rows(3, 5, 1000, seed=0)
    assert rows.shape == (3, 10) and torch.equal(rows[:, :5], rows[:, 5:]) and int(rows.min()) >= 100


def test_copy_error_scores_the_exact_window_zero_and_training_moves_the_hybrid() -> None:
    bench = _script()
    core = HybridFastWeight(3, 1, 8, 8, 8**-0.5, FastWeightConfig(local_window=4, sinks=1))
    train, held = _samples(core, 2, 12, seed=0), _samples(core, 1, 12, seed=1)
    # a window that covers the whole row is the host attention itself
    assert bench.copy_error(bench.window_core(core, 24), held, 12) < 1e-10
    before, held_before = bench.copy_error(core, train, 12), bench.copy_error(core, held, 12)
    seconds = bench.train_core(core, train, steps=30, lr=1e-2)
    assert seconds > 0 and bench.copy_error(core, train, 12) < before
    assert bench.copy_error(core, held, 12) != held_before


def test_a_capture_of_some_layers_sees_the_teachers_inputs_everywhere() -> None:
    """Every layer is teacher-forced whichever layers are kept: the last layer's inputs do not depend
    on the choice, and its target is the host attention of the teacher itself."""
    transformers = pytest.importorskip("transformers")
    bench = _script()
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=120,
                                      pad_token_id=0, eos_token_id=None)
    torch.manual_seed(0)
    teacher = transformers.LlamaForCausalLM(config).eval()
    student = swapformer.rewrite(teacher, "fastweight", local_window=2, sinks=1)
    ids = bench.copy_rows(2, 6, 120, seed=0)
    names = [r.site.name for r in bench.replacements(student)]
    every = bench.capture(student, ids, 2, None)
    last = bench.capture(student, ids, 2, {names[-1]})
    assert list(last) == [names[-1]]
    (args, _, target), = last[names[-1]]
    (args_all, _, target_all), = every[names[-1]]
    for got, want in zip(args[:3], args_all[:3]):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(target, target_all)
    untargeted = bench.capture(student, ids, 2, {names[-1]}, keep_target=False)
    assert untargeted[names[-1]][0][2] is None


def test_varied_copy_rows_end_in_a_repeat_at_one_of_the_lengths() -> None:
    bench = _script()
    rows = bench.varied_copy_rows(12, 40, [4, 7, 10], 1000, seed=0)
    seen = set()
    for row in rows:
        found = [n for n in (4, 7, 10) if torch.equal(row[-n:], row[-2 * n:-n])]
        assert found
        seen.add(found[0])
    assert seen == {4, 7, 10}
