"""Data-parallel training across GPUs/machines: torchrun's environment -> process group -> DDP.

torchrun starts one process per device and sets RANK, WORLD_SIZE and LOCAL_RANK (plus
MASTER_ADDR/MASTER_PORT, which ``init_process_group``'s default ``env://`` rendezvous reads).
A plain ``python`` launch sets none of them and runs as world_size 1 without a process group,
so the same code path trains on one device.

Randomness per rank: every rank draws its own timesteps and noise (:func:`rank_seed`), and
reads its own slice of the shards (``PairDataset(rank=..., world_size=...)``); only the
weights, kept identical by DDP's gradient all-reduce, are shared. Checkpoints hold rank 0's
generator state. Resuming is bit-exact for world_size 1; with DDP every rank reseeds its
generator from (seed, rank, step) on resume, which is deterministic but not the stream an
uninterrupted run would have drawn (the other ranks' generator states are not saved).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global ``rank`` of ``world_size`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer: launch with "
                         f"torchrun, which sets RANK, WORLD_SIZE and LOCAL_RANK") from None


def info_from_env() -> DistInfo:
    """torchrun's RANK / WORLD_SIZE / LOCAL_RANK (a single process when they are unset)."""
    info = DistInfo(rank=_env_int("RANK", 0), world_size=_env_int("WORLD_SIZE", 1),
                    local_rank=_env_int("LOCAL_RANK", 0))
    if info.world_size < 1 or not 0 <= info.rank < info.world_size:
        raise ValueError(f"RANK {info.rank} is outside WORLD_SIZE {info.world_size}: launch with torchrun")
    return info


def default_backend() -> str:
    """NCCL between CUDA devices (the GPU collective library); gloo on CPU."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_from_env(backend: str | None = None) -> DistInfo:
    """Join torchrun's process group (none for world_size 1) and select this rank's CUDA device."""
    info = info_from_env()
    backend = backend or default_backend()
    if backend == "nccl":
        # One process per GPU: LOCAL_RANK picks it; NCCL and .cuda() then use it by default.
        torch.cuda.set_device(info.local_rank)
    if info.distributed and not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size)
    return info


def device_for(info: DistInfo, device: torch.device) -> torch.device:
    """This rank's device: ``cuda:local_rank`` when training on CUDA, else ``device`` unchanged."""
    return torch.device("cuda", info.local_rank) if device.type == "cuda" else device


def wrap_ddp(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """``model`` on ``device``, in DistributedDataParallel when there are several ranks.

    Move the model to its memory format (channels_last) before calling this: DDP lays out its
    gradient buckets from the parameters it is given. ``find_unused_parameters`` stays off:
    ConditionalUNet builds only the parameters its conditioning mode uses (every one gets a
    gradient each step), and the unused-parameter search costs a graph traversal per step.
    """
    model = model.to(device)
    if not info.distributed:
        return model
    device_ids = [device.index if device.index is not None else info.local_rank] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """Seed of rank ``rank``'s noise generator at ``step``: ``seed`` itself for rank 0 at step 0.

    Rank 0 from the start keeps the single-process seed, so a world_size-1 run is unchanged;
    every other (seed, rank, step) goes through NumPy's SeedSequence hash (O'Neill's PCG seeding),
    so nearby ranks and steps get unrelated streams, not seed + 1.
    """
    if rank == 0 and step == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0])


def require_same_step(step: int) -> None:
    """Refuse to train when ranks resumed at different steps (no-op without a process group).

    Each rank reads the checkpoint folder itself; on machines that do not share it, only rank 0's
    machine has checkpoints, and DDP would pair up gradients of different steps or hang.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    steps: list[int] = [0] * dist.get_world_size()
    dist.all_gather_object(steps, step)
    if len(set(steps)) > 1:
        raise RuntimeError(f"ranks resumed at different steps {steps}: put data_root (the checkpoint "
                           f"folder) on storage every machine shares, or set train.resume: never")


def is_main(info: DistInfo) -> bool:
    """Rank 0 logs, samples and writes checkpoints; the others only train."""
    return info.rank == 0


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op without a process group)."""
    if info.distributed and dist.is_initialized():
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    """Leave the process group (no-op without one)."""
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
