"""Writing and reading the replacement cores' weights and the changed base weights."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from swapformer.checkpoint.hashing import base_parameters, dtype_name, file_sha256, tensor_digest
from swapformer.checkpoint.recipe import (
    CORES_FILE,
    HOST_FILE,
    RecipeMismatchError,
    excluded_prefixes,
    recipe_file,
)
from swapformer.errors import InputError

log = logging.getLogger(__name__)


def core_state(model: nn.Module, sites: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Every replaced core's state, keyed ``<core_name>.<key>``, as standalone CPU tensors."""
    state = {}
    for s in sites:
        if s["decision"] == "replaced":
            core = model.get_submodule(s["core_name"])
            for key, value in core.state_dict().items():
                state[f"{s['core_name']}.{key}"] = value.detach().to("cpu").clone().contiguous()
    return state


def changed_base_state(model: nn.Module, base_model: nn.Module, skip: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Base weights of ``model`` whose values differ from ``base_model``'s (same name and shape)."""
    base = base_model.state_dict()
    changed = {}
    for name, value in model.state_dict().items():
        ref = base.get(name)
        if name.startswith(skip) or ref is None or ref.shape != value.shape:
            continue
        if not torch.equal(value.detach().to("cpu"), ref.detach().to("cpu").to(value.dtype)):
            changed[name] = value.detach().to("cpu").clone().contiguous()
    return changed


def write_weights(model: nn.Module, out: Path, sites: list[dict[str, Any]], skip: tuple[str, ...],
                   base_model: nn.Module | None) -> dict[str, Any]:
    from safetensors.torch import save_file

    files: dict[str, Any] = {"cores": CORES_FILE, "host": None}
    save_file(core_state(model, sites), str(out / CORES_FILE), metadata={"format": "pt"})
    files["cores_sha256"] = file_sha256(out / CORES_FILE)
    changed = changed_base_state(model, base_model, skip) if base_model is not None else {}
    if changed:
        save_file(changed, str(out / HOST_FILE), metadata={"format": "pt"})
        files["host"] = HOST_FILE
        files["host_sha256"] = file_sha256(out / HOST_FILE)
        log.info("saved %d changed base tensors to %s", len(changed), HOST_FILE)
    elif (out / HOST_FILE).exists():
        (out / HOST_FILE).unlink()
    return files


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file.

    Raises:
        InputError: the file is missing, unreadable or not a valid safetensors file (named).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise InputError(f"cannot read {path} as safetensors: {e}") from e


def load_weights(model: nn.Module, path: Path, recipe: Mapping[str, Any]) -> None:
    files = recipe["files"]
    state = read_tensors(recipe_file(path, recipe, "cores"))
    for s in recipe["sites"]:
        if s["decision"] == "replaced":
            _load_core(model, s["core_name"], state)
    leftover = [k for k in state if not any(k.startswith(s.get("core_name", "") + ".")
                                            for s in recipe["sites"] if s["decision"] == "replaced")]
    if leftover:
        raise RecipeMismatchError(f"{files['cores']} holds tensors of no replaced site: {leftover[:4]}")
    host = recipe_file(path, recipe, "host")
    if host is not None:
        _load_host(model, read_tensors(host))


def _load_core(model: nn.Module, core_name: str, state: Mapping[str, torch.Tensor]) -> None:
    prefix = core_name + "."
    core = model.get_submodule(core_name)
    own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        core.load_state_dict(own, strict=True)
    except RuntimeError as e:
        raise RecipeMismatchError(f"saved weights do not fit core {core_name}: {e}") from e


def _load_host(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    result = model.load_state_dict(dict(state), strict=False)
    if result.unexpected_keys:
        raise RecipeMismatchError(f"saved base weights name tensors the model lacks: {result.unexpected_keys[:4]}")


def check_weights(recipe: Mapping[str, Any], model: nn.Module) -> None:
    """Warn when the base weights differ from those the recipe was saved with."""
    recorded = recipe["source"].get("weights") or {}
    params = base_parameters(model, excluded_prefixes(recipe["sites"]))
    dtypes = {n: d for n, (_, d) in recipe["source"]["parameters"].items()}
    differ = [n for n, p in params.items() if n in recorded and dtype_name(p.dtype) == dtypes.get(n)
              and tensor_digest(p) != recorded[n]]
    if differ:
        shown = ", ".join(differ[:4]) + (f" (and {len(differ) - 4} more)" if len(differ) > 4 else "")
        warnings.warn(f"{len(differ)} base weights differ from those the recipe was saved with "
                      f"(a different checkpoint?): {shown}", stacklevel=3)
