"""Capture: turn a model plus example inputs into one FX graph, and record what flows through it.

Strategies, tried in order until one works (each attempt is reported with its error):

1. ``export-dynamic``: ``torch.export.export(strict=False)`` with every input dim marked ``Dim.AUTO``
   (batch and sequence stay symbolic where the model allows), then ``ep.module()``: an ATen training-IR
   graph that canonicalises spellings (``@``/``matmul``, softmax variants, operand order) and keeps
   ``nn_module_stack``. Hugging Face v5 models are captured with ``use_cache=False``.
2. ``export-static``: the same with static shapes (some models specialise or guard on sizes).
3. ``fx``: ``torch.fx.symbolic_trace`` for plain modules export rejects (torch-level graph).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from swapformer.errors import CaptureError, InputError
from swapformer.rewriter.report import CaptureAttempt

log = logging.getLogger(__name__)


@dataclass
class Captured:
    """A captured graph plus the example inputs flattened into its placeholders' order."""

    gm: fx.GraphModule
    strategy: str
    attempts: list[CaptureAttempt]
    flat_inputs: list[Any]
    values: dict[str, Any] = field(default_factory=dict)  # node name -> probe value
    param_names: dict[str, str] = field(default_factory=dict)  # lifted placeholder -> parameter FQN

    def value(self, node: Any) -> Any:
        if isinstance(node, fx.Node):
            return self.values.get(node.name)
        return node


