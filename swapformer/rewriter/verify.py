"""Verify stage: the rewritten model runs, produces no NaN/inf the original does not, and an exact
target matches the original within the original's own rounding noise.

Determinism. A model in training mode draws new dropout masks on every call, so its outputs cannot
be compared. Verification therefore compares with dropout disabled, not in the model's mode: the
original's output is recomputed by interpreting its captured graph with every dropout an identity
(the user's module is never switched to eval mode, not even for a moment, and none of its buffers
is written: a running BatchNorm statistic stays as it was), and the rewritten model runs with
dropout disabled too (graph captures through the same interpreter, since capture bakes dropout into
the graph; Hugging Face models in eval mode, their per-module modes restored afterwards). Other
training-mode behaviour (BatchNorm batch statistics) stays as the model has it on both sides.

Tolerance. An exact rewrite computes the same function in another order, so it differs from the
original by rounding, and how much depends on the dtype and on the model. The original's own
rounding noise is measured by interpreting its captured graph in float64: a rewrite passes when
``max |rewritten - original| <= max(NOISE_FACTOR * max |original - original_fp64|, floor * scale)``
with ``scale = max |original_fp64|`` and a floor of 1e-5 for fp32 (1e-10 for fp64, two ulps of the
dtype for 16-bit floats). Where the float64 run is impossible, a warning says why and the floor alone
applies.

Localisation. When the whole model fails, each replaced site is rebuilt alone and checked the same
way, and the error names only the sites that fail on their own.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from swapformer.errors import VerificationError
from swapformer.rewriter.capture import unchanged
from swapformer.rewriter.report import Replacement, RewriteReport
from swapformer.targets.base import TargetConfig

log = logging.getLogger(__name__)

NOISE_FACTOR = 8.0  # an exact rewrite may differ from the original by this multiple of its own noise
EXACT_RTOL = 1e-5  # the fp32 floor, relative to the output's scale
_FLOOR = {torch.float64: 1e-10, torch.float32: EXACT_RTOL}

_aten = torch.ops.aten
_DROPOUT_FUNCTIONS = {
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
    torch.dropout, torch.alpha_dropout, torch.feature_alpha_dropout,
    _aten.dropout.default, _aten.alpha_dropout.default, _aten.feature_dropout.default,
    _aten.feature_alpha_dropout.default,
}
_SDPA_FUNCTIONS = {F.scaled_dot_product_attention, _aten.scaled_dot_product_attention.default}
_CAST_METHODS = ("float", "half", "bfloat16", "double")

Rebuild = Callable[[list[Replacement]], nn.Module]


def first_tensor(output: Any) -> torch.Tensor:
    """The main tensor of a model output (logits / last hidden state / a plain tensor)."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "to_tuple"):
        output = output.to_tuple()
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
            if item is not None:
                try:
                    return first_tensor(item)
                except TypeError:
                    continue
    raise TypeError(f"no tensor in model output of type {type(output).__name__}")


