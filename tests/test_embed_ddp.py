"""Embedding extraction in several processes: each rank embeds its share of the shards, rank 0
merges the parts, and the tables are identical to one process's.

The first test runs two ranks one after the other in this process (no process group: the
barriers are no-ops), the second the real thing: the embed stage with embed.nproc 2 launching
torchrun (flows/embed_ddp.py), two CPU processes joined by gloo.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from datetime import timedelta

import pyarrow as pa
import pytest
import torch
import yaml

from embed_data import SHARED_GT, embed_config, register_tiny_arch, tiny_local_dir, write_corrupt_shards
from flows import embed_ddp
from srdiff_core.config import ConfigError, load_config
from srdiff_core.data import split_shards
from srdiff_core.distributed import DistInfo
from storage import fs, shards, tables
from tasks import embed, embed_tables, launch

LOG = logging.getLogger("test_embed_ddp")
TABLES = ("lqcls", "gtcls", "embed_quarantine")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp-data")
    register_tiny_arch(root)
    shards_url, _ = write_corrupt_shards(str(root), maxcount=2)  # 4 shards: train 2, val 2
    shared, _ = write_corrupt_shards(str(root), maxcount=2, shared_gt=True)  # the same, two sharing a GT
    return {"shards": shards_url, "shared": shared, "model": tiny_local_dir(root, seed=0)}


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
    # Parts an interrupted run with 3 processes left behind: named for world size 3, never merged
    # (their ids would clash with the real parts', their rows are not the tables').
    leftover = {n: f"{out}/{embed.PARTS_DIR}/{n}" for n in ("embeddings-00000-of-00003.parquet",
                                                            "quarantine-00000-of-00003.parquet")}
    stale = pa.table({"id": ["train/hazy/0", "zzz/stale"], "split": ["train"] * 2, "degradation": ["hazy"] * 2,
                      "lq": embed_tables.vector_column(torch.ones(2, 16)),
                      "gt": embed_tables.vector_column(torch.ones(2, 16))})
    tables.write_table(leftover["embeddings-00000-of-00003.parquet"],
                       stale.replace_schema_metadata({"computed": "4", "cache_hits": "0"}))
    tables.write_table(leftover["quarantine-00000-of-00003.parquet"], embed_tables.quarantine_table(
        [{"id": "zzz/bad", "split": "val", "degradation": "hazy", "reason": "stale"}]))
    rank1 = embed.extract(cfg, data["shards"], out, DistInfo(1, 2, 1), LOG)
    assert not fs.exists(f"{out}/lqcls.parquet")  # only rank 0 writes the tables
    parts = [p for p in fs.listdir(f"{out}/{embed.PARTS_DIR}") if p not in leftover.values()]
    assert [p.rsplit("/", 1)[1] for p in parts] == ["embeddings-00001-of-00002.parquet",
                                                   "quarantine-00001-of-00002.parquet"]
    rank1_ids = tables.read_table(parts[0]).column("id").to_pylist()
    urls = embed.stage_shard_urls(data["shards"])
    own = split_shards(urls, rank=1, world_size=2, worker_id=0, num_workers=0)
    assert rank1_ids == sorted(s["id"] for s in shards.iter_samples(own) if s["id"] not in
                               ("train/hazy/1", "val/hazy/1"))
    merged = embed.extract(cfg, data["shards"], out, DistInfo(0, 2, 0), LOG)
    assert not fs.exists(f"{out}/{embed.PARTS_DIR}")  # the leftovers went with the folder
    assert merged["embed/computed"] == 8 and merged["embed/quarantined"] == 2 and merged["embed/processes"] == 2
    assert rank1["embed/computed"] == 2 * len(rank1_ids) < merged["embed/computed"]
    assert_identical(read_outputs(str(single / "out")), read_outputs(out))


def test_an_image_in_shards_of_two_ranks_gives_the_single_process_tables(data, tmp_path, one_thread):
    """A GT shared by two samples in shards of different ranks (normal in dehazing). One process
    meets it twice; two ranks once each. Only the cache as it was before the run is looked up, so
    both embed it in the batch of each shard: the same batches, bit-identical tables and counts.
    (Were the image embedded earlier in the same run reused, one process would embed the second
    shard's batch without it: fewer model inputs, other fp32 bits, other counts.)"""
    urls = embed.stage_shard_urls(data["shared"])
    rank_of = {s["id"]: r for r in (0, 1) for s in shards.iter_samples(
        split_shards(urls, rank=r, world_size=2, worker_id=0, num_workers=0))}
    assert (rank_of[SHARED_GT[0]], rank_of[SHARED_GT[1]]) == (0, 1)

    single = str(tmp_path / "single" / "out")
    counts = embed.extract(embed_config(str(tmp_path / "single"), data["model"]), data["shared"], single,
                           DistInfo(), LOG)
    # Both ranks load the cache before either adds to it (the barrier between). Run one after the
    # other in this process, each gets a data root (a cache) of its own to see the same.
    out = str(tmp_path / "ddp-out")
    rank1 = embed.extract(embed_config(str(tmp_path / "rank1"), data["model"]), data["shared"], out,
                          DistInfo(1, 2, 1), LOG)
    merged = embed.extract(embed_config(str(tmp_path / "rank0"), data["model"]), data["shared"], out,
                           DistInfo(0, 2, 0), LOG)
    assert_identical(read_outputs(single), read_outputs(out))
    assert counts["embed/computed"] == merged["embed/computed"] == 8 and rank1["embed/computed"] == 4
    assert {k: v for k, v in counts.items() if k != "embed/processes"} == \
           {k: v for k, v in merged.items() if k != "embed/processes"}
    lq, gt = (tables.read_table(f"{out}/{n}.parquet") for n in ("lqcls", "gtcls"))
    ids = lq.column("id").to_pylist()
    a, b = (gt.column("embedding")[ids.index(i)].as_py() for i in SHARED_GT)
    assert a == pytest.approx(b, abs=1e-6)  # one image, two batches


def test_the_cache_gets_a_rank_s_vectors_only_after_the_barrier(data, tmp_path, monkeypatch, one_thread):
    """A rank that added to the cache before another loaded it would change that rank's batches."""
    cfg = embed_config(str(tmp_path), data["model"])
    cache_parts = []
    monkeypatch.setattr(embed, "barrier", lambda info: cache_parts.append(
        len(fs.glob(str(tmp_path / "cache" / "embeddings" / "*" / "part-*.parquet")))))
    embed.extract(cfg, data["shared"], str(tmp_path / "out"), DistInfo(1, 2, 1), LOG)
    assert cache_parts == [0, 1]  # nothing at the barrier after the parts, this rank's part after


def test_a_missing_rank_part_names_what_to_check(tmp_path):
    # Rank 0 wrote its part; rank 1 failed, or wrote to a folder only its own node sees.
    embed.write_part(str(tmp_path), DistInfo(0, 2, 0), embed.Embeddings([], [], [], torch.empty(0, 16),
                                                                          torch.empty(0, 16)))
    with pytest.raises(FileNotFoundError, match=r"embeddings-00001-of-00002\.parquet does not exist: rank 1 of 2 "
                                                r"wrote no part\. Put --out on storage every node shares, or check "
                                                r"the torchrun log for a failed rank"):
        embed.merge_parts(str(tmp_path), 2)


def test_more_processes_than_shards_is_refused(data, tmp_path):
    cfg = embed_config(str(tmp_path), data["model"])
    with pytest.raises(ValueError, match="4 shards cannot feed 5 embedding processes.*lower embed.nproc"):
        embed.extract(cfg, data["shards"], str(tmp_path / "out"), DistInfo(0, 5, 0), LOG)


def test_nproc_is_validated_by_the_config():
    with pytest.raises(ConfigError, match="embed.nproc"):
        load_config(None, ["embed.nproc=0"])
    assert load_config(None, []).embed.nproc == 1 and load_config(None, []).embed.cache


def test_the_stage_under_torchrun_with_two_gloo_processes_matches_one_process(data, tmp_path, one_thread):
    """embed.nproc 2: the stage launches torchrun; lqcls / gtcls / quarantine and RestoreCLS (the SRM
    is trained on the merged tables in the stage's own process) equal the one-process run's, with a
    GT shared by shards of the two ranks. On the CPU the bits depend on the intra-op thread count
    (the order of float sums), so the one-process run uses one thread like each torchrun rank."""
    single_cfg = embed_config(str(tmp_path / "single"), data["model"])
    single = embed.embed.fn(single_cfg, key="single", shards_url=data["shared"])
    ddp_cfg = embed_config(str(tmp_path / "ddp"), data["model"], nproc=2)
    start = time.perf_counter()
    ddp = embed.embed.fn(ddp_cfg, key="ddp", shards_url=data["shared"], ddp_entry=embed_ddp)
    seconds = time.perf_counter() - start
    names = (*TABLES, "restorecls")
    assert_identical(read_outputs(single.outputs["embeddings"], names), read_outputs(ddp.outputs["embeddings"], names))
    assert ddp.digest == single.digest
    assert ddp.metrics["embed/processes"] == 2 and ddp.metrics["embed/computed"] == 8
    assert {k: v for k, v in ddp.metrics.items() if k != "embed/processes"} == \
           {k: v for k, v in single.metrics.items() if k != "embed/processes"}
    # Both ranks filled the cache: a rerun in one process computes nothing.
    again = embed.embed.fn(embed_config(str(tmp_path / "ddp"), data["model"]), key="again", shards_url=data["shared"])
    assert again.metrics["embed/computed"] == 0 and again.digest == single.digest
    print(f"two-process stage: {seconds:.1f} s")


def test_a_failed_torchrun_is_an_error_with_its_last_lines(data, tmp_path, monkeypatch, caplog):
    failing = [sys.executable, "-c", "import sys; print('rank 1 WARNING disk full'); sys.exit(3)"]
    monkeypatch.setattr(launch, "torchrun_command", lambda *args: failing)
    cfg = embed_config(str(tmp_path), data["model"], nproc=2)
    with caplog.at_level(logging.INFO, logger=LOG.name), \
            pytest.raises(RuntimeError, match=r"(?s)2 processes failed \(exit 3\).*disk full.*embed.nproc=1"):
        embed.run_ranks(cfg, embed_ddp, data["shards"], str(tmp_path / "out"), LOG)
    assert [r.levelname for r in caplog.records if r.message.startswith("embed[torchrun]")] == ["WARNING"]


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for init to reap it does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


class _Interrupt(BaseException):
    """Stands for KeyboardInterrupt or a Prefect cancellation reaching the stage."""


def test_a_failing_stage_stops_torchrun_and_its_ranks(tmp_path):
    """When the stage's process fails while torchrun runs (Ctrl-C, a cancelled flow run, an error
    in the logging), the whole process group goes, the ranks torchrun started included."""
    child = tmp_path / "child.py"
    child.write_text("import subprocess, sys, time\n"
                     "rank = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
                     "print(f'rank pid {rank.pid}', flush=True)\n"
                     "time.sleep(120)\n")
    pids = []

    class Log:
        def info(self, message):
            pids.append(int(message.rsplit(" ", 1)[1]))
            raise _Interrupt

        warning = info

    start = time.perf_counter()
    with pytest.raises(_Interrupt):
        launch.run_logged([sys.executable, str(child)], dict(os.environ), Log())
    [rank] = pids
    deadline = time.monotonic() + 10
    while _alive(rank) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(rank)
    assert time.perf_counter() - start < 60


def test_torchrun_output_that_is_not_utf8_is_logged_not_fatal():
    lines = []

    class Log:
        def info(self, message):
            lines.append(message)

        warning = info

    script = "import sys; sys.stdout.buffer.write(b'rank 0 \\xff\\xfe odd bytes\\n'); print('done')"
    code, tail = launch.run_logged([sys.executable, "-c", script], dict(os.environ), Log())
    assert code == 0 and tail == ["rank 0 \ufffd\ufffd odd bytes", "done"]


def test_the_ranks_join_a_gloo_group_with_a_long_timeout_on_gpus_too(tmp_path, monkeypatch):
    """No collective moves a tensor (barriers only): gloo, whose timeout is ours, not NCCL's
    10-minute watchdog; each rank still selects its GPU."""
    calls = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.__setitem__("device", device))
    monkeypatch.setattr(embed_ddp.dist, "init_process_group", lambda **kw: calls.__setitem__("group", kw))
    monkeypatch.setattr(embed_ddp, "extract", lambda cfg, shards_url, out_url, info, log: calls.__setitem__(
        "extract", (cfg.device, info)))
    monkeypatch.setattr(embed_ddp.logging, "basicConfig", lambda **kw: None)  # keep pytest's handlers
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"device": "cuda"}))
    embed_ddp.main(["--config", str(config), "--shards", "s", "--out", "o"])
    assert calls["group"] == {"backend": "gloo", "rank": 1, "world_size": 2, "timeout": timedelta(hours=2)}
    assert calls["device"] == 1 and calls["extract"] == ("cuda", DistInfo(1, 2, 1))
    embed_ddp.main(["--config", str(config), "--shards", "s", "--out", "o", "--timeout-minutes", "30"])
    assert calls["group"]["timeout"] == timedelta(minutes=30)
