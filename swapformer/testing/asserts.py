"""Exactness and site checks: :func:`assert_rewrite_exact`, :func:`assert_same_outputs`,
:func:`check_equivalence`, :func:`assert_sites_match`.

swapformer's API is imported inside the functions that need it, so importing this module costs nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from hypothesis.strategies import SearchStrategy

    from swapformer.rewriter.report import RewriteReport
    from swapformer.sites import Site

ExampleInputs = torch.Tensor | tuple[Any, ...] | Mapping[str, Any]


def call_model(model: nn.Module, example_inputs: ExampleInputs) -> Any:
    """Call ``model`` the way swapformer calls it with ``example_inputs``.

    Args:
        model: the module to run.
        example_inputs: a tensor (one positional argument), a tuple (positional arguments) or a
            mapping (keyword arguments).

    Returns:
        Whatever ``model`` returns.
    """
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    if isinstance(example_inputs, tuple):
        return model(*example_inputs)
    return model(example_inputs)


# comparing outputs


def _tensor_leaves(obj: Any, path: str = "output") -> dict[str, torch.Tensor]:
    """Tensors inside nested tuples/lists/mappings (HF ``ModelOutput`` included), by path.
    Anything else (a KV cache object, ``None``) is not an output to compare."""
    if isinstance(obj, torch.Tensor):
        return {path: obj}
    leaves: dict[str, torch.Tensor] = {}
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            leaves.update(_tensor_leaves(value, f"{path}.{key}"))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            leaves.update(_tensor_leaves(value, f"{path}[{i}]"))
    return leaves


def _relative_diff(ref: torch.Tensor, out: torch.Tensor) -> float:
    """``max |ref - out| / max |ref|``; ``inf`` for a shape change or a NaN in only one of them."""
    if ref.shape != out.shape:
        return math.inf
    if not ref.is_floating_point():
        return 0.0 if torch.equal(ref, out) else math.inf
    if ref.numel() == 0:
        return 0.0
    ref, out = ref.detach().double(), out.detach().double()
    both_nan = ref.isnan() & out.isnan()
    diff = (ref - out).abs().masked_fill(both_nan, 0.0)
    if diff.isnan().any():
        return math.inf
    scale = ref.masked_fill(both_nan, 0.0).abs().max().item()
    return diff.max().item() / max(scale, 1e-6)


def _recorder(store: dict[str, torch.Tensor], key: str, read: Callable[..., Any]) -> Callable:
    def hook(_module: nn.Module, args: tuple, *out: Any) -> None:
        value = read(args, *out)
        if isinstance(value, torch.Tensor):
            store[key] = value.detach()

    return hook


def _record(
    model: nn.Module, taps: dict[str, tuple[str, str]], example_inputs: ExampleInputs
) -> dict[str, torch.Tensor]:
    """Run ``model`` once, recording for each key the input (``"in"``) or output (``"out"``) of the
    submodule named in ``taps``; submodules that are missing or never called record nothing."""
    store: dict[str, torch.Tensor] = {}
    handles = []
    for key, (name, side) in taps.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        if side == "in":
            hook = _recorder(store, key, lambda args: args[0] if args else None)
            handles.append(module.register_forward_pre_hook(hook))
        else:
            hook = _recorder(store, key, lambda args, out: out)
            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            call_model(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return store


def _module_of(weight: str) -> str:
    return weight.rsplit(".", 1)[0] if "." in weight else ""


def _host_taps(report: RewriteReport) -> dict[str, tuple[str, str]]:
    """Where the original model exposes what each core computes: the input of the attention's
    output projection (heads merged), or the output of the FFN's down projection."""
    taps = {}
    for r in report.replaced:
        site = r.site
        if getattr(site, "o_proj", None) is not None:
            taps[site.name] = (_module_of(site.o_proj.weight), "in")
        elif getattr(site, "down_proj", None) is not None:
            taps[site.name] = (_module_of(site.down_proj.weight), "out")
    return taps


def _worst_site(
    original: nn.Module, rewritten: nn.Module, example_inputs: ExampleInputs, report: RewriteReport
) -> str:
    """Name the replaced site whose core output is furthest from what the host computed there."""
    host = _record(original, _host_taps(report), example_inputs)
    cores = {r.site.name: (r.core_name, "out") for r in report.replaced}
    core = _record(rewritten, cores, example_inputs)
    diffs = []
    for name, out in core.items():
        ref = host.get(name)
        if ref is None:
            continue
        if out.dim() == 4:
            out = out.transpose(1, 2).flatten(2)  # [B, H, T, Dv] -> [B, T, H * Dv]
        same_size = out.numel() == ref.numel()
        diffs.append((_relative_diff(ref, out.reshape(ref.shape)) if same_size else math.inf, name))
    if not diffs:
        return "no replaced site could be compared on its own"
    worst, name = max(diffs)
    site = next(r.site for r in report.replaced if r.site.name == name)
    return f"worst site: {site.name} ({site.module_type}), core output differs by {worst:.3g}"


