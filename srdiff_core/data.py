"""What a shard sample becomes: decoded, cropped and augmented LQ/GT tensors, through a
webdataset pipeline for training and evaluation.

``PairDataset`` is a torch IterableDataset built on ``webdataset.DataPipeline``: shard URLs
(``wds.SimpleShardList``, or ``wds.ResampledShards`` for training's endless stream), split by
rank and by DataLoader worker (``split_by_node``, ``wds.split_by_worker``), read into raw
samples (``storage.shards.shard_samples``: the shards' bytes are storage's), shuffled across
shards (``wds.shuffle``) and decoded, cropped and augmented here. Every random choice comes
from generators seeded by (seed, rank, worker, epoch), so a stream restarted with the same
values is the same stream: training resumes by restarting it at the checkpoint's step.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable, Iterable, Iterator
from itertools import islice

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from webdataset.utils import pytorch_worker_info

from storage.errors import Refusal
from storage.shards import shard_samples


# Errors of the data module: facts only, as storage.errors (tasks/advice.py words the next step).

class PairMismatch(Refusal, ValueError):
    """An LQ image and its GT differ in size (``sample_id``: None where the caller did not say)."""

    fields = ("lq_shape", "gt_shape", "sample_id")
    joiner = ": "

    def facts(self) -> str:
        if self.sample_id is None:
            return f"LQ {self.lq_shape} and GT {self.gt_shape} differ in size; a paired crop needs equal sizes"
        return f"sample {self.sample_id}: LQ {self.lq_shape} and GT {self.gt_shape} differ in size"


class MissingEmbedding(Refusal, KeyError):
    """A sample in the shards has no embedding in the table the dataset was given."""

    fields = ("sample_id",)
    joiner = ": "

    def facts(self) -> str:
        return f"no embedding for sample id {self.sample_id!r}"


class NoShardUrls(Refusal, ValueError):
    """A dataset asked to read no shards at all."""

    joiner = ": "

    def facts(self) -> str:
        return "PairDataset got no shard URLs"


class TooFewShards(Refusal, ValueError):
    """Fewer shards than (rank, DataLoader worker) readers: ``workers`` readers per rank."""

    fields = ("num_shards", "world_size", "workers")
    joiner = ": "

    @property
    def too_many_ranks(self) -> bool:
        """Whether even one reader per rank is too many (else the workers are)."""
        return self.num_shards < self.world_size

    def facts(self) -> str:
        readers = (f"{self.world_size} ranks" if self.too_many_ranks
                   else f"{self.world_size} ranks x {self.workers} workers")
        return f"{self.num_shards} shards cannot feed {readers} (one each at least)"


def decode_png(data: bytes) -> np.ndarray:
    """PNG (or any format Pillow reads) bytes -> uint8 HxWx3 RGB array.

    Greyscale is replicated to three channels; alpha is dropped (as cv2.IMREAD_COLOR does in
    BasicSR's loaders); 16-bit greyscale is rescaled to 8 bits (v / 257, rounded).
    """
    with Image.open(io.BytesIO(data)) as im:
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            wide = np.asarray(im, dtype=np.float64)
            grey = np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)
            return np.repeat(grey[:, :, None], 3, axis=2)
        return np.array(im if im.mode == "RGB" else im.convert("RGB"), dtype=np.uint8)


def pad_to_at_least(img: np.ndarray, size: int) -> np.ndarray:
    """Reflect-pad the bottom/right of an HxWxC image so both sides are at least ``size``."""
    pad_h, pad_w = max(0, size - img.shape[0]), max(0, size - img.shape[1])
    if not (pad_h or pad_w):
        return img
    return np.pad(img, ((0, pad_h), (0, pad_w), (0, 0)), mode="reflect")


def paired_random_crop(lq: np.ndarray, gt: np.ndarray, size: int,
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The same random size x size window of LQ and GT (padded first if smaller)."""
    if lq.shape != gt.shape:
        raise PairMismatch(lq.shape, gt.shape)
    lq, gt = pad_to_at_least(lq, size), pad_to_at_least(gt, size)
    top = int(rng.integers(0, lq.shape[0] - size + 1))
    left = int(rng.integers(0, lq.shape[1] - size + 1))
    window = (slice(top, top + size), slice(left, left + size))
    return lq[window], gt[window]


def paired_augment(lq: np.ndarray, gt: np.ndarray,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Same random flips/90-degree rotation for LQ and GT.

    As BasicSR's ``augment``: horizontal flip, vertical flip and transpose, each with
    probability 1/2, give the 8 elements of the square's symmetry group (rotations by 90
    degrees included) with equal probability.
    """
    hflip, vflip, transpose = (rng.random(3) < 0.5).tolist()

    def apply(img: np.ndarray) -> np.ndarray:
        if hflip:
            img = img[:, ::-1]
        if vflip:
            img = img[::-1]
        if transpose:
            img = img.transpose(1, 0, 2)
        return img

    return apply(lq), apply(gt)


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 -> float32 3xHxW in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float().div_(255.0)


def check_feed(num_shards: int, world_size: int, num_workers: int) -> None:
    """Every (rank, DataLoader worker) reader needs a shard of its own, or it gets nothing in
    exact mode and, in resampled mode, streams the same shard in the same order as another
    reader (the same samples in nearby batches). Refused up front (TooFewShards)."""
    workers = max(num_workers, 1)
    if num_shards < world_size * workers:
        raise TooFewShards(num_shards, world_size, workers)


def split_by_node(rank: int, world_size: int) -> Callable[[Iterable], Iterator]:
    """webdataset's split_by_node (every world_size-th shard from ``rank`` on) for a rank given
    rather than read from torch.distributed: a dataset here names its rank, which also seeds its
    RNGs, and tests and tools build every rank's dataset in one process."""
    return lambda src: islice(src, rank, None, world_size)


def split_shards(urls: list[str], *, rank: int, world_size: int, worker_id: int,
                 num_workers: int) -> list[str]:
    """This (rank, worker)'s shards in exact mode, as PairDataset's pipeline splits them
    (split_by_node, then split_by_worker): every shard to exactly one reader."""
    check_feed(len(urls), world_size, num_workers)
    return list(islice(split_by_node(rank, world_size)(urls), worker_id, None, max(num_workers, 1)))


def _worker() -> tuple[int, int]:
    """(worker id, workers) as wds.split_by_worker sees them: the DataLoader worker, or the
    WORKER and NUM_WORKERS variables; (0, 1) in the main process."""
    _, _, worker, workers = pytorch_worker_info()
    return worker, workers


def _zero() -> int:
    return 0


class PairDataset(torch.utils.data.IterableDataset):
    """LQ/GT pairs from shards as float tensors, split by DDP rank and DataLoader worker.

    Exact mode (``resampled=False``): each sample exactly once across all ranks x workers, in
    shard order. Resampled mode: an endless stream; each (seed, rank, worker, epoch) draws
    shards (``wds.ResampledShards``) from its worker's own share of ``urls`` (every
    num_workers-th, as in exact mode), so no two workers stream the same shard in the same
    order; with fewer shards than workers, every worker draws from all of them (the train stage
    caps its workers: tasks.train.rank_workers). ``shuffle_buffer`` > 0 also shuffles samples
    across shards (``wds.shuffle``), which in id-sorted shards are often frames of one scene.
    """

    def __init__(self, urls: list[str], *, patch_size: int | None = None, augment: bool = False,
                 resampled: bool = False, embeddings: dict[str, np.ndarray] | None = None,
                 seed: int = 0, rank: int = 0, world_size: int = 1, shuffle_buffer: int = 0):
        super().__init__()
        if not urls:
            raise NoShardUrls()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if patch_size is not None and patch_size < 1:
            raise ValueError(f"patch_size must be positive or None, not {patch_size}")
        if shuffle_buffer and not resampled:
            raise ValueError("shuffle_buffer needs resampled=True: exact mode keeps shard order")
        self.urls = list(urls)
        self.patch_size, self.augment, self.resampled = patch_size, augment, resampled
        self.embeddings, self.seed = embeddings, seed
        self.rank, self.world_size, self.shuffle_buffer = rank, world_size, shuffle_buffer
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Reseed the next iteration (call before each epoch, or with the step on resume)."""
        self.epoch = epoch

    def seeds(self, worker_id: int) -> tuple[int, int, np.random.Generator]:
        """(shard-drawing seed, shuffle seed, crop/augment RNG) of one reader, from (seed, rank, worker, epoch)."""
        shards, shuffle, augment = np.random.SeedSequence([self.seed, self.rank, worker_id, self.epoch]).spawn(3)
        return int(shards.generate_state(1)[0]), int(shuffle.generate_state(1)[0]), np.random.default_rng(augment)

    def keep(self, raw: dict) -> bool:
        """Whether a raw sample is used (all are; EmbeddedPairDataset leaves out quarantined ones)."""
        return True

    def stages(self, worker_id: int, num_workers: int) -> list:
        """The webdataset pipeline of this reader's raw samples."""
        shard_seed, shuffle_seed, _ = self.seeds(worker_id)
        if not self.resampled:
            check_feed(len(self.urls), self.world_size, num_workers)
            shards = [wds.SimpleShardList(self.urls), split_by_node(self.rank, self.world_size), wds.split_by_worker]
        else:
            own = list(wds.split_by_worker(self.urls)) if len(self.urls) >= num_workers else self.urls
            # deterministic=True: the draw depends on the seed alone, never on pid or time (resume).
            shards = [wds.ResampledShards(own, seed=shard_seed, worker_seed=_zero, deterministic=True)]
        shuffle = [wds.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=random.Random(shuffle_seed))]
        return [*shards, shard_samples, *(shuffle if self.shuffle_buffer else []), wds.select(self.keep)]

    def raw_samples(self) -> Iterator[dict]:
        """This reader's raw samples {"id", "lq_png", "gt_png", "meta"}: its share of the shards
        (exact) or an endless draw."""
        return iter(wds.DataPipeline(*self.stages(*_worker())))

    def prepare(self, raw: dict, rng: np.random.Generator) -> dict:
        """Raw sample -> {"id", "degradation", "lq", "gt"[, "context"]} (crop, augment)."""
        lq, gt = decode_png(raw["lq_png"]), decode_png(raw["gt_png"])
        if lq.shape != gt.shape:
            raise PairMismatch(lq.shape, gt.shape, raw["id"])
        if self.patch_size is not None:
            lq, gt = paired_random_crop(lq, gt, self.patch_size, rng)
        if self.augment:
            lq, gt = paired_augment(lq, gt, rng)
        out = {"id": raw["id"], "degradation": raw["meta"]["degradation"],
               "lq": to_tensor(lq), "gt": to_tensor(gt)}
        if self.embeddings is not None:
            out["context"] = self.context(raw["id"])
        return out

    def context(self, sample_id: str) -> torch.Tensor:
        if sample_id not in self.embeddings:
            raise MissingEmbedding(sample_id)
        vector = np.asarray(self.embeddings[sample_id], dtype=np.float32)
        if vector.ndim != 1:
            raise ValueError(f"embedding of {sample_id!r} has shape {vector.shape}, expected [D]")
        return torch.tensor(vector)

    def __iter__(self) -> Iterator[dict]:
        worker_id, num_workers = _worker()
        rng = self.seeds(worker_id)[2]
        pipeline = wds.DataPipeline(*self.stages(worker_id, num_workers),
                                    lambda raws: (self.prepare(raw, rng) for raw in raws))
        return iter(pipeline)


def make_loader(dataset: PairDataset, *, batch_size: int,
                num_workers: int) -> torch.utils.data.DataLoader:
    """A DataLoader over ``dataset``; exact mode checks up front that every worker gets a shard
    (resampled mode's caller checks its rank's shards: tasks.train.rank_shards)."""
    if not dataset.resampled:
        check_feed(len(dataset.urls), dataset.world_size, num_workers)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                       pin_memory=torch.cuda.is_available(),
                                       persistent_workers=False)
