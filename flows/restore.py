"""`srdiff restore INPUT OUTPUT`: restore a file or a folder with a trained model."""

from __future__ import annotations

import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from srdiff_core import images
from srdiff_core.config import load_config, random_clip_weights
from srdiff_core.clip_embed import ClipWeightsUnavailable
from srdiff_core.restorer import ModelFileMismatch, Restorer
from tasks import registry, tracking
from tasks.common import RANDOM_WEIGHTS_NOTE

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


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


def list_inputs(input_path: Path) -> list[Path]:
    if input_path.is_file():
        return [input_path]
    if input_path.is_dir():
        return sorted(p for p in input_path.iterdir() if p.is_file())
    raise SystemExit(f"srdiff restore: {input_path} does not exist")


def load_rgb(path: Path) -> tuple[np.ndarray | None, str]:
    """uint8 HxWx3, or None and why the file is skipped; greyscale/RGBA are converted with a note."""
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return None, f"skipped {path.name}: not an image file ({path.suffix or 'no suffix'})"
    try:
        with Image.open(path) as im:
            note = "" if im.mode == "RGB" else f"{path.name}: {im.mode} image converted to RGB"
            return np.array(im.convert("RGB")), note  # a writable copy: torch wraps it
    except (UnidentifiedImageError, OSError) as e:
        return None, f"skipped {path.name}: cannot be read as an image ({e})"


def load_restorer(checkpoint: str, cfg, device: str, clip_pretrained: str | None, steps: int) -> Restorer:
    """The model file's restorer with its CLIP encoder loaded (so weights other than those the
    model was trained with are refused before any image); a ModelFileMismatch,
    ClipWeightsUnavailable or ValueError names what to change."""
    with model_file(checkpoint, cfg) as path:  # open while errors may name the file
        restorer = Restorer.from_file(path, device=device, clip_pretrained=clip_pretrained)
        if not 1 <= steps <= restorer.sde.T:  # the model's own SDE, which may differ from the config's
            raise ValueError(f"--steps {steps} is outside 1..{restorer.sde.T}, the SDE steps this model was trained "
                             f"with: pass --steps between 1 and {restorer.sde.T}")
        if restorer.conditioning != "null":
            restorer.encoder()
    if restorer.conditioning != "null" and random_clip_weights(restorer.trained_clip_pretrained):
        print(f"note: this model was trained with {RANDOM_WEIGHTS_NOTE}", file=sys.stderr)
    return restorer


def restore_path(input_path: str, output_path: str, *, checkpoint: str, config_path: str, overrides: list[str],
                 steps: int | None, seed: int, tile_size: int | None, device: str,
                 clip_pretrained: str | None = None, clip_x0: bool | None = None) -> int:
    cfg = load_config(config_path, overrides)
    dev = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    steps = steps or cfg.evaluate.steps
    try:
        restorer = load_restorer(checkpoint, cfg, dev, clip_pretrained, steps)
    except (ModelFileMismatch, ClipWeightsUnavailable, ValueError) as e:
        print(f"srdiff restore: {e}", file=sys.stderr)
        return 1
    inputs = list_inputs(Path(input_path))
    single = Path(input_path).is_file()
    out = Path(output_path)
    (out.parent if single else out).mkdir(parents=True, exist_ok=True)
    done = 0
    for path in tqdm(inputs, desc="restore", unit="img"):
        img, note = load_rgb(path)
        if note:
            tqdm.write(note, file=sys.stderr)
        if img is None:
            continue
        lq_uint8 = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)
        context = restorer.context_for([lq_uint8])
        restored = restorer.restore(images.to_tensor(img)[None], context, steps=steps,
                                    seed=seed, tile_size=cfg.evaluate.tile_size if tile_size is None else tile_size,
                                    tile_overlap=cfg.evaluate.tile_overlap,
                                    clip_x0=cfg.evaluate.clip_x0 if clip_x0 is None else clip_x0,
                                    eta=cfg.evaluate.eta)
        target = out if single else out / f"{path.stem}.png"
        Image.fromarray(images.to_uint8(restored[0])).save(target)
        done += 1
    print(f"restored {done} of {len(inputs)} file(s) -> {out}")
    return 0 if done else 1
