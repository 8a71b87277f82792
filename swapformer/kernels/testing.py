"""Comparison helper for kernel tests (usable by anyone checking a kernel against its reference)."""

from __future__ import annotations

import torch


def error_ratio(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Relative RMS error ``rms(out - ref) / rms(ref)`` in float64 (0 when both are all zeros)."""
    ref64, out64 = ref.detach().double(), out.detach().double()
    err = (out64 - ref64).pow(2).mean().sqrt()
    base = ref64.pow(2).mean().sqrt()
    if base == 0:
        return float(err)
    return float(err / base)


def assert_close(
    name: str, ref: torch.Tensor, out: torch.Tensor, ratio: float = 1e-5, atol: float = 0.0
) -> None:
    """Fail unless ``out`` matches ``ref`` in shape, has no NaN/inf where ``ref`` is finite, and either
    its relative RMS error is at most ``ratio`` or its max abs error is at most ``atol`` (the floor for
    tensors that are zero up to rounding). The message reports both errors.

    Raises:
        AssertionError: on any mismatch (there is no downgrade to a warning).
    """
    assert ref.shape == out.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    finite = torch.isfinite(ref)
    assert torch.isfinite(out[finite]).all(), f"{name}: non-finite values where the reference is finite"
    err = error_ratio(ref[finite], out[finite])
    max_abs = (ref[finite].double() - out[finite].double()).abs().max().item() if finite.any() else 0.0
    assert err <= ratio or max_abs <= atol, f"{name}: relative RMS error {err:.3e} > {ratio:.1e} (max abs {max_abs:.3e})"
