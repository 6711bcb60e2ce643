"""Embed-stage benchmark: how close the batched shard -> CLIP path comes to its own bounds.

On the same N synthetic 600x400 PNG pairs (2N images, LQ and GT), four measurements:

  model-only   uint8 tensors already on the device, batch B: preprocessing + encode_image
  decode-only  the shard loader alone (DecodedShardImages in a DataLoader, W workers)
  end-to-end   tasks.embed.embed_shards, the real stage path (decode in workers, batch B)
  naive        one image at a time: PIL open, open_clip's own preprocess, batch 1, the way the
               SR-Diff extractor does it (clip_embed.embed_reference)

Targets (issue 5): end-to-end / min(model-only, decode-only) >= 0.8 (the pipeline hides the
slower of the two behind the other) and end-to-end / naive >= 10. CUDA runs bf16 autocast
(embed.precision's default); the CPU runs fp32. ViT-B-32 with random weights: timing does not
depend on the weights.

    python bench/embed.py [--toy] [--pairs N] [--batch B] [--workers W] [--out bench/out/embed-<device>.json]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import open_clip
import pyarrow as pa
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import finish  # noqa: E402
from srdiff_core import clip_embed  # noqa: E402
from storage import fs, shards, tables  # noqa: E402
from tasks import embed  # noqa: E402

TOY_ARCH = "srdiff-bench-toy-vit"
TOY_MODEL_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 1, "layers": 1},
}
TARGET_VS_BOUND, TARGET_VS_NAIVE = 0.8, 10.0


@dataclass(frozen=True)
class Sizes:
    """Everything that scales between the real benchmark and CI's toy run."""

    arch: str
    pairs: int
    hw: tuple[int, int]  # (height, width) of every image
    batch: int
    workers: int
    repeats: int  # timed runs per measurement; the median is reported


FULL = Sizes(arch="ViT-B-32", pairs=32, hw=(400, 600), batch=32, workers=2, repeats=2)
TOY = Sizes(arch=TOY_ARCH, pairs=4, hw=(40, 60), batch=2, workers=1, repeats=1)


def register_toy_arch(folder: Path) -> None:
    (folder / f"{TOY_ARCH}.json").write_text(json.dumps(TOY_MODEL_CFG))
    open_clip.add_model_config(folder / f"{TOY_ARCH}.json")


