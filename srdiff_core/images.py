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
