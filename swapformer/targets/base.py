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
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

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

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.name, **dataclasses.asdict(self)}


class TargetModule(nn.Module):
    """Base class of replacement cores (see the module docstring for the calling conventions)."""

    target_name: ClassVar[str] = ""
    site_kind: ClassVar[str] = "attention"

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
    """Turn a registry name plus options, or a config instance, into a config instance."""
    _load_builtin_targets()
    if isinstance(target, TargetConfig):
        if options:
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
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ConfigError(
            f"target {target!r} has no option(s) {unknown}; its options are {sorted(fields)}"
        )
    return cls(**options)


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
