"""calibrate() on a tiny hand-made student: learning, determinism, NaN rollback, LoRA, checkpoints."""

import copy
import json

import pytest
import torch
from _tiny import TinyLinearCore, make_pair, token_data

from swapformer.calibrate import CalibrationConfig, CalibrationDiverged, Stage, calibrate
from swapformer.errors import ConfigError, InputError
from swapformer.loading.data import TokenSplits

BASE = dict(batch_size=4, seq_len=32, progress=False, eval_batches=2, log_every=5)


def _config(*stages, **options):
    return CalibrationConfig(stages=stages, **{**BASE, **options})


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_transfer_and_distill_losses_decrease():
    student, teacher = make_pair(1, ffn=True)
    config = _config(Stage("transfer", steps=30, lr=1e-2), Stage("distill", steps=30, lr=3e-3))
    result = calibrate(student, teacher, token_data(), config)
    transfer, distill = result.stages
    assert transfer.steps == 30 and distill.steps == 30
    assert sum(transfer.losses[-5:]) / 5 < 0.6 * transfer.losses[0]
    assert sum(distill.losses[-5:]) / 5 < 0.8 * distill.losses[0]
    assert set(transfer.site_losses) == {"blocks.0:0", "blocks.1:0", "blocks.0.mlp:0", "blocks.1.mlp:0"}
    assert result.tokens == 60 * 4 * 32
    assert len(transfer.step_seconds) == 30 and all(t > 0 for t in transfer.step_seconds)  # one per step
    assert result.eval_perplexity is not None and result.heldout.shape[1] == 32
    assert result.model is student


def test_transfer_trains_only_new_parameters_and_keeps_host_outputs():
    student, teacher = make_pair(2)
    before = _state(student)
    calibrate(student, teacher, token_data(), _config(Stage("transfer", steps=5)))
    changed = {k for k, v in student.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"blocks.0.core.feature", "blocks.1.core.feature"}
    assert all(p.requires_grad for p in student.parameters())  # flags restored


def test_transfer_needs_no_teacher():
    student, _ = make_pair(3)
    result = calibrate(student, None, token_data(), _config(Stage("transfer", steps=3)))
    assert result.stages[0].steps == 3


def test_same_seed_same_result_other_seed_differs():
    runs = []
    for seed in (0, 0, 1):
        student, teacher = make_pair(4)
        config = _config(Stage("transfer", steps=4), Stage("distill", steps=4), seed=seed)
        calibrate(student, teacher, token_data(), config)
        runs.append(_state(student))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_nan_step_is_rolled_back_and_lr_lowered(caplog):
    student, teacher = make_pair(5)
    core = student.get_submodule("blocks.0.core")
    assert isinstance(core, TinyLinearCore)
    core.poison = {3}  # the 4th forward call (step 4) returns NaN once
    result = calibrate(student, teacher, token_data(), _config(Stage("transfer", steps=6, lr=1e-2)))
    stage = result.stages[0]
    assert stage.rollbacks == 1
    assert stage.lr == pytest.approx(5e-3)
    assert all(torch.isfinite(p).all() for p in student.parameters())
    assert "rolled back" in caplog.text


def test_persistent_nan_raises_a_clear_error():
    student, teacher = make_pair(6)
    student.get_submodule("blocks.1.core").poison = set(range(2, 100))
    config = _config(Stage("transfer", steps=6), nan_retries=2)
    with pytest.raises(CalibrationDiverged, match="non-finite loss or gradients at step 3 persisted after 2 rollbacks"):
        calibrate(student, teacher, token_data(), config)


def test_failed_lora_run_leaves_no_adapters_behind():
    student, teacher = make_pair(12)
    student.get_submodule("blocks.0.core").poison = set(range(100))
    with pytest.raises(CalibrationDiverged):
        calibrate(student, teacher, token_data(), _config(Stage("distill", steps=3), nan_retries=1))
    assert not any("lora" in name for name, _ in student.named_parameters())
    assert type(student.blocks[0].q_proj) is torch.nn.Linear
    assert all(p.requires_grad for p in student.parameters())


