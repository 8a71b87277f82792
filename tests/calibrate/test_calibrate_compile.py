"""``CalibrationConfig(compile_cores=True)``: the transfer stage through compiled cores trains as the
eager one does, and every core gets its eager ``forward`` back."""

import pytest
import torch
from _tiny import HEADS, TinyLinearCore, make_pair, token_data

from swapformer.calibrate import CalibrationConfig, Stage, calibrate
from swapformer.calibrate.transfer import compiled_cores
from swapformer.errors import ConfigError


class PlainCore(TinyLinearCore):
    """TinyLinearCore without its fault-injection counter (a per-call int would recompile every call)."""

    def forward(self, q, k, v, bias=None, *, hidden=None):
        fq = torch.softmax(torch.einsum("bhtd,hde->bhte", q, self.feature), dim=-1)
        fk = torch.softmax(torch.einsum("bhtd,hde->bhte", k, self.feature), dim=-1)
        a = (fq @ fk.transpose(-1, -2)).tril()
        return (a / a.sum(-1, keepdim=True)) @ v


def _student(seed: int):
    student, teacher = make_pair(seed)
    torch.manual_seed(seed)
    for block in student.blocks:
        block.core = PlainCore(HEADS, block.core.feature.shape[-1])
    return student, teacher


def test_compiled_cores_train_as_eager_ones_and_get_their_forward_back():
    from torch._dynamo.utils import counters

    losses = []
    for compile_cores in (False, True):
        counters.clear()
        student, teacher = _student(7)
        config = CalibrationConfig(stages=(Stage("transfer", steps=3),), batch_size=4, seq_len=32,
                                   progress=False, eval_batches=0, compile_cores=compile_cores)
        losses.append(calibrate(student, teacher, token_data(), config).stages[0].losses)
        assert all("forward" not in vars(block.core) for block in student.blocks)
    assert counters["stats"]["unique_graphs"] == 1  # the compiled run: one graph for both cores
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)


def test_a_core_with_its_own_forward_is_refused_and_the_others_restored():
    cores = [PlainCore(HEADS, 4), PlainCore(HEADS, 4)]
    cores[1].forward = cores[1].forward  # an instance attribute the context would overwrite
    with pytest.raises(ConfigError, match="own forward attribute"), compiled_cores(cores):
        pass
    assert "forward" not in vars(cores[0])
