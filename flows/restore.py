"""`srdiff restore INPUT OUTPUT`: restore a file or a folder with a trained model."""

from __future__ import annotations

import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from srdiff_core import images
from srdiff_core.config import load_config, random_clip_weights
from srdiff_core.clip_embed import ClipWeightsUnavailable
from srdiff_core.restorer import (
    ModelFileMismatch,
    Restorer,
    RestoreClock,
    Tiling,
    calls_per_jump,
    duration_text,
    large_on_cpu,
    network_pixels,
    tiling_for,
)
from tasks import registry, tracking
from tasks.common import RANDOM_WEIGHTS_NOTE

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
SUFFIXES_TEXT = "PNG, JPEG, TIFF, BMP or WebP images"
PROGRESS_EVERY_S = 5.0  # progress lines at most this far apart (plus one network call) while restoring
HOURS = 3600.0  # a run expected to take longer than this on the CPU is announced as a warning


@contextmanager
def model_file(checkpoint: str, cfg) -> Iterator[Path]:
    """A model.pt path, a registered model version (models:/srdiff/3, models:/srdiff@champion), or an
    MLflow run id whose `model/model.pt` artifact is downloaded into a
    temporary folder that is removed once the model is loaded (MLflow's own default folder is
    never removed, and a real model is hundreds of MB)."""
    path = Path(checkpoint)
    if path.is_file():
        yield path
        return
    if path.is_dir() and (path / "model.pt").is_file():
        yield path / "model.pt"
        return
    if registry.is_model_uri(checkpoint):  # models:/<name>/<version> or models:/<name>@<alias>
        with tempfile.TemporaryDirectory(prefix="srdiff-model-") as tmp:
            try:
                local = registry.download_model_file(cfg, checkpoint, tmp)
            except registry.RegistryError as e:
                raise SystemExit(f"srdiff restore: {e}")
            try:
                yield local
            except (ModelFileMismatch, ClipWeightsUnavailable) as e:
                raise type(e)(str(e).replace(str(local), f"the model.pt of {checkpoint}")) from e
        return
    with tempfile.TemporaryDirectory(prefix=f"srdiff-run-{path.name}-") as tmp:
        try:
            local = tracking.client_for(cfg).download_artifacts(checkpoint, "model/model.pt", dst_path=tmp)
        except Exception as e:  # MLflow raises several types for an unknown run or artifact
            raise SystemExit(f"srdiff restore: {checkpoint} is neither a model.pt file nor an MLflow train run with a "
                             f"model/model.pt artifact in {tracking.tracking_uri(cfg)} ({e}). Pass the model.pt the "
                             f"train stage wrote (data/runs/train/<key>/model.pt) or a train run id from the MLflow UI.")
        try:
            yield Path(local)
        except (ModelFileMismatch, ClipWeightsUnavailable) as e:  # the errors that name the file
            # The temporary copy is gone once this returns: name the run's artifact instead.
            raise type(e)(str(e).replace(local, f"model/model.pt of MLflow run {checkpoint}")) from e


class RestoreError(Exception):
    """A problem with what `srdiff restore` was given (input, output, --steps, --tile-size), found
    before any work where it can be; the message says what to pass instead. The CLI prints it and
    exits 2."""


@dataclass(frozen=True)
class Planned:
    """An input image (its size from the file's header) and how it goes through the network."""

    path: Path
    height: int
    width: int
    tiling: Tiling


def check_numbers(steps: int | None, tile_size: int | None, cfg) -> int:
    """The posterior steps (None: evaluate.steps); --steps and --tile-size that cannot work are refused."""
    steps = cfg.evaluate.steps if steps is None else steps
    if steps < 1:
        raise RestoreError(f"--steps {steps}: the number of posterior steps must be at least 1 (default: "
                           f"evaluate.steps, {cfg.evaluate.steps}); fewer steps are faster, e.g. --steps 20")
    overlap = cfg.evaluate.tile_overlap
    if tile_size is not None and (tile_size < 0 or 0 < tile_size <= overlap):
        raise RestoreError(f"--tile-size {tile_size}: pass a tile size in pixels larger than the tiles' overlap "
                           f"(evaluate.tile_overlap, {overlap}), e.g. --tile-size 256, or 0 to restore images whole")
    return steps


