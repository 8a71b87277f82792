"""Backend selection and small numeric helpers shared by every kernel package.

Nothing here imports triton or touches CUDA: ``import swapformer.kernels`` must stay cheap and work on
machines without a GPU or without triton installed.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os

import torch

log = logging.getLogger(__name__)

BACKENDS = ("auto", "naive", "triton")

#: Log-gates are clamped from below at this value before any cumulative sum. ``exp(-60)`` is ~1e-26,
#: so the clamp changes nothing measurable, but it keeps ``log(0) = -inf`` out of differences of
#: cumulative sums (``-inf - -inf = nan``).
LOG_GATE_MIN = -60.0


@functools.lru_cache(maxsize=1)
def triton_status() -> tuple[bool, str]:
    """``(usable, why not)`` for the ``triton`` package, checked once by importing it.

    Called only where a Triton kernel could run (a CUDA tensor, or Triton asked for), so
    ``import swapformer.kernels`` itself never imports triton.
    """
    if importlib.util.find_spec("triton") is None:
        return False, "the triton package is not installed"
    try:
        importlib.import_module("triton")
    except Exception as exc:  # a broken install: report why, fall back to the reference
        return False, f"importing triton failed ({type(exc).__name__}: {exc})"
    return True, ""


def triton_available() -> bool:
    """True when the ``triton`` package can be imported (see :func:`triton_status`)."""
    return triton_status()[0]


_ANNOUNCED: set[tuple[str, str]] = set()


def _announce(backend: str, why: str, level: int = logging.INFO) -> None:
    """Log once per (path, reason) which kernel path runs and why."""
    # Dynamo would graph-break on the logging call; the eager calls (rewrite's verification
    # runs the model eagerly) say it instead
    if torch.compiler.is_compiling() or (backend, why) in _ANNOUNCED:
        return
    _ANNOUNCED.add((backend, why))
    path = "Triton kernels" if backend == "triton" else "PyTorch reference kernels (naive)"
    log.log(level, "swapformer kernels: using the %s: %s", path, why)


def interpreter_enabled() -> bool:
    """True when Triton kernels run in the numpy interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """Turn a user ``backend`` argument into ``"naive"`` or ``"triton"`` for tensor ``x``.

    ``"auto"`` honours the environment variable ``SWAPFORMER_KERNELS`` (``naive`` | ``triton``) and
    otherwise picks Triton for CUDA tensors (when triton is installed) and the reference elsewhere.
    ``"triton"`` on a CPU tensor needs ``TRITON_INTERPRET=1`` in the environment before triton is
    first imported.

    Raises:
        ValueError: unknown backend name.
        RuntimeError: Triton requested but not usable for this tensor.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = _auto_backend(x)
    if backend == "triton":
        usable, why = triton_status()
        if not usable:
            raise RuntimeError(f"backend='triton' requested but {why}")
        if not x.is_cuda and not interpreter_enabled():
            raise RuntimeError(
                "backend='triton' on a CPU tensor needs TRITON_INTERPRET=1 set before triton is imported"
            )
    return backend


def _auto_backend(x: torch.Tensor) -> str:
    env = os.environ.get("SWAPFORMER_KERNELS", "").strip().lower()
    if env in ("naive", "triton"):
        _announce(env, f"SWAPFORMER_KERNELS={env}")
        return env
    if not x.is_cuda:
        _announce("naive", f"the tensors are on {x.device.type}; the Triton kernels need CUDA")
        return "naive"
    usable, why = triton_status()
    if not usable:
        _announce("naive", f"{why}, so CUDA tensors fall back to the slower reference", logging.WARNING)
        return "naive"
    _announce("triton", "CUDA tensors and triton importable")
    return "triton"


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32, or float64 when the inputs already are float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def log_gate(g: torch.Tensor) -> torch.Tensor:
    """``log`` of a gate in (0, 1], in the accumulation dtype, clamped at :data:`LOG_GATE_MIN`."""
    return torch.log(g.to(acc_dtype(g.dtype))).clamp_min(LOG_GATE_MIN)
