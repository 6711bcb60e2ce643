"""Embed stage: open_clip LQCLS/GTCLS, the Semantic Refinement Module, RestoreCLS."""

from __future__ import annotations

import io
import re
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from prefect import task

from srdiff_core import clip_embed, srm
from srdiff_core.config import Config
from storage import fs, shards, tables
from tasks import tracking
from tasks.common import RateLogger, StageResult, pick_device, stage_dir, stage_logger

SPLITS = ("train", "val")


# What a sample's bytes can raise when they are not a readable image: PIL's "cannot identify",
# "image file is truncated" and "broken data stream" are OSErrors; a bad chunk can give
# SyntaxError/ValueError; a huge header gives DecompressionBombError.
UNDECODABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
QUARANTINE_SCHEMA = pa.schema([("id", pa.string()), ("split", pa.string()), ("degradation", pa.string()),
                               ("reason", pa.string())])


def _decode_error(which: str, error: Exception) -> str:
    # PIL puts the BytesIO's repr (a memory address) in its message: drop it so the reason is stable.
    message = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(error))
    return f"{which} PNG does not decode ({type(error).__name__}: {message})"


def decode_sample(sample: dict) -> dict:
    """A shard sample -> {"id", "degradation", "split", "lq", "gt"} (uint8 [3,H,W] tensors), or,
    when LQ or GT does not decode, a quarantine row {"id", "split", "degradation", "reason"}."""
    meta = sample["meta"]
    row = {"id": sample["id"], "degradation": meta["degradation"], "split": meta["split"]}
    for which in ("lq", "gt"):
        try:
            row[which] = torch.from_numpy(shards.decode_png(sample[f"{which}_png"])).permute(2, 0, 1)
        except UNDECODABLE as e:
            return {"id": row["id"], "split": row["split"], "degradation": row["degradation"],
                    "reason": _decode_error(which.upper(), e)}
    return row


def is_quarantined(item: dict) -> bool:
    return "reason" in item


class DecodedShardImages(torch.utils.data.IterableDataset):
    """Decoded LQ and GT of every sample in the shards, split across DataLoader workers by shard.
    A sample that does not decode comes out as a quarantine row (see ``decode_sample``)."""

    def __init__(self, urls: list[str]):
        self.urls = urls

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        urls = self.urls if info is None else self.urls[info.id::info.num_workers]
        for sample in shards.iter_samples(urls):
            yield decode_sample(sample)


def _collate(items: list[dict]) -> list[dict]:
    return items


@dataclass
class Embeddings:
    ids: list[str]
    splits: list[str]
    degradations: list[str]
    lq: torch.Tensor  # [N, D] float32, L2-normalised
    gt: torch.Tensor
    quarantine: list[dict] = field(default_factory=list)  # samples skipped: id, split, degradation, reason


def embed_shards(encoder: clip_embed.ClipEncoder, urls: list[str], *, batch_size: int, num_workers: int,
                 log) -> Embeddings:
    """Embed LQ and GT of every sample; one model call per batch for both. Samples whose LQ or
    GT does not decode are skipped, logged, and listed in ``Embeddings.quarantine``."""
    loader = torch.utils.data.DataLoader(DecodedShardImages(urls), batch_size=batch_size,
                                         num_workers=min(num_workers, len(urls)), collate_fn=_collate)
    ids, splits, degradations, lq_out, gt_out, quarantine = [], [], [], [], [], []
    progress = RateLogger(log, "embed", None, "images")
    for items in loader:
        batch = [b for b in items if not is_quarantined(b)]
        for bad in (b for b in items if is_quarantined(b)):
            log.warning(f"embed: skipping sample {bad['id']!r}: {bad['reason']}")
            quarantine.append(bad)
        if not batch:
            continue
        images = [b["lq"] for b in batch] + [b["gt"] for b in batch]
        emb = clip_embed.embed_batch(encoder, images).float().cpu()
        lq_out.append(emb[:len(batch)])
        gt_out.append(emb[len(batch):])
        ids += [b["id"] for b in batch]
        splits += [b["split"] for b in batch]
        degradations += [b["degradation"] for b in batch]
        progress.update(2 * len(batch))
    if not ids:
        skipped = f" ({len(quarantine)} quarantined: none decodes)" if quarantine else ""
        raise ValueError(f"no samples in the shards {urls[:3]}...{skipped}: rerun the shard stage "
                         f"(srdiff run --stages shard)")
    return Embeddings(ids, splits, degradations, torch.cat(lq_out), torch.cat(gt_out), quarantine)


def quarantine_table(rows: list[dict]) -> pa.Table:
    """The skipped samples, sorted by id (an empty table when none were skipped)."""
    return pa.Table.from_pylist(sorted(rows, key=lambda r: r["id"]), schema=QUARANTINE_SCHEMA)


def embedding_table(emb: Embeddings, values: torch.Tensor, metadata: dict[str, str]) -> pa.Table:
    dim = values.shape[1]
    flat = pa.array(values.numpy().astype(np.float32).ravel())
    table = pa.table({"id": emb.ids, "split": emb.splits, "degradation": emb.degradations,
                      "embedding": pa.FixedSizeListArray.from_arrays(flat, dim)})
    return table.replace_schema_metadata({k: str(v) for k, v in metadata.items()})


def read_embeddings(url: str) -> dict[str, np.ndarray]:
    """An embedding table as {id: float32 vector}."""
    table = tables.read_table(url, hint="the embed stage writes it: run `srdiff run --stages embed`")
    values = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(table.num_rows, -1)
    return dict(zip(table.column("id").to_pylist(), values.astype(np.float32)))


