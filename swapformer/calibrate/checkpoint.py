"""Atomic calibration checkpoints.

A checkpoint is three files in ``checkpoint_dir``:

* ``trainable-<tag>.safetensors``: every parameter calibrated so far, by name in the student;
* ``optimizer-<tag>.pt``: the optimizer state (``torch.save``);
* ``state.json``: stage, step, data position, lr scale, rng states, the config fingerprint and the
  names of the two files above.

Each file is written to a temporary name, flushed to disk and moved into place with ``os.replace``;
``state.json`` goes last, so a crash at any moment leaves either the previous checkpoint or the new
one, never a mix. Files of older checkpoints are removed after the new ``state.json`` is in place.
"""

from __future__ import annotations

import base64
import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.json"
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    """A loaded checkpoint."""

    state: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_checkpoint(directory: str | Path, *, tensors: dict[str, torch.Tensor],
                    optimizer: dict[str, Any] | None, state: dict[str, Any]) -> Path:
    """Write a checkpoint atomically (see the module docstring) and return its ``state.json``."""
    from safetensors.torch import save_file

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    tag = f"s{state['stage']}-{state['global_step']:08d}"
    weights, optim = f"trainable-{tag}.safetensors", f"optimizer-{tag}.pt"
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    _write_atomic(root / weights, lambda p: save_file(cpu, str(p)))
    _write_atomic(root / optim, lambda p: torch.save(optimizer, p))
    full = {**state, "format": FORMAT_VERSION, "weights": weights, "optimizer": optim}
    _write_atomic(root / STATE_FILE, lambda p: p.write_text(json.dumps(full, indent=1)))
    _remove_stale(root, keep={weights, optim})
    return root / STATE_FILE


def _remove_stale(root: Path, keep: set[str]) -> None:
    for p in root.iterdir():
        if p.name.startswith(("trainable-", "optimizer-")) and p.name not in keep:
            p.unlink(missing_ok=True)


def load_checkpoint(directory: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint | None:
    """The checkpoint in ``directory``, or ``None`` when there is none."""
    from safetensors.torch import load_file

    root = Path(directory)
    if not (root / STATE_FILE).exists():
        return None
    state = json.loads((root / STATE_FILE).read_text())
    tensors = load_file(str(root / state["weights"]), device=str(map_location))
    optimizer = torch.load(root / state["optimizer"], map_location=map_location, weights_only=True)
    return Checkpoint(state=state, tensors=tensors, optimizer=optimizer)


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """JSON-safe RNG states: torch CPU (and CUDA for a CUDA device) as base64, Python's ``random``."""
    out: dict[str, Any] = {"torch": _b64(torch.get_rng_state())}
    if device is not None and device.type == "cuda":
        out["cuda"] = _b64(torch.cuda.get_rng_state(device))
    version, internal, gauss = random.getstate()
    out["python"] = [version, list(internal), gauss]
    return out


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(_unb64(state["cuda"]), device)
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()
