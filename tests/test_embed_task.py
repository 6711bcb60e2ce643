"""tasks.embed: quarantine of undecodable shard samples, and the seed's per-image .pt layout.

Real shards (storage.shards.write_shards over a real manifest of PNG files) and a tiny open_clip
ViT registered through open_clip.add_model_config, so the whole file runs in a few seconds.
"""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import open_clip
import pyarrow as pa
import pytest
import torch
from PIL import Image

from srdiff_core import clip_embed
from storage import fs, shards, tables
from tasks import embed

TINY_ARCH = "srdiff-test-embed-task-vit"
TINY_MODEL_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 1, "layers": 1},
}
LOG = logging.getLogger("test_embed_task")


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> clip_embed.ClipEncoder:
    folder = tmp_path_factory.mktemp("open_clip_configs")
    (folder / f"{TINY_ARCH}.json").write_text(json.dumps(TINY_MODEL_CFG))
    open_clip.add_model_config(folder / f"{TINY_ARCH}.json")
    return clip_embed.load_clip(TINY_ARCH, "none", seed=0)


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


# Sample id -> how its bytes are damaged ("" = intact). Truncation gives PIL's "image file is
# truncated"; bytes that are no image at all give "cannot identify image file".
DAMAGE = {"train/hazy/0": "", "train/hazy/1": "lq-truncated", "train/hazy/2": "",
          "val/hazy/0": "", "val/hazy/1": "gt-garbage", "val/hazy/2": ""}