def cosine_by_degradation(emb: Embeddings, pred: torch.Tensor, split: str) -> dict[str, float]:
    rows = [i for i, s in enumerate(emb.splits) if s == split]
    out = {}
    for deg in sorted({emb.degradations[i] for i in rows}):
        idx = torch.tensor([i for i in rows if emb.degradations[i] == deg])
        out[deg] = float(srm.cosine(pred[idx], emb.gt[idx]).mean())
    return out


def train_refinement(emb: Embeddings, cfg: Config, device: torch.device, log) -> srm.SRMTrainResult:
    train = torch.tensor([s == "train" for s in emb.splits])
    val = ~train
    val_kwargs = {"val_lq": emb.lq[val], "val_gt": emb.gt[val]} if val.any() else {}
    result = srm.train_srm(emb.lq[train], emb.gt[train], cfg.embed.srm, device=device,
                           log_fn=lambda epoch, m: log.debug(f"srm epoch {epoch}: {m}"), **val_kwargs)
    log.info(f"SRM: best epoch {result.best_epoch}, val cosine LQ-vs-GT {result.val_cos_before:.4f} -> "
             f"{result.val_cos_after:.4f}")
    return result


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


def save_srm(url: str, model: torch.nn.Module, cfg: Config, dim: int) -> None:
    buf = io.BytesIO()
    torch.save({"state_dict": model.state_dict(), "dim": dim, "srm": cfg.embed.srm.model_dump(mode="json"),
                "arch": cfg.embed.arch, "pretrained": cfg.embed.pretrained}, buf)
    fs.atomic_write_bytes(url, buf.getvalue())


@task(name="embed", persist_result=True)
def embed(cfg: Config, key: str, shards_url: str, run_id: str | None = None) -> StageResult:
    """CLIP-embed LQ and GT, train the SRM, write LQCLS / GTCLS / RestoreCLS tables."""
    log = stage_logger()
    start = time.perf_counter()
    device = pick_device(cfg)
    encoder = clip_embed.load_clip(cfg.embed.arch, cfg.embed.pretrained, device=device,
                                   precision=cfg.embed.precision)
    if encoder.random_weights:
        log.warning(f"embed: {cfg.embed.arch} with random CLIP weights (embed.pretrained: none): "
                    f"the semantics are meaningless, fine for the demo, not for results")
    urls = [u for split in SPLITS for u in shards.shard_urls(shards_url, split=split)]
    emb = embed_shards(encoder, urls, batch_size=cfg.embed.batch_size, num_workers=cfg.embed.num_workers, log=log)
    result = train_refinement(emb, cfg, device, log)
    restored = srm.refine(result.model, emb.lq.to(device)).float().cpu()

    out_url = stage_dir(cfg, "embeddings", key)
    meta = {"arch": encoder.arch, "weights": encoder.weights, "weights_digest": encoder.weights_digest,
            "preprocessing": f"resize ({encoder.resize_mode}, {encoder.interpolation}, antialias) to "
                             f"{encoder.image_size}, centre crop, normalise mean {encoder.mean} std {encoder.std}"}
    lq_table, restore_table = embedding_table(emb, emb.lq, meta), embedding_table(emb, restored, meta)
    for name, table in (("lqcls", lq_table), ("gtcls", embedding_table(emb, emb.gt, meta)),
                        ("restorecls", restore_table)):
        tables.write_table(f"{out_url}/{name}.parquet", table)
    tables.write_table(f"{out_url}/embed_quarantine.parquet", quarantine_table(emb.quarantine))
    save_srm(f"{out_url}/srm.pt", result.model, cfg, emb.lq.shape[1])
    if cfg.embed.export_pt:
        export_pt_layout(out_url, "LQCLS", emb.ids, emb.lq)
        export_pt_layout(out_url, "RestoreCLS", emb.ids, restored)

    before = cosine_by_degradation(emb, emb.lq, "val")
    after = cosine_by_degradation(emb, restored, "val")
    metrics = {f"srm/{deg}/val_cos_before": v for deg, v in before.items()}
    metrics |= {f"srm/{deg}/val_cos_after": v for deg, v in after.items()}
    metrics |= {"srm/val_cos_before": result.val_cos_before, "srm/val_cos_after": result.val_cos_after,
                "srm/best_epoch": float(result.best_epoch), "embed/images": float(2 * len(emb.ids)),
                "embed/quarantined": float(len(emb.quarantine))}
    if run_id:
        tracking.set_tags(cfg, run_id, {"clip.weights": encoder.weights, "clip.arch": encoder.arch,
                                        "clip.random_weights": str(encoder.random_weights).lower()})
    seconds = time.perf_counter() - start
    log.info(f"embed: {len(emb.ids)} pairs, {encoder.arch} ({encoder.weights}) in {seconds:.1f} s -> {out_url}")
    return StageResult(stage="embed", key=key, digest=tables.table_digest(restore_table),
                       outputs={"embeddings": out_url, "lqcls": f"{out_url}/lqcls.parquet",
                                "gtcls": f"{out_url}/gtcls.parquet", "restorecls": f"{out_url}/restorecls.parquet",
                                "srm": f"{out_url}/srm.pt",
                                "quarantine": f"{out_url}/embed_quarantine.parquet"},
                       metrics=metrics,
                       params={"clip.arch": encoder.arch, "clip.weights": encoder.weights,
                               "clip.weights_digest": encoder.weights_digest},
                       run_id=run_id, seconds=seconds)
