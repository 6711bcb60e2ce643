"""Load a trained model file and restore images: the same code for evaluation and `srdiff restore`.

A model file (`model.pt`, written by the train stage) holds the EMA UNet weights, the UNet and
SDE settings, the CLIP architecture/weights spec and the SRM weights, so restoring a user's
image needs nothing precomputed: CLIP embeds the LQ, the SRM refines it, the UNet samples.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from pydantic import BaseModel, ValidationError

from srdiff_core import clip_embed, samplers, srm
from srdiff_core.checkpoint import state_dict_mismatch, unreadable_torch_file
from srdiff_core.config import EvalConfig, SDEConfig, SRMConfig, UNetConfig
from srdiff_core.sde import IRSDE
from srdiff_core.unet import ConditionalUNet, build_unet
from srdiff_core.unet_daclip import DAClipUNet

MODEL_FORMAT = "srdiff-model-v1"
MODEL_FORMAT_FAMILY = "srdiff-model-"
# What a training checkpoint (srdiff_core.training.train_state_dict) holds and a model file does not.
TRAINING_CHECKPOINT_KEYS = frozenset({"model", "ema", "optimizer", "step"})
PASS_A_MODEL_FILE = ("pass the model.pt that the train stage wrote (data_root/runs/train/<key>/model.pt) "
                     "or the MLflow run id of a train run")
OTHER_VERSION_FIX = "retrain with this srdiff, or restore with the srdiff version that wrote it"


class ModelFileMismatch(ValueError):
    """A file this srdiff cannot restore with: not a model.pt, a model.pt written by another srdiff
    version or for another architecture, or CLIP weights other than those the model was trained with."""


def _not_a_model_file(path: Path, what: str) -> ModelFileMismatch:
    return ModelFileMismatch(f"{path} is not an srdiff model file ({MODEL_FORMAT}): {what}; {PASS_A_MODEL_FILE}")


def _other_version(path: Path, what: str) -> ModelFileMismatch:
    return ModelFileMismatch(f"{path} was written by another srdiff version or for another architecture: {what}; "
                             f"{OTHER_VERSION_FIX}")


def _read_model_file(path: Path) -> dict:
    """The model file's dict, with a fix named for every file that is not one."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, MemoryError):
        raise  # a missing or unreadable file: its own message names it
    except Exception as e:
        raise _not_a_model_file(path, unreadable_torch_file(e)) from e
    if not isinstance(state, dict):
        raise _not_a_model_file(path, f"it holds a {type(state).__name__}, not a dict")
    found = state.get("format")
    if found == MODEL_FORMAT:
        return state
    if isinstance(found, str) and found.startswith(MODEL_FORMAT_FAMILY):
        raise _other_version(path, f"its format is {found!r}, this srdiff reads {MODEL_FORMAT!r}")
    if TRAINING_CHECKPOINT_KEYS <= state.keys():
        # The train stage writes <run>/checkpoints/ckpt-*.pt and, when it finishes, <run>/model.pt.
        run_model = path.parent.parent / "model.pt"
        this_run = f" (this run's: {run_model})" if run_model.is_file() else ""
        raise _not_a_model_file(path, f"this is a training checkpoint (step {state['step']}), which the train "
                                      f"stage turns into model.pt when it finishes{this_run}")
    raise _not_a_model_file(path, f"it has no format {MODEL_FORMAT!r} (keys: {sorted(map(str, state))[:8]})")


def _settings(path: Path, section: str, value: object, cls: type[BaseModel]) -> BaseModel:
    try:
        return cls.model_validate(value)
    except ValidationError as e:
        detail = "; ".join(f"{'.'.join(map(str, (section, *err['loc'])))}: {err['msg']}" for err in e.errors())
        raise _other_version(path, f"its {section} settings do not fit this srdiff ({detail})") from e


def _load_weights(path: Path, module: torch.nn.Module, weights: object, what: str) -> None:
    try:
        module.load_state_dict(weights)
    except (RuntimeError, TypeError) as e:
        raise _other_version(path, f"its {what} weights do not fit the network its settings describe "
                                   f"({state_dict_mismatch(e, limit=300)})") from e


