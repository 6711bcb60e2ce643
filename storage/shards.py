"""WebDataset shards of LQ/GT pairs: a deterministic, resumable writer and a DDP-aware reader.

Layout under ``out_url``::

    <split>/<degradation>/pairs-000000.tar        samples <key>.lq.png, <key>.gt.png, <key>.json
    <split>/<degradation>/pairs-000000.tar.json   sidecar: the plan digest, bytes and sha256
    index.parquet                                 one row per shard, written last

A sample's PNG bytes are copied verbatim from the manifest's files (never re-encoded), and
every tar header is fixed (mtime 0, uid/gid 0, empty owner names, mode 0o444), so the same
manifest always gives byte-identical shards. The shard boundaries are planned up front from
the sample count and the exact tar size of each sample, which makes every shard independent:
they are written in parallel, each atomically, and a rerun keeps every shard whose sidecar
matches its plan and writes only the rest. Each byte is read once and hashed once, for the
shard's sha256 in the index; re-hashing sources against the manifest is optional
(``write_shards(check_sources=True)``).

The tar format is WebDataset's (https://github.com/webdataset/webdataset): consecutive members
sharing a key form one sample. Reading parses the tar stream forward only (one
``tarfile.TarInfo.frombuf`` per header), so remote shards stream without seeking.
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import io
import json
import os
import re
import tarfile
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property, partial
from typing import IO, Any, NamedTuple
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from storage import fs
from storage.tables import PAIRS_SCHEMA, as_table, read_table, write_table

# Bump when the bytes a plan produces change (member order, json fields, header fields):
# sidecars from an older format then no longer match and their shards are rewritten.
SHARD_FORMAT = 1
INDEX_NAME = "index.parquet"
SHARD_PATTERN = "pairs-%06d.tar"
SIDECAR_SUFFIX = ".json"
COPY_BUFSIZE = 1 << 20
REFRESH_HINT = "rerun the shard stage with --refresh shard"
# A damaged shard of the right size still looks finished to the writer (its sidecar matches), so
# a reader's error sends the user through verify_shards, which marks the damaged ones unfinished.
REPAIR_HINT = ("run `srdiff verify-shards` on the shard folder (it marks damaged shards for rewriting), "
               "then rerun the shard stage with --refresh shard")

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


class ShardVerificationError(RuntimeError):
    """One or more shards do not match index.parquet."""


# ---------------------------------------------------------------------------------------------
# Planning: pure functions from the manifest (plus file sizes) to shard contents and sizes.

class Member(NamedTuple):
    # A named tuple rather than a frozen dataclass: three per sample are built while a shard is
    # written, and a tuple is built ~3x faster (a frozen dataclass sets each field through
    # object.__setattr__).
    name: str
    size: int
    source: str | None = None  # URL whose bytes are copied verbatim
    data: bytes | None = None  # in-memory bytes (the json member)
    sha256: str | None = None  # expected sha256 of the source bytes (from the manifest)


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
        """Each sample's members in tar order: <key>.lq.png, <key>.gt.png, <key>.json."""
        for key, lq_path, lq_size, lq_sha, gt_path, gt_size, gt_sha, meta in zip(*self[1:]):
            yield Member(f"{key}.lq.png", lq_size, lq_path, None, lq_sha)
            yield Member(f"{key}.gt.png", gt_size, gt_path, None, gt_sha)
            yield Member(f"{key}.json", len(meta), None, meta)


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
        """sha256 over everything that determines the shard's bytes (_PlanDigest)."""
        digest = _PlanDigest(self)
        for samples in self.chunks():
            digest.update(samples)
        return digest.hexdigest()


class _PlanDigest:
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
        entries += ([f"{key}.lq.png", lq_size, lq_sha], [f"{key}.gt.png", gt_size, gt_sha],
                    [f"{key}.json", len(meta), fs.sha256_bytes(meta)])
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


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    # Fixed metadata so a rerun (any machine, any user, any time) gives identical bytes.
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def _tarinfo_header(name: str, size: int) -> bytes:
    # tarfile's own header bytes: long or non-ASCII names add a PAX extended header.
    return _tarinfo(name, size).tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


# The ustar block tarfile writes for a member with an empty name and size 0 (tarfile's
# _create_header). Only the name, size and checksum fields differ between our members, so a
# header is this block with those three fields filled in: ~1 us instead of tobuf()'s ~20 us.
_TEMPLATE = _tarinfo_header("", 0)
_NAME_FIELD, _SIZE_FIELD, _CHKSUM_FIELD = slice(0, 100), slice(124, 136), slice(148, 156)
# The checksum is the sum of the header's bytes with its own field read as 8 spaces (POSIX
# ustar; tarfile.calc_chksums); this is the part from the fields that never change.
_TEMPLATE_CHKSUM = (sum(_TEMPLATE) - sum(_TEMPLATE[_NAME_FIELD]) - sum(_TEMPLATE[_SIZE_FIELD])
                    - sum(_TEMPLATE[_CHKSUM_FIELD]) + 8 * ord(" "))
