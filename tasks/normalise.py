"""Turn one found LQ/GT pair into the seed layout: decode both images once to check them, convert
to RGB PNG only where needed, and write them atomically; or say why the pair is rejected.

PNG files that are already 8-bit RGB are copied byte for byte (no re-encode, so the sha256 in
the manifest is the source file's); JPEGs and palette images are re-encoded deterministically.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from storage import fs


def encode_png(img: Image.Image) -> bytes:
    """Deterministic PNG bytes (fixed compression level, no metadata chunks)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


class Reject(Exception):
    """The pair cannot be used; the message is the quarantine reason."""


@dataclass(frozen=True)
class Decoded:
    image: Image.Image
    raw: bytes
    copyable: bool  # the raw bytes are already an 8-bit RGB PNG


def decode(path: Path, side: str) -> Decoded:
    raw = path.read_bytes()
    try:
        img = Image.open(io.BytesIO(raw))
        img.load()  # decode fully: a truncated file fails here, not in training
    except Exception as e:  # PIL raises many types for truncated/corrupt data
        raise Reject(f"unreadable {side} image {path.name}: {type(e).__name__}: {e}") from e
    fmt, mode = img.format, img.mode
    if img.mode in ("L", "LA", "I", "I;16", "F", "1"):
        raise Reject(f"{side} image {path.name} is greyscale ({img.mode}) where RGB is expected")
    if img.mode == "RGBA":
        if img.getchannel("A").getextrema() != (255, 255):
            raise Reject(f"{side} image {path.name} has transparency (RGBA); expected opaque RGB")
        img = img.convert("RGB")
    elif img.mode != "RGB":
        img = img.convert("RGB")  # palette, CMYK, YCbCr: colour, just stored differently
    return Decoded(img, raw, copyable=fmt == "PNG" and mode == "RGB" and _png_is_8bit_rgb(raw))


def _png_is_8bit_rgb(raw: bytes) -> bool:
    """IHDR bit depth 8, colour type 2. Pillow reports a 16-bit RGB PNG as mode RGB too, but
    its bytes are not what the rest of the pipeline reads, so it is re-encoded."""
    return len(raw) > 25 and raw[12:16] == b"IHDR" and raw[24] == 8 and raw[25] == 2


def centre_crop(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    width, height = size
    left, top = (img.width - width) // 2, (img.height - height) // 2
    return img.crop((left, top, left + width, top + height))


@dataclass(frozen=True)
class Target:
    sample_id: str
    dataset: str
    degradation: str
    split: str
    lq_url: str
    gt_url: str


def _put(url: str, data: bytes, source: Path | None) -> None:
    if source is None:
        fs.atomic_write_bytes(url, data)
    else:
        fs.link_or_write_bytes(url, data, source)


def _reencode_note(side: str, path: Path, decoded: Decoded) -> str | None:
    """What re-encoding a side changes, if it is re-encoded for its format (not for a crop)."""
    if decoded.copyable:
        return None
    if path.suffix.lower() != ".png":
        return f"{side} {path.suffix.lstrip('.').upper()} -> PNG"
    return f"{side} PNG re-encoded as 8-bit RGB"


def _under(path: Path, root: Path | None) -> bool:
    return root is not None and path.is_relative_to(root)


def normalise_pair(lq_path: Path, gt_path: Path, target: Target, crop_gt_to_lq: bool,
                   link_root: Path | None = None) -> tuple[dict, str | None]:
    """Write the pair into the seed layout; return (manifest row, note of what was changed).
    ``link_root``: a byte-copied PNG under this folder (files we extracted ourselves, never a
    user's) may be a hard link to its source; decided per file, since LQ and GT may come from
    different places. Raises :class:`Reject` with the quarantine reason."""
    lq, gt = decode(lq_path, "LQ"), decode(gt_path, "GT")
    notes = [n for n in (_reencode_note("LQ", lq_path, lq), _reencode_note("GT", gt_path, gt)) if n]
    gt_image, gt_copyable = gt.image, gt.copyable
    if lq.image.size != gt.image.size:
        bigger = gt.image.width >= lq.image.width and gt.image.height >= lq.image.height
        if not (crop_gt_to_lq and bigger):
            raise Reject(f"size mismatch: LQ {lq.image.size} vs GT {gt.image.size}")
        # RESIDE-6k: some GT images are larger than their hazy version (the hazy one was cropped
        # when synthesised); the centre crop restores the alignment, and it is recorded.
        gt_image, gt_copyable = centre_crop(gt.image, lq.image.size), False
        notes.insert(0, f"GT centre-cropped {gt.image.size[0]}x{gt.image.size[1]} -> "
                        f"{lq.image.size[0]}x{lq.image.size[1]}")
    lq_png = lq.raw if lq.copyable else encode_png(lq.image)
    gt_png = gt.raw if gt_copyable else encode_png(gt_image)
    _put(target.lq_url, lq_png, lq_path if lq.copyable and _under(lq_path, link_root) else None)
    _put(target.gt_url, gt_png, gt_path if gt_copyable and _under(gt_path, link_root) else None)
    width, height = lq.image.size
    row = {"id": target.sample_id, "dataset": target.dataset, "degradation": target.degradation,
           "split": target.split, "lq_path": target.lq_url, "gt_path": target.gt_url,
           "width": width, "height": height,
           "lq_sha256": fs.sha256_bytes(lq_png), "gt_sha256": fs.sha256_bytes(gt_png),
           "lq_bytes": len(lq_png), "gt_bytes": len(gt_png)}
    return row, "; ".join(notes) or None