@dataclass
class Restorer:
    unet: ConditionalUNet | DAClipUNet  # the layout model.pt's unet settings name
    sde: IRSDE
    srm: srm.SemanticRefinementModule
    clip_arch: str
    clip_pretrained: str
    device: torch.device
    _encoder: clip_embed.ClipEncoder | None = None
    # What the model file says the embeddings were made with (weights_digest None: an older file).
    trained_clip_pretrained: str | None = None
    trained_clip_digest: str | None = None
    path: Path | None = None
    # train.timesteps the network learned at (None: every step, and files from before the setting).
    trained_timesteps: list[int] | None = None

    @property
    def conditioning(self) -> str:
        return self.unet.conditioning

    @classmethod
    def from_file(cls, path: str | Path, *, device: str | torch.device = "cpu",
                  clip_pretrained: str | None = None) -> "Restorer":
        """Load `model.pt`; ``clip_pretrained`` overrides where the CLIP weights come from.

        Raises :class:`ModelFileMismatch`, naming the file and the fix, for a file that is not a
        model.pt (a training checkpoint, any other file) or one of another srdiff version."""
        path = Path(path)
        state = _read_model_file(path)
        try:
            srm_state, embed = state["srm"], state["embed"]
            # unet.layout is in the settings (absent in files from before it existed: "srdiff", their layout).
            sde = IRSDE.from_config(_settings(path, "sde", state["sde"], SDEConfig))
            unet = build_unet(_settings(path, "unet", state["unet"], UNetConfig), sde)
            refiner = srm.SemanticRefinementModule.from_config(
                int(srm_state["dim"]), _settings(path, "srm", srm_state["srm"], SRMConfig))
            _load_weights(path, unet, state["ema"], "UNet (EMA)")
            _load_weights(path, refiner, srm_state["state_dict"], "SRM")
            arch, pretrained = embed["arch"], embed["pretrained"]
        except KeyError as e:
            raise _other_version(path, f"it has no entry {e}") from e
        except TypeError as e:  # an entry of another type, e.g. a list where a dict was written
            raise _other_version(path, f"its entries are laid out differently ({e})") from e
        device = torch.device(device)
        return cls(unet=unet.to(device).eval(), sde=sde, srm=refiner.to(device).eval(), clip_arch=arch,
                   clip_pretrained=clip_pretrained or pretrained, device=device, trained_clip_pretrained=pretrained,
                   trained_clip_digest=embed.get("weights_digest"), path=path,
                   trained_timesteps=state.get("train", {}).get("timesteps"))

    def untrained_steps(self, steps: int) -> list[int]:
        """The steps a ``steps``-jump sampler queries the network at that it was not trained at
        (train.timesteps); empty when it learned them all."""
        return samplers.untrained_timesteps(self.trained_timesteps, self.sde.T, steps)

    def untrained_steps_note(self, steps: int) -> str | None:
        """None when a ``steps``-jump sampler queries only steps the network was trained at, else
        what it queries beyond them ("queries the network at t = [...], ..."), for a warning."""
        untrained = self.untrained_steps(steps)
        if not untrained:
            return None
        return (f"queries the network at t = {untrained}, steps this model was not trained at "
                f"(train.timesteps {self.trained_timesteps}): expect a worse restoration")

    def encoder(self) -> clip_embed.ClipEncoder:
        """The CLIP encoder; refused when its weights are not those the model file records."""
        if self._encoder is None:
            encoder = clip_embed.load_clip(self.clip_arch, self.clip_pretrained, device=self.device)
            self._check_clip_weights(encoder)
            self._encoder = encoder
        return self._encoder

    def _check_clip_weights(self, encoder: clip_embed.ClipEncoder) -> None:
        # Other weights give other RestoreCLS vectors: the UNet would be guided by semantics it never saw.
        if self.trained_clip_digest is None or encoder.weights_digest == self.trained_clip_digest:
            return
        raise ModelFileMismatch(
            f"the CLIP weights {self.clip_pretrained!r} ({encoder.weights}, digest {encoder.weights_digest}) are not "
            f"those the embeddings of {self.path} were made with (embed.pretrained {self.trained_clip_pretrained!r}, "
            f"digest {self.trained_clip_digest}): the semantic guidance would not match what the model was trained "
            f"on. Load the same weights (the evaluate stage: embed.pretrained; srdiff restore: --clip-pretrained, "
            f"e.g. a local copy of them), or retrain with these")

    @torch.no_grad()
    def context_for(self, lq_uint8: list[torch.Tensor]) -> torch.Tensor:
        """RestoreCLS for LQ images (uint8 3xHxW each): CLIP embedding refined by the SRM."""
        if self.conditioning == "null":
            return torch.zeros(len(lq_uint8), self.srm.dim, device=self.device)
        emb = clip_embed.embed_batch(self.encoder(), lq_uint8).to(self.device)
        return srm.refine(self.srm, emb)

    @torch.no_grad()
    def restore(self, lq: torch.Tensor, context: torch.Tensor, *, steps: int | None, seed: int,
                tile_size: int = 0, tile_overlap: int = 32, autocast_dtype: torch.dtype | None = None,
                clip_x0: bool = True, eta: float = 1.0,
                on_network_call: Callable[[int], None] | None = None) -> torch.Tensor:
        """One seeded sample per image: float [N,3,H,W] in [0,1] -> restored, same shape.

        Each image's noise comes from its own CPU generator seeded with ``seed``, so an image
        restores the same alone or in a batch, and on any device. ``on_network_call(pixels)`` is
        called after every network call (one per jump, or one per batch of tiles) with the pixels
        it saw: progress and time estimates (:class:`RestoreClock`) come from it."""
        generators = [torch.Generator().manual_seed(seed) for _ in range(lq.shape[0])]
        noise = samplers.per_image_noise((1, *lq.shape[1:]), generators, device=self.device)
        model = self.unet if on_network_call is None else _reporting(self.unet, on_network_call)
        return samplers.restore(model, lq.to(self.device), self.sde, context.to(self.device), steps=steps,
                                noise=noise, tile_size=tile_size, tile_overlap=tile_overlap,
                                autocast_dtype=autocast_dtype, clip_x0=clip_x0, eta=eta)


