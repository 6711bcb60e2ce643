"""Shared memory for DataLoader workers: a warning before a stage starts when /dev/shm looks too small.

A DataLoader worker hands each batch to the main process through shared memory (torch.multiprocessing's
default ``file_descriptor`` strategy allocates it with shm_open, i.e. in /dev/shm on Linux). Each worker
keeps up to ``prefetch_factor`` (2) batches in flight, and the main process holds the one it is using, so
``workers * 2 + 1`` batches per process; processes on one machine share its /dev/shm. A container's
/dev/shm is 64 MiB unless ``docker run --shm-size`` says otherwise. When it fills, the stage fails
mid-way: "unable to allocate shared memory(shm) for file <...>" and the system's reason (torch
reserves the segment up front with posix_fallocate), or where it cannot, a worker "killed by signal:
Bus error".

The estimate is the configured patch (train) or the largest first image of a few shards (embed, which
also does not decode images its cache already holds), so a short /dev/shm gets a warning that names
the settings to change, not a refusal of a run that might fit.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil

from storage import shards
from storage.errors import Refusal

SHM_PATH = "/dev/shm"
PREFETCH_FACTOR = 2  # torch.utils.data.DataLoader's default whenever it has workers (neither stage sets it)


def shm_free(path: str = SHM_PATH) -> int | None:
    """Free bytes of the shared-memory filesystem; None where there is none (macOS, Windows)."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def size_text(n: int) -> str:
    """Bytes in binary units, as df and Docker's --shm-size count them: "64.0 MiB"."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def local_processes() -> int:
    """Processes of this job on this machine (torchrun's LOCAL_WORLD_SIZE; 1 outside torchrun)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def shm_need(*, workers: int, processes: int, batch_bytes: int) -> int:
    """Bytes of shared memory ``processes`` processes of ``workers`` DataLoader workers may hold at once."""
    return processes * (workers * PREFETCH_FACTOR + 1) * batch_bytes


def shm_warning(*, stage: str, workers: int, processes: int, batch_bytes: int, free: int) -> str | None:
    """The warning for DataLoader workers handing over batches of ``batch_bytes`` through ``free`` bytes
    of shared memory; None when they fit. Both stages name their settings alike: ``<stage>.num_workers``,
    ``<stage>.batch_size``."""
    need = shm_need(workers=workers, processes=processes, batch_bytes=batch_bytes)
    if need <= free:
        return None
    who = f"{workers} DataLoader worker(s)" + (f" in each of {processes} processes" if processes > 1 else "")
    return (f"{stage}: {who} may hold about {size_text(need)} of batches ({size_text(batch_bytes)} each) in shared "
            f"memory, but {SHM_PATH} has {size_text(free)} free. If the stage fails with \"unable to allocate "
            f"shared memory\" or a worker killed by a bus error, set {stage}.num_workers=0 (load in the main "
            f"process), lower {stage}.batch_size, or give the machine more shared memory (in a container: docker run "
            f"--shm-size={math.ceil(need / (1 << 30))}g)")


def warn_if_shm_short(log, *, stage: str, workers: int, processes: int, batch_bytes) -> None:
    """Log :func:`shm_warning` for this machine's /dev/shm. ``batch_bytes``: a function giving the batch
    size, or None when it cannot tell; called only when there are workers and a /dev/shm to compare."""
    if log is None or workers < 1:
        return
    free = shm_free()
    size = None if free is None else batch_bytes()
    message = None if size is None else shm_warning(stage=stage, workers=workers, processes=processes,
                                                    batch_bytes=size, free=free)
    if message:
        log.warning(message)


def largest_first_pixels(urls: list[str], shards_read: int = 8) -> int | None:
    """Pixels (width x height, from the sample's json) of the largest first sample of up to
    ``shards_read`` shards: an estimate of the largest image that reads a sample, not a data set;
    None when none is readable (the stage reports that itself)."""
    sizes = []
    for url in urls[:shards_read]:
        try:
            with contextlib.closing(shards.iter_samples([url])) as samples:
                meta = next(samples, {}).get("meta", {})
        except (Refusal, OSError, ValueError):  # missing, unreadable, damaged: the stage says which
            continue
        if "width" in meta and "height" in meta:
            sizes.append(int(meta["width"]) * int(meta["height"]))
    return max(sizes, default=None)


def embed_batch_bytes(pixels: int | None, batch_size: int) -> int | None:
    """A decoded embed chunk: ``batch_size`` pairs of uint8 RGB LQ and GT of ``pixels`` pixels each."""
    return None if pixels is None else batch_size * 2 * 3 * pixels


def train_batch_bytes(batch_size: int, patch_size: int, context_dim: int) -> int:
    """A training batch: float32 LQ and GT patches and the context vectors."""
    return batch_size * 4 * (2 * 3 * patch_size * patch_size + context_dim)
