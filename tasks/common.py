"""What every stage task shares: the result type, cache keys, data-root layout, device choice."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

import logging

import torch
from prefect import get_run_logger
from prefect.exceptions import MissingContextError

from srdiff_core.config import Config
from storage import fs


@dataclass
class StageResult:
    """What a finished stage hands downstream (and what Prefect's cache stores).

    ``digest`` identifies the stage's output by content: downstream cache keys are built from
    it, never from paths, so an identical rerun of an upstream stage keeps everything after it
    cached. ``run_id`` is the MLflow run that produced the outputs; a cache hit returns the
    original run id, which is how the flow knows the stage was reused.
    """

    stage: str
    key: str
    digest: str
    outputs: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = None
    seconds: float = 0.0


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def stage_key(stage: str, cfg: Config, sections: tuple[str, ...], upstream: dict[str, str],
              code: str) -> str:
    """Content key of a stage: upstream output digests + its config sections + its code (the
    digest of its import closure, tasks.closure)."""
    return sha256_json({
        "stage": stage,
        "data_root": data_root(cfg),
        "config": cfg.section_digest(*sections),
        "upstream": upstream,
        "code": code,
    })


RANDOM_WEIGHTS_NOTE = "random CLIP weights (embed.pretrained: none): semantic guidance is not meaningful"


def data_root(cfg: Config) -> str:
    """The data root as an absolute URL (local paths are made absolute)."""
    filesystem, path = fs.resolve(cfg.data_root)
    return cfg.data_root if "://" in cfg.data_root else path


def path(cfg: Config, *parts: str) -> str:
    return fs.join(data_root(cfg), *parts)


def pair_urls(cfg: Config, split: str, degradation: str, sample_id: str) -> tuple[str, str]:
    """Where a pair lives in the seed layout: datasets/<split>/<degradation>/{LQ,GT}/<id>.png."""
    base = path(cfg, "datasets", split, degradation)
    return fs.join(base, "LQ", f"{sample_id}.png"), fs.join(base, "GT", f"{sample_id}.png")


def stage_dir(cfg: Config, stage: str, key: str) -> str:
    """Outputs of a stage live in a folder named by its key, so a changed setting never
    overwrites what an earlier cached run still points at."""
    return path(cfg, stage, key[:16])


def stage_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a run (lines reach the UI), a plain logger when a task's
    logic is called directly (``task.fn(...)`` in a notebook or a test)."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("srdiff")


def pick_device(cfg: Config) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was requested but no CUDA device is visible; "
                           "set device: auto or device: cpu")
    if cfg.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


class RateLogger:
    """Per-step progress lines with rates, at most one every ``every_s`` seconds."""

    def __init__(self, log, what: str, total: int | None, unit: str, every_s: float = 5.0):
        self.log, self.what, self.total, self.unit, self.every_s = log, what, total, unit, every_s
        self.start = self.last = time.perf_counter()
        self.done = 0

    def update(self, n: int = 1, extra: str = "") -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every_s or (self.total is not None and self.done >= self.total):
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            of = f"/{self.total}" if self.total is not None else ""
            self.log.info(f"{self.what}: {self.done}{of} {self.unit} ({rate:.1f} {self.unit}/s){extra}")