def relative_diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max |a - b|, that divided by max(1, max |a|))."""
    diff = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
    return diff, diff / max(1.0, float(a.double().abs().max()) if a.numel() else 0.0)


# running without dropout


class ReferenceInterpreter(fx.Interpreter):
    """Run a captured graph with dropout disabled, optionally with every float computed in ``cast``.

    Buffers are cloned as they are read and modules run as eval-mode copies, so in-place updates
    (BatchNorm statistics) never reach the model the graph shares its tensors with.
    """

    def __init__(self, gm: fx.GraphModule, cast: torch.dtype | None = None) -> None:
        super().__init__(gm)
        self.cast = cast

    def _cast(self, value: Any) -> Any:
        if self.cast is not None and isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.to(self.cast)
        return value

    def _cast_dtypes(self, args: Any, kwargs: Any) -> tuple[Any, Any]:
        if self.cast is None:
            return args, kwargs
        swap = lambda a: self.cast if isinstance(a, torch.dtype) and a.is_floating_point else a
        return pytree.tree_map(swap, (args, kwargs))

    def placeholder(self, target: Any, args: Any, kwargs: Any) -> Any:
        return self._cast(super().placeholder(target, args, kwargs))

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        value = super().get_attr(target, args, kwargs)
        if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
            value = value.clone()
        return self._cast(value)

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        if target in _DROPOUT_FUNCTIONS:
            return args[0]
        if target is _aten.native_dropout.default:
            return args[0], torch.ones_like(args[0], dtype=torch.bool)
        if target in _SDPA_FUNCTIONS:
            args, kwargs = args[:4], {**kwargs, "dropout_p": 0.0, **_sdpa_tail(args)}
        args, kwargs = self._cast_dtypes(args, kwargs)
        return super().call_function(target, args, kwargs)

    def call_method(self, target: Any, args: Any, kwargs: Any) -> Any:
        if self.cast is not None and target in _CAST_METHODS:
            return args[0].to(self.cast)
        args, kwargs = self._cast_dtypes(args, kwargs)
        return super().call_method(target, args, kwargs)

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        module = self.fetch_attr(target)
        if isinstance(module, nn.modules.dropout._DropoutNd):
            return args[0]
        if self.cast is None and not any(m.training for m in module.modules()):
            return super().call_module(target, args, kwargs)
        # a copy: eval mode and a dtype change must not touch the model's own modules
        twin = copy.deepcopy(module).eval()
        if self.cast is not None:
            twin.to(self.cast)
        return twin(*args, **kwargs)


def _sdpa_tail(args: tuple[Any, ...]) -> dict[str, Any]:
    # positional arguments after dropout_p, passed by name once dropout_p is taken out
    names = ("is_causal", "scale", "enable_gqa")
    return dict(zip(names, args[5:]))


def interpret(gm: fx.GraphModule, flat_inputs: list[Any], cast: torch.dtype | None = None) -> Any:
    """The output of ``gm`` on its flat inputs, without dropout (float64 inside with ``cast``); the
    weights it shares with the user's model and the inputs are left as they were."""
    with torch.no_grad(), _default_dtype(cast), unchanged([gm], flat_inputs):
        flat = ReferenceInterpreter(gm, cast).run(*flat_inputs)
    spec = getattr(gm, "_out_spec", None)
    return pytree.tree_unflatten(pytree.tree_leaves(flat), spec) if spec is not None else flat


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    # tensors a graph creates without a dtype must follow the cast too
    before = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every module of ``model`` in eval mode inside the block, each one's own mode restored after."""
    modes = {m: m.training for m in model.modules()}
    for m in modes:
        m.training = False  # the attribute, not .train(): exported graphs refuse .train()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def in_training(model: nn.Module) -> bool:
    return any(m.training for m in model.modules())


# what is compared


@dataclass
class Outcome:
    """One comparison: the largest difference, the tolerance it was held to, what failed (if any)."""

    max_abs: float
    tolerance: float | None
    problem: str | None


@dataclass
class Reference:
    """The original's deterministic output, and the tolerance an exact rewrite is held to."""

    output: torch.Tensor
    tolerance: float | None
    basis: str  # how the tolerance was set, for the error message


def reference(analysis: Any, config: TargetConfig) -> Reference:
    """The original's output with dropout disabled, and (exact targets) the tolerance from its noise."""
    captured = analysis.captured
    if in_training(analysis.model):
        out = first_tensor(interpret(captured.gm, captured.flat_inputs))
    else:
        out = first_tensor(analysis.reference)
    if not config.exact:
        return Reference(out, None, "")
    floor, scale = _floor(analysis.model, out), _finite_max(out.double().abs())
    return Reference(out, floor * scale, f"floor {floor:.3g} x output scale {scale:.3g}")


def _tolerance(analysis: Any, out: torch.Tensor) -> tuple[float, str]:
    floor = _floor(analysis.model, out)
    try:
        exact = first_tensor(interpret(analysis.captured.gm, analysis.captured.flat_inputs, torch.float64))
    except Exception as exc:  # the floor still applies; the warning says why the noise is unknown
        log.warning("verify: could not run the original in float64 to measure its rounding noise "
                    "(%s: %s); holding the rewrite to the %.3g floor alone", type(exc).__name__, exc, floor)
        scale = _finite_max(out.double().abs())
        return floor * scale, f"floor {floor:.3g} x output scale {scale:.3g}"
    noise = _finite_max((out.double() - exact).abs())
    scale = _finite_max(exact.abs())
    tol = max(NOISE_FACTOR * noise, floor * scale)
    return tol, (f"max({NOISE_FACTOR:g} x the original's own float64 error {noise:.3g}, "
                 f"floor {floor:.3g} x output scale {scale:.3g})")


def _floor(model: nn.Module, out: torch.Tensor) -> float:
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()} | {out.dtype}
    least = max((d for d in dtypes if d.is_floating_point), key=lambda d: torch.finfo(d).eps)
    return _FLOOR.get(least, 2 * torch.finfo(least).eps)


def _finite_max(t: torch.Tensor) -> float:
    finite = t[torch.isfinite(t)]
    return float(finite.max()) if finite.numel() else 0.0


