"""swapformer: find attention and FFN sites in PyTorch transformers and swap in efficient ones."""

import logging

from swapformer.checkpoint import RecipeMismatchError, from_pretrained, load, save, save_pretrained
from swapformer.compile_backend import backend
from swapformer.errors import (
    CaptureError,
    ConfigError,
    InputError,
    SwapformerError,
    UnknownTargetError,
    VerificationError,
)
from swapformer.planner import Budget
from swapformer.rewriter import RewriteReport, explain, find_sites, prepare, rewrite
from swapformer.rewriter.plan import Plan, PlanChoice
from swapformer.sites import AttentionSite, FFNSite, ProjectionRef, Site
from swapformer.targets import TargetConfig, available_targets

__version__ = "0.1.0"
logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "AttentionSite",
    "Budget",
    "CaptureError",
    "ConfigError",
    "FFNSite",
    "InputError",
    "Plan",
    "PlanChoice",
    "ProjectionRef",
    "RecipeMismatchError",
    "RewriteReport",
    "Site",
    "SwapformerError",
    "TargetConfig",
    "UnknownTargetError",
    "VerificationError",
    "available_targets",
    "backend",
    "explain",
    "find_sites",
    "from_pretrained",
    "load",
    "prepare",
    "rewrite",
    "save",
    "save_pretrained",
]
