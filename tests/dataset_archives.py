"""Archives in the four benchmark datasets' real layouts (real folder and file names, wrapper
folders where the real ones have them), with small generated images, for download tests."""

from __future__ import annotations

import io
import tarfile
import zipfile

import numpy as np
from PIL import Image


def image_bytes(seed: int, size=(20, 16), fmt="PNG", mode="RGB") -> bytes:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def tar_bytes(members: dict[str, bytes], mode="w:gz", links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tf.addfile(info)
    return buf.getvalue()


def gopro_members(scenes: dict[str, tuple[str, list[str]]]) -> dict[str, bytes]:
    """``GOPRO_Large/{train,test}/<scene>/{blur,blur_gamma,sharp}/NNNNNN.png``;
    scenes: scene -> (split folder, frame names)."""
    out, seed = {}, 0
    for scene, (split, frames) in scenes.items():
        for frame in frames:
            for folder in ("blur", "blur_gamma", "sharp"):
                seed += 1
                out[f"GOPRO_Large/{split}/{scene}/{folder}/{frame}.png"] = image_bytes(seed)
    out["__MACOSX/GOPRO_Large/._train"] = b"resource fork junk"
    return out


def reside_members(train: list[str], test: list[str]) -> dict[str, bytes]:
    """``{train,test}/{hazy,GT}/<name>``: hazy outdoor images are JPEG, GT PNG, same stem."""
    out, seed = {}, 100
    for split, names in (("train", train), ("test", test)):
        for name in names:
            seed += 1
            out[f"{split}/hazy/{name}.jpg"] = image_bytes(seed, fmt="JPEG")
            out[f"{split}/GT/{name}.png"] = image_bytes(seed + 1000)
    return out


def _rain_members(numbers: list[int], lq: str, gt: str, seed: int) -> dict[str, bytes]:
    """``lq.format(n)`` and ``gt.format(n)`` for each number, distinct images (seeds seed + n, seed + 100 + n)."""
    out = {}
    for n in numbers:
        out[lq.format(n)] = image_bytes(seed + n)
        out[gt.format(n)] = image_bytes(seed + 100 + n)
    return out


def rain_train_members(numbers: list[int]) -> dict[str, bytes]:
    """RainTrainH.zip: flat ``rain-N.png`` / ``norain-N.png``."""
    return _rain_members(numbers, "RainTrainH/rain-{}.png", "RainTrainH/norain-{}.png", 200)


def rain_test_members(numbers: list[int]) -> dict[str, bytes]:
    """Rain100H.zip: ``rainy/rain-NNN.png`` + ``norain-NNN.png``."""
    return _rain_members(numbers, "Rain100H/rainy/rain-{:03d}.png", "Rain100H/norain-{:03d}.png", 400)


def lol_members(train: list[int], val: list[int]) -> dict[str, bytes]:
    """lol_dataset.zip: ``lol_dataset/{our485,eval15}/{low,high}/N.png``."""
    out = {}
    for split, numbers in (("our485", train), ("eval15", val)):
        for n in numbers:
            out[f"lol_dataset/{split}/low/{n}.png"] = image_bytes(600 + n)
            out[f"lol_dataset/{split}/high/{n}.png"] = image_bytes(700 + n)
    return out
