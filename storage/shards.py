"""WebDataset shards of LQ/GT pairs: a deterministic, resumable writer, the index, verification
and the raw samples of a shard.

Layout under ``out_url``::

    <split>/<degradation>/pairs-000000.tar        samples <key>.gt.png, <key>.json, <key>.lq.png
    <split>/<degradation>/pairs-000000.tar.json   sidecar: the plan digest, bytes and sha256
    index.parquet                                 one row per shard, written last

Each shard is written by webdataset's TarWriter (storage.shard_tar) with fixed metadata, a
sample's PNG bytes copied verbatim from the manifest's files (never re-encoded), so the same
manifest always gives byte-identical shards. Shards are planned up front (storage.shard_plan),
which makes every shard independent: they are written in parallel, each atomically (temporary
name, then rename), and a rerun keeps every shard whose sidecar matches its plan and writes
only the rest. Each byte is hashed once, as it is written, for the shard's sha256 in the index
(storage.shard_stream); re-hashing sources against the manifest is optional (``check_sources``).

The sidecar protocol is ours, not webdataset's (it has no notion of a finished shard): a shard's
sidecar is written after the shard is renamed into place, and index.parquet after every shard,
so neither exists for bytes that are not all there.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import IO, Any, NamedTuple

import pyarrow as pa

from storage import fs
from storage.shard_plan import SHARD_FORMAT, PlanDigest, ShardPlan, plan_groups, plan_shards, sample_key
from storage.shard_stream import ShardStream, Side, local_os_path, member_bytes
from storage.errors import DamagedShard, MissingDegradations, MissingSplit, ShardFailure, ShardVerificationError
from storage.shard_tar import Recording, tar_samples, tar_writer
from storage.tables import read_table, write_table

__all__ = ["INDEX_KIND", "INDEX_NAME", "INDEX_SCHEMA", "SHARD_FORMAT", "ShardPlan", "ShardVerificationError",
           "iter_samples", "plan_shards", "read_index", "sample_key", "shard_samples", "shard_urls", "verify_shards",
           "write_shard", "write_shards"]

INDEX_NAME = "index.parquet"
INDEX_KIND = "shard index"  # what a missing or unreadable index.parquet is, for the errors' ``kind``
SIDECAR_SUFFIX = ".json"

INDEX_SCHEMA = pa.schema([
    pa.field("shard", pa.string(), nullable=False),  # relative to out_url
    pa.field("split", pa.string(), nullable=False),
    pa.field("degradation", pa.string(), nullable=False),
    pa.field("first_id", pa.string(), nullable=False),
    pa.field("last_id", pa.string(), nullable=False),
    pa.field("count", pa.int64(), nullable=False),
    pa.field("bytes", pa.int64(), nullable=False),
    pa.field("sha256", pa.string(), nullable=False),
])

# Our own file names inside out_url: anything else there is never touched.
_OWN_FILE = re.compile(r"^[^/]+/[^/]+/pairs-\d{6}\.tar(\.json)?$")
_OWN_TEMP = re.compile(r"^([^/]+/[^/]+/)?\.(pairs-\d{6}\.tar(\.json)?|index\.parquet)\.[0-9a-f]{12}\.tmp$")


# ---------------------------------------------------------------------------------------------
# Writing.

@dataclass(frozen=True)
class ShardRecord:
    bytes: int
    sha256: str


def write_shard(plan: ShardPlan, out_url: str, *, check_sources: bool = False) -> ShardRecord:
    """Write one shard atomically, then its sidecar (so a sidecar implies a finished shard).

    Every source must have its planned size; ``check_sources`` also compares its bytes with the
    manifest sha256."""
    with Side() as side:
        return start_shard(plan, out_url, side, check_sources=check_sources).result()


def start_shard(plan: ShardPlan, out_url: str, side: Side, *, check_sources: bool = False) -> Future:
    """Write one shard's samples through TarWriter (as write_shard); the future of its record.

    Returns once the last block is handed to ``side``, which finishes the shard (_finish_shard)
    after writing its blocks. On an error here the temporary file is removed before it propagates.
    The samples are built a chunk at a time and hashed into the plan's digest as they are written.
    """
    url = fs.join(out_url, plan.name)
    target = fs.atomic_open(url, "wb")
    raw = target.__enter__()
    out = ShardStream(raw, raw.fileno() if local_os_path(url) is not None else None, side)
    try:
        digest = PlanDigest(plan)
        writer = tar_writer(out)
        for samples in plan.chunks():
            digest.update(samples)
            for key, gt, meta, lq in samples.by_sample():
                writer.write({"__key__": key, "gt.png": member_bytes(gt, check_sources), "json": meta,
                              "lq.png": member_bytes(lq, check_sources)})
        writer.close()  # the tar's end blocks and record padding
        out.flush()
    except BaseException as e:
        side.drain()  # no block of this shard may reach the file once it is discarded
        out.release()
        target.__exit__(type(e), e, e.__traceback__)
        raise
    out.release()
    return side.finish(_finish_shard, plan, url, target, out, digest.hexdigest())


def _finish_shard(plan: ShardPlan, url: str, target: Any, out: ShardStream, digest: str) -> ShardRecord:
    """On the finishing thread, after the shard's last block: rename it into place, then its sidecar."""
    try:
        if out.error is not None:
            raise out.error
        if out.count != plan.size:
            raise RuntimeError(f"{url}: wrote {out.count} bytes but planned {plan.size}; "
                               f"the tar size model in storage/shard_tar.py is out of date")
    except BaseException as e:
        target.__exit__(type(e), e, e.__traceback__)  # removes the temporary
        raise
    target.__exit__(None, None, None)  # fsync, close, rename
    record = ShardRecord(out.count, out.sha.hexdigest())
    sidecar = {"plan": digest, "bytes": record.bytes, "sha256": record.sha256}
    fs.atomic_write_bytes(url + SIDECAR_SUFFIX, json.dumps(sidecar, sort_keys=True).encode())
    return record


