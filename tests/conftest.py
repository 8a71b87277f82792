"""Shared test setup: hypothesis profiles, offline Hugging Face, and the zoo on ``sys.path``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hypothesis import HealthCheck, settings

# Tests build models from configs only; never reach the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# `import models_zoo` works whatever pytest's import mode and whether tests/ is a package.
sys.path.insert(0, str(Path(__file__).parent))

settings.register_profile(
    "swapformer",
    deadline=None,
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("swapformer-ci", parent=settings.get_profile("swapformer"), derandomize=True)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE", "swapformer-ci" if os.environ.get("CI") else "swapformer")
)
