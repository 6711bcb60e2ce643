"""Train stage: the IR-SDE conditional UNet on the shards, conditioned on RestoreCLS."""

from __future__ import annotations

import io
from contextlib import nullcontext
import itertools
import tempfile
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from PIL import Image
from prefect import task

from srdiff_core import images, samplers, training
from srdiff_core.checkpoint import checkpoint_step, latest_checkpoint
from srdiff_core.config import Config
from srdiff_core.data import check_feed, make_loader
from srdiff_core.distributed import DistInfo, device_for, is_main, wrap_ddp
from srdiff_core.sde import IRSDE
from srdiff_core.unet import build_unet
from storage import fs, shards, tables
from tasks import artifacts, launch, shm, tracking
from tasks.advice import advised
from tasks.common import StageResult, pick_device, stage_dir, stage_logger
from tasks.embed_tables import EmbeddedPairDataset, quarantined_ids, read_embeddings

# Settings a checkpoint must share with the config to be resumed (anything else, e.g. the step
# budget or the logging interval, may change between a run and its resume).
ARCHITECTURE_KEYS = ("unet", "sde")


def model_file_state(ema: torch.nn.Module, cfg: Config, srm_url: str, *, clip_meta: dict | None = None) -> dict:
    """Everything `srdiff restore` needs: EMA weights, model + SDE config, CLIP + SRM.

    ``clip_meta``: the embedding tables' metadata (tasks.embed.table_metadata, as
    :func:`embedding_clip_meta` reads it). Its weights_digest is recorded so that restoring with
    other CLIP weights than the embeddings were made with is refused (srdiff_core.restorer); None
    (not known, e.g. imported embeddings) records None, and the check is skipped."""
    srm_state = torch.load(io.BytesIO(fs.read_bytes(srm_url)), weights_only=True)
    if clip_meta is not None and "weights_digest" not in clip_meta:  # a silent None would switch the check off
        raise ValueError(f"clip_meta has no weights_digest (keys {sorted(clip_meta)}); pass the embedding "
                         f"tables' metadata (tasks.embed.table_metadata), or None where it is not known")
    weights_digest = None if clip_meta is None else clip_meta["weights_digest"]
    return {"format": "srdiff-model-v1", "ema": ema.state_dict(),
            "unet": cfg.unet.model_dump(mode="json"), "sde": cfg.sde.model_dump(mode="json"),
            # The steps the network learned (train.timesteps; None: all): restore warns off the others.
            "train": {"timesteps": cfg.train.timesteps},
            "embed": {"arch": cfg.embed.arch, "pretrained": cfg.embed.pretrained, "weights_digest": weights_digest},
            "srm": srm_state}


def rank_shards(urls: list[str], rank: int, world_size: int) -> list[str]:
    """Rank ``rank``'s own shards: every ``world_size``-th, so ranks never read the same samples."""
    check_feed(len(urls), world_size, 0)
    return urls[rank::world_size]


def rank_workers(num_workers: int, own_shards: int, log=None) -> int:
    """DataLoader workers for a rank's ``own_shards`` shards: at most one per shard, since each
    worker resamples a share of its own (srdiff_core.data.PairDataset). Fewer workers, with a
    warning, rather than an error: the stages before training have run by now."""
    workers = min(num_workers, own_shards)
    if workers < num_workers and log is not None:
        log.warning(f"train.num_workers is {num_workers} but this rank has {own_shards} shard(s): using {workers} "
                    f"DataLoader worker(s), each with shards of its own (a lower shard.maxcount makes more shards)")
    return workers


def batch_source(cfg: Config, urls: list[str], context: dict[str, np.ndarray], *, rank: int = 0,
                 world_size: int = 1, skip_ids: frozenset[str] = frozenset(), log=None):
    """batch_source(start_step) -> infinite iterator of training batches {"lq", "gt", "context", "id"}.

    The shard sampler is seeded with (seed, start_step) so a resumed run continues with a
    well-defined stream rather than replaying the first batches again. Under DDP each rank
    resamples only its own shards (:func:`rank_shards`), so the ranks' data are disjoint.
    Samples in ``skip_ids`` (quarantined by the embed stage: no embedding) are left out."""
    own_urls = rank_shards(urls, rank, world_size)
    workers = rank_workers(cfg.train.num_workers, len(own_urls), log)
    shm.warn_if_shm_short(log, stage="train", workers=workers, processes=shm.local_processes(),
                          batch_bytes=lambda: shm.train_batch_bytes(cfg.train.batch_size, cfg.train.patch_size,
                                                                    cfg.unet.context_dim))

    def make(start_step: int):
        dataset = EmbeddedPairDataset(own_urls, skip_ids=skip_ids, patch_size=cfg.train.patch_size, augment=True,
                                      resampled=True, embeddings=context, seed=cfg.train.seed * 1_000_003 + start_step,
                                      rank=rank, world_size=world_size, shuffle_buffer=cfg.train.shuffle_buffer)
        loader = make_loader(dataset, batch_size=cfg.train.batch_size, num_workers=workers)
        for batch in loader:
            yield {"lq": batch["lq"], "gt": batch["gt"], "context": batch["context"], "id": batch["id"]}
    return make


