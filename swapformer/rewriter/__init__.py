"""capture → match → plan → apply → verify, behind ``rewrite`` / ``find_sites`` / ``explain``."""

from swapformer.rewriter.api import explain, find_sites, rewrite
from swapformer.rewriter.report import Replacement, RewriteReport, Skip

__all__ = ["Replacement", "RewriteReport", "Skip", "explain", "find_sites", "rewrite"]