def _reporting(model, report: Callable[[int], None]):
    """``model`` calling ``report(pixels)`` after each call (inside the tiling: once per tile batch)."""
    def call(x: torch.Tensor, mu: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        out = model(x, mu, t, context)
        report(x.shape[0] * x.shape[-2] * x.shape[-1])
        return out
    return call


# ---------------------------------------------------------------- tiling and time on slow hardware

TILES_PER_BATCH = 8  # tiles per network call: samplers.restore's default, which Restorer.restore keeps


@dataclass(frozen=True)
class Tiling:
    """How an image goes through the network at each posterior jump: whole (``size`` 0) or in
    ``size`` tiles; ``cpu_default`` when the tiles are there because the image is large on the CPU."""

    size: int
    overlap: int
    cpu_default: bool = False


def large_on_cpu(height: int, width: int, device: torch.device | str, e: EvalConfig) -> bool:
    return torch.device(device).type == "cpu" and 0 < e.cpu_large_pixels < height * width


def tiling_for(height: int, width: int, device: torch.device | str, e: EvalConfig,
               tile_size: int | None = None) -> Tiling:
    """``tile_size`` (a caller's explicit choice, 0: never tile; None: evaluate.tile_size), and when
    nothing asks for tiles, evaluate.cpu_tile_size for an image that is large on the CPU."""
    size = e.tile_size if tile_size is None else tile_size
    if size > 0:
        return Tiling(size, e.tile_overlap)
    if tile_size is None and e.cpu_tile_size > 0 and large_on_cpu(height, width, device, e):
        return cpu_tiling(e)
    return Tiling(0, e.tile_overlap)


def cpu_tiling(e: EvalConfig) -> Tiling:
    """The tiles of an image that is large on the CPU (evaluate.cpu_tile_size)."""
    # The overlap must stay below the tile (samplers.tiled_model refuses it otherwise).
    return Tiling(e.cpu_tile_size, min(e.tile_overlap, e.cpu_tile_size // 2), cpu_default=True)


def _tile_grid(height: int, width: int, tiling: Tiling) -> tuple[int, int, int] | None:
    """(tiles, tile height, tile width) when ``tiling`` tiles this image (samplers.restore's rule)."""
    if tiling.size <= 0 or (height <= tiling.size and width <= tiling.size):
        return None
    tile_h, tile_w = min(tiling.size, height), min(tiling.size, width)
    tiles = (len(samplers.tile_starts(height, tile_h, tiling.overlap))
             * len(samplers.tile_starts(width, tile_w, tiling.overlap)))
    return tiles, tile_h, tile_w


def network_pixels(height: int, width: int, tiling: Tiling, images: int = 1) -> int:
    """Pixels the network sees in one posterior jump of ``images`` images of height x width: the
    images, or their tiles with the overlaps. A restoration's time is about proportional to it."""
    grid = _tile_grid(height, width, tiling)
    return images * (height * width if grid is None else grid[0] * grid[1] * grid[2])


def calls_per_jump(height: int, width: int, tiling: Tiling, images: int = 1) -> int:
    """Network calls in one posterior jump of ``images`` images of height x width."""
    grid = _tile_grid(height, width, tiling)
    return 1 if grid is None else math.ceil(images * grid[0] / TILES_PER_BATCH)


class RestoreClock:
    """Progress and speed of a restoration run, counted in network pixels (:func:`network_pixels`
    per jump): ``total`` planned, ``done`` so far; the current restore call (:meth:`begin` ..
    :meth:`end`) in jumps.

    The speed is measured inside restore calls (CLIP, image files and metrics between them are not
    in it) and from the end of the run's first network call on: that call carries one-time warm-up
    (allocations, kernel choice) that would make a run of many small images look many times slower."""

    def __init__(self, total: int, every_s: float = 5.0):
        self.total, self.every_s = total, every_s
        self.done = self.calls = 0
        self.measured_pixels, self.measured_s = 0, 0.0
        self._since: float | None = None  # inside a restore call: when the last call ended
        self.last_line = time.perf_counter()
        self.unit_pixels = self.unit_done = self.unit_calls = self.calls_per_jump = 0
        self.unit_start = self.last_line

    def begin(self, pixels: int, calls_per_jump: int) -> None:
        """A restore call of ``pixels`` network pixels in all, ``calls_per_jump`` calls a jump, starts."""
        self.unit_pixels, self.calls_per_jump = pixels, max(calls_per_jump, 1)
        self.unit_done = self.unit_calls = 0
        self.unit_start = self._since = time.perf_counter()

    def end(self) -> None:
        self._since = None

    def add(self, pixels: int) -> bool:
        """One network call of ``pixels`` pixels finished; True when a progress line is due (the first
        after ``every_s`` seconds since the last)."""
        now = time.perf_counter()
        if self.calls > 0 and self._since is not None:
            self.measured_pixels += pixels
            self.measured_s += now - self._since
        self._since = now
        self.done += pixels
        self.unit_done += pixels
        self.calls += 1
        self.unit_calls += 1
        if now - self.last_line < self.every_s:
            return False
        self.last_line = now
        return True

    @property
    def jumps_done(self) -> int:
        return self.unit_calls // self.calls_per_jump

    def jump_rate(self) -> float | None:
        """Jumps per second of the current restore call."""
        elapsed = time.perf_counter() - self.unit_start
        return self.jumps_done / elapsed if self.jumps_done and elapsed > 0 else None

    def seconds_for(self, pixels: float) -> float | None:
        """Expected seconds for ``pixels`` network pixels (None until a call after the first is timed)."""
        if self.measured_pixels <= 0 or self.measured_s <= 0:
            return None
        return max(pixels, 0) * self.measured_s / self.measured_pixels

    def eta(self) -> float | None:
        return self.seconds_for(self.total - self.done)

    def unit_eta(self) -> float | None:
        return self.seconds_for(self.unit_pixels - self.unit_done)


def duration_text(seconds: float) -> str:
    """45 s, 3 min 10 s, 2 h 05 min."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"
