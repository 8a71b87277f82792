"""The public verbs: ``find_sites``, ``explain`` and ``rewrite``.

Pipeline: capture (graph of the model on example inputs) → match (detectors → sites) → plan (which
target core serves which site, or why not) → apply (splice into the graph, or swap cores inside a
Hugging Face model) → verify (the rewritten model runs; for exact targets, matches the original).
All checks run before anything is built, and the user's model is never modified.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from swapformer.errors import ConfigError, InputError
from swapformer.patterns.attention import SINK_NOTE
from swapformer.rewriter import apply as graph_apply
from swapformer.rewriter import hf, hf_cache
from swapformer.rewriter.capture import Captured, capture, check_inputs, normalize_inputs, probe
from swapformer.rewriter.detect import Detection, detect
from swapformer.rewriter.plan import KEPT, Plan
from swapformer.rewriter.report import Replacement, RewriteReport, Skip
from swapformer.sites import Site
from swapformer.targets.base import TargetConfig, TargetModule, core_class, resolve_target

log = logging.getLogger(__name__)
KINDS = ("attention", "ffn")
# Every verb defaults to attention sites only (as the CLI, the compile backend and the zoo do):
# replacing FFNs changes much more of a model and is asked for explicitly.
DEFAULT_KINDS: tuple[str, ...] = ("attention",)
DEFAULT_SEED = 0
SiteFilter = Callable[[Site], bool]
# what ``target=`` takes: a registry or planner name, a config, a plan, or {site: target}
Target = str | TargetConfig | Plan | Mapping[str, str | TargetConfig | None]


@dataclass
class Analysis:
    """A model captured and matched once, ready to be rewritten to several targets.

    Capture is the slow step (seconds to a minute for a real LLM on CPU); :func:`prepare` does it once
    and :meth:`rewrite` / :meth:`explain` reuse it.
    """

    model: nn.Module
    captured: Captured
    detection: Detection
    reference: Any  # the original model's output on the example inputs
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] | None = None

    @property
    def sites(self) -> list[Site]:
        return self.detection.sites

    def explain(self, target: Target, *, filter_fn: SiteFilter | None = None,
                **target_options: Any) -> RewriteReport:
        spec = _choose(self, _resolve(target, target_options), filter_fn)
        report = _plan(self, spec, self.model, filter_fn)
        report.dry_run = True
        return report

    def rewrite(self, target: Target, *, filter_fn: SiteFilter | None = None,
                verify: bool = True, seed: int = DEFAULT_SEED, **target_options: Any) -> nn.Module:
        spec = _choose(self, _resolve(target, target_options), filter_fn)
        return _rewrite(self, spec, filter_fn, verify, seed)


@dataclass(frozen=True)
class Planner:
    """A target name that chooses a plan per model: ``check`` turns the options into the planner's
    (before the capture), ``plan(analysis, checked, filter_fn)`` makes the plan."""

    check: Callable[[dict[str, Any]], Any]
    plan: Callable[[Analysis, Any, SiteFilter | None], Plan]


# planners by target name; swapformer.planner registers "auto" (the rewriter does not import it)
PLANNERS: dict[str, Planner] = {}


@dataclass(frozen=True)
class _Planned:
    planner: Planner
    options: Any


def register_planner(name: str, planner: Planner) -> None:
    """Make ``target=name`` ask ``planner`` for a plan."""
    PLANNERS[name] = planner


def _resolve(target: Target, options: dict[str, Any]) -> TargetConfig | Plan | _Planned:
    """Check ``target`` and its options before the (slow) capture.

    Raises:
        UnknownTargetError, ConfigError: a bad target, option or budget. InputError: a bad plan.
    """
    if isinstance(target, str) and target in PLANNERS:
        return _Planned(PLANNERS[target], PLANNERS[target].check(options))
    if isinstance(target, (Plan, Mapping)):
        if options:
            raise ConfigError(f"target options {sorted(options)} go into the plan's target configs, "
                              "not next to a plan")
        return target if isinstance(target, Plan) else Plan.of(target)
    return resolve_target(target, **options)


def _choose(analysis: Analysis, spec: TargetConfig | Plan | _Planned,
            filter_fn: SiteFilter | None) -> TargetConfig | Plan:
    """The config or plan to apply: a planner's plan for a planner's name (``"auto"``)."""
    if isinstance(spec, _Planned):
        return spec.planner.plan(analysis, spec.options, filter_fn)
    return spec


def _check_kinds(kinds: tuple[str, ...]) -> tuple[str, ...]:
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise InputError(f"unknown site kind(s) {bad}; kinds are {list(KINDS)}")
    return kinds


def default_example_inputs(model: nn.Module) -> Any:
    """Small random inputs for a Hugging Face model, from its config."""
    config = getattr(model, "config", None)
    if config is None or not hf.is_hf_model(model):
        raise InputError("example_inputs are required for models that are not Hugging Face models")
    gen = torch.Generator().manual_seed(0)
    if getattr(config, "vocab_size", None):
        ids = torch.randint(0, config.vocab_size, (2, 16), generator=gen)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if getattr(config, "is_encoder_decoder", False):
            inputs["decoder_input_ids"] = ids[:, :8]
        return inputs
    if getattr(config, "image_size", None):
        size = config.image_size
        return {"pixel_values": torch.randn(2, getattr(config, "num_channels", 3), size, size, generator=gen)}
    raise InputError(f"cannot build example inputs for {type(model).__name__}; pass example_inputs")


def prepare(model: nn.Module, example_inputs: Any = None, *,
            kinds: tuple[str, ...] = DEFAULT_KINDS) -> Analysis:
    """Capture and match ``model`` once; rewrite the result to any number of targets.

    Args and Raises: as :func:`find_sites` (``kinds`` defaults to attention sites only).
    """
    return analyze(model, example_inputs, kinds)


@contextlib.contextmanager
def own_rng(seed: int) -> Iterator[None]:
    """Run a block on forked RNG state seeded with ``seed``: the caller's global generators are
    exactly as before afterwards, and the block draws the same numbers on every call."""
    # Only CUDA devices already in use are forked and seeded: torch.manual_seed would queue a
    # seeding of an uninitialised CUDA that runs later, outside the fork, on the caller's state.
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        for device in devices:
            torch.cuda.default_generators[device].manual_seed(seed)
        yield


def analyze(model: nn.Module, example_inputs: Any, kinds: tuple[str, ...]) -> Analysis:
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if example_inputs is None:
        example_inputs = default_example_inputs(model)
    args, kwargs = normalize_inputs(example_inputs)
    # a model in training mode draws dropout masks while it is run and captured
    with own_rng(DEFAULT_SEED):
        try:
            captured = capture(model, args, kwargs)
            # the graph's own output on the example inputs is the original's reference output
            reference = probe(captured)
        except Exception:
            # bad example inputs surface here as an InputError naming them; otherwise the
            # capture's own error stands (one model run is saved when all is well)
            check_inputs(model, args, kwargs)
            raise
    return Analysis(model, captured, detect(captured, _check_kinds(kinds)), reference, args, kwargs)


def find_sites(model: nn.Module, example_inputs: Any = None, *,
               kinds: tuple[str, ...] = DEFAULT_KINDS) -> list[Site]:
    """Detect the sites of ``model`` (attention sites unless ``kinds`` says otherwise).

    Args:
        model: any ``nn.Module`` (plain, nanoGPT/timm style, torch.nn built-ins, HF transformers v5).
        example_inputs: a tensor, a tuple of positional args, or a dict of kwargs the model runs on;
            optional for Hugging Face models.
        kinds: which site kinds to look for; default ``("attention",)`` as in every verb, pass
            ``("attention", "ffn")`` for FFN sites too.

    Returns:
        The sites in graph order, each with a stable name ``"<module>:<index>"``.

    Raises:
        InputError: the model does not run on the example inputs.
        CaptureError: no capture strategy worked (every attempt is named).
    """
    return analyze(model, example_inputs, kinds).detection.sites


def explain(model: nn.Module, target: Target, example_inputs: Any = None, *,
            kinds: tuple[str, ...] = DEFAULT_KINDS, filter_fn: SiteFilter | None = None,
            **target_options: Any) -> RewriteReport:
    """Dry run of :func:`rewrite`: every site, what would replace it, what would be skipped and why.

    Arguments as :func:`rewrite` (``kinds`` defaults to attention sites only). With ``"auto"`` the
    planner measures its candidates and the report lists each site's choice with its cost and
    quality numbers; nothing is trained.
    """
    spec = _resolve(target, target_options)
    analysis = analyze(model, example_inputs, kinds)
    report = _plan(analysis, _choose(analysis, spec, filter_fn), model, filter_fn)
    report.dry_run = True
    return report


def rewrite(model: nn.Module, target: Target, *, example_inputs: Any = None,
            kinds: tuple[str, ...] = DEFAULT_KINDS, filter_fn: SiteFilter | None = None,
            verify: bool = True, seed: int = DEFAULT_SEED, **target_options: Any) -> nn.Module:
    """Return a copy of ``model`` whose detected sites run ``target``'s implementation.

    Args:
        model: the model to convert; it is not modified.
        target: a registry name (``"sdpa"``, ``"window"``, ``"fastweight"``, ...), a target config,
            a :class:`~swapformer.Plan` (or a ``{site or module name: target}`` dict) choosing per
            site, or ``"auto"``: the planner chooses per site under ``budget=`` (see
            :func:`swapformer.planner.auto_plan` for its options).
        example_inputs: inputs to capture the graph with (optional for Hugging Face models).
        kinds: site kinds to replace: ``"attention"``, ``"ffn"``; default ``("attention",)``.
        filter_fn: ``filter_fn(site) -> bool`` selects which sites to replace.
        verify: run the result once; for the exact ``"sdpa"`` target also compare with the original.
        seed: seeds the initial values of the cores' new parameters. The rewrite runs on its own
            forked RNG state, so the same call gives the same model and the caller's global RNG
            state is left exactly as it was.
        target_options: options of the target's config (``window=64``, ``chunk_size=16``, ...);
            for ``"auto"`` the planner's (``budget=``, ``calibration_data=``, ...).

    Returns:
        For Hugging Face models, the same model class with attention cores swapped; otherwise a
        ``torch.fx.GraphModule``. Its ``swapformer_report`` attribute holds the :class:`RewriteReport`.

    Raises:
        UnknownTargetError, ConfigError: bad target, options or budget. InputError: a plan names
            sites the model does not have; else see find_sites. CaptureError: see find_sites.
        VerificationError: an exact target does not reproduce the original.
    """
    spec = _resolve(target, target_options)
    analysis = analyze(model, example_inputs, kinds)
    return _rewrite(analysis, _choose(analysis, spec, filter_fn), filter_fn, verify, seed)


def _rewrite(analysis: Analysis, spec: TargetConfig | Plan, filter_fn: SiteFilter | None, verify: bool,
             seed: int) -> nn.Module:
    with own_rng(seed):
        return _rewrite_seeded(analysis, spec, filter_fn, verify)


def _rewrite_seeded(analysis: Analysis, spec: TargetConfig | Plan, filter_fn: SiteFilter | None,
                    verify: bool) -> nn.Module:
    report = _plan(analysis, spec, analysis.model, filter_fn)
    weights = _weights(analysis.model)
    rewritten = _build_model(analysis, report, weights)
    rewritten.swapformer_report = report
    if verify:
        from swapformer.rewriter.verify import verify_rewrite

        def rebuild(replaced: list[Replacement]) -> nn.Module:
            # the same rewrite with only some sites replaced, to find which site fails verification
            return _build_model(analysis, dataclasses.replace(report, replaced=replaced), weights)

        verify_rewrite(rewritten, analysis, report, _verified_config(spec), rebuild)
    return rewritten


def _verified_config(spec: TargetConfig | Plan) -> TargetConfig:
    """What verification holds a rewrite to: a plan is exact only when all its targets are."""
    if isinstance(spec, TargetConfig):
        return spec
    return spec.representative() or resolve_target("sdpa")  # nothing replaced: must equal the original


def _build_model(analysis: Analysis, report: RewriteReport, weights: dict[str, torch.Tensor]) -> nn.Module:
    model = analysis.model
    if hf.is_hf_model(model):
        rewritten = _apply_hf(model, analysis, report, weights)
    else:
        rewritten = _apply_graph(analysis, report, weights)
    rewritten.train(model.training)  # new cores start in training mode; follow the user's model
    return rewritten


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_buffers()), **dict(model.named_parameters())}


def _plan(analysis: Analysis, spec: TargetConfig | Plan, model: nn.Module,
          filter_fn: SiteFilter | None) -> RewriteReport:
    det = analysis.detection
    plan = spec if isinstance(spec, Plan) else None
    if plan is not None:
        plan.check_names([*det.sites, *det.refused])
    label = plan.label if plan is not None else spec.name
    report = RewriteReport(target=label, capture=analysis.captured.strategy,
                           attempts=analysis.captured.attempts, sites=list(det.sites), plan=plan)
    is_hf = hf.is_hf_model(model)
    claimed: set[str] = set()
    for site in det.sites:
        config, why = _site_target(site, spec, filter_fn)
        reason = why if config is None else _skip_reason(site, config, is_hf, claimed, model)
        if reason:
            report.skipped.append(Skip(site, label, reason))
            continue
        claimed.add(site.module)
        cls = core_class(config, site.kind)
        where = _core_location(site, is_hf)
        report.replaced.append(Replacement(site, config.name, cls.__name__, where, "module" if is_hf else "graph",
                                           config, why))
    for site in det.refused:  # attention detection could not describe exactly
        report.sites.append(site)
        report.skipped.append(Skip(site, label, f"refused: {site.refused}"))
    return report


def _site_target(site: Site, spec: TargetConfig | Plan,
                 filter_fn: SiteFilter | None) -> tuple[TargetConfig | None, str]:
    """The site's target config and the plan's reason; no config: why the site is skipped."""
    if filter_fn is not None and not filter_fn(site):
        return None, "excluded by filter_fn"
    if isinstance(spec, TargetConfig):
        return spec, ""
    choice = spec.choice_for(site)
    if choice is None or choice.target is None:
        return None, KEPT + (f": {choice.reason}" if choice is not None and choice.reason else "")
    return choice.target, choice.reason


def _skip_reason(site: Site, config: TargetConfig, is_hf: bool, claimed: set[str],
                 model: nn.Module) -> str | None:
    cls = core_class(config, site.kind)
    if cls is None:
        return f"target {config.name!r} has no {site.kind} replacement"
    if site.kind == "attention" and SINK_NOTE in site.notes and (is_hf or not config.exact):
        return ("sink logits: only the exact target computes them (one more key with zero value), "
                "and only in a captured graph (transformers passes them to the attention function "
                "as s_aux, which the cores do not take)")
    reason = cls.unsupported(site, config)
    if reason:
        return reason
    if is_hf:
        return hf_placement_problem(site, claimed, model) or _hf_state_problem(site, cls, model)
    return None


def _hf_state_problem(site: Site, cls: type[TargetModule], model: nn.Module) -> str | None:
    """A core with decoding state lives in the model's cache, one layer per decoder attention."""
    if site.kind != "attention" or not getattr(cls, "stateful", False):
        return None
    if getattr(model.config, "is_encoder_decoder", False):
        return "targets with a decoding state are not supported in encoder-decoder models"
    if not isinstance(getattr(model.get_submodule(site.module), "layer_idx", None), int):
        return "the attention module has no layer_idx to find its cache layer"
    return None


