"""The calibration loop: stages, checkpoints and resume, NaN rollback, data parallelism.

Reproducibility: the batch of step ``i`` is a pure function of ``(seed, i)`` (see
:class:`~swapformer.loading.data.BatchStream`) and the global RNG is reseeded from ``(seed, step, rank)``
before every step, so a run resumed from a checkpoint replays exactly the steps an uninterrupted run
would have taken (bitwise on CPU). The caller's RNG state is restored at the end.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from swapformer.calibrate.checkpoint import (
    Checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from swapformer.calibrate.config import CalibrationConfig, Stage
from swapformer.calibrate.dist import (
    DistContext,
    all_reduce_mean,
    average_gradients,
    barrier,
    broadcast_parameters,
    init_distributed,
    resolve_device,
)
from swapformer.calibrate.distill import kl_distillation, lm_loss
from swapformer.calibrate.lora import add_lora, is_lora_parameter, merge_lora, projection_modules
from swapformer.calibrate.results import CalibrationDiverged, CalibrationResult, StageResult
from swapformer.calibrate.transfer import TransferHooks, compiled_cores, rope_frequencies
from swapformer.errors import ConfigError, InputError
from swapformer.loading.data import BatchStream, TokenSplits, prepare
from swapformer.measure import call_model, forward_logits, model_device, perplexity
from swapformer.rewriter.report import Replacement

logger = logging.getLogger("swapformer.calibrate")

CRASH_ENV = "SWAPFORMER_CALIBRATE_CRASH_AT_STEP"
"""Fault injection for tests: ``os._exit(77)`` right after global step N (and its checkpoint)."""

Named = list[tuple[str, nn.Parameter]]


def calibrate(student: nn.Module, teacher: nn.Module | None, data: Any,
              config: CalibrationConfig | None = None, *, tokenizer: Any = None) -> CalibrationResult:
    """Calibrate a rewritten model so that it keeps the quality of the original.

    Runs the stages of ``config`` in order: attention transfer (each replacement core fitted to the
    exact computation it replaced, see :mod:`swapformer.calibrate.transfer`) and end-to-end
    distillation (KL to the teacher's logits, optionally with LoRA on the attention projections via
    peft). Under ``torchrun`` every rank takes its share of each global batch and gradients are
    averaged (:mod:`swapformer.calibrate.dist`).

    Args:
        student: a model returned by ``swapformer.rewrite`` (it carries ``swapformer_report``);
            trained in place.
        teacher: the original model (a separate copy; never modified), needed by distill stages
            with ``kl_weight > 0``; ``None`` otherwise.
        data: token data in any form :func:`swapformer.loading.data.prepare` accepts (token tensors, an
            iterable of them, a text file or folder with ``tokenizer``, a ``datasets`` object, or a
            :class:`~swapformer.loading.data.TokenSplits`).
        config: the options (default :class:`CalibrationConfig`).
        tokenizer: a Hugging Face tokenizer, for text data.

    Returns:
        a :class:`CalibrationResult`.

    Raises:
        InputError: the student has no rewrite report, or the data cannot be used.
        ConfigError: inconsistent options, a teacher sharing weights with the student, or a
            checkpoint written with a different config.
        CalibrationDiverged: the loss stayed non-finite after ``nan_retries`` rollbacks.
    """
    config = config or CalibrationConfig()
    replaced = replacements(student)
    _check_teacher(student, teacher, replaced, config)
    device = resolve_device(config.device, model_device(student))
    ctx = init_distributed(device)
    splits = prepare(data, seq_len=config.seq_len, tokenizer=tokenizer, eval_fraction=config.eval_fraction)
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        return _Calibration(student, teacher, replaced, splits, config, ctx).run()


def replacements(student: nn.Module) -> list[Replacement]:
    """The replacements recorded in ``student.swapformer_report``.

    Raises:
        InputError: the model carries no report, or the report is a dry run.
    """
    report = getattr(student, "swapformer_report", None)
    if report is None:
        raise InputError("the student has no swapformer_report: calibrate the model that "
                         "swapformer.rewrite returned")
    if report.dry_run:
        raise InputError("the student's report is a dry run: nothing was replaced")
    return list(report.replaced)


def _check_teacher(student: nn.Module, teacher: nn.Module | None, replaced: list[Replacement],
                   config: CalibrationConfig) -> None:
    needs = [s for s in config.stages if s.kind == "distill" and s.kl_weight > 0]
    if needs and teacher is None:
        raise ConfigError("distill stages with kl_weight > 0 need a teacher")
    if teacher is None or teacher is student:
        if teacher is student:
            raise ConfigError("teacher and student are the same object; pass the original model")
        return
    storages = {p.untyped_storage().data_ptr() for p in teacher.parameters()}
    shared = [n for n, p in student.named_parameters() if p.untyped_storage().data_ptr() in storages]
    changed = _modified_names(student, replaced, config)
    clash = [n for n in shared if n in changed]
    if clash:
        raise ConfigError(f"student parameter {clash[0]!r} shares storage with the teacher and would "
                          "be modified; rewrite a copy (copy.deepcopy) of the teacher")


def _modified_names(student: nn.Module, replaced: list[Replacement], config: CalibrationConfig) -> set[str]:
    trains = {s.trains(config.lora_rank) for s in config.stages}
    if "all" in trains:
        return {n for n, _ in student.named_parameters()}
    new = {id(p) for r in replaced for p in student.get_submodule(r.core_name).new_parameters()}
    names = {n for n, p in student.named_parameters() if id(p) in new}
    if any("lora" in t for t in trains) and config.merge_lora:
        targets = config.lora_targets or projection_modules(replaced)
        names |= {f"{t}.weight" for t in targets}
    return names


@dataclass
class _Snapshot:
    """Trainable values and optimizer state before a step, for rollback."""

    step: int
    global_step: int
    position: int
    params: list[torch.Tensor]
    optimizer: dict[str, Any]


class _Calibration:
    """One calibration run (see :func:`calibrate`)."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None, replaced: list[Replacement],
                 splits: TokenSplits, config: CalibrationConfig, ctx: DistContext) -> None:
        self.base = student
        self.teacher = teacher
        self.replaced = replaced
        self.splits = splits
        self.config = config
        self.ctx = ctx
        self.device = ctx.device
        self.peft: Any = None
        self.stream = BatchStream(splits.train, config.batch_size, seed=config.seed,
                                  rank=ctx.rank, world_size=ctx.world_size)
        self.global_step = 0
        self.position = 0
        self.tokens = 0
        self.calibrated: set[int] = set()
        self._flags = {id(p): p.requires_grad for p in student.parameters()}

    def run(self) -> CalibrationResult:
        t0 = time.perf_counter()
        self.base.to(self.device)
        teacher_mode = self._prepare_teacher()
        student_mode = self.base.training
        ckpt = self._resume_checkpoint()
        start = ckpt.state["stage"] if ckpt else 0
        results: list[StageResult] = []
        try:
            self.base.train()
            for i, stage in enumerate(self.config.stages):
                results.append(self._stage(i, stage, ckpt if i == start else None, done=i < start))
            if ckpt is not None and start >= len(self.config.stages):
                self._load_tensors(ckpt)
        except BaseException:
            self._abort()
            raise
        finally:
            self.base.train(student_mode)
            if self.teacher is not None:
                self.teacher.train(teacher_mode)
        model = self._finish()
        return CalibrationResult(
            model=model, stages=results, tokens=self.tokens, seconds=time.perf_counter() - t0,
            heldout=self.splits.heldout, eval_perplexity=self._evaluate(model),
            resumed_from_step=ckpt.state["global_step"] if ckpt else None,
        )

    def _abort(self) -> None:
        """After an error: take the LoRA adapters out (unmerged) and restore requires_grad."""
        if self.peft is not None:
            self.peft.unload()
            self.peft = None
        self._restore_flags(self.base)

    def _prepare_teacher(self) -> bool:
        if self.teacher is None:
            return False
        mode = self.teacher.training
        self.teacher.to(self.device).eval()
        return mode

    def _stage(self, index: int, stage: Stage, ckpt: Checkpoint | None, *, done: bool) -> StageResult:
        train = stage.trains(self.config.lora_rank)
        if "lora" in train:
            self._ensure_lora(index)
        new = self._new_parameter_ids()
        params = self._select(train, new)
        if "new" in train and params and not new:
            # a silent LoRA-only stage once hid a target whose new parameters went missing
            logger.warning("%s stage trains %r, but the replaced cores have no new parameters: only the "
                           "LoRA adapters train", stage.kind, train)
        self.calibrated |= {id(p) for _, p in params}
        result = StageResult(kind=stage.kind, train=train,
                             trainable_parameters=sum(p.numel() for _, p in params))
        if done:
            result.skipped = "completed before the resumed checkpoint"
            return result
        if ckpt is not None:
            self._load_tensors(ckpt)
        if not params:
            result.skipped = f"no parameters to train ({train!r})"
            logger.warning("%s stage skipped: the student has no %r parameters", stage.kind, train)
            self.checkpoint(index + 1, 0, 1.0, None)
            return result
        self._set_trainable(params)
        _StageRun(self, index, stage, params, result).run(ckpt)
        return result

    def _finish(self) -> nn.Module:
        model: nn.Module = self.base
        if self.peft is not None:
            model = merge_lora(self.peft) if self.config.merge_lora else self.peft
        self._restore_flags(model)
        return model

    def _restore_flags(self, model: nn.Module) -> None:
        for p in model.parameters():
            if id(p) in self._flags:
                p.requires_grad_(self._flags[id(p)])

    def _evaluate(self, model: nn.Module) -> float | None:
        heldout = self.splits.heldout
        if heldout.shape[0] == 0 or self.config.eval_batches == 0:
            return None
        try:
            return perplexity(model, heldout, seq_len=self.config.seq_len,
                              batch_size=self.config.batch_size, max_batches=self.config.eval_batches)
        except InputError as e:
            logger.info("no held-out perplexity: %s", e)
            return None

    def _ensure_lora(self, index: int) -> None:
        if self.peft is not None:
            return
        targets = list(self.config.lora_targets or projection_modules(self.replaced))
        # Same adapter init on every rank and in a resumed run.
        torch.manual_seed(self.config.seed + 1_000_003 * (index + 1))
        self.peft = add_lora(self.base, targets, rank=self.config.lora_rank,
                             alpha=self.config.lora_alpha, dropout=self.config.lora_dropout)

    def _new_parameter_ids(self) -> set[int]:
        return {id(p) for r in self.replaced for p in self.base.get_submodule(r.core_name).new_parameters()}

    def _select(self, train: str, new: set[int]) -> Named:
        chosen = []
        for name, p in self.base.named_parameters():
            if (train == "all" or ("new" in train and id(p) in new)
                    or ("lora" in train and is_lora_parameter(name))):
                chosen.append((name, p))
        return chosen

    def _set_trainable(self, params: Named) -> None:
        chosen = {id(p) for _, p in params}
        for p in self.base.parameters():
            p.requires_grad_(id(p) in chosen)

    def calibrated_tensors(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.base.named_parameters() if id(p) in self.calibrated}

    def _load_tensors(self, ckpt: Checkpoint) -> None:
        params = dict(self.base.named_parameters())
        missing = sorted(set(ckpt.tensors) - set(params))
        if missing:
            raise ConfigError(f"checkpoint holds parameters the student lacks: {missing[:5]}")
        with torch.no_grad():
            for name, value in ckpt.tensors.items():
                params[name].copy_(value)

    def _resume_checkpoint(self) -> Checkpoint | None:
        if not (self.config.resume and self.config.checkpoint_dir):
            return None
        ckpt = load_checkpoint(self.config.checkpoint_dir, map_location=self.device)
        if ckpt is None:
            logger.info("no checkpoint in %s: starting from scratch", self.config.checkpoint_dir)
            return None
        ours = json.loads(json.dumps(self.config.fingerprint()))
        diff = sorted(k for k in ours if ckpt.state["config"].get(k) != ours[k])
        if diff:
            raise ConfigError(f"checkpoint in {self.config.checkpoint_dir} was written with other "
                              f"options: {diff}; use a new checkpoint_dir or the same options")
        if ckpt.state["world_size"] != self.ctx.world_size:
            logger.warning("checkpoint written with %d ranks, resuming with %d: the data order "
                           "differs from an uninterrupted run", ckpt.state["world_size"], self.ctx.world_size)
        self.global_step = ckpt.state["global_step"]
        self.position = ckpt.state["position"]
        set_rng_state(ckpt.state["rng"], self.device)
        logger.info("resuming at stage %d step %d (global step %d)", ckpt.state["stage"],
                    ckpt.state["step"], self.global_step)
        return ckpt

    def checkpoint(self, stage: int, step: int, lr_scale: float, optimizer: dict | None) -> None:
        if not self.config.checkpoint_dir:
            return
        if self.ctx.is_main:
            state = {"stage": stage, "step": step, "global_step": self.global_step,
                     "position": self.position, "lr_scale": lr_scale,
                     "world_size": self.ctx.world_size, "rng": rng_state(self.device),
                     "config": self.config.fingerprint()}
            save_checkpoint(self.config.checkpoint_dir, tensors=self.calibrated_tensors(),
                            optimizer=optimizer or {}, state=json.loads(json.dumps(state)))
        barrier(self.ctx)

    def maybe_crash(self) -> None:
        if os.environ.get(CRASH_ENV) == str(self.global_step):
            logger.warning("%s=%d: exiting hard", CRASH_ENV, self.global_step)
            os._exit(77)

    def step_seed(self) -> int:
        return (self.config.seed * 1_000_003 + self.global_step) * 64 + self.ctx.rank

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.config.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=getattr(torch, self.config.autocast_dtype))


