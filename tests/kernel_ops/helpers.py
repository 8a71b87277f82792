"""Shared helpers for the kernel tests: forward + backward of a function and comparison of everything."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from hypothesis import HealthCheck, settings

from swapformer.kernels.testing import assert_close

#: Hypothesis settings of the kernel property tests, applied per test (a global profile would leak
#: into the rest of the suite): reproducible, no deadline, few examples to keep the suite fast.
PROPERTY = settings(
    deadline=None, derandomize=True, max_examples=15, suppress_health_check=[HealthCheck.too_slow]
)
#: The same with fewer examples, for tests whose single example costs a second or more.
PROPERTY_HEAVY = settings(PROPERTY, max_examples=8)


def fwd_bwd(
    fn: Callable[..., Sequence[torch.Tensor | None]],
    inputs: Sequence[torch.Tensor | None],
    cotangents: Sequence[torch.Tensor | None],
) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Run ``fn(*inputs)`` on fresh leaf copies, back-propagate ``Σ out·cot``; return outputs and grads."""
    leaves = [None if x is None else x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    outs = [o for o in fn(*leaves)]
    loss = sum((o.float() * c.float()).sum() for o, c in zip(outs, cotangents) if o is not None and c is not None)
    wrt = [x for x in leaves if x is not None and x.requires_grad]
    grads = iter(torch.autograd.grad(loss, wrt, allow_unused=True))
    out_grads = [next(grads) if x is not None and x.requires_grad else None for x in leaves]
    return [o.detach() if o is not None else None for o in outs], out_grads


def compare_all(names: Sequence[str], ref: Sequence, out: Sequence, ratio: float, atol: float = 0.0) -> None:
    """``assert_close`` on every pair that is not None; a None on one side only is a failure."""
    for name, r, o in zip(names, ref, out):
        assert (r is None) == (o is None), f"{name}: one side is None"
        if r is not None:
            assert_close(name, r, o, ratio, atol)


def cotangents_like(outs: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    return [None if o is None else torch.randn(o.shape, dtype=torch.float32) for o in outs]