def load_rgb(path: Path) -> tuple[np.ndarray | None, str]:
    """uint8 HxWx3 and a note on the conversion ("" for RGB), or None and why the file cannot be
    restored (with what to do)."""
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return None, f"not an image file ({path.suffix or 'no suffix'}): srdiff restore reads {SUFFIXES_TEXT}"
    try:
        with Image.open(path) as im:
            mode = im.mode
            shown, turned = images.upright(im)
            rgb, what = images.rgb_uint8(shown)
    except images.UnsupportedImage as e:
        return None, f"{e}: save it as an 8- or 16-bit image (e.g. PNG) and restore that"
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        return None, f"cannot be read as an image ({e}): check the file (a partial copy?) or save it again as PNG"
    notes = [turned] if turned else []
    if mode != "RGB":
        notes.append(f"{mode} image converted to RGB" + (f" ({what})" if what else ""))
    return rgb, f"{path.name}: {'; '.join(notes)}" if notes else ""


def _header_size(path: Path) -> tuple[int, int] | str:
    """(height, width) from the image file's header (pixels are decoded later), or why it is no image."""
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return f"not an image file ({path.suffix or 'no suffix'})"
    try:
        with Image.open(path) as im:
            return images.shown_size(im)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        return f"cannot be read as an image ({e})"


def plan_inputs(input_path: Path, cfg, device: str, tile_size: int | None) -> tuple[list[Planned], list[str]]:
    """The images to restore and a note for every file skipped, refused before the model loads when
    there is nothing to restore. A single file is decoded here, so a mode that cannot be converted
    is refused now; a folder's files are checked by their headers."""
    def planned(path: Path, height: int, width: int) -> Planned:
        return Planned(path, height, width, tiling_for(height, width, device, cfg.evaluate, tile_size))

    if input_path.is_file():
        rgb, why = load_rgb(input_path)
        if rgb is None:
            raise RestoreError(f"{input_path}: {why}")
        return [planned(input_path, *rgb.shape[:2])], []
    if not input_path.is_dir():
        raise RestoreError(f"{input_path} does not exist: pass an image file or a folder of images")
    plan, notes = [], []
    files = sorted(p for p in input_path.iterdir() if p.is_file())
    for path in files:
        size = _header_size(path)
        if isinstance(size, str):
            notes.append(f"skipped {path.name}: {size}")
        else:
            plan.append(planned(path, *size))
    if not plan:
        found = f"{len(files)} file(s), none an image it reads ({'; '.join(notes[:3])})" if files else "no files"
        raise RestoreError(f"{input_path} holds no image to restore: {found}. Pass an image file or a folder of "
                           f"images ({SUFFIXES_TEXT})")
    return plan, notes


def writable_suffixes() -> list[str]:
    """The image suffixes PIL can write here (WebP, for one, needs PIL built with it)."""
    Image.init()
    formats = Image.registered_extensions()
    return sorted(s for s in IMAGE_SUFFIXES if formats.get(s) in Image.SAVE)


