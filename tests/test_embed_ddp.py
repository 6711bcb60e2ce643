"""Embedding extraction in several processes: each rank embeds its share of the shards, rank 0
merges the parts, and the tables are identical to one process's.

The first test runs two ranks one after the other in this process (no process group: the
barriers are no-ops), the second the real thing: the embed stage with embed.nproc 2 launching
torchrun (flows/embed_ddp.py), two CPU processes joined by gloo.
"""

from __future__ import annotations

import logging
import sys
import time

import pytest

from embed_data import embed_config, register_tiny_arch, tiny_local_dir, write_corrupt_shards
from srdiff_core.config import ConfigError, load_config
from srdiff_core.distributed import DistInfo
from storage import fs, shards, tables
from tasks import embed

LOG = logging.getLogger("test_embed_ddp")
TABLES = ("lqcls", "gtcls", "embed_quarantine")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp-data")
    register_tiny_arch(root)
    shards_url, _ = write_corrupt_shards(str(root), maxcount=2)  # 4 shards: train 2, val 2
    return {"shards": shards_url, "model": tiny_local_dir(root, seed=0)}


def read_outputs(out_url: str, names=TABLES) -> dict:
    return {name: tables.read_table(f"{out_url}/{name}.parquet") for name in names}


def assert_identical(a: dict, b: dict) -> None:
    for name in a:
        assert a[name].equals(b[name], check_metadata=True), name


def test_two_ranks_split_the_shards_and_merge_into_the_single_process_tables(data, tmp_path, one_thread):
    single = tmp_path / "single"
    counts = embed.extract(embed_config(str(single), data["model"]), data["shards"], str(single / "out"),
                           DistInfo(), LOG)
    assert counts["embed/computed"] == 8 and counts["embed/processes"] == 1

    ddp = tmp_path / "ddp"  # its own data root: a fresh cache, so the ranks compute everything
    cfg = embed_config(str(ddp), data["model"])
    out = str(ddp / "out")
    rank1 = embed.extract(cfg, data["shards"], out, DistInfo(1, 2, 1), LOG)
    assert not fs.exists(f"{out}/lqcls.parquet")  # only rank 0 writes the tables
    parts = fs.listdir(f"{out}/{embed.PARTS_DIR}")
    assert [p.rsplit("/", 1)[1] for p in parts] == ["embeddings-00001-of-00002.parquet",
                                                   "quarantine-00001-of-00002.parquet"]
    rank1_ids = tables.read_table(parts[0]).column("id").to_pylist()
    urls = embed.stage_shard_urls(data["shards"])
    own = shards.split_shards(urls, rank=1, world_size=2, worker_id=0, num_workers=0)
    assert rank1_ids == sorted(s["id"] for s in shards.iter_samples(own) if s["id"] not in
                               ("train/hazy/1", "val/hazy/1"))
    merged = embed.extract(cfg, data["shards"], out, DistInfo(0, 2, 0), LOG)
    assert not fs.exists(f"{out}/{embed.PARTS_DIR}")
    assert merged["embed/computed"] == 8 and merged["embed/quarantined"] == 2 and merged["embed/processes"] == 2
    assert rank1["embed/computed"] == 2 * len(rank1_ids) < merged["embed/computed"]
    assert_identical(read_outputs(str(single / "out")), read_outputs(out))


def test_more_processes_than_shards_is_refused(data, tmp_path):
    cfg = embed_config(str(tmp_path), data["model"])
    with pytest.raises(ValueError, match="4 shards cannot feed 5 embedding processes.*lower embed.nproc"):
        embed.extract(cfg, data["shards"], str(tmp_path / "out"), DistInfo(0, 5, 0), LOG)


def test_nproc_is_validated_by_the_config():
    with pytest.raises(ConfigError, match="embed.nproc"):
        load_config(None, ["embed.nproc=0"])
    assert load_config(None, []).embed.nproc == 1 and load_config(None, []).embed.cache


def test_the_stage_under_torchrun_with_two_gloo_processes_matches_one_process(data, tmp_path):
    """embed.nproc 2: the stage launches torchrun; lqcls / gtcls / quarantine and RestoreCLS (the SRM
    is trained on the merged tables in the stage's own process) equal the one-process run's."""
    single_cfg = embed_config(str(tmp_path / "single"), data["model"])
    single = embed.embed.fn(single_cfg, key="single", shards_url=data["shards"])
    ddp_cfg = embed_config(str(tmp_path / "ddp"), data["model"], nproc=2)
    start = time.perf_counter()
    ddp = embed.embed.fn(ddp_cfg, key="ddp", shards_url=data["shards"])
    seconds = time.perf_counter() - start
    names = (*TABLES, "restorecls")
    assert_identical(read_outputs(single.outputs["embeddings"], names), read_outputs(ddp.outputs["embeddings"], names))
    assert ddp.digest == single.digest
    assert ddp.metrics["embed/processes"] == 2 and ddp.metrics["embed/computed"] == 8
    assert {k: v for k, v in ddp.metrics.items() if k != "embed/processes"} == \
           {k: v for k, v in single.metrics.items() if k != "embed/processes"}
    # Both ranks filled the cache: a rerun in one process computes nothing.
    again = embed.embed.fn(embed_config(str(tmp_path / "ddp"), data["model"]), key="again", shards_url=data["shards"])
    assert again.metrics["embed/computed"] == 0 and again.digest == single.digest
    print(f"two-process stage: {seconds:.1f} s")


def test_a_failed_torchrun_is_an_error_with_its_last_lines(data, tmp_path, monkeypatch, caplog):
    failing = [sys.executable, "-c", "import sys; print('rank 1 WARNING disk full'); sys.exit(3)"]
    monkeypatch.setattr(embed, "_torchrun_command", lambda *args: failing)
    cfg = embed_config(str(tmp_path), data["model"], nproc=2)
    with caplog.at_level(logging.INFO, logger=LOG.name), \
            pytest.raises(RuntimeError, match=r"(?s)2 processes failed \(exit 3\).*disk full.*embed.nproc=1"):
        embed.run_ranks(cfg, data["shards"], str(tmp_path / "out"), LOG)
    assert [r.levelname for r in caplog.records if r.message.startswith("embed[torchrun]")] == ["WARNING"]
