"""Stage 1, attention transfer: each replacement core learns to reproduce the exact computation it
replaced, on the very inputs it receives inside the model.

Design (LoLCATs' attention transfer, with the host computation as the reference, so no teacher
forward is needed): a pre-hook on every core in ``student.swapformer_report.replaced`` detaches the
core's inputs, so the loss of one site never reaches another site's parameters and all sites train
independently and in parallel. A forward hook then computes the reference output of the same inputs
without gradients and records ``MSE(core output, reference)``:

* attention site: the exact softmax attention of the site, an
  :class:`~swapformer.targets.sdpa.SdpaAttention` built from ``replacement.site`` and called with
  the core's ``(q, k, v, bias)``;
* FFN site: the host FFN, rebuilt from the site's up / gate / down projections with the teacher's
  weights (the student's own copies of those parameters when no teacher is given).

The hook returns the *reference* as the core's output, so every later layer sees exactly the
activations of the original model (as LoLCATs does: the student layers are fitted to the teacher's
hidden states, not to the drift of earlier approximations). Host parameters are frozen, so nothing
outside the cores builds an autograd graph; once the last site has run the forward pass is
abandoned (``early_exit``), which skips the LM head. All sites are fitted in this ONE forward pass:
its cost is one no-grad forward of the host plus each core's own small forward and backward.

With ``shift = (delta, inv_freq)`` set for a forward pass, the pre-hook also rotates the ``q`` and ``k``
of every RoPE site on by ``delta`` positions (:func:`rope_shift`): a score sees ``q·k`` rotated alike, so
the reference (the target) is unchanged while the core's learned maps of post-RoPE ``q, k`` see the
angles of positions past the training rows' length (``Stage.rope_shift``; RESULTS.md, session 13).

``normalize`` divides each site's MSE by the variance of its reference output (per sequence), so that
layers whose outputs differ in scale by orders of magnitude (LoLCATs reports ~200x) weigh the same. With
``init_cores``, a core that has ``init_from_inputs`` (the hybrid cores: closed-form far-memory mix)
is initialised from its inputs of the first forward pass, before its output is computed.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from swapformer.errors import ConfigError, InputError
from swapformer.rewriter.report import Replacement
from swapformer.sites import AttentionSite, FFNSite, ProjectionRef
from swapformer.targets.reference import ACTIVATIONS
from swapformer.targets.sdpa import SdpaAttention, SdpaConfig

Reference = Callable[..., torch.Tensor]


class _AllSitesDone(Exception):
    """Raised by the last hook of a forward pass to skip the rest of the model."""


def attention_reference(site: AttentionSite) -> Reference:
    """The exact softmax attention of ``site`` (eval mode: no dropout)."""
    sdpa = SdpaAttention.from_site(site, SdpaConfig(), {}).eval()

    def ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None,
            **_: Any) -> torch.Tensor:
        return sdpa(q, k, v, bias)

    return ref


def ffn_reference(site: FFNSite, lookup: Callable[[str], torch.Tensor]) -> Reference:
    """The host FFN of ``site``, ``down(act(gate(x)) * up(x))`` or ``down(act(up(x)))``, with
    weights fetched by name through ``lookup``.

    Raises:
        InputError: the site lacks its projections or has an activation without a known form.
    """
    if site.up_proj is None or site.down_proj is None:
        raise InputError(f"FFN site {site.name} has no up/down projections to rebuild it from")
    if site.activation not in ACTIVATIONS:
        raise InputError(f"FFN site {site.name}: no reference for activation {site.activation!r}")
    act = ACTIVATIONS[site.activation]
    up = _projection(site.up_proj, lookup)
    down = _projection(site.down_proj, lookup)
    gate = _projection(site.gate_proj, lookup) if site.gated and site.gate_proj else None

    def ref(x: torch.Tensor, *_: Any, **__: Any) -> torch.Tensor:
        h = act(gate(x)) * up(x) if gate is not None else act(up(x))
        return down(h)

    return ref


def _projection(ref: ProjectionRef, lookup: Callable[[str], torch.Tensor]) -> Callable:
    w = lookup(ref.weight).detach()
    if ref.transposed:
        w = w.t()
    b = lookup(ref.bias).detach() if ref.bias else None
    if ref.rows is not None:
        w = w[ref.rows[0] : ref.rows[1]]
        b = b[ref.rows[0] : ref.rows[1]] if b is not None else None
    return lambda x: F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))


def parameter_lookup(*models: nn.Module | None) -> Callable[[str], torch.Tensor]:
    """Find a parameter by qualified name in the first model that has it."""

    def lookup(name: str) -> torch.Tensor:
        for m in models:
            if m is None:
                continue
            try:
                return m.get_parameter(name)
            except AttributeError:
                continue
        raise InputError(f"no parameter {name!r} in the teacher or the student to rebuild the FFN from")

    return lookup


def _detach(x: Any) -> Any:
    return x.detach() if isinstance(x, torch.Tensor) else x


def rope_shift(x: torch.Tensor, delta: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """``x [..., T, D]`` (post-RoPE, Hugging Face's rotate-half layout) rotated on by ``delta`` more
    positions: what the same token would give at ``p + delta``. Rotations compose and a score only
    sees ``q·k`` rotated alike, so attention over shifted ``q`` and ``k`` is unchanged."""
    if 2 * inv_freq.numel() != x.shape[-1]:
        raise ConfigError(f"rope_shift rotates the whole head: {inv_freq.numel()} RoPE frequencies for a head "
                          f"dim of {x.shape[-1]} (partial rotary embeddings are not supported)")
    angle = delta * inv_freq.to(torch.float64)
    cos = torch.cat([angle.cos(), angle.cos()]).to(x.device, x.dtype)
    sin = torch.cat([angle.sin(), angle.sin()]).to(x.device, x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def shift_qk(args: tuple, delta: int, inv_freq: torch.Tensor) -> tuple:
    """A core's positional ``(q, k, ...)`` with ``q`` and ``k`` rotated on by ``delta`` positions."""
    return (rope_shift(args[0], delta, inv_freq), rope_shift(args[1], delta, inv_freq), *args[2:])


def rope_frequencies(model: nn.Module) -> torch.Tensor:
    """The one RoPE frequency vector of a model (the ``inv_freq`` buffer of its rotary embedding, as in
    Hugging Face models); a clear error where there is none or several differ."""
    found = [b for name, b in model.named_buffers() if name.rsplit(".", 1)[-1] == "inv_freq"]
    if not found:
        raise ConfigError("rope_shift needs the model's RoPE frequencies: no 'inv_freq' buffer found")
    if any(f.shape != found[0].shape or not torch.equal(f, found[0]) for f in found[1:]):
        raise ConfigError("rope_shift needs one RoPE frequency vector; the model's 'inv_freq' buffers differ")
    return found[0].detach().float()


@contextlib.contextmanager
def compiled_cores(cores: list[nn.Module]) -> Iterator[None]:
    """Inside: each of ``cores`` runs its ``forward`` through one ``torch.compile``'d function of its
    class, bound to it, so one graph serves every core of a class (compiling each module would compile
    the hooks too, whose per-layer site names recompile past dynamo's limit). After: the eager
    ``forward`` is back (the instance attribute removed), also on error."""
    shared: dict[type, Callable] = {}
    bound = []
    try:
        for core in cores:
            if "forward" in vars(core):
                raise ConfigError(f"{type(core).__name__} already has its own forward attribute; not compiling it")
            cls = type(core)
            if cls not in shared:
                shared[cls] = torch.compile(cls.forward, dynamic=False)
            core.forward = functools.partial(shared[cls], core)
            bound.append(core)
        yield
    finally:
        for core in bound:
            del core.forward


class TransferHooks:
    """Context manager: hooks every replaced core for attention transfer.

    After a forward pass of the student (inside ``with hooks:``), ``hooks.losses`` maps each site
    name to its MSE (with grad); :meth:`run` wraps a forward pass and handles the early exit.
    """

    def __init__(self, student: nn.Module, replaced: list[Replacement], teacher: nn.Module | None,
                 *, early_exit: bool = True, normalize: bool = False, init_cores: bool = False) -> None:
        self.student = student
        self.early_exit = early_exit
        self.normalize = normalize
        self.pending_init = {r.site.name for r in replaced} if init_cores else set()
        self.losses: dict[str, torch.Tensor] = {}
        self.shift: tuple[int, torch.Tensor] | None = None  # (delta, inv_freq) for the next forward pass
        lookup = parameter_lookup(teacher, student)
        self._sites = [(r.site.name, student.get_submodule(r.core_name), _reference(r, lookup))
                       for r in replaced]
        self._rope = {r.site.name: isinstance(r.site, AttentionSite) and r.site.rope for r in replaced}
        self._handles: list[Any] = []

    def __enter__(self) -> TransferHooks:
        for name, core, ref in self._sites:
            self._handles.append(core.register_forward_pre_hook(self._make_inputs(name), with_kwargs=True))
            if name in self.pending_init and hasattr(core, "init_from_inputs"):
                self._handles.append(core.register_forward_pre_hook(self._make_init(name), with_kwargs=True))
            self._handles.append(core.register_forward_hook(self._make_hook(name, ref), with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _make_inputs(self, name: str) -> Callable:
        rope = self._rope[name]

        def inputs(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            args, kwargs = _detach_inputs(module, args, kwargs)
            if self.shift is not None and rope and self.shift[0]:
                args = shift_qk(args, *self.shift)
            return args, kwargs

        return inputs

    def _make_init(self, name: str) -> Callable:
        def init(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if name in self.pending_init:
                self.pending_init.discard(name)
                module.init_from_inputs(*args, **{k: v for k, v in kwargs.items() if k == "hidden"})

        return init

    def _make_hook(self, name: str, ref: Reference) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> torch.Tensor:
            if not isinstance(output, torch.Tensor):
                raise InputError(f"core of site {name} returned {type(output).__name__}, not a tensor")
            with torch.no_grad():
                target = ref(*args, **kwargs).to(output.dtype)
            self.losses[name] = _site_loss(output.float(), target.float(), self.normalize)
            if self.early_exit and len(self.losses) == len(self._sites):
                raise _AllSitesDone
            return target

        return hook

    def run(self, forward: Callable[[], Any]) -> dict[str, torch.Tensor]:
        """Run ``forward()`` and return the per-site losses it produced."""
        self.losses = {}
        try:
            forward()
        except _AllSitesDone:
            pass
        if not self.losses:
            raise InputError("the forward pass ran none of the replaced cores")
        return self.losses


def _site_loss(output: torch.Tensor, target: torch.Tensor, normalize: bool) -> torch.Tensor:
    """MSE, or the mean over sequences of each sequence's MSE over its reference variance.

    Per sequence (not per batch) so that data-parallel ranks, which average their losses, compute
    exactly the loss of the single-process run on the whole batch.
    """
    if not normalize:
        return F.mse_loss(output, target)
    err = (output - target).square().flatten(1).mean(1)
    return (err / target.flatten(1).var(1).clamp_min(1e-12)).mean()


def _detach_inputs(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return tuple(_detach(a) for a in args), {k: _detach(v) for k, v in kwargs.items()}


def _reference(r: Replacement, lookup: Callable[[str], torch.Tensor]) -> Reference:
    if isinstance(r.site, AttentionSite):
        return attention_reference(r.site)
    if isinstance(r.site, FFNSite):
        return ffn_reference(r.site, lookup)
    raise InputError(f"site {r.site.name} of kind {r.site.kind!r} has no transfer reference")
