"""The command line's parsing (the runs themselves are in test_calibrate_processes.py)."""

import pytest

from swapformer.calibrate import Stage
from swapformer.calibrate.cli import build_parser, config_from_args, load_factory, parse_stage
from swapformer.errors import ConfigError, InputError


def test_parse_stage():
    assert parse_stage("distill:tokens=1e5,lr=1e-4,train=lora") == Stage(
        "distill", tokens=100_000, lr=1e-4, train="lora")
    assert parse_stage("transfer:steps=3") == Stage("transfer", steps=3)
    with pytest.raises(ConfigError, match="bad stage option"):
        parse_stage("transfer:steps=3,rate=2")


def test_config_from_args_keeps_defaults_for_missing_options():
    args = build_parser().parse_args(["--stage", "transfer:steps=2", "--seq-len", "64", "--resume",
                                      "--checkpoint-dir", "ck"])
    config = config_from_args(args)
    assert config.stages == (Stage("transfer", steps=2),)
    assert (config.seq_len, config.resume, config.batch_size, config.progress) == (64, True, 4, True)


def test_load_factory_from_file_and_module(tmp_path):
    path = tmp_path / "jobs.py"
    path.write_text("def make():\n    return 42\n")
    assert load_factory(f"{path}:make")() == 42
    assert load_factory("swapformer.calibrate.cli:parse_stage") is parse_stage
    with pytest.raises(InputError, match="no attribute"):
        load_factory(f"{path}:missing")
    with pytest.raises(InputError, match="MODULE:FACTORY"):
        load_factory("nocolon")
