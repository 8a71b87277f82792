"""Replacement implementations, one file per target; importing this package registers them."""

from swapformer.targets import cat, elita, fastweight, sdpa, window, worker  # noqa: F401
from swapformer.targets.base import (
    TargetConfig,
    TargetModule,
    available_targets,
    register_target,
    resolve_target,
)

__all__ = ["TargetConfig", "TargetModule", "available_targets", "register_target", "resolve_target"]