def _finished_shard(plan: ShardPlan, out_url: str, listed: dict[str, int]) -> ShardRecord | None:
    """The record of an existing shard that matches ``plan``, or None if it must be written."""
    url = fs.join(out_url, plan.name)
    if url not in listed or url + SIDECAR_SUFFIX not in listed:
        return None
    try:
        sidecar = json.loads(fs.read_bytes(url + SIDECAR_SUFFIX))
    except (ValueError, FileNotFoundError):
        return None
    if sidecar.get("plan") != plan.digest or not listed[url] == sidecar.get("bytes") == plan.size:
        return None
    return ShardRecord(plan.size, sidecar["sha256"])


def _list_sizes(out_url: str) -> dict[str, int]:
    """URL -> size of every file under ``out_url`` (one recursive listing)."""
    filesystem, root = fs.resolve(out_url)
    if not filesystem.exists(root):
        return {}
    found = filesystem.find(root, detail=True)
    return {fs.join(out_url, _relative(root, path)): int(info["size"]) for path, info in found.items()}


def _relative(root: str, path: str) -> str:
    return path[len(root.rstrip("/")):].lstrip("/")


def _remove_stale(out_url: str, plans: list[ShardPlan]) -> None:
    """Delete our shard files that are not in the plan, and temporaries of killed writers.

    After this the folder holds exactly what an uninterrupted run into an empty folder writes
    (other files are left alone). Not safe against a second writer on the same out_url.
    """
    keep = {p.name for p in plans} | {p.name + SIDECAR_SUFFIX for p in plans}
    filesystem, root = fs.resolve(out_url)
    if not filesystem.exists(root):
        return
    for path in filesystem.find(root):
        rel = _relative(root, path)
        if (_OWN_FILE.match(rel) and rel not in keep) or _OWN_TEMP.match(rel):
            filesystem.rm(path)


def _index_row(plan: ShardPlan, record: ShardRecord) -> dict:
    first_id, last_id = plan.first_last_ids()
    return {"shard": plan.name, "split": plan.split, "degradation": plan.degradation,
            "first_id": first_id, "last_id": last_id, "count": plan.count,
            "bytes": record.bytes, "sha256": record.sha256}


