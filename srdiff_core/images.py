"""Small image helpers shared by training previews, evaluation grids and `srdiff restore`."""

from __future__ import annotations

import numpy as np
import torch
from PIL import ImageOps


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 -> float32 3xHxW in [0,1]."""
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255.0)


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """float 3xHxW in [0,1] -> uint8 HxWx3, rounded (the 8-bit image a user would save)."""
    return img.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()


def grid(rows: list[list[np.ndarray]], pad: int = 4, fill: int = 255) -> np.ndarray:
    """Tile uint8 HxWx3 images into a grid (each row e.g. LQ | restored | GT); cells are
    padded to the largest image so rows of different sizes still line up."""
    if not rows or not rows[0]:
        raise ValueError("grid needs at least one row with one image")
    cell_h = max(im.shape[0] for row in rows for im in row)
    cell_w = max(im.shape[1] for row in rows for im in row)
    ncols = max(len(row) for row in rows)
    out = np.full((len(rows) * (cell_h + pad) + pad, ncols * (cell_w + pad) + pad, 3), fill, np.uint8)
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            y, x = pad + r * (cell_h + pad), pad + c * (cell_w + pad)
            out[y:y + im.shape[0], x:x + im.shape[1]] = im
    return out


# Tiles smaller than this (shorter side, pixels) are enlarged by a whole factor, nearest-neighbour,
# so a 96 px demo crop is seen pixel for pixel at 288 px instead of as a thumbnail; larger
# images are shown at their own size, never scaled down.
MIN_TILE_SIDE = 288


def labelled_grid(title: str, rows: list[list[tuple[np.ndarray, str]]], *, pad: int = 8,
                  font_size: int = 18) -> np.ndarray:
    """A titled grid of uint8 HxWx3 tiles, each with its caption printed under it (e.g. one row per
    image: LQ "input 24.1 dB" | restored "restored 26.3 dB" | GT "ground truth").

    Tiles are enlarged by a whole factor (nearest) up to :data:`MIN_TILE_SIDE`, the same factor
    for the whole grid; captions use PIL's bundled font, so no system font is needed.
    """
    from PIL import Image, ImageDraw, ImageFont

    if not rows or not rows[0]:
        raise ValueError("labelled_grid needs at least one row with one tile")
    shortest = min(min(tile.shape[:2]) for row in rows for tile, _ in row)
    scale = max(1, MIN_TILE_SIDE // shortest)
    font = ImageFont.load_default(size=font_size)
    title_font = ImageFont.load_default(size=font_size + 6)
    cell_h = max(tile.shape[0] for row in rows for tile, _ in row) * scale
    cell_w = max(tile.shape[1] for row in rows for tile, _ in row) * scale
    caption_h, title_h = font_size + 2 * pad, font_size + 6 + 2 * pad
    ncols = max(len(row) for row in rows)
    width = max(ncols * (cell_w + pad) + pad, int(title_font.getlength(title)) + 2 * pad)
    canvas = Image.new("RGB", (width, title_h + len(rows) * (cell_h + caption_h)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, pad), title, fill="black", font=title_font)
    for r, row in enumerate(rows):
        y = title_h + r * (cell_h + caption_h)
        for c, (tile, caption) in enumerate(row):
            x = pad + c * (cell_w + pad)
            big = Image.fromarray(tile).resize((tile.shape[1] * scale, tile.shape[0] * scale), Image.Resampling.NEAREST)
            canvas.paste(big, (x, y))
            draw.text((x, y + tile.shape[0] * scale + pad // 2), caption, fill="black", font=font)
    return np.asarray(canvas)


# ---------------------------------------------------------------- any PIL image as 8-bit RGB

SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})  # PIL's 16-bit greyscale (a 16-bit PNG)
PREMULTIPLIED = {"La": "LA", "RGBa": "RGBA"}  # alpha-premultiplied modes PIL converts to RGB only via these
ALPHA_MODES = frozenset({"RGBA", "LA", "PA"})  # not "A" in the mode's name: LAB has none


class UnsupportedImage(ValueError):
    """A PIL image that has no unambiguous 8-bit RGB form (a floating-point image, integers beyond
    16 bits, a mode PIL cannot convert). ``mode`` and ``detail`` are the facts; the caller words advice."""

    def __init__(self, mode: str, detail: str):
        super().__init__(f"{mode} image: {detail}")
        self.mode, self.detail = mode, detail


EXIF_ORIENTATION = 0x0112  # the EXIF Orientation tag (TIFF/EXIF 2.32, sec. 4.6.4 A)
# Orientations 5-8 turn the picture by 90 degrees: as shown, its height is the stored width.
TURNING_ORIENTATIONS = frozenset({5, 6, 7, 8})


def orientation(im) -> int:
    """A PIL image's EXIF Orientation: 1 stored as shown (also when absent or not a valid value),
    2-8 mirrored and/or rotated (phones store a portrait photo landscape, with 6 or 8)."""
    try:
        value = int(im.getexif().get(EXIF_ORIENTATION, 1))
    except (TypeError, ValueError):
        return 1
    return value if 1 <= value <= 8 else 1


def shown_size(im) -> tuple[int, int]:
    """(height, width) of a PIL image as viewers show it (after its EXIF orientation)."""
    turned = orientation(im) in TURNING_ORIENTATIONS
    return (im.width, im.height) if turned else (im.height, im.width)


def upright(im):
    """A PIL image as viewers show it, and what that took ("" when stored upright): the pixels are
    restored the way the user sees them, and the output, which carries no EXIF, shows the same way."""
    value = orientation(im)
    if value == 1:
        return im, ""
    return ImageOps.exif_transpose(im), f"turned upright by its EXIF orientation {value}"


def rgb_uint8(im) -> tuple[np.ndarray, str]:
    """A PIL image as uint8 HxWx3 and what the conversion did ("" for an RGB image).

    PIL's own convert("RGB") clips 16- and 32-bit greyscale to 0..255, so a 16-bit PNG comes out
    almost all white: those are scaled instead (0..65535 -> 0..255, rounded). Alpha is dropped (the
    colour channels are what was degraded). Raises :class:`UnsupportedImage` where a scale would be a
    guess (floating-point pixels, integers outside 0..65535)."""
    mode = im.mode
    if mode == "RGB":
        return np.array(im), ""  # a writable copy: torch wraps it
    if mode in SIXTEEN_BIT_MODES or mode == "I":
        return _grey16_to_rgb(mode, np.asarray(im)), "16-bit greyscale scaled to 8 bits"
    if mode == "F":
        low, high = im.getextrema()
        raise UnsupportedImage(mode, f"32-bit floating-point pixels (values {low:g}..{high:g}) have no standard "
                                     f"8-bit scale")
    source = im.convert(PREMULTIPLIED[mode]) if mode in PREMULTIPLIED else im
    if source.mode == "P" and "transparency" in source.info:
        source = source.convert("RGBA")  # PIL warns on a palette with transparency converted straight to RGB
    try:
        rgb = np.array(source.convert("RGB"))
    except ValueError as e:  # a mode PIL has no conversion for
        raise UnsupportedImage(mode, f"PIL cannot convert it to RGB ({e})") from e
    return rgb, "alpha channel dropped" if source.mode in ALPHA_MODES else ""


def _grey16_to_rgb(mode: str, values: np.ndarray) -> np.ndarray:
    wide = values.astype(np.int64)
    low, high = int(wide.min()), int(wide.max())
    if low < 0 or high > 65535:  # mode I holds 32-bit integers: only a 16-bit range has a known scale
        raise UnsupportedImage(mode, f"32-bit integer pixels (values {low}..{high}) outside the 16-bit range "
                                     f"0..65535 have no standard 8-bit scale")
    grey = ((wide * 255 + 32767) // 65535).astype(np.uint8)  # round(v * 255 / 65535)
    return np.repeat(grey[..., None], 3, axis=2)
