"""Embed stage: open_clip LQCLS/GTCLS of every sample (one process or several, with the
embedding cache), then the Semantic Refinement Module (tasks/refine.py) and RestoreCLS."""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import ModuleType

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from prefect import task

from srdiff_core import clip_embed, srm
from srdiff_core.config import Config
from srdiff_core.data import decode_png, split_shards
from srdiff_core.distributed import DistInfo, barrier, device_for, is_main
from storage import fs, shards, tables
from storage.embed_cache import EmbeddingCache
from tasks import common, shm, tracking
from tasks.advice import advised
from tasks.artifacts import Progress
from tasks.common import RateLogger, StageResult, pick_device, stage_dir, stage_logger
from tasks import launch
from tasks.embed_tables import QUARANTINE_NAME, column_vectors, quarantine_table, vector_column
from tasks.pt_layout import export_pt_layout
from tasks.refine import cosine_by_degradation, save_srm, split_cosines, train_refinement, write_selection

SPLITS = ("train", "val")
COUNTS_NAME = "extraction.json"  # the counts of the extraction (cache hits, computed, ...)
PARTS_DIR = "parts"  # per-rank parts while several processes extract


# What a sample's bytes can raise when they are not a readable image: PIL's "cannot identify",
# "image file is truncated" and "broken data stream" are OSErrors; a bad chunk can give
# SyntaxError/ValueError; a huge header gives DecompressionBombError.
UNDECODABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _decode_error(which: str, error: Exception) -> str:
    # PIL puts the BytesIO's repr (a memory address) in its message: drop it so the reason is stable.
    message = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(error))
    return f"{which} PNG does not decode ({type(error).__name__}: {message})"


def decode_sample(sample: dict, known: frozenset[str] | None = None) -> dict:
    """A shard sample -> {"id", "degradation", "split", "lq", "gt"} (uint8 [3,H,W] tensors), or,
    when LQ or GT does not decode, a quarantine row {"id", "split", "degradation", "reason"}.

    With ``known`` (the sha256s the embedding cache holds), the row also carries "lq_sha256" and
    "gt_sha256", and an image whose sha256 is known is not decoded at all ("lq"/"gt" is None)."""
    meta = sample["meta"]
    row = {"id": sample["id"], "degradation": meta["degradation"], "split": meta["split"]}
    for which in ("lq", "gt"):
        data = sample[f"{which}_png"]
        if known is not None:
            row[f"{which}_sha256"] = hashlib.sha256(data).hexdigest()
            if row[f"{which}_sha256"] in known:
                row[which] = None
                continue
        try:
            row[which] = torch.from_numpy(decode_png(data)).permute(2, 0, 1)
        except UNDECODABLE as e:
            return {"id": row["id"], "split": row["split"], "degradation": row["degradation"],
                    "reason": _decode_error(which.upper(), e)}
    return row


def is_quarantined(item: dict) -> bool:
    return "reason" in item


def _chunks(items: Iterator[dict], size: int) -> Iterator[list[dict]]:
    chunk: list[dict] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class DecodedShardImages(torch.utils.data.IterableDataset):
    """Decoded LQ and GT of every sample in this rank's shards, split across DataLoader workers by
    shard (srdiff_core.data.split_shards). A sample that does not decode comes out as a quarantine
    row (see ``decode_sample``); ``known`` skips decoding cached images.

    ``chunk``: yield lists of up to ``chunk`` consecutive samples of one shard instead of single
    samples. A model batch is then a function of its shard alone, not of how the shards were
    split across ranks and workers, so every split computes bit-identical embeddings."""

    def __init__(self, urls: list[str], *, known: frozenset[str] | None = None, rank: int = 0,
                 world_size: int = 1, chunk: int | None = None):
        self.urls, self.known, self.rank, self.world_size, self.chunk = urls, known, rank, world_size, chunk

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker_id, num_workers = (0, 0) if info is None else (info.id, info.num_workers)
        own = split_shards(self.urls, rank=self.rank, world_size=self.world_size, worker_id=worker_id,
                                  num_workers=num_workers)
        for url in own:
            samples = (decode_sample(s, self.known) for s in shards.iter_samples([url]))
            yield from (samples if self.chunk is None else _chunks(samples, self.chunk))


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
    computed: int = 0  # images that went through the model
    cache_hits: int = 0  # images whose embedding was already known (the cache, or a duplicate in its batch)
    fresh: dict[str, torch.Tensor] = field(default_factory=dict)  # sha256 -> vector computed here (cache on)

    def sorted_by_id(self) -> "Embeddings":
        order = sorted(range(len(self.ids)), key=self.ids.__getitem__)
        index = torch.tensor(order, dtype=torch.long)
        return Embeddings([self.ids[i] for i in order], [self.splits[i] for i in order],
                          [self.degradations[i] for i in order], self.lq[index], self.gt[index],
                          sorted(self.quarantine, key=lambda r: r["id"]), self.computed, self.cache_hits, self.fresh)