def preview_fn(cfg: Config, sde: IRSDE, val_urls: list[str], context: dict[str, np.ndarray], run_id: str | None,
               device: torch.device, skip_ids: frozenset[str] = frozenset()):
    """sample_fn for training: restore a few val images with the EMA model, log a grid."""
    dataset = EmbeddedPairDataset(val_urls, skip_ids=skip_ids, embeddings=context)
    examples = list(itertools.islice(iter(dataset), 4))

    def sample(step: int, ema: torch.nn.Module) -> None:
        if not examples or run_id is None:
            return
        rows = []
        for ex in examples:
            gen = torch.Generator(device="cpu").manual_seed(cfg.evaluate.seed)
            out = samplers.restore(ema, ex["lq"][None].to(device), sde, ex["context"][None].to(device),
                                   steps=cfg.evaluate.steps, generator=gen, clip_x0=cfg.evaluate.clip_x0,
                                   eta=cfg.evaluate.eta)
            rows.append([images.to_uint8(ex["lq"]), images.to_uint8(out[0]), images.to_uint8(ex["gt"])])
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / f"step_{step:08d}.png"
            Image.fromarray(images.grid(rows)).save(target)
            tracking.log_artifact(cfg, run_id, target, "samples")
    return sample


def mlflow_log_fn(cfg: Config, run_id: str | None, log):
    progress = artifacts.Progress(cfg, "train", cfg.train.steps, "steps")  # rate, ETA, Prefect progress artifact

    def log_fn(step: int, metrics: dict) -> None:
        log.info(f"train step {step}/{cfg.train.steps}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
                 + progress.update(step))
        if run_id:
            tracking.log_metrics(cfg, run_id, {f"train/{k}": v for k, v in metrics.items()}, step=step)
    return log_fn


@advised()  # also run by torchrun's ranks (flows/train_ddp.py), whose errors reach the user as their text
def fit(cfg: Config, out_dir: Path, shards_url: str, restorecls_url: str, run_id: str | None, log,
        info: DistInfo = DistInfo()) -> training.TrainState:
    """The train stage's training on this rank: model (in DDP when ``info`` has several ranks),
    this rank's shards, checkpoints under ``out_dir``. Only rank 0 logs, samples and checkpoints."""
    check_embeddings_fit(cfg, restorecls_url)
    device = device_for(info, pick_device(cfg))
    with training.cuda_backends_for_training() if device.type == "cuda" else nullcontext():
        return _fit_on(device, cfg, out_dir, shards_url, restorecls_url, run_id, log, info)


def _fit_on(device: torch.device, cfg: Config, out_dir: Path, shards_url: str, restorecls_url: str,
            run_id: str | None, log, info: DistInfo) -> training.TrainState:
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    context = read_embeddings(restorecls_url)
    skip = quarantined_ids(restorecls_url, "train", log if is_main(info) else None)  # one warning, from rank 0
    train_urls = shards.shard_urls(shards_url, split="train")
    sde = IRSDE.from_config(cfg.sde)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    plain = build_unet(cfg.unet, sde).to(device, memory_format=memory_format)
    model = wrap_ddp(plain, info, device)
    main = is_main(info)
    resume_from = latest_checkpoint(out_dir / "checkpoints") if main else None
    if resume_from is not None:
        log.info(f"resuming from {resume_from}")
    if main:
        log.info(f"UNet ({cfg.unet.layout} layout) nf {cfg.unet.nf} ch_mult {cfg.unet.ch_mult}, "
                 f"conditioning {cfg.unet.conditioning}, {sum(p.numel() for p in plain.parameters()) / 1e6:.2f} M "
                 f"parameters, {cfg.train.steps} steps of batch {cfg.train.batch_size} x {cfg.train.patch_size} px "
                 f"on {device} x {info.world_size} rank(s)")
    return training.train(
        model, sde, batch_source(cfg, train_urls, context, rank=info.rank, world_size=info.world_size, skip_ids=skip,
                                   log=log if main else None),
        cfg.train, checkpoint_dir=out_dir / "checkpoints", config_dict=cfg.model_dump(mode="json"), device=device,
        log_fn=mlflow_log_fn(cfg, run_id, log) if main else None,
        sample_fn=preview_fn(cfg, sde, shards.shard_urls(shards_url, split="val"), context, run_id, device, skip)
        if main else None,
        compatible_keys=ARCHITECTURE_KEYS, is_main_process=main, rank=info.rank, world_size=info.world_size)


def embedding_clip_meta(restorecls_url: str) -> dict[str, str] | None:
    """The CLIP model the RestoreCLS table was made with (its metadata, tasks.embed.table_metadata),
    or None for a table that does not say (e.g. one made by `srdiff import-embeddings`)."""
    meta = tables.read_metadata(restorecls_url, hint="the embed stage (`srdiff run --stages embed`)")
    return meta if meta.get("weights_digest") else None


