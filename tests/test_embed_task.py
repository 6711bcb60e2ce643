"""tasks.embed: quarantine of undecodable shard samples (and train/evaluate skipping them), and
the seed's per-image .pt layout.

Real shards (storage.shards.write_shards over a real manifest of PNG files) and a tiny open_clip
ViT registered through open_clip.add_model_config, so the whole file runs in a few seconds.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch

from embed_data import DAMAGE, TINY_ARCH, embed_config, lq_tensor, register_tiny_arch, write_corrupt_shards
from srdiff_core import clip_embed
from srdiff_core.config import Config
from srdiff_core.distributed import DistInfo
from srdiff_core.sde import IRSDE
from storage import fs, shards, tables
from storage.shard_tar import tar_header
from tasks import embed, embed_tables, pt_layout, refine
from tasks import evaluate as evaluate_task
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
    assert embed_tables.quarantine_table(emb.quarantine).to_pylist() == [
        {"id": "train/hazy/1", "split": "train", "degradation": "hazy",
         "reason": "LQ PNG does not decode (OSError: image file is truncated)"},
        {"id": "val/hazy/1", "split": "val", "degradation": "hazy",
         "reason": "GT PNG does not decode (UnidentifiedImageError: cannot identify image file)"}]
    if num_workers == 0:  # worker processes log nothing to caplog; the main process does the logging
        assert sum("skipping sample" in r.message for r in caplog.records) == 2


def test_quarantine_table_is_empty_and_typed_when_nothing_is_skipped():
    table = embed_tables.quarantine_table([])
    assert table.num_rows == 0 and table.schema == embed_tables.QUARANTINE_SCHEMA


def test_all_samples_undecodable_is_an_error_naming_the_count(encoder, tmp_path):
    url = str(tmp_path / "one.tar")
    key = shards.sample_key("train/hazy/x")
    meta = json.dumps({"id": "train/hazy/x", "split": "train", "degradation": "hazy"}).encode()
    with open(url, "wb") as f:
        for name, data in ((f"{key}.lq.png", b"junk"), (f"{key}.gt.png", b"junk"), (f"{key}.json", meta)):
            f.write(tar_header(name, len(data)) + data + b"\0" * (-len(data) % 512))
        f.write(b"\0" * 1024)
    with pytest.raises(ValueError, match=r"1 quarantined: none decodes.*rerun the shard stage"):
        embed.embed_shards(encoder, [url], batch_size=2, num_workers=0, log=LOG)


def test_a_sample_id_twice_is_refused_in_one_process_too(corrupt_shards, tmp_path):
    """The tables are keyed by id: a shard index that lists a shard twice (so each of its ids twice)
    is an error with embed.nproc 1, as with several processes, and nothing is written."""
    copy = tmp_path / "shards"
    shutil.copytree(corrupt_shards[0], copy)
    index = tables.read_table(str(copy / shards.INDEX_NAME))
    tables.write_table(str(copy / shards.INDEX_NAME), pa.concat_tables([index, index.slice(0, 1)]))
    cfg = embed_config(str(tmp_path / "root"), "none", cache=False)
    with pytest.raises(ValueError, match=r"2 sample id\(s\) appear more than once.*train/hazy/0.*rerun the shard stage"):
        embed.extract(cfg, str(copy), str(tmp_path / "out"), DistInfo(), LOG)
    assert not fs.exists(str(tmp_path / "out" / "lqcls.parquet"))


# ---------------------------------------------------------------- the seed's per-image .pt layout


@pytest.fixture(scope="module")
def embedded(encoder, corrupt_shards) -> embed.Embeddings:
    return embed.embed_shards(encoder, all_urls(corrupt_shards[0]), batch_size=4, num_workers=0, log=LOG)


def test_pt_layout_export_then_import_is_identical(embedded, tmp_path):
    meta = {"arch": TINY_ARCH, "weights": "random"}
    for folder, values in (("LQCLS", embedded.lq), ("RestoreCLS", embedded.gt)):
        pt_layout.export_pt_layout(str(tmp_path), folder, embedded.ids, values)
        expected = embed.embedding_table(embedded, values, meta).sort_by("id")
        imported = pt_layout.import_pt_layout(str(tmp_path / folder), samples=expected, metadata=meta)
        assert imported.equals(expected, check_metadata=True)  # ids, splits, bit-identical vectors
        assert pt_layout.import_pt_layout(str(tmp_path / folder)).column("split").null_count == 4


def test_import_embeddings_cli_writes_the_table_the_train_stage_reads(embedded, tmp_path, capsys):
    from flows import cli

    pt_layout.export_pt_layout(str(tmp_path), "RestoreCLS", embedded.ids, embedded.gt)
    samples = embed.embedding_table(embedded, embedded.gt, {}).select(["id", "split", "degradation"])
    manifest = str(tmp_path / "pairs.parquet")
    tables.write_table(manifest, samples)
    out = str(tmp_path / "restorecls.parquet")
    assert cli.main(["import-embeddings", str(tmp_path / "RestoreCLS"), out, "--manifest", manifest]) == 0
    assert f"imported 4 embeddings of size {embedded.gt.shape[1]}" in capsys.readouterr().out
    table = tables.read_table(out)
    assert table.column("split").null_count == 0 and table.schema.metadata[b"imported_from"]
    vectors = embed_tables.read_embeddings(out)  # what the train and evaluate stages read
    for i, sample_id in enumerate(embedded.ids):
        assert np.array_equal(vectors[sample_id], embedded.gt[i].numpy())
    # Ids the manifest does not hold, or no .pt files at all: a message, exit 1, nothing written.
    other = str(tmp_path / "other.parquet")
    tables.write_table(manifest, samples.slice(0, 2))
    assert cli.main(["import-embeddings", str(tmp_path / "RestoreCLS"), other, "--manifest", manifest]) == 1
    assert "2 imported id(s) are not in the samples table" in capsys.readouterr().err
    assert cli.main(["import-embeddings", str(tmp_path / "empty"), other]) == 1
    assert "no .pt files under" in capsys.readouterr().err and not os.path.exists(other)
    assert cli.main(["import-embeddings", str(tmp_path / "RestoreCLS"), other, "--manifest", str(tmp_path / "no.parquet")]) == 1
    assert "no.parquet does not exist; it is written by the download stage" in capsys.readouterr().err


def test_pt_layout_import_takes_flat_vectors_and_names_bad_files(tmp_path):
    torch.save(torch.tensor([1.0, 2.0, 3.0]), tmp_path / "b.pt")  # [D]
    torch.save(torch.tensor([[4.0, 5.0, 6.0]], dtype=torch.float64), tmp_path / "a.pt")  # [1, D]
    table = pt_layout.import_pt_layout(str(tmp_path))
    assert table.column("id").to_pylist() == ["a", "b"]
    assert table.column("embedding").to_pylist() == [[4.0, 5.0, 6.0], [1.0, 2.0, 3.0]]
    torch.save({"cls": torch.zeros(3)}, tmp_path / "c.pt")
    with pytest.raises(ValueError, match=r"c\.pt holds a dict, not a tensor.*torch\.save\(tensor\)"):
        pt_layout.import_pt_layout(str(tmp_path))
    (tmp_path / "c.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"c\.pt is not a tensor file torch\.load\(weights_only=True\) can read"):
        pt_layout.import_pt_layout(str(tmp_path))
    torch.save(torch.zeros(2, 3), tmp_path / "c.pt")
    with pytest.raises(ValueError, match=r"shape \(2, 3\); expected a floating \[1, D\] or \[D\]"):
        pt_layout.import_pt_layout(str(tmp_path))
    torch.save(torch.zeros(4), tmp_path / "c.pt")
    with pytest.raises(ValueError, match=r"mix embedding sizes \[3, 4\]"):
        pt_layout.import_pt_layout(str(tmp_path))
    (tmp_path / "c.pt").unlink()
    with pytest.raises(ValueError, match="not in the samples table"):
        pt_layout.import_pt_layout(str(tmp_path), samples=pa.table({"id": ["a"], "split": ["val"], "degradation": ["x"]}))
    with pytest.raises(FileNotFoundError, match="no .pt files under"):
        pt_layout.import_pt_layout(str(tmp_path / "empty"))


# ---------------------------------------------------------------- downstream of a quarantine


class IdentityRestorer:
    """A stand-in for srdiff_core.restorer.Restorer: returns the LQ input."""

    device = torch.device("cpu")
    sde = IRSDE(10.0)  # what the model file says it was trained with (the protocol logs its max_sigma)

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


def test_the_srm_epoch_is_chosen_on_held_out_train_rows_and_logged(stage_result):
    _, result = stage_result
    selection = json.loads(fs.read_bytes(result.outputs["srm_selection"]))
    # hazy has two decodable train rows: one fits the SRM, one chooses its epoch; no val row takes part
    assert selection["selection_split"] == "train-holdout" and selection["holdout_rows"] == 1
    assert selection["holdout_ids"][0] in {"train/hazy/0", "train/hazy/2"} and selection["training_rows"] == 1
    assert result.params["srm.selection_split"] == "train-holdout" and result.params["srm.selection_rows"] == "1"
    assert {"srm/holdout_cos_before", "srm/holdout_cos_after", "srm/val_cos_before", "srm/val_cos_after",
            "srm/hazy/val_cos_after", "srm/selection_rows"} <= set(result.metrics)


def test_train_refinement_never_reads_val_rows():
    """Val GT replaced by NaN: an SRM that read it anywhere would differ (or be NaN)."""
    gen = torch.Generator().manual_seed(0)
    n, dim = 12, 8
    lq, gt = (torch.nn.functional.normalize(torch.randn(n, dim, generator=gen), dim=-1) for _ in range(2))
    ids = [f"{split}/{deg}/{i}" for split, k in (("train", 4), ("val", 2)) for deg in ("hazy", "rainy") for i in range(k)]
    splits = [i.split("/")[0] for i in ids]
    cfg = Config.model_validate({"embed": {"srm": {"hidden": 16, "epochs": 8, "batch_size": 4, "val_fraction": 0.25}}})
    fits = []
    for val_gt in (gt[8:], torch.full_like(gt[8:], float("nan"))):
        emb = embed.Embeddings(ids, splits, [i.split("/")[1] for i in ids], lq, torch.cat([gt[:8], val_gt]))
        result, selection = refine.train_refinement(emb, cfg, torch.device("cpu"), LOG)
        fits.append((result.model.state_dict(), result.best_epoch, selection))
    assert fits[0][1] == fits[1][1] and fits[0][2] == fits[1][2]
    assert all(torch.equal(fits[0][0][k], fits[1][0][k]) for k in fits[0][0])
    assert fits[0][2].holdout_by_degradation == {"hazy": 1, "rainy": 1}
    assert all(i.startswith("train/") for i in fits[0][2].holdout_ids + fits[0][2].training_ids)


def as_quarantined(result: StageResult, sample_id: str, folder) -> str:
    """A copy of the stage's RestoreCLS and quarantine tables in which ``sample_id`` (a sample
    that decodes) is quarantined: no embedding, a quarantine row. Returns the RestoreCLS URL."""
    restorecls = tables.read_table(result.outputs["restorecls"])
    quarantine = tables.read_table(result.outputs["quarantine"]).to_pylist()
    row = next(r for r in tables.read_table(result.outputs["restorecls"]).to_pylist() if r["id"] == sample_id)
    keep = pa.array([i != sample_id for i in restorecls.column("id").to_pylist()])
    url = str(folder / "restorecls.parquet")
    tables.write_table(url, restorecls.filter(keep))
    tables.write_table(str(folder / embed_tables.QUARANTINE_NAME), embed_tables.quarantine_table(
        quarantine + [{"id": sample_id, "split": row["split"], "degradation": row["degradation"], "reason": "test"}]))
    return url


def test_training_skips_quarantined_ids_with_a_warning(stage_result, corrupt_shards, tmp_path, caplog, one_thread):
    cfg, result = stage_result
    cfg = train_config(cfg)
    train_urls = shards.shard_urls(corrupt_shards[0], split="train")
    # train/hazy/0 decodes but has no embedding, as if quarantined (train/hazy/1 really is: it does
    # not decode, so it is skipped here, leaving the missing embedding as the only error).
    restorecls = as_quarantined(result, "train/hazy/0", tmp_path)
    context = embed_tables.read_embeddings(restorecls)
    with pytest.raises(KeyError, match="no embedding for sample id 'train/hazy/0'"):
        for _ in zip(range(20), batch_source(cfg, train_urls, context, skip_ids=frozenset({"train/hazy/1"}))(0)):
            pass
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        skip = embed_tables.quarantined_ids(restorecls, "train", LOG)
    assert skip == {"train/hazy/0", "train/hazy/1", "val/hazy/1"}
    assert any("train: skipping 3 sample(s) the embed stage quarantined" in r.message for r in caplog.records)
    seen = {i for _, batch in zip(range(20), batch_source(cfg, train_urls, context, skip_ids=skip)(0))
            for i in batch["id"]}
    assert seen == {"train/hazy/2"}
    state = fit(cfg, tmp_path / "run", corrupt_shards[0], restorecls, None, LOG)  # the train stage's own path
    assert state.step == 2


def test_evaluation_skips_quarantined_ids(stage_result, corrupt_shards):
    cfg, result = stage_result
    restorecls = result.outputs["restorecls"]
    val_urls = shards.shard_urls(corrupt_shards[0], split="val")
    rows, _, _ = evaluate_samples(IdentityRestorer(), cfg, val_urls, embed_tables.read_embeddings(restorecls), None,
                                  LOG, skip_ids=embed_tables.quarantined_ids(restorecls, "evaluate", LOG))
    assert [r["id"] for r in rows] == ["val/hazy/0", "val/hazy/2"]


def test_the_evaluate_stage_counts_the_skipped_val_images(stage_result, corrupt_shards, tmp_path, monkeypatch,
                                                          caplog):
    """eval/<degradation>/skipped and eval/all/skipped, and eval.skipped in the protocol (the run's
    params and the report): a quarantined val image is not silently missing from the means."""
    cfg, result = stage_result
    data = cfg.model_dump(mode="json")
    data["data_root"] = str(tmp_path / "root")
    data["evaluate"] |= {"lpips": False, "fid": False, "steps": 2}
    cfg = Config.model_validate(data)
    monkeypatch.setattr(evaluate_task.Restorer, "from_file", lambda *a, **k: IdentityRestorer())
    restorecls = as_quarantined(result, "val/hazy/2", tmp_path)  # and val/hazy/1 does not decode
    with caplog.at_level(logging.WARNING):
        out = evaluate_task.evaluate.fn(cfg, key="skipped", shards_url=corrupt_shards[0], restorecls_url=restorecls,
                                        model_url=str(tmp_path / "model.pt"))
    assert out.metrics["eval/hazy/images"] == 1.0
    assert out.metrics["eval/hazy/skipped"] == 2.0 and out.metrics["eval/all/skipped"] == 2.0
    assert out.params["eval.skipped"].startswith("2 val image(s) quarantined by the embed stage")
    assert "hazy: 2" in out.params["eval.skipped"]
    assert "eval.skipped: 2 val image(s)" in fs.read_bytes(out.outputs["report"]).decode()
    assert any("2 val image(s) not scored" in r.message for r in caplog.records)
    # Nothing skipped: the metrics are there, at zero, so runs compare in the UI.
    clean = tmp_path / "clean"
    clean.mkdir()
    shutil.copy(result.outputs["restorecls"], clean / "restorecls.parquet")
    tables.write_table(str(clean / embed_tables.QUARANTINE_NAME), embed_tables.quarantine_table(
        [r for r in tables.read_table(result.outputs["quarantine"]).to_pylist() if r["split"] == "train"]))
    skip, by_deg, param = evaluate_task.skipped_summary(str(clean / "restorecls.parquet"), LOG)
    assert skip == {"train/hazy/1"} and by_deg == {} and param == {"eval.skipped": "none"}
    assert evaluate_task.skipped_metrics(by_deg, {"eval/hazy/psnr": 20.0, "eval/all/psnr": 20.0}) == {
        "eval/all/skipped": 0.0, "eval/hazy/skipped": 0.0}


def test_an_unfinished_extraction_says_to_rerun_the_stage(stage_result, tmp_path):
    folder = tmp_path / "embeddings"
    shutil.copytree(stage_result[1].outputs["embeddings"], folder)
    (folder / embed.COUNTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=r"extraction.json is missing.*--stages embed --refresh embed"):
        embed.read_extracted(str(folder))


def test_no_quarantine_table_means_nothing_to_skip(tmp_path):
    assert embed_tables.quarantined_ids(str(tmp_path / "restorecls.parquet"), "train", LOG) == frozenset()


def test_train_and_the_downstream_tables_do_not_import_open_clip():
    """Reading the embed stage's tables (and training on them) needs neither open_clip nor the
    torchrun launcher: tasks.embed_tables is light."""
    code = ("import sys, tasks.embed_tables, tasks.train; "
            "assert 'open_clip' not in sys.modules, 'open_clip'; assert 'tasks.embed' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