def _param_groups(params: Named, stage: Stage) -> list[dict]:
    """One optimizer group at the stage's lr, and the hybrids' mixes in their own at ``mix_lr``."""
    is_mix = [name.rsplit(".", 1)[-1] == "mix_logit" for name, _ in params]
    if stage.mix_lr is None or not any(is_mix):
        return [{"params": [p for _, p in params], "peak_lr": stage.peak_lr()}]
    rest = [p for (_, p), mix in zip(params, is_mix) if not mix]
    mixes = [p for (_, p), mix in zip(params, is_mix) if mix]
    groups = [{"params": mixes, "peak_lr": stage.mix_lr}]
    return ([{"params": rest, "peak_lr": stage.peak_lr()}] if rest else []) + groups


class _StageRun:
    """The optimisation loop of one stage."""

    def __init__(self, cal: _Calibration, index: int, stage: Stage, params: Named,
                 result: StageResult) -> None:
        self.cal = cal
        self.config = cal.config
        self.index = index
        self.stage = stage
        self.params = [p for _, p in params]
        self.result = result
        self.total = stage.num_steps(cal.stream.tokens_per_step)
        self.optimizer = torch.optim.AdamW(_param_groups(params, stage), lr=stage.peak_lr(),
                                           betas=self.config.betas, weight_decay=self.config.weight_decay)
        self.step = 0
        self.lr_scale = 1.0
        self._site_sums: dict[str, list[float]] = {}
        self._inv_freq: torch.Tensor | None = None

    def run(self, ckpt: Checkpoint | None) -> None:
        if ckpt is not None and ckpt.state["step"] > 0:
            self.optimizer.load_state_dict(ckpt.optimizer)
            self.step = ckpt.state["step"]
            self.lr_scale = ckpt.state["lr_scale"]
        broadcast_parameters(self.params, self.cal.ctx)
        self._count_passes()
        t0 = time.perf_counter()
        with self._loss_context() as loss_fn:
            self._loop(loss_fn)
        self.result.seconds = time.perf_counter() - t0
        self.result.lr = self.stage.peak_lr() * self.lr_scale
        self.result.site_losses = {k: sum(v) / len(v) for k, v in self._site_sums.items()}
        self.cal.checkpoint(self.index + 1, 0, 1.0, None)
        logger.info("%s", self.result.describe())

    def _count_passes(self) -> None:
        """Record how far into the training data the stage reads; warn where rows repeat (a corpus
        smaller than the token budget is legitimate, but a table built from the run must not hide it)."""
        stream = self.cal.stream
        self.result.passes = stream.passes(self.cal.position + self.total - self.step)
        if self.result.passes > 1:
            logger.warning("%s stage: %d steps of %d sequences read past the %d training sequences; rows "
                           "repeat (%.2f passes over the data by the stage's end)", self.stage.kind, self.total,
                           stream.batch_size * stream.world_size, stream.seqs.shape[0], self.result.passes)

    @contextlib.contextmanager
    def _loss_context(self):
        if self.stage.kind == "transfer":
            compiled = contextlib.nullcontext()
            if self.config.compile_cores:
                compiled = compiled_cores([self.cal.base.get_submodule(r.core_name) for r in self.cal.replaced])
            with compiled, TransferHooks(self.cal.base, self.cal.replaced, self.cal.teacher,
                                         early_exit=self.config.early_exit, normalize=self.stage.normalize,
                                         init_cores=self.stage.init_mix and self.step == 0) as hooks:
                yield lambda batch: self._transfer_loss(hooks, batch)
        else:
            yield self._distill_loss

    def _loop(self, loss_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        good = self._snapshot()
        failed_at: int | None = None
        retries = 0
        bar = tqdm(total=self.total, initial=self.step, desc=self.stage.kind, dynamic_ncols=True,
                   disable=not (self.config.progress and self.cal.ctx.is_main))
        try:
            while self.step < self.total:
                before = self._snapshot() if self.config.nan_retries > 0 else None
                t0 = time.perf_counter()
                loss = self._step(loss_fn)
                if loss is None:
                    retries += 1
                    failed_at = self.step if failed_at is None else max(failed_at, self.step)
                    self._rollback(good, retries, failed_at)
                    continue
                good = before or good
                self.step += 1
                if failed_at is not None and self.step > failed_at:
                    failed_at, retries = None, 0
                self._after_step(loss, time.perf_counter() - t0, bar)
        finally:
            bar.close()

    def _step(self, loss_fn: Callable[[torch.Tensor], torch.Tensor]) -> float | None:
        """One optimizer step; ``None`` (nothing applied) when the loss or gradients are not finite."""
        cal = self.cal
        for group in self.optimizer.param_groups:
            group["lr"] = group["peak_lr"] * self.lr_scale * self.stage.lr_factor(self.step, self.total)
        torch.manual_seed(cal.step_seed())
        batch = cal.stream.batch(cal.position).to(cal.device)
        with cal.autocast():
            loss = loss_fn(batch)
        if not loss.requires_grad:
            raise InputError(f"the {self.stage.kind} loss does not depend on the trained parameters")
        loss.backward()
        average_gradients(self.params, cal.ctx)
        norm = _grad_norm(self.params)
        mean_loss, mean_norm = all_reduce_mean([float(loss.detach()), float(norm)], cal.ctx, cal.device)
        if not (math.isfinite(mean_loss) and math.isfinite(mean_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            return None
        if self.config.grad_clip is not None:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.config.grad_clip, norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return mean_loss

    def _after_step(self, loss: float, seconds: float, bar: Any) -> None:
        cal = self.cal
        cal.global_step += 1
        cal.position += 1
        tokens = cal.stream.tokens_per_step
        cal.tokens += tokens
        self.result.steps += 1
        self.result.tokens += tokens
        self.result.losses.append(loss)
        self.result.step_seconds.append(seconds)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4g}", tok_s=f"{tokens / max(seconds, 1e-9):.0f}")
        if self.step % self.config.log_every == 0 or self.step == self.total:
            logger.info("%s step %d/%d loss %.5g lr %.3g %.0f tok/s", self.stage.kind, self.step,
                        self.total, loss, self.optimizer.param_groups[0]["lr"], tokens / max(seconds, 1e-9))
        if cal.global_step % self.config.checkpoint_every == 0 and self.step < self.total:
            cal.checkpoint(self.index, self.step, self.lr_scale, self.optimizer.state_dict())
        cal.maybe_crash()

    def _short_window(self) -> int | None:
        """The exact window of this step's hybrid cores (SWAX), drawn from the step seed; None: as built."""
        stage = self.stage
        if not stage.short_windows or self.step == 0:  # step 0 also initialises the mix at full window
            return None
        rng = random.Random(self.cal.step_seed())
        return rng.choice(stage.short_windows) if rng.random() < stage.short_window_share else None

    def _rope_shift(self) -> int:
        """This step's RoPE shift, drawn from the step seed; 0 on the first step (the mix init)."""
        if self.step == 0:
            return 0
        return random.Random(self.cal.step_seed() + 1).randrange(self.stage.rope_shift)

    def _transfer_loss(self, hooks: TransferHooks, batch: torch.Tensor) -> torch.Tensor:
        if self.stage.rope_shift:
            if self._inv_freq is None:
                self._inv_freq = rope_frequencies(self.cal.base)
            hooks.shift = (self._rope_shift(), self._inv_freq)
        with hybrid_window(self.cal.base, self.cal.replaced, self._short_window()):
            losses = hooks.run(lambda: call_model(self.cal.base, batch))
        window = self.config.log_every
        for name, value in losses.items():
            recent = self._site_sums.setdefault(name, [])
            recent.append(float(value.detach()))
            del recent[:-window]
        return self.stage.loss_scale * torch.stack(list(losses.values())).mean()

    def _distill_loss(self, batch: torch.Tensor) -> torch.Tensor:
        logits = forward_logits(self.cal.base, batch)
        loss = logits.new_zeros((), dtype=torch.float32)
        if self.stage.kl_weight > 0:
            assert self.cal.teacher is not None
            with torch.no_grad():
                target = forward_logits(self.cal.teacher, batch)
            loss = loss + self.stage.kl_weight * kl_distillation(logits, target, self.stage.temperature)
        if self.stage.lm_weight > 0:
            loss = loss + self.stage.lm_weight * lm_loss(logits, batch)
        return loss

    def _snapshot(self) -> _Snapshot:
        return _Snapshot(step=self.step, global_step=self.cal.global_step, position=self.cal.position,
                         params=[p.detach().clone() for p in self.params],
                         optimizer=copy.deepcopy(self.optimizer.state_dict()))

    def _rollback(self, good: _Snapshot, retries: int, failed_at: int) -> None:
        self.result.rollbacks += 1
        if retries > self.config.nan_retries:
            raise CalibrationDiverged(
                f"{self.stage.kind} stage: non-finite loss or gradients at step {failed_at + 1} "
                f"persisted after {self.config.nan_retries} rollbacks (lr lowered to "
                f"{self.stage.peak_lr() * self.lr_scale:.3g}); lower lr, check the inputs, or use "
                "autocast_dtype=None")
        self.lr_scale *= self.config.nan_lr_factor
        with torch.no_grad():
            for p, value in zip(self.params, good.params):
                p.copy_(value)
        self.optimizer.load_state_dict(copy.deepcopy(good.optimizer))
        logger.warning("%s step %d: non-finite loss or gradients; rolled back to before step %d, "
                       "lr x%.3g", self.stage.kind, self.step + 1, good.step + 1, self.lr_scale)
        self.step = good.step
        self.cal.global_step = good.global_step
        self.cal.position = good.position


@contextlib.contextmanager
def hybrid_window(model: nn.Module, replaced: list[Replacement], window: int | None):
    """Shorten the exact window of every hybrid core to ``window`` inside the block (None: no-op)."""
    from swapformer.targets.hybrid import HybridAttention

    cores = [c for c in (model.get_submodule(r.core_name) for r in replaced)
             if isinstance(c, HybridAttention)] if window is not None else []
    saved = [c.window for c in cores]
    for c in cores:
        c.window = min(c.window, window)
    try:
        yield
    finally:
        for c, w in zip(cores, saved):
            c.window = w


def _grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads)
