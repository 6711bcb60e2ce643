"""Typed pipeline configuration: every default lives here, YAML files hold only differences.

A config file is a nested mapping whose sections mirror :class:`Config`. Unknown keys and
wrong types are errors that name the offending key (pydantic ``extra="forbid"`` + strict-ish
validation), so a typo in an experiment file never silently falls back to a default.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEGRADATIONS = ("hazy", "rainy", "motion-blurry", "low-light")
RANDOM_WEIGHTS = "none"  # embed.pretrained for random CLIP weights (demo, tests), in any letter case


def random_clip_weights(pretrained: str) -> bool:
    """Whether ``embed.pretrained`` asks for random CLIP weights: the one test every stage, the
    MLflow tags and srdiff_core.clip_embed.load_clip share."""
    return pretrained.lower() == RANDOM_WEIGHTS

Precision = Literal["fp32", "bf16"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class DemoSetConfig(_Section):
    """The embedded demo set: crops of scikit-image's photographs, degraded synthetically."""

    seed: int = 0
    crop_size: int = 96
    train_per_degradation: int = 32
    # 6 val pairs: every photograph (demo_data.SOURCES) at least once, so the per-degradation
    # means are not one scene's.
    val_per_degradation: int = 6


class DownloadConfig(_Section):
    # demo: the embedded sample set; real: fetch, verify, extract and normalise the benchmark
    # datasets; seed: index a datasets/ folder already in the seed layout (e.g. from SR-Diff).
    source: Literal["demo", "real", "seed"] = "real"
    demo: DemoSetConfig = DemoSetConfig()
    # Which real datasets to fetch (names from configs/datasets.yaml).
    datasets: list[str] = ["gopro", "reside6k", "rain100h", "lol"]
    datasets_file: str = "configs/datasets.yaml"
    # Archives or extracted folders the user already has, per dataset (`--from DATASET=PATH`);
    # these replace the network sources of that dataset.
    from_paths: dict[str, list[str]] = {}
    # Downloads and extraction need a local disk: <data_root>/downloads when data_root is
    # local, else this folder.
    work_dir: str | None = None
    # GoPro's LQ side: "blur" (the usual benchmark) or "blur_gamma".
    gopro_lq_folder: Literal["blur", "blur_gamma"] = "blur"
    # A shortfall against the expected pair counts is an error unless this is true.
    allow_partial: bool = False
    # Zip-bomb caps for extraction (raise them for a trusted archive that needs more).
    max_extract_bytes: int = Field(default=64 << 30, gt=0)
    max_extract_files: int = Field(default=500_000, gt=0)
    # HTTP: bounded retries with exponential backoff (backoff_s, 2x, 4x, ...).
    retries: int = Field(default=4, ge=0)
    backoff_s: float = Field(default=2.0, ge=0)
    # Keep the extracted archives after normalisation (they are redone from the archive otherwise).
    keep_extracted: bool = False
    # Threads decoding and checking images (0: one per core).
    workers: int = Field(default=0, ge=0)


class ShardConfig(_Section):
    maxcount: int = Field(default=1000, ge=1)
    maxsize: int = Field(default=1 << 30, ge=1 << 16)  # bytes per tar
    workers: int = Field(default=0, ge=0)  # 0: one per core
    # Re-hash every source PNG against the manifest's sha256 while packing. The download stage
    # computed those digests from the bytes it wrote, so this only catches files edited since;
    # it costs about a quarter of the write throughput (bench/results/shards-cpu.md).
    check_sources: bool = False


class SRMConfig(_Section):
    """Semantic Refinement Module: residual MLP trained LQ -> GT embedding."""

    # Counts are bounded here so a bad value fails at load, naming its key, not mid-embed
    # (batch_size 0 divided by zero in train_srm). depth 0 is allowed: only the output projection.
    hidden: int = Field(default=1024, ge=1)
    depth: int = Field(default=2, ge=0)
    epochs: int = Field(default=200, ge=1)
    batch_size: int = Field(default=256, ge=1)
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: int = Field(default=5, ge=0)
    patience: int = Field(default=20, ge=1)  # 0 would stop exactly like 1
    # The SRM's epoch (early stopping, best weights) is chosen on this fraction of each degradation's
    # TRAIN rows, held out by a draw seeded with `seed` (srm.stratified_holdout); never on the val
    # split, which the embed stage only scores. 0: no hold-out, the training loss chooses.
    val_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    seed: int = 0


