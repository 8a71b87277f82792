"""The test tree must not shadow installed packages.

``tests/`` is on ``sys.path`` (conftest, for the model zoos), so each of its modules and packages is
importable under its bare name. transformers 5.25 imports the ``kernels`` distribution whenever it is
installed; a ``tests/kernels/`` package made every Hugging Face test fail with an ImportError there.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

TESTS = Path(__file__).parent


def _importable_names() -> set[str]:
    names = {p.stem for p in TESTS.glob("*.py")}
    names |= {p.name for p in TESTS.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))}
    return names


def test_no_test_module_shadows_an_installed_distribution():
    installed = set(importlib.metadata.packages_distributions())
    clashes = sorted(_importable_names() & installed)
    assert not clashes, f"tests/ entries shadow installed packages: {clashes}; rename them"
