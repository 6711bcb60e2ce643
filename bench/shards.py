"""Shard-stage benchmark: writer throughput against `tar`, writer peak memory, loader throughput.

One run on one disk: synthetic PNG pairs are generated (not timed), then

1. write throughput of `storage.shards.write_shards` (workers = cores; as the shard stage runs
   it, and with check_sources=True) against the system `tar -cf` of the same files, with and
   without an fsync of the result, in MB/s of PNG payload and pairs/s, the variants
   interleaved round by round;
2. peak resident memory of the writer at each pair count, each in a fresh Python process;
3. decoded, cropped, augmented pairs/s of `PairDataset` through `make_loader` at several
   DataLoader worker counts: one exact pass (evaluation's mode), and the training loader
   (resampled shards, shuffle buffer, embeddings joined by id) for as many pairs.

A table is printed last and a JSON file written. CI runs the same code at toy size (`--toy`,
see tests/test_bench_shards.py).

    python bench/shards.py [--pairs 1000,10000] [--repeats 3] [--out bench/out/shards.json] [--toy] [--workdir DIR]

Targets (issue 4): writer throughput >= 0.8x `tar -cf`; the writer's own peak memory (above
the process's RSS before write_shards) at 10,000 pairs within 10% of that at 1,000 pairs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import finish  # noqa: E402
from srdiff_core.config import ShardConfig, TrainConfig  # noqa: E402
from srdiff_core.data import PairDataset, make_loader  # noqa: E402
from storage import shards, tables  # noqa: E402

# (degradation, dataset) as in DESIGN.md: pairs are dealt round-robin so every pair count
# gives four groups, hence several shards for the writer's threads to share.
GROUPS = (("hazy", "RESIDE-6k"), ("rainy", "Rain100H"), ("motion-blurry", "GoPro"), ("low-light", "LOL"))
SPLIT = "train"
MB = 1e6  # throughput in decimal megabytes, as `dd` and most disk benchmarks report it
WRITE_TARGET = 0.8   # ours / tar
MEMORY_TARGET = 1.10  # the writer's own peak at the largest / at the smallest pair count
CACHE_NOTE = ("page cache warm: dropping it needs root, so every variant runs once untimed "
              "before its timed runs")


@dataclass(frozen=True)
class Sizes:
    """Everything that scales between the real benchmark and CI's toy run."""

    pairs: tuple[int, ...]         # write and memory rows; the loader reads the largest
    side: int                      # synthetic images are side x side RGB
    read_workers: tuple[int, ...]  # DataLoader num_workers
    repeats: int                   # timed write runs per variant (median reported)
    batch_size: int
    patch_size: int


FULL = Sizes(pairs=(1000, 10000), side=96, read_workers=(1, 2, 4), repeats=3, batch_size=16, patch_size=64)
TOY = Sizes(pairs=(40, 80), side=96, read_workers=(0, 1), repeats=1, batch_size=8, patch_size=64)


def cores() -> int:
    """CPUs this process may run on (os.cpu_count() ignores affinity masks and cgroups' cpusets)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------
# Synthetic pairs: deterministic per index, compressible like photographs (smooth GT) with a
# noisier LQ, so PNG sizes are realistic rather than those of white noise or flat colour.

def pair_arrays(index: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """(LQ, GT) uint8 side x side x 3: GT a bicubic upsampling of a coarse random grid, LQ = GT + noise."""
    rng = np.random.default_rng([20261126, index])
    coarse = rng.integers(0, 256, (max(side // 16, 2),) * 2 + (3,), dtype=np.uint8)
    gt = np.asarray(Image.fromarray(coarse).resize((side, side), Image.Resampling.BICUBIC))
    noise = rng.normal(0.0, 3.0, gt.shape)
    lq = np.clip(np.rint(gt * 0.8 + 16 + noise), 0, 255).astype(np.uint8)
    return lq, gt


def png_bytes(img: np.ndarray) -> bytes:
    # zlib level 1: 2x faster to generate than Pillow's default 6 and only ~15% larger files.
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def pair_id(index: int) -> str:
    return f"{GROUPS[index % len(GROUPS)][0]}-{index:06d}"


def pair_paths(root: Path, index: int) -> tuple[Path, Path]:
    # The seed layout of DESIGN.md: <split>/<degradation>/{LQ,GT}/<id>.png
    folder = root / SPLIT / GROUPS[index % len(GROUPS)][0]
    name = f"{pair_id(index)}.png"
    return folder / "LQ" / name, folder / "GT" / name


def write_pair(root: Path, index: int, side: int) -> dict:
    """Write one pair's PNGs and return its manifest row (sha256 of the bytes written)."""
    lq, gt = pair_arrays(index, side)
    lq_path, gt_path = pair_paths(root, index)
    row = {"id": pair_id(index), "dataset": GROUPS[index % len(GROUPS)][1],
           "degradation": GROUPS[index % len(GROUPS)][0], "split": SPLIT,
           "lq_path": str(lq_path), "gt_path": str(gt_path), "width": side, "height": side}
    for path, img, side_name in ((lq_path, lq, "lq"), (gt_path, gt, "gt")):
        data = png_bytes(img)
        path.write_bytes(data)
        row[f"{side_name}_sha256"] = hashlib.sha256(data).hexdigest()
        row[f"{side_name}_bytes"] = len(data)  # as the download stage records them
    return row