_MAX_USTAR_SIZE = 8 ** 11  # 11 octal digits; larger sizes go in a PAX header
# The fixed fields between and after those three, sliced once rather than per header.
_TEMPLATE_MODE_TO_UID, _TEMPLATE_MTIME, _TEMPLATE_REST = _TEMPLATE[100:124], _TEMPLATE[136:148], _TEMPLATE[156:]


def _one_block(name: str, size: int) -> bool:
    """Whether a member's header is a single ustar block (else tarfile adds PAX records)."""
    return name.isascii() and len(name) <= 100 and 0 <= size < _MAX_USTAR_SIZE


def tar_header(name: str, size: int) -> bytes:
    """The header bytes tarfile (PAX format, our fixed metadata) writes for a regular file.

    An ASCII name of at most 100 bytes and a size below 8 GiB fit a single ustar block, filled
    in from a template; anything else (which needs PAX records) is left to tarfile itself.
    """
    if not _one_block(name, size):
        return _tarinfo_header(name, size)
    name_bytes = name.encode("ascii")
    size_bytes = b"%011o\0" % size  # tarfile.itn: zero-padded octal, NUL-terminated
    chksum = _TEMPLATE_CHKSUM + sum(name_bytes) + sum(size_bytes)
    # tarfile writes the checksum as "%06o\0" and keeps the field's last space.
    return b"".join((name_bytes.ljust(100, b"\0"), _TEMPLATE_MODE_TO_UID, size_bytes, _TEMPLATE_MTIME,
                     b"%06o\0 " % chksum, _TEMPLATE_REST))


