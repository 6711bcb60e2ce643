"""How far a linear filter undoes the demo's motion blur: one filter shared by the train pairs, or
one per image fitted on itself (an oracle: it needs the sharp image).

    python bench/blur_linear.py [--sizes 3,5,7,9,13] [--ridge 0.01,1] [--out bench/out/blur-linear.json]

A shared filter is what a network that ignores each image's blur path can at best learn; the
per-image fit shows the blur is invertible once the path is known. The demo set's defaults
(DemoSetConfig): its train pairs, the 6 held-out train pairs after them (bench/demo_recipe.py's
slice) and its val pairs; outputs rounded to 8 bits and scored with the evaluation's PSNR (RGB,
4 px border crop). Least squares with a ridge, one filter for the three colours.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from srdiff_core import demo_data, metrics  # noqa: E402
from srdiff_core.config import DemoSetConfig, EvalConfig  # noqa: E402

DEMO = DemoSetConfig()
HOLDOUT = 6


def pairs(split: str, indices: range) -> list[tuple[np.ndarray, np.ndarray]]:
    made = (demo_data.make_demo_pair(seed=DEMO.seed, degradation="motion-blurry", split=split, index=i,
                                     crop_size=DEMO.crop_size) for i in indices)
    return [(demo_data.to_float(p.lq), demo_data.to_float(p.gt)) for p in made]


def psnr(x: np.ndarray, gt: np.ndarray) -> float:
    """The evaluation's PSNR of an HxWx3 float image, rounded to 8 bits as a saved output is."""
    as_nchw = [torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None] for a in (x, gt)]
    return float(metrics.psnr(metrics.quantize_uint8(as_nchw[0]), as_nchw[1], border=EvalConfig().crop_border))


def windows(image: np.ndarray, size: int) -> np.ndarray:
    """Every pixel's size x size neighbourhood (reflect-padded), one row per pixel and colour."""
    r = size // 2
    padded = np.pad(image, ((r, r), (r, r), (0, 0)), mode="reflect")
    return sliding_window_view(padded, (size, size), axis=(0, 1)).reshape(-1, size * size)


def fit(data: list[tuple[np.ndarray, np.ndarray]], size: int, ridge: float) -> np.ndarray:
    x = np.concatenate([windows(lq, size) for lq, _ in data]).astype(np.float64)
    y = np.concatenate([gt.reshape(-1) for _, gt in data]).astype(np.float64)
    return np.linalg.solve(x.T @ x + ridge * np.eye(x.shape[1]), x.T @ y)


def apply(lq: np.ndarray, weights: np.ndarray, size: int) -> np.ndarray:
    return np.clip((windows(lq, size) @ weights).reshape(lq.shape), 0.0, 1.0)


def mean_psnr(data, restore) -> float:
    return round(float(np.mean([psnr(restore(lq, gt), gt) for lq, gt in data])), 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="3,5,7,9,13")
    parser.add_argument("--ridge", default="0.01,1")
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "blur-linear.json"))
    args = parser.parse_args()
    sizes, ridges = [int(v) for v in args.sizes.split(",")], [float(v) for v in args.ridge.split(",")]
    n = DEMO.train_per_degradation
    sets = {"train": pairs("train", range(n)), "held-out": pairs("train", range(n, n + HOLDOUT)),
            "val": pairs("val", range(DEMO.val_per_degradation))}
    rows = {"input": {name: mean_psnr(data, lambda lq, gt: lq) for name, data in sets.items()}}
    for size in sizes:
        for ridge in ridges:
            w = fit(sets["train"], size, ridge)
            rows[f"shared {size}x{size}, ridge {ridge:g}"] = {
                name: mean_psnr(data, lambda lq, gt: apply(lq, w, size)) for name, data in sets.items()}
    size = max(sizes)
    rows[f"per image {size}x{size} (oracle)"] = {
        name: mean_psnr(data, lambda lq, gt: apply(lq, fit([(lq, gt)], size, 1e-3), size))
        for name, data in sets.items() if name != "train"}
    print("| filter | " + " | ".join(sets) + " |\n|---|" + "---|" * len(sets))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[s]:.2f}" if s in row else "" for s in sets) + " |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
