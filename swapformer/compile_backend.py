"""``torch.compile`` backend: detect and substitute sites in Dynamo's graphs, then hand them to Inductor.

Use ``torch.compile(model, backend="swapformer", options={"target": "sdpa"})`` (registered through the
``torch_dynamo_backends`` entry point) or ``torch.compile(model, backend=swapformer.backend("sdpa"))``,
whose object keeps one :class:`RewriteReport` per compiled graph (``.reports``, ``.explain()``).

Dynamo lifts parameters to graph inputs, so cores can substitute computations but cannot become
trainable parameters of the user's module: the backend serves exact and training-free targets, and
trained targets when given their calibrated core weights (``cores=`` a state dict or a
``cores.safetensors`` path written by :func:`swapformer.save`; a site whose weights are missing there
raises :class:`swapformer.checkpoint.RecipeMismatchError` naming the keys and the file). A learned target
served without ``cores=`` runs uncalibrated cores, which the backend says once in a warning. Sites
inside cores of a model that was already rewritten are left alone.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx as fx

from swapformer.checkpoint import RecipeMismatchError, read_tensors
from swapformer.errors import ConfigError
from swapformer.rewriter import apply as graph_apply
from swapformer.rewriter.capture import Captured, probe
from swapformer.rewriter.detect import detect
from swapformer.rewriter.report import CaptureAttempt, Replacement, RewriteReport, Skip
from swapformer.sites import Site
from swapformer.targets.base import TargetConfig, TargetModule, core_class, resolve_target

log = logging.getLogger(__name__)
REPORTS: collections.deque[RewriteReport] = collections.deque(maxlen=64)  # string-backend reports


class SwapformerBackend:
    """A Dynamo backend object. ``inner`` is the compiler the rewritten graph goes to."""

    def __init__(self, target: str | TargetConfig = "sdpa", *, kinds: tuple[str, ...] = ("attention",),
                 cores: Mapping[str, torch.Tensor] | str | None = None, inner: str = "inductor",
                 **target_options: Any) -> None:
        self.config = resolve_target(target, **target_options)
        self.kinds = tuple(kinds)
        self.cores = _load_cores(cores)
        self.cores_source = cores if isinstance(cores, str) else "the cores= state dict"
        if inner not in ("inductor", "eager"):
            raise ConfigError(f"inner compiler must be 'inductor' or 'eager', got {inner!r}")
        self.inner = inner
        self.reports: list[RewriteReport] = []
        self._warned_uncalibrated = False

    def __call__(self, gm: fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        report = self.rewrite_graph(gm, example_inputs)
        self.reports.append(report)
        REPORTS.append(report)
        if self.inner == "eager":
            return gm.forward
        from torch._inductor.compile_fx import compile_fx

        if not any(True for _ in gm.named_parameters()):
            return compile_fx(gm, example_inputs)
        # Cores brought weights Dynamo never saw: let Dynamo lift them by compiling the spliced module.
        return torch.compile(gm, backend="inductor")

    def rewrite_graph(self, gm: fx.GraphModule, example_inputs: list[Any]) -> RewriteReport:
        """Detect sites in Dynamo's graph and splice cores into it in place."""
        captured = Captured(gm, "dynamo", [CaptureAttempt("dynamo", True)], list(example_inputs),
                            param_names=_lifted_params(gm))
        probe(captured)
        det = detect(captured, self.kinds)
        weights = {name: captured.values[node] for node, name in captured.param_names.items()}
        report = RewriteReport(target=self.config.name, capture="dynamo", attempts=captured.attempts,
                               sites=list(det.sites))
        for site in det.sites:
            reason = self._skip_reason(site, det.matches[site.name])
            if reason:
                report.skipped.append(Skip(site, self.config.name, reason))
                continue
            name = graph_apply.core_attr_name(site.name)
            core = self._build(site, weights)
            # Dynamo's graph already fixed the mode: dropout runs only where the host's did
            core.train(bool(getattr(det.matches[site.name], "dropout_active", False)))
            splice = graph_apply.splice_attention if site.kind == "attention" else graph_apply.splice_ffn
            splice(gm, det.graph, det.matches[site.name], name, core)
            report.replaced.append(Replacement(site, self.config.name, type(core).__name__, name, "graph"))
        graph_apply.finish(gm)
        log.info("swapformer backend: %d replaced, %d skipped", len(report.replaced), len(report.skipped))
        return report

    def _skip_reason(self, site: Site, match: Any) -> str | None:
        anchor = getattr(match, "anchor", None) or getattr(match, "down", None)
        if _inside_core(anchor):
            return "already rewritten (inside a swapformer core)"
        cls = core_class(self.config, site.kind)
        if cls is None:
            return f"target {self.config.name!r} has no {site.kind} replacement"
        return cls.unsupported(site, self.config)

    def _build(self, site: Site, weights: Mapping[str, torch.Tensor]) -> TargetModule:
        core = core_class(self.config, site.kind).from_site(site, self.config, weights)
        if self.cores:
            _restore_core(core, site, self.cores, self.cores_source)
        elif core.new_parameters():
            self._warn_uncalibrated()
        return core

    def _warn_uncalibrated(self) -> None:
        # once per backend: Dynamo may compile many graphs, each with many sites
        if not self._warned_uncalibrated:
            self._warned_uncalibrated = True
            log.warning("swapformer backend: target %r has learned parameters but no cores= were given, "
                        "so its cores are uncalibrated (initial values) and the outputs are not the "
                        "model's; pass cores='<dir>/cores.safetensors' from swapformer.save",
                        self.config.name)

    def explain(self) -> str:
        return "\n\n".join(f"graph {i}:\n{r}" for i, r in enumerate(self.reports))


