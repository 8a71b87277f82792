"""The command line's parsing (the runs themselves are in test_calibrate_processes.py)."""

import pytest

from swapformer.calibrate import Stage
from swapformer.calibrate.cli import build_parser, config_from_args, load_factory, parse_stage
from swapformer.errors import ConfigError, InputError


def test_parse_stage():
    assert parse_stage("distill:tokens=1e5,lr=1e-4,train=lora") == Stage(
        "distill", tokens=100_000, lr=1e-4, train="lora")
    assert parse_stage("transfer:steps=3") == Stage("transfer", steps=3)
    assert parse_stage("transfer:steps=3,short_windows=16/32,normalize=false") == Stage(
        "transfer", steps=3, short_windows=(16, 32), normalize=False)
    with pytest.raises(ConfigError, match="bad stage option"):
        parse_stage("transfer:steps=3,rate=2")


def test_config_from_args_keeps_defaults_for_missing_options():
    args = build_parser().parse_args(["--stage", "transfer:steps=2", "--seq-len", "64", "--resume",
                                      "--checkpoint-dir", "ck"])
    config = config_from_args(args)
    assert config.stages == (Stage("transfer", steps=2),)
    assert (config.seq_len, config.resume, config.batch_size, config.progress) == (64, True, 4, True)
    assert config.compile_cores is False
    assert config_from_args(build_parser().parse_args(["--compile-cores"])).compile_cores is True


def test_load_factory_from_file_and_module(tmp_path):
    path = tmp_path / "jobs.py"
    path.write_text("def make():\n    return 42\n")
    assert load_factory(f"{path}:make")() == 42
    assert load_factory("swapformer.calibrate.cli:parse_stage") is parse_stage
    with pytest.raises(InputError, match="no attribute"):
        load_factory(f"{path}:missing")
    with pytest.raises(InputError, match="MODULE:FACTORY"):
        load_factory("nocolon")


def test_save_writes_tied_weights_once_and_loads_back(tmp_path):
    from types import SimpleNamespace

    import torch
    from safetensors.torch import load_file, load_model

    from swapformer.calibrate.cli import save_outputs

    class TiedLM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.head = torch.nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight

    model = TiedLM()
    path = tmp_path / "out" / "student.safetensors"
    args = build_parser().parse_args(["--save", str(path)])
    save_outputs(args, SimpleNamespace(model=model), rank=0)
    assert len(load_file(str(path))) == 1
    fresh = TiedLM()
    load_model(fresh, str(path))
    assert fresh.head.weight is fresh.embed.weight
    assert torch.equal(fresh.embed.weight, model.embed.weight)
