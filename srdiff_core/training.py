"""The IR-SDE training loop: AdamW + warmup/cosine schedule, bf16 autocast, EMA, resumable.

One function per job, nanoGPT style: :func:`train_step` does one optimisation step,
:func:`train` runs steps, logs, samples and checkpoints, and resumes bit-exactly from the
latest full-state checkpoint (model, EMA, optimizer, scheduler, step, every RNG, config).

Distributed training: wrap the model in ``DistributedDataParallel`` before calling
:func:`train` (after moving it to its device and memory format), give each rank its own
``batch_source`` split, and pass ``is_main_process=(rank == 0)`` so only one rank writes
checkpoints, logs and samples, and ``rank``/``world_size`` so each rank draws its own noise
(see :mod:`srdiff_core.distributed` for what a DDP resume guarantees). State dicts are always
taken from :func:`unwrap` (model), so checkpoints load into a plain module.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from srdiff_core.checkpoint import (
    LATEST_POINTER,
    CheckpointMismatch,
    capture_rng_state,
    check_compatible,
    state_dict_mismatch,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from srdiff_core.config import TrainConfig
from srdiff_core.distributed import rank_seed, require_same_step
from srdiff_core.ema import ema_decay_at, ema_update, make_ema
from srdiff_core.sde import TRAINING_LOSSES

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor | None]


# -------------------------------------------------------------------------- schedule

def _training_backend_flags() -> list[tuple[object, str, bool]]:
    """(owner, attribute, value) of each CUDA backend setting training runs with."""
    return [(torch.backends.cudnn, "benchmark", True), (torch.backends.cudnn, "allow_tf32", True),
            (torch.backends.cuda.matmul, "allow_tf32", True)]


@contextmanager
def cuda_backends_for_training() -> Iterator[None]:
    """Training patches have one fixed shape, so cuDNN's autotuner (benchmark) pays for itself
    after the first step; TF32 tensor cores for fp32 convolutions and matmuls. These are the
    settings bench/gpu.py measures with. They are restored on exit: stages that run later in the
    same process (evaluate; embed in a served deployment, whose cache key records the fp32 math)
    must not depend on whether training ran before them."""
    flags = _training_backend_flags()
    saved = [getattr(owner, attr) for owner, attr, _ in flags]
    for owner, attr, value in flags:
        setattr(owner, attr, value)
    try:
        yield
    finally:
        for (owner, attr, _), value in zip(flags, saved):
            setattr(owner, attr, value)


def cosine_lr(step: int, *, base_lr: float, total_steps: int, warmup_steps: int = 0,
              min_lr_ratio: float = 0.0) -> float:
    """Learning rate at ``step`` (0-based): linear warmup, then half-cosine to ``min_lr_ratio * base_lr``.

    Warmup is ``base_lr * (step + 1) / (warmup_steps + 1)`` so the first step already moves
    (nanoGPT's schedule); the cosine runs from ``warmup_steps`` to ``total_steps`` (SGDR,
    Loshchilov & Hutter 2017, without restarts) and stays at its floor afterwards.
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / (warmup_steps + 1)
    min_lr = base_lr * min_lr_ratio
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (base_lr - min_lr)


def _parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    # Decay only matrices and conv kernels; biases and norm gains have no scale to regularise
    # (Loshchilov & Hutter 2019; the nanoGPT/minGPT split by dimensionality).
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``model``'s trainable parameters and a LambdaLR running :func:`cosine_lr`."""
    model = unwrap(model)
    on_cuda = all(p.is_cuda for p in model.parameters())
    optimizer = torch.optim.AdamW(_parameter_groups(model, cfg.weight_decay), lr=cfg.lr,
                                  betas=tuple(cfg.betas), eps=cfg.adam_eps, fused=True if on_cuda else None)
    total, warmup, floor = cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio
    # LambdaLR multiplies each group's initial lr by this factor; a lambda (not an object) keeps
    # the scheduler's state_dict free of callables, so checkpoints load with weights_only=True.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_lr(step, base_lr=1.0, total_steps=total, warmup_steps=warmup,
                                          min_lr_ratio=floor))
    return optimizer, scheduler


