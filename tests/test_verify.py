"""The verify stage: NaN never passes, dropout does not make it flaky, the tolerance follows the
dtype and the model's own noise, and a failure names only the sites that fail."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import swapformer
from swapformer.errors import VerificationError
from swapformer.targets.sdpa import SdpaAttention
from swapformer.targets.window import WindowAttention

D, HEADS, VOCAB = 64, 4, 100


class _Block(nn.Module):
    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)
        self.attn_drop = nn.Dropout(dropout)
        self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (z.view(b, t, HEADS, D // HEADS).transpose(1, 2) for z in self.qkv(x).split(D, -1))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(D // HEADS)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        att = self.attn_drop(att.masked_fill(~causal, float("-inf")).softmax(-1))
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, D))
        return x + self.mlp(x)


class TinyLM(nn.Module):
    """Two manual-attention blocks and a head; ``dropout`` on the probabilities and the MLP."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList(_Block(dropout) for _ in range(2))
        self.head = nn.Linear(D, VOCAB)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


def _model(**kwargs) -> TinyLM:
    torch.manual_seed(0)
    return TinyLM(**kwargs).eval()


def _break(monkeypatch: pytest.MonkeyPatch, cls: type, site_name: str,
           change: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Make ``cls`` cores built for ``site_name`` return ``change(output)``."""
    build = cls.from_site.__func__

    def from_site(kind, site, config, weights):
        core = build(kind, site, config, weights)
        if site.name == site_name:
            core.register_forward_hook(lambda module, args, out: change(out))
        return core

    monkeypatch.setattr(cls, "from_site", classmethod(from_site))


def _site_names(model: nn.Module, ids: torch.Tensor) -> list[str]:
    return [s.name for s in swapformer.find_sites(model, ids)]


def test_nan_output_fails_an_exact_target(monkeypatch: pytest.MonkeyPatch, ids: torch.Tensor) -> None:
    model = _model()
    first = _site_names(model, ids)[0]
    _break(monkeypatch, SdpaAttention, first, lambda out: out * float("nan"))
    with pytest.raises(VerificationError, match="NaN/inf at"):
        swapformer.rewrite(model, "sdpa", example_inputs=ids)


def test_nan_output_fails_a_learned_target_too(monkeypatch: pytest.MonkeyPatch, ids: torch.Tensor) -> None:
    model = _model()
    first = _site_names(model, ids)[0]
    _break(monkeypatch, WindowAttention, first, lambda out: torch.where(out > 0, out, float("inf")))
    with pytest.raises(VerificationError, match="'window' must not break.*NaN/inf"):
        swapformer.rewrite(model, "window", example_inputs=ids, window=4)
    monkeypatch.undo()
    swapformer.rewrite(model, "window", example_inputs=ids, window=4)  # unbroken: passes


def test_failure_names_only_the_failing_site(monkeypatch: pytest.MonkeyPatch, ids: torch.Tensor) -> None:
    model = _model()
    good, bad = _site_names(model, ids)
    _break(monkeypatch, SdpaAttention, bad, lambda out: out * 1.01)
    with pytest.raises(VerificationError) as info:
        swapformer.rewrite(model, "sdpa", example_inputs=ids)
    message = str(info.value)
    assert f"these sites fail: {bad}: max |Δ|" in message
    assert good not in message


def test_training_mode_with_dropout_verifies_and_keeps_the_mode(ids: torch.Tensor) -> None:
    model = _model(dropout=0.5).train()
    model.blocks[1].eval()  # mixed modes must come back exactly as they were
    modes = {name: m.training for name, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = swapformer.rewrite(model, "sdpa", example_inputs=ids)
    assert out.swapformer_report.max_abs_diff < 1e-4
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert out.training


def test_verification_does_not_update_batchnorm_statistics(ids: torch.Tensor) -> None:
    def make() -> nn.Module:
        return nn.Sequential(_model(), nn.BatchNorm1d(12)).train()

    verified, unverified = make(), make()
    swapformer.rewrite(verified, "sdpa", example_inputs=ids)
    swapformer.rewrite(unverified, "sdpa", example_inputs=ids, verify=False)
    # running the model to capture it updates them already (not verification's doing)
    assert torch.equal(verified[1].running_mean, unverified[1].running_mean)
    assert torch.equal(verified[1].num_batches_tracked, unverified[1].num_batches_tracked)


def test_hf_model_in_training_mode_with_attention_dropout_verifies() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=D, intermediate_size=2 * D, num_hidden_layers=2,
                                      num_attention_heads=HEADS, num_key_value_heads=2, vocab_size=VOCAB,
                                      attention_dropout=0.5, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).train()
    out = swapformer.rewrite(model, "sdpa")
    assert len(out.swapformer_report.replaced) == 2 and out.training and model.training


def test_bf16_hf_model_rewrites_to_sdpa_and_verifies() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=D, intermediate_size=2 * D, num_hidden_layers=2,
                                      num_attention_heads=HEADS, num_key_value_heads=2, vocab_size=VOCAB)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    report = swapformer.rewrite(model, "sdpa").swapformer_report
    assert len(report.replaced) == 2
    assert report.verify_tolerance is not None and report.max_abs_diff <= report.verify_tolerance


def test_bf16_plain_model_rewrites_to_sdpa_and_verifies(ids: torch.Tensor) -> None:
    model = _model().to(torch.bfloat16)
    report = swapformer.rewrite(model, "sdpa", example_inputs=ids).swapformer_report
    assert len(report.replaced) == 2 and report.max_abs_diff <= report.verify_tolerance


def test_fp32_model_with_large_logits_verifies(ids: torch.Tensor) -> None:
    model = _model()
    with torch.no_grad():
        model.head.weight.mul_(1e3)
        model.head.bias.mul_(1e3)
    report = swapformer.rewrite(model, "sdpa", example_inputs=ids).swapformer_report
    assert report.max_abs_diff <= report.verify_tolerance


def test_wrong_rewrite_of_a_model_with_small_outputs_fails(monkeypatch: pytest.MonkeyPatch,
                                                           ids: torch.Tensor) -> None:
    """The tolerance is relative to the output's scale: a 1% error in outputs of size ~1e-4 fails."""
    model = _model()
    with torch.no_grad():
        model.head.weight.mul_(1e-4)
        model.head.bias.mul_(1e-4)
    swapformer.rewrite(model, "sdpa", example_inputs=ids)  # the correct rewrite passes
    _break(monkeypatch, SdpaAttention, _site_names(model, ids)[0], lambda out: out * 1.01)
    with pytest.raises(VerificationError, match="tolerance"):
        swapformer.rewrite(model, "sdpa", example_inputs=ids)


def test_wrong_bf16_rewrite_still_fails(monkeypatch: pytest.MonkeyPatch, ids: torch.Tensor) -> None:
    model = _model().to(torch.bfloat16)
    _break(monkeypatch, SdpaAttention, _site_names(model, ids)[1], lambda out: out + 0.5 * out.abs().max())
    with pytest.raises(VerificationError, match="tolerance"):
        swapformer.rewrite(model, "sdpa", example_inputs=ids)


def test_reference_interpreter_disables_dropout_and_computes_in_float64() -> None:
    from swapformer.rewriter.verify import interpret

    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.9)).train())
    x = torch.randn(3, 4)
    out = interpret(gm, [x], torch.float64)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, F.linear(x.double(), gm.get_submodule("0").weight.double(),
                                             gm.get_submodule("0").bias.double()))
    assert gm.get_submodule("0").weight.dtype == torch.float32 and gm.training
