"""Options of the ``"cat"`` target (see :mod:`swapformer.targets.cat` for what they mean)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from swapformer.errors import ConfigError
from swapformer.targets.base import TargetConfig
from swapformer.targets.hybrid import check_hybrid_options


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class CatConfig(TargetConfig):
    """Options of the ``"cat"`` target.

    Args:
        mode: ``"retrofit"`` (host q/k/v + learned compressor) or ``"layer"`` (the seed's cat_layer).
        chunk_size: chunk length C.
        max_chunk_size: adaptive mode when > 0: C may be set per call to any power of two up to it.
        sink: retrofit: learn a sink key/value visible to every query (the layer always has its dummy).
        correction: retrofit: learn the linear correction of the mean-pooled chunk keys/values.
        width_factor: layer: decoder width as a multiple of d_model (the seed uses 2).
        head_dim: layer: head width of the wide attention (0 = the site's head dim, else 64).
        qk_norm: layer: RMSNorm on queries and keys per head.
        rope_base: layer: RoPE base of the in-chunk positions.
        local_window: retrofit: exact window of the hybrid form (0 = window-free; ``None``: 64 for
            retrofit, 0 for the layer).
        sinks: first tokens every query of the hybrid also sees exactly.
        block_size: query block of the hybrid's prefill.
        mix_init: initial per-head mix ``g_h`` of the compressed memory.
    """

    name = "cat"
    mode: Literal["retrofit", "layer"] = "retrofit"
    chunk_size: int = 16
    max_chunk_size: int = 0
    sink: bool = False
    correction: bool = True
    width_factor: int = 2
    head_dim: int = 0
    qk_norm: bool = False
    rope_base: float = 10000.0
    local_window: int | None = None
    sinks: int = 4
    block_size: int = 64
    mix_init: float = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.local_window is None:  # frozen: resolve the default in place
            object.__setattr__(self, "local_window", 64 if self.mode == "retrofit" else 0)
        check_hybrid_options(self.name, self.local_window, self.sinks, self.block_size)
        if self.mode == "layer" and self.local_window:
            raise ConfigError("cat mode='layer' has no hybrid form: use local_window=0")
        if self.local_window and self.max_chunk_size:
            raise ConfigError("the cat hybrid (local_window > 0) has a fixed chunk size: max_chunk_size=0")
        if not self.mix_init > 0:
            raise ConfigError(f"cat mix_init must be > 0, got {self.mix_init}")
        if self.mode not in ("retrofit", "layer"):
            raise ConfigError(f"cat mode must be 'retrofit' or 'layer', got {self.mode!r}")
        if self.chunk_size < 1:
            raise ConfigError(f"cat chunk_size must be >= 1, got {self.chunk_size}")
        if self.max_chunk_size:
            if not _is_power_of_two(self.max_chunk_size) or not _is_power_of_two(self.chunk_size):
                raise ConfigError("adaptive cat needs power-of-two chunk_size and max_chunk_size, got "
                                  f"{self.chunk_size} and {self.max_chunk_size}")
            if self.chunk_size > self.max_chunk_size:
                raise ConfigError(f"cat chunk_size {self.chunk_size} exceeds max_chunk_size "
                                  f"{self.max_chunk_size}")
        if self.width_factor < 1 or self.head_dim < 0:
            raise ConfigError("cat width_factor must be >= 1 and head_dim >= 0")


def check_chunk_size(config: CatConfig, chunk_size: int, fixed: int | None) -> None:
    if config.max_chunk_size:
        if not _is_power_of_two(chunk_size) or chunk_size > config.max_chunk_size:
            raise ConfigError(f"adaptive cat chunk size must be a power of two <= "
                              f"{config.max_chunk_size}, got {chunk_size}")
    elif fixed is not None and chunk_size != fixed:
        raise ConfigError(f"this cat layer was built for chunk size {fixed}; set max_chunk_size "
                          "for adaptive chunk sizes")
    elif chunk_size < 1:
        raise ConfigError(f"cat chunk size must be >= 1, got {chunk_size}")
