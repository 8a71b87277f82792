"""Calibration of rewritten models: attention transfer, then distillation (+ LoRA through peft).

Usage::

    from swapformer.calibrate import CalibrationConfig, Stage, calibrate

    student = swapformer.rewrite(copy.deepcopy(model), "fastweight")
    config = CalibrationConfig(stages=(Stage("transfer", tokens=200_000),
                                       Stage("distill", tokens=200_000)), seq_len=256)
    result = calibrate(student, model, token_data, config)
    print(result.summary())

Data parallel: ``torchrun --nproc_per_node=N -m swapformer.calibrate --job module:factory ...``
(see ``python -m swapformer.calibrate --help``).
"""

from swapformer.calibrate.config import CalibrationConfig, Stage
from swapformer.calibrate.results import CalibrationDiverged, CalibrationResult, StageResult
from swapformer.calibrate.trainer import calibrate, replacements

__all__ = [
    "CalibrationConfig",
    "CalibrationDiverged",
    "CalibrationResult",
    "Stage",
    "StageResult",
    "calibrate",
    "replacements",
]