# ----------------------------------------------------------------------------- state

def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP / DataParallel / torch.compile wrappers (for state dicts, EMA)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


@dataclass
class TrainState:
    """Everything a step mutates. ``model`` is the module to run (maybe DDP/compiled)."""

    model: nn.Module
    ema: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    step: int = 0
    # Draws the per-step timesteps and noise; checkpointed so a resumed run draws what the
    # uninterrupted run would have drawn.
    generator: torch.Generator | None = None


def _plain_config(config: dict) -> dict:
    try:
        return json.loads(json.dumps(config))
    except TypeError as e:
        raise TypeError(f"config_dict must hold only JSON values ({e}): pass config.model_dump(mode='json')") from None


def train_state_dict(state: TrainState, config: dict) -> dict:
    """A checkpoint payload: model, EMA, optimizer, scheduler, step, RNG states, config (as plain data)."""
    generator_state = state.generator.get_state() if state.generator is not None else None
    return {
        "model": unwrap(state.model).state_dict(),
        "ema": state.ema.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "step": state.step,
        "rng": {"global": capture_rng_state(), "generator": generator_state},
        "config": _plain_config(config),
    }


def _load_module(module: nn.Module, weights: dict, what: str) -> None:
    try:
        module.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointMismatch(
            f"the checkpoint's {what} weights do not fit the current network ({state_dict_mismatch(e)}).\nThe network "
            f"architecture changed: set train.resume: never, or use a new data_root/run name, "
            f"or restore the old unet settings.") from None


def _restore_generator(generator: torch.Generator, saved: torch.Tensor | None, step: int) -> None:
    if saved is None:
        return
    try:
        generator.set_state(saved)
    except RuntimeError:
        # CPU (Mersenne Twister) and CUDA (Philox) generator states are different objects; a run
        # moved between device types continues, but its noise no longer matches the original.
        log.warning("the checkpoint's noise generator state is from another device type; "
                    "reseeding it with the step number (resume is not bit-exact)")
        generator.manual_seed(step)


def load_train_state(state: TrainState, ckpt: dict) -> None:
    """Restore ``state`` (in place) and the global RNGs from a :func:`train_state_dict` payload."""
    _load_module(unwrap(state.model), ckpt["model"], "model")
    _load_module(state.ema, ckpt["ema"], "EMA")
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.scheduler.load_state_dict(ckpt["scheduler"])
    state.step = int(ckpt["step"])
    restore_rng_state(ckpt["rng"]["global"])
    if state.generator is not None:
        _restore_generator(state.generator, ckpt["rng"]["generator"], state.step)


# ------------------------------------------------------------------------------ step

