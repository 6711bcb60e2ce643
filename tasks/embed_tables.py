"""The embed stage's tables as the stages downstream read them: embeddings by id, the quarantine
(samples with no embedding) and a PairDataset that leaves those out.

Light on purpose (no open_clip, no subprocess): train and evaluate import it to read what the
embed stage wrote; tasks/embed.py, which computes it, imports the heavy libraries.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import torch

from srdiff_core.data import PairDataset
from storage import fs, tables

QUARANTINE_NAME = "embed_quarantine.parquet"
QUARANTINE_SCHEMA = pa.schema([("id", pa.string()), ("split", pa.string()), ("degradation", pa.string()),
                               ("reason", pa.string())])


def quarantine_table(rows: list[dict]) -> pa.Table:
    """The skipped samples, sorted by id (an empty table when none were skipped)."""
    return pa.Table.from_pylist(sorted(rows, key=lambda r: r["id"]), schema=QUARANTINE_SCHEMA)


def vector_column(values: torch.Tensor) -> pa.FixedSizeListArray:
    """float32 [N, D] as a fixed-size-list column."""
    flat = pa.array(values.numpy().astype(np.float32).ravel(), pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, values.shape[1])


def column_vectors(table: pa.Table, name: str) -> torch.Tensor:
    """A fixed-size-list column as float32 [N, D] (a writable copy)."""
    column = table.column(name).combine_chunks()
    flat = np.array(column.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
    return torch.from_numpy(flat.reshape(table.num_rows, column.type.list_size))


def read_embeddings(url: str) -> dict[str, np.ndarray]:
    """An embedding table as {id: float32 vector}."""
    table = tables.read_table(url, hint="the embed stage (`srdiff run --stages embed`)")
    values = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(table.num_rows, -1)
    return dict(zip(table.column("id").to_pylist(), values.astype(np.float32)))


def quarantine_url_beside(restorecls_url: str) -> str:
    """The embed stage writes embed_quarantine.parquet in the folder of its RestoreCLS table."""
    return fs.join(restorecls_url.rstrip("/").rsplit("/", 1)[0], QUARANTINE_NAME)


def quarantine_rows(restorecls_url: str) -> list[dict]:
    """The embed stage's quarantine rows (id, split, degradation, reason) beside ``restorecls_url``;
    none when there is no such table (e.g. a RestoreCLS table imported from the .pt layout)."""
    url = quarantine_url_beside(restorecls_url)
    return tables.read_table(url).to_pylist() if fs.exists(url) else []


def quarantined_ids(restorecls_url: str, stage: str, log=None) -> frozenset[str]:
    """Ids the embed stage quarantined (no embedding: an undecodable PNG), from the quarantine table
    beside ``restorecls_url``; a warning names them. Empty when there is no such table."""
    ids = frozenset(r["id"] for r in quarantine_rows(restorecls_url))
    if ids and log is not None:
        log.warning(f"{stage}: skipping {len(ids)} sample(s) the embed stage quarantined (a PNG that does not "
                    f"decode, so no embedding), e.g. {sorted(ids)[:3]}; the reasons are in "
                    f"{quarantine_url_beside(restorecls_url)}. To use them, repair those files and rerun from "
                    f"the download stage")
    return ids


def skipped_by_degradation(rows: list[dict], split: str) -> dict[str, int]:
    """How many quarantine ``rows`` of ``split`` each degradation has, sorted by degradation."""
    return dict(sorted(Counter(r["degradation"] for r in rows if r["split"] == split).items()))


class EmbeddedPairDataset(PairDataset):
    """srdiff_core.data.PairDataset without the samples in ``skip_ids`` (those the embed stage
    quarantined: they are in the shards but have no embedding)."""

    def __init__(self, urls: list[str], *, skip_ids: frozenset[str] = frozenset(), **kwargs):
        super().__init__(urls, **kwargs)
        self.skip_ids = frozenset(skip_ids)

    def keep(self, raw: dict) -> bool:
        return raw["id"] not in self.skip_ids
