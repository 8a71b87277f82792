"""Calibration of a rewritten zoo model, in the worker or data parallel under ``torchrun``."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch.distributed as dist

import swapformer
from swapformer.calibrate import CalibrationConfig, Stage, calibrate
from swapformer.loading.offline import corpus_tokens
from swapformer.zoo.build import Built, build_model, has_logits, rewrite_is_exact
from swapformer.zoo.records import slug, write_json
from swapformer.zoo.spec import DEFAULTS, ZooEntry


def calibrate_step(rec: dict[str, Any], built: Built, student: Any, target: str, work: dict[str, Any]) -> Any:
    """The calibrate step of :func:`~swapformer.zoo.worker.run_target`: the calibrated student or ``None``."""
    tokens = int(work.get("calibrate_tokens") or 0)
    reason = None
    if tokens <= 0:
        reason = "not requested (--calibrate-tokens 0)"
    elif rewrite_is_exact(student):
        reason = "exact target: nothing to calibrate"
    elif built.tokenizer is None:
        reason = "the model has no tokenizer, so no corpus to calibrate on"
    elif not has_logits(built.model):
        reason = "the model has no language-model head (calibration distills next-token logits)"
    if reason:
        rec["calibration"] = {"status": "skipped", "reason": reason}
        return None
    if int(work.get("nproc") or 1) > 1 and student.swapformer_report.plan is not None:
        # the ranks rebuild the student from the target name, and a planner would plan again on each
        rec["calibration"] = {"status": "skipped", "reason": "a planned target calibrates with --nproc 1 only"}
        return None
    if int(work.get("nproc") or 1) > 1:
        return _calibrate_torchrun(rec, built, student, target, work)
    settings = ZooEntry(**work["entry"]).settings
    data = corpus_tokens(settings.get("corpus", "shakespeare"), built.tokenizer)
    config = calibration_config(tokens, settings)
    result = calibrate(student, built.model, data, config, tokenizer=built.tokenizer)
    rec["calibration"] = calibration_summary(result)
    return result.model


def calibration_config(tokens: int, settings: dict[str, Any]) -> Any:
    """Half the tokens for attention transfer, half for distillation (as ``swapformer convert``)."""
    transfer = tokens // 2
    return CalibrationConfig(stages=(Stage("transfer", tokens=transfer), Stage("distill", tokens=tokens - transfer)),
                             seq_len=int(settings.get("calib_seq_len", 128)),
                             batch_size=int(settings.get("calib_batch_size", 4)),
                             lora_rank=int(settings.get("lora_rank", 8)), progress=False)


def _calibrate_torchrun(rec: dict[str, Any], built: Built, student: Any, target: str,
                        work: dict[str, Any]) -> Any:
    """Calibrate under ``torchrun`` (data parallel, ``python -m swapformer.zoo _calibrate``) and
    load the calibrated weights into ``student``."""
    from safetensors.torch import load_file  # optional (the hf and calib extras), as calibration is

    entry = ZooEntry(**work["entry"])
    base = Path(work["out"]) / "jobs" / f"{slug(entry.name)}__{target}"
    job = {"entry": work["entry"], "target": target, "options": work["target_options"].get(target, {}),
           "tokens": int(work["calibrate_tokens"]), "weights": f"{base}.calib.safetensors",
           "result": f"{base}.calib.json"}
    write_json(Path(f"{base}.calib-job.json"), job)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={work['nproc']}",
           "-m", "swapformer.zoo", "_calibrate", f"{base}.calib-job.json"]
    subprocess.run(cmd, check=True)
    student.load_state_dict(load_file(job["weights"]))
    rec["calibration"] = {"nproc": work["nproc"], **json.loads(Path(job["result"]).read_text())}
    return student


def run_calibration_rank(job_path: Path) -> int:
    """Body of one ``torchrun`` rank: rebuild model and student, calibrate; rank 0 saves the result."""
    from safetensors.torch import save_file  # optional (the hf and calib extras), as calibration is

    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    job = json.loads(job_path.read_text())
    entry = ZooEntry(**job["entry"])
    built = build_model(entry)
    kinds = tuple(entry.settings.get("kinds", DEFAULTS["kinds"]))
    student = swapformer.rewrite(built.model, job["target"], example_inputs=built.inputs, kinds=kinds,
                                 **job["options"])
    data = corpus_tokens(entry.settings.get("corpus", "shakespeare"), built.tokenizer)
    try:
        result = calibrate(student, built.model, data, calibration_config(job["tokens"], entry.settings),
                           tokenizer=built.tokenizer)
        if rank == 0:
            # clones: tied weights (embeddings = LM head) share storage, which safetensors refuses
            state = {k: v.detach().cpu().clone().contiguous() for k, v in result.model.state_dict().items()}
            save_file(state, job["weights"])
            write_json(Path(job["result"]), calibration_summary(result))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def calibration_summary(result: Any) -> dict[str, Any]:
    """The JSON-able facts of a :class:`~swapformer.calibrate.CalibrationResult`."""
    return {"status": "ok", "tokens": result.tokens, "seconds": result.seconds,
            "eval_perplexity": result.eval_perplexity, "summary": result.summary()}