class EmbedConfig(_Section):
    arch: str = "ViT-B-32"
    # An open_clip pretrained tag ("openai", "laion2b_s34b_b79k"), a local weights file
    # (.bin/.pt/.safetensors), "local-dir:/path", or "none" for random weights (demo/tests).
    pretrained: str = "openai"
    batch_size: int = Field(default=256, ge=1)
    # PNG-decoding processes. On a GPU the stage is decode-bound: on one H200, 2 workers gave 163
    # images/s end to end (32 pairs) and 8 gave 496 (512 pairs; bench/results/README.md), so raise it
    # on a GPU machine with the cores. Each worker holds up to 2 decoded chunks of batch_size pairs
    # in shared memory (by arithmetic: 1.4 GB per chunk of 256 pairs at 1280x720), so more workers
    # also cost memory.
    num_workers: int = Field(default=2, ge=0)
    precision: Precision = "bf16"  # used on CUDA only; CPU always runs fp32
    # Extraction processes: > 1 runs one per GPU under torchrun (gloo processes with device: cpu),
    # each embedding its share of the shards; rank 0 merges the tables (identical to nproc 1).
    nproc: int = Field(default=1, ge=1)
    # Content-keyed embedding cache under data_root/cache/embeddings: an image (by the sha256 of
    # its PNG bytes) already embedded by the same model, weights, preprocessing and precision is
    # looked up, not recomputed, whatever the shard layout or the training config.
    cache: bool = True
    srm: SRMConfig = SRMConfig()
    export_pt: bool = True  # also write the seed's per-image LQCLS/ RestoreCLS/ .pt layout


class SDEConfig(_Section):
    """IR-SDE (Luo et al. 2023). One max_sigma for training and sampling: the noise level a
    network learns is the one it must be sampled at.

    What the released configs use (``sde.max_sigma``, on the 0..255 scale), train = test in each:
    DA-CLIP (daclip-uir, universal-image-restoration/config/daclip-sde/options/train.yml and
    test.yml) 50 for every degradation, hazy, rainy, motion-blurry and low-light included (our
    configs/daclip.yaml); IR-SDE (image-restoration-sde, codes/config/deraining/options/{train,test}/
    ir-sde.yml, Rain100H, and codes/config/deblurring/options/{train,test}/ir-sde.yml, GoPro) 10.
    Our default follows IR-SDE's per-task configs."""

    max_sigma: float = Field(default=10.0, gt=0)
    T: int = Field(default=100, ge=2)
    # Fraction of (x0 - mu) left at t = T; IRSDE takes log(eps) and needs 0 < eps < 1.
    eps: float = Field(default=0.005, gt=0, lt=1)
    schedule: Literal["cosine"] = "cosine"