def check_embeddings_fit(cfg: Config, restorecls_url: str) -> None:
    """Refuse, before training, a RestoreCLS table made by another CLIP architecture than
    embed.arch (model.pt records embed.arch: restoring would embed new images differently)."""
    meta = embedding_clip_meta(restorecls_url)
    if meta is not None and meta.get("arch") not in (None, cfg.embed.arch):
        raise ValueError(f"{restorecls_url} was made with CLIP {meta['arch']!r} but embed.arch is "
                         f"{cfg.embed.arch!r}: set embed.arch: {meta['arch']}, or pass the RestoreCLS table "
                         f"of an embed run with {cfg.embed.arch}")


def write_model(ema: torch.nn.Module, cfg: Config, srm_url: str, out_dir: Path, run_id: str | None,
                restorecls_url: str) -> None:
    """Write ``out_dir/model.pt`` (atomically) and log it to MLflow. It records
    the digest of the CLIP weights the RestoreCLS table was made with, so restoring with other
    weights is refused (srdiff_core.restorer)."""
    model_path = out_dir / "model.pt"
    buf = io.BytesIO()
    torch.save(model_file_state(ema, cfg, srm_url, clip_meta=embedding_clip_meta(restorecls_url)), buf)
    fs.atomic_write_bytes(str(model_path), buf.getvalue())
    if run_id:
        tracking.log_artifact(cfg, run_id, model_path, "model")


@task(name="train", persist_result=True)
def train(cfg: Config, key: str, shards_url: str, restorecls_url: str, srm_url: str,
          run_id: str | None = None, ddp_entry: ModuleType | None = None) -> StageResult:
    """Train the conditional UNet with the matching loss; write full-state checkpoints and model.pt."""
    log = stage_logger()
    start = time.perf_counter()
    out_dir = Path(fs.local_path(stage_dir(cfg, "runs/train", key)))
    resumed = latest_checkpoint(out_dir / "checkpoints") if cfg.train.resume == "auto" else None
    first_step = (checkpoint_step(resumed) or 0) if resumed is not None else 0
    if cfg.train.nproc > 1:
        step = fit_in_processes(cfg, ddp_entry, key, out_dir, shards_url, restorecls_url, srm_url, run_id, log)
    else:
        state = fit(cfg, out_dir, shards_url, restorecls_url, run_id, log)
        write_model(state.ema, cfg, srm_url, out_dir, run_id, restorecls_url)
        step = state.step
    model_path = out_dir / "model.pt"
    seconds = time.perf_counter() - start
    # The steps this run took, not the total: a resumed run started at its checkpoint's step.
    ran = step - first_step
    since = f" (resumed at step {first_step}, {step} in all)" if first_step else ""
    log.info(f"train: {ran} steps in {seconds:.1f} s{since} on {cfg.train.nproc} process(es) -> {model_path}")
    return StageResult(stage="train", key=key, digest=fs.sha256_file(model_path),
                       outputs={"model": str(model_path), "checkpoints": str(out_dir / "checkpoints")},
                       metrics={"train/final_step": float(step), "train/seconds": seconds,
                                "train/steps_this_run": float(ran), "train/resumed_at_step": float(first_step)},
                       params={"unet.conditioning": cfg.unet.conditioning, "unet.layout": cfg.unet.layout,
                               "train.steps": cfg.train.steps,
                               "sde.max_sigma": cfg.sde.max_sigma, "train.nproc": cfg.train.nproc},
                       run_id=run_id, seconds=seconds)


def fit_in_processes(cfg: Config, entry: ModuleType | None, key: str, out_dir: Path, shards_url: str,
                     restorecls_url: str, srm_url: str, run_id: str | None, log) -> int:
    """The stage's training in ``train.nproc`` DDP processes on this machine (the torchrun entry
    point ``entry``, which the flow passes in: flows/train_ddp.py, running :func:`fit` on each
    rank; rank 0 writes the checkpoints and model.pt into ``out_dir`` and logs to ``run_id``);
    returns the final step."""
    module = launch.entry_module(entry, "train", cfg.train.nproc)
    args = ["--shards", shards_url, "--restorecls", restorecls_url, "--srm", srm_url, "--key", key]
    if run_id:
        args += ["--run-id", run_id]
    launch.run_torchrun(cfg, "train", cfg.train.nproc, module, args, log)
    latest = latest_checkpoint(out_dir / "checkpoints")
    step = checkpoint_step(latest) if latest is not None else None
    model_path = out_dir / "model.pt"
    if step is None or not model_path.is_file():
        raise RuntimeError(f"train: torchrun exited cleanly but {out_dir} has no checkpoint or no model.pt (see "
                           f"the train[torchrun] lines above); rerun with --set train.nproc=1 to train in one process")
    return step