def hf_placement_problem(site: Site, claimed: set[str], model: nn.Module) -> str | None:
    if site.module in claimed:
        return f"module {site.module!r} already holds another replaced site"
    if not site.module:
        return "site is not inside a submodule"
    module = model.get_submodule(site.module)
    if site.kind == "attention" and not hasattr(module, "config"):
        return f"{type(module).__name__} does not route attention through transformers' AttentionInterface"
    if site.kind == "ffn":
        own = {f"{site.module}.{n}" for n, _ in module.named_parameters()}
        refs = [site.up_proj, site.gate_proj, site.down_proj]
        mine = {name for r in refs if r is not None for name in (r.weight, r.bias) if name}
        if own != mine:
            return f"the FFN is not a whole module ({type(module).__name__} holds other weights)"
    return None


def _core_location(site: Site, is_hf: bool) -> str:
    if not is_hf:
        return graph_apply.core_attr_name(site.name)
    return f"{site.module}.swapformer_core" if site.kind == "attention" else f"{site.module}.core"


def _build_core(site: Site, config: TargetConfig, weights: dict[str, torch.Tensor]) -> TargetModule:
    core = core_class(config, site.kind).from_site(site, config, weights)
    host = _host_weight(site, weights)
    if host is not None:  # new parameters live where the host's do, in its dtype
        core = core.to(device=host.device, dtype=host.dtype)
    return core