def backend(target: str | TargetConfig = "sdpa", **options: Any) -> SwapformerBackend:
    """A backend object for ``torch.compile(model, backend=swapformer.backend("sdpa"))``."""
    return SwapformerBackend(target, **options)


def swapformer_backend(gm: fx.GraphModule, example_inputs: list[Any], options: dict | None = None) -> Callable:
    """The ``backend="swapformer"`` entry point; ``options`` are :class:`SwapformerBackend` arguments."""
    return SwapformerBackend(**(options or {}))(gm, example_inputs)


def _lifted_params(gm: fx.GraphModule) -> dict[str, str]:
    """Placeholder name -> FQN for the parameters and buffers Dynamo lifted to graph inputs."""
    from swapformer.patterns.attention import module_path

    out = {}
    for node in gm.graph.nodes:
        arg = node.meta.get("grapharg")
        source = getattr(getattr(arg, "source", None), "name", "")
        source = source() if callable(source) else source
        if node.op == "placeholder" and ("_parameters[" in source or "_buffers[" in source):
            path = source.replace("._parameters", "").replace("._buffers", "")
            out[node.name] = module_path(path)
    return out


def _inside_core(node: fx.Node | None) -> bool:
    stack = node.meta.get("nn_module_stack", {}) if node is not None else {}
    return any(isinstance(cls, type) and issubclass(cls, TargetModule) for _, cls in stack.values())


def _load_cores(cores: Mapping[str, torch.Tensor] | str | None) -> dict[str, torch.Tensor]:
    if cores is None:
        return {}
    if isinstance(cores, str):
        return read_tensors(cores)
    return dict(cores)


def _restore_core(core: TargetModule, site: Site, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load the calibrated weights of ``site`` from ``state`` into ``core``.

    Raises:
        RecipeMismatchError: ``source`` holds no weights for the site, or not all of the core's
            (the missing and unexpected keys are named).
    """
    prefixes = [f"{site.module}.swapformer_core.", f"{site.module}.core.",
                graph_apply.core_attr_name(site.name) + "."]
    for prefix in prefixes:
        own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if own:
            _load_exactly(core, own, f"{source}, site {site.name!r}, prefix {prefix!r}")
            return
    raise RecipeMismatchError(f"{source} has no calibrated weights for site {site.name!r} "
                              f"(looked for keys starting with {prefixes})")


def _load_exactly(core: TargetModule, own: Mapping[str, torch.Tensor], where: str) -> None:
    expected = set(core.state_dict())
    missing, unexpected = sorted(expected - set(own)), sorted(set(own) - expected)
    if missing or unexpected:
        raise RecipeMismatchError(f"{where}: missing core weights {missing}, unexpected {unexpected}")
    try:
        core.load_state_dict(own, strict=True)
    except RuntimeError as e:  # shapes that do not fit
        raise RecipeMismatchError(f"{where}: the saved weights do not fit the core: {e}") from e
