"""Calibration options: a frozen :class:`CalibrationConfig` holding a tuple of :class:`Stage` s."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from swapformer.errors import ConfigError

StageKind = Literal["transfer", "distill"]
TRAIN_CHOICES = ("new", "lora", "new+lora", "all")
_DEFAULT_LR = {"transfer": 1e-2, "distill": 1e-4}


@dataclass(frozen=True)
class Stage:
    """One calibration stage.

    Args:
        kind: ``"transfer"`` (per-site output matching against the exact host computation) or
            ``"distill"`` (KL between teacher and student logits, plus an optional LM loss).
        steps: optimizer steps; ``tokens`` may be given instead (one of them is required).
        tokens: token budget, turned into ``ceil(tokens / tokens per global step)`` steps.
        lr: peak learning rate (default: LoLCATs' 1e-2 for transfer, 1e-4 for distill).
        train: which parameters train: ``"new"`` (the replacement cores' new parameters),
            ``"lora"`` (LoRA adapters on the attention projections, through peft), ``"new+lora"``
            or ``"all"`` (every student parameter). Default: ``"new"`` for transfer; for distill
            ``"new+lora"`` when the config's ``lora_rank > 0``, else ``"new"``.
        temperature: distillation temperature (the KL term is scaled by T²).
        kl_weight: weight of the KL term (distill).
        lm_weight: weight of the next-token cross-entropy on the data (distill).
        loss_scale: multiplies the transfer loss (LoLCATs' ``mse_factor``).
        warmup_steps: linear warm-up steps; then the lr follows ``schedule``.
        schedule: ``"constant"`` or ``"cosine"`` (decay to 10 % of the peak at the stage end).
        normalize: transfer: divide each site's MSE by its reference output's variance (per-layer
            normalised loss, so every layer weighs the same).
        init_mix: transfer: set the hybrid cores' far-memory mix in closed form from the first
            batch (``init_from_inputs``) when the stage starts from step 0.
        short_windows: transfer: exact windows the hybrid cores are shortened to on a share of the
            steps (SWAX), so that the far memory must carry information; ``()`` = never.
        short_window_share: transfer: share of the steps that draw one of ``short_windows``.
        rope_shift: transfer: on every step after the first, rotate the ``q`` and ``k`` of every RoPE
            site on by one random ``0 .. rope_shift − 1`` positions (the reference is unchanged by it),
            so that maps of post-RoPE ``q, k`` learned on short rows see the angles of longer contexts;
            reads the model's ``inv_freq`` buffer (Hugging Face rotate-half RoPE); 0 = off.
        mix_lr: peak learning rate of the hybrid cores' far-memory mix (parameters named
            ``mix_logit``); None: the stage's ``lr``. The mix starts small (the window baseline) and
            Adam moves its logit by about the lr per step, so at a distill lr of 1e-3 a few dozen
            steps leave ``g = softplus(θ)`` where it started: the far memory stays shut.
    """

    kind: StageKind
    steps: int | None = None
    tokens: int | None = None
    lr: float | None = None
    train: str | None = None
    temperature: float = 1.0
    kl_weight: float = 1.0
    lm_weight: float = 0.0
    loss_scale: float = 1.0
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    normalize: bool = True
    init_mix: bool = True
    short_windows: tuple[int, ...] = ()
    short_window_share: float = 0.5
    mix_lr: float | None = None
    rope_shift: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "short_windows", tuple(self.short_windows))
        if any(w < 1 for w in self.short_windows):
            raise ConfigError(f"short_windows must be >= 1, got {self.short_windows}")
        if self.rope_shift < 0:
            raise ConfigError(f"stage rope_shift must be >= 0, got {self.rope_shift}")
        if self.mix_lr is not None and not self.mix_lr > 0:
            raise ConfigError(f"stage mix_lr must be > 0, got {self.mix_lr}")
        if not 0.0 <= self.short_window_share <= 1.0:
            raise ConfigError(f"short_window_share must be in [0, 1], got {self.short_window_share}")
        if self.kind not in ("transfer", "distill"):
            raise ConfigError(f"stage kind must be 'transfer' or 'distill', got {self.kind!r}")
        if self.steps is None and self.tokens is None:
            raise ConfigError(f"{self.kind} stage needs steps=... or tokens=...")
        if self.steps is not None and self.steps < 0:
            raise ConfigError(f"steps must be >= 0, got {self.steps}")
        if self.tokens is not None and self.tokens < 0:
            raise ConfigError(f"tokens must be >= 0, got {self.tokens}")
        if self.train is not None and self.train not in TRAIN_CHOICES:
            raise ConfigError(f"train must be one of {TRAIN_CHOICES}, got {self.train!r}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be positive, got {self.temperature}")
        if self.schedule not in ("constant", "cosine"):
            raise ConfigError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")

    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else _DEFAULT_LR[self.kind]

    def trains(self, lora_rank: int) -> str:
        """The resolved ``train`` choice."""
        if self.train is not None:
            return self.train
        if self.kind == "distill" and lora_rank > 0:
            return "new+lora"
        return "new"

    def num_steps(self, tokens_per_step: int) -> int:
        if self.steps is not None:
            return self.steps
        assert self.tokens is not None
        return math.ceil(self.tokens / tokens_per_step)

    def lr_factor(self, step: int, total: int) -> float:
        """Multiplier of the peak lr at ``step`` (0-based) of ``total``."""
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.schedule == "constant" or total <= self.warmup_steps:
            return 1.0
        progress = (step - self.warmup_steps) / max(1, total - self.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def _default_stages() -> tuple[Stage, ...]:
    return (Stage("transfer", steps=100), Stage("distill", steps=100))


@dataclass(frozen=True)
class CalibrationConfig:
    """Everything :func:`~swapformer.calibrate.calibrate` needs besides models and data.

    Args:
        stages: the stages, run in order (default: 100 transfer steps, then 100 distill steps).
        batch_size: sequences per step per data-parallel rank.
        seq_len: tokens per sequence (data are packed to this length).
        eval_fraction: share of the packed sequences held out for evaluation (every k-th one).
        eval_batches: held-out batches evaluated at the end (``None``: all, ``0``: none).
        lora_rank, lora_alpha, lora_dropout: LoRA options for stages that train ``"lora"``;
            alpha defaults to ``2 * rank`` (LoLCATs: r=8, α=16).
        lora_targets: module names to adapt; default: the q/k/v/o projections of the replaced
            attention sites (``ProjectionRef.weight`` minus ``.weight``).
        merge_lora: merge the adapters into the projections at the end (the student keeps its
            class and structure); otherwise the peft-wrapped model is in ``result.model``.
        weight_decay, grad_clip, betas: AdamW options and the gradient-norm clip (``None``: off).
        seed: seeds LoRA init, data order and any dropout.
        device: where to run (``None``: the student's device); ``"cuda"`` uses ``cuda:LOCAL_RANK``.
        autocast_dtype: ``"bfloat16"`` / ``"float16"`` autocast of the forward passes (params stay
            in their dtype); ``None``: off.
        checkpoint_dir: where checkpoints go (``None``: no checkpoints).
        checkpoint_every: steps between checkpoints (also written at each stage end).
        resume: continue from the checkpoint in ``checkpoint_dir`` if there is one.
        log_every: steps between log lines (the progress bar updates every step).
        progress: show a tqdm progress bar (rank 0 only).
        nan_retries: consecutive non-finite steps tolerated (each rolls back and lowers the lr)
            before :class:`~swapformer.calibrate.CalibrationDiverged` is raised.
        nan_lr_factor: lr multiplier applied at each rollback.
        early_exit: in transfer stages, stop the forward pass once every site has run.
        compile_cores: in transfer stages, run every replaced core's ``forward`` through one
            ``torch.compile``'d function of its class (one graph per class and shape serves every
            layer; the hooks stay eager) and put the eager ``forward`` back after the stage. Pays where
            the cores' own forward and backward dominate a step (fastweight's transfer on CPU: 1.12-1.28× per
            step, RESULTS.md session 23) and costs a compilation per SWAX window first.
    """

    stages: tuple[Stage, ...] = field(default_factory=_default_stages)
    batch_size: int = 4
    seq_len: int = 256
    eval_fraction: float = 0.05
    eval_batches: int | None = 16
    lora_rank: int = 8
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] | None = None
    merge_lora: bool = True
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    seed: int = 0
    device: str | None = None
    autocast_dtype: str | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 100
    resume: bool = False
    log_every: int = 10
    progress: bool = True
    nan_retries: int = 3
    nan_lr_factor: float = 0.5
    early_exit: bool = True
    compile_cores: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stages, Stage):
            object.__setattr__(self, "stages", (self.stages,))
        object.__setattr__(self, "stages", tuple(self.stages))
        if self.lora_targets is not None:
            object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        self._check()

    def _check(self) -> None:
        for name in ("batch_size", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ConfigError(f"seq_len must be >= 2, got {self.seq_len}")
        if not 0.0 <= self.eval_fraction <= 0.5:
            raise ConfigError(f"eval_fraction must be in [0, 0.5], got {self.eval_fraction}")
        if self.lora_rank < 0:
            raise ConfigError(f"lora_rank must be >= 0, got {self.lora_rank}")
        if self.autocast_dtype not in (None, "bfloat16", "float16"):
            raise ConfigError(f"autocast_dtype must be None, 'bfloat16' or 'float16', got {self.autocast_dtype!r}")
        if self.resume and not self.checkpoint_dir:
            raise ConfigError("resume=True needs checkpoint_dir")
        if not 0.0 < self.nan_lr_factor < 1.0:
            raise ConfigError(f"nan_lr_factor must be in (0, 1), got {self.nan_lr_factor}")
        for stage in self.stages:
            if "lora" in stage.trains(self.lora_rank) and self.lora_rank == 0:
                raise ConfigError(f"{stage.kind} stage trains LoRA but lora_rank is 0")

    def replace(self, **changes: Any) -> CalibrationConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> dict[str, Any]:
        """The fields that must match for a checkpoint to be resumed with this config."""
        skip = {"checkpoint_dir", "checkpoint_every", "resume", "log_every", "progress", "device",
                "eval_batches", "compile_cores"}
        return {k: v for k, v in self.to_dict().items() if k not in skip}
