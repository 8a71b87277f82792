"""Error classes. Every error names what was wrong with the caller's input or model."""


class SwapformerError(Exception):
    """Base class of all swapformer errors."""


class CaptureError(SwapformerError):
    """No capture strategy could turn the model into a graph; the message lists each attempt."""


class UnknownTargetError(SwapformerError, ValueError):
    """The target name is not registered."""


class InputError(SwapformerError, ValueError):
    """Example inputs or options do not fit the model."""


class ConfigError(SwapformerError, ValueError):
    """A target or calibration config holds an invalid value."""


class VerificationError(SwapformerError):
    """A rewrite that claims to be exact is not, above tolerance."""
