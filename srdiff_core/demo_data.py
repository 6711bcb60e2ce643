"""The embedded demo set: crops of scikit-image's colour photographs, degraded synthetically.

Needs no download: the photographs ship inside the scikit-image wheel. Every pair is a
pure function of (seed, degradation, split, index), so a demo run is reproducible
byte for byte and asking for more pairs leaves the earlier ones unchanged.

Train/val separation: each photograph is cut across its longer side; train crops come
from the first 70%, val crops from the last 30% (the held-out strip). No val crop shares a
pixel with any train crop, while val still covers every photograph's kind of content.
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import skimage.data
from PIL import Image
from scipy import ndimage

from srdiff_core.config import DEGRADATIONS as DEGRADATION_NAMES
from srdiff_core.config import DemoSetConfig
from srdiff_core.degradations import degrade

SPLITS = ("train", "val")
VAL_FRACTION = 0.3  # share of each photograph's longer side held out for val

# RGB photographs bundled in the scikit-image wheel (no pooch download; checked with the
# network blocked in tests/test_demo_data.py). Left out: ihc (microscopy), retina (fundus
# photo, mostly black border) and hubble_deep_field (a black sky: rain on it scored 4 dB, blur
# 47 dB, nothing like the benchmarks' scenes) are off-domain for these tasks; colorwheel, logo (RGBA) and
# chessboard are synthetic; eagle, lily, skin, ... are fetched with pooch.
SOURCES: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": skimage.data.astronaut,
    "chelsea": skimage.data.chelsea,
    "coffee": skimage.data.coffee,
    "rocket": skimage.data.rocket,
    "motorcycle": lambda: skimage.data.stereo_motorcycle()[0],  # the left view
}

# Sources whose held-out strip is the start of the longer side: chelsea's last 30% is defocused
# background, where no crop has detail to restore.
VAL_FIRST = frozenset({"chelsea"})

# Crop side as a fraction of the region's shorter side, before resizing to crop_size:
# a random downscale so a 96 px crop shows objects, not just texture.
CROP_FRACTION_RANGE = (0.25, 0.6)
# A crop with less fine detail than this (RMS of its luminance minus a Gaussian blur of it, std
# 1.5 px, on [0, 1]) is sky, wall or a defocused background: blur leaves it at 40+ dB and it
# shows nothing to restore. Up to CROP_TRIES windows are drawn, the first with enough detail
# kept (else the most detailed one), so the set stays a pure function of the seed.
MIN_CROP_DETAIL = 0.03
CROP_TRIES = 16


@dataclass(frozen=True, eq=False)  # eq=False: arrays have no truth value, compare .lq/.gt
class DemoPair:
    """One degraded/clean pair; ``lq`` and ``gt`` are read-only uint8 HxWx3 arrays."""

    id: str
    degradation: str
    split: str
    lq: np.ndarray
    gt: np.ndarray


@functools.lru_cache(maxsize=None)
def load_source(name: str) -> np.ndarray:
    """The named photograph as a read-only uint8 HxWx3 array (decoded once per process)."""
    try:
        image = SOURCES[name]()
    except KeyError:
        raise ValueError(f"unknown demo source {name!r}; valid names: {', '.join(SOURCES)}") from None
    image = np.ascontiguousarray(image[..., :3], dtype=np.uint8)
    image.setflags(write=False)
    return image


def split_region(height: int, width: int, split: str, *, val_first: bool = False) -> tuple[slice, slice]:
    """The (rows, cols) part of an image a split may crop from; train and val never overlap.

    Val takes the last VAL_FRACTION of the longer side, or the first with ``val_first``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    long_axis_is_cols = width >= height
    length = width if long_axis_is_cols else height
    val_length = length - int(round(length * (1.0 - VAL_FRACTION)))
    cut = val_length if val_first else length - val_length
    is_first_part = (split == "val") == val_first
    part = slice(0, cut) if is_first_part else slice(cut, length)
    return (slice(0, height), part) if long_axis_is_cols else (part, slice(0, width))


def _pair_seed(seed: int, degradation: str, split: str, index: int) -> np.random.SeedSequence:
    """Seed for one pair. Names enter as crc32 (stable across processes, unlike hash())."""
    words = [seed, zlib.crc32(degradation.encode()), zlib.crc32(split.encode()), index]
    return np.random.SeedSequence(words)


def _source_order(seed: int, degradation: str, split: str) -> list[str]:
    """A seeded permutation of the sources; pair ``index`` uses entry ``index % n``, which
    spreads pairs evenly over photographs without depending on how many pairs are asked for."""
    rng = np.random.default_rng([seed, zlib.crc32(degradation.encode()), zlib.crc32(split.encode())])
    names = list(SOURCES)
    return [names[i] for i in rng.permutation(len(names))]


