"""Shard stage: pack the manifest's pairs into deterministic WebDataset tars."""

from __future__ import annotations

import time

from prefect import task

from srdiff_core.config import Config
from storage import shards, tables
from tasks.common import RateLogger, StageResult, stage_dir, stage_logger


@task(name="shard", persist_result=True)
def shard(cfg: Config, key: str, manifest_url: str, run_id: str | None = None) -> StageResult:
    """Write WebDataset shards (lq.png, gt.png, json) and their index from the manifest."""
    log = stage_logger()
    start = time.perf_counter()
    manifest = tables.read_table(manifest_url, hint="the download stage (`srdiff run --stages download`)")
    out_url = stage_dir(cfg, "shards", key)
    progress = RateLogger(log, "shards", None, "shards")
    index = shards.write_shards(manifest, out_url, maxcount=cfg.shard.maxcount, maxsize=cfg.shard.maxsize,
                                workers=cfg.shard.workers, check_sources=cfg.shard.check_sources,
                                progress=lambda done, total: progress.update(1))
    # No verify_shards here: the writer hashes what it writes into the index and refuses a source
    # whose size changed since planning (and, with shard.check_sources, whose sha256 differs from
    # the manifest); a second full read belongs to `srdiff verify-shards`.
    total_bytes = sum(index.column("bytes").to_pylist())
    seconds = time.perf_counter() - start
    log.info(f"{index.num_rows} shards, {manifest.num_rows} pairs, {total_bytes / 2**20:.1f} MiB "
             f"in {seconds:.1f} s -> {out_url}")
    return StageResult(stage="shard", key=key, digest=tables.table_digest(index),
                       outputs={"shards": out_url, "index": f"{out_url}/index.parquet"},
                       metrics={"shards/count": float(index.num_rows), "shards/pairs": float(manifest.num_rows),
                                "shards/mib": total_bytes / 2**20, "shards/seconds": seconds},
                       params={"shard.maxcount": cfg.shard.maxcount, "shard.maxsize": cfg.shard.maxsize,
                               "shard.check_sources": cfg.shard.check_sources},
                       run_id=run_id, seconds=seconds)