def assert_same_outputs(
    original: nn.Module,
    rewritten: nn.Module,
    example_inputs: ExampleInputs,
    *,
    rtol: float = 1e-5,
    report: RewriteReport | None = None,
) -> float:
    """Check that two models give the same outputs on ``example_inputs``.

    Every tensor in ``original``'s output (through nested tuples, lists, mappings and HF
    ``ModelOutput``) must appear in ``rewritten``'s output with the same shape and
    ``max |Δ| <= rtol * max |original|``. Runs under ``torch.no_grad()``; put both models in eval
    mode first if they hold dropout.

    Args:
        original: the reference model.
        rewritten: the model under test.
        example_inputs: a tensor, a tuple of positional arguments or a mapping of keyword arguments.
        rtol: tolerance relative to the largest magnitude of each reference output.
        report: the rewrite's report; when given, a failure also names the worst replaced site.

    Returns:
        The largest relative difference over all outputs.

    Raises:
        AssertionError: an output is missing, changed shape, or differs beyond ``rtol``.
    """
    with torch.no_grad():
        expected = _tensor_leaves(call_model(original, example_inputs))
        actual = _tensor_leaves(call_model(rewritten, example_inputs))
    missing = sorted(set(expected) - set(actual))
    if missing:
        raise AssertionError(f"the rewritten model does not return {missing}")
    diffs = {path: _relative_diff(ref, actual[path]) for path, ref in expected.items()}
    path, worst = max(diffs.items(), key=lambda item: item[1], default=("", 0.0))
    if worst <= rtol:
        return worst
    ref, out = expected[path], actual[path]
    lines = [
        f"{path} differs by {worst:.3g} relative to its scale (rtol {rtol:g}); "
        f"shapes {tuple(ref.shape)} vs {tuple(out.shape)}"
    ]
    if report is not None:
        lines += [_worst_site(original, rewritten, example_inputs, report), str(report)]
    raise AssertionError("\n".join(lines))


def assert_rewrite_exact(
    model: nn.Module,
    example_inputs: ExampleInputs,
    target: str = "sdpa",
    *,
    rtol: float = 1e-5,
    allow_empty: bool = False,
    **target_options: Any,
) -> RewriteReport:
    """Rewrite ``model`` to ``target`` and check that its outputs did not change.

    Meant for exact targets (``"sdpa"``): any difference there is a detection bug.

    Args:
        model: the model to rewrite, in eval mode; it is not modified.
        example_inputs: a tensor, a tuple of positional arguments or a mapping of keyword arguments.
        target: the registry name or config of the target.
        rtol: tolerance relative to the largest magnitude of each output.
        allow_empty: accept a rewrite that replaced no site.
        **target_options: passed on to :func:`swapformer.rewrite` (e.g. ``kinds=``).

    Returns:
        The rewrite's :class:`RewriteReport`.

    Raises:
        AssertionError: nothing was replaced (unless ``allow_empty``), or the outputs differ; the
            message names the worst output and the worst replaced site, followed by the report.
    """
    from swapformer import rewrite

    rewritten = rewrite(model, target, example_inputs=example_inputs, **target_options)
    report = rewritten.swapformer_report
    if not report.replaced and not allow_empty:
        raise AssertionError(f"rewrite to {target!r} replaced no site\n{report}")
    assert_same_outputs(model, rewritten, example_inputs, rtol=rtol, report=report)
    return report


def check_equivalence(
    original: nn.Module,
    rewritten: nn.Module,
    inputs_strategy: SearchStrategy[Any],
    *,
    max_examples: int = 20,
    rtol: float = 1e-5,
) -> None:
    """Compare two models on inputs drawn by hypothesis; call it from a plain (non-``@given``) test.

    Args:
        original: the reference model.
        rewritten: the model under test.
        inputs_strategy: draws example inputs (a tensor, a tuple or a mapping), e.g.
            ``input_tensors((2, 16, 64))``.
        max_examples: how many inputs to try.
        rtol: tolerance relative to each output's largest magnitude.

    Raises:
        AssertionError: for the simplest input hypothesis finds on which the outputs differ.
    """
    from hypothesis import HealthCheck, given, settings

    @settings(
        max_examples=max_examples, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )
    @given(inputs_strategy)
    def run(example_inputs: Any) -> None:
        assert_same_outputs(original, rewritten, example_inputs, rtol=rtol)

    run()


def _mismatches(site: Site, expected: Mapping[str, Any]) -> list[str]:
    bad = []
    for key, want in expected.items():
        got = getattr(site, key, "<missing>")
        numeric = isinstance(want, float) and isinstance(got, (int, float))
        same = math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-12) if numeric else got == want
        if not same:
            bad.append(f"{key}: expected {want!r}, got {got!r}")
    return bad


def assert_sites_match(
    sites: Sequence[Site], expected: Sequence[Mapping[str, Any]], *, kind: str | None = None
) -> None:
    """Check that the detected sites are exactly the expected ones, in any order.

    Args:
        sites: what :func:`swapformer.find_sites` returned.
        expected: one mapping per site, from field name (``num_heads``, ``scale``, ``activation``,
            ...) to value; floats compare with a relative tolerance of 1e-6, the rest with ``==``.
            Fields left out are not checked.
        kind: compare only sites of this kind (``"attention"`` or ``"ffn"``).

    Raises:
        AssertionError: the counts differ, or an expected mapping matches no remaining site (the
            message lists the closest site's wrong fields).
    """
    found = [s for s in sites if kind is None or s.kind == kind]
    label = f"{kind} sites" if kind else "sites"
    if len(found) != len(expected):
        listing = "".join(f"\n  {s.name} ({s.module_type})" for s in found)
        raise AssertionError(f"expected {len(expected)} {label}, found {len(found)}:{listing}")
    unused = list(found)
    for want in expected:
        scored = [(_mismatches(site, want), i) for i, site in enumerate(unused)]
        bad, i = min(scored, key=lambda pair: len(pair[0]))
        if bad:
            closest = f"closest {unused[i].name} ({unused[i].module_type})"
            raise AssertionError(
                f"no {label[:-1]} matches {dict(want)}; {closest}: " + "; ".join(bad)
            )
        unused.pop(i)