def _to_device(batch: Batch, device: torch.device, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    lq = batch["lq"].to(device, non_blocking=True, memory_format=memory_format)
    gt = batch["gt"].to(device, non_blocking=True, memory_format=memory_format)
    context = batch.get("context")
    if context is not None:
        context = context.to(device, non_blocking=True)
    return lq, gt, context


def _refuse_non_finite(what: str, value: float, step: int) -> None:
    if not math.isfinite(value):
        raise FloatingPointError(
            f"training {what} is {value} at step {step}: lower train.lr, raise train.warmup_steps or "
            f"set train.precision: fp32; a rerun resumes from the last checkpoint")


def train_step(state: TrainState, sde, batch: Batch, cfg: TrainConfig, *, device: str | torch.device,
               generator: torch.Generator | None = None) -> dict[str, float]:
    """One AdamW step on ``cfg.loss`` (the IR-SDE matching loss by default), then the scheduler and EMA updates.

    ``generator`` (default ``state.generator``) draws the timesteps and noise. The model is
    expected on ``device`` already, in channels_last layout when ``cfg.channels_last``.
    """
    device = torch.device(device)
    generator = generator if generator is not None else state.generator
    model = state.model
    model.train()
    lq, gt, context = _to_device(batch, device, cfg.channels_last)
    # bf16 keeps fp32's exponent range, so unlike fp16 it needs no loss scaling.
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
        loss = TRAINING_LOSSES[cfg.loss](sde, model, gt, lq, context, generator=generator, timesteps=cfg.timesteps)
    loss_value = loss.item()
    _refuse_non_finite("loss", loss_value, state.step)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    # max_norm=inf measures the norm (for logging) without clipping.
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(unwrap(model).parameters(), max_norm).item()
    # A non-finite gradient would poison the weights, the EMA and Adam's moments in one step.
    _refuse_non_finite("gradient norm", grad_norm, state.step)
    lr = state.optimizer.param_groups[0]["lr"]
    state.optimizer.step()
    state.scheduler.step()
    # The EMA follows after optimiser steps ema_every, 2 ema_every, ... (1-based), a function of the
    # step alone, so a resumed run updates it on the same steps as an uninterrupted one.
    if (state.step + 1) % cfg.ema_every == 0:
        ema_update(state.ema, unwrap(model), ema_decay_at(cfg.ema_decay, state.step))
    state.step += 1
    return {"loss": loss_value, "grad_norm": grad_norm, "lr": lr}


# ------------------------------------------------------------------------------ loop

def _archive_previous_run(directory: Path) -> None:
    """Move an older run's checkpoints aside so a fresh run never resumes or prunes into them."""
    old = list_checkpoints(directory)
    pointer = directory / LATEST_POINTER
    if not old and not pointer.exists():
        return
    archive = directory / f"previous-{datetime.now(timezone.utc):%Y%m%dT%H%M%S%fZ}"
    archive.mkdir()
    for path in [*old, pointer] if pointer.exists() else old:
        path.rename(archive / path.name)
    log.warning("train.resume is 'never': moved %d earlier checkpoints to %s", len(old), archive)


def _resume(state: TrainState, directory: Path, config_dict: dict, compatible_keys: Iterable[str]) -> None:
    path = latest_checkpoint(directory)
    if path is None:
        return
    ckpt = load_checkpoint(path)
    check_compatible(ckpt.get("config", {}), _plain_config(config_dict), compatible_keys)
    load_train_state(state, ckpt)
    log.info("resumed from %s at step %d", path, state.step)


def _next_batch(batches: Iterator[Batch], step: int) -> Batch:
    try:
        return next(batches)
    except StopIteration:
        raise RuntimeError(f"batch_source ran out of batches at step {step}: from any start step it must "
                           f"yield batches at least up to the next checkpoint step (e.g. resampled WebDataset "
                           f"shards or an endless loop)") from None


def segmented_batches(batch_source: Callable[[int], Iterator[Batch]], start_step: int,
                      every: int) -> Iterator[Batch]:
    """The batches of steps ``start_step``, ``start_step`` + 1, ...: ``batch_source(s)`` restarted at
    every step ``s`` that is a multiple of ``every`` (the checkpoint interval).

    A resume starts at a checkpoint step with ``batch_source(step)``. Restarting the uninterrupted
    run's stream at the same steps makes it draw the very batches a resumed run draws, so N steps
    straight equal N/2 + resume + N/2 on real data too (whose sampler is seeded by its start step),
    not only on a stream that is a function of the step. A restart costs a new DataLoader (worker
    start-up, shuffle buffer refill) once per checkpoint interval. A run extended past a final
    checkpoint that is not a multiple of ``every`` (train.steps raised) restarts off that grid:
    it is still deterministic, but no longer equal to a run that had the larger budget from the start.
    """
    step = start_step
    while True:
        source = batch_source(step)
        stop = (step // every + 1) * every
        try:
            while step < stop:
                yield _next_batch(source, step)
                step += 1
        finally:
            close = getattr(source, "close", None)  # a generator: stop its DataLoader's workers now
            if close is not None:
                close()


def train(model: nn.Module, sde, batch_source: Callable[[int], Iterator[Batch]], cfg: TrainConfig, *,
          checkpoint_dir: str | Path, config_dict: dict, device: str | torch.device = "cpu",
          log_fn: Callable[[int, dict], None] | None = None,
          sample_fn: Callable[[int, nn.Module], None] | None = None,
          compatible_keys: Iterable[str] = (), is_main_process: bool = True,
          rank: int = 0, world_size: int = 1) -> TrainState:
    """Train ``model`` to ``cfg.steps``, resuming from ``checkpoint_dir`` when ``cfg.resume == "auto"``.

    ``batch_source(start_step)`` yields the batches ``{"lq", "gt", "context"}`` from step
    ``start_step`` on; it is called again at every checkpoint step (:func:`segmented_batches`), so
    a resumed run sees the data stream the uninterrupted run saw.
    ``log_fn(step, {"loss", "lr", "grad_norm", "images_per_s"})`` runs every ``cfg.log_every``
    steps, ``sample_fn(step, ema)`` every ``cfg.sample_every``; checkpoints every
    ``cfg.checkpoint_every`` steps and at the end. Returns the final state (``model`` is the
    module that ran, possibly compiled: use :func:`unwrap` for its plain weights).

    Under DDP, ``rank`` seeds this rank's noise generator with (seed, rank) so the ranks do not
    draw identical noise; on resume every rank reseeds from (seed, rank, step), since the
    checkpoint holds rank 0's generator only (world_size 1 restores it: bit-exact resume).
    """
    device = torch.device(device)
    checkpoint_dir = Path(checkpoint_dir)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    unwrap(model).to(device, memory_format=memory_format)
    optimizer, scheduler = build_optimizer(model, cfg)
    state = TrainState(model=model, ema=make_ema(unwrap(model)), optimizer=optimizer, scheduler=scheduler,
                       generator=torch.Generator(device=device).manual_seed(rank_seed(cfg.seed, rank)))
    if cfg.resume == "auto":
        _resume(state, checkpoint_dir, config_dict, compatible_keys)
        if world_size > 1:
            require_same_step(state.step)
            if state.step > 0:
                state.generator.manual_seed(rank_seed(cfg.seed, rank, state.step))
    elif is_main_process:
        _archive_previous_run(checkpoint_dir)
    if state.step >= cfg.steps:
        return state
    if cfg.compile and not hasattr(model, "_orig_mod"):
        state.model = torch.compile(model)

    # closing(): an error mid-segment must not leave that segment's DataLoader workers running
    # (the traceback keeps the generator, and with it the workers, alive).
    with closing(segmented_batches(batch_source, state.step, cfg.checkpoint_every)) as batches:
        images, busy_seconds = 0, 0.0
        while state.step < cfg.steps:
            started = time.perf_counter()
            batch = next(batches)
            metrics = train_step(state, sde, batch, cfg, device=device)
            # train_step's .item() waits for the device, so this interval is real work done.
            busy_seconds += time.perf_counter() - started
            images += batch["gt"].shape[0]
            step = state.step
            if not is_main_process:
                continue
            if log_fn is not None and step % cfg.log_every == 0:
                # Throughput over the steps since the last log, excluding sampling and checkpointing;
                # of all ranks together (each steps in lockstep with rank 0 on a batch of its own).
                log_fn(step, {**metrics, "images_per_s": world_size * images / busy_seconds})
                images, busy_seconds = 0, 0.0
            if sample_fn is not None and step % cfg.sample_every == 0:
                sample_fn(step, state.ema)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                save_checkpoint(checkpoint_dir, train_state_dict(state, config_dict), step)
    return state