def ensure_writable(folder: Path) -> None:
    """Create ``folder`` and write a probe file in it: a read-only output fails now, not after the
    restoration has run."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise RestoreError(f"cannot write to {folder} ({e.strerror or e}): choose an output in a folder you can "
                           f"write to") from e


def output_target(output: Path, input_path: Path) -> Path:
    """Where the restored image(s) go: a file for an image (into ``output`` when it is a folder), a
    folder for a folder of images; checked before any work."""
    if input_path.is_file():
        target = output / f"{input_path.stem}.png" if output.is_dir() else output
        suffixes = writable_suffixes()
        if target.suffix.lower() not in suffixes:
            what = f"unknown image extension {target.suffix!r}" if target.suffix else "no image extension"
            raise RestoreError(f"{output}: {what}: name the output with one of {', '.join(suffixes)}, e.g. "
                               f"{target.with_suffix('.png').name} (PNG keeps every restored value)")
        if target.exists() and target.resolve() == input_path.resolve():
            raise RestoreError(f"{output} is the input image: pass another output path, e.g. "
                               f"{target.with_name(f'{target.stem}-restored.png')}")
        ensure_writable(target.parent)
        return target
    if output.exists() and not output.is_dir():
        raise RestoreError(f"{output} is a file: the images of the folder {input_path} need an output folder")
    if output.resolve() == input_path.resolve():
        raise RestoreError(f"{output} is the input folder: the restored images would overwrite the inputs; pass "
                           f"another output folder")
    ensure_writable(output)
    return output


def load_restorer(checkpoint: str, cfg, device: str, clip_pretrained: str | None, steps: int) -> Restorer:
    """The model file's restorer with its CLIP encoder loaded (so weights other than those the
    model was trained with are refused before any image); a ModelFileMismatch,
    ClipWeightsUnavailable or ValueError names what to change."""
    with model_file(checkpoint, cfg) as path:  # open while errors may name the file
        restorer = Restorer.from_file(path, device=device, clip_pretrained=clip_pretrained)
        if not 1 <= steps <= restorer.sde.T:  # the model's own SDE, which may differ from the config's
            raise RestoreError(f"--steps {steps} is outside 1..{restorer.sde.T}, the SDE steps this model was trained "
                             f"with: pass --steps between 1 and {restorer.sde.T}")
        if restorer.conditioning != "null":
            restorer.encoder()
    note = restorer.untrained_steps_note(steps)
    if note:
        learned = len(restorer.trained_timesteps)  # a note implies a list: the sampler with that many jumps may fit
        advice = (f"pass --steps {learned} to use the steps it learned" if not restorer.untrained_steps(learned)
                  else "train with train.timesteps covering these steps, or null for all")
        print(f"srdiff restore: warning: --steps {steps} {note}; {advice}", file=sys.stderr)
    if restorer.conditioning != "null" and random_clip_weights(restorer.trained_clip_pretrained):
        print(f"note: this model was trained with {RANDOM_WEIGHTS_NOTE}", file=sys.stderr)
    return restorer


class RestoreLines:
    """stderr lines while restoring. On the CPU: a warning for each image over
    evaluate.cpu_large_pixels, and, once a network call after the first is timed, the expected
    time of the whole run (a warning when it is hours). Everywhere: at most every
    PROGRESS_EVERY_S seconds, the image's steps with rate and ETA and, for a folder, the run's ETA."""

    def __init__(self, plan: list[Planned], steps: int, device: str, cfg):
        self.plan, self.steps, self.cfg, self.device = plan, steps, cfg, device
        self.cpu = torch.device(device).type == "cpu"
        self.clock = RestoreClock(sum(self.pixels(item) for item in plan), every_s=PROGRESS_EVERY_S)
        self.index, self.expected_said = 0, False

    def pixels(self, item: Planned) -> int:
        return self.steps * network_pixels(item.height, item.width, item.tiling)

    def begin(self, index: int) -> None:
        self.index = index
        item = self.plan[index]
        if large_on_cpu(item.height, item.width, self.device, self.cfg.evaluate):
            self.warn_large(item)
        self.clock.begin(self.pixels(item), calls_per_jump(item.height, item.width, item.tiling))

    def end(self) -> None:
        self.clock.end()

    def on_call(self, pixels: int) -> None:
        due = self.clock.add(pixels)
        if self.cpu and not self.expected_said and self.clock.seconds_for(1) is not None:
            self.say_expected()
        elif due:
            self.say_progress()

    def warn_large(self, item: Planned) -> None:
        tiles = item.tiling.size
        how = (f"restoring it in {tiles}-px tiles (evaluate.cpu_tile_size; --tile-size N sets the size, "
               f"--tile-size 0 restores it whole)" if item.tiling.cpu_default else
               f"restoring it in {tiles}-px tiles" if tiles else
               "restoring it whole (tiles are faster here: e.g. --tile-size 256)")
        expected = self.clock.seconds_for(self.pixels(item))
        when = f", expected about {duration_text(expected)}" if expected is not None else ""
        say(f"restore: {item.path.name} is {item.width}x{item.height}, large for the CPU: {how}{when}")

    def say_expected(self) -> None:
        self.expected_said = True
        seconds = self.clock.seconds_for(self.clock.total) or 0.0
        what = f"{len(self.plan)} image(s), {self.steps} steps"
        if seconds >= HOURS:
            say(f"srdiff restore: warning: this will take about {duration_text(seconds)} on the CPU ({what}): a GPU "
                f"(--device cuda), fewer steps (e.g. --steps 20) or smaller images make it faster; Ctrl-C stops it")
        else:
            say(f"restore: expected about {duration_text(seconds)} on the CPU ({what}; timed on its first network "
                f"calls)")

    def say_progress(self) -> None:
        item, clock = self.plan[self.index], self.clock
        where = f"{self.index + 1}/{len(self.plan)} {item.path.name}" if len(self.plan) > 1 else item.path.name
        rate, eta = clock.jump_rate(), clock.unit_eta()
        facts = ([f"{rate:.3g} steps/s"] if rate else []) + ([f"ETA {duration_text(eta)}"] if eta is not None else [])
        line = f"restore: {where}: step {clock.jumps_done}/{self.steps}" + (f" ({', '.join(facts)})" if facts else "")
        total_eta = clock.eta()
        if len(self.plan) > 1 and total_eta is not None:
            line += f"; all images: ETA {duration_text(total_eta)}"
        say(line)


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def restore_one(restorer: Restorer, cfg, item: Planned, target: Path, lines: RestoreLines, index: int, *,
                steps: int, seed: int, clip_x0: bool | None) -> bool:
    """Restore one planned image into ``target``; False (with a note) when it cannot be."""
    img, note = load_rgb(item.path)
    if img is None:
        say(f"skipped {item.path.name}: {note}")
        return False
    if note:
        say(note)
    lq_uint8 = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)
    context = restorer.context_for([lq_uint8])
    lines.begin(index)
    try:
        restored = restorer.restore(images.to_tensor(img)[None], context, steps=steps, seed=seed,
                                    tile_size=item.tiling.size, tile_overlap=item.tiling.overlap,
                                    clip_x0=cfg.evaluate.clip_x0 if clip_x0 is None else clip_x0,
                                    eta=cfg.evaluate.eta, on_network_call=lines.on_call)
    finally:
        lines.end()
    try:
        Image.fromarray(images.to_uint8(restored[0])).save(target)
    except OSError as e:  # e.g. the disk filled up while restoring
        say(f"srdiff restore: could not write {target} ({e}): the restored {item.path.name} is lost")
        return False
    return True


def restore_path(input_path: str, output_path: str, *, checkpoint: str, config_path: str, overrides: list[str],
                 steps: int | None, seed: int, tile_size: int | None, device: str,
                 clip_pretrained: str | None = None, clip_x0: bool | None = None) -> int:
    """Restore an image or a folder; 0 when at least one image was restored. What it was given is
    checked before the model loads (RestoreError)."""
    cfg = load_config(config_path, overrides)
    dev = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    steps = check_numbers(steps, tile_size, cfg)
    source = Path(input_path)
    plan, skipped = plan_inputs(source, cfg, dev, tile_size)
    target = output_target(Path(output_path), source)
    for note in skipped:
        say(note)
    try:
        restorer = load_restorer(checkpoint, cfg, dev, clip_pretrained, steps)
    except (ModelFileMismatch, ClipWeightsUnavailable, ValueError) as e:
        print(f"srdiff restore: {e}", file=sys.stderr)
        return 1
    start = time.perf_counter()
    lines = RestoreLines(plan, steps, dev, cfg)
    done = 0
    for index, item in enumerate(plan):
        out = target if source.is_file() else target / f"{item.path.stem}.png"
        if restore_one(restorer, cfg, item, out, lines, index, steps=steps, seed=seed, clip_x0=clip_x0):
            done += 1
    print(f"restored {done} of {len(plan) + len(skipped)} file(s) in {duration_text(time.perf_counter() - start)} "
          f"-> {target}")
    return 0 if done else 1
