"""torchrun integration: process group, rank facts, reductions."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device: torch.device) -> DistEnv:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): gloo on CPU, nccl on GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def all_sum(value: float, env: DistEnv, device: torch.device) -> float:
    if not env.enabled:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def all_reduce_grads(params: list[torch.Tensor], env: DistEnv) -> None:
    """Sum the gradients of ``params`` over ranks, in place, with one flat all-reduce.

    A parameter without a gradient on this rank counts as zeros (every rank sends the same
    layout), and gets the summed gradient. Nothing happens in a single process.
    """
    if not env.enabled or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).to(torch.float32) for g in grads])  # (sum numel,)
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(g).to(g.dtype)
        offset += n


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def shard(batch: list[int], env: DistEnv) -> list[int]:
    """This rank's contiguous slice of a global batch of indices."""
    if not env.enabled:
        return batch
    per = -(-len(batch) // env.world)
    return batch[env.rank * per:(env.rank + 1) * per]
