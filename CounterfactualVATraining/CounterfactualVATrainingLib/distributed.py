"""Data-parallel training under `torchrun` (torch.distributed; NCCL on GPUs, Gloo on CPU).

GAN methods step several optimizers per iteration on different networks, so instead of wrapping each
network in DistributedDataParallel (which assumes one forward/backward per module per step), the loop
averages gradients across ranks right before every optimizer step. The arithmetic is DDP's: identical
initial weights (broadcast from rank 0), gradients all-reduced and divided by the world size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistributedState:
    enabled: bool = False
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup() -> DistributedState:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedState()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("CUDA_VISIBLE_DEVICES") != "-1" else "gloo"
        dist.init_process_group(backend=backend)
    return DistributedState(True, dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")), dist.get_world_size())


def broadcast_parameters(module: torch.nn.Module, state: DistributedState) -> None:
    if not state.enabled:
        return
    for tensor in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(tensor.data, src=0)


def gradient_averager(state: DistributedState):
    if not state.enabled:
        return None

    def average(grads: list[torch.Tensor]) -> None:
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= state.world_size
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g))
            offset += n

    return average


def agree(flag: bool, state: DistributedState) -> bool:
    """Rank 0's value of `flag` on every rank (e.g. "out of time"), so all ranks take the same branch."""
    if not state.enabled:
        return bool(flag)
    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        value = value.cuda()
    dist.broadcast(value, src=0)
    return bool(value.item())


def barrier(state: DistributedState) -> None:
    if state.enabled:
        dist.barrier()


def cleanup(state: DistributedState) -> None:
    if state.enabled and dist.is_initialized():
        dist.destroy_process_group()