def damaged(data: bytes, how: str) -> bytes:
    return {"truncated": data[:len(data) // 2], "garbage": b"these bytes are not a PNG"}[how]


def write_corrupt_shards(root: str) -> tuple[str, dict[str, np.ndarray]]:
    """Shards of six 20x28 pairs, two of them with a PNG that does not decode. The manifest
    carries the damaged bytes' sha256, so the shard writer copies them verbatim."""
    rng = np.random.default_rng(0)
    rows, lq_images = [], {}
    for sample_id, how in DAMAGE.items():
        split, degradation, n = sample_id.split("/")
        lq = rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)
        files = {"lq": png_bytes(lq), "gt": png_bytes(255 - lq)}
        if how:
            which, kind = how.split("-")
            files[which] = damaged(files[which], kind)
        paths = {k: fs.join(root, "src", k.upper(), f"{split}-{n}.png") for k in files}
        for k, data in files.items():
            fs.atomic_write_bytes(paths[k], data)
        rows.append({"id": sample_id, "dataset": "tiny", "degradation": degradation, "split": split,
                     "lq_path": paths["lq"], "gt_path": paths["gt"], "width": 28, "height": 20,
                     "lq_sha256": fs.sha256_bytes(files["lq"]), "gt_sha256": fs.sha256_bytes(files["gt"])})
        lq_images[sample_id] = lq
    out = fs.join(root, "shards")
    shards.write_shards(pa.Table.from_pylist(rows, schema=tables.PAIRS_SCHEMA), out, maxcount=2, workers=1)
    return out, lq_images


@pytest.fixture(scope="module")
def corrupt_shards(tmp_path_factory) -> tuple[str, dict[str, np.ndarray]]:
    return write_corrupt_shards(str(tmp_path_factory.mktemp("corrupt")))


def all_urls(shards_url: str) -> list[str]:
    return [u for split in embed.SPLITS for u in shards.shard_urls(shards_url, split=split)]


# ---------------------------------------------------------------- quarantine


@pytest.mark.parametrize("num_workers", [0, 2])
def test_undecodable_samples_are_quarantined_and_the_rest_embedded(encoder, corrupt_shards, num_workers, caplog):
    shards_url, lq_images = corrupt_shards
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        emb = embed.embed_shards(encoder, all_urls(shards_url), batch_size=2, num_workers=num_workers, log=LOG)
    good = sorted(i for i, how in DAMAGE.items() if not how)
    assert sorted(emb.ids) == good and emb.lq.shape == emb.gt.shape == (4, 16)
    # Each kept sample's vector is that of its own image: the skipped ones did not shift rows.
    for i, sample_id in enumerate(emb.ids):
        own = clip_embed.embed_batch(encoder, [torch.from_numpy(lq_images[sample_id]).permute(2, 0, 1)])[0]
        assert torch.allclose(emb.lq[i], own, atol=1e-6)
    assert embed.quarantine_table(emb.quarantine).to_pylist() == [
        {"id": "train/hazy/1", "split": "train", "degradation": "hazy",
         "reason": "LQ PNG does not decode (OSError: image file is truncated)"},
        {"id": "val/hazy/1", "split": "val", "degradation": "hazy",
         "reason": "GT PNG does not decode (UnidentifiedImageError: cannot identify image file)"}]
    if num_workers == 0:  # worker processes log nothing to caplog; the main process does the logging
        assert sum("skipping sample" in r.message for r in caplog.records) == 2


def test_quarantine_table_is_empty_and_typed_when_nothing_is_skipped():
    table = embed.quarantine_table([])
    assert table.num_rows == 0 and table.schema == embed.QUARANTINE_SCHEMA


def test_all_samples_undecodable_is_an_error_naming_the_count(encoder, tmp_path):
    url = str(tmp_path / "one.tar")
    key = shards.sample_key("train/hazy/x")
    meta = json.dumps({"id": "train/hazy/x", "split": "train", "degradation": "hazy"}).encode()
    with open(url, "wb") as f:
        for name, data in ((f"{key}.lq.png", b"junk"), (f"{key}.gt.png", b"junk"), (f"{key}.json", meta)):
            f.write(shards.tar_header(name, len(data)) + data + b"\0" * (-len(data) % 512))
        f.write(b"\0" * 1024)
    with pytest.raises(ValueError, match=r"1 quarantined: none decodes.*rerun the shard stage"):
        embed.embed_shards(encoder, [url], batch_size=2, num_workers=0, log=LOG)


# ---------------------------------------------------------------- the seed's per-image .pt layout


@pytest.fixture(scope="module")
def embedded(encoder, corrupt_shards) -> embed.Embeddings:
    return embed.embed_shards(encoder, all_urls(corrupt_shards[0]), batch_size=4, num_workers=0, log=LOG)


def test_pt_layout_export_then_import_is_identical(embedded, tmp_path):
    meta = {"arch": TINY_ARCH, "weights": "random"}
    for folder, values in (("LQCLS", embedded.lq), ("RestoreCLS", embedded.gt)):
        embed.export_pt_layout(str(tmp_path), folder, embedded.ids, values)
        expected = embed.embedding_table(embedded, values, meta).sort_by("id")
        imported = embed.import_pt_layout(str(tmp_path / folder), samples=expected, metadata=meta)
        assert imported.equals(expected, check_metadata=True)  # ids, splits, bit-identical vectors
        assert embed.import_pt_layout(str(tmp_path / folder)).column("split").null_count == 4


def test_pt_layout_import_takes_flat_vectors_and_names_bad_files(tmp_path):
    torch.save(torch.tensor([1.0, 2.0, 3.0]), tmp_path / "b.pt")  # [D]
    torch.save(torch.tensor([[4.0, 5.0, 6.0]], dtype=torch.float64), tmp_path / "a.pt")  # [1, D]
    table = embed.import_pt_layout(str(tmp_path))
    assert table.column("id").to_pylist() == ["a", "b"]
    assert table.column("embedding").to_pylist() == [[4.0, 5.0, 6.0], [1.0, 2.0, 3.0]]
    torch.save({"cls": torch.zeros(3)}, tmp_path / "c.pt")
    with pytest.raises(ValueError, match=r"c\.pt holds a dict, not a tensor.*torch\.save\(tensor\)"):
        embed.import_pt_layout(str(tmp_path))
    (tmp_path / "c.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"c\.pt is not a tensor file torch\.load\(weights_only=True\) can read"):
        embed.import_pt_layout(str(tmp_path))
    torch.save(torch.zeros(2, 3), tmp_path / "c.pt")
    with pytest.raises(ValueError, match=r"shape \(2, 3\); expected a floating \[1, D\] or \[D\]"):
        embed.import_pt_layout(str(tmp_path))
    torch.save(torch.zeros(4), tmp_path / "c.pt")
    with pytest.raises(ValueError, match=r"mix embedding sizes \[3, 4\]"):
        embed.import_pt_layout(str(tmp_path))
    (tmp_path / "c.pt").unlink()
    with pytest.raises(ValueError, match="not in the samples table"):
        embed.import_pt_layout(str(tmp_path), samples=pa.table({"id": ["a"], "split": ["val"], "degradation": ["x"]}))
    with pytest.raises(FileNotFoundError, match="no .pt files under"):
        embed.import_pt_layout(str(tmp_path / "empty"))