def _padded(n: int, block: int) -> int:
    return -(-n // block) * block


def member_tar_size(m: Member) -> int:
    # The header is built when the member is written: keeping 512+ bytes per member from
    # planning to writing would grow the plan's memory with the dataset. Here only its
    # length counts, one block unless tar_header needs PAX records.
    header = tarfile.BLOCKSIZE if _one_block(m.name, m.size) else len(tar_header(m.name, m.size))
    return header + _padded(m.size, tarfile.BLOCKSIZE)


def tar_size(members_bytes: int) -> int:
    """Bytes of a finished tar: two zero end blocks, then padding to a whole record."""
    return _padded(members_bytes + 2 * tarfile.BLOCKSIZE, tarfile.RECORDSIZE)


def _padded_array(n: np.ndarray) -> np.ndarray:
    return -(-n // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


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
    sizes = 3 * tarfile.BLOCKSIZE + _padded_array(lq) + _padded_array(gt) + _padded_array(meta)
    key_lengths = np.fromiter(map(len, samples.keys), dtype=np.int64, count=n)
    unusual = (key_lengths > 100 - len(".lq.png")) | (np.maximum(np.maximum(lq, gt), meta) >= _MAX_USTAR_SIZE)
    for i in np.flatnonzero(unusual).tolist():
        sizes[i] = sum(member_tar_size(m) for m in samples.slice(i, i + 1).members())
    return sizes


def _shard_bounds(sample_sizes: np.ndarray, *, maxcount: int, maxsize: int) -> Iterator[tuple[int, int]]:
    """(start, stop) of each shard: a shard takes samples until the next would exceed
    ``maxcount`` samples or a tar of ``maxsize`` bytes; a sample larger than that gets a shard
    of its own."""
    ends = np.cumsum(sample_sizes)  # ends[i]: member bytes of samples 0..i
    # tar_size(m) <= maxsize  <=>  m + two end blocks fit in the whole records below maxsize.
    room = maxsize // tarfile.RECORDSIZE * tarfile.RECORDSIZE - 2 * tarfile.BLOCKSIZE
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
        raise ValueError(f"the manifest lacks column(s) {missing}; it must follow "
                         f"storage.tables.PAIRS_SCHEMA: rerun the download stage")
    manifest = as_table(manifest, PAIRS_SCHEMA)
    if manifest.num_rows == 0:
        raise ValueError("the manifest has no pairs: rerun the download stage (check its "
                         "quarantine table for rejected files)")
    for name in ("id", "split", "degradation", "lq_path", "gt_path"):
        if manifest.column(name).null_count:
            raise ValueError(f"the manifest has empty '{name}' values: rerun the download stage")
    ids = manifest.column("id")
    if _has_repeats(ids):
        dupes = sorted(i for i, n in Counter(ids.to_pylist()).items() if n > 1)
        raise ValueError(f"the manifest repeats sample id(s) {dupes[:5]}: ids must be unique "
                         f"across datasets and splits; fix the download stage's id scheme")
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
    groups = _plan_groups(manifest, maxcount=maxcount, maxsize=maxsize, sizes=sizes)
    return [plan for group in groups for plan in group]


# Sorting the manifest by these in Arrow (byte order of UTF-8, which is Python's code point
# order for str) gives every group's rows contiguous and in id order.
_PLAN_ORDER = [("split", "ascending"), ("degradation", "ascending"), ("id", "ascending")]


def _plan_groups(manifest: pa.Table, *, maxcount: int, maxsize: int,
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
    sizes = 4 * tarfile.BLOCKSIZE + _padded_array(lq) + _padded_array(gt)  # three headers, one json block
    key_bytes = _byte_lengths(part.column("id"))
    if not source.safe_keys:
        key_bytes *= 3  # at most: sample_key writes each byte as "%XX" or itself
    settled = ((_longest_json(part) <= tarfile.BLOCKSIZE) & (key_bytes <= 100 - len(".lq.png"))
               & (np.maximum(lq, gt) < _MAX_USTAR_SIZE))
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


# ---------------------------------------------------------------------------------------------
# Writing.

class _HashingReader(io.RawIOBase):
    """Reads from ``source`` while counting bytes and hashing them."""

    def __init__(self, source: IO[bytes]):
        self.source, self.sha, self.count = source, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.source.read(n)
        self.sha.update(data)
        self.count += len(data)
        return data


def local_os_path(url: str) -> str | None:
    """The OS path behind a local URL (plain path or file://), or None for any other URL.

    Local sources and shards are read and written with plain os calls: fsspec's url_to_fs
    and file objects cost ~20 us each per call, as much as reading a 15 kB PNG. The path is
    the one fsspec would use (LocalFileSystem._strip_protocol: "~" expanded, made absolute).
    """
    if "::" in url:  # a chained URL (e.g. simplecache::s3://...): fsspec's business
        return None
    protocol, sep, _ = url.partition("://")
    if not sep and url.startswith("/"):
        return url  # the common case, as _strip_protocol would return it (less ~1 us)
    if sep and protocol not in fs.LOCAL_PROTOCOLS:
        return None
    return LocalFileSystem._strip_protocol(url)


def source_sizes(urls: list[str]) -> dict[str, int]:
    """Byte size of each source URL: os.stat for local files, storage listings otherwise."""
    out: dict[str, int] = {}
    remote = []
    for url in urls:
        path = local_os_path(url)
        if path is None:
            remote.append(url)
        else:
            out[url] = os.stat(path).st_size
    if remote:
        out.update(fs.sizes(remote))
    return out


def _libc_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's sync_file_range(2) (Linux), or None where there is none."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call.restype = ctypes.c_int
    return call


_SYNC_FILE_RANGE = _libc_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of the range's dirty pages, do not wait


# Spare block buffers, shared by every shard writer of the process (list.pop and append are
# atomic) and kept between calls: a few MB, at most MAX_PENDING_BLOCKS + 1 per writing
# thread. A new ~1 MB buffer costs a page fault per 4 kB on first touch: with a fresh bytes
# object per block (a b"".join), those faults took longer than reading the sources did.
_SPARE_BLOCKS: list[memoryview] = []


def _take_block(size: int) -> memoryview:
    # One byte more than a block holds: room for the read that checks where a source ends.
    while _SPARE_BLOCKS:
        try:
            block = _SPARE_BLOCKS.pop()
        except IndexError:  # another writer took the last one
            break
        if len(block) == size + 1:  # not one left from a different COPY_BUFSIZE
            return block
    return memoryview(bytearray(size + 1))


class _Side:
    """A writer's side threads: one hashes and writes full blocks, one finishes shards, in order.

    One serves all the shards a thread writes in turn. The caller hands over each full block
    and goes on reading the next sources (hashing, writing and reading all release the GIL);
    at the end of a shard it hands over the finishing too (fsync, rename, sidecar) and starts
    on the next shard at once, where waiting for those cost it ~2.5 ms per shard. Finishing
    runs on a thread of its own, since it mostly waits for the disk, which would hold up the
    next shard's blocks. At most ``MAX_PENDING_BLOCKS`` blocks wait, which bounds memory
    whatever the shard size; their buffers are reused.
    """

    MAX_PENDING_BLOCKS = 4

    def __init__(self) -> None:
        self.executor = ThreadPoolExecutor(max_workers=1)
        self.finisher = ThreadPoolExecutor(max_workers=1)
        self.blocks: deque[tuple[Future, memoryview]] = deque()

    def __enter__(self) -> _Side:
        return self

    def __exit__(self, *exc: object) -> None:
        # Let what was handed over run to its end: finishing tasks must rename or discard
        # their temporaries, so none is cancelled.
        self.executor.shutdown(wait=True)
        self.finisher.shutdown(wait=True)
        self.drain()

    def hand_over(self, buffer: memoryview, fn: Callable[..., None], *args: Any) -> memoryview:
        """Run fn(*args), which reads ``buffer``, on the side thread; a free buffer for the next block."""
        self.blocks.append((self.executor.submit(fn, *args), buffer))
        if len(self.blocks) <= self.MAX_PENDING_BLOCKS:
            return _take_block(len(buffer) - 1)
        future, free = self.blocks.popleft()
        try:
            future.result()
        except BaseException:
            _SPARE_BLOCKS.append(free)
            raise
        return free

    def finish(self, fn: Callable[..., Any], *args: Any) -> Future:
        """fn(*args) on the finishing thread once every block handed over so far is written."""
        written = self.executor.submit(_nothing)  # done once the blocks before it are
        return self.finisher.submit(_after, written, fn, *args)

    def drain(self) -> None:
        """Wait for every block handed over; their errors are left to the shards' finishing."""
        while self.blocks:
            future, buffer = self.blocks.popleft()
            wait([future])
            _SPARE_BLOCKS.append(buffer)


def _nothing() -> None:
    pass


def _after(written: Future, fn: Callable[..., Any], *args: Any) -> Any:
    wait([written])
    return fn(*args)


class _ShardStream:
    """Assembles one shard in blocks of ``COPY_BUFSIZE`` and hands each full block to a _Side.

    The calling thread copies headers and padding into the current block and reads source
    files straight into it (readinto: no bytes object per file, no join per block); the
    side thread sha256-hashes and writes the blocks in order.

    For a local file (``fd`` given) blocks are written with os.write on the file's descriptor
    (no second copy through the file object's buffer), and each block's writeback to disk is
    started at once with sync_file_range(SYNC_FILE_RANGE_WRITE), as PostgreSQL does for its
    checkpoints (backend_flush_after): the disk writes while later blocks are prepared, so the
    fsync before the atomic rename waits for the last block only instead of the whole shard.
    """

    def __init__(self, target: IO[bytes], fd: int | None, side: _Side, *, check_sources: bool = False):
        self.target, self.fd, self.side, self.sha = target, fd, side, hashlib.sha256()
        self.check_sources = check_sources  # read by _copy_source
        self.size = COPY_BUFSIZE  # read once: a block's capacity must not change mid-shard
        self.count = 0  # bytes handed to the side thread
        self.block: memoryview | None = _take_block(self.size)  # None while the side owns it
        self.pos = 0
        self.error: BaseException | None = None  # the first failed block write, if any

    def tell(self) -> int:
        return self.count + self.pos

    def write(self, data: bytes) -> None:
        end = self.pos + len(data)
        if end < self.size:  # the common case: it fits, the block is not full yet
            self.block[self.pos:end] = data
            self.pos = end
            return
        view = memoryview(data)
        while view:
            n = min(len(view), self.size - self.pos)
            self.block[self.pos:self.pos + n] = view[:n]
            self.pos += n
            view = view[n:]
            if self.pos == self.size:
                self.flush()

    def read_exact(self, source: int | Callable[[memoryview], int], member: Member, digest: Any) -> None:
        """Read exactly ``member.size`` bytes from ``source`` (an OS file descriptor, or a readinto).

        The bytes go straight into the block (hashed too if ``digest`` is given). The last read
        asks for one byte more than is left (each block has a spare byte for it): getting
        exactly the rest means the file ends where the plan says (a read returns less than
        asked only at end of file, or early, in which case the loop reads on), so a file of
        the planned size that fits the block needs one read.
        """
        left, block = member.size, self.block
        while True:
            pos, room = self.pos, self.size - self.pos
            last = left <= room
            view = block[pos:pos + (left + 1 if last else room)]
            n = os.readv(source, (view,)) if type(source) is int else source(view)
            if n > left:
                raise _changed_source(member, f"is longer than {member.size} bytes")
            if not n and left:
                raise _changed_source(member, f"is shorter than {member.size} bytes")
            if digest is not None:
                digest.update(view[:n])
            self.pos, left = pos + n, left - n
            if self.pos == self.size:
                self.flush()
                block = self.block
            if last and not left:
                return

    def flush(self) -> None:
        if self.pos:
            # The side owns the buffer from here on, even if hand_over fails: no double release.
            full, self.block = self.block, None
            self.block = self.side.hand_over(full, self._write_block, full[:self.pos], self.count)
            self.count += self.pos
            self.pos = 0

    def release(self) -> None:
        """Give the current block's buffer back (once the last block is handed over, or on failure)."""
        if self.block is not None:
            _SPARE_BLOCKS.append(self.block)
            self.block = None

    def _write_block(self, block: memoryview, offset: int) -> None:
        if self.error is not None:
            return  # the shard is discarded anyway
        try:
            if self.fd is None:
                # A remote file object may keep what it is given (until a part is uploaded),
                # and this buffer is reused: hand it a copy.
                self.target.write(bytes(block))
            else:
                _write_all(self.fd, block)
                if _SYNC_FILE_RANGE is not None:
                    # Only a hint: a failed writeback is fsync's to report.
                    _SYNC_FILE_RANGE(self.fd, offset, len(block), _SYNC_FILE_RANGE_WRITE)
            self.sha.update(block)
        except BaseException as e:
            self.error = e
            raise


def _write_all(fd: int, data: memoryview) -> None:
    while data:  # os.write may write less than asked (a signal, a full disk on some systems)
        data = data[os.write(fd, data):]


_PADDING = tuple(bytes(n) for n in range(tarfile.BLOCKSIZE))  # zero fill after member data


def _copy_member(out: _ShardStream, member: Member) -> None:
    """Append one member: its header, its bytes (checked), then zero padding."""
    name, size, _, data, _ = member
    out.write(tar_header(name, size))
    if data is not None:
        out.write(data)
    else:
        _copy_source(out, member)
    out.write(_PADDING[-size % tarfile.BLOCKSIZE])


def _copy_source(out: _ShardStream, member: Member) -> None:
    """Copy a source file's bytes, refusing one whose size (or, if checked, sha256) differs from the plan."""
    digest = hashlib.sha256() if out.check_sources and member.sha256 else None
    path = local_os_path(member.source)
    if path is None:
        filesystem, path = fs.resolve(member.source)
        with filesystem.open(path, "rb") as f:
            out.read_exact(_readinto(f), member, digest)
    else:
        # os-level calls: io.open adds an fstat and a file object per source (~3 us of ~7).
        fd = os.open(path, os.O_RDONLY)
        try:
            out.read_exact(fd, member, digest)
        finally:
            os.close(fd)
    if digest is not None and digest.hexdigest() != member.sha256:
        raise _changed_source(member, "does not match its manifest sha256")


def _readinto(f: IO[bytes]) -> Callable[[memoryview], int]:
    """``f.readinto``, or the same built from ``f.read`` for file objects that lack it."""
    if hasattr(f, "readinto"):
        return f.readinto

    def readinto(view: memoryview) -> int:
        data = f.read(len(view))
        view[:len(data)] = data
        return len(data)
    return readinto


def _changed_source(member: Member, what: str) -> RuntimeError:
    return RuntimeError(f"{member.source} {what}: it changed after the download stage wrote the "
                        f"manifest; rerun the download stage")


@dataclass(frozen=True)
class ShardRecord:
    bytes: int
    sha256: str


def write_shard(plan: ShardPlan, out_url: str, *, check_sources: bool = False) -> ShardRecord:
    """Write one shard atomically, then its sidecar (so a sidecar implies a finished shard).

    The bytes are what tarfile (PAX format) writes for the plan's members, built directly:
    each header as planned, the member's bytes, zero padding to a 512-byte block, then two
    zero end blocks and zero padding to a whole 10240-byte record. Every source must have its
    planned size; ``check_sources`` also compares its bytes with the manifest sha256.
    """
    with _Side() as side:
        return start_shard(plan, out_url, side, check_sources=check_sources).result()


def start_shard(plan: ShardPlan, out_url: str, side: _Side, *, check_sources: bool = False) -> Future:
    """Read and hand over one shard's bytes (as write_shard); the future of its record.

    Returns once the last block is handed to ``side``, which finishes the shard (_finish_shard)
    after writing its blocks. On an error here the temporary file is removed before it propagates.
    The samples are built a chunk at a time and hashed into the plan's digest as they are
    written (building them again for the sidecar would cost as much).
    """
    url = fs.join(out_url, plan.name)
    target = fs.atomic_open(url, "wb")
    raw = target.__enter__()
    out = _ShardStream(raw, raw.fileno() if local_os_path(url) is not None else None, side,
                       check_sources=check_sources)
    try:
        digest = _PlanDigest(plan)
        for samples in plan.chunks():
            digest.update(samples)
            for member in samples.members():
                _copy_member(out, member)
        members_bytes = out.tell()
        out.write(bytes(tar_size(members_bytes) - members_bytes))  # end blocks, record padding
        out.flush()
    except BaseException as e:
        side.drain()  # no block of this shard may reach the file once it is discarded
        out.release()
        target.__exit__(type(e), e, e.__traceback__)
        raise
    out.release()
    return side.finish(_finish_shard, plan, url, target, out, digest.hexdigest())


def _finish_shard(plan: ShardPlan, url: str, target: Any, out: _ShardStream, digest: str) -> ShardRecord:
    """On the finishing thread, after the shard's last block: rename it into place, then its sidecar."""
    try:
        if out.error is not None:
            raise out.error
        if out.count != plan.size:
            raise RuntimeError(f"{url}: wrote {out.count} bytes but planned {plan.size}; "
                               f"the tar size model in storage/shards.py is out of date")
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


def _run_parallel(fn: Callable[[Any], Any], items: list, workers: int,
                  on_done: Callable[[], None]) -> list:
    """fn over items on a thread pool, results in item order; the first error cancels the rest.

    Threads, not processes: the work is file I/O and hashing, both of which release the GIL,
    and threads share in-process filesystems such as memory://.
    """
    if workers <= 1 or len(items) <= 1:
        out = []
        for item in items:
            out.append(fn(item))
            on_done()
        return out
    results: list = [None] * len(items)
    pool = ThreadPoolExecutor(max_workers=min(workers, len(items)))
    try:
        futures = {pool.submit(fn, item): i for i, item in enumerate(items)}
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            on_done()
        return results
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


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
    (changed since the download stage), at the cost of a second sha256 pass over every byte,
    the shard's own sha256 being the first (~0.8x the throughput; bench/shards.py shows both).
    """
    out_url = os.fspath(out_url)
    with _cyclic_gc_paused():
        groups = _plan_groups(manifest, maxcount=maxcount, maxsize=maxsize)
        listed = _list_sizes(out_url)
        workers = workers or os.cpu_count() or 1
        if local_os_path(out_url) is not None:
            # A local writer keeps two threads busy (reading sources; hashing and writing
            # blocks, see _Side), and much of the reading holds the GIL: on 2 cores, two shards
            # at once were ~1.3x slower than one after the other. Remote writes wait on the
            # network instead, so they keep one shard per worker.
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

    Full collections walk every object in the process, torch's included: while plans held
    every sample as Python objects until the end, they cost ~130 ms per run at 10,000 pairs,
    a fifth of the writer's time. Plans now hold row numbers and samples live one chunk at a
    time, which sets off no full collection (the pause is worth ~1% there). The few cycles a
    run may leave (an exception's traceback) are collected once it is done.
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


def _write_in_turn(groups: Iterator[list[ShardPlan]], out_url: str, listed: dict[str, int],
                   progress: Callable[[int, int], None] | None,
                   start: Callable[[ShardPlan, str, _Side], Future]
                   ) -> tuple[list[ShardPlan], dict[str, ShardRecord]]:
    """Plan everything, then write the missing shards one after another through one side thread.

    Each shard's finishing overlaps with reading the next one's sources (see _Side).
    """
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

    with _Side() as side:
        for plan in todo:
            started.append((plan, start(plan, out_url, side)))
            while started and started[0][1].done():
                collect()
        while started:
            collect()
    return plans, records


def _write_pipelined(groups: Iterator[list[ShardPlan]], out_url: str, listed: dict[str, int],
                     workers: int, progress: Callable[[int, int], None] | None,
                     write: Callable[[ShardPlan, str], ShardRecord]
                     ) -> tuple[list[ShardPlan], dict[str, ShardRecord]]:
    """Write missing shards on ``workers`` threads, each as soon as its group is planned.

    Threads, not processes: reading, hashing and writing release the GIL, threads share
    in-process filesystems such as memory://, and forking a pool costs ~30 ms here, as
    much as writing 500 small pairs. Planning the next group (pure Python) overlaps with
    the writers' GIL-free work. The first error cancels what has not started.
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
    return read_table(fs.join(out_url, INDEX_NAME), hint="the shard stage (`srdiff run --stages shard`)")


def shard_urls(out_url: str, *, split: str, degradations: list[str] | None = None) -> list[str]:
    """Full URLs of the split's shards (optionally only some degradations), in index order.

    The index, not a directory listing, is the source of truth: files it does not name (from
    an older plan or another tool) are never read.
    """
    index = read_index(out_url).to_pylist()
    splits = sorted({r["split"] for r in index})
    rows = [r for r in index if r["split"] == split]
    if not rows:
        raise ValueError(f"no shards for split '{split}' in {fs.join(out_url, INDEX_NAME)} (it has "
                         f"splits {splits}); check the manifest's split names or rerun the "
                         f"download and shard stages")
    if degradations is not None:
        present = {r["degradation"] for r in rows}
        missing = sorted(set(degradations) - present)
        if missing:
            raise ValueError(f"split '{split}' has no shards for degradation(s) {missing} (it has "
                             f"{sorted(present)}); fix the degradation list or rerun the download "
                             f"and shard stages")
        rows = [r for r in rows if r["degradation"] in set(degradations)]
    return [fs.join(out_url, r["shard"]) for r in rows]


_SAMPLE_PARTS = ("lq.png", "gt.png", "json")


def _read_exact(stream: IO[bytes], n: int, url: str) -> bytes:
    data = stream.read(n)
    while len(data) < n and (more := stream.read(n - len(data))):
        data += more
    if len(data) < n:
        raise ValueError(f"{url} ends in the middle of a tar member (truncated); {REPAIR_HINT}")
    return data


def _pax_path(records: bytes) -> str | None:
    # PAX extended header: records "<length> <key>=<value>\n" (POSIX.1-2001, pax format).
    path, pos = None, 0
    while pos < len(records):
        length = int(records[pos:records.index(b" ", pos)])
        key, _, value = records[records.index(b" ", pos) + 1:pos + length - 1].partition(b"=")
        if key == b"path":
            path = value.decode("utf-8", "surrogateescape")
        pos += length
    return path


def _iter_members(stream: IO[bytes], url: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular file in a tar stream, read forward only (no seeking).

    Stricter than tarfile's reader, which ends silently at a damaged header after the first
    member: here anything but a proper end (zero blocks to the end of the file) is an error.
    """
    long_name = None
    while True:
        header = _read_exact(stream, tarfile.BLOCKSIZE, url)
        if header == tarfile.NUL * tarfile.BLOCKSIZE:
            _check_end(stream, url)
            return
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        except tarfile.HeaderError as e:
            raise ValueError(f"{url}: damaged tar header ({e}); {REPAIR_HINT}") from None
        data = _read_exact(stream, info.size, url)
        _read_exact(stream, _padded(info.size, tarfile.BLOCKSIZE) - info.size, url)
        if info.type == tarfile.XHDTYPE:
            long_name = _pax_path(data) or long_name
        elif info.type == tarfile.GNUTYPE_LONGNAME:
            long_name = data.rstrip(tarfile.NUL).decode("utf-8", "surrogateescape")
        elif info.type in tarfile.REGULAR_TYPES:
            yield long_name or info.name, data
            long_name = None
        else:
            long_name = None


def _check_end(stream: IO[bytes], url: str) -> None:
    # After the first zero block: a second one, then only zero padding.
    rest = 0
    while block := stream.read(COPY_BUFSIZE):
        if block.count(0) != len(block):
            raise ValueError(f"{url}: data after the tar end marker; {REPAIR_HINT}")
        rest += len(block)
    if rest < tarfile.BLOCKSIZE:
        raise ValueError(f"{url}: no tar end marker (truncated); {REPAIR_HINT}")


def _split_name(name: str) -> tuple[str, str]:
    # WebDataset convention: key = everything before the first "." of the base name.
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


def _samples_from_stream(stream: IO[bytes], url: str) -> Iterator[dict]:
    key, parts = None, {}
    for name, data in _iter_members(stream, url):
        member_key, ext = _split_name(name)
        if member_key != key:
            if key is not None:
                yield _assemble(key, parts, url)
            key, parts = member_key, {}
        parts[ext] = data
    if key is not None:
        yield _assemble(key, parts, url)


def _assemble(key: str, parts: dict[str, bytes], url: str) -> dict:
    missing = [p for p in _SAMPLE_PARTS if p not in parts]
    if missing:
        raise ValueError(f"{url}: sample '{key}' lacks {missing}; the shard is damaged: {REPAIR_HINT}")
    meta = json.loads(parts["json"])
    return {"id": meta["id"], "lq_png": parts["lq.png"], "gt_png": parts["gt.png"], "meta": meta}


def iter_samples(urls: list[str]) -> Iterator[dict]:
    """Raw samples {"id", "lq_png", "gt_png", "meta"} from each shard in turn, one in memory."""
    for url in urls:
        filesystem, path = fs.resolve(url)
        with filesystem.open(path, "rb") as f:
            yield from _samples_from_stream(f, url)


class _Failure(NamedTuple):
    why: str
    damaged: bool  # the bytes are wrong (else they could not be read: maybe a passing I/O error)


def _verify_one(out_url: str, row: dict) -> _Failure | None:
    """Why the shard in index row ``row`` is bad, or None if it is intact."""
    url = fs.join(out_url, row["shard"])
    filesystem, path = fs.resolve(url)
    try:
        with filesystem.open(path, "rb") as f:
            reader = _HashingReader(f)
            ids = [s["id"] for s in _samples_from_stream(reader, url)]
    except FileNotFoundError:
        return _Failure("missing", damaged=True)
    except (ValueError, KeyError) as e:
        return _Failure(f"unreadable ({_without_hint(str(e))})", damaged=True)
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


def _without_hint(message: str) -> str:
    return message.removesuffix("; " + REPAIR_HINT).removesuffix(": " + REPAIR_HINT)


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


def verify_shards(out_url: str, *, workers: int = 0) -> None:
    """Re-read every shard and check bytes, sha256, count and ids against index.parquet.

    A damaged shard loses its sidecar, the writer's "finished" marker, so the next run of the
    shard stage rewrites exactly the damaged shards: one of the right size would otherwise be
    kept (write_shards trusts a sidecar that matches the plan and the size). A shard that could
    not be read (an I/O error, perhaps passing) is reported but not marked.
    """
    out_url = os.fspath(out_url)
    rows = read_index(out_url).to_pylist()
    results = _run_parallel(lambda r: _verify_one(out_url, r), rows, workers or os.cpu_count() or 1,
                            lambda: None)
    failed = [(row, failure) for row, failure in zip(rows, results) if failure]
    if not failed:
        return
    lines, unmarked = [f"{len(failed)} of {len(rows)} shard(s) under {out_url} failed verification:"], []
    for row, failure in failed:
        left = _mark_for_rewriting(out_url, row) if failure.damaged else "it was not marked for rewriting"
        lines.append(f"  {row['shard']}: {failure.why}" + (f"; {left}" if left else ""))
        if left:
            unmarked.append(row["shard"])
    if len(unmarked) < len(failed):
        lines.append("the damaged shards are marked for rewriting: rerun the shard stage with the config that "
                     "wrote them and --refresh shard (`srdiff run --config <it> --stages shard --refresh shard`), "
                     "which rewrites only these")
    if unmarked:
        lines.append(f"not marked: {', '.join(unmarked)}; run `srdiff verify-shards` again, or delete those "
                     f"shards and rerun the shard stage")
    raise ShardVerificationError("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# Decoding and the training/evaluation dataset.

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
        raise ValueError(f"LQ {lq.shape} and GT {gt.shape} differ in size; a paired crop needs "
                         f"equal sizes: rerun the download stage")
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


def check_feed(num_shards: int, world_size: int, num_workers: int, *, ranks_setting: str = "train.nproc") -> None:
    """Every (rank, DataLoader worker) reader needs a shard of its own, or it gets nothing in
    exact mode and, in resampled mode, streams the same shard in the same order as another
    reader (the same samples in nearby batches). Refused up front, naming the setting to lower."""
    workers = max(num_workers, 1)
    if num_shards >= world_size * workers:
        return
    fix = "or lower shard.maxcount so the shard stage writes more, smaller shards"
    if num_shards < world_size:
        raise ValueError(f"{num_shards} shards cannot feed {world_size} ranks (one each at least): lower "
                         f"{ranks_setting} to at most {max(num_shards, 1)}, {fix}")
    raise ValueError(f"{num_shards} shards cannot feed {world_size} ranks x {workers} workers (one each at least): "
                     f"lower train.num_workers to at most {num_shards // world_size}, {fix}")


def split_shards(urls: list[str], *, rank: int, world_size: int, worker_id: int,
                 num_workers: int) -> list[str]:
    """This (rank, worker)'s shards in exact mode: every shard to exactly one reader.

    Readers are numbered rank-major (rank * num_workers + worker_id) and take every
    (world_size * num_workers)-th shard, in order.
    """
    check_feed(len(urls), world_size, num_workers)
    workers = max(num_workers, 1)
    return urls[rank * workers + worker_id::world_size * workers]


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _resampled(urls: list[str], rng: np.random.Generator) -> Iterator[dict]:
    # Sampling shards with replacement, as webdataset's ResampledShards: no epoch boundary,
    # so every rank/worker can stream for as long as training needs.
    while True:
        yield from iter_samples([urls[int(rng.integers(len(urls)))]])


def _shuffled(samples: Iterator[dict], buffer: int, rng: np.random.Generator) -> Iterator[dict]:
    # A shuffle buffer as in webdataset's shuffle(): each new sample swaps with a random held
    # one, which is emitted (memory: `buffer` raw samples). Decorrelates neighbours, which in
    # id-sorted shards are often frames of one scene.
    held: list[dict] = []
    for sample in samples:
        if len(held) < buffer:
            held.append(sample)
            continue
        i = int(rng.integers(buffer))
        held[i], sample = sample, held[i]
        yield sample
    rng.shuffle(held)
    yield from held


class PairDataset(torch.utils.data.IterableDataset):
    """LQ/GT pairs from shards as float tensors, split by DDP rank and DataLoader worker.

    Exact mode (``resampled=False``): each sample exactly once across all ranks x workers, in
    shard order. Resampled mode: an endless stream; each (seed, rank, worker, epoch) draws
    shards with its own RNG (``shuffle_buffer`` > 0 also shuffles samples across shards) from
    its worker's own share of ``urls`` (every num_workers-th, as in exact mode), so no two
    workers stream the same shard in the same order; with fewer shards than workers, every
    worker draws from all of them (the train stage caps its workers: tasks.train.rank_workers).
    """

    def __init__(self, urls: list[str], *, patch_size: int | None = None, augment: bool = False,
                 resampled: bool = False, embeddings: dict[str, np.ndarray] | None = None,
                 seed: int = 0, rank: int = 0, world_size: int = 1, shuffle_buffer: int = 0):
        super().__init__()
        if not urls:
            raise ValueError("PairDataset got no shard URLs: run the shard stage, and check the "
                             "split and degradations asked of shard_urls()")
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

    def rngs(self, worker_id: int) -> tuple[np.random.Generator, np.random.Generator]:
        """(shard-drawing RNG, crop/augment RNG) of one reader, seeded by (seed, rank, worker, epoch)."""
        seq = np.random.SeedSequence([self.seed, self.rank, worker_id, self.epoch])
        shard_seq, augment_seq = seq.spawn(2)
        return np.random.default_rng(shard_seq), np.random.default_rng(augment_seq)

    def raw_samples(self, worker_id: int, num_workers: int,
                    shard_rng: np.random.Generator) -> Iterator[dict]:
        """This reader's raw samples: its share of the shards (exact) or an endless draw."""
        if not self.resampled:
            return iter_samples(split_shards(self.urls, rank=self.rank, world_size=self.world_size,
                                             worker_id=worker_id, num_workers=num_workers))
        own = self.urls[worker_id::num_workers] if len(self.urls) >= num_workers else self.urls
        samples = _resampled(own, shard_rng)
        return _shuffled(samples, self.shuffle_buffer, shard_rng) if self.shuffle_buffer else samples

    def prepare(self, raw: dict, rng: np.random.Generator) -> dict:
        """Raw sample -> {"id", "degradation", "lq", "gt"[, "context"]} (crop, augment)."""
        lq, gt = decode_png(raw["lq_png"]), decode_png(raw["gt_png"])
        if lq.shape != gt.shape:
            raise ValueError(f"sample {raw['id']}: LQ {lq.shape} and GT {gt.shape} differ in size: "
                             f"rerun the download stage")
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
            raise KeyError(f"no embedding for sample id {sample_id!r}: rerun the embed stage "
                           f"(its tables must cover every id in the shards)")
        vector = np.asarray(self.embeddings[sample_id], dtype=np.float32)
        if vector.ndim != 1:
            raise ValueError(f"embedding of {sample_id!r} has shape {vector.shape}, expected [D]")
        return torch.tensor(vector)

    def __iter__(self) -> Iterator[dict]:
        worker_id, num_workers = _worker()
        shard_rng, augment_rng = self.rngs(worker_id)
        for raw in self.raw_samples(worker_id, num_workers, shard_rng):
            yield self.prepare(raw, augment_rng)


def make_loader(dataset: PairDataset, *, batch_size: int,
                num_workers: int) -> torch.utils.data.DataLoader:
    """A DataLoader over ``dataset``; exact mode checks up front that every worker gets a shard
    (resampled mode's caller checks its rank's shards: tasks.train.rank_shards)."""
    if not dataset.resampled:
        check_feed(len(dataset.urls), dataset.world_size, num_workers)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                       pin_memory=torch.cuda.is_available(),
                                       persistent_workers=False)
