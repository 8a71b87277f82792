"""Property tests over the attention and FFN grammars of :mod:`swapformer.testing`."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import swapformer
from swapformer.testing import (
    AttentionChoices,
    FFNChoices,
    Program,
    assert_rewrite_exact,
    assert_sites_match,
    attention_program,
    attention_programs,
    check_equivalence,
    ffn_program,
    ffn_programs,
    input_tensors,
)

_HARDEST = AttentionChoices(
    projection="fused-split",
    scale_at="split-sqrt",
    mask="window",
    heads="einsum",
    gqa="expand-reshape",
    softmax="fp32-cast",
    extras="both",
    num_kv_heads=2,
    scale=0.1,
    window=3,
    seq_len=9,
    batch=1,
)


def _relative_diff(ref: torch.Tensor, out: torch.Tensor) -> float:
    return (ref - out).abs().max().item() / ref.abs().max().item()


@given(attention_programs())
@example(attention_program(_HARDEST))
def test_attention_program_matches_its_expected_fields(program: Program) -> None:
    # Validates the grammar itself: the module equals one SDPA call built from `expected`.
    with torch.no_grad():
        out = program.module(*program.example_inputs)
        ref = program.module.reference(*program.example_inputs)
    assert _relative_diff(ref, out) <= 1e-5


@given(attention_programs())
@example(attention_program(_HARDEST))
def test_attention_program_is_detected_and_rewritten_exactly(program: Program) -> None:
    sites = swapformer.find_sites(program.module, program.example_inputs, kinds=("attention", "ffn"))
    assert_sites_match(sites, [program.expected], kind="attention")
    assert_sites_match(sites, [], kind="ffn")
    report = assert_rewrite_exact(program.module, program.example_inputs, "sdpa")
    assert len(report.replaced) == 1


@given(ffn_programs())
def test_ffn_program_matches_its_expected_fields(program: Program) -> None:
    with torch.no_grad():
        out = program.module(*program.example_inputs)
        ref = program.module.reference(*program.example_inputs)
    assert _relative_diff(ref, out) <= 1e-5


@given(ffn_programs())
@example(ffn_program(FFNChoices(activation="gelu_tanh", spelling="manual", gating="fused-chunk")))
def test_ffn_program_is_detected(program: Program) -> None:
    sites = swapformer.find_sites(program.module, program.example_inputs, kinds=("attention", "ffn"))
    assert_sites_match(sites, [program.expected], kind="ffn")
    assert_sites_match(sites, [], kind="attention")


def test_check_equivalence_passes_a_copy_and_catches_a_perturbation() -> None:
    program = attention_program(AttentionChoices(mask="tril-buffer", extras="rope"))
    twin = copy.deepcopy(program.module)
    shapes = st.tuples(st.integers(1, 3), st.integers(2, 12), st.just(program.module.d_q))
    check_equivalence(program.module, twin, input_tensors(shapes).map(lambda x: (x,)), max_examples=5)

    with torch.no_grad():
        twin.o_proj.bias.add_(1e-2)
    with pytest.raises(AssertionError, match="differs by"):
        check_equivalence(program.module, twin, st.just(program.example_inputs), max_examples=1)
