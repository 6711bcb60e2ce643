"""Test data for the embed stage: real shards of tiny PNG pairs (two of them undecodable) and a
tiny open_clip ViT, registered in this process or written as a ``local-dir:`` folder that a
child process (torchrun) can load without registration."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import open_clip
import pyarrow as pa
import torch
from PIL import Image
from safetensors.torch import save_file

from srdiff_core import clip_embed
from srdiff_core.config import Config
from storage import fs, shards, tables

TINY_ARCH = "srdiff-test-embed-task-vit"
TINY_MODEL_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 1, "layers": 1},
}

# Sample id -> how its bytes are damaged ("" = intact). Truncation gives PIL's "image file is
# truncated"; bytes that are no image at all give "cannot identify image file".
DAMAGE = {"train/hazy/0": "", "train/hazy/1": "lq-truncated", "train/hazy/2": "",
          "val/hazy/0": "", "val/hazy/1": "gt-garbage", "val/hazy/2": ""}


def register_tiny_arch(folder: Path, quick_gelu: bool = False) -> str:
    """Make TINY_ARCH (or its QuickGELU twin, TINY_ARCH-quickgelu: the same weights' shapes) known
    to open_clip in this process (idempotent)."""
    name = f"{TINY_ARCH}-quickgelu" if quick_gelu else TINY_ARCH
    (folder / f"{name}.json").write_text(json.dumps({**TINY_MODEL_CFG, **({"quick_gelu": True} if quick_gelu else {})}))
    open_clip.add_model_config(folder / f"{name}.json")
    return name


def tiny_local_dir(folder: Path, seed: int) -> str:
    """A ``local-dir:`` model folder (config + safetensors) of the tiny ViT with seed-``seed`` weights."""
    source = clip_embed.load_clip(register_tiny_arch(folder), "none", seed=seed)
    model_dir = folder / f"tiny-clip-{seed}"
    model_dir.mkdir(exist_ok=True)
    preprocess = {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD),
                  "interpolation": "bicubic", "resize_mode": "shortest"}
    (model_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_MODEL_CFG,
                                                                 "preprocess_cfg": preprocess}))
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()},
              model_dir / "open_clip_model.safetensors")
    return f"local-dir:{model_dir}"


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def damaged(data: bytes, how: str) -> bytes:
    return {"truncated": data[:len(data) // 2], "garbage": b"these bytes are not a PNG"}[how]


# With shared_gt, train/hazy/2 has the GT of train/hazy/0 (one clean image, several degraded
# versions: normal in dehazing sets). With 2 samples per shard they are in different shards, which
# two processes split between them (train/hazy/0: rank 0, train/hazy/2: rank 1).
SHARED_GT = ("train/hazy/0", "train/hazy/2")


def corrupt_manifest(root: str, shared_gt: bool = False) -> tuple[pa.Table, dict[str, np.ndarray]]:
    """A pairs manifest of six 20x28 PNG pairs, two with a PNG that does not decode (DAMAGE), and
    the LQ images by id. It carries the damaged bytes' sha256, so the shard writer copies them.
    ``shared_gt``: two samples share one GT file's bytes (SHARED_GT)."""
    rng = np.random.default_rng(0)
    rows, lq_images, gts = [], {}, {}
    for sample_id, how in DAMAGE.items():
        split, degradation, n = sample_id.split("/")
        lq = rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)
        files = {"lq": png_bytes(lq), "gt": png_bytes(255 - lq)}
        if shared_gt and sample_id == SHARED_GT[1]:
            files["gt"] = gts[SHARED_GT[0]]
        gts[sample_id] = files["gt"]
        if how:
            which, kind = how.split("-")
            files[which] = damaged(files[which], kind)
        src = "src-shared-gt" if shared_gt else "src"
        paths = {k: fs.join(root, src, k.upper(), f"{split}-{n}.png") for k in files}
        for k, data in files.items():
            fs.atomic_write_bytes(paths[k], data)
        rows.append({"id": sample_id, "dataset": "tiny", "degradation": degradation, "split": split,
                     "lq_path": paths["lq"], "gt_path": paths["gt"], "width": 28, "height": 20,
                     "lq_sha256": fs.sha256_bytes(files["lq"]), "gt_sha256": fs.sha256_bytes(files["gt"])})
        lq_images[sample_id] = lq
    return pa.Table.from_pylist(rows, schema=tables.PAIRS_SCHEMA), lq_images


def write_corrupt_shards(root: str, maxcount: int = 2, shared_gt: bool = False) -> tuple[str, dict[str, np.ndarray]]:
    """Shards (``maxcount`` samples each) of :func:`corrupt_manifest` under ``root/shards-<maxcount>``
    (``...-shared-gt`` with ``shared_gt``)."""
    manifest, lq_images = corrupt_manifest(root, shared_gt)
    out = fs.join(root, f"shards-{maxcount}" + ("-shared-gt" if shared_gt else ""))
    shards.write_shards(manifest, out, maxcount=maxcount, workers=1)
    return out, lq_images


def embed_config(data_root: str, pretrained: str, arch: str = TINY_ARCH, **embed) -> Config:
    """A CPU config for the embed stage on the tiny model (a small, quick SRM)."""
    return Config.model_validate({
        "data_root": data_root, "device": "cpu",
        "embed": {"arch": arch, "pretrained": pretrained, "batch_size": 2, "num_workers": 0, "export_pt": False,
                  "srm": {"hidden": 16, "epochs": 3, "batch_size": 4, "warmup_epochs": 1, "patience": 5},
                  **embed},
    })


def lq_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img).permute(2, 0, 1)
