"""capture → match → plan → apply → verify, behind ``rewrite`` / ``find_sites`` / ``explain``."""

from swapformer.rewriter.api import Analysis, explain, find_sites, prepare, rewrite
from swapformer.rewriter.report import Replacement, RewriteReport, Skip

__all__ = ["Analysis", "prepare", "Replacement", "RewriteReport", "Skip", "explain", "find_sites", "rewrite"]
