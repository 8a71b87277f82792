"""What a user asks the planner for: a decode or prefill speed-up, or a state size, at a context length.

A :class:`Budget` turns into one number, the *capacity*: how much of the chosen metric the planned
sites may cost in all, given what the rest of the model costs (``fixed``) and what the planned sites
cost as they are (``original``):

* ``decode`` / ``prefill``: per-token FLOPs at ``context`` (prefill: averaged over a prompt of
  ``context`` tokens); a speed-up ``s`` means ``fixed + planned <= (fixed + original) / s``;
* ``state``: decoding-state bytes per sequence after ``context`` tokens; ``planned <= bytes - fixed``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from swapformer.errors import ConfigError

BudgetKind = Literal["decode", "prefill", "state"]
KINDS: tuple[str, ...] = ("decode", "prefill", "state")
DEFAULT_CONTEXT = 32768
_SIZE_SUFFIXES = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9,
                  "kib": 2**10, "mib": 2**20, "gib": 2**30}
_SPELLING = re.compile(r"^\s*(\w+)\s*@\s*(\d+)\s*=\s*([0-9.eE+-]+)\s*([A-Za-z]*)\s*$")


@dataclass(frozen=True)
class Budget:
    """A speed or memory budget (see the module docstring).

    Args:
        kind: ``"decode"`` (speed-up of one decoded token), ``"prefill"`` (speed-up of a prompt's
            prefill) or ``"state"`` (bytes of decoding state per sequence).
        value: the speed-up (>= 1) for ``decode``/``prefill``, the bytes for ``state``.
        context: the context length the costs are taken at.

    Raises:
        ConfigError: an unknown kind, a speed-up below 1, non-positive bytes or context.
    """

    kind: BudgetKind
    value: float
    context: int = DEFAULT_CONTEXT

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"budget kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if isinstance(self.context, bool) or not isinstance(self.context, int) or self.context < 1:
            raise ConfigError(f"budget context must be a positive int (tokens), got {self.context!r}")
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float)) or not math.isfinite(self.value):
            raise ConfigError(f"budget value must be a finite number, got {self.value!r}")
        if self.kind != "state" and self.value < 1:
            raise ConfigError(f"a {self.kind} speed-up must be >= 1 (1 = as fast as the original), "
                              f"got {self.value}")
        if self.kind == "state" and self.value <= 0:
            raise ConfigError(f"a state budget must be a positive number of bytes, got {self.value}")

    @classmethod
    def decode(cls, speedup: float, context: int = DEFAULT_CONTEXT) -> Budget:
        """Decode ``speedup`` times fewer FLOPs per token at ``context`` tokens."""
        return cls("decode", speedup, context)

    @classmethod
    def prefill(cls, speedup: float, context: int = DEFAULT_CONTEXT) -> Budget:
        """Prefill a ``context``-token prompt with ``speedup`` times fewer FLOPs."""
        return cls("prefill", speedup, context)

    @classmethod
    def state(cls, max_bytes: float, context: int = DEFAULT_CONTEXT) -> Budget:
        """At most ``max_bytes`` of decoding state per sequence after ``context`` tokens."""
        return cls("state", max_bytes, context)

    @classmethod
    def parse(cls, text: str) -> Budget:
        """``"decode@32768=3"``, ``"prefill@4096=2"``, ``"state@32768=64MiB"`` (KB, MB, GB, KiB, MiB,
        GiB or bytes).

        Raises:
            ConfigError: the text is not ``KIND@CONTEXT=VALUE`` or its parts are invalid.
        """
        match = _SPELLING.match(text) if isinstance(text, str) else None
        if match is None:
            raise ConfigError(f"a budget is spelled KIND@CONTEXT=VALUE (decode@32768=3, prefill@4096=2, "
                              f"state@32768=64MiB), got {text!r}")
        kind, context, number, suffix = match.groups()
        try:
            value = float(number)
        except ValueError as e:
            raise ConfigError(f"budget {text!r}: {number!r} is not a number") from e
        if suffix and (kind != "state" or suffix.lower() not in _SIZE_SUFFIXES):
            raise ConfigError(f"budget {text!r}: unit {suffix!r} is not one of "
                              f"{', '.join(s for s in _SIZE_SUFFIXES if s)} (units are for state budgets)")
        return cls(kind, value * _SIZE_SUFFIXES[suffix.lower()], int(context))

    @property
    def unit(self) -> str:
        return "bytes" if self.kind == "state" else "FLOP/token"

    def capacity(self, fixed: float, original: float) -> float:
        """What the planned sites may cost in all (``original``: their cost as they are)."""
        if self.kind == "state":
            return self.value - fixed
        return (fixed + original) / self.value - fixed

    def achieved(self, fixed: float, planned: float, original: float) -> float:
        """The speed-up (or the state bytes) a plan whose sites cost ``planned`` gives."""
        if self.kind == "state":
            return fixed + planned
        return (fixed + original) / (fixed + planned)

    def describe(self, achieved: float | None = None) -> str:
        """``"decode@32768 >= 3x"`` (with ``achieved``: ``"..., plan 3.1x"``)."""
        if self.kind == "state":
            text = f"state@{self.context} <= {self.value:.4g} bytes"
            return text + (f", plan {achieved:.4g} bytes" if achieved is not None else "")
        text = f"{self.kind}@{self.context} >= {self.value:g}x"
        return text + (f", plan {achieved:.3g}x" if achieved is not None else "")