class UNetConfig(_Section):
    # "srdiff": our layout (srdiff_core/unet.py: faster, lighter, the default); "daclip": DA-CLIP's
    # ConditionalUNet as released (srdiff_core/unet_daclip.py, 48.98 M parameters at these widths),
    # for parity with DA-CLIP. Recorded in model.pt, so a model restores with the layout it trained in.
    layout: Literal["srdiff", "daclip"] = "srdiff"
    nf: int = 64
    ch_mult: list[int] = [1, 2, 4, 8]
    num_res_blocks: int = 2
    context_dim: int = 512
    attn_heads: int = 4  # layout srdiff only: the daclip layout has heads of 32 channels at every width
    # GroupNorm's group count (layout srdiff): the largest divisor of each width not above this. 32 is
    # DDPM's (2 channels per group at nf 64); at nf 16 it puts one channel in each group, an InstanceNorm
    # that removes every feature's image-wide level. So normalised, the demo's network brightened the
    # dark skies of blurry photographs like low light (bench/results/demo-recipe.md, fifth sweep).
    # 1 normalises all channels together (GroupNorm(1, C)).
    norm_groups: int = Field(default=32, ge=1)
    # "semantic": cross-attend to RestoreCLS; "null": a learned empty token (the ablation).
    conditioning: Literal["semantic", "null"] = "semantic"
    # 0: the UNet reads the residual x_t - mu as IR-SDE feeds it. s > 0: the residual divided by its
    # std under the forward marginal, sqrt(v_t + e^{-2 thetabar_t} s^2) for a clean residual of std s
    # (the input preconditioning c_in of Karras et al., EDM, NeurIPS 2022, sec. 5), so the network
    # sees unit-scale input at every t; the SDE, loss and sampler are unchanged. Layout srdiff only.
    input_scaling_std: float = Field(default=0.0, ge=0.0)
    # What the network's output means. "noise": the noise eps in x_t (IR-SDE, DA-CLIP). "x0": the clean
    # residual x0 - mu, turned into the noise x_t then implies, eps = (x_t - mu - e^{-thetabar_t}(x0 - mu))
    # / sqrt(v_t) (diffusers' prediction_type "sample"; Ho et al. 2020, sec. 3.2, discuss both), so the
    # SDE, matching loss and sampler are unchanged. A small network's noise error is multiplied by
    # e^{thetabar_t} <= 1/eps in the x0 estimate near t = T; an x0 output is not, and the zero-initialised
    # output starts at x0 = mu (the input). With input_scaling_std s > 0 also EDM's c_skip and c_out
    # for a residual of std s (IRSDE.x0_coefficients): near t = 0 the output is x_t plus a small
    # correction, which a small network need not learn to copy. Both layouts.
    prediction: Literal["noise", "x0"] = "noise"

    @field_validator("conditioning", mode="before")
    @classmethod
    def _yaml_null_is_the_null_mode(cls, value: object) -> object:
        # YAML reads a bare `null` (in a file or in `--set unet.conditioning=null`) as None.
        return "null" if value is None else value


class TrainConfig(_Section):
    steps: int = Field(default=400_000, ge=1)
    batch_size: int = Field(default=16, ge=1)
    patch_size: int = Field(default=256, ge=8)
    lr: float = 2e-4
    # matching: IR-SDE's maximum-likelihood loss (Sec. 3.2); x0: L1 on the x0 estimate, every step
    # weighed alike; x0_psnr: minus the per-image PSNR of that estimate (srdiff_core.sde).
    loss: Literal["matching", "x0", "x0_psnr"] = "matching"
    # The steps t the loss is drawn at: None, every step 1..T alike (IR-SDE); a list, only those
    # (uniformly), e.g. [T] for a one-jump sampler (evaluate.steps 1), which only ever queries the
    # network at t = T. Must hold every step evaluate.steps' sampler visits (checked at load).
    timesteps: list[int] | None = None
    betas: tuple[float, float] = (0.9, 0.99)
    # AdamW's epsilon. The matching loss scales with lambda = max_sigma / 255: at a small max_sigma
    # its per-parameter gradients come near the default 1e-8, which then damps every update.
    adam_eps: float = Field(default=1e-8, gt=0)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    ema_decay: float = Field(default=0.995, ge=0.0, le=1.0)
    # Update the EMA after every this many optimiser steps (on steps ema_every, 2 ema_every, ...);
    # DA-CLIP updates every 10 steps (ema_pytorch's EMA(beta=0.995, update_every=10)).
    ema_every: int = Field(default=1, ge=1)
    grad_clip: float = 1.0
    precision: Precision = "bf16"
    # channels_last only pays with torch.compile: eager it measured ~15% slower on this UNet (H200).
    channels_last: bool = False
    compile: bool = False
    checkpoint_every: int = Field(default=5000, ge=1)
    log_every: int = Field(default=100, ge=1)
    sample_every: int = Field(default=10_000, ge=1)
    resume: Literal["auto", "never"] = "auto"
    num_workers: int = Field(default=4, ge=0)
    # Samples mixed across the shards being read, so a batch is not one degradation's
    # neighbouring ids (memory: this many raw PNG pairs per worker).
    shuffle_buffer: int = Field(default=256, ge=0)
    seed: int = 0
    # Processes: > 1 makes the train stage run data-parallel (DDP) under torchrun on this machine,
    # one process per GPU (gloo processes with device: cpu); batch_size is per process, so the
    # effective batch is nproc times larger. Several machines: flows/train_ddp.py (docs/scale-out.md).
    nproc: int = Field(default=1, ge=1)


