"""LoRA on the host's attention projections, through peft (never hand-written)."""

from __future__ import annotations

import logging
import warnings
from typing import Any

from torch import nn

from swapformer.errors import ConfigError
from swapformer.rewriter.report import Replacement
from swapformer.sites import AttentionSite

logger = logging.getLogger(__name__)


def projection_modules(replaced: list[Replacement]) -> list[str]:
    """Qualified names of the q/k/v/o projection modules of the replaced attention sites
    (``ProjectionRef.weight`` minus ``.weight``), deduplicated, in site order."""
    names: list[str] = []
    for r in replaced:
        if not isinstance(r.site, AttentionSite):
            continue
        for ref in (r.site.q_proj, r.site.k_proj, r.site.v_proj, r.site.o_proj):
            if ref is None or not ref.weight.endswith(".weight"):
                continue
            name = ref.weight[: -len(".weight")]
            if name not in names:
                names.append(name)
    return names


def add_lora(model: nn.Module, targets: list[str], *, rank: int, alpha: float | None,
             dropout: float) -> Any:
    """Wrap ``model`` in a peft ``PeftModel`` with LoRA adapters on the named modules.

    The adapters are injected into ``model`` in place; ``merge_lora(peft_model)`` folds them back.

    Raises:
        ConfigError: peft is not installed, no target module, or a name that is not a module.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ConfigError("LoRA stages need peft: pip install 'swapformer[calib]'") from e
    if not targets:
        raise ConfigError("LoRA needs target modules: the sites name no q/k/v/o projections; "
                          "set CalibrationConfig(lora_targets=...)")
    modules = dict(model.named_modules())
    missing = [t for t in targets if t not in modules]
    if missing:
        raise ConfigError(f"LoRA target modules not found in the student: {missing[:5]}")
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank,
                        lora_dropout=dropout, target_modules=list(targets), bias="none")
    logger.info("LoRA r=%d on %d modules", rank, len(targets))
    with warnings.catch_warnings():
        # peft probes transformers' deprecated gradient-checkpointing attribute.
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, config)


def is_lora_parameter(name: str) -> bool:
    return "lora_" in name


def merge_lora(peft_model: Any) -> nn.Module:
    """Merge the adapters into the base weights and return the unwrapped model."""
    return peft_model.merge_and_unload()
