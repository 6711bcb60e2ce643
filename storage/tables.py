"""Parquet tables at fsspec URLs: atomic writes, reads that name a missing or unreadable file, digests."""

from __future__ import annotations

import base64
import datetime as _dt
import decimal
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage import fs
from storage.errors import MissingFile, UnreadableTable

__all__ = ["PAIRS_SCHEMA", "MissingFile", "UnreadableTable", "as_table", "read_metadata", "read_table",
           "table_digest", "write_table"]

# The download stage writes one row per LQ/GT pair to manifests/pairs.parquet. Paths are full
# URLs; width/height are the (shared) pixel size of LQ and GT.
PAIRS_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("dataset", pa.string(), nullable=False),
    pa.field("degradation", pa.string(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("lq_path", pa.string(), nullable=False),
    pa.field("gt_path", pa.string(), nullable=False),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("lq_sha256", pa.string(), nullable=False),
    pa.field("gt_sha256", pa.string(), nullable=False),
    # File sizes, recorded by the download stage beside the digests so the shard writer plans
    # without a stat per file (a size that no longer matches is refused when copying). Optional:
    # a manifest without them is planned from the files.
    pa.field("lq_bytes", pa.int64(), nullable=True),
    pa.field("gt_bytes", pa.int64(), nullable=True),
])


def as_table(table: pa.Table | list[dict], schema: pa.Schema | None = None) -> pa.Table:
    """A pyarrow Table from a Table or a list of row dicts, conformed to ``schema`` if given."""
    if isinstance(table, pa.Table):
        if schema is None:
            return table
        missing = [f.name for f in schema if f.name not in table.column_names and not f.nullable]
        if missing:
            raise ValueError(f"table lacks column(s) {missing} required by the schema "
                             f"(it has {table.column_names})")
        for f in schema:  # an optional (nullable) column the table lacks is all nulls
            if f.name not in table.column_names:
                table = table.append_column(f.name, pa.nulls(table.num_rows, f.type))
        return table.select(schema.names).cast(schema)
    rows = list(table)
    if not rows and schema is None:
        raise ValueError("cannot infer the columns of an empty list of rows: pass schema=")
    return pa.Table.from_pylist(rows, schema=schema)


def write_table(url: str | os.PathLike, table: pa.Table | list[dict],
                schema: pa.Schema | None = None) -> None:
    """Write a Parquet file atomically (a killed writer leaves the old file or none)."""
    data = as_table(table, schema)
    with fs.atomic_open(url, "wb") as f:
        pq.write_table(data, f)


def read_table(url: str | os.PathLike, hint: str | None = None,
               columns: list[str] | None = None, *, kind: str | None = None) -> pa.Table:
    """Read a Parquet file; a missing file raises MissingFile, one that is not Parquet UnreadableTable.

    ``hint`` (what writes the file, e.g. "the download stage") and ``kind`` (what the file is)
    are carried by those errors as facts (``written_by``, ``kind``), from which the task layer
    (tasks/advice.py) words what to run next.
    """
    with _open_written(url, hint, kind) as f, _parquet_errors_named(url, hint, kind):
        return pq.read_table(f, columns=columns)


@contextmanager
def _open_written(url: str | os.PathLike, hint: str | None, kind: str | None) -> Iterator[IO[bytes]]:
    """``url`` opened for reading; a missing file raises MissingFile."""
    url = os.fspath(url)
    if not fs.exists(url):
        raise MissingFile(url, kind, hint)
    filesystem, path = fs.resolve(url)
    with filesystem.open(path, "rb") as f:
        yield f


@contextmanager
def _parquet_errors_named(url: str | os.PathLike, hint: str | None, kind: str | None) -> Iterator[None]:
    """pyarrow's parse errors (ArrowInvalid: "Parquet magic bytes not found...", or an OSError:
    "Couldn't deserialize thrift" for a damaged footer) as an UnreadableTable naming the file."""
    try:
        yield
    except (pa.ArrowInvalid, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise UnreadableTable(os.fspath(url), str(e), kind, hint) from e


def read_metadata(url: str | os.PathLike, hint: str | None = None, *, kind: str | None = None) -> dict[str, str]:
    """A Parquet file's schema metadata as text, read from its footer alone (not its rows)."""
    with _open_written(url, hint, kind) as f, _parquet_errors_named(url, hint, kind):
        metadata = pq.read_schema(f).metadata or {}
    return {k.decode(): v.decode() for k, v in metadata.items()}


# ---------------------------------------------------------------------------------------------
# Digest: sha256 over the schema (names and types) and every value in row order. Chunking,
# slicing and Parquet/IPC encoder details do not change it; reordering rows or columns does.
# Numeric columns (and lists of numbers, e.g. embeddings) hash their raw little-endian values;
# everything else hashes one canonical JSON document per value.

def table_digest(table: pa.Table) -> str:
    h = hashlib.sha256()
    header = [[f.name, str(f.type)] for f in table.schema]
    h.update(json.dumps({"columns": header, "rows": table.num_rows}).encode())
    for name, column in zip(table.column_names, table.columns):
        h.update(b"\x00column\x00" + name.encode())
        for block in _column_blocks(column):
            h.update(block)
    return h.hexdigest()


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def _column_blocks(column: pa.ChunkedArray) -> Iterator[bytes]:
    # The encoding is chosen per column, never per chunk, so chunk boundaries cannot matter.
    t = column.type
    if _is_number(t) and column.null_count == 0:
        dtype = np.dtype(t.to_pandas_dtype()).newbyteorder("<")
        for chunk in column.chunks:
            yield np.asarray(chunk.to_numpy(zero_copy_only=False), dtype=dtype).tobytes()
    elif _is_flat_number_list(column):
        yield from _number_list_digests(column)
    else:
        for chunk in column.chunks:
            for value in chunk.to_pylist():
                yield json.dumps(value, default=_json_default, separators=(",", ":")).encode() + b"\n"


def _is_flat_number_list(column: pa.ChunkedArray) -> bool:
    t = column.type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)):
        return False
    if not _is_number(t.value_type) or column.null_count:
        return False
    return all(chunk.flatten().null_count == 0 for chunk in column.chunks)


def _number_list_digests(column: pa.ChunkedArray) -> Iterator[bytes]:
    # All lengths, then all values: a canonical encoding of a list column whatever its offsets
    # buffer looks like (sliced arrays keep non-zero starting offsets). Two running hashes keep
    # it independent of chunking without concatenating the column.
    lengths, values = hashlib.sha256(), hashlib.sha256()
    dtype = np.dtype(column.type.value_type.to_pandas_dtype()).newbyteorder("<")
    for chunk in column.chunks:
        lengths.update(np.asarray(pc.list_value_length(chunk), dtype="<i8").tobytes())
        flat = chunk.flatten().to_numpy(zero_copy_only=False)
        values.update(np.asarray(flat, dtype=dtype).tobytes())
    yield lengths.digest()
    yield values.digest()


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(value).decode()}
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        return {"$time": value.isoformat()}
    if isinstance(value, _dt.timedelta):
        return {"$delta": [value.days, value.seconds, value.microseconds]}
    if isinstance(value, decimal.Decimal):
        return {"$decimal": str(value)}
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"table_digest cannot serialise a {type(value).__name__} value")
