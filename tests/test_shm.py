"""tasks/shm.py: the shared-memory warning before DataLoader workers start (embed and train stages)."""

from __future__ import annotations

import logging

import pytest

from embed_data import embed_config, register_tiny_arch, write_corrupt_shards
from srdiff_core.config import Config
from srdiff_core.distributed import DistInfo
from storage import fs
from tasks import embed, shm
from tasks.train import batch_source

LOG = logging.getLogger("test_shm")
GPU_BOX_ADVICE = ("set embed.num_workers=0 (load in the main process), lower embed.batch_size, or give the "
                  "machine more shared memory (in a container: docker run --shm-size=")


@pytest.fixture(scope="module")
def shards_url(tmp_path_factory) -> str:
    """Real shards of six 20x28 pairs (the first, train/hazy/0, intact), two samples a shard."""
    return write_corrupt_shards(str(tmp_path_factory.mktemp("shm")))[0]


@pytest.fixture(scope="module")
def shard_urls(shards_url) -> list[str]:
    return embed.stage_shard_urls(shards_url)


def shm_of(monkeypatch, free: int | None) -> None:
    """This machine's /dev/shm, as the stages see it, with ``free`` bytes (None: no /dev/shm)."""
    monkeypatch.setattr(shm, "shm_free", lambda path=shm.SHM_PATH: free)


def warnings_about_shm(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "shared memory" in r.getMessage()]


def test_sizes_read_as_df_and_docker_count_them():
    assert [shm.size_text(n) for n in (1023, 1536, 64 << 20, 3 << 30)] == ["1023 B", "1.5 KiB", "64.0 MiB", "3.0 GiB"]


def test_each_worker_holds_two_batches_and_the_main_process_one():
    assert shm.shm_need(workers=2, processes=1, batch_bytes=10) == 50
    assert shm.shm_need(workers=2, processes=4, batch_bytes=10) == 200  # processes on one machine share it


def test_the_warning_names_the_figures_the_failures_and_what_to_change():
    message = shm.shm_warning(stage="embed", workers=2, processes=1, batch_bytes=40 << 20, free=64 << 20)
    assert message == (
        "embed: 2 DataLoader worker(s) may hold about 200.0 MiB of batches (40.0 MiB each) in shared memory, but "
        "/dev/shm has 64.0 MiB free. If the stage fails with \"unable to allocate shared memory\" or a worker "
        "killed by a bus error, " + GPU_BOX_ADVICE + "1g)")
    several = shm.shm_warning(stage="train", workers=4, processes=8, batch_bytes=1 << 30, free=1 << 30)
    assert several.startswith("train: 4 DataLoader worker(s) in each of 8 processes may hold about 72.0 GiB")
    assert several.endswith("--shm-size=72g)")
    exactly = shm.shm_warning(stage="embed", workers=2, processes=1, batch_bytes=10, free=50)
    assert exactly is None  # 2 workers x 2 batches + the main process's one: exactly what there is


def test_batch_sizes_of_the_two_stages(shard_urls, tmp_path):
    assert shm.largest_first_pixels(shard_urls) == 20 * 28  # from the first sample's json, no image decoded
    assert shm.largest_first_pixels([fs.join(str(tmp_path), "missing.tar"), *shard_urls]) == 20 * 28
    assert shm.largest_first_pixels([]) is None
    assert shm.embed_batch_bytes(20 * 28, 4) == 4 * 2 * 3 * 20 * 28  # uint8 LQ + GT
    assert shm.embed_batch_bytes(None, 4) is None
    assert shm.train_batch_bytes(16, 256, 512) == 16 * 4 * (2 * 3 * 256 * 256 + 512)  # float32 patches + context


def test_no_workers_or_no_dev_shm_reads_nothing(monkeypatch, caplog):
    def never():
        raise AssertionError("the batch size is looked up only when it is compared")

    for workers, free in ((0, 1), (2, None)):
        shm_of(monkeypatch, free)
        with caplog.at_level(logging.WARNING, logger=LOG.name):
            shm.warn_if_shm_short(LOG, stage="embed", workers=workers, processes=1, batch_bytes=never)
    assert not warnings_about_shm(caplog)


def test_the_embed_stage_warns_before_its_workers_start(shards_url, tmp_path, monkeypatch, caplog):
    cfg = embed_config(str(tmp_path), "none", arch=register_tiny_arch(tmp_path), num_workers=1)
    encoder = embed.clip_embed.load_clip(cfg.embed.arch, "none", seed=0)
    shm_of(monkeypatch, 1000)  # a 1000-byte /dev/shm
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        embed._embed_share(cfg, encoder, None, shards_url, DistInfo(), LOG)
        assert warnings_about_shm(caplog) == [shm.shm_warning(
            stage="embed", workers=1, processes=1, batch_bytes=2 * 2 * 3 * 20 * 28, free=1000)]
        caplog.clear()
        embed._embed_share(cfg, encoder, None, shards_url, DistInfo(rank=1, world_size=2, local_rank=1), LOG)
        assert not warnings_about_shm(caplog)  # one warning a machine: from its local rank 0


def test_the_train_stage_warns_before_its_workers_start(shard_urls, monkeypatch, caplog):
    cfg = Config.model_validate({"train": {"num_workers": 2, "batch_size": 16, "patch_size": 256}})
    train_urls = [u for u in shard_urls if "/train/" in u]
    shm_of(monkeypatch, 64 << 20)  # Docker's default /dev/shm
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        batch_source(cfg, train_urls, {}, log=LOG)
    assert warnings_about_shm(caplog) == [
        "train: 2 DataLoader worker(s) may hold about 120.2 MiB of batches (24.0 MiB each) in shared memory, but "
        "/dev/shm has 64.0 MiB free. If the stage fails with \"unable to allocate shared memory\" or a worker "
        "killed by a bus error, set train.num_workers=0 (load in the main process), lower train.batch_size, or "
        "give the machine more shared memory (in a container: docker run --shm-size=1g)"]
