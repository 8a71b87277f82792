"""Detection and the exact ``"sdpa"`` rewrite on the zoo of hand-written forms, plus bad inputs."""

from __future__ import annotations

import pytest
import torch
from models_zoo import (
    CASES,
    D_MODEL,
    ZOO,
    AttnSpec,
    ScoresMulAttention,
    ZooCase,
    call,
    check_against_reference,
)
from torch import nn

import swapformer
from swapformer.errors import CaptureError, InputError, UnknownTargetError
from swapformer.testing import assert_rewrite_exact, assert_sites_match

ATTENTION = [case for case in ZOO if case.expected_attention]
NEGATIVE = [case for case in ZOO if case.negative]
_ids = lambda case: case.name


@pytest.mark.parametrize("case", ZOO, ids=_ids)
def test_zoo_module_matches_its_spec(case: ZooCase) -> None:
    # Validates the zoo itself: every expectation is re-derived through one SDPA / F.linear call.
    checked = check_against_reference(case)
    assert checked == len(case.expected_attention) + len(case.expected_ffn)


@pytest.mark.parametrize("case", ZOO, ids=_ids)
def test_find_sites_reports_the_expected_fields(case: ZooCase) -> None:
    sites = swapformer.find_sites(case.make_model(), case.make_inputs(), kinds=("attention", "ffn"))
    assert_sites_match(sites, case.expected_attention, kind="attention")
    assert_sites_match(sites, case.expected_ffn, kind="ffn")


@pytest.mark.parametrize("case", ATTENTION, ids=_ids)
def test_sdpa_rewrite_is_exact_and_leaves_the_input_model_alone(case: ZooCase) -> None:
    model, inputs = case.make_model(), case.make_inputs()
    state = {key: value.clone() for key, value in model.state_dict().items()}
    with torch.no_grad():
        before = call(model, inputs)

    report = assert_rewrite_exact(model, inputs, "sdpa")

    assert len(report.replaced) == len(case.expected_attention), str(report)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[key], value) for key, value in state.items())
    with torch.no_grad():
        assert torch.equal(call(model, inputs), before)
    assert not hasattr(model, "swapformer_report")


@pytest.mark.parametrize("case", NEGATIVE, ids=_ids)
def test_negative_case_rewrites_to_an_empty_report(case: ZooCase) -> None:
    report = assert_rewrite_exact(case.make_model(), case.make_inputs(), "sdpa", allow_empty=True)
    assert report.replaced == []
    assert not [site for site in report.sites if site.kind == "attention"]


def test_model_without_attention_gives_an_empty_report() -> None:
    case = CASES["neg_single_linear"]
    model, inputs = case.make_model(), case.make_inputs()
    assert swapformer.find_sites(model, inputs) == []
    report = swapformer.explain(model, "sdpa", inputs)
    assert report.replaced == [] and report.skipped == []
    rewritten = swapformer.rewrite(model, "sdpa", example_inputs=inputs)
    assert rewritten.swapformer_report.replaced == []
    with torch.no_grad():
        assert torch.equal(rewritten(inputs), model(inputs))


def test_unknown_target_lists_the_available_targets() -> None:
    case = CASES["matmul_op_scores_mul"]
    with pytest.raises(UnknownTargetError) as err:
        swapformer.rewrite(case.make_model(), "no-such-target", example_inputs=case.make_inputs())
    assert "no-such-target" in str(err.value)
    assert "sdpa" in str(err.value)


class _NamedInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = ScoresMulAttention(AttnSpec())

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.attn(hidden_states)


def test_wrong_input_shape_raises_input_error_naming_the_input() -> None:
    model = _NamedInput().eval()
    bad = {"hidden_states": torch.randn(2, 16, D_MODEL + 3)}
    with pytest.raises(InputError, match="hidden_states"):
        swapformer.find_sites(model, bad)
    with pytest.raises(InputError, match="hidden_states"):
        swapformer.rewrite(model, "sdpa", example_inputs=bad)


class _Uncapturable(nn.Module):
    """Python control flow on tensor values: a branch and a loop count read with ``.item()``."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = ScoresMulAttention(AttnSpec())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = -x
        for _ in range(int(x.abs().max().item()) % 3 + 1):
            x = self.attn(x)
        return x


def test_uncapturable_model_raises_capture_error_naming_each_strategy() -> None:
    model = _Uncapturable().eval()
    with pytest.raises(CaptureError) as err:
        swapformer.find_sites(model, torch.randn(2, 16, D_MODEL))
    message = str(err.value).lower()
    tried = [name for name in ("export", "dynamo", "fx") if name in message]
    assert len(tried) >= 2, f"the message should name every capture strategy tried:\n{err.value}"
