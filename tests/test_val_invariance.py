"""Evaluation data never influences a fitted choice (issue 14): two data roots that differ only in
every val GT image (and so in its GT embedding) give byte-identical srm.pt and model.pt.

The pipeline (download -> shard -> embed -> train) runs on the tiny config from a seed-layout
folder (download.source: seed) on each root. Root B's val GT images are replaced by their LQ
images: a large change to the val GT embeddings, and one an SRM selected on val rows would follow
(it makes the identity map the best fit of the val rows), so the check below is sensitive."""

import json
import logging
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from mlflow.tracking import MlflowClient

from flows.pipeline import srdiff
from srdiff_core import srm
from srdiff_core.config import DEGRADATIONS, load_config
from storage import tables
from tasks import download as download_task
from tasks import embed
from tasks.tracking import PARENT_TAG, STAGE_TAG, tracking_uri

TINY = str(Path(__file__).parent / "configs" / "tiny.yaml")
# Through train only; 20 SRM epochs so that an epoch chosen on different rows can differ; a
# training preview (which reads val shards, for display only) mid-run, not only after the last step.
OVERRIDES = ["download.source=seed", "embed.srm.epochs=20", "train.sample_every=2"]
pytestmark = pytest.mark.slow


def seed_layout(folder: Path) -> Path:
    """The tiny demo set written in the seed layout under ``folder``/datasets."""
    cfg = load_config(TINY, [f"data_root={folder}", "download.source=demo"])
    download_task.materialize_demo_set(cfg, logging.getLogger("test"))
    return folder / "datasets"


def val_gt_files(root: Path) -> list[Path]:
    return sorted((root / "datasets" / "val").glob("*/GT/*.png"))


@pytest.fixture(scope="module")
def two_roots(tmp_path_factory, prefect_harness):
    source = seed_layout(tmp_path_factory.mktemp("source"))
    runs = {}
    for name in ("a", "b"):
        root = tmp_path_factory.mktemp(f"root-{name}")
        shutil.copytree(source, root / "datasets")
        if name == "b":
            for gt in val_gt_files(root):
                shutil.copyfile(gt.parent.parent / "LQ" / gt.name, gt)
        runs[name] = {"root": root, "overrides": [f"data_root={root}", *OVERRIDES]}
        runs[name]["summary"] = srdiff(config_path=TINY, overrides=runs[name]["overrides"], stages=["train"])
    return runs


def outputs(run: dict, stage: str) -> dict[str, str]:
    return run["summary"]["stages"][stage]["outputs"]


def test_the_roots_differ_in_every_val_gt_image_and_embedding_and_nothing_else(two_roots):
    a, b = two_roots["a"], two_roots["b"]
    a_files = {p.relative_to(a["root"]): p.read_bytes() for p in (a["root"] / "datasets").rglob("*.png")}
    b_files = {p.relative_to(b["root"]): p.read_bytes() for p in (b["root"] / "datasets").rglob("*.png")}
    assert a_files.keys() == b_files.keys()
    changed = {p for p in a_files if a_files[p] != b_files[p]}
    assert changed == {p.relative_to(a["root"]) for p in val_gt_files(a["root"])}
    assert len(changed) == len(DEGRADATIONS)
    emb_a, _, _ = embed.read_extracted(outputs(a, "embed")["embeddings"])
    emb_b, _, _ = embed.read_extracted(outputs(b, "embed")["embeddings"])
    assert emb_a.ids == emb_b.ids
    for i, split in enumerate(emb_a.splits):
        assert torch.equal(emb_a.gt[i], emb_b.gt[i]) == (split == "train"), emb_a.ids[i]
        # B's val GT images are its val LQ images, so the embedding cache answers them: B's batches
        # around the val rows hold fewer images, and some CPUs' GEMM kernels round by batch size
        # (1e-7 here). Train rows, which fit the SRM and the UNet, must match to the bit.
        if split == "train":
            assert torch.equal(emb_a.lq[i], emb_b.lq[i]), emb_a.ids[i]
        else:
            torch.testing.assert_close(emb_a.lq[i], emb_b.lq[i], rtol=0, atol=1e-5)
    # The train shards are the same bytes; the val shards are not, and the shard index (whose
    # digest enters the train and evaluate stages' cache keys) says so: evaluate reruns.
    index_a, index_b = (tables.read_table(outputs(r, "shard")["index"]).to_pylist() for r in (a, b))
    assert [r["shard"] for r in index_a] == [r["shard"] for r in index_b]
    for row_a, row_b in zip(index_a, index_b):
        assert (row_a["sha256"] == row_b["sha256"]) == (row_a["split"] == "train"), row_a["shard"]
    assert tables.table_digest(pa.Table.from_pylist(index_a)) != tables.table_digest(pa.Table.from_pylist(index_b))


def test_srm_and_model_files_are_byte_identical(two_roots):
    a, b = two_roots["a"], two_roots["b"]
    assert Path(outputs(a, "embed")["srm"]).read_bytes() == Path(outputs(b, "embed")["srm"]).read_bytes()
    assert Path(outputs(a, "train")["model"]).read_bytes() == Path(outputs(b, "train")["model"]).read_bytes()


def test_a_selection_on_val_rows_would_have_seen_the_change(two_roots, one_thread):
    """The control: the SRM fitted as before issue 14 (its epoch chosen on the val rows) differs
    between the roots, so the byte equality above is not an accident of the data."""
    states = []
    for run in two_roots.values():
        emb, _, _ = embed.read_extracted(outputs(run, "embed")["embeddings"])
        cfg = load_config(TINY, run["overrides"])
        train = torch.tensor([s == "train" for s in emb.splits])
        result = srm.train_srm(emb.lq[train], emb.gt[train], cfg.embed.srm, val_lq=emb.lq[~train],
                               val_gt=emb.gt[~train])
        states.append(result.model.state_dict())
    assert any(not torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_the_embed_run_logs_the_held_out_train_rows_that_chose_the_srm_epoch(two_roots):
    a = two_roots["a"]
    selection = json.loads(Path(outputs(a, "embed")["srm_selection"]).read_text())
    emb, _, _ = embed.read_extracted(outputs(a, "embed")["embeddings"])
    split_of = dict(zip(emb.ids, emb.splits))
    held = selection["holdout_ids"]
    assert selection["selection_split"] == "train-holdout" and selection["stratified_by"] == "degradation"
    assert held and all(split_of[i] == "train" for i in held)
    assert selection["holdout_by_degradation"] == {d: 1 for d in sorted(DEGRADATIONS)}  # 3 train rows each
    assert selection["training_rows"] + len(held) == sum(s == "train" for s in emb.splits)

    cfg = load_config(TINY, a["overrides"])
    client = MlflowClient(tracking_uri(cfg))
    parent = a["summary"]["parent_run_id"]
    exp = client.get_run(parent).info.experiment_id
    run = next(r for r in client.search_runs([exp], filter_string=f"tags.`{PARENT_TAG}` = '{parent}'")
               if r.data.tags[STAGE_TAG] == "embed")
    assert run.data.params["srm.selection_split"] == "train-holdout"
    assert run.data.params["srm.selection_rows"] == str(len(held))
    assert run.data.metrics["srm/selection_rows"] == len(held)
    assert -1.0 <= run.data.metrics["srm/holdout_cos_after"] <= 1.0
    assert [f.path for f in client.list_artifacts(run.info.run_id, "srm")] == ["srm/srm_selection.json"]