def synthetic_image(rng: np.random.Generator, hw: tuple[int, int]) -> np.ndarray:
    """A smooth gradient plus noise: PNG sizes between a flat image's and pure noise's."""
    h, w = hw
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / max(w - 1, 1), yy * 255 / max(h - 1, 1), (xx + yy) * 127 / max(h + w, 1)], -1)
    return np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def write_dataset(root: str, sizes: Sizes) -> tuple[list[str], list[str]]:
    """N PNG pairs on disk and their shards (the real shard writer). Returns (shard URLs, PNG paths)."""
    rng = np.random.default_rng(0)
    rows, pngs = [], []
    for i in range(sizes.pairs):
        lq = synthetic_image(rng, sizes.hw)
        files = {"lq": png_bytes(lq), "gt": png_bytes(255 - lq)}
        paths = {k: fs.join(root, k.upper(), f"{i:05d}.png") for k in files}
        for k, data in files.items():
            fs.atomic_write_bytes(paths[k], data)
        pngs += [paths["lq"], paths["gt"]]
        rows.append({"id": f"{i:05d}", "dataset": "bench", "degradation": "synthetic", "split": "train",
                     "lq_path": paths["lq"], "gt_path": paths["gt"], "width": sizes.hw[1], "height": sizes.hw[0],
                     "lq_sha256": fs.sha256_bytes(files["lq"]), "gt_sha256": fs.sha256_bytes(files["gt"])})
    out = fs.join(root, "shards")
    # Enough shards that every loader worker has some (the loader splits by shard).
    maxcount = max(1, sizes.pairs // max(2 * sizes.workers, 1))
    shards.write_shards(pa.Table.from_pylist(rows, schema=tables.PAIRS_SCHEMA), out, maxcount=maxcount, workers=1)
    return shards.shard_urls(out, split="train"), pngs


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median wall seconds of ``repeats`` runs after one untimed warm-up run."""
    fn()
    seconds = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def decoded_batches(urls: list[str], batch: int, device: torch.device) -> list[torch.Tensor]:
    """Every image as uint8 [B,3,H,W] batches already on the device (model-only's input)."""
    decoded = [embed.decode_sample(s) for s in shards.iter_samples(urls)]
    images = [d[k] for d in decoded for k in ("lq", "gt")]
    return [torch.stack(images[i:i + batch]).to(device) for i in range(0, len(images), batch)]


def model_only(encoder: clip_embed.ClipEncoder, batches: list[torch.Tensor]) -> None:
    for b in batches:
        clip_embed.embed_batch(encoder, b)


def decode_only(urls: list[str], batch: int, workers: int) -> int:
    loader = torch.utils.data.DataLoader(embed.DecodedShardImages(urls), batch_size=batch,
                                         num_workers=min(workers, len(urls)), collate_fn=embed._collate)
    return sum(2 * len(items) for items in loader)


def naive(encoder: clip_embed.ClipEncoder, pngs: list[str]) -> None:
    for path in pngs:
        with Image.open(path) as im:
            clip_embed.embed_reference(encoder, im)


def run(sizes: Sizes, device: torch.device, root: str) -> dict:
    precision = "bf16" if device.type == "cuda" else "fp32"
    encoder = clip_embed.load_clip(sizes.arch, "none", device=device, precision=precision)
    urls, pngs = write_dataset(root, sizes)
    images = 2 * sizes.pairs
    quiet = logging.getLogger("bench.embed")
    quiet.setLevel(logging.WARNING)
    batches = decoded_batches(urls, sizes.batch, device)
    seconds = {
        "model-only": timed(lambda: model_only(encoder, batches), device, sizes.repeats),
        "decode-only": timed(lambda: decode_only(urls, sizes.batch, sizes.workers), device, sizes.repeats),
        "end-to-end": timed(lambda: embed.embed_shards(encoder, urls, batch_size=sizes.batch,
                                                       num_workers=sizes.workers, log=quiet), device, sizes.repeats),
        "naive": timed(lambda: naive(encoder, pngs), device, sizes.repeats),
    }
    rate = {name: images / s for name, s in seconds.items()}
    ratios = {"end_to_end_vs_bound": rate["end-to-end"] / min(rate["model-only"], rate["decode-only"]),
              "end_to_end_vs_naive": rate["end-to-end"] / rate["naive"]}
    return {"sizes": asdict(sizes), "precision": precision, "images": images,
            "shards": len(urls), "png_mb": sum(fs.sizes(pngs).values()) / 1e6,
            "rows": {name: {"seconds": seconds[name], "img_per_s": rate[name]} for name in seconds},
            "ratios": ratios,
            "targets_met": {"end_to_end_vs_bound": ratios["end_to_end_vs_bound"] >= TARGET_VS_BOUND,
                            "end_to_end_vs_naive": ratios["end_to_end_vs_naive"] >= TARGET_VS_NAIVE}}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"


def table(results: dict) -> str:
    s = results["sizes"]
    lines = [f"machine: {results['device']}, {platform.platform()}, python {platform.python_version()}, "
             f"torch {torch.__version__}",
             f"data: {s['pairs']} synthetic {s['hw'][1]}x{s['hw'][0]} PNG pairs ({results['images']} images, "
             f"{results['png_mb']:.1f} MB) in {results['shards']} shards; {s['arch']} random weights, "
             f"{results['precision']}; batch {s['batch']}, {s['workers']} loader workers; median of {s['repeats']}",
             "",
             f"{'measurement':<14}{'seconds':>9}{'img/s':>9}"]
    for name, row in results["rows"].items():
        lines.append(f"{name:<14}{row['seconds']:>9.3f}{row['img_per_s']:>9.1f}")
    r, met = results["ratios"], results["targets_met"]
    lines += ["",
              f"end-to-end / min(model-only, decode-only) = {r['end_to_end_vs_bound']:.2f} "
              f"(target >= {TARGET_VS_BOUND}: {'met' if met['end_to_end_vs_bound'] else 'NOT met'})",
              f"end-to-end / naive                        = {r['end_to_end_vs_naive']:.2f} "
              f"(target >= {TARGET_VS_NAIVE:g}: {'met' if met['end_to_end_vs_naive'] else 'NOT met'})"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toy", action="store_true", help="tiny model and images (CI, CPU, seconds)")
    parser.add_argument("--pairs", type=int, default=None, help="image pairs (default 32; toy 4)")
    parser.add_argument("--batch", type=int, default=None, help="batch size B (default 32; toy 2)")
    parser.add_argument("--workers", type=int, default=None, help="loader workers W (default 2; toy 1)")
    parser.add_argument("--out", default=None, help="JSON output (default bench/out/embed-<device>.json)")
    args = parser.parse_args(argv)
    base = TOY if args.toy else FULL
    sizes = Sizes(arch=base.arch, pairs=args.pairs or base.pairs, hw=base.hw, batch=args.batch or base.batch,
                  workers=base.workers if args.workers is None else args.workers, repeats=base.repeats)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="srdiff-bench-embed-") as root:
        if args.toy:
            register_toy_arch(Path(root))
        results = run(sizes, device, os.path.join(root, "data")) | {"device": device_name(device)}
    return finish(results, args.out, f"embed-{device.type}.json", table)


if __name__ == "__main__":
    main()
