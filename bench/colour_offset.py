"""How much of a degradation's PSNR loss is one colour offset per image (a diagnosis: it needs GT).

Restores a pipeline root's val (or train) pairs with the root's model and its RestoreCLS context,
the way the evaluate stage does (configs/demo.yaml's evaluate settings), then scores each restored
image as it is and with its mean offset from GT (per channel, inside the evaluation's border crop)
subtracted. bench/results/demo-recipe.md, sixth sweep, reads it on bench/demo_recipe.py's roots.

    python bench/colour_offset.py bench/out/<root> [--model PATH] [--context PATH] [--shards DIR]
                                  [--split val|train]
                                  [--degradation motion-blurry]

A root trained with bench/demo_patches.py's ``oracle`` patch needs that context, not RestoreCLS:
this script does not apply patches.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from srdiff_core import metrics  # noqa: E402
from srdiff_core.config import EvalConfig, load_config  # noqa: E402
from srdiff_core.restorer import Restorer  # noqa: E402
from storage import shards  # noqa: E402
from tasks.embed_tables import read_embeddings  # noqa: E402
from tasks.evaluate import evaluate_samples  # noqa: E402


def as_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 -> float64 [1,3,H,W] in [0, 1]."""
    return torch.from_numpy(image.astype(np.float64) / 255.0).permute(2, 0, 1)[None]


def offset_scores(lq: np.ndarray, restored: np.ndarray, gt: np.ndarray, border: int) -> dict[str, float]:
    """PSNR of the input, of the restored image, and of the restored image less its mean offset
    from GT (clamped to [0, 1]); the offset itself in 8-bit levels (R, G, B)."""
    x, y = as_tensor(restored), as_tensor(gt)
    offset = metrics.crop_border(x - y, border).mean(dim=(0, 2, 3))
    score = lambda a: float(metrics.psnr(a, y, border=border))  # noqa: E731
    shifted = (x - offset[None, :, None, None]).clamp(0.0, 1.0)  # an image again: what a saved one could hold
    return {"input": score(as_tensor(lq)), "restored": score(x), "offset_removed": score(shifted),
            **{f"offset_{c}": float(v) * 255.0 for c, v in zip("rgb", offset)}}


def only(paths: list[Path], what: str, flag: str = "") -> Path:
    if len(paths) != 1:
        found = ", ".join(map(str, paths)) or "none"
        raise SystemExit(f"expected one {what}, found {found}" + (f": name it with {flag}" if flag and paths else ""))
    return paths[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path, help="a pipeline data_root (e.g. one of bench/demo_recipe.py's --root)")
    parser.add_argument("--model", type=Path, help="model.pt (default: the root's only one)")
    parser.add_argument("--context", type=Path, help="restorecls.parquet (default: the root's only one)")
    parser.add_argument("--shards", type=Path, help="shard folder (default: the root's only one)")
    parser.add_argument("--split", choices=("val", "train"), default="val")
    parser.add_argument("--degradation", default="motion-blurry")
    args = parser.parse_args()
    model = args.model or only(sorted(args.root.glob("runs/train/*/model.pt")), "model.pt", "--model")
    context = args.context or only(sorted(args.root.glob("embeddings/*/restorecls.parquet")), "restorecls.parquet",
                                   "--context")
    shard_dir = args.shards or only(sorted(p for p in args.root.glob("shards/*") if p.is_dir()), "shard folder",
                                    "--shards")
    cfg = load_config(REPO / "configs" / "demo.yaml", ["device=cpu"])
    restorer = Restorer.from_file(model)
    _, examples, _ = evaluate_samples(restorer, cfg, shards.shard_urls(str(shard_dir), split=args.split),
                                      read_embeddings(str(context)), None, logging.getLogger("bench.colour_offset"))
    if args.degradation not in examples:
        raise SystemExit(f"no {args.degradation!r} images in the {args.split} split; found: {', '.join(examples)}")
    border = EvalConfig().crop_border
    rows = {e.id: offset_scores(e.lq, e.restored, e.gt, border) for e in examples[args.degradation]}
    print(f"{'image':<44}{'input':>8}{'restored':>10}{'offset removed':>16}   offset R / G / B")
    for name, r in [*rows.items(), (f"mean of {len(rows)}", {k: np.mean([r[k] for r in rows.values()])
                                                            for k in next(iter(rows.values()))})]:
        print(f"{name:<44}{r['input']:>8.2f}{r['restored']:>10.2f}{r['offset_removed']:>16.2f}   "
              f"{r['offset_r']:+.1f} / {r['offset_g']:+.1f} / {r['offset_b']:+.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
