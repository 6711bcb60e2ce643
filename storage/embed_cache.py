"""Content-keyed embedding cache: each image's embedding under one model is stored once.

Layout under the cache root (the pipeline uses ``<data_root>/cache/embeddings``)::

    <model-key>/model.json              the descriptor the key stands for (arch, weights digest, ...)
    <model-key>/part-<digest>.parquet   rows: sha256 (of the image file's bytes), embedding float32[D]

The model key is a digest of a descriptor of everything besides the image bytes that an
embedding depends on; the caller builds it (``srdiff_core.clip_embed.cache_descriptor``).
Appending writes a new part, atomically and named by its content, so concurrent writers (DDP
ranks, two pipelines on one data root) never write the same file; a reader takes the union of
the parts. :meth:`EmbeddingCache.compact` folds many parts into one and deletes only parts it
has read, so a concurrent compaction or append never loses a row.

The cache only saves recomputation: a part that cannot be read is renamed ``*.bad`` with a
warning and its rows count as misses, never stopping the stage. A damaged ``model.json`` sets
the whole folder aside the same way (``model.json.<time>.bad`` and every part ``*.bad``): all
of that model's embeddings are then misses, recomputed and cached anew.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping

import numpy as np
import pyarrow as pa

from storage import fs, tables
from storage.errors import OtherModelCache

CACHE_FORMAT = 1  # bump when the part schema changes: older parts then sit under another key
DESCRIPTOR_NAME = "model.json"
PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"
COMPACT_ABOVE = 16  # parts: each run appends one per process, compaction keeps reads to a few files
BAD_SUFFIX = ".bad"  # an unreadable part, renamed out of the way (kept for a look, never read)
STALE_TEMP_S = 3600.0  # a writer's temp file this old is left from a killed process: compaction removes it

log = logging.getLogger(__name__)


def model_key(descriptor: Mapping[str, str]) -> str:
    """The folder name of a model's cache: a digest of its descriptor (and the cache format)."""
    doc = json.dumps({"format": CACHE_FORMAT, **descriptor}, sort_keys=True)
    return fs.sha256_bytes(doc.encode())[:32]


def part_schema(dim: int) -> pa.Schema:
    return pa.schema([pa.field("sha256", pa.string(), nullable=False),
                      pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False)])


