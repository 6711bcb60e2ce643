"""tasks/shm.py: the shared-memory warning before DataLoader workers start (embed and train stages)."""

from __future__ import annotations

import logging

import pytest

from embed_data import register_tiny_arch, write_corrupt_shards
from srdiff_core import clip_embed
from srdiff_core.config import Config
from storage import shards
from tasks import embed, shm
from tasks.train import batch_source

LOG = logging.getLogger("test_shm")


@pytest.fixture(scope="module")
def shard_urls(tmp_path_factory) -> list[str]:
    """Real shards of six 20x28 pairs (the first, train/hazy/0, intact), two samples a shard."""
    out, _ = write_corrupt_shards(str(tmp_path_factory.mktemp("shm")))
    return [u for split in embed.SPLITS for u in shards.shard_urls(out, split=split)]


def test_sizes_read_as_people_write_them():
    assert [shm.size_text(n) for n in (1023, 1536, 64 << 20, 3 << 30)] == ["1023 B", "1.5 kB", "64.0 MB", "3.0 GB"]


def test_the_warning_names_the_figures_and_the_stage_s_settings():
    message = shm.shm_warning(stage="embed", workers=2, batch_bytes=40 << 20, free=64 << 20,
                              settings="embed.num_workers / embed.batch_size")
    assert message == (
        "embed: 2 DataLoader worker(s) may hold up to 4 batches of about 40.0 MB in shared memory (160.0 MB), "
        "but /dev/shm has 64.0 MB free. If a worker dies with a bus error, set embed.num_workers=0 (load in the "
        "main process), lower embed.batch_size, or give the machine more shared memory (in a container: "
        "docker run --shm-size=...)")


@pytest.mark.parametrize("workers, batch_bytes, free", [
    (2, 16 << 20, 64 << 20),  # 4 batches of 16 MB: exactly what there is
    (0, 1 << 30, 1),          # no workers: the main process loads, nothing is shared
    (2, None, 1),             # batch size unknown
    (2, 1 << 30, None),       # no /dev/shm on this system
])
def test_no_warning_when_the_batches_fit_or_nothing_is_known(workers, batch_bytes, free):
    assert shm.shm_warning(stage="train", workers=workers, batch_bytes=batch_bytes, free=free,
                           settings="train.num_workers / train.batch_size") is None


def test_batch_sizes_of_the_two_stages(shard_urls, tmp_path):
    assert shm.embed_batch_bytes(shard_urls, 4) == 4 * 2 * 3 * 20 * 28  # uint8 LQ + GT at the first pair's size
    assert shm.embed_batch_bytes([], 4) is None
    assert shm.embed_batch_bytes([str(tmp_path / "missing.tar")], 4) is None
    assert shm.train_batch_bytes(16, 256, 512) == 16 * 4 * (2 * 3 * 256 * 256 + 512)  # float32 patches + context


def test_the_embed_stage_warns_before_its_workers_start(shard_urls, tmp_path, monkeypatch, caplog):
    encoder = clip_embed.load_clip(register_tiny_arch(tmp_path), "none", seed=0)
    monkeypatch.setattr(shm, "shm_free", lambda path=shm.SHM_PATH: 1000)  # a 1000-byte /dev/shm
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        embed.embed_shards(encoder, shard_urls, batch_size=2, num_workers=1, log=LOG)
        warned = [r.getMessage() for r in caplog.records if "shared memory" in r.getMessage()]
        assert len(warned) == 1 and warned[0].startswith(
            "embed: 1 DataLoader worker(s) may hold up to 2 batches of about 6.6 kB in shared memory (13.1 kB)")
        caplog.clear()
        embed.embed_shards(encoder, shard_urls, batch_size=2, num_workers=0, log=LOG)  # no workers: no warning
        assert not [r for r in caplog.records if "shared memory" in r.getMessage()]


def test_the_train_stage_warns_before_its_workers_start(shard_urls, monkeypatch, caplog):
    cfg = Config.model_validate({"train": {"num_workers": 2, "batch_size": 16, "patch_size": 256}})
    train_urls = [u for u in shard_urls if "/train/" in u]
    monkeypatch.setattr(shm, "shm_free", lambda path=shm.SHM_PATH: 64 << 20)  # Docker's default /dev/shm
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        batch_source(cfg, train_urls, {}, log=LOG)
    warned = [r.getMessage() for r in caplog.records if "shared memory" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith(
        "train: 2 DataLoader worker(s) may hold up to 4 batches of about 24.0 MB in shared memory (96.1 MB), "
        "but /dev/shm has 64.0 MB free. If a worker dies with a bus error, set train.num_workers=0")
