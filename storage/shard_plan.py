"""Shard planning: pure functions from the pairs manifest (and file sizes) to shard contents.

Pairs are grouped by (split, degradation), sorted by id and cut into shards of at most
``maxcount`` samples and ``maxsize`` bytes, using the exact tar size of each sample (tar
arithmetic in storage.shard_tar). This is kept from before webdataset: its ShardWriter cuts
shards as it writes, one after another, whereas planning every shard up front makes each one
independent, so they are written in parallel, each atomically, and a rerun keeps every shard
whose sidecar matches its plan (digest) and writes only the rest.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NamedTuple
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from storage import fs
from storage.errors import BadManifest, EmptyManifest, RepeatedIds
from storage.shard_stream import Member, source_sizes
from storage.shard_tar import BLOCK, RECORD, member_tar_size, needs_pax, tar_size
from storage.tables import PAIRS_SCHEMA, as_table

# Bump when the bytes a plan produces change (member order, json fields, header fields):
# sidecars from an older format then no longer match and their shards are rewritten.
# 2: written through webdataset's TarWriter, whose member order is gt.png, json, lq.png.
SHARD_FORMAT = 2
SHARD_PATTERN = "pairs-%06d.tar"


class Samples(NamedTuple):
    """Samples column by column, in id order: a chunk of a shard's (ShardPlan.chunks).

    Columns rather than a row object per sample: a chunk is then a few Arrow-to-list calls
    instead of ~7 us of Python per sample (7 ms of the writer's ~45 ms at 1,000 pairs), and
    members are built only while they are written.
    """

    ids: list[str]
    keys: list[str]  # sample_key(id)
    lq_paths: list[str]
    lq_sizes: list[int]
    lq_shas: list[str | None]
    gt_paths: list[str]
    gt_sizes: list[int]
    gt_shas: list[str | None]
    metas: list[bytes]  # the json member, sample_json(row)

    def slice(self, start: int, stop: int) -> Samples:
        return Samples(*(column[start:stop] for column in self))

    def members(self) -> Iterator[Member]:
        """Each sample's members in tar order (shard_tar.FIELDS): <key>.gt.png, <key>.json, <key>.lq.png."""
        for key, lq_path, lq_size, lq_sha, gt_path, gt_size, gt_sha, meta in zip(*self[1:]):
            yield Member(f"{key}.gt.png", gt_size, gt_path, None, gt_sha)
            yield Member(f"{key}.json", len(meta), None, meta)
            yield Member(f"{key}.lq.png", lq_size, lq_path, None, lq_sha)

    def by_sample(self) -> Iterator[tuple[str, Member, bytes, Member]]:
        """(key, its gt.png member, its json bytes, its lq.png member) of each sample."""
        for key, lq_path, lq_size, lq_sha, gt_path, gt_size, gt_sha, meta in zip(*self[1:]):
            yield (key, Member(f"{key}.gt.png", gt_size, gt_path, None, gt_sha), meta,
                   Member(f"{key}.lq.png", lq_size, lq_path, None, lq_sha))


# The manifest columns a sample is built from (its members and its json).
_SAMPLE_COLUMNS = ["id", "dataset", "degradation", "split", "width", "height",
                   "lq_path", "gt_path", "lq_sha256", "gt_sha256", "lq_bytes", "gt_bytes"]
# The writer's Arrow temporaries (planning's columns, a chunk's rows) come from the system
# allocator, whose freed pages Python and numpy reuse. Arrow's default (mimalloc) kept them for
# itself: one 8,192-row take of a 30,000-row id column left 2.3 MB resident (0.3 MB here).
SCRATCH_POOL = pa.system_memory_pool()
# Planning's Arrow work over the whole manifest goes this many rows at a time, so that its
# temporaries stay a few hundred kB whatever the manifest's size.
PLAN_SLICE_ROWS = 8192
# Samples built at once while a shard is written: ~2 kB of Python objects each (paths, digests,
# json), so the writer's memory is bounded by this, not by the shard's count or the dataset.
CHUNK_ROWS = 256


@dataclass(frozen=True)
class SampleTable:
    """A checked manifest's sample columns, shared by its plans."""

    # _SAMPLE_COLUMNS of the manifest, in its row order, with every source's size in lq_bytes and
    # gt_bytes: the manifest's own columns where it recorded them all (no copy).
    table: pa.Table
    safe_keys: bool  # every id is its own sample_key

    def samples(self, rows: np.ndarray) -> Samples:
        """The samples of the given rows, in that order."""
        column = pc.take(self.table, rows, memory_pool=SCRATCH_POOL).to_pydict()
        ids = column["id"]
        return Samples(ids, ids if self.safe_keys else [sample_key(i) for i in ids],
                       column["lq_path"], column["lq_bytes"], [s or None for s in column["lq_sha256"]],
                       column["gt_path"], column["gt_bytes"], [s or None for s in column["gt_sha256"]],
                       sample_jsons(column))


def _in_chunks(rows: np.ndarray) -> Iterator[np.ndarray]:
    for start in range(0, len(rows), CHUNK_ROWS):
        yield rows[start:start + CHUNK_ROWS]


@dataclass(frozen=True, eq=False)  # rows is an array: a plan equals itself only
class ShardPlan:
    """One shard: its name, its rows of the manifest and its exact size.

    A plan holds row numbers (a view of the planned order), not samples: their paths, digests
    and json are built a chunk at a time while the shard is written (chunks), so what the
    writer holds from planning to the end is a few bytes per sample, not ~1 kB.
    """

    name: str  # "<split>/<degradation>/pairs-000000.tar"
    split: str
    degradation: str
    rows: np.ndarray  # rows of source.table, in id order
    size: int  # exact bytes of the finished tar
    source: SampleTable = field(repr=False)

    @property
    def count(self) -> int:
        return len(self.rows)

    def chunks(self) -> Iterator[Samples]:
        """The shard's samples in order, at most CHUNK_ROWS at a time."""
        for rows in _in_chunks(self.rows):
            yield self.source.samples(rows)

    @property
    def samples(self) -> Samples:
        """All the shard's samples at once (tools and tests; the writer goes by chunks)."""
        return self.source.samples(self.rows)

    def first_last_ids(self) -> tuple[str, str]:
        first, last = self.source.table.column("id").take(self.rows[[0, -1]]).to_pylist()
        return first, last

    @cached_property  # asked for when an existing shard's sidecar is checked
    def digest(self) -> str:
        """sha256 over everything that determines the shard's bytes (PlanDigest)."""
        digest = PlanDigest(self)
        for samples in self.chunks():
            digest.update(samples)
        return digest.hexdigest()


class PlanDigest:
    """A plan's digest, fed a chunk of samples at a time (the writer feeds the chunks it writes).

    The hash of json.dumps({"format", "members", "name", "size"}, sort_keys=True), each member
    [name, size, sha256] (the json member's sha256 of its bytes), streamed: the whole text is
    ~300 bytes a sample. Sidecars of earlier writers hold the same digest.
    """

    def __init__(self, plan: ShardPlan):
        spec = json.dumps({"format": SHARD_FORMAT, "members": [], "name": plan.name, "size": plan.size},
                          sort_keys=True)
        # "members" sorts before "name", and quotes inside the name are escaped: the first match is the key's.
        head, _, self.tail = spec.partition('"members": []')
        self.sha = hashlib.sha256((head + '"members": [').encode())
        self.separator = ""

    def update(self, samples: Samples) -> None:
        # json.dumps of a list joins its items with ", ": chunks join the same way.
        self.sha.update((self.separator + json.dumps(_digest_entries(samples))[1:-1]).encode())
        self.separator = ", "

    def hexdigest(self) -> str:
        sha = self.sha.copy()
        sha.update(("]" + self.tail).encode())
        return sha.hexdigest()


def _digest_entries(samples: Samples) -> list[list]:
    """[name, size, sha256] of each member (as Samples.members names them), straight from the
    columns: a Member per entry took a third of the digest's time."""
    entries: list[list] = []
    for key, lq_size, lq_sha, gt_size, gt_sha, meta in zip(samples.keys, samples.lq_sizes, samples.lq_shas,
                                                          samples.gt_sizes, samples.gt_shas, samples.metas):
        entries += ([f"{key}.gt.png", gt_size, gt_sha], [f"{key}.json", len(meta), fs.sha256_bytes(meta)],
                    [f"{key}.lq.png", lq_size, lq_sha])
    return entries


def sample_key(sample_id: str) -> str:
    """The tar key of a sample: its id with every character outside [A-Za-z0-9_-] %-escaped.

    WebDataset splits a member name at the first "." of its base name (key, then extension),
    so ids such as "0001_0.8_0.2" must not keep their dots; escaping also keeps "/" out of
    member names. The readable id stays in the json member.
    """
    if _SAFE_KEY.fullmatch(sample_id):
        return sample_id  # what quote() returns for these, at a fifth of its cost
    return quote(sample_id, safe="-_").replace(".", "%2E").replace("~", "%7E")


_SAFE_KEY = re.compile(r"[A-Za-z0-9_-]*")


# What json.dumps(meta, sort_keys=True, separators=(",", ":")) builds on every call.
_META_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"))
# The same bytes for the usual row (string fields, integer sizes), filled in directly: the
# keys in sorted order, each string through json's own (C) escaping. ~3x faster per sample.
_META_FORMAT = '{"dataset":%s,"degradation":%s,"height":%d,"id":%s,"split":%s,"width":%d}'
_META_FIELDS = ("dataset", "degradation", "height", "id", "split", "width")  # in _META_FORMAT's order
_json_string = json.encoder.encode_basestring_ascii  # what ensure_ascii=True uses


def sample_json(row: dict) -> bytes:
    """A sample's json member: its id, dataset, degradation, split, width and height."""
    return sample_jsons({k: [row[k]] for k in _META_FIELDS})[0]


def sample_jsons(column: dict[str, list]) -> list[bytes]:
    """sample_json of every row of manifest columns, the usual row's format filled in (~1 us a sample)."""
    rows = list(zip(*(column[k] for k in _META_FIELDS)))
    try:
        return [(_META_FORMAT % (_json_string(dataset), _json_string(degradation), int(height),
                                 _json_string(sample_id), _json_string(split), int(width))).encode()
                for dataset, degradation, height, sample_id, split, width in rows]
    except TypeError:  # a field that is not a string (None, say): the encoder's general path
        return [_META_ENCODER.encode({**dict(zip(_META_FIELDS, values)), "height": int(values[2]),
                                      "width": int(values[5])}).encode() for values in rows]


def _padded_array(n: np.ndarray) -> np.ndarray:
    return -(-n // BLOCK) * BLOCK


def sample_tar_sizes(samples: Samples) -> np.ndarray:
    """Bytes each sample takes in a tar (its three members' headers, data and padding).

    Vectorised for the usual sample, whose three headers are single ustar blocks (ASCII names
    of at most 100 bytes: keys are ASCII and ".lq.png" is the longest suffix; sizes below
    8 GiB); a sample that needs PAX records is sized member by member (member_tar_size).
    """
    n = len(samples.ids)
    lq = np.asarray(samples.lq_sizes, dtype=np.int64).reshape(n)
    gt = np.asarray(samples.gt_sizes, dtype=np.int64).reshape(n)
    meta = np.fromiter(map(len, samples.metas), dtype=np.int64, count=n)
    sizes = 3 * BLOCK + _padded_array(lq) + _padded_array(gt) + _padded_array(meta)
    key_lengths = np.fromiter(map(len, samples.keys), dtype=np.int64, count=n)
    unusual = needs_pax(key_lengths + len(".lq.png"), np.maximum(np.maximum(lq, gt), meta))
    for i in np.flatnonzero(unusual).tolist():
        sizes[i] = sum(member_tar_size(m.name, m.size) for m in samples.slice(i, i + 1).members())
    return sizes


def _shard_bounds(sample_sizes: np.ndarray, *, maxcount: int, maxsize: int) -> Iterator[tuple[int, int]]:
    """(start, stop) of each shard: a shard takes samples until the next would exceed
    ``maxcount`` samples or a tar of ``maxsize`` bytes; a sample larger than that gets a shard
    of its own."""
    ends = np.cumsum(sample_sizes)  # ends[i]: member bytes of samples 0..i
    # tar_size(m) <= maxsize  <=>  m + two end blocks fit in the whole records below maxsize.
    room = maxsize // RECORD * RECORD - 2 * BLOCK
    start, n = 0, len(sample_sizes)
    while start < n:
        before = int(ends[start - 1]) if start else 0
        fits = int(np.searchsorted(ends, before + room, side="right"))  # samples start..fits-1 fit
        stop = min(start + maxcount, max(fits, start + 1))
        yield start, stop
        start = stop


def _plan_group(source: SampleTable, rows: np.ndarray, sample_sizes: np.ndarray, *, split: str,
                degradation: str, maxcount: int, maxsize: int) -> list[ShardPlan]:
    """Cut one (split, degradation) group, its rows in id order, into shards (_shard_bounds)."""
    plans = []
    for start, stop in _shard_bounds(sample_sizes, maxcount=maxcount, maxsize=maxsize):
        name = f"{split}/{degradation}/{SHARD_PATTERN % len(plans)}"
        members_bytes = int(sample_sizes[start:stop].sum())
        plans.append(ShardPlan(name, split, degradation, rows[start:stop], tar_size(members_bytes), source))
    return plans


def _check_manifest(manifest: pa.Table) -> pa.Table:
    missing = [f.name for f in PAIRS_SCHEMA if f.name not in manifest.column_names and not f.nullable]
    if missing:
        raise BadManifest(f"lacks column(s) {missing}; it must follow storage.tables.PAIRS_SCHEMA")
    manifest = as_table(manifest, PAIRS_SCHEMA)
    if manifest.num_rows == 0:
        raise EmptyManifest()
    for name in ("id", "split", "degradation", "lq_path", "gt_path"):
        if manifest.column(name).null_count:
            raise BadManifest(f"has empty '{name}' values")
    ids = manifest.column("id")
    if _has_repeats(ids):
        dupes = sorted(i for i, n in Counter(ids.to_pylist()).items() if n > 1)
        raise RepeatedIds(dupes[:5])
    for name in ("split", "degradation"):
        for value in pc.unique(manifest.column(name), memory_pool=SCRATCH_POOL).to_pylist():
            if not value or "/" in value or value.startswith("."):
                raise ValueError(f"manifest {name} {value!r} cannot name a folder")
    return manifest


def _has_repeats(ids: pa.ChunkedArray) -> bool:
    """Whether any id occurs twice: equal neighbours once sorted, compared a slice at a time.

    Counting distinct ids hashes them all, which took ~250 bytes a row (7 MB of the writer's
    peak at 30,000 pairs).
    """
    order = pc.sort_indices(ids, memory_pool=SCRATCH_POOL).to_numpy()
    for start in range(0, len(order) - 1, PLAN_SLICE_ROWS):
        # The slice's ids and the next slice's first one, in order.
        ordered = pc.take(ids, order[start:start + PLAN_SLICE_ROWS + 1], memory_pool=SCRATCH_POOL)
        if pc.any(pc.equal(ordered[1:], ordered[:-1], memory_pool=SCRATCH_POOL)).as_py():
            return True
    return False


def plan_shards(manifest: pa.Table, *, maxcount: int = 1000, maxsize: int = 1 << 30,
                sizes: dict[str, int] | None = None) -> list[ShardPlan]:
    """All shard plans, grouped by (split, degradation) and sorted by id within a group.

    ``sizes`` maps each LQ/GT URL to its byte size; by default the manifest's recorded sizes,
    and for files without one, what storage lists.
    """
    groups = plan_groups(manifest, maxcount=maxcount, maxsize=maxsize, sizes=sizes)
    return [plan for group in groups for plan in group]


# Sorting the manifest by these in Arrow (byte order of UTF-8, which is Python's code point
# order for str) gives every group's rows contiguous and in id order.
_PLAN_ORDER = [("split", "ascending"), ("degradation", "ascending"), ("id", "ascending")]


def plan_groups(manifest: pa.Table, *, maxcount: int, maxsize: int,
                 sizes: dict[str, int] | None = None) -> Iterator[list[ShardPlan]]:
    """Check the manifest and list the sizes now; then plan one group per step, in group order.

    Everything that can fail (a bad manifest, a missing file) fails here, before the caller
    touches its output; planning a group is pure and is left to the iteration, so a writer
    can start on one group's shards while the next is planned. The manifest stays in Arrow:
    what the plans hold beside it is the order, 4 bytes a row (and, for a manifest without
    recorded sizes, the sizes).
    """
    if maxcount < 1 or maxsize < 1:
        raise ValueError(f"maxcount ({maxcount}) and maxsize ({maxsize}) must be positive")
    table = _check_manifest(manifest)
    source = _sample_table(table, sizes)
    # Row numbers fit 32 bits: half the memory of Arrow's 64-bit indices, held to the end.
    order = pc.sort_indices(table, sort_keys=_PLAN_ORDER, memory_pool=SCRATCH_POOL).to_numpy().astype(np.uint32)
    sample_sizes = _sample_tar_sizes(source)
    return (_plan_group(source, rows, sample_sizes[rows], split=split, degradation=degradation,
                        maxcount=maxcount, maxsize=maxsize)
            for split, degradation, rows in _groups(table, order))


def _groups(table: pa.Table, order: np.ndarray) -> Iterator[tuple[str, str, np.ndarray]]:
    """(split, degradation, its rows in id order) of each group, in _PLAN_ORDER.

    The order lists each group's rows one after the other, so counting them gives the bounds.
    Python orders str as Arrow orders UTF-8 (by code point), and neither value holds a "/"
    (_check_manifest).
    """
    counts: Counter[str] = Counter()
    for start in range(0, table.num_rows, PLAN_SLICE_ROWS):
        part = table.slice(start, PLAN_SLICE_ROWS)
        keys = pc.binary_join_element_wise(part.column("split"), part.column("degradation"), "/",
                                           memory_pool=SCRATCH_POOL)
        for count in pc.value_counts(keys).to_pylist():
            counts[count["values"]] += count["counts"]
    start = 0
    for split, degradation, count in sorted((*key.split("/"), n) for key, n in counts.items()):
        yield split, degradation, order[start:start + count]
        start += count


def _sample_table(table: pa.Table, sizes: dict[str, int] | None) -> SampleTable:
    """What the plans of a checked manifest build their samples from."""
    safe = pc.match_substring_regex(table.column("id"), f"^{_SAFE_KEY.pattern}$", memory_pool=SCRATCH_POOL)
    safe_keys = pc.all(safe).as_py()
    columns = table.select(_SAMPLE_COLUMNS)
    for name, values in zip(("lq_bytes", "gt_bytes"), _source_sizes_of(table, sizes)):
        columns = columns.set_column(columns.schema.get_field_index(name), name, values)
    return SampleTable(columns, safe_keys=safe_keys)


def _source_sizes_of(table: pa.Table, sizes: dict[str, int] | None) -> tuple[pa.ChunkedArray, pa.ChunkedArray]:
    """Each row's LQ and GT size: from ``sizes`` if given, else as recorded by the download
    stage (lq_bytes / gt_bytes: a stat per file was an eighth of the writer's time on small
    PNGs), else listed from storage (source_sizes)."""
    if sizes is not None:
        return tuple(pa.chunked_array([np.fromiter((sizes[p] for p in _values(table.column(name))), np.int64,
                                                   table.num_rows)]) for name in ("lq_path", "gt_path"))
    recorded = [table.column(name) for name in ("lq_bytes", "gt_bytes")]
    missing = [np.flatnonzero(_filled(pc.is_null(column, memory_pool=SCRATCH_POOL), False)) for column in recorded]
    urls = [pc.take(table.column(name), rows, memory_pool=SCRATCH_POOL).to_pylist()
            for name, rows in zip(("lq_path", "gt_path"), missing)]
    if not (urls[0] or urls[1]):
        return recorded[0], recorded[1]
    listed = source_sizes(urls[0] + urls[1])
    filled = [_filled(column, 0).astype(np.int64) for column in recorded]  # a copy: Arrow's view is read-only
    for out, rows, side in zip(filled, missing, urls):
        out[rows] = [listed[u] for u in side]
    return pa.chunked_array([filled[0]]), pa.chunked_array([filled[1]])


def _values(column: pa.ChunkedArray) -> Iterator[Any]:
    """A column's values as Python objects, CHUNK_ROWS at a time (never a list of all of them)."""
    for start in range(0, len(column), CHUNK_ROWS):
        yield from column.slice(start, CHUNK_ROWS).to_pylist()


def _sample_tar_sizes(source: SampleTable) -> np.ndarray:
    """sample_tar_sizes of every row, PLAN_SLICE_ROWS rows at a time (_slice_tar_sizes)."""
    n = source.table.num_rows
    return np.concatenate([_slice_tar_sizes(source, start, min(start + PLAN_SLICE_ROWS, n))
                           for start in range(0, n, PLAN_SLICE_ROWS)])


def _slice_tar_sizes(source: SampleTable, start: int, stop: int) -> np.ndarray:
    """sample_tar_sizes of rows start..stop-1, from numbers alone where they settle it.

    A usual sample's json member fits one block and its headers one block each, which bounds
    on their lengths show without building either (~1.4 us a sample, as much as the rest of
    planning); the few others are built and sized exactly (sample_tar_sizes).
    """
    part = source.table.slice(start, stop - start)
    lq, gt = (part.column(name).to_numpy() for name in ("lq_bytes", "gt_bytes"))
    sizes = 4 * BLOCK + _padded_array(lq) + _padded_array(gt)  # three headers, one json block
    key_bytes = _byte_lengths(part.column("id"))
    if not source.safe_keys:
        key_bytes *= 3  # at most: sample_key writes each byte as "%XX" or itself
    settled = (_longest_json(part) <= BLOCK) & ~needs_pax(key_bytes + len(".lq.png"), np.maximum(lq, gt))
    for rows in _in_chunks(np.flatnonzero(~settled)):
        sizes[rows] = sample_tar_sizes(source.samples(start + rows))
    return sizes


def _byte_lengths(column: pa.ChunkedArray) -> np.ndarray:
    """UTF-8 bytes of each string (0 for a null)."""
    return _filled(pc.binary_length(column, memory_pool=SCRATCH_POOL), 0).astype(np.int64)


def _filled(column: pa.ChunkedArray, value: Any) -> np.ndarray:
    """A column as numpy, nulls replaced by ``value``."""
    return pc.coalesce(column, value, memory_pool=SCRATCH_POOL).to_numpy()


# _META_FORMAT without its six values; json writes an int32 in at most 11 characters.
_META_FIXED = len(_META_FORMAT % ("", "", 0, "", "", 0)) - 2 + 2 * len(str(-2 ** 31))


def _longest_json(table: pa.Table) -> np.ndarray:
    """An upper bound on len(sample_json(row)) of every row of manifest columns.

    json (ensure_ascii) writes a string in quotes, each byte as at most 6 characters: a
    control byte as a 6-character escape, a 2- to 4-byte character as one or two.
    """
    strings = sum(_byte_lengths(table.column(name)) for name in ("dataset", "degradation", "id", "split"))
    return _META_FIXED + 4 * 2 + 6 * strings
