"""torchrun helpers: one process per GPU (NCCL), or per CPU process (gloo, also on Windows where NCCL is absent);
gathering validation rows from every rank; sums over ranks (the training loss, a stop request)."""

import os

import torch
import torch.distributed as dist


def setup_distributed(device):
    """(rank, world_size, device); under torchrun one process per GPU (NCCL) or per CPU process (gloo)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" and dist.is_nccl_available() else "gloo")
    return dist.get_rank(), world_size, device


def gather_rows(tensor, device, world_size):
    """Concatenate a tensor's rows from every rank (each rank holds the same number of rows)."""
    if world_size == 1:
        return tensor
    parts = [torch.empty_like(tensor, device=device) for _ in range(world_size)]
    dist.all_gather(parts, tensor.to(device))
    return torch.cat(parts).cpu()


def sum_over_ranks(tensor, world_size):
    """The tensor summed over every rank, in place (every rank must call this at the same point)."""
    if world_size > 1:
        dist.all_reduce(tensor)
    return tensor


def shut_down():
    if dist.is_initialized():
        dist.destroy_process_group()
