"""Finding, explaining, rewriting and compiling never change the user's model: models whose forward
writes their own state (BatchNorm statistics in training mode, an EMA buffer and a counter, a
parameter changed in place) keep every parameter and buffer bit-identical, and so do the inputs."""

from __future__ import annotations

import torch
from torch import nn

import swapformer
from swapformer import backend

D, HEADS, T = 16, 2, 8


class StatefulAttention(nn.Module):
    """Self-attention behind a BatchNorm, with a forward that updates an EMA buffer and a counter."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(D)
        self.qkv = nn.Linear(D, 3 * D)
        self.out = nn.Linear(D, D)
        self.register_buffer("ema", torch.zeros(D))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        x = self.norm(x.transpose(1, 2)).transpose(1, 2)
        if self.training:
            self.ema.mul_(0.9).add_(0.1 * x.detach().mean((0, 1)))
            self.calls += 1
        q, k, v = self.qkv(x).view(b, t, 3, HEADS, d // HEADS).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-1, -2)) * (d // HEADS) ** -0.5
        return self.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d))


class ParameterEditingAttention(StatefulAttention):
    """As above, and the forward also rescales a parameter in place (a hand-rolled weight update)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.out.bias.mul_(1.5)
        return super().forward(x)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def _assert_same_bits(before: dict[str, torch.Tensor], model: nn.Module) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    changed = [name for name, value in before.items() if not torch.equal(value, after[name])]
    assert not changed, f"changed by swapformer: {changed}"


def _model(cls: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    model = cls().train()
    model.norm.running_mean.normal_()  # not the initial values, so a reset would show too
    return model


def test_batchnorm_and_forward_written_buffers_survive_every_verb() -> None:
    model = _model(StatefulAttention)
    x = torch.randn(2, T, D)
    x_before, before = x.clone(), _state(model)
    assert len(swapformer.find_sites(model, x)) == 1
    _assert_same_bits(before, model)
    swapformer.explain(model, "sdpa", x)
    _assert_same_bits(before, model)
    rewritten = swapformer.rewrite(model, "sdpa", example_inputs=x)
    _assert_same_bits(before, model)
    assert rewritten.swapformer_report.replaced
    # the copy starts from the user's state, not from one the capture run moved on
    _assert_same_bits(before, rewritten)
    analysis = swapformer.prepare(model, x)
    analysis.rewrite("sdpa")
    analysis.rewrite("window", window=4, verify=True)
    _assert_same_bits(before, model)
    assert torch.equal(x, x_before)
    assert model.training and model.norm.training


def test_the_state_a_forward_writes_is_still_written_by_the_model_itself() -> None:
    # the guard undoes swapformer's runs only: the model and the rewrite keep updating as they should
    model = _model(StatefulAttention)
    x = torch.randn(2, T, D)
    rewritten = swapformer.rewrite(model, "sdpa", example_inputs=x)
    model(x)
    rewritten(x)
    for updated in (model, rewritten):
        assert int(updated.get_buffer("calls")) == 1
        assert int(updated.get_buffer("norm.num_batches_tracked")) == 1
    torch.testing.assert_close(rewritten.get_buffer("norm.running_mean"), model.norm.running_mean)
    torch.testing.assert_close(rewritten.get_buffer("ema"), model.ema)


def test_a_parameter_changed_in_forward_is_restored() -> None:
    model = _model(ParameterEditingAttention)
    x = torch.randn(2, T, D)
    before = _state(model)
    swapformer.find_sites(model, x)
    _assert_same_bits(before, model)
    rewritten = swapformer.rewrite(model, "sdpa", example_inputs=x)
    _assert_same_bits(before, model)
    _assert_same_bits(before, rewritten)


def test_compile_backend_runs_the_model_only_as_often_as_it_is_called() -> None:
    # Dynamo passes the model's weights to the backend as inputs: probing its graph must not count,
    # and the buffer updates nothing reads (``num_batches_tracked.add_(1)``) must stay in the graph
    model = _model(StatefulAttention)
    x = torch.randn(2, T, D)
    twin = _model(StatefulAttention)
    compiled = torch.compile(model, backend=backend("sdpa", inner="eager"))
    compiled(x)
    twin(x)
    assert int(model.calls) == 1 and int(model.norm.num_batches_tracked) == 1
    torch.testing.assert_close(model.norm.running_mean, twin.norm.running_mean)
    torch.testing.assert_close(model.ema, twin.ema)
