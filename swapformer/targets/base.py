"""What every replacement implements, and the registry that maps ``target=`` names to them.

A target replaces the *core* of a site, not the host's projections:

* attention core: ``forward(q, k, v, bias=None, *, hidden=None) -> out`` with
  ``q: [B, H, Tq, D]``, ``k, v: [B, Hkv, Tk, D]`` (after RoPE / norms, before any GQA repeat),
  ``bias``: the host's full additive mask broadcastable to ``[B, H, Tq, Tk]`` (``-inf`` where masked;
  it already contains the causal part) or ``None`` when the site is unmasked or purely causal
  (``site.causal`` then says which), ``hidden: [B, Tq, d_model]`` the input of the attention block
  for targets whose gates read the token (may be ``None``); returns ``[B, H, Tq, Dv]``.
* FFN core: ``forward(x) -> y`` replacing ``down(act(up(x)))`` on ``x: [..., d_model]``.

Each target class is registered with :func:`register_target` under its ``target=`` name for one or
both site kinds. It declares its options as a frozen dataclass config and implements two class
methods: ``unsupported(site, config) -> str | None`` (the reason it cannot serve a site, checked before
anything is built) and ``from_site(site, config, weights) -> nn.Module`` where ``weights`` maps the
host's parameter names to tensors (copy them; never share storage with the host).
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal, Union

import torch
from torch import nn

from swapformer.errors import ConfigError, UnknownTargetError
from swapformer.sites import ProjectionRef, Site


@dataclasses.dataclass(frozen=True, kw_only=True)
class TargetConfig:
    """Base class of target options. ``name`` is the registry key of the target."""

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = False  # the rewrite must reproduce the host to float tolerance
    version: int = 1

    def __post_init__(self) -> None:
        """Check every field against its annotation; subclasses call this before their own checks.

        ``int`` fields take ints but not bools, ``float`` fields take ints (stored as floats),
        ``Literal`` fields take one of their values, unions take any member.

        Raises:
            ConfigError: naming the option, the type it must have and the value given.
        """
        hints = _field_hints(type(self))
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            hint = hints[field.name]
            if not _matches(value, hint):
                raise ConfigError(f"{self.name or type(self).__name__} option {field.name!r} must be "
                                  f"{_describe_type(hint)}, got {value!r} ({type(value).__name__})")
            if _accepts_float_only(hint) and isinstance(value, int):
                # frozen: store the int given for a float option as the float it stands for
                object.__setattr__(self, field.name, float(value))

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.name, **dataclasses.asdict(self)}


@functools.cache
def _field_hints(cls: type) -> dict[str, Any]:
    # the target modules use `from __future__ import annotations`: resolve the strings once per class
    return typing.get_type_hints(cls)


def _union_args(hint: Any) -> tuple[Any, ...] | None:
    origin = typing.get_origin(hint)
    return typing.get_args(hint) if origin is Union or origin is types.UnionType else None


def _matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits the annotation ``hint`` (the forms target configs use)."""
    if hint is Any:
        return True
    if hint is None or hint is type(None):
        return value is None
    members = _union_args(hint)
    if members is not None:
        return any(_matches(value, m) for m in members)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin in (tuple, list):
        if not isinstance(value, origin):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
        return not args or all(_matches(v, args[0]) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(origin or hint, type):
        return isinstance(value, origin or hint)
    raise TypeError(f"TargetConfig cannot check fields annotated {hint!r}; use the forms _matches knows")


def _accepts_float_only(hint: Any) -> bool:
    members = _union_args(hint) or (hint,)
    return float in members and int not in members


def _describe_type(hint: Any) -> str:
    members = _union_args(hint)
    if members is not None:
        return " or ".join(_describe_type(m) for m in members)
    if hint is type(None):
        return "None"
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if hint is float:
        return "a number"
    if hint in (int, bool, str):
        return f"{'an' if hint is int else 'a'} {hint.__name__}"
    return repr(hint)


class TargetModule(nn.Module):
    """Base class of replacement cores (see the module docstring for the calling conventions)."""

    target_name: ClassVar[str] = ""
    site_kind: ClassVar[str] = "attention"
    # a stateful core keeps a decoding ``state`` dict (batch-first tensors) that the HF cache holds
    stateful: ClassVar[bool] = False

    @classmethod
    def unsupported(cls, site: Site, config: TargetConfig) -> str | None:
        return None

    @classmethod
    def from_site(
        cls, site: Site, config: TargetConfig, weights: Mapping[str, torch.Tensor]
    ) -> TargetModule:
        raise NotImplementedError(f"{cls.__name__} cannot be built from a site")

    def new_parameters(self) -> list[nn.Parameter]:
        """Parameters that did not exist in the host (what calibration stage 1 trains)."""
        return list(self.parameters())

    def parameter_count(self) -> int:
        """Parameters the core holds (host copies included)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, context_len: int = 0) -> int | None:
        """Core FLOPs for one token with ``context_len`` tokens of context; None: not counted."""
        return None

    def state_bytes(self, context_len: int = 0) -> int | None:
        """Bytes of decoding state per sequence after ``context_len`` tokens (what a cache layer holds
        for this core); None: not counted (exact cores leave the host's KV cache in place)."""
        return None


_REGISTRY: dict[tuple[str, str], type[TargetModule]] = {}
_CONFIGS: dict[str, type[TargetConfig]] = {}


def register_target(config_cls: type[TargetConfig]) -> Callable[[type[TargetModule]], type]:
    """Class decorator: register a core class for ``config_cls.name`` and its ``site_kind``."""

    def wrap(cls: type[TargetModule]) -> type[TargetModule]:
        cls.target_name = config_cls.name
        _REGISTRY[(config_cls.name, cls.site_kind)] = cls
        _CONFIGS[config_cls.name] = config_cls
        return cls

    return wrap


def available_targets() -> list[str]:
    _load_builtin_targets()
    return sorted(_CONFIGS)


def resolve_target(target: str | TargetConfig, **options: Any) -> TargetConfig:
    """Turn a registry name plus options, or a config instance (plus overrides), into a config.

    Raises:
        UnknownTargetError: ``target`` is neither a registered name nor a config.
        ConfigError: an option the target does not have (the valid ones are listed), or a value
            of the wrong type or out of range.
    """
    _load_builtin_targets()
    if isinstance(target, TargetConfig):
        if options:
            _check_option_names(type(target), options)
            return dataclasses.replace(target, **options)
        return target
    if not isinstance(target, str):
        raise UnknownTargetError(
            f"target must be a registry name or a TargetConfig, got {type(target).__name__}"
        )
    if target not in _CONFIGS:
        raise UnknownTargetError(
            f"unknown target {target!r}; available targets: {', '.join(available_targets())}"
        )
    cls = _CONFIGS[target]
    _check_option_names(cls, options)
    return cls(**options)


def _check_option_names(cls: type[TargetConfig], options: Mapping[str, Any]) -> None:
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ConfigError(
            f"target {cls.name!r} has no option(s) {unknown}; its options are {sorted(fields)}"
        )


def core_class(config: TargetConfig, kind: str) -> type[TargetModule] | None:
    _load_builtin_targets()
    return _REGISTRY.get((config.name, kind))


def copy_projection(ref: ProjectionRef | None, weights: Mapping[str, torch.Tensor]) -> nn.Linear | None:
    """A fresh ``nn.Linear`` holding a copy of the host projection (its fused slice if any)."""
    if ref is None:
        return None
    w = weights[ref.weight].detach()
    if ref.transposed:
        w = w.t()
    b = weights[ref.bias].detach() if ref.bias else None
    if ref.rows is not None:
        w = w[ref.rows[0] : ref.rows[1]]
        b = b[ref.rows[0] : ref.rows[1]] if b is not None else None
    linear = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        linear.weight.copy_(w)
        if b is not None:
            linear.bias.copy_(b)
    return linear


_LOADED = False


def _load_builtin_targets() -> None:
    # Imported lazily so that `import swapformer.targets.base` stays cheap and cycle-free.
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    import swapformer.targets  # noqa: F401