def test_lora_stage_trains_only_adapters_through_peft():
    from peft import PeftModel

    student, teacher = make_pair(7)
    before = _state(student)
    config = _config(Stage("distill", steps=5, lr=1e-2, train="lora"), merge_lora=False)
    result = calibrate(student, teacher, token_data(), config)
    assert isinstance(result.model, PeftModel)
    after = result.model.get_base_model()
    for name, p in after.named_parameters():
        if "lora_" in name:
            continue
        original = name.replace(".base_layer", "")
        assert torch.equal(p, before[original]), name
    lora_b = [p for n, p in after.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 8 and all(p.abs().sum() > 0 for p in lora_b)


def test_merged_lora_changes_projections_and_new_parameters_only():
    student, teacher = make_pair(8)
    before = _state(student)
    result = calibrate(student, teacher, token_data(), _config(Stage("distill", steps=5, lr=1e-2)))
    assert result.model is student and result.stages[0].train == "new+lora"
    changed = {k for k, v in student.state_dict().items() if not torch.equal(v, before[k])}
    expected = {f"blocks.{i}.{p}.weight" for i in range(2) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    assert changed == expected | {"blocks.0.core.feature", "blocks.1.core.feature"}


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    student, teacher = make_pair(9)
    config = _config(Stage("transfer", steps=5), Stage("distill", steps=4), checkpoint_dir=str(tmp_path),
                     checkpoint_every=2)
    calibrate(student, teacher, token_data(), config)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["optimizer-s2-00000009.pt", "state.json", "trainable-s2-00000009.safetensors"]
    state = json.loads((tmp_path / "state.json").read_text())
    assert (state["stage"], state["step"], state["global_step"], state["position"]) == (2, 0, 9, 9)
    assert {"torch", "python"} <= set(state["rng"])


def test_resume_refuses_a_checkpoint_with_other_options(tmp_path):
    student, teacher = make_pair(10)
    config = _config(Stage("transfer", steps=2), checkpoint_dir=str(tmp_path))
    calibrate(student, teacher, token_data(), config)
    with pytest.raises(ConfigError, match="other options"):
        calibrate(student, teacher, token_data(), config.replace(resume=True, seed=3))


def test_input_and_config_errors():
    student, teacher = make_pair(11)
    with pytest.raises(InputError, match="swapformer_report"):
        calibrate(teacher, None, token_data(), _config(Stage("transfer", steps=1)))
    with pytest.raises(ConfigError, match="need a teacher"):
        calibrate(student, None, token_data(), _config(Stage("distill", steps=1)))
    shared = copy.deepcopy(student)
    shared.blocks[0].q_proj = teacher.blocks[0].q_proj
    with pytest.raises(ConfigError, match="shares storage with the teacher"):
        calibrate(shared, teacher, token_data(), _config(Stage("distill", steps=1)))
    with pytest.raises(ConfigError, match="steps"):
        Stage("transfer")
    with pytest.raises(ConfigError, match="lora_rank is 0"):
        _config(Stage("distill", steps=1, train="lora"), lora_rank=0)


def test_normalised_transfer_loss_is_mse_over_the_reference_variance():
    from swapformer.calibrate.transfer import TransferHooks
    from swapformer.measure import call_model

    student, teacher = make_pair(3)
    replaced = student.swapformer_report.replaced
    batch = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    raw_hooks = TransferHooks(student, replaced, teacher, early_exit=False)
    with raw_hooks:
        raw = {k: float(v) for k, v in raw_hooks.run(lambda: call_model(student, batch)).items()}
    targets = {}
    norm_hooks = TransferHooks(student, replaced, teacher, early_exit=False, normalize=True)
    with norm_hooks:
        handles = [student.get_submodule(r.core_name).register_forward_hook(
            lambda m, a, out, name=r.site.name: targets.__setitem__(name, out.detach())) for r in replaced]
        normed = {k: float(v) for k, v in norm_hooks.run(lambda: call_model(student, batch)).items()}
        for h in handles:
            h.remove()
    assert set(normed) == set(raw) == set(targets)
    assert raw  # per-sequence normalisation: with one sequence it is MSE / variance
    one = TransferHooks(student, replaced, teacher, early_exit=False, normalize=True)
    raw_one = TransferHooks(student, replaced, teacher, early_exit=False)
    with raw_one:
        raw1 = {k: float(v) for k, v in raw_one.run(lambda: call_model(student, batch[:1])).items()}
    with one:
        handles = [student.get_submodule(r.core_name).register_forward_hook(
            lambda m, a, out, name=r.site.name: targets.__setitem__(name, out.detach())) for r in replaced]
        normed1 = {k: float(v) for k, v in one.run(lambda: call_model(student, batch[:1])).items()}
        for h in handles:
            h.remove()
    for name in raw1:
        assert normed1[name] == pytest.approx(raw1[name] / float(targets[name].float().var()), rel=1e-5)
        assert normed[name] != pytest.approx(raw[name], rel=1e-3)


def test_mix_lr_puts_the_hybrid_mixes_in_their_own_optimizer_group():
    from swapformer.calibrate.trainer import _param_groups

    mix, proj = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))
    named = [("layers.0.core.mix_logit", mix), ("layers.0.core.feature.weight", proj)]
    groups = _param_groups(named, Stage("distill", steps=1, lr=1e-3, mix_lr=0.3))
    assert [(g["params"], g["peak_lr"]) for g in groups] == [([proj], 1e-3), ([mix], 0.3)]
    # without mix_lr (or without a mix) one group at the stage's lr
    assert [g["peak_lr"] for g in _param_groups(named, Stage("distill", steps=1, lr=1e-3))] == [1e-3]
    with pytest.raises(ConfigError, match="mix_lr"):
        Stage("distill", steps=1, mix_lr=0.0)



def test_a_stage_with_mix_lr_trains_a_student_without_mixes():
    """``mix_lr`` on a student with no hybrid core is the plain single-group run."""
    student, teacher = make_pair(1)
    result = calibrate(student, teacher, token_data(), _config(Stage("transfer", steps=3, lr=1e-2, mix_lr=0.3)))
    assert result.stages[0].steps == 3


def test_a_stage_that_reads_past_the_data_says_rows_repeat(caplog):
    train = torch.cat(token_data(n_docs=16, length=32)).view(16, 32)
    splits = TokenSplits(train, train[:0])
    config = _config(Stage("transfer", steps=4), Stage("transfer", steps=1), eval_batches=0)
    with caplog.at_level("WARNING", logger="swapformer.calibrate"):
        first, second = calibrate(make_pair(5)[0], None, splits, config).stages
    assert first.passes == 1.0 and "repeat" not in first.describe()  # 4 x 4 rows: every row once
    assert second.passes == pytest.approx(1.25)  # counted from the run's start: the 5th batch repeats
    assert "1.25 passes over the data (rows repeat)" in second.describe()
    warnings = [r.getMessage() for r in caplog.records if "rows repeat" in r.getMessage()]
    assert len(warnings) == 1 and "past the 16 training sequences" in warnings[0]
