"""Hashes and digests: the identity of a base model (parameter names, shapes, value digests, its Hugging Face
config), files, the recipe itself.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from swapformer.errors import InputError

# HF config entries that say how a model was loaded or run, not what it computes.
VOLATILE_CONFIG_KEYS = {
    "architectures", "dtype", "torch_dtype", "transformers_version", "use_cache", "return_dict",
    "output_attentions", "output_hidden_states", "quantization_config", "attn_implementation",
}



def source_identity(model: nn.Module, skip: tuple[str, ...], base_model: nn.Module | None = None) -> dict[str, Any]:
    """Class, HF identity, parameter names/shapes/dtypes (+ hash) and value digests of the base
    weights inside ``model`` (names under ``skip`` are not base weights)."""
    params = base_parameters(model, skip)
    cls = type(base_model if base_model is not None else model)
    graph = isinstance(model, torch.fx.GraphModule) and base_model is None
    return {
        "class": None if graph else f"{cls.__module__}.{cls.__qualname__}",
        "hf": hf_identity(model),
        "architecture_hash": architecture_hash(params),
        "parameters": {n: [list(p.shape), dtype_name(p.dtype)] for n, p in params.items()},
        "weights": {n: tensor_digest(p) for n, p in params.items()},
    }


def base_parameters(model: nn.Module, skip: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """``model``'s parameters (tied ones once) whose names do not start with a ``skip`` prefix."""
    return {n: p for n, p in model.named_parameters() if not n.startswith(skip)}


def architecture_hash(params: Mapping[str, torch.Tensor]) -> str:
    """sha256 of the sorted parameter names and shapes (dtypes excluded: a cast is not a new model)."""
    text = json.dumps(sorted((n, list(p.shape)) for n, p in params.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def tensor_digest(t: torch.Tensor) -> str:
    """A 16-hex-digit blake2b digest of a tensor's dtype, shape and bytes."""
    data = t.detach().to("cpu").contiguous().reshape(-1)
    h = hashlib.blake2b(f"{data.dtype}{tuple(t.shape)}".encode(), digest_size=8)
    h.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return h.hexdigest()


def hf_identity(model: nn.Module) -> dict[str, Any] | None:
    """``model_type``, ``_name_or_path`` and a hash of the config of a Hugging Face model."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return None
    stable = stable_config(config.to_dict())
    return {
        "model_type": getattr(config, "model_type", None),
        "name_or_path": getattr(config, "_name_or_path", None),
        "config_hash": hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest(),
        "config": stable,
    }


def stable_config(data: Any) -> Any:
    """A config dict without the entries that say how the model was loaded or run (recursive)."""
    if isinstance(data, Mapping):
        return {str(k): stable_config(v) for k, v in data.items()
                if not str(k).startswith("_") and k not in VOLATILE_CONFIG_KEYS}
    return jsonable(data)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.dtype):
        return dtype_name(value)
    return repr(value)


def recipe_hash(recipe: Mapping[str, Any]) -> str:
    keys = ("format_version", "rewrite", "sites")
    payload = {k: recipe[k] for k in keys}
    source = recipe["source"]
    payload["source"] = {"architecture_hash": source["architecture_hash"],
                         "config_hash": (source["hf"] or {}).get("config_hash")}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as e:
        raise InputError(f"cannot read {path}: {e}") from e
    return h.hexdigest()
