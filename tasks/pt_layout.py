"""The original SR-Diff per-image embedding layout (``LQCLS/<id>.pt``, ``RestoreCLS/<id>.pt``):
written beside our tables for users of that code, and read back into an embedding table
(`srdiff import-embeddings`)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import torch

from storage import fs


def export_pt_layout(out_url: str, folder: str, ids: list[str], values: torch.Tensor) -> None:
    """The seed's per-image layout (`LQCLS/<id>.pt`) for users of the original SR-Diff code."""
    for sample_id, vec in zip(ids, values):
        buf = io.BytesIO()
        torch.save(vec.clone().unsqueeze(0), buf)
        fs.atomic_write_bytes(fs.join(out_url, folder, f"{sample_id}.pt"), buf.getvalue())


def _load_pt_vector(url: str) -> torch.Tensor:
    """One ``<id>.pt`` of the seed's layout as a float32 [D] vector ([1, D] and [D] both accepted)."""
    try:
        value = torch.load(io.BytesIO(fs.read_bytes(url)), map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses pickled code; a non-torch file fails to unpickle
        raise ValueError(f"{url} is not a tensor file torch.load(weights_only=True) can read "
                         f"({type(e).__name__}: {e}); remove it or re-export it with torch.save(tensor)") from e
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{url} holds a {type(value).__name__}, not a tensor; the per-image layout wants one "
                         f"[1, D] or [D] tensor per file: re-export it with torch.save(tensor)")
    if not (value.ndim == 1 or (value.ndim == 2 and value.shape[0] == 1)) or not value.is_floating_point():
        raise ValueError(f"{url} holds a {value.dtype} tensor of shape {tuple(value.shape)}; expected a "
                         f"floating [1, D] or [D] embedding")
    return value.reshape(-1).float()


def _sample_columns(ids: list[str], samples: pa.Table | None) -> tuple[list, list]:
    """split and degradation of each id from ``samples`` (None columns when no table is given)."""
    if samples is None:
        return [None] * len(ids), [None] * len(ids)
    known = {r["id"]: r for r in samples.select(["id", "split", "degradation"]).to_pylist()}
    missing = [i for i in ids if i not in known]
    if missing:
        raise ValueError(f"{len(missing)} imported id(s) are not in the samples table, e.g. {missing[:3]}; "
                         f"pass the pairs manifest these embeddings were made from")
    return [known[i]["split"] for i in ids], [known[i]["degradation"] for i in ids]


def import_pt_layout(folder: str, *, samples: pa.Table | None = None,
                     metadata: dict[str, str] | None = None) -> pa.Table:
    """The seed's per-image layout (``<folder>/<id>.pt``, as ``export_pt_layout`` writes it) as an
    embedding table (id, split, degradation, embedding), sorted by id.

    The id is the file's path under ``folder`` without ``.pt`` (ids with "/" live in subfolders).
    ``samples`` (any table with id, split, degradation, e.g. the pairs manifest) fills split and
    degradation; without it they are null. Files are read with torch.load(weights_only=True).
    """
    filesystem, root = fs.resolve(folder)
    root = root.rstrip("/")
    paths = filesystem.glob(f"{root}/**/*.pt")
    if not paths:
        raise FileNotFoundError(f"no .pt files under {folder}; point at the LQCLS/ or RestoreCLS/ folder "
                                f"of an export (embed.export_pt: true)")
    ids = sorted({p[len(root) + 1:-len(".pt")] for p in paths})
    vectors = [_load_pt_vector(fs.join(folder, f"{i}.pt")) for i in ids]
    dims = sorted({v.numel() for v in vectors})
    if len(dims) > 1:
        raise ValueError(f"the .pt files under {folder} mix embedding sizes {dims}; import one model's export")
    splits, degradations = _sample_columns(ids, samples)
    flat = pa.array(torch.stack(vectors).numpy().astype(np.float32).ravel())
    table = pa.table({"id": pa.array(ids, pa.string()), "split": pa.array(splits, pa.string()),
                      "degradation": pa.array(degradations, pa.string()),
                      "embedding": pa.FixedSizeListArray.from_arrays(flat, dims[0])})
    return table.replace_schema_metadata({k: str(v) for k, v in (metadata or {}).items()})