def generate_pairs(root: Path, count: int, side: int) -> pa.Table:
    """``count`` pairs under ``root`` and their manifest (PAIRS_SCHEMA), in index order."""
    for degradation, _ in GROUPS:
        for part in ("LQ", "GT"):
            (root / SPLIT / degradation / part).mkdir(parents=True, exist_ok=True)
    return pa.Table.from_pylist([write_pair(root, i, side) for i in range(count)], schema=tables.PAIRS_SCHEMA)


def payload_bytes(manifest: pa.Table) -> int:
    return sum(os.path.getsize(p) for col in ("lq_path", "gt_path") for p in manifest.column(col).to_pylist())


# ---------------------------------------------------------------------------------------------
# Write throughput: ours against `tar -cf`.

def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cpu_seconds() -> float:
    """User + system CPU time of this process (all its threads) and of its waited-for children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def write_ours(manifest: pa.Table, out_dir: Path, workers: int, *, check_sources: bool = False) -> None:
    cfg = ShardConfig()
    shards.write_shards(manifest, str(out_dir), maxcount=cfg.maxcount, maxsize=cfg.maxsize, workers=workers,
                        check_sources=check_sources)


def write_tar(root: Path, file_list: Path, out_tar: Path, *, fsync: bool) -> None:
    """GNU/BSD `tar -cf` of the listed files (relative to ``root``); optionally fsync the result.

    The fsync variant matches what write_shards promises (storage.fs fsyncs before renaming),
    so the two columns bracket a fair comparison.
    """
    subprocess.run(["tar", "-cf", str(out_tar), "-C", str(root), "-T", str(file_list)], check=True)
    if fsync:
        fd = os.open(out_tar, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def tar_file_list(manifest: pa.Table, root: Path, path: Path) -> Path:
    rows = manifest.to_pylist()
    names = [os.path.relpath(r[k], root) for r in rows for k in ("lq_path", "gt_path")]
    path.write_text("\n".join(names) + "\n")
    return path


def time_variants(runs: dict[str, Callable[[Path], None]], scratch: Path, repeats: int,
                  keep: dict[str, Path]) -> dict[str, list[tuple[float, float]]]:
    """One untimed warm-up round, then ``repeats`` timed rounds; (wall, CPU) seconds per variant.

    Every round runs each variant once, starting one place further down the list each time,
    so a slow spell of a shared machine hits all variants alike instead of the one that
    happened to run then. Each run writes into a fresh path; the last timed output of a
    variant named in ``keep`` is moved there, everything else is deleted outside the timing.
    """
    names = list(runs)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for attempt in range(repeats + 1):
        for name in names[attempt % len(names):] + names[:attempt % len(names)]:
            target = scratch / f"run-{name}-{attempt}"
            cpu = cpu_seconds()
            seconds = timed(lambda: runs[name](target))
            if attempt:
                times[name].append((seconds, cpu_seconds() - cpu))
            if attempt == repeats and name in keep:
                target.rename(keep[name])
            else:
                remove(target)
    return times


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def rate_row(times: list[tuple[float, float]], pairs: int, payload: int) -> dict:
    seconds = statistics.median(wall for wall, _ in times)
    # CPU time next to wall time: on a shared machine it shows how much of a second core a
    # run got, and CPU/wall ratios between variants hold whatever else is running.
    return {"seconds": seconds, "all_seconds": [wall for wall, _ in times],
            "cpu_seconds": statistics.median(cpu for _, cpu in times), "pairs_per_s": pairs / seconds,
            "mb_per_s": payload / MB / seconds}


def bench_write(manifest: pa.Table, image_root: Path, scratch: Path, keep: Path, *, workers: int,
                repeats: int) -> dict:
    """Timed rows for ours (as the shard stage runs it, and with check_sources), `tar -cf` and
    `tar -cf` + fsync, on the same files, interleaved (time_variants)."""
    pairs, payload = manifest.num_rows, payload_bytes(manifest)
    file_list = tar_file_list(manifest, image_root, scratch / f"files-{pairs}.txt")
    runs = {
        "ours": lambda out: write_ours(manifest, out, workers),
        "ours+check": lambda out: write_ours(manifest, out, workers, check_sources=True),
        "tar": lambda out: write_tar(image_root, file_list, out, fsync=False),
        "tar+fsync": lambda out: write_tar(image_root, file_list, out, fsync=True),
    }
    times = time_variants(runs, scratch, repeats, {"ours": keep})
    rows = {name: rate_row(seconds, pairs, payload) for name, seconds in times.items()}
    rows["ours"]["shard_bytes"] = sum(shards.read_index(str(keep)).column("bytes").to_pylist())
    file_list.unlink()
    return {"pairs": pairs, "payload_bytes": payload, "workers": workers, "rows": rows,
            "ratio_vs_tar": rows["ours"]["mb_per_s"] / rows["tar"]["mb_per_s"],
            "ratio_vs_tar_fsync": rows["ours"]["mb_per_s"] / rows["tar+fsync"]["mb_per_s"],
            # The same ratio round by round (tar and ours ran seconds apart), then the median:
            # a check that the ratio of medians is not an artefact of when each ran.
            "ratio_vs_tar_by_round": statistics.median(t[0] / o[0] for o, t in zip(times["ours"], times["tar"]))}


# ---------------------------------------------------------------------------------------------
# Peak memory: the writer alone in a fresh interpreter, so earlier work in this process (and
# the other pair count) cannot raise the high-water mark.

def proc_status_kib(field: str) -> int | None:
    """A `VmRSS`/`VmHWM`-style line of /proc/self/status in KiB (None where /proc is absent)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS: "echo 5 > /proc/PID/clear_refs" (proc(5), Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child_write(manifest_url: str, out_dir: str, workers: int) -> dict:
    """Run in the fresh process: read the manifest and write the shards; report memory in MiB.

    ``writer_mib`` is the writer's own share: the peak while write_shards runs above the RSS
    just before it, with the imports (torch, pyarrow) done and the manifest, its input, read.
    ``manifest_mib`` is what reading the manifest added (Parquet decoding; it grows with the
    pair count as the table does), and ``peak_mib`` (ru_maxrss) the whole process.
    """
    import_kib = proc_status_kib("VmRSS")
    manifest = tables.read_table(manifest_url)
    warm_parquet_writer(Path(out_dir).with_name(Path(out_dir).name + "-warm.parquet"))
    # Arrow's allocator keeps the pages of the reader's freed buffers for its own reuse; they
    # are not the writer's, so they go back before its baseline.
    pa.default_memory_pool().release_unused()
    baseline_kib = proc_status_kib("VmRSS")
    hwm_reset = reset_peak_rss()
    write_ours(manifest, Path(out_dir), workers)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    hwm_kib = proc_status_kib("VmHWM")
    row = {"pairs": manifest.num_rows, "peak_mib": peak_kib / 1024}
    if baseline_kib is not None and hwm_kib is not None:
        # Where the peak could not be reset, it may be the manifest read's: an upper bound.
        row.update(after_import_mib=import_kib / 1024, manifest_mib=(baseline_kib - import_kib) / 1024,
                   writer_mib=(hwm_kib - baseline_kib) / 1024, peak_reset=hwm_reset)
    return row


def warm_parquet_writer(path: Path) -> None:
    """Write (and delete) a one-row Parquet file, as the writer's index is written.

    Arrow's Parquet writer takes ~2 MiB on its first use in a process, whatever it writes, and
    the shard stage's process has read Parquet but not written it: like the imports, that
    one-time cost comes before the writer's baseline. Left in, it counted at 1,000 pairs but
    not at 10,000, whose larger manifest read had left pages the index write reused.
    """
    tables.write_table(str(path), [{"shard": "", "count": 0}],
                       schema=pa.schema([("shard", pa.string()), ("count", pa.int64())]))
    path.unlink()


def measure_writer_memory(manifest: pa.Table, scratch: Path, workers: int) -> dict:
    manifest_url = scratch / f"manifest-{manifest.num_rows}.parquet"
    tables.write_table(str(manifest_url), manifest)
    out_dir = scratch / f"memory-{manifest.num_rows}"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-write", str(manifest_url), str(out_dir), str(workers)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode:
        raise RuntimeError(f"the writer subprocess failed ({done.returncode}):\n{done.stderr[-4000:]}")
    remove(out_dir)
    manifest_url.unlink()
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Loader throughput: one exact pass over every shard (evaluation's mode), and the training
# loader as the train stage builds it (resampled shards, shuffle buffer, embeddings joined).

EMBED_DIM = 512  # ViT-B-32's CLIP embedding width


def bench_read(urls: list[str], *, workers: int, batch_size: int, patch_size: int,
               train_pairs: int | None = None) -> dict:
    """Pairs/s of decoded, cropped, augmented tensors out of make_loader, worker start-up included.

    ``train_pairs``: read that many pairs through the training loader instead of one exact pass.
    """
    if train_pairs is None:
        dataset = PairDataset(urls, patch_size=patch_size, augment=True, resampled=False)
    else:
        ids = [s["id"] for s in shards.iter_samples(urls)]  # not timed
        vectors = np.random.default_rng(0).standard_normal((len(ids), EMBED_DIM), dtype=np.float32)
        dataset = PairDataset(urls, patch_size=patch_size, augment=True, resampled=True,
                                     shuffle_buffer=TrainConfig().shuffle_buffer, embeddings=dict(zip(ids, vectors)))
    pairs = 0
    with warnings.catch_warnings():
        # More workers than cores is asked for on purpose (the table shows what it costs).
        warnings.filterwarnings("ignore", message="This DataLoader will create")
        loader = make_loader(dataset, batch_size=batch_size, num_workers=workers)
        start = time.perf_counter()
        for batch in loader:
            expected = (len(batch["id"]), 3, patch_size, patch_size)
            if tuple(batch["lq"].shape) != expected or tuple(batch["gt"].shape) != expected:
                raise AssertionError(f"loader gave LQ {tuple(batch['lq'].shape)}, GT "
                                     f"{tuple(batch['gt'].shape)}; expected {expected}")
            if train_pairs is not None and tuple(batch["context"].shape) != (len(batch["id"]), EMBED_DIM):
                raise AssertionError(f"loader gave context {tuple(batch['context'].shape)}")
            pairs += len(batch["id"])
            if train_pairs is not None and pairs >= train_pairs:
                break
        seconds = time.perf_counter() - start
    return {"workers": workers, "pairs": pairs, "seconds": seconds, "pairs_per_s": pairs / seconds,
            "tensors_per_s": 2 * pairs / seconds}


# ---------------------------------------------------------------------------------------------

def machine() -> dict:
    tar_version = subprocess.run(["tar", "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    return {"cpus": cores(), "platform": platform.platform(), "python": platform.python_version(),
            "tar": tar_version[0] if tar_version else "unknown",
            "date": dt.date.today().isoformat()}


def run(sizes: Sizes, workdir: Path) -> dict:
    workers = cores()
    results: dict = {"machine": machine(), "sizes": repr(sizes), "workdir": str(workdir), "repeats": sizes.repeats,
                     "cache": CACHE_NOTE, "shard_config": ShardConfig().model_dump()}
    image_root, scratch = workdir / "images", workdir / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    manifest = generate_pairs(image_root, max(sizes.pairs), sizes.side)
    results["generate_seconds"] = time.perf_counter() - start
    results["images"] = {"side": sizes.side, "mean_png_bytes": payload_bytes(manifest) / (2 * manifest.num_rows)}
    print(f"generated {manifest.num_rows} pairs of {sizes.side}x{sizes.side} PNGs in "
          f"{results['generate_seconds']:.1f} s (not timed below)", flush=True)

    results["write"], results["shards"] = {}, {}
    for pairs in sizes.pairs:
        keep = workdir / f"shards-{pairs}"
        results["write"][str(pairs)] = bench_write(manifest.slice(0, pairs), image_root, scratch, keep,
                                                   workers=workers, repeats=sizes.repeats)
        results["shards"][str(pairs)] = str(keep)
        print(f"write {pairs}:", json.dumps(results["write"][str(pairs)]["rows"]), flush=True)

    results["memory"] = {str(p): measure_writer_memory(manifest.slice(0, p), scratch, workers) for p in sizes.pairs}
    print("memory:", json.dumps(results["memory"]), flush=True)

    largest = str(max(sizes.pairs))
    for out_url in results["shards"].values():
        shards.verify_shards(out_url, workers=workers)
    results["checks"] = {"shards_verified": True}
    urls = shards.shard_urls(results["shards"][largest], split=SPLIT)
    results["read"] = {"pairs": int(largest), "shards": len(urls), "batch_size": sizes.batch_size,
                       "patch_size": sizes.patch_size, "rows": {}}
    for n in sizes.read_workers:
        row = bench_read(urls, workers=n, batch_size=sizes.batch_size, patch_size=sizes.patch_size)
        if row["pairs"] != int(largest):
            raise AssertionError(f"the loader read {row['pairs']} pairs with {n} workers, expected {largest}")
        results["read"]["rows"][str(n)] = row
        print(f"read, {n} workers:", json.dumps(row), flush=True)
    results["read"]["train_rows"] = {}
    for n in sizes.read_workers:
        row = bench_read(urls, workers=n, batch_size=sizes.batch_size, patch_size=sizes.patch_size,
                         train_pairs=int(largest))
        results["read"]["train_rows"][str(n)] = row
        print(f"read (training loader), {n} workers:", json.dumps(row), flush=True)
    results["targets"] = targets(results)
    return results


def targets(results: dict) -> dict:
    write = {p: w["ratio_vs_tar"] for p, w in results["write"].items()}
    rows = [results["memory"][p] for p in sorted(results["memory"], key=int)]
    # The writer's own share: the whole-process peak is ~560 MiB of imports (torch) plus the
    # manifest, which would hide a writer that grows with the dataset.
    memory_ratio = ratio([row.get("writer_mib", math.nan) for row in rows])
    return {"write_ratio_vs_tar": write, "write_met": all(r >= WRITE_TARGET for r in write.values()),
            "memory_ratio": memory_ratio, "memory_met": memory_ratio <= MEMORY_TARGET,
            "process_memory_ratio": ratio([row["peak_mib"] for row in rows])}


def ratio(values: list[float]) -> float:
    """Last over first (NaN where the first is not positive or either is missing)."""
    return values[-1] / values[0] if values[0] > 0 else math.nan


def table(results: dict) -> str:
    m = results["machine"]
    lines = [f"machine: {m['cpus']} CPUs, {m['platform']}, python {m['python']}, {m['tar']}, {m['date']}",
             f"data: synthetic {results['images']['side']}x{results['images']['side']} PNG pairs, mean "
             f"{results['images']['mean_png_bytes'] / 1e3:.1f} kB per file; same disk for every row",
             f"note: {results['cache']}; throughput in MB (1e6 bytes) of PNG payload, median of "
             f"{results['repeats']} timed rounds, each running every write variant once (order rotating)",
             "write_shards checks every source's size; check_sources=True also re-hashes it against the "
             "manifest sha256 (off in the shard stage); cpu s = user+system CPU of all threads (tar: its process)",
             "",
             f"{'write':<28} {'pairs':>6} {'seconds':>8} {'cpu s':>7} {'MB/s':>8} {'pairs/s':>9} {'x tar':>6} "
             f"{'x tar+fsync':>11}"]
    for pairs, w in results["write"].items():
        for name, row in w["rows"].items():
            label = {"ours": f"write_shards ({w['workers']} thr)", "ours+check": "  same, check_sources=True",
                     "tar": "tar -cf", "tar+fsync": "tar -cf + fsync"}[name]
            lines.append(f"{label:<28} {pairs:>6} {row['seconds']:>8.3f} {row['cpu_seconds']:>7.3f} {row['mb_per_s']:>8.1f} "
                         f"{row['pairs_per_s']:>9.0f} {row['mb_per_s'] / w['rows']['tar']['mb_per_s']:>6.2f} "
                         f"{row['mb_per_s'] / w['rows']['tar+fsync']['mb_per_s']:>11.2f}")
    lines += ["", "memory: peak = ru_maxrss of a fresh process; imports = its RSS after importing (torch, "
                  "pyarrow...); manifest = what reading the manifest added; writer = the peak while "
                  "write_shards runs above the RSS just before it",
              f"{'writer memory (fresh proc)':<26} {'pairs':>6} {'peak MiB':>9} {'imports':>8} {'manifest':>8} "
              f"{'writer':>8}"]
    for pairs, row in results["memory"].items():
        lines.append(f"{'write_shards':<26} {pairs:>6} {row['peak_mib']:>9.1f} "
                     f"{row.get('after_import_mib', math.nan):>8.1f} {row.get('manifest_mib', math.nan):>8.1f} "
                     f"{row.get('writer_mib', math.nan):>8.1f}"
                     + ("" if row.get("peak_reset", True) else "  (peak not reset: an upper bound)"))
    r = results["read"]
    lines += ["", f"read: one pass over {r['pairs']} pairs in {r['shards']} shards, worker start-up included, "
                  f"{m['cpus']} CPUs; tensors/s counts LQ and GT",
              f"{'read (PairDataset, exact)':<26} {'workers':>7} {'pairs':>6} {'seconds':>8} "
                  f"{'pairs/s':>8} {'tensors/s':>9}"]
    for n, row in r["rows"].items():
        lines.append(f"{'make_loader b' + str(r['batch_size']) + ' p' + str(r['patch_size']):<26} {n:>7} "
                     f"{row['pairs']:>6} {row['seconds']:>8.2f} {row['pairs_per_s']:>8.0f} {row['tensors_per_s']:>9.0f}")
    lines += [f"{'read (training loader)':<26} resampled shards, shuffle buffer {TrainConfig().shuffle_buffer}, "
              f"{EMBED_DIM}-d embeddings joined by id"]
    for n, row in r.get("train_rows", {}).items():
        lines.append(f"{'make_loader b' + str(r['batch_size']) + ' p' + str(r['patch_size']):<26} {n:>7} "
                     f"{row['pairs']:>6} {row['seconds']:>8.2f} {row['pairs_per_s']:>8.0f} {row['tensors_per_s']:>9.0f}")
    t = results["targets"]
    ratios = ", ".join(f"{p}: {v:.2f} (by round {results['write'][p]['ratio_vs_tar_by_round']:.2f})"
                       for p, v in t["write_ratio_vs_tar"].items())
    lines += ["", f"target write_shards >= {WRITE_TARGET}x tar -cf: {ratios} -> "
                  f"{'met' if t['write_met'] else 'NOT met'}",
              f"target writer's own peak memory at {max(results['memory'], key=int)} pairs within "
              f"{MEMORY_TARGET - 1:.0%} of {min(results['memory'], key=int)}: ratio {t['memory_ratio']:.3f} -> "
              f"{'met' if t['memory_met'] else 'NOT met'} (whole process: {t['process_memory_ratio']:.3f}x)",
              f"checks: {json.dumps(results['checks'])}"]
    return "\n".join(lines)


def parse_pairs(text: str) -> tuple[int, ...]:
    pairs = tuple(int(p) for p in text.split(","))
    if len(pairs) < 2 or min(pairs) < len(GROUPS):
        raise argparse.ArgumentTypeError(f"--pairs needs at least two counts of >= {len(GROUPS)} pairs "
                                         f"(one per degradation), e.g. 1000,10000; got {text!r}")
    return tuple(sorted(set(pairs)))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toy", action="store_true", help="tiny sizes (CI)")
    parser.add_argument("--pairs", type=parse_pairs, default=None, help="pair counts, e.g. 1000,10000")
    parser.add_argument("--side", type=int, default=None,
                        help="image side in pixels (default 96; e.g. 720 for GoPro-sized PNGs)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed write rounds per pair count (default 3; more on a busy machine)")
    parser.add_argument("--out", default=None, help="JSON output (default bench/out/shards.json)")
    parser.add_argument("--workdir", default=None,
                        help="folder for images and shards, kept afterwards (default: a temporary folder, "
                             "deleted at the end); it must be empty or absent")
    parser.add_argument("--child-write", nargs=3, metavar=("MANIFEST", "OUT_DIR", "WORKERS"),
                        help=argparse.SUPPRESS)  # the fresh process of measure_writer_memory
    args = parser.parse_args(argv)
    if args.child_write:
        manifest_url, out_dir, workers = args.child_write
        row = child_write(manifest_url, out_dir, int(workers))
        print(json.dumps(row))
        return row
    sizes = TOY if args.toy else FULL
    if args.pairs:
        sizes = Sizes(**{**sizes.__dict__, "pairs": args.pairs})
    if args.side:
        sizes = Sizes(**{**sizes.__dict__, "side": args.side})
    if args.repeats:
        sizes = Sizes(**{**sizes.__dict__, "repeats": args.repeats})
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="srdiff-bench-shards-"))
    if workdir.exists() and any(workdir.iterdir()):
        raise SystemExit(f"--workdir {workdir} is not empty: pass a new folder (the benchmark deletes what it writes)")
    try:
        results = run(sizes, workdir)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return finish(results, args.out, "shards.json", table)


if __name__ == "__main__":
    main()