class EvalConfig(_Section):
    steps: int = Field(default=100, ge=1)  # posterior steps (K <= T uses closed-form jumps)
    # Clamp each x0 estimate to [0, 1] inside the sampler (DDPM's clip_denoised). The released
    # IR-SDE / DA-CLIP samplers never clamp; see docs/protocol.md for the measured
    # difference and why it is on by default.
    clip_x0: bool = True
    # Fresh noise of each posterior jump, DDIM's eta (srdiff_core.samplers.posterior_jump): 1 is the
    # IR-SDE posterior sampler, 0 its deterministic counterpart (the probability-flow ODE).
    eta: float = Field(default=1.0, ge=0.0, le=1.0)
    seed: int = 0
    crop_border: int = Field(default=4, ge=0)
    samples_per_image: int = Field(default=1, ge=1)
    max_images: int = Field(default=0, ge=0)  # per degradation, 0 = all
    batch_size: int = Field(default=8, ge=1)  # val images of the same size restored together
    tile_size: int = Field(default=0, ge=0)  # 0 = never tile
    tile_overlap: int = Field(default=32, ge=0)
    # On the CPU a large image restored whole is slow (a 1280x720 image, demo UNet, 2 cores: 404 s
    # whole, 129 s in 256-px tiles): images over cpu_large_pixels pixels (0: no limit) get a warning
    # with the expected time and, when tile_size is 0, cpu_tile_size tiles (0: restore them whole).
    cpu_large_pixels: int = Field(default=512 * 512, ge=0)
    cpu_tile_size: int = Field(default=256, ge=0)
    precision: Precision = "bf16"
    lpips: bool = True
    fid: bool = True  # per degradation, when pytorch-fid's Inception weights are in the torch hub cache
    grid_images: int = Field(default=4, ge=1)


class TrackingConfig(_Section):
    # None: MLflow on sqlite:///<data_root>/mlflow.db (MLflow 3 refuses ./mlruns).
    mlflow_uri: str | None = None
    experiment: str = "srdiff"
    # The model registry: each train run that trains (not one reused from cache) logs its model as
    # an MLflow pyfunc model and registers it as a new version of this model (tasks/registry.py).
    register_model: bool = True
    registered_model: str = Field(default="srdiff", min_length=1)
    # MLflow's system metrics (system/cpu_utilization_percentage, memory, GPU with nvidia-ml-py) on
    # the embed and train runs, sampled every system_metrics_interval_s seconds.
    system_metrics: bool = True
    system_metrics_interval_s: float = Field(default=10.0, gt=0)
    # Results as Prefect artifacts (tables, markdown, training progress) on the flow run.
    prefect_artifacts: bool = True


class Config(_Section):
    name: str = "srdiff"
    data_root: str = "data"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    download: DownloadConfig = DownloadConfig()
    shard: ShardConfig = ShardConfig()
    embed: EmbedConfig = EmbedConfig()
    sde: SDEConfig = SDEConfig()
    unet: UNetConfig = UNetConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()

    # Checks that span keys run at load, so a config the sampler would refuse after hours of
    # training is refused before the first stage. All problems are reported at once.
    @model_validator(mode="after")
    def _check_cross_keys(self) -> "Config":
        checks = (_evaluate_steps_problem, _tile_overlap_problem, _train_timesteps_problem)
        problems = [p for p in (check(self) for check in checks) if p]
        if problems:
            raise ValueError("\n  ".join(problems))
        return self

    def section_digest(self, *names: str) -> str:
        """sha256 of the named sections' resolved values (a cache-key ingredient)."""
        data = {n: self.model_dump(mode="json")[n] for n in names}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _evaluate_steps_problem(cfg: Config) -> str | None:
    steps, T = cfg.evaluate.steps, cfg.sde.T
    if steps <= T:
        return None
    return (f"evaluate.steps ({steps}) exceeds sde.T ({T}), the number of SDE steps: "
            f"set evaluate.steps <= sde.T ({T})")


