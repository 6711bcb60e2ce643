"""Shared memory for DataLoader workers: a warning before a stage starts when /dev/shm looks too small.

A DataLoader worker hands each batch to the main process through shared memory (torch.multiprocessing's
default ``file_descriptor`` strategy allocates it with shm_open, i.e. in /dev/shm on Linux), and each
worker keeps up to ``prefetch_factor`` (2) batches in flight. A container's /dev/shm is 64 MB unless
``docker run --shm-size`` says otherwise; when it fills, a worker dies mid-stage with "DataLoader worker
(pid ...) is killed by signal: Bus error". The figure here is an upper estimate (image sizes from one
sample; the embed stage does not decode images its cache holds), so it warns, naming the settings that
avoid the crash, instead of refusing a run that might fit.
"""

from __future__ import annotations

import io
import shutil

from PIL import Image

from storage import shards

SHM_PATH = "/dev/shm"
PREFETCH_FACTOR = 2  # torch.utils.data.DataLoader's default whenever it has workers


def shm_free(path: str = SHM_PATH) -> int | None:
    """Free bytes of the shared-memory filesystem; None where there is none (macOS, Windows)."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def size_text(n: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def shm_warning(*, stage: str, workers: int, batch_bytes: int | None, free: int | None, settings: str) -> str | None:
    """The warning for ``workers`` DataLoader workers handing over batches of ``batch_bytes`` through
    ``free`` bytes of shared memory; None when they fit, or nothing is known to compare.
    ``settings``: the stage's config keys, e.g. "embed.num_workers / embed.batch_size"."""
    if workers < 1 or batch_bytes is None or free is None:
        return None
    need = workers * PREFETCH_FACTOR * batch_bytes
    if need <= free:
        return None
    workers_key, batch_key = (s.strip() for s in settings.split("/"))
    return (f"{stage}: {workers} DataLoader worker(s) may hold up to {workers * PREFETCH_FACTOR} batches of about "
            f"{size_text(batch_bytes)} in shared memory ({size_text(need)}), but {SHM_PATH} has "
            f"{size_text(free)} free. If a worker dies with a bus error, set {workers_key}=0 (load in the main "
            f"process), lower {batch_key}, or give the machine more shared memory (in a container: "
            f"docker run --shm-size=...)")


def warn_if_shm_short(log, *, stage: str, workers: int, batch_bytes: int | None, settings: str) -> None:
    """Log :func:`shm_warning` for this machine's /dev/shm, if there is one to give."""
    message = shm_warning(stage=stage, workers=workers, batch_bytes=batch_bytes, free=shm_free(), settings=settings)
    if message and log is not None:
        log.warning(message)


def first_pair_pixels(urls: list[str]) -> int | None:
    """Pixels (height x width) of the first sample's LQ in ``urls``, read from its PNG header alone;
    None when there is no readable sample (the stage reports that itself)."""
    try:
        for sample in shards.iter_samples(urls[:1]):
            with Image.open(io.BytesIO(sample["lq_png"])) as im:
                return im.width * im.height
    except Exception:  # an estimate only: whatever is wrong with the shard, the stage says it
        return None
    return None


def embed_batch_bytes(urls: list[str], batch_size: int) -> int | None:
    """A decoded embed chunk: ``batch_size`` pairs of uint8 RGB LQ and GT at the first sample's size."""
    pixels = first_pair_pixels(urls)
    return None if pixels is None else batch_size * 2 * 3 * pixels


def train_batch_bytes(batch_size: int, patch_size: int, context_dim: int) -> int:
    """A training batch: float32 LQ and GT patches and the context vectors."""
    return batch_size * 4 * (2 * 3 * patch_size * patch_size + context_dim)