def write_shards(manifest: pa.Table, out_url: str, *, maxcount: int = 1000, maxsize: int = 1 << 30,
                 workers: int = 0, progress: Callable[[int, int], None] | None = None,
                 check_sources: bool = False) -> pa.Table:
    """Pack the manifest's pairs into shards under ``out_url``; returns the shard index.

    Resumable: shards whose sidecar matches the plan are kept, the rest are written, stale
    shards and temporaries are removed, and index.parquet is written last. ``progress`` is
    called as progress(shards_done, shards_total). ``workers`` threads (0: one per core)
    write ``workers`` remote shards at once, or ``workers // 2`` local ones.

    Sources are copied as they are now: their sizes are read when planning, and one that
    changes size before it is copied is refused (a check that costs nothing). By default they
    are not compared with the manifest, whose sha256 the download stage computed from the very
    bytes it wrote: ``check_sources=True`` re-hashes every source and refuses one that differs
    (changed since the download stage), at the cost of a second sha256 pass over every byte.
    """
    out_url = os.fspath(out_url)
    with _cyclic_gc_paused():
        groups = plan_groups(manifest, maxcount=maxcount, maxsize=maxsize)
        listed = _list_sizes(out_url)
        workers = workers or os.cpu_count() or 1
        if local_os_path(out_url) is not None:
            # A local writer keeps two threads busy (TarWriter and the sources; hashing and
            # writing blocks, see Side), and much of it holds the GIL: on 2 cores, two shards at
            # once were ~1.3x slower than one after the other. Remote writes wait on the network
            # instead, so they keep one shard per worker.
            workers = workers // 2
        if workers > 1:
            plans, records = _write_pipelined(groups, out_url, listed, workers, progress,
                                              partial(write_shard, check_sources=check_sources))
        else:
            plans, records = _write_in_turn(groups, out_url, listed, progress,
                                            partial(start_shard, check_sources=check_sources))
        _remove_stale(out_url, plans)
        index = pa.Table.from_pylist([_index_row(p, records[p.name]) for p in plans], schema=INDEX_SCHEMA)
        write_table(fs.join(out_url, INDEX_NAME), index)
    return index


@contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """Pause Python's cycle collector (reference counting still frees all the writer drops).

    Full collections walk every object in the process, torch's included: ~1% of the writer's
    time now that samples live one chunk at a time, a fifth when plans held every sample. The few
    cycles a run may leave (an exception's traceback) are collected once it is done.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _keep_or_drop_index(plan: ShardPlan, out_url: str, listed: dict[str, int],
                        dropped: list[bool]) -> ShardRecord | None:
    """The record of a finished shard to keep; None after making way to write it.

    The index is the commit marker: an older one is dropped before any shard under it
    changes, so a run killed from then on leaves no index that describes the wrong bytes.
    """
    record = _finished_shard(plan, out_url, listed)
    if record is None and not dropped[0]:
        index_url = fs.join(out_url, INDEX_NAME)
        if index_url in listed:
            fs.remove(index_url)
        dropped[0] = True
    return record


def _write_in_turn(groups: Iterable[list[ShardPlan]], out_url: str, listed: dict[str, int],
                   progress: Callable[[int, int], None] | None,
                   start: Callable[[ShardPlan, str, Side], Future]
                   ) -> tuple[list[ShardPlan], dict[str, ShardRecord]]:
    """Plan everything, then write the missing shards one after another through one Side, each
    shard's finishing overlapping with the next one's sources."""
    plans = [plan for group in groups for plan in group]
    records: dict[str, ShardRecord] = {}
    dropped = [False]
    todo = []
    for plan in plans:
        if (record := _keep_or_drop_index(plan, out_url, listed, dropped)) is not None:
            records[plan.name] = record
        else:
            todo.append(plan)
    for done in range(1, len(records) + 1):
        _report(progress, done, len(plans))
    started: deque[tuple[ShardPlan, Future]] = deque()

    def collect() -> None:
        plan, future = started.popleft()
        records[plan.name] = future.result()
        _report(progress, len(records), len(plans))

    with Side() as side:
        for plan in todo:
            started.append((plan, start(plan, out_url, side)))
            while started and started[0][1].done():
                collect()
        while started:
            collect()
    return plans, records


def _write_pipelined(groups: Iterable[list[ShardPlan]], out_url: str, listed: dict[str, int],
                     workers: int, progress: Callable[[int, int], None] | None,
                     write: Callable[[ShardPlan, str], ShardRecord]
                     ) -> tuple[list[ShardPlan], dict[str, ShardRecord]]:
    """Write missing shards on ``workers`` threads, each as soon as its group is planned.

    Threads, not processes: reading, hashing and writing release the GIL, threads share
    in-process filesystems such as memory://, and forking a pool costs ~30 ms here, as much as
    writing 500 small pairs. The first error cancels what has not started.
    """
    plans: list[ShardPlan] = []
    records: dict[str, ShardRecord] = {}
    dropped = [False]
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        futures: dict[Future, ShardPlan] = {}
        for group in groups:
            for plan in group:
                plans.append(plan)
                if (record := _keep_or_drop_index(plan, out_url, listed, dropped)) is not None:
                    records[plan.name] = record
                else:
                    futures[pool.submit(write, plan, out_url)] = plan
        # Progress counts against the total, known once everything is planned: kept shards
        # first, then written ones as they finish.
        for done in range(1, len(records) + 1):
            _report(progress, done, len(plans))
        done = len(records)
        for future in as_completed(futures):
            records[futures[future].name] = future.result()
            done += 1
            _report(progress, done, len(plans))
        return plans, records
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _report(progress: Callable[[int, int], None] | None, done: int, total: int) -> None:
    if progress is not None:
        progress(done, total)


# ---------------------------------------------------------------------------------------------
# Reading.

def read_index(out_url: str) -> pa.Table:
    return read_table(fs.join(out_url, INDEX_NAME), kind=INDEX_KIND)


def shard_urls(out_url: str, *, split: str, degradations: list[str] | None = None) -> list[str]:
    """Full URLs of the split's shards (optionally only some degradations), in index order.

    The index, not a directory listing, is the source of truth: files it does not name (from
    an older plan or another tool) are never read.
    """
    index = read_index(out_url).to_pylist()
    splits = sorted({r["split"] for r in index})
    rows = [r for r in index if r["split"] == split]
    if not rows:
        raise MissingSplit(fs.join(out_url, INDEX_NAME), split, splits)
    if degradations is not None:
        present = {r["degradation"] for r in rows}
        missing = sorted(set(degradations) - present)
        if missing:
            raise MissingDegradations(split, missing, sorted(present))
        rows = [r for r in rows if r["degradation"] in set(degradations)]
    return [fs.join(out_url, r["shard"]) for r in rows]


def _raw_samples(stream: Recording, url: str) -> Iterator[dict]:
    """Raw samples {"id", "lq_png", "gt_png", "meta"} of one shard's stream."""
    for sample in tar_samples(stream, url):
        meta = json.loads(sample["json"])
        yield {"id": meta["id"], "lq_png": sample["lq.png"], "gt_png": sample["gt.png"], "meta": meta}


def shard_samples(sources: Iterable[dict]) -> Iterator[dict]:
    """A webdataset pipeline stage: shard {"url"}s -> their raw samples, one shard after another.

    In place of webdataset's url_opener and tar expansion: shards are opened through fsspec
    (webdataset's gopen has no s3:// or memory://), and each is read strictly (storage.shard_tar).
    """
    for source in sources:
        url = source["url"]
        with _open_shard(url) as f:
            yield from _raw_samples(Recording(f), url)


def _open_shard(url: str) -> IO[bytes]:
    """A shard for reading: a plain file where local (fsspec's file object adds a layer of Python
    to each of a shard's ~three reads per member), else fsspec's."""
    path = local_os_path(url)
    if path is not None:
        return open(path, "rb")
    filesystem, path = fs.resolve(url)
    return filesystem.open(path, "rb")


def iter_samples(urls: Iterable[str]) -> Iterator[dict]:
    """Raw samples {"id", "lq_png", "gt_png", "meta"} from each shard in turn, one in memory."""
    return shard_samples({"url": url} for url in urls)