class _KnownVectors:
    """Embeddings by image content: the cache's (as it was before this run), and the counts.

    An image already embedded earlier in this run is embedded again, never looked up: then every
    model batch is a function of its shard alone (its chunk of samples, less the images the cache
    held before the run), whatever the order in which shards, ranks and workers come, so any
    nproc / num_workers gives bit-identical vectors. (An image shared by several shards, a GT in
    dehazing sets, costs one model call per batch it is in, until the next run finds it cached.)
    Within one batch each distinct image goes through the model once."""

    def __init__(self, cache: Mapping[str, np.ndarray] | None):
        self.cache = cache or {}
        self.fresh: dict[str, torch.Tensor] = {}  # for the cache: the first vector computed for each image
        self.computed = self.hits = 0

    def get(self, sha: str | None) -> torch.Tensor | None:
        vector = None if sha is None else self.cache.get(sha)
        return None if vector is None else torch.from_numpy(vector)

    def embed(self, encoder: clip_embed.ClipEncoder, items: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """LQ and GT embeddings [n, D] of decoded samples: images in the cache looked up, the others
        (LQs, then GTs, each distinct image of the batch once) embedded in one model call."""
        found, images, position, waiting = self._sort_out(items)
        if images:
            emb = clip_embed.embed_batch(encoder, images).float().cpu()
            for sha, j in position.items():
                self.fresh.setdefault(sha, emb[j])
            found.update((slot, emb[j]) for slot, j in waiting)
        self.computed += len(images)
        self.hits += 2 * len(items) - len(images)
        n = len(items)
        return (torch.stack([found[(i, "lq")] for i in range(n)]), torch.stack([found[(i, "gt")] for i in range(n)]))

    def _sort_out(self, items: list[dict]) -> tuple[dict, list[torch.Tensor], dict[str, int], list]:
        """(cached vectors by (item, "lq"/"gt") slot, the images to embed, sha256 -> index among them,
        (slot, index) of every slot waiting for one of them)."""
        found: dict[tuple[int, str], torch.Tensor] = {}
        images: list[torch.Tensor] = []
        position: dict[str, int] = {}
        waiting: list[tuple[tuple[int, str], int]] = []
        for slot in ((i, which) for which in ("lq", "gt") for i in range(len(items))):
            item = items[slot[0]]
            sha = item.get(f"{slot[1]}_sha256")
            vector = self.get(sha)
            if vector is not None:
                found[slot] = vector
            elif sha is not None and sha in position:  # the same image twice in this batch
                waiting.append((slot, position[sha]))
            else:
                if sha is not None:
                    position[sha] = len(images)
                waiting.append((slot, len(images)))
                images.append(item[slot[1]])
        return found, images, position, waiting


def loader_workers(num_workers: int, num_shards: int, world_size: int) -> int:
    """DataLoader workers of one rank: at most one per shard of its share."""
    return min(num_workers, num_shards // world_size)


def embed_rank(encoder: clip_embed.ClipEncoder, urls: list[str], *, batch_size: int, num_workers: int, log,
               cache: Mapping[str, np.ndarray] | None = None, rank: int = 0, world_size: int = 1,
               eta: Progress | None = None) -> Embeddings:
    """Embed LQ and GT of every sample in rank ``rank``'s share of ``urls``, sorted by id (may be
    empty). With ``cache`` ({sha256: vector}, the embedding cache's content) only images it lacks
    are decoded and embedded; ``Embeddings.fresh`` holds those, for the cache. Samples whose LQ
    or GT does not decode are skipped, logged, and listed in ``Embeddings.quarantine``. ``eta``
    counts images (LQ and GT of every sample of the share) for the ETA and the Prefect progress."""
    dataset = DecodedShardImages(urls, known=None if cache is None else frozenset(cache), rank=rank,
                                 world_size=world_size, chunk=batch_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, collate_fn=_collate,
                                         num_workers=loader_workers(num_workers, len(urls), world_size))
    known = _KnownVectors(cache)
    ids, splits, degradations, lq_out, gt_out, quarantine = [], [], [], [], [], []
    progress = RateLogger(log, "embed", eta.total if eta else None, "images")
    for items in loader:
        batch = [b for b in items if not is_quarantined(b)]
        for bad in (b for b in items if is_quarantined(b)):
            log.warning(f"embed: skipping sample {bad['id']!r}: {bad['reason']}")
            quarantine.append(bad)
        if not batch:
            continue
        lq, gt = known.embed(encoder, batch)
        lq_out.append(lq)
        gt_out.append(gt)
        ids += [b["id"] for b in batch]
        splits += [b["split"] for b in batch]
        degradations += [b["degradation"] for b in batch]
        done = progress.done + 2 * len(items)
        progress.update(2 * len(items), extra=eta.update(done, rate=False) if eta else "")
    empty = torch.empty(0, encoder.embed_dim)
    return Embeddings(ids, splits, degradations, torch.cat(lq_out) if lq_out else empty,
                      torch.cat(gt_out) if gt_out else empty, quarantine, known.computed, known.hits,
                      known.fresh).sorted_by_id()


def require_samples(emb: Embeddings, where: str) -> None:
    if not emb.ids:
        skipped = f" ({len(emb.quarantine)} quarantined: none decodes)" if emb.quarantine else ""
        raise ValueError(f"no samples in the shards {where}{skipped}: rerun the shard stage "
                         f"(srdiff run --stages shard)")


def embed_shards(encoder: clip_embed.ClipEncoder, urls: list[str], *, batch_size: int, num_workers: int,
                 log, cache: Mapping[str, np.ndarray] | None = None) -> Embeddings:
    """Embed LQ and GT of every sample in ``urls`` in this process (see :func:`embed_rank`), sorted
    by id; an error when no sample decodes."""
    emb = embed_rank(encoder, urls, batch_size=batch_size, num_workers=num_workers, log=log, cache=cache)
    require_samples(emb, f"{urls[:3]}...")
    return emb


def embedding_table(emb: Embeddings, values: torch.Tensor, metadata: dict[str, str]) -> pa.Table:
    table = pa.table({"id": pa.array(emb.ids, pa.string()), "split": pa.array(emb.splits, pa.string()),
                      "degradation": pa.array(emb.degradations, pa.string()), "embedding": vector_column(values)})
    return table.replace_schema_metadata({k: str(v) for k, v in metadata.items()})


# ---------------------------------------------------------------- extraction: one process or several


def table_metadata(encoder: clip_embed.ClipEncoder) -> dict[str, str]:
    """What every embedding table records about the model that made it."""
    return {"arch": encoder.arch, "weights": encoder.weights, "weights_digest": encoder.weights_digest,
            "preprocessing": encoder.preprocessing, "compute": encoder.compute,
            "random_weights": str(encoder.random_weights).lower()}


def stage_shard_urls(shards_url: str) -> list[str]:
    """Every shard the stage embeds, train then val, in index order (the order ranks split)."""
    return [u for split in SPLITS for u in shards.shard_urls(shards_url, split=split)]


def share_images(shards_url: str, urls: list[str], info: DistInfo) -> int:
    """LQ and GT images in this rank's share of ``urls`` (two per sample), from the shard index."""
    counts = {fs.join(shards_url, row["shard"]): row["count"] for row in shards.read_index(shards_url).to_pylist()}
    own = split_shards(urls, rank=info.rank, world_size=info.world_size, worker_id=0, num_workers=1)
    return 2 * sum(counts.get(url, 0) for url in own)


def embedding_cache(cfg: Config, encoder: clip_embed.ClipEncoder) -> EmbeddingCache | None:
    """The content-keyed cache of this model's embeddings under the data root (None: embed.cache off)."""
    if not cfg.embed.cache:
        return None
    return EmbeddingCache(common.path(cfg, "cache", "embeddings"), clip_embed.cache_descriptor(encoder))


def _part_url(out_url: str, kind: str, rank: int, world_size: int) -> str:
    # The world size is in the name: parts an interrupted run with another nproc left are never merged.
    return fs.join(out_url, PARTS_DIR, f"{kind}-{rank:05d}-of-{world_size:05d}.parquet")


def write_part(out_url: str, info: DistInfo, emb: Embeddings) -> None:
    """This rank's embeddings and quarantine rows, for rank 0 to merge (counts in the metadata)."""
    table = pa.table({"id": pa.array(emb.ids, pa.string()), "split": pa.array(emb.splits, pa.string()),
                      "degradation": pa.array(emb.degradations, pa.string()),
                      "lq": vector_column(emb.lq), "gt": vector_column(emb.gt)})
    table = table.replace_schema_metadata({"computed": str(emb.computed), "cache_hits": str(emb.cache_hits)})
    tables.write_table(_part_url(out_url, "embeddings", info.rank, info.world_size), table)
    tables.write_table(_part_url(out_url, "quarantine", info.rank, info.world_size), quarantine_table(emb.quarantine))


def _read_part(out_url: str, kind: str, rank: int, world_size: int) -> pa.Table:
    url = _part_url(out_url, kind, rank, world_size)
    if not fs.exists(url):
        raise FileNotFoundError(f"{url} does not exist: rank {rank} of {world_size} wrote no part. Put --out on "
                                f"storage every node shares, or check the torchrun log for a failed rank")
    return tables.read_table(url)


def merge_parts(out_url: str, world_size: int) -> Embeddings:
    """Every rank's part as one Embeddings, sorted by id (each shard went to one rank, so each id
    is in one part; :func:`write_extracted` checks). Parts named for another world size (left by
    an interrupted run with another nproc) are not read."""
    parts = [_read_part(out_url, "embeddings", r, world_size) for r in range(world_size)]
    quarantine = [row for r in range(world_size) for row in _read_part(out_url, "quarantine", r, world_size).to_pylist()]
    table = pa.concat_tables(p.replace_schema_metadata(None) for p in parts)

    def count(key: str) -> int:
        return sum(int(p.schema.metadata[key.encode()]) for p in parts)

    return Embeddings(table.column("id").to_pylist(), table.column("split").to_pylist(),
                      table.column("degradation").to_pylist(), column_vectors(table, "lq"),
                      column_vectors(table, "gt"), quarantine, count("computed"), count("cache_hits")).sorted_by_id()


def extraction_counts(emb: Embeddings, processes: int) -> dict[str, float]:
    return {"embed/images": float(2 * len(emb.ids)), "embed/computed": float(emb.computed),
            "embed/cache_hits": float(emb.cache_hits), "embed/quarantined": float(len(emb.quarantine)),
            "embed/processes": float(processes)}


def check_unique_ids(emb: Embeddings, where: str) -> None:
    """Each sample id once: the tables are keyed by id (one process or several)."""
    twice = sorted(i for i, n in Counter([*emb.ids, *(r["id"] for r in emb.quarantine)]).items() if n > 1)
    if twice:
        raise ValueError(f"{len(twice)} sample id(s) appear more than once in the shards {where}, e.g. {twice[:3]}: "
                         f"the shard index lists a sample twice; rerun the shard stage "
                         f"(srdiff run --stages shard --refresh shard)")


def write_extracted(out_url: str, emb: Embeddings, meta: dict[str, str], counts: dict[str, float]) -> None:
    """lqcls / gtcls / embed_quarantine.parquet (sorted by id) and the counts (extraction.json);
    an error, before writing anything, when an id appears twice."""
    check_unique_ids(emb, f"embedded into {out_url}")
    tables.write_table(f"{out_url}/lqcls.parquet", embedding_table(emb, emb.lq, meta))
    tables.write_table(f"{out_url}/gtcls.parquet", embedding_table(emb, emb.gt, meta))
    tables.write_table(f"{out_url}/{QUARANTINE_NAME}", quarantine_table(emb.quarantine))
    fs.atomic_write_bytes(f"{out_url}/{COUNTS_NAME}", json.dumps(counts, indent=1, sort_keys=True).encode())


def read_extracted(out_url: str) -> tuple[Embeddings, dict[str, str], dict[str, float]]:
    """What :func:`write_extracted` wrote: the embeddings, the model metadata and the counts."""
    hint = "the embed stage's extraction (tasks.embed.extract)"
    lq = tables.read_table(f"{out_url}/lqcls.parquet", hint=hint)
    gt = tables.read_table(f"{out_url}/gtcls.parquet", hint=hint)
    ids = lq.column("id").to_pylist()
    if gt.column("id").to_pylist() != ids:
        raise ValueError(f"{out_url}/lqcls.parquet and gtcls.parquet list different ids: rerun the embed stage "
                         f"(srdiff run --stages embed --refresh embed)")
    quarantine = tables.read_table(f"{out_url}/{QUARANTINE_NAME}", hint=hint).to_pylist()
    try:
        counts = json.loads(fs.read_bytes(f"{out_url}/{COUNTS_NAME}"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{out_url}/{COUNTS_NAME} is missing: the extraction did not finish; rerun the "
                                f"embed stage (srdiff run --stages embed --refresh embed)") from None
    emb = Embeddings(ids, lq.column("split").to_pylist(), lq.column("degradation").to_pylist(),
                     column_vectors(lq, "embedding"), column_vectors(gt, "embedding"), quarantine,
                     int(counts["embed/computed"]), int(counts["embed/cache_hits"]))
    meta = {k.decode(): v.decode() for k, v in (lq.schema.metadata or {}).items()}
    return emb, meta, counts


def _embed_share(cfg: Config, encoder: clip_embed.ClipEncoder, cache: EmbeddingCache | None, shards_url: str,
                 info: DistInfo, log) -> Embeddings:
    """This rank's share of the shards embedded, the embedding cache looked up first (what it held
    before the run: see :func:`extract` for when it is given what was computed)."""
    urls = stage_shard_urls(shards_url)
    if len(urls) < info.world_size:
        raise ValueError(f"{len(urls)} shards cannot feed {info.world_size} embedding processes (each takes whole "
                         f"shards): lower embed.nproc or shard.maxcount")
    if info.local_rank == 0:  # the processes on a machine share its /dev/shm: one warning for them all
        shm.warn_if_shm_short(
            log, stage="embed", workers=loader_workers(cfg.embed.num_workers, len(urls), info.world_size),
            processes=shm.local_processes(),
            batch_bytes=lambda: shm.embed_batch_bytes(shm.largest_first_pixels(urls), cfg.embed.batch_size))
    emb = embed_rank(encoder, urls, batch_size=cfg.embed.batch_size, num_workers=cfg.embed.num_workers, log=log,
                     cache=cache.load() if cache is not None else None, rank=info.rank, world_size=info.world_size,
                     eta=Progress(cfg, "embed", share_images(shards_url, urls, info), "images"))
    rank = f" (rank {info.rank} of {info.world_size})" if info.distributed else ""
    log.info(f"embed{rank}: {len(emb.ids)} pairs, {emb.computed} images computed, {emb.cache_hits} already known"
             + (f" (embedding cache {cache.url})" if cache is not None else " (embed.cache off)"))
    return emb


@advised()  # also run by torchrun's ranks (flows/embed_ddp.py), whose errors reach the user as their text
def extract(cfg: Config, shards_url: str, out_url: str, info: DistInfo, log) -> dict[str, float]:
    """Embed rank ``info.rank``'s share of the shards (looking up the embedding cache first, adding
    what it computed), and on rank 0 write lqcls / gtcls / embed_quarantine.parquet sorted by id and
    extraction.json under ``out_url``; returns the counts (another rank: its own).

    Several ranks (torchrun, flows/embed_ddp.py) each write a part under ``out_url/parts``; after a
    barrier rank 0 merges them. The batches are per shard (DecodedShardImages ``chunk``) and see
    only the cache as it was before the run: every rank loads it before the barrier and appends
    to it only after, so the tables are identical to a single process's."""
    device = device_for(info, pick_device(cfg))
    encoder = clip_embed.load_clip(cfg.embed.arch, cfg.embed.pretrained, device=device,
                                   precision=cfg.embed.precision)
    if encoder.random_weights and is_main(info):
        log.warning(f"embed: {cfg.embed.arch} with random CLIP weights (embed.pretrained: none): "
                    f"the semantics are meaningless, fine for the demo, not for results")
    cache = embedding_cache(cfg, encoder)
    emb = _embed_share(cfg, encoder, cache, shards_url, info, log)
    if info.distributed:
        write_part(out_url, info, emb)
        barrier(info)  # every part is written, and every rank has read the cache
    if cache is not None:
        cache.append({sha: vector.numpy() for sha, vector in emb.fresh.items()})
    if info.distributed and is_main(info):
        emb = merge_parts(out_url, info.world_size)
    counts = extraction_counts(emb, info.world_size)
    if is_main(info):
        require_samples(emb, shards_url)
        write_extracted(out_url, emb, table_metadata(encoder), counts)
        if info.distributed:
            fs.remove(fs.join(out_url, PARTS_DIR), recursive=True)
        if cache is not None:
            cache.compact()
    barrier(info)  # no rank leaves (and tears down the group) before the tables are written
    return counts


def run_ranks(cfg: Config, entry: ModuleType | None, shards_url: str, out_url: str, log) -> None:
    """:func:`extract` in ``embed.nproc`` processes on this machine (the torchrun entry point
    ``entry``, which the flow passes in: flows/embed_ddp.py), their output streamed into ``log``."""
    module = launch.entry_module(entry, "embed", cfg.embed.nproc)
    launch.run_torchrun(cfg, "embed", cfg.embed.nproc, module, ["--shards", shards_url, "--out", out_url], log)


@task(name="embed", persist_result=True)
def embed(cfg: Config, key: str, shards_url: str, run_id: str | None = None,
          ddp_entry: ModuleType | None = None) -> StageResult:
    """CLIP-embed LQ and GT, train the SRM, write LQCLS / GTCLS / RestoreCLS tables."""
    log = stage_logger()
    start = time.perf_counter()
    out_url = stage_dir(cfg, "embeddings", key)
    if cfg.embed.nproc > 1:
        run_ranks(cfg, ddp_entry, shards_url, out_url, log)
    else:
        extract(cfg, shards_url, out_url, DistInfo(), log)
    emb, meta, counts = read_extracted(out_url)
    log.info(f"embed: {int(counts['embed/computed'])} images computed, {int(counts['embed/cache_hits'])} "
             f"from the embedding cache, {len(emb.quarantine)} sample(s) quarantined")

    device = pick_device(cfg)
    result, selection = train_refinement(emb, cfg, device, log)
    restored = srm.refine(result.model, emb.lq.to(device)).float().cpu()
    restore_table = embedding_table(emb, restored, meta)
    tables.write_table(f"{out_url}/restorecls.parquet", restore_table)
    save_srm(f"{out_url}/srm.pt", result.model, cfg, emb.lq.shape[1])
    selection_url = write_selection(cfg, out_url, selection, run_id)
    if cfg.embed.export_pt:
        export_pt_layout(out_url, "LQCLS", emb.ids, emb.lq)
        export_pt_layout(out_url, "RestoreCLS", emb.ids, restored)

    # The val split is only scored, after the SRM is fixed (srm/<deg>/val_cos_*, srm/val_cos_*);
    # srm/holdout_cos_* are the held-out train rows that chose its epoch.
    before = cosine_by_degradation(emb, emb.lq, "val")
    after = cosine_by_degradation(emb, restored, "val")
    metrics = {f"srm/{deg}/val_cos_before": v for deg, v in before.items()}
    metrics |= {f"srm/{deg}/val_cos_after": v for deg, v in after.items()}
    metrics |= split_cosines(emb, restored, "val")
    if selection.holdout_ids:
        metrics |= {"srm/holdout_cos_before": result.val_cos_before, "srm/holdout_cos_after": result.val_cos_after}
    metrics |= {"srm/selection_rows": float(len(selection.holdout_ids)), "srm/best_epoch": float(result.best_epoch),
                **counts}
    if run_id:
        # clip.pretrained / clip.random_weights are on every run already (tracking.clip_weights_tags).
        tracking.set_tags(cfg, run_id, {"clip.weights": meta["weights"], "clip.arch": meta["arch"]})
    seconds = time.perf_counter() - start
    log.info(f"embed: {len(emb.ids)} pairs, {meta['arch']} ({meta['weights']}) in {seconds:.1f} s -> {out_url}")
    return StageResult(stage="embed", key=key, digest=tables.table_digest(restore_table),
                       outputs={"embeddings": out_url, "lqcls": f"{out_url}/lqcls.parquet",
                                "gtcls": f"{out_url}/gtcls.parquet", "restorecls": f"{out_url}/restorecls.parquet",
                                "srm": f"{out_url}/srm.pt", "srm_selection": selection_url,
                                "quarantine": f"{out_url}/{QUARANTINE_NAME}"},
                       metrics=metrics,
                       params={"clip.arch": meta["arch"], "clip.weights": meta["weights"],
                               "clip.weights_digest": meta["weights_digest"], **selection.params()},
                       run_id=run_id, seconds=seconds)
