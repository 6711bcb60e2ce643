"""Small image helpers shared by training previews, evaluation grids and `srdiff restore`."""

from __future__ import annotations

import numpy as np
import torch


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