# ---------------------------------------------------------------------------------------------
# Verification.

class _Failure(NamedTuple):
    why: str
    damaged: bool  # the bytes are wrong (else they could not be read: maybe a passing I/O error)


def _verify_one(out_url: str, row: dict) -> _Failure | None:
    """Why the shard in index row ``row`` is bad, or None if it is intact."""
    url = fs.join(out_url, row["shard"])
    try:
        with _open_shard(url) as f:
            reader = Recording(f, hashlib.sha256())
            ids = [s["id"] for s in _raw_samples(reader, url)]
    except FileNotFoundError:
        return _Failure("missing", damaged=True)
    except DamagedShard as e:
        return _Failure(f"unreadable ({e.problem})", damaged=True)
    except (ValueError, KeyError) as e:  # a sample's json that is not JSON, or has no id
        return _Failure(f"unreadable ({e})", damaged=True)
    except OSError as e:
        return _Failure(f"could not be read ({e})", damaged=False)
    problems = []
    if reader.count != row["bytes"]:
        problems.append(f"{reader.count} bytes, index says {row['bytes']}")
    if reader.sha.hexdigest() != row["sha256"]:
        problems.append("sha256 differs from the index")
    if len(ids) != row["count"]:
        problems.append(f"{len(ids)} samples, index says {row['count']}")
    elif ids and (ids[0] != row["first_id"] or ids[-1] != row["last_id"]):
        problems.append(f"ids {ids[0]}..{ids[-1]}, index says {row['first_id']}..{row['last_id']}")
    return _Failure("; ".join(problems), damaged=True) if problems else None


def _mark_for_rewriting(out_url: str, row: dict) -> str | None:
    """Remove the sidecar of the damaged shard in index row ``row``, so the writer no longer
    takes it for finished; None when done, else why it was left alone.

    Only a sidecar that describes the indexed shard (same sha256) is removed: one another run
    has written since describes other bytes, which this verify did not read.
    """
    url = fs.join(out_url, row["shard"] + SIDECAR_SUFFIX)
    try:
        sidecar = json.loads(fs.read_bytes(url))
    except FileNotFoundError:
        return None  # already unfinished
    except (ValueError, OSError) as e:
        return f"its sidecar could not be read ({e})"
    if sidecar.get("sha256") != row["sha256"]:
        return "its sidecar is newer than the index (another shard run since?)"
    try:
        fs.remove(url)
    except FileNotFoundError:
        pass
    except Exception as e:  # a read-only mount, a filesystem without delete (http)
        return f"its sidecar could not be removed ({type(e).__name__}: {e})"
    return None


def _run_parallel(fn: Callable[[Any], Any], items: list, workers: int) -> list:
    """fn over items on a thread pool (file I/O and hashing release the GIL), results in order."""
    if workers <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        return list(pool.map(fn, items))


def verify_shards(out_url: str, *, workers: int = 0) -> None:
    """Re-read every shard and check bytes, sha256, count and ids against index.parquet.

    A damaged shard loses its sidecar, the writer's "finished" marker, so the next run of the
    shard stage rewrites exactly the damaged shards: one of the right size would otherwise be
    kept (write_shards trusts a sidecar that matches the plan and the size). A shard that could
    not be read (an I/O error, perhaps passing) is reported but not marked. Raises
    ShardVerificationError listing each bad shard and whether it was marked.
    """
    out_url = os.fspath(out_url)
    rows = read_index(out_url).to_pylist()
    results = _run_parallel(lambda r: _verify_one(out_url, r), rows, workers or os.cpu_count() or 1)
    failures = [_mark_if_damaged(out_url, row, failure) for row, failure in zip(rows, results) if failure]
    if failures:
        raise ShardVerificationError(out_url, len(rows), failures)


def _mark_if_damaged(out_url: str, row: dict, failure: _Failure) -> ShardFailure:
    """The report of one bad shard, after marking it for rewriting if its bytes are wrong."""
    unmarked = _mark_for_rewriting(out_url, row) if failure.damaged else "it was not marked for rewriting"
    return ShardFailure(row["shard"], failure.why, unmarked)
