"""Example inputs as a recipe records them (shapes and dtypes) and rebuilt from that record."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from swapformer.checkpoint.hashing import dtype_name
from swapformer.errors import InputError
from swapformer.rewriter.capture import normalize_inputs
from swapformer.rewriter.hf import is_hf_model


def describe_inputs(example_inputs: Any) -> dict[str, Any]:
    """Shapes, dtypes and value ranges of example inputs, enough to rebuild equivalent ones.

    Raises:
        InputError: an input is neither a tensor nor a JSON scalar.
    """
    args, kwargs = normalize_inputs(example_inputs)
    return {"args": [_describe(v) for v in args], "kwargs": {k: _describe(v) for k, v in kwargs.items()}}


def _describe(value: Any) -> dict[str, Any]:
    if isinstance(value, torch.Tensor):
        entry: dict[str, Any] = {"shape": list(value.shape), "dtype": dtype_name(value.dtype)}
        if value.numel() and value.dtype != torch.bool and not value.is_floating_point():
            entry.update(low=int(value.min()), high=int(value.max()) + 1)
        if value.numel() and bool((value == value.reshape(-1)[0]).all()):
            entry["fill"] = value.reshape(-1)[0].item()
        return {"tensor": entry}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise InputError(f"cannot record an example input of type {type(value).__name__}; "
                     "use tensors and scalars, or pass example_inputs to load()")


def input_spec_for(model: nn.Module, example_inputs: Any) -> dict[str, Any] | None:
    if example_inputs is not None:
        return describe_inputs(example_inputs)
    if is_hf_model(model):
        return None  # rewrite builds its default inputs from the config, on load too
    return _graph_input_spec(model)


def _graph_input_spec(model: nn.Module) -> dict[str, Any]:
    """The input spec of an exported graph: placeholder shapes (their example hints) and dtypes."""
    in_spec = getattr(model, "_in_spec", None)
    holders = [n for n in model.graph.nodes if n.op == "placeholder"] if isinstance(model, torch.fx.GraphModule) else []
    vals = [n.meta.get("val") for n in holders]
    if in_spec is None or not holders or any(v is None for v in vals):
        raise InputError("cannot tell which inputs this model was captured with: "
                         "pass example_inputs=... to save()")
    leaves = [_describe_placeholder(v) for v in vals]
    args, kwargs = pytree.tree_unflatten(leaves, in_spec)
    return {"args": list(args), "kwargs": dict(kwargs)}


def _describe_placeholder(val: Any) -> dict[str, Any]:
    if not isinstance(val, torch.Tensor):
        return _describe(val)
    shape = [int(s.node.hint) if isinstance(s, torch.SymInt) else int(s) for s in val.shape]
    entry: dict[str, Any] = {"shape": shape, "dtype": dtype_name(val.dtype)}
    if val.dtype != torch.bool and not val.dtype.is_floating_point:
        entry.update(low=0, high=2)  # values are not recorded in a graph; 0/1 index anything
    return {"tensor": entry}


def build_inputs(spec: Mapping[str, Any] | None, base_model: nn.Module | None = None) -> Any:
    """Example inputs from a spec written by :func:`describe_inputs` (``None`` stays ``None``).

    Integer tensors get random values in their recorded range, capped below the base model's
    ``config.vocab_size`` when it has one; floats are standard normal; constant tensors (an
    all-ones attention mask) are rebuilt constant. The generator is seeded: the result is fixed.
    """
    if spec is None:
        return None
    gen = torch.Generator().manual_seed(0)
    vocab = getattr(getattr(base_model, "config", None), "vocab_size", None)
    args = tuple(_build(e, gen, vocab) for e in spec.get("args", []))
    kwargs = {k: _build(e, gen, vocab) for k, e in spec.get("kwargs", {}).items()}
    return (args, kwargs)


def _build(entry: Mapping[str, Any], gen: torch.Generator, vocab: int | None) -> Any:
    if "value" in entry:
        return entry["value"]
    t = entry["tensor"]
    shape, dtype = tuple(t["shape"]), getattr(torch, t["dtype"])
    if "fill" in t:
        return torch.full(shape, t["fill"], dtype=dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, generator=gen).to(dtype)
    high = min(t.get("high", 2), vocab) if vocab else t.get("high", 2)
    low = min(t.get("low", 0), high - 1)
    return torch.randint(low, high, shape, generator=gen, dtype=dtype)