def normalize_inputs(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Accept a tensor, a tuple/list of positional args, a dict of kwargs, or ``(args, kwargs)``."""
    if example_inputs is None:
        raise InputError("example_inputs are required to capture the model's graph")
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        if len(example_inputs) == 2 and isinstance(example_inputs[1], dict) and isinstance(
            example_inputs[0], (tuple, list)
        ):
            return tuple(example_inputs[0]), dict(example_inputs[1])
        return tuple(example_inputs), {}
    raise InputError(
        "example_inputs must be a tensor, a tuple of positional arguments or a dict of keyword "
        f"arguments, got {type(example_inputs).__name__}"
    )


def describe_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    def one(v: Any) -> str:
        return f"Tensor{tuple(v.shape)}:{str(v.dtype).removeprefix('torch.')}" if isinstance(v, torch.Tensor) else repr(v)

    parts = [f"arg{i}={one(v)}" for i, v in enumerate(args)] + [f"{k}={one(v)}" for k, v in kwargs.items()]
    return ", ".join(parts)


@contextlib.contextmanager
def unchanged(modules: Iterable[torch.nn.Module] = (), tensors: Iterable[Any] = ()) -> Iterator[None]:
    """Leave every parameter and buffer of ``modules``, and every tensor in ``tensors``, bit-identical
    to what it was before the block, whatever the block runs.

    Running a model updates its state: BatchNorm running statistics and ``num_batches_tracked`` in
    training mode, EMA buffers and counters a forward writes, and rarely a parameter changed in place.
    Each tensor is copied before the block (a transient second copy of the weights, as the rewrite's
    own copy of the model) and copied back if its bits differ afterwards (version counters do not
    see everything: ``aten.batch_norm`` updates its running statistics without bumping them); a
    buffer or parameter the block replaced by another tensor object is put back.
    """
    slots = [(store, name, value) for module in modules for module_ in module.modules()
             for store in (module_._parameters, module_._buffers) for name, value in store.items()
             if value is not None]
    seen: dict[int, torch.Tensor] = {}
    for value in [slot[2] for slot in slots] + [t for t in tensors if isinstance(t, torch.Tensor)]:
        seen.setdefault(id(value), value)
    saved = [(t, t.detach().clone()) for t in seen.values()]
    try:
        yield
    finally:
        for store, name, value in slots:
            if store.get(name) is not value:
                store[name] = value
        with torch.no_grad():
            for tensor, copy in saved:
                if not _same_bits(tensor, copy):
                    tensor.copy_(copy)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    # bitwise, so that NaN payloads and the sign of zero count too
    if a.shape != b.shape or a.dtype != b.dtype or a.layout != torch.strided:
        return False  # other layouts are simply copied back
    return torch.equal(a.detach().contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


def check_inputs(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run the model once so bad example inputs fail here with a clear message, not mid-capture."""
    try:
        with torch.no_grad(), unchanged([model], [*args, *kwargs.values()]):
            return model(*args, **kwargs)
    except Exception as exc:  # re-raised with the inputs named; the cause stays chained
        raise InputError(
            f"the model does not run on the example inputs ({describe_inputs(args, kwargs)}): "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def _forward_params(model: torch.nn.Module) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def capture_kwargs(model: torch.nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """HF decoders return cache objects export cannot flatten: capture them with ``use_cache=False``."""
    if "use_cache" in _forward_params(model) and "use_cache" not in kwargs:
        return {**kwargs, "use_cache": False}
    return kwargs


def _auto_dims(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
    from torch.export import Dim

    def spec(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return {i: Dim.AUTO for i in range(v.dim())}
        return None

    return tuple(spec(a) for a in args), {k: spec(v) for k, v in kwargs.items()}


def _export(model: torch.nn.Module, args: tuple, kwargs: dict, dynamic: bool) -> fx.GraphModule:
    dyn = None
    if dynamic:
        dyn_args, dyn_kwargs = _auto_dims(args, kwargs)
        dyn = _pack_varargs(model, dyn_args) if not kwargs else {**_named_args(model, dyn_args), **dyn_kwargs}
    ep = torch.export.export(model, args, kwargs, dynamic_shapes=dyn, strict=False)
    return ep.module()


def _pack_varargs(model: torch.nn.Module, specs: tuple[Any, ...]) -> tuple[Any, ...]:
    """Positional specs shaped like the signature: ``forward(x, *masks)`` takes ``(x_spec, (m1, m2))``;
    a flat tuple would make export fail and capture fall back to static shapes."""
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values() if p.name != "self"]
    except (TypeError, ValueError):
        return specs
    for i, p in enumerate(params):
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            return (*specs[:i], tuple(specs[i:]))
    return specs


def _named_args(model: torch.nn.Module, values: tuple[Any, ...]) -> dict[str, Any]:
    names = [p for p in inspect.signature(model.forward).parameters if p not in ("self",)]
    return dict(zip(names, values))


def _export_flat(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list[Any]:
    spec = getattr(gm, "_in_spec", None)
    if spec is not None and spec.num_children == 2:
        keys = (spec.child(1) if hasattr(spec, "child") else spec.children_specs[1]).context or []
        kwargs = {k: kwargs[k] for k in keys}
    return pytree.tree_leaves((args, kwargs))


def _fx_flat(model: torch.nn.Module, args: tuple, kwargs: dict) -> list[Any]:
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    return list(bound.arguments.values())


_STRATEGIES: list[tuple[str, Callable[..., fx.GraphModule], Callable[..., list[Any]]]] = [
    ("export-dynamic", lambda m, a, k: _export(m, a, k, dynamic=True), lambda gm, m, a, k: _export_flat(gm, a, k)),
    ("export-static", lambda m, a, k: _export(m, a, k, dynamic=False), lambda gm, m, a, k: _export_flat(gm, a, k)),
    ("fx", lambda m, a, k: fx.symbolic_trace(m), lambda gm, m, a, k: _fx_flat(m, a, k)),
]


def capture(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Captured:
    """Capture ``model`` with the first strategy that works; raise :class:`CaptureError` naming all."""
    kwargs = capture_kwargs(model, kwargs)
    attempts: list[CaptureAttempt] = []
    for name, make, flatten in _STRATEGIES:
        start = time.perf_counter()
        try:
            gm = make(model, args, kwargs)
            flat = flatten(gm, model, args, kwargs)
        except Exception as exc:  # every failure is recorded and reported, never dropped
            attempts.append(CaptureAttempt(name, False, f"{type(exc).__name__}: {_first_line(exc)}",
                                           time.perf_counter() - start))
            log.debug("capture strategy %s failed", name, exc_info=True)
            continue
        attempts.append(CaptureAttempt(name, True, "", time.perf_counter() - start))
        log.info("captured %s with %s in %.2fs", type(model).__name__, name, attempts[-1].seconds)
        return Captured(gm, name, attempts, flat)
    detail = "; ".join(f"{a.strategy}: {a.error}" for a in attempts)
    raise CaptureError(f"could not capture {type(model).__name__} as a graph. Tried {detail}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, values: dict[str, Any]) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.values = values

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.values[n.name] = out
        return out


def probe(captured: Captured) -> Any:
    """Run the graph on the example inputs, keeping every node's value for the detectors; returns the
    graph's output in the model's own output structure. The graph shares its weights with the user's
    model (and Dynamo's graphs take them as inputs): whatever the run writes is undone."""
    with torch.no_grad(), unchanged([captured.gm], captured.flat_inputs):
        flat = _Recorder(captured.gm, captured.values).run(*captured.flat_inputs)
    spec = getattr(captured.gm, "_out_spec", None)
    return pytree.tree_unflatten(pytree.tree_leaves(flat), spec) if spec is not None else flat