def compare(ref: Reference, out: torch.Tensor) -> Outcome:
    """NaN/inf where the original is finite fails any target; beyond the tolerance fails exact ones."""
    a = ref.output
    if a.shape != out.shape:
        return Outcome(float("inf"), ref.tolerance, f"output shape {tuple(out.shape)} != {tuple(a.shape)}")
    finite = torch.isfinite(a)
    broken = finite & ~torch.isfinite(out)
    if bool(broken.any()):
        return Outcome(float("inf"), ref.tolerance, f"NaN/inf at {int(broken.sum())} of {a.numel()} "
                                                    "output positions where the original is finite")
    both = finite & torch.isfinite(out)
    diff = _finite_max((a.double() - out.double()).abs()[both]) if a.numel() else 0.0
    if ref.tolerance is not None and diff > ref.tolerance:
        return Outcome(diff, ref.tolerance, f"max |Δ| = {diff:.3g} > tolerance {ref.tolerance:.3g}")
    return Outcome(diff, ref.tolerance, None)


def run_rewritten(rewritten: nn.Module, analysis: Any) -> torch.Tensor:
    """The rewritten model's main output on the example inputs, with dropout disabled; the user's
    inputs and the rewritten model's buffers are left as they were."""
    args, kwargs = analysis.args, analysis.kwargs or {}
    if isinstance(rewritten, fx.GraphModule) and in_training(analysis.model):
        return first_tensor(interpret(rewritten, analysis.captured.flat_inputs))
    kept = [*rewritten.buffers(), *args, *kwargs.values()]
    with torch.no_grad(), eval_mode(rewritten), unchanged(tensors=kept):
        return first_tensor(rewritten(*args, **kwargs))


# the verify stage


def verify_rewrite(rewritten: nn.Module, analysis: Any, report: RewriteReport, config: TargetConfig,
                   rebuild: Rebuild) -> None:
    """Run ``rewritten`` once and compare it with the original; record the result in ``report``.

    Args:
        rewritten: the rewritten model. analysis: the capture it was built from.
        report: its report (``max_abs_diff`` and ``verify_tolerance`` are filled in).
        config: the target config; exact targets are held to the tolerance.
        rebuild: builds the model with only the given replacements, to localise a failure.

    Raises:
        VerificationError: naming the sites that fail on their own and what was wrong.
    """
    out = run_rewritten(rewritten, analysis)
    if not report.replaced:
        return
    ref = reference(analysis, config)
    outcome = compare(ref, out)
    if outcome.problem is not None and ref.tolerance is not None and math.isfinite(outcome.max_abs):
        # only a difference above the dtype's floor is worth the float64 run that measures the
        # original's own rounding noise (the common exact case never pays for it)
        ref = Reference(ref.output, *_tolerance(analysis, ref.output))
        outcome = compare(ref, out)
    report.max_abs_diff, report.verify_tolerance = outcome.max_abs, outcome.tolerance
    if outcome.problem is None:
        return
    failing = localise(report.replaced, analysis, ref, rebuild)
    raise VerificationError(_message(config, outcome, ref, failing, report, analysis.captured.strategy))


def localise(replaced: list[Replacement], analysis: Any, ref: Reference,
             rebuild: Rebuild) -> list[tuple[Replacement, Outcome]]:
    """The replacements that fail the comparison when each is applied alone."""
    if len(replaced) == 1:
        return []  # the whole-model result already is the single site's
    failing = []
    for rep in replaced:
        outcome = compare(ref, run_rewritten(rebuild([rep]), analysis))
        if outcome.problem is not None:
            failing.append((rep, outcome))
    return failing


def _message(config: TargetConfig, outcome: Outcome, ref: Reference, failing: list[tuple[Replacement, Outcome]],
             report: RewriteReport, capture: str) -> str:
    what = "should reproduce the model exactly" if config.exact else "must not break the model's outputs"
    text = f"target {config.name!r} {what}, but with every site replaced: {outcome.problem}"
    if ref.basis:
        text += f" (tolerance = {ref.basis})"
    if len(report.replaced) == 1:
        return text + f"; the only replaced site is {report.replaced[0].site.name}; capture {capture}"
    if failing:
        sites = "; ".join(f"{rep.site.name}: {o.problem}" for rep, o in failing)
        return text + f". Replaced alone, these sites fail: {sites}; capture {capture}"
    return text + (f". No site fails when replaced alone; together the {len(report.replaced)} "
                   f"replaced sites exceed the tolerance; capture {capture}")