def _host_weight(site: Site, weights: dict[str, torch.Tensor]) -> torch.Tensor | None:
    refs = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj", "down_proj")
    for name in refs:
        ref = getattr(site, name, None)
        if ref is not None and ref.weight in weights and weights[ref.weight].is_floating_point():
            return weights[ref.weight]
    return None


def _apply_graph(analysis: Analysis, report: RewriteReport, weights: dict[str, torch.Tensor]) -> nn.Module:
    captured, det = analysis.captured, analysis.detection
    gm = captured.gm
    # The captured module shares parameters with the user's model: splice into a copy.
    memo: dict[int, Any] = {}
    new_gm = copy.deepcopy(gm, memo)
    remap = {n: m for n, m in zip(gm.graph.nodes, new_gm.graph.nodes)}
    for rep in report.replaced:
        match = copy.copy(det.matches[rep.site.name])
        _remap_match(match, remap)
        core = _build_core(rep.site, rep.config, weights)
        if rep.site.kind == "attention":
            graph_apply.splice_attention(new_gm, det.graph, match, rep.core_name, core)
        else:
            graph_apply.splice_ffn(new_gm, det.graph, match, rep.core_name, core)
    return graph_apply.finish(graph_apply.follow_training_mode(new_gm))


def _remap_match(match: Any, remap: dict) -> None:
    """Point a match (read on the original graph) at the copy's nodes; values are read by name."""
    for key, value in vars(match).items():
        if isinstance(value, torch.fx.Node):
            setattr(match, key, remap[value])
        elif isinstance(value, list) and value and isinstance(value[0], torch.fx.Node):
            setattr(match, key, [remap[n] for n in value])
    if hasattr(match, "steps"):
        match.steps = [copy.copy(s) for s in match.steps]
        for s in match.steps:
            if s.node is not None:
                s.node = remap[s.node]


def _apply_hf(model: nn.Module, analysis: Analysis, report: RewriteReport,
              weights: dict[str, torch.Tensor]) -> nn.Module:
    new = copy.deepcopy(model)
    attention = [r for r in report.replaced if r.site.kind == "attention"]
    shared: dict = {}  # the model-wide call context: the cache in use and the 2-D padding mask
    for rep in report.replaced:
        core = _build_core(rep.site, rep.config, weights)
        if rep.site.kind == "attention":
            hf.attach_attention_core(new.get_submodule(rep.site.module), core, rep.site.scale, shared)
        else:
            hf.replace_module(new, rep.site.module, hf.FFNSwap(core))
    if attention:
        hf.set_implementation(new)
    if report.replaced:  # FFN cores read the call's token positions from the call context too
        hf_cache.install(new, shared)
    return new