def random_crop(image: np.ndarray, split: str, crop_size: int, rng: np.random.Generator, *,
                val_first: bool = False) -> np.ndarray:
    """A random square from the split's region, resized to crop_size and randomly flipped.

    The window side is a random fraction of the region's shorter side, so the resize is a
    downscale (Lanczos, anti-aliased); it is only an upscale when the region is smaller
    than ``crop_size``, where nothing else would fit. Near-flat windows are redrawn
    (``MIN_CROP_DETAIL``).
    """
    rows, cols = split_region(image.shape[0], image.shape[1], split, val_first=val_first)
    region = image[rows, cols]
    best, best_detail = None, -1.0
    for _ in range(CROP_TRIES):
        crop = _window(region, crop_size, rng)
        detail = crop_detail(crop)
        if detail > best_detail:
            best, best_detail = crop, detail
        if detail >= MIN_CROP_DETAIL:
            break
    return best[:, ::-1] if rng.random() < 0.5 else best


def crop_detail(crop: np.ndarray) -> float:
    """RMS fine detail of a uint8 RGB crop: its BT.601 luminance minus a Gaussian blur (std 1.5 px)."""
    luma = (crop.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)) / 255.0
    return float(np.sqrt(np.mean((luma - ndimage.gaussian_filter(luma, 1.5, mode="reflect")) ** 2)))


def _window(region: np.ndarray, crop_size: int, rng: np.random.Generator) -> np.ndarray:
    short_side = min(region.shape[:2])
    fraction = rng.uniform(*CROP_FRACTION_RANGE)
    window = min(short_side, max(crop_size, int(round(fraction * short_side))))
    top = int(rng.integers(0, region.shape[0] - window + 1))
    left = int(rng.integers(0, region.shape[1] - window + 1))
    patch = Image.fromarray(np.ascontiguousarray(region[top:top + window, left:left + window]))
    if window != crop_size:
        patch = patch.resize((crop_size, crop_size), Image.Resampling.LANCZOS)
    return np.asarray(patch)


def to_float(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float32) / 255.0


def to_uint8(image: np.ndarray) -> np.ndarray:
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def make_demo_pair(*, seed: int, degradation: str, split: str, index: int, crop_size: int) -> DemoPair:
    """Pair ``index`` of (degradation, split): a crop and its degraded copy."""
    if seed < 0:  # SeedSequence takes non-negative entropy only
        raise ValueError(f"demo seed must be >= 0, got {seed}; set download.demo.seed to 0 or more")
    source = _source_order(seed, degradation, split)[index % len(SOURCES)]
    # Separate streams for the crop and the degradation: changing one never moves the other.
    crop_seq, degrade_seq = _pair_seed(seed, degradation, split, index).spawn(2)
    gt = np.ascontiguousarray(random_crop(load_source(source), split, crop_size, np.random.default_rng(crop_seq),
                                          val_first=source in VAL_FIRST))
    lq = to_uint8(degrade(degradation, to_float(gt), np.random.default_rng(degrade_seq)))
    gt.setflags(write=False)
    lq.setflags(write=False)
    # The degradation is part of the id: ids are unique over the whole set, because the
    # embedding tables downstream are keyed by id alone.
    return DemoPair(id=f"{degradation}-{split}-{source}-{index:04d}", degradation=degradation, split=split, lq=lq, gt=gt)


def iter_demo_pairs(*, seed: int, crop_size: int, train_per_degradation: int,
                    val_per_degradation: int) -> Iterator[DemoPair]:
    """All demo pairs, degradation by degradation (config.DEGRADATIONS order), train then val."""
    if crop_size < 8:
        raise ValueError(f"crop_size must be >= 8 pixels, got {crop_size}")
    if train_per_degradation < 0 or val_per_degradation < 0:
        raise ValueError("pair counts per degradation must be >= 0, got "
                         f"train={train_per_degradation}, val={val_per_degradation}")
    counts = {"train": train_per_degradation, "val": val_per_degradation}
    for degradation in DEGRADATION_NAMES:
        for split in SPLITS:
            for index in range(counts[split]):
                yield make_demo_pair(seed=seed, degradation=degradation, split=split,
                                     index=index, crop_size=crop_size)


def iter_demo_pairs_from_config(cfg: DemoSetConfig) -> Iterator[DemoPair]:
    """:func:`iter_demo_pairs` with the arguments taken from ``download.demo``."""
    return iter_demo_pairs(seed=cfg.seed, crop_size=cfg.crop_size,
                           train_per_degradation=cfg.train_per_degradation,
                           val_per_degradation=cfg.val_per_degradation)


def demo_pair_count(cfg: DemoSetConfig) -> int:
    """How many pairs :func:`iter_demo_pairs_from_config` yields (without making them)."""
    return len(DEGRADATION_NAMES) * (cfg.train_per_degradation + cfg.val_per_degradation)