def _train_timesteps_problem(cfg: Config) -> str | None:
    chosen, T = cfg.train.timesteps, cfg.sde.T
    if chosen is None:
        return None
    if not chosen or any(not 1 <= t <= T for t in chosen):
        return f"train.timesteps {chosen} must be a non-empty list of steps in 1..sde.T ({T}), or null for all"
    if cfg.evaluate.steps > T:
        return None  # _evaluate_steps_problem says what to fix first
    from srdiff_core.samplers import sampling_timesteps, untrained_timesteps  # torch: only when a list is set

    untrained = untrained_timesteps(chosen, T, cfg.evaluate.steps)
    if not untrained:
        return None
    visited = sampling_timesteps(T, cfg.evaluate.steps)[:-1]
    return (f"evaluate.steps {cfg.evaluate.steps} queries the network at t = {visited}, but train.timesteps "
            f"{chosen} leaves out {untrained}: set train.timesteps: {visited}, or null to train every step")


def _tile_overlap_problem(cfg: Config) -> str | None:
    size, overlap = cfg.evaluate.tile_size, cfg.evaluate.tile_overlap
    if size == 0 or overlap < size:  # tile_size 0 never tiles, so the overlap is unused
        return None
    return (f"evaluate.tile_overlap ({overlap}) must be smaller than evaluate.tile_size ({size}): "
            f"set evaluate.tile_overlap < {size}, or evaluate.tile_size: 0 to never tile")


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and what to do."""


def _format_validation_error(err: ValidationError, origin: str) -> str:
    lines = [f"invalid configuration ({origin}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"  unknown key '{key}': remove it or check its spelling "
                         f"(see docs/configuration.md)")
        elif not e["loc"]:
            # A cross-key check on the whole Config: its message names the keys, and the input
            # would be the entire config.
            lines.append(f"  {e['ctx']['error'] if 'ctx' in e else e['msg']}")
        else:
            lines.append(f"  '{key}': {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.steps=100)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{item}' has an empty key")
    # YAML parsing gives numbers, booleans, lists ("[1,2]") and null their natural types.
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Return a copy of ``data`` with ``a.b.c=value`` overrides applied."""
    out = copy.deepcopy(data)
    for item in overrides:
        path, value = _parse_override(item)
        node = out
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{item}': '{part}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return out


def read_yaml_mapping(path: Path, *, what: str, missing: str, error: type[ConfigError] = ConfigError) -> dict:
    """The mapping a YAML file (``what``: "config file", "dataset catalog") holds; ``error`` naming
    the file when it is missing (``missing``: what to do then), not YAML, or not a mapping."""
    if not path.exists():
        raise error(f"{what} {path} does not exist; {missing}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise error(f"{what} {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise error(f"{what} {path} must hold a mapping, not {type(data).__name__}")
    return data


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_config_data(path: str | Path | None) -> dict:
    """Read a YAML config, following ``base: other.yaml`` (relative to the file) first."""
    if path is None:
        return {}
    path = Path(path)
    data = read_yaml_mapping(path, what="config file", missing="pass --config configs/demo.yaml or a path to your "
                             "own YAML file")
    base = data.pop("base", None)
    if base is not None:
        data = _merge(load_config_data(path.parent / base), data)
    return data


def validate_config(data: dict, origin: str = "config") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, origin)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load ``path`` (or the defaults), apply ``--set`` overrides, validate."""
    data = apply_overrides(load_config_data(path), list(overrides))
    origin = f"{path or 'defaults'}" + (f" with overrides {list(overrides)}" if overrides else "")
    return validate_config(data, origin)