class EmbeddingCache:
    """The cached embeddings of one model (``descriptor``) under ``root_url``."""

    def __init__(self, root_url: str, descriptor: Mapping[str, str]):
        self.descriptor = {k: str(v) for k, v in descriptor.items()}
        self.key = model_key(self.descriptor)
        self.url = fs.join(root_url, self.key)

    def parts(self) -> list[str]:
        return fs.glob(fs.join(self.url, f"{PART_PREFIX}*{PART_SUFFIX}"))

    def load(self) -> dict[str, np.ndarray]:
        """{sha256: float32 [D] vector} of every cached image (empty for a new model, or one whose
        model.json is damaged: the folder is set aside)."""
        if not self._check_descriptor():
            return {}
        out: dict[str, np.ndarray] = {}
        seen: set[str] = set()
        for _ in range(2):
            vanished = False
            for url in self.parts():
                if url in seen:
                    continue
                seen.add(url)
                rows = self._read_part(url)
                vanished |= rows is None
                out.update(rows or {})
            # A part gone since the listing was compacted away; the part holding its rows was
            # written before it was deleted, so one more listing finds it (were that one compacted
            # away too in between, its rows would be misses: recomputed, never wrong).
            if not vanished:
                break
        return out

    def append(self, vectors: Mapping[str, np.ndarray]) -> str | None:
        """Add embeddings (sha256 -> [D] vector) as one new part; returns its URL (None if empty)."""
        if not vectors:
            return None
        self._write_descriptor()
        keys = sorted(vectors)
        values = np.stack([np.asarray(vectors[k], dtype=np.float32).reshape(-1) for k in keys])
        digest = hashlib.sha256("\n".join(keys).encode())
        digest.update(values.tobytes())
        url = fs.join(self.url, f"{PART_PREFIX}{digest.hexdigest()[:16]}{PART_SUFFIX}")
        flat = pa.array(values.ravel(), pa.float32())
        table = pa.table([pa.array(keys, pa.string()), pa.FixedSizeListArray.from_arrays(flat, values.shape[1])],
                         schema=part_schema(values.shape[1]))
        tables.write_table(url, table)
        return url

    def compact(self, above: int = COMPACT_ABOVE) -> bool:
        """Fold the parts into one when there are more than ``above``; True if it did. Also removes
        temp files of writers killed mid-write (older than STALE_TEMP_S)."""
        self.remove_stale_temps()
        parts = self.parts()
        if len(parts) <= above:
            return False
        merged: dict[str, np.ndarray] = {}
        read = []
        for url in parts:
            rows = self._read_part(url)
            if rows:  # not a part gone since the listing, nor an unreadable one (set aside, a miss)
                merged.update(rows)
                read.append(url)
        new = self.append(merged)
        for url in read:
            if url != new:  # a part holding everything already gets the same name: keep it
                try:
                    fs.remove(url)
                except FileNotFoundError:  # another compaction got there first; its part has the rows
                    pass
        return True

    # ------------------------------------------------------------------ internals

    def remove_stale_temps(self, older_than_s: float = STALE_TEMP_S) -> list[str]:
        """Delete temp files (``.<name>.<random>.tmp``, storage.fs.atomic_open) older than
        ``older_than_s``: a writer killed mid-write leaves them; a live writer's are younger."""
        filesystem, root = fs.resolve(self.url)
        removed = []
        for path in filesystem.glob(f"{root.rstrip('/')}/.*{fs.TEMP_SUFFIX}"):
            try:
                age = time.time() - filesystem.modified(path).timestamp()
                if age > older_than_s:
                    filesystem.rm(path)
                    removed.append(path)
            except FileNotFoundError:  # its writer finished, or another compaction removed it
                continue
            except NotImplementedError:  # a filesystem without modification times: leave them
                break
        return removed

    def _read_part(self, url: str) -> dict[str, np.ndarray] | None:
        """The part's rows; None when it no longer exists; {} (all misses) when it is unreadable."""
        try:
            table = tables.read_table(url)
            column = table.column("embedding").combine_chunks()
            # A copy: the vectors outlive the table and must be writable (torch.from_numpy).
            values = np.array(column.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
            values = values.reshape(table.num_rows, -1)
            return dict(zip(table.column("sha256").to_pylist(), values))
        except FileNotFoundError:
            return None
        except (pa.ArrowException, OSError, KeyError, ValueError) as e:
            self._set_aside(url, e)
            return {}

    @staticmethod
    def _rename_aside(url: str, target: str) -> str:
        """Rename ``url`` to ``target`` (out of every later listing); returns what happened, for a warning."""
        filesystem, path = fs.resolve(url)
        try:
            filesystem.mv(path, fs.resolve(target)[1])
            return f"renamed to {target}"
        except FileNotFoundError:
            return "another process already set it aside"
        except OSError as e:  # e.g. read-only storage: it stays, and is skipped again next time
            return f"could not rename it ({type(e).__name__}: {e})"

    @classmethod
    def _set_aside(cls, url: str, error: Exception) -> None:
        """Rename an unreadable part to ``*.bad``, with a warning."""
        where = cls._rename_aside(url, url + BAD_SUFFIX)
        log.warning(f"embedding cache part {url} is unreadable ({type(error).__name__}: {error}); its rows "
                    f"count as misses and are recomputed; {where}")

    def _set_aside_folder(self, descriptor_url: str, why: str) -> None:
        """A damaged model.json: set it and every part aside, with one warning. Storage that damaged
        the record may have damaged the parts where parquet cannot tell (a flipped float), and the
        cache only saves recomputation, so nothing in the folder is trusted. The time in the name
        keeps an earlier damaged copy; the next append writes a fresh model.json."""
        where = self._rename_aside(descriptor_url, f"{descriptor_url}.{time.time_ns()}{BAD_SUFFIX}")
        parts = self.parts()
        for url in parts:
            self._rename_aside(url, url + BAD_SUFFIX)
        log.warning(f"embedding cache {self.url}: {DESCRIPTOR_NAME} is damaged ({why}), so the folder's "
                    f"{len(parts)} part(s) are set aside too (*{BAD_SUFFIX}) and every embedding of this model "
                    f"counts as a miss and is recomputed; {DESCRIPTOR_NAME} {where}")

    def _check_descriptor(self) -> bool:
        """Refuse a folder of another model; False (all misses) when model.json is damaged (set aside)."""
        url = fs.join(self.url, DESCRIPTOR_NAME)
        try:
            stored = json.loads(fs.read_bytes(url))
        except FileNotFoundError:
            # A new model, or another process (an embed rank) has just set a damaged one aside,
            # maybe still renaming its parts: then nothing here is trusted until a fresh
            # model.json is written (the next append).
            return not fs.glob(f"{url}.*{BAD_SUFFIX}")
        except ValueError as e:  # not JSON, or not UTF-8 (JSONDecodeError, UnicodeDecodeError)
            self._set_aside_folder(url, f"{type(e).__name__}: {e}")
            return False
        if not isinstance(stored, dict):
            self._set_aside_folder(url, f"a JSON {type(stored).__name__}, not a descriptor")
            return False
        if stored != self.descriptor:
            raise OtherModelCache(self.url, stored, self.descriptor)
        return True

    def _write_descriptor(self) -> None:
        url = fs.join(self.url, DESCRIPTOR_NAME)
        if not fs.exists(url):
            fs.atomic_write_bytes(url, json.dumps(self.descriptor, indent=1, sort_keys=True).encode())
