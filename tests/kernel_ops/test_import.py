"""``swapformer.kernels`` stays lean: Triton modules load lazily, CUDA is untouched, imports are bounded."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import swapformer.kernels

KERNELS = pathlib.Path(swapformer.kernels.__file__).parent


def test_import_loads_no_triton_module_and_no_cuda():
    code = (
        "import sys, torch, swapformer.kernels\n"
        "lazy = [m for m in sys.modules if m.startswith('swapformer.kernels')"
        " and (m.endswith('.triton') or m.endswith('triton_utils'))]\n"
        "assert not lazy, lazy\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised on import'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_kernels_import_nothing_outside_kernels():
    for path in KERNELS.rglob("*.py"):
        for name in _imports(path):
            assert not name.startswith(("torch.fx", "transformers")), f"{path.name} imports {name}"
            if name.startswith("swapformer"):
                assert name.startswith("swapformer.kernels"), f"{path.name} imports {name}"
            if name == "triton" or name.startswith("triton."):
                assert path.name in ("triton.py", "triton_utils.py"), f"{path.name} imports triton eagerly"
