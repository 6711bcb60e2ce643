"""Embed stage: open_clip LQCLS/GTCLS, the Semantic Refinement Module, RestoreCLS."""

from __future__ import annotations

import io
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from prefect import task

from srdiff_core import clip_embed, srm
from srdiff_core.config import Config
from storage import fs, shards, tables
from tasks import tracking
from tasks.common import RateLogger, StageResult, pick_device, stage_dir, stage_logger

SPLITS = ("train", "val")


class DecodedShardImages(torch.utils.data.IterableDataset):
    """Decoded LQ and GT of every sample in the shards, split across DataLoader workers by shard."""

    def __init__(self, urls: list[str]):
        self.urls = urls

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        urls = self.urls if info is None else self.urls[info.id::info.num_workers]
        for sample in shards.iter_samples(urls):
            meta = sample["meta"]
            yield {"id": sample["id"], "degradation": meta["degradation"], "split": meta["split"],
                   "lq": torch.from_numpy(shards.decode_png(sample["lq_png"])).permute(2, 0, 1),
                   "gt": torch.from_numpy(shards.decode_png(sample["gt_png"])).permute(2, 0, 1)}


def _collate(items: list[dict]) -> list[dict]:
    return items


@dataclass
class Embeddings:
    ids: list[str]
    splits: list[str]
    degradations: list[str]
    lq: torch.Tensor  # [N, D] float32, L2-normalised
    gt: torch.Tensor


def embed_shards(encoder: clip_embed.ClipEncoder, urls: list[str], *, batch_size: int, num_workers: int,
                 log) -> Embeddings:
    """Embed LQ and GT of every sample; one model call per batch for both."""
    loader = torch.utils.data.DataLoader(DecodedShardImages(urls), batch_size=batch_size,
                                         num_workers=min(num_workers, len(urls)), collate_fn=_collate)
    ids, splits, degradations, lq_out, gt_out = [], [], [], [], []
    progress = RateLogger(log, "embed", None, "images")
    for batch in loader:
        images = [b["lq"] for b in batch] + [b["gt"] for b in batch]
        emb = clip_embed.embed_batch(encoder, images).float().cpu()
        lq_out.append(emb[:len(batch)])
        gt_out.append(emb[len(batch):])
        ids += [b["id"] for b in batch]
        splits += [b["split"] for b in batch]
        degradations += [b["degradation"] for b in batch]
        progress.update(2 * len(batch))
    if not ids:
        raise ValueError(f"no samples in the shards {urls[:3]}...: rerun the shard stage (srdiff run --stages shard)")
    return Embeddings(ids, splits, degradations, torch.cat(lq_out), torch.cat(gt_out))


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
    save_srm(f"{out_url}/srm.pt", result.model, cfg, emb.lq.shape[1])
    if cfg.embed.export_pt:
        export_pt_layout(out_url, "LQCLS", emb.ids, emb.lq)
        export_pt_layout(out_url, "RestoreCLS", emb.ids, restored)

    before = cosine_by_degradation(emb, emb.lq, "val")
    after = cosine_by_degradation(emb, restored, "val")
    metrics = {f"srm/{deg}/val_cos_before": v for deg, v in before.items()}
    metrics |= {f"srm/{deg}/val_cos_after": v for deg, v in after.items()}
    metrics |= {"srm/val_cos_before": result.val_cos_before, "srm/val_cos_after": result.val_cos_after,
                "srm/best_epoch": float(result.best_epoch), "embed/images": float(2 * len(emb.ids))}
    if run_id:
        tracking.set_tags(cfg, run_id, {"clip.weights": encoder.weights, "clip.arch": encoder.arch,
                                        "clip.random_weights": str(encoder.random_weights).lower()})
    seconds = time.perf_counter() - start
    log.info(f"embed: {len(emb.ids)} pairs, {encoder.arch} ({encoder.weights}) in {seconds:.1f} s -> {out_url}")
    return StageResult(stage="embed", key=key, digest=tables.table_digest(restore_table),
                       outputs={"embeddings": out_url, "lqcls": f"{out_url}/lqcls.parquet",
                                "gtcls": f"{out_url}/gtcls.parquet", "restorecls": f"{out_url}/restorecls.parquet",
                                "srm": f"{out_url}/srm.pt"},
                       metrics=metrics,
                       params={"clip.arch": encoder.arch, "clip.weights": encoder.weights,
                               "clip.weights_digest": encoder.weights_digest},
                       run_id=run_id, seconds=seconds)
