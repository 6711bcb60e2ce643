"""tasks.embed: quarantine of undecodable shard samples (and train/evaluate skipping them), and
the seed's per-image .pt layout.

Real shards (storage.shards.write_shards over a real manifest of PNG files) and a tiny open_clip
ViT registered through open_clip.add_model_config, so the whole file runs in a few seconds.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow as pa
import pytest
import torch

from embed_data import DAMAGE, TINY_ARCH, embed_config, lq_tensor, register_tiny_arch, write_corrupt_shards
from srdiff_core import clip_embed
from srdiff_core.config import Config
from storage import shards, tables
from tasks import embed
from tasks.common import StageResult
from tasks.evaluate import evaluate_samples
from tasks.train import batch_source, fit

LOG = logging.getLogger("test_embed_task")


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> clip_embed.ClipEncoder:
    arch = register_tiny_arch(tmp_path_factory.mktemp("open_clip_configs"))
    return clip_embed.load_clip(arch, "none", seed=0)


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
        own = clip_embed.embed_batch(encoder, [lq_tensor(lq_images[sample_id])])[0]
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


# ---------------------------------------------------------------- downstream of a quarantine


class IdentityRestorer:
    """A stand-in for srdiff_core.restorer.Restorer: returns the LQ input."""

    device = torch.device("cpu")

    def restore(self, lq, context, **kwargs):
        return lq


def train_config(cfg: Config) -> Config:
    """``cfg`` with a UNet and a training run small enough for a test (context: the tiny CLIP's 16)."""
    data = cfg.model_dump(mode="json")
    data["unet"] = {"nf": 8, "ch_mult": [1, 2], "num_res_blocks": 1, "context_dim": 16, "attn_heads": 1}
    data["train"] = {"steps": 2, "batch_size": 2, "patch_size": 8, "precision": "fp32", "checkpoint_every": 100,
                     "log_every": 1, "sample_every": 1000, "num_workers": 0, "shuffle_buffer": 0}
    return Config.model_validate(data)


@pytest.fixture(scope="module")
def stage_result(encoder, corrupt_shards, tmp_path_factory) -> tuple[Config, StageResult]:
    """The embed stage in one process over the shards with two undecodable samples."""
    cfg = embed_config(str(tmp_path_factory.mktemp("root")), "none")
    return cfg, embed.embed.fn(cfg, key="quarantine-test", shards_url=corrupt_shards[0])


def test_stage_writes_the_quarantine_and_counts_its_work(stage_result):
    _, result = stage_result
    quarantine = tables.read_table(result.outputs["quarantine"])
    assert quarantine.column("id").to_pylist() == ["train/hazy/1", "val/hazy/1"]
    assert tables.read_table(result.outputs["restorecls"]).column("id").to_pylist() == [
        "train/hazy/0", "train/hazy/2", "val/hazy/0", "val/hazy/2"]
    assert result.metrics["embed/computed"] == 8 and result.metrics["embed/cache_hits"] == 0
    assert result.metrics["embed/quarantined"] == 2 and result.metrics["embed/images"] == 8


def test_training_skips_quarantined_ids_with_a_warning(stage_result, corrupt_shards, tmp_path, caplog, one_thread):
    cfg, result = stage_result
    cfg = train_config(cfg)
    restorecls = result.outputs["restorecls"]
    train_urls = shards.shard_urls(corrupt_shards[0], split="train")
    context = embed.read_embeddings(restorecls)
    # The bug this guards against: the quarantined sample is still in the shards, without an
    # embedding ("no embedding for sample id"), and here its LQ does not even decode.
    with pytest.raises((KeyError, OSError)):
        for _ in zip(range(20), batch_source(cfg, train_urls, context)(0)):
            pass
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        skip = embed.quarantined_ids(restorecls, "train", LOG)
    assert skip == {"train/hazy/1", "val/hazy/1"}
    assert any("train: skipping 2 sample(s) the embed stage quarantined" in r.message for r in caplog.records)
    seen = {i for _, batch in zip(range(20), batch_source(cfg, train_urls, context, skip_ids=skip)(0))
            for i in batch["id"]}
    assert seen == {"train/hazy/0", "train/hazy/2"}
    state = fit(cfg, tmp_path / "run", corrupt_shards[0], restorecls, None, LOG)  # the train stage's own path
    assert state.step == 2


def test_evaluation_skips_quarantined_ids(stage_result, corrupt_shards):
    cfg, result = stage_result
    restorecls = result.outputs["restorecls"]
    val_urls = shards.shard_urls(corrupt_shards[0], split="val")
    rows, _, _ = evaluate_samples(IdentityRestorer(), cfg, val_urls, embed.read_embeddings(restorecls), None, LOG,
                                  skip_ids=embed.quarantined_ids(restorecls, "evaluate", LOG))
    assert [r["id"] for r in rows] == ["val/hazy/0", "val/hazy/2"]


def test_no_quarantine_table_means_nothing_to_skip(tmp_path):
    assert embed.quarantined_ids(str(tmp_path / "restorecls.parquet"), "train", LOG) == frozenset()
