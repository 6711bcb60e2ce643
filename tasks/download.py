"""Download stage: make `datasets/{train,val}/<degradation>/{LQ,GT}/<id>.png` and the manifest."""

from __future__ import annotations

import io
import time
from collections import Counter

import numpy as np
import pyarrow as pa
from PIL import Image
from prefect import task

from srdiff_core import demo_data
from srdiff_core.config import DEGRADATIONS, Config
from storage import fs, tables
from tasks import common
from tasks.common import RateLogger, StageResult, stage_logger

MANIFEST = "manifests/pairs.parquet"
QUARANTINE = "manifests/quarantine.parquet"
SPLITS = ("train", "val")


def encode_png(img: np.ndarray) -> bytes:
    """Deterministic PNG bytes (fixed compression level, no metadata chunks)."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def pair_urls(cfg: Config, split: str, degradation: str, sample_id: str) -> tuple[str, str]:
    base = common.path(cfg, "datasets", split, degradation)
    return fs.join(base, "LQ", f"{sample_id}.png"), fs.join(base, "GT", f"{sample_id}.png")


def write_pair(cfg: Config, pair: demo_data.DemoPair) -> dict:
    """Write one LQ/GT pair atomically and return its manifest row."""
    lq_url, gt_url = pair_urls(cfg, pair.split, pair.degradation, pair.id)
    lq_png, gt_png = encode_png(pair.lq), encode_png(pair.gt)
    fs.atomic_write_bytes(lq_url, lq_png)
    fs.atomic_write_bytes(gt_url, gt_png)
    height, width = pair.gt.shape[:2]
    return {"id": pair.id, "dataset": "demo", "degradation": pair.degradation, "split": pair.split,
            "lq_path": lq_url, "gt_path": gt_url, "width": width, "height": height,
            "lq_sha256": fs.sha256_bytes(lq_png), "gt_sha256": fs.sha256_bytes(gt_png)}


def materialize_demo_set(cfg: Config, log) -> list[dict]:
    demo = cfg.download.demo
    total = demo_data.demo_pair_count(demo)
    progress = RateLogger(log, "demo set", total, "pairs")
    rows = []
    for pair in demo_data.iter_demo_pairs_from_config(demo):
        rows.append(write_pair(cfg, pair))
        progress.update()
    return rows


def scan_seed_layout(cfg: Config, log) -> tuple[list[dict], list[dict]]:
    """Index a folder already in the seed layout (e.g. from the SR-Diff code), joining LQ and GT
    by file name (the id), never by sorted order; unmatched files go to quarantine."""
    rows, quarantine = [], []
    for split in SPLITS:
        for degradation in DEGRADATIONS:
            base = common.path(cfg, "datasets", split, degradation)
            lq = {_stem(u): u for u in fs.glob(fs.join(base, "LQ", "*.png"))}
            gt = {_stem(u): u for u in fs.glob(fs.join(base, "GT", "*.png"))}
            for sample_id in sorted(lq.keys() | gt.keys()):
                if sample_id not in gt or sample_id not in lq:
                    missing = "GT" if sample_id not in gt else "LQ"
                    quarantine.append({"id": sample_id, "split": split, "degradation": degradation,
                                       "path": lq.get(sample_id) or gt.get(sample_id),
                                       "reason": f"missing {missing} partner"})
                    continue
                row = _pair_row(sample_id, split, degradation, lq[sample_id], gt[sample_id])
                if isinstance(row, str):
                    quarantine.append({"id": sample_id, "split": split, "degradation": degradation,
                                       "path": lq[sample_id], "reason": row})
                else:
                    rows.append(row)
    log.info(f"seed layout: {len(rows)} good pairs, {len(quarantine)} quarantined")
    return rows, quarantine


def _stem(url: str) -> str:
    return url.rsplit("/", 1)[-1].rsplit(".", 1)[0]


def _pair_row(sample_id: str, split: str, degradation: str, lq_url: str, gt_url: str) -> dict | str:
    """A manifest row, or the reason the pair is rejected."""
    lq_bytes, gt_bytes = fs.read_bytes(lq_url), fs.read_bytes(gt_url)
    try:
        lq_img, gt_img = Image.open(io.BytesIO(lq_bytes)), Image.open(io.BytesIO(gt_bytes))
        lq_img.load(), gt_img.load()
    except Exception as e:  # PIL raises many types for truncated/corrupt files
        return f"unreadable image: {e}"
    if lq_img.size != gt_img.size:
        return f"size mismatch: LQ {lq_img.size} vs GT {gt_img.size}"
    width, height = gt_img.size
    return {"id": sample_id, "dataset": "local", "degradation": degradation, "split": split,
            "lq_path": lq_url, "gt_path": gt_url, "width": width, "height": height,
            "lq_sha256": fs.sha256_bytes(lq_bytes), "gt_sha256": fs.sha256_bytes(gt_bytes)}


def drop_duplicate_ids(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """Ids key every table downstream, so they must be unique over the whole manifest: the
    first pair (in split/degradation/id order) stays, later ones are quarantined."""
    seen: dict[str, dict] = {}
    kept, rejected = [], []
    for r in sorted(rows, key=lambda r: (r["split"], r["degradation"], r["id"])):
        if r["id"] in seen:
            first = seen[r["id"]]
            rejected.append({"id": r["id"], "split": r["split"], "degradation": r["degradation"],
                             "path": r["lq_path"], "reason": f"duplicate id (already used by "
                                                              f"{first['split']}/{first['degradation']})"})
        else:
            seen[r["id"]] = r
            kept.append(r)
    return kept, rejected


def summarize(rows: list[dict]) -> dict[str, float]:
    counts = Counter((r["split"], r["degradation"]) for r in rows)
    return {f"pairs/{split}/{deg}": float(n) for (split, deg), n in sorted(counts.items())}


@task(name="download", persist_result=True)
def download(cfg: Config, key: str, run_id: str | None = None) -> StageResult:
    """Materialise the dataset in the seed layout and write the pairs manifest."""
    log = stage_logger()
    start = time.perf_counter()
    quarantine: list[dict] = []
    if cfg.download.source == "demo":
        rows = materialize_demo_set(cfg, log)
    else:
        rows, quarantine = scan_seed_layout(cfg, log)
        if not rows:
            raise FileNotFoundError(
                f"no image pairs under {common.path(cfg, 'datasets')}: put the datasets there in the layout "
                f"datasets/{{train,val}}/<degradation>/{{LQ,GT}}/<id>.png, or run the demo with "
                f"`srdiff demo` (download.source: demo)")
    rows, duplicates = drop_duplicate_ids(rows)
    quarantine += duplicates
    manifest = pa.Table.from_pylist(rows, schema=tables.PAIRS_SCHEMA)
    manifest_url = common.path(cfg, MANIFEST)
    tables.write_table(manifest_url, manifest)
    quarantine_url = common.path(cfg, QUARANTINE)
    tables.write_table(quarantine_url, pa.Table.from_pylist(
        quarantine, schema=pa.schema([("id", pa.string()), ("split", pa.string()), ("degradation", pa.string()),
                                      ("path", pa.string()), ("reason", pa.string())])))
    metrics = {**summarize(rows), "pairs/total": float(len(rows)), "quarantined": float(len(quarantine))}
    log.info(f"manifest: {len(rows)} pairs -> {manifest_url}")
    return StageResult(stage="download", key=key, digest=tables.table_digest(manifest),
                       outputs={"manifest": manifest_url, "quarantine": quarantine_url},
                       metrics=metrics, params={"download.source": cfg.download.source},
                       run_id=run_id, seconds=time.perf_counter() - start)
