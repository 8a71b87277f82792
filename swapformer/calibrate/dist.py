"""Data-parallel plumbing: one process per device (``torchrun``), gradients averaged across ranks.

Gradients are all-reduced explicitly after each backward pass (one flattened buffer per step)
instead of through ``DistributedDataParallel``: the transfer stage's losses come from forward hooks
and its forward pass is cut short, which DDP's reducer does not expect, and the calibrated
parameters are few, so overlapping the reduction with the backward pass would gain little. The
semantics are DDP's: every rank starts from rank 0's parameters and applies the same averaged
gradients, so all ranks hold identical parameters after every step.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """This process's place in the data-parallel group (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(requested: str | None, fallback: torch.device) -> torch.device:
    """``"cuda"`` → ``cuda:LOCAL_RANK``; ``None`` → ``fallback`` (the student's device)."""
    if requested is None:
        return fallback
    device = torch.device(requested)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def init_distributed(device: torch.device) -> DistContext:
    """Join the process group ``torchrun`` describes (gloo on CPU, nccl on CUDA), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
        logger.info("joined a %s process group of %d ranks", backend, world)
    if dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), device)
    return DistContext(0, 1, device)


def broadcast_parameters(params: list[torch.Tensor], ctx: DistContext) -> None:
    """Copy rank 0's values into every rank's ``params``."""
    if not ctx.distributed or not params:
        return
    with torch.no_grad():
        flat = _flatten_dense_tensors([p.data for p in params])
        dist.broadcast(flat, src=0)
        for p, synced in zip(params, _unflatten_dense_tensors(flat, [p.data for p in params])):
            p.data.copy_(synced)


def average_gradients(params: list[torch.Tensor], ctx: DistContext) -> None:
    """Average ``.grad`` over the ranks (missing gradients count as zeros)."""
    if not ctx.distributed:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= ctx.world_size
    for p, g in zip(params, _unflatten_dense_tensors(flat, grads)):
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)


def all_reduce_mean(values: list[float], ctx: DistContext, device: torch.device) -> list[float]:
    """Mean of each value over the ranks (NaN anywhere stays NaN)."""
    if not ctx.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / ctx.world_size).tolist()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()
