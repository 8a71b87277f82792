"""Issue 13, "nothing silent": every rewrite is exact at every length, or refused with a reason.

Models are 2-layer stacks from :mod:`silent_zoo` (d_model 64, 4 heads); each test is the shape of the
case it guards and fails on the code before its fix.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from models_zoo import ZOO, ZooCase, call
from silent_zoo import (
    HEAD_DIM,
    MAX_LEN,
    N_HEADS,
    CosineAttention,
    CrossCovarianceAttention,
    DropoutAttention,
    FixedMaskAttention,
    FoldedMQAAttention,
    FullScaleAttention,
    InPlaceAttention,
    MaskArgsStack,
    MemoryCausalAttention,
    RelativeBiasAttention,
    SdpaAttention,
    SinkAttention,
    SlicedProbsAttention,
    TemperatureAttention,
    TupeAttention,
    _Heads,
    hidden,
    stack,
)
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import swapformer
from swapformer.patterns.ops import canonical
from swapformer.testing import AttentionChoices, assert_sites_match, attention_program

warnings.filterwarnings("ignore", category=FutureWarning)

ATTENTION = [case for case in ZOO if case.expected_attention]
_ATTENTION_OPS = frozenset({"softmax", "sdpa", "matmul", "baddbmm", "einsum"})


def _attention_ops_left(gm: torch.fx.GraphModule) -> list[str]:
    """Attention ops still in the rewritten graph outside the spliced cores."""
    return [n.name for n in gm.graph.nodes if n.op != "call_module" and canonical(n, gm) in _ATTENTION_OPS]


class _CountKernels(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        name = func.__name__
        if "scaled_dot_product" in name or "softmax" in name:
            self.names.append(name)
        return func(*args, **(kwargs or {}))


# 4. the old attention is gone from the rewritten graph


@pytest.mark.parametrize("case", ATTENTION, ids=lambda case: case.name)
def test_rewritten_graph_no_longer_computes_the_original_attention(case: ZooCase) -> None:
    model, inputs = case.make_model(), case.make_inputs()
    out = swapformer.rewrite(model, "sdpa", example_inputs=inputs)
    assert len(out.swapformer_report.replaced) == len(case.expected_attention)
    assert _attention_ops_left(out) == []
    with torch.no_grad():
        torch.testing.assert_close(call(out, inputs), call(model, inputs), rtol=1e-5, atol=1e-5)


def test_nanogpt_sdpa_form_runs_one_attention_kernel_per_layer() -> None:
    model = stack(lambda: SdpaAttention(p=0.1))
    out = swapformer.rewrite(model, "sdpa", example_inputs=hidden())
    with torch.no_grad(), _CountKernels() as kernels:
        out(hidden())
    assert len(kernels.names) == 2, kernels.names


# 3. dropout follows .train() / .eval() in the rewritten graph


def _random(model: torch.nn.Module, x: torch.Tensor) -> bool:
    with torch.no_grad():
        return not torch.equal(model(x), model(x))


@pytest.mark.parametrize("p_attn, p_resid", [(0.0, 0.3), (0.3, 0.0)], ids=["residual", "attention"])
def test_model_rewritten_in_eval_mode_drops_out_in_train_mode(p_attn: float, p_resid: float) -> None:
    model = stack(lambda: DropoutAttention(p_attn, p_resid))
    out = swapformer.rewrite(model, "sdpa", example_inputs=hidden())
    assert not _random(out, hidden())
    assert _random(out.train(), hidden())
    torch.testing.assert_close(out.eval()(hidden()), model(hidden()), rtol=1e-5, atol=1e-5)


def test_model_rewritten_in_train_mode_is_deterministic_after_eval() -> None:
    model = stack(lambda: DropoutAttention(0.3, 0.3), p=0.3).train()
    out = swapformer.rewrite(model, "sdpa", example_inputs=hidden(), verify=False)
    assert out.training and _random(out, hidden())
    model.eval(), out.eval()
    assert not _random(out, hidden())
    with torch.no_grad():
        torch.testing.assert_close(out(hidden()), model(hidden()), rtol=1e-5, atol=1e-5)


# 1. fixed masks are described for every length, never from the example alone


@pytest.mark.parametrize("mask, kind, window", [
    ("sliding_window_24", "causal", 24),  # equals causal at the 16-token example
    ("chunked_local_16", "bias", None),  # equals causal at 16 tokens
    ("band_24", "bias", None),  # equals "no mask" at 16 tokens
    ("local_strided", "bias", None),  # causal above the diagonal, holes below it
])
def test_fixed_mask_is_exact_at_another_length(mask: str, kind: str, window: int | None) -> None:
    model = stack(lambda: FixedMaskAttention(mask))
    out = swapformer.rewrite(model, "sdpa", example_inputs=hidden(16))
    sites = out.swapformer_report.sites
    assert [(s.mask, s.window) for s in sites] == [(kind, window)] * 2
    for t in (16, 32, 48):
        with torch.no_grad():
            torch.testing.assert_close(out(hidden(t, seed=t)), model(hidden(t, seed=t)), rtol=1e-5, atol=1e-5)


# 2. a parameter is never a constant


def test_zero_initialised_relative_bias_table_is_kept_after_training() -> None:
    model = stack(RelativeBiasAttention)
    out = swapformer.rewrite(model, "sdpa", example_inputs=hidden())
    assert [s.mask for s in out.swapformer_report.sites] == ["bias", "bias"]
    with torch.no_grad():  # "train" the tables of both models the same way
        for net in (model, out):
            for name, p in net.named_parameters():
                if name.endswith("table"):
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        assert not torch.allclose(model(hidden(24)), stack(RelativeBiasAttention)(hidden(24)))
        torch.testing.assert_close(out(hidden(24)), model(hidden(24)), rtol=1e-5, atol=1e-5)


# 5. is_causal with more keys than queries is aligned top-left, as PyTorch does


def test_sdpa_is_causal_with_prepended_memory_keys_is_top_left() -> None:
    model = stack(MemoryCausalAttention)
    out = swapformer.rewrite(model, "sdpa", example_inputs=hidden())
    assert all(s.causal for s in out.swapformer_report.sites)
    for t in (16, 20):
        with torch.no_grad():
            torch.testing.assert_close(out(hidden(t)), model(hidden(t)), rtol=1e-5, atol=1e-5)


def test_self_attention_sdpa_is_causal_keeps_the_fast_causal_path() -> None:
    out = swapformer.rewrite(stack(SdpaAttention), "sdpa", example_inputs=hidden())
    assert [s.mask for s in out.swapformer_report.sites] == ["causal", "causal"]
    assert not any(s.notes for s in out.swapformer_report.sites)


# 6. the right q·kᵀ product, or a refusal with the reason


def test_positional_product_written_first_is_a_bias_of_the_content_product() -> None:
    model = stack(TupeAttention)
    out = swapformer.rewrite(model, "sdpa", example_inputs=hidden())
    sites = out.swapformer_report.sites
    assert [(s.num_heads, s.num_kv_heads, s.mask) for s in sites] == [(4, 4, "bias")] * 2
    with torch.no_grad():
        torch.testing.assert_close(out(hidden(24)), model(hidden(24)), rtol=1e-5, atol=1e-5)


def test_heads_folded_into_the_query_length_are_refused_with_the_reason() -> None:
    model = stack(FoldedMQAAttention)
    out = swapformer.rewrite(model, "sdpa", example_inputs=hidden())
    report = out.swapformer_report
    assert not report.replaced and len(report.skipped) == 2
    assert all("folded" in skip.reason for skip in report.skipped)
    assert swapformer.find_sites(model, hidden(), kinds=("attention",)) == []
    with torch.no_grad():
        torch.testing.assert_close(out(hidden(24)), model(hidden(24)))


# 7. forms that were missed: in-place score edits, 0-d tensor scales, *masks, learned temperatures


@pytest.mark.parametrize("make", [InPlaceAttention, FullScaleAttention, TemperatureAttention],
                         ids=["in-place", "full-scale", "temperature"])
def test_missed_form_is_found_and_rewritten_exactly_at_two_lengths(make: type) -> None:
    model = stack(make)
    out = swapformer.rewrite(model, "sdpa", example_inputs=hidden())
    report = out.swapformer_report
    assert len(report.replaced) == 2
    if make is not TemperatureAttention:
        assert report.sites[0].scale == pytest.approx(HEAD_DIM**-0.5)
    assert _attention_ops_left(out) == []
    for t in (16, 24):
        with torch.no_grad():
            torch.testing.assert_close(out(hidden(t)), model(hidden(t)), rtol=1e-5, atol=1e-5)


def test_learned_temperature_is_read_live_after_training() -> None:
    model = stack(TemperatureAttention)
    out = swapformer.rewrite(model, "sdpa", example_inputs=hidden())
    assert len(out.swapformer_report.replaced) == 2
    with torch.no_grad():
        for net in (model, out):
            for name, p in net.named_parameters():
                if name.endswith("temperature"):
                    p.mul_(3.0)
        torch.testing.assert_close(out(hidden()), model(hidden()), rtol=1e-5, atol=1e-5)


def test_forward_with_varargs_masks_keeps_dynamic_lengths() -> None:
    torch.manual_seed(0)
    model = MaskArgsStack().eval()

    def inputs(t: int) -> tuple[torch.Tensor, ...]:
        keep = torch.ones(2, t, dtype=torch.bool)
        keep[1, -3:] = False
        return hidden(t), keep, keep

    out = swapformer.rewrite(model, "sdpa", example_inputs=inputs(16))
    assert out.swapformer_report.capture == "export-dynamic"
    assert len(out.swapformer_report.replaced) == 2
    with torch.no_grad():
        torch.testing.assert_close(out(*inputs(24)), model(*inputs(24)), rtol=1e-5, atol=1e-5)


def _exact_at_other_lengths(model: torch.nn.Module, out: torch.nn.Module) -> None:
    with torch.no_grad():
        for t in (16, 24, 9):
            torch.testing.assert_close(out(hidden(t)), model(hidden(t)), rtol=1e-5, atol=1e-5)


def test_sink_logits_are_exact_with_sdpa_and_refused_by_learned_targets() -> None:
    model = stack(SinkAttention)
    out = swapformer.rewrite(model, "sdpa", example_inputs=hidden())
    assert len(out.swapformer_report.replaced) == 2
    assert not _attention_ops_left(out)
    _exact_at_other_lengths(model, out)
    with torch.no_grad():  # the sinks are read live: training them moves the rewrite with the model
        for net in (model, out):
            for name, p in net.named_parameters():
                if name.endswith("sinks"):
                    p.add_(2.0)
    _exact_at_other_lengths(model, out)
    for target in ("window", "fastweight"):
        report = swapformer.explain(model, target, hidden())
        assert not report.replaced and all("sink logits" in s.reason for s in report.skipped)


def test_sink_logits_through_the_compile_backend() -> None:
    model = stack(SinkAttention)
    b = swapformer.backend("sdpa", inner="eager")
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend=b)(hidden()), model(hidden()),
                                   rtol=1e-5, atol=1e-5)
    assert len(b.reports[-1].replaced) == 2


def test_probabilities_sliced_without_a_sink_column_are_not_attention_over_every_key() -> None:
    model = stack(SlicedProbsAttention)
    out = swapformer.rewrite(model, "sdpa", example_inputs=hidden())
    assert out.swapformer_report.replaced == []
    _exact_at_other_lengths(model, out)


@pytest.mark.parametrize("make", [CrossCovarianceAttention, CosineAttention], ids=["xca", "cosine"])
def test_xca_and_cosine_attention_are_exact_or_refused(make: type) -> None:
    # XCiT / EdgeNeXt cross-covariance attention runs over the channel axis and SwinV2-cr scales
    # cosine scores by a clamped, exponentiated logit scale: both are a per-head temperature
    model = stack(make)
    out = swapformer.rewrite(model, "sdpa", example_inputs=hidden(12))
    assert len(out.swapformer_report.replaced) == 2
    _exact_at_other_lengths(model, out)
    for target in ("window", "fastweight", "cat"):
        report = swapformer.explain(model, target, hidden(12))
        assert not report.replaced and all(s.reason for s in report.skipped)


class TimmSwinV2CrAttention(_Heads):
    """timm's SwinV2-cr spelling: the logit scale is ``[H]``, reshaped to ``[1, H, 1, 1]`` in the
    forward, and a relative-position bias from an MLP over a coordinate buffer follows it."""

    def __init__(self) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.full((N_HEADS,), math.log(10)))
        offsets = torch.arange(MAX_LEN)[:, None] - torch.arange(MAX_LEN)[None, :]
        coords = torch.sign(offsets) * torch.log1p(offsets.abs())
        self.register_buffer("coords", coords.float().unsqueeze(-1), persistent=False)
        self.meta_mlp = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, N_HEADS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        q, k, v = self.split(x)
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        logit_scale = torch.clamp(self.logit_scale.reshape(1, N_HEADS, 1, 1), max=math.log(1.0 / 0.01)).exp()
        attn = attn * logit_scale
        attn = attn + self.meta_mlp(self.coords[:t, :t]).permute(2, 0, 1).unsqueeze(0)
        return self.merge(attn.softmax(dim=-1) @ v)


class TimmFusedXca(_Heads):
    """timm's XCiT fused path (``TIMM_FUSED_ATTN=2``): the temperature multiplies the normalised
    channel-axis queries and SDPA runs with ``scale=1.0``."""

    def __init__(self) -> None:
        super().__init__()
        self.temperature = nn.Parameter(torch.ones(N_HEADS, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (y.transpose(-2, -1) for y in self.split(x))  # [B, H, D, T]
        q = F.normalize(q, dim=-1) * self.temperature
        k = F.normalize(k, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v, scale=1.0)
        return self.merge(y.transpose(-2, -1))


@pytest.mark.parametrize("make", [TimmSwinV2CrAttention, TimmFusedXca], ids=["swinv2-cr", "xcit-fused"])
def test_timm_spellings_of_cosine_and_xca_attention_read_their_parameters_live(make: type) -> None:
    # benchmarks/timm_coverage.py: timm writes these differently from the hand-built ones above, and
    # at timm's init (temperature 1) a rewrite that dropped the temperature would still look exact
    model = stack(make)
    out = swapformer.rewrite(model, "sdpa", example_inputs=hidden(12))
    assert len(out.swapformer_report.replaced) == 2
    _exact_at_other_lengths(model, out)
    with torch.no_grad():  # "train" the scales and the bias MLP of both models the same way
        for net in (model, out):
            for name, p in net.named_parameters():
                if name.endswith(("temperature", "logit_scale")) or "meta_mlp" in name:
                    p.copy_(torch.linspace(0.5, 1.5, p.numel()).view_as(p))
        assert not torch.allclose(model(hidden(24)), stack(make)(hidden(24)))
        torch.testing.assert_close(out(hidden(24)), model(hidden(24)), rtol=1e-5, atol=1e-5)


# 8. the new grammar axes, for users' suites too


@pytest.mark.parametrize("mask", ["wide-window", "chunked", "band"])
@pytest.mark.parametrize("score_mod", ["none", "temperature", "sink"])
def test_grammar_fixed_masks_and_temperatures_are_exact_at_a_longer_length(mask: str, score_mod: str) -> None:
    window = {"wide-window": 16, "chunked": 8, "band": 12}[mask]
    program = attention_program(AttentionChoices(mask=mask, window=window, score_mod=score_mod, seq_len=8))
    sites = swapformer.find_sites(program.module, program.example_inputs)
    assert_sites_match(sites, [program.expected], kind="attention")
    out = swapformer.rewrite(program.module, "sdpa", example_inputs=program.example_inputs)
    longer = torch.randn(2, 24, program.module.d_q)
    with torch.no_grad():
        torch.testing.assert_close(out(longer), program.module(longer), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(program.module.reference(longer), program.module(longer), rtol=1e-5, atol=1e-5)


def test_grammar_softcap_is_refused_by_the_exact_target_with_its_reason() -> None:
    program = attention_program(AttentionChoices(mask="tril-buffer", score_mod="softcap"))
    report = swapformer.explain(program.module, "sdpa", program.example_inputs)
    assert not report.replaced and "soft-capping" in report.skipped[0].reason


def test_window_wider_than_every_candidate_below_the_models_longest_length() -> None:
    # found by the grammar: RoPE tables of 32 positions cap the length at 32, window 17 hid between
    # the candidate lengths 17 and 33 and was described as plain causal
    choices = AttentionChoices(projection="fused-chunk", mask="wide-window", extras="rope", num_heads=2,
                               num_kv_heads=2, head_dim=4, scale=0.5, window=17, bias=False, seq_len=5)
    program = attention_program(choices)
    (site,) = swapformer.find_sites(program.module, program.example_inputs)
    assert (site.mask, site.window) == ("causal", 17)
    out = swapformer.rewrite(program.module, "sdpa", example_inputs=program.example_inputs)
    x = torch.randn(2, 30, program.module.d_q)
    with torch.no_grad():
        torch.testing.assert_close(out(x), program.module(x), rtol=1e-5, atol=1e-5)
