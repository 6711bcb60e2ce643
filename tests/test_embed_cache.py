"""The content-keyed embedding cache: storage.embed_cache, and the embed stage's extraction using it.

An image's embedding is keyed by (sha256 of its PNG bytes, model descriptor): a re-shard, a rerun
or another training config computes nothing new; another model computes everything.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from embed_data import embed_config, register_tiny_arch, tiny_local_dir, write_corrupt_shards
from srdiff_core import clip_embed
from srdiff_core.distributed import DistInfo
from storage import fs, tables
from storage.embed_cache import DESCRIPTOR_NAME, EmbeddingCache, model_key
from tasks import embed

LOG = logging.getLogger("test_embed_cache")
DESCRIPTOR = {"arch": "A", "weights_digest": "w1", "preprocessing": "p", "compute": "cpu-fp32", "embed_dim": "3"}


def vectors(*keys: str, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(3).astype(np.float32) for k in keys}


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert np.array_equal(a[k], b[k]), k


# ---------------------------------------------------------------- storage.embed_cache


def test_append_then_load_round_trips_under_the_model_key(tmp_path):
    cache = EmbeddingCache(str(tmp_path), DESCRIPTOR)
    assert cache.load() == {} and cache.append({}) is None
    first, second = vectors("a", "b"), vectors("c", seed=1)
    url = cache.append(first)
    assert url.startswith(fs.join(str(tmp_path), model_key(DESCRIPTOR), "part-"))
    assert cache.append(first) == url  # named by content: the same rows, the same part
    cache.append(second)
    assert len(cache.parts()) == 2
    loaded = cache.load()
    assert_same(loaded, first | second)
    loaded["a"][0] = 42.0  # writable copies
    # Another model (any descriptor field) has a folder of its own.
    other = EmbeddingCache(str(tmp_path), {**DESCRIPTOR, "weights_digest": "w2"})
    assert other.url != cache.url and other.load() == {}


def test_a_folder_of_another_model_is_refused(tmp_path):
    cache = EmbeddingCache(str(tmp_path), DESCRIPTOR)
    cache.append(vectors("a"))
    fs.atomic_write_bytes(fs.join(cache.url, DESCRIPTOR_NAME), b'{"arch": "B"}')
    with pytest.raises(ValueError, match="holds another model's embeddings.*delete that folder"):
        cache.load()


def test_compaction_keeps_every_row_in_one_part(tmp_path):
    cache = EmbeddingCache(str(tmp_path), DESCRIPTOR)
    expected = {}
    for i in range(5):
        rows = vectors(f"k{i}", f"k{i + 1}", seed=i)  # overlapping keys: the later part wins on load
        cache.append(rows)
        expected |= rows
    before = cache.load()
    assert not cache.compact(above=5)
    assert cache.compact(above=2)
    assert len(cache.parts()) == 1
    assert_same(cache.load(), before)


def test_a_part_removed_under_a_reader_is_a_miss_and_a_damaged_one_an_error(tmp_path, monkeypatch):
    cache = EmbeddingCache(str(tmp_path), DESCRIPTOR)
    kept, gone = cache.append(vectors("a")), cache.append(vectors("b", seed=1))
    listed = cache.parts()
    fs.remove(gone)  # e.g. compacted away by another process after this one listed the parts
    monkeypatch.setattr(cache, "parts", lambda: listed)
    assert sorted(cache.load()) == ["a"]
    fs.atomic_write_bytes(kept, b"not parquet")
    with pytest.raises(ValueError, match=r"part-.*\.parquet is unreadable.*delete it"):
        cache.load()


def test_the_descriptor_covers_weights_preprocessing_and_compute(tmp_path):
    encoder = clip_embed.load_clip(register_tiny_arch(tmp_path), "none", seed=0)
    descriptor = clip_embed.cache_descriptor(encoder)
    assert descriptor["weights_digest"] == encoder.weights_digest and descriptor["compute"] == "cpu-fp32"
    assert descriptor["preprocessing"].startswith(f"v{clip_embed.PREPROCESSING_VERSION}: resize (shortest, bicubic")
    other = clip_embed.load_clip(encoder.arch, "none", seed=1)
    assert model_key(clip_embed.cache_descriptor(other)) != model_key(descriptor)


# ---------------------------------------------------------------- the extraction with the cache


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two shard layouts of the same pairs (2 and 3 samples per shard), the tiny model twice."""
    root = tmp_path_factory.mktemp("cache-data")
    register_tiny_arch(root)
    return {"shards2": write_corrupt_shards(str(root), maxcount=2)[0],
            "shards3": write_corrupt_shards(str(root), maxcount=3)[0],
            "model0": tiny_local_dir(root, seed=0), "model1": tiny_local_dir(root, seed=1)}


def read_outputs(out_url: str) -> dict:
    return {name: tables.read_table(f"{out_url}/{name}.parquet")
            for name in ("lqcls", "gtcls", "embed_quarantine")}


def test_reshard_and_rerun_compute_nothing_new_and_another_model_computes_all(data, tmp_path, one_thread):
    cfg = embed_config(str(tmp_path / "root"), data["model0"])
    first = embed.extract(cfg, data["shards2"], str(tmp_path / "out-a"), DistInfo(), LOG)
    assert first["embed/computed"] == 8 and first["embed/cache_hits"] == 0  # 4 decodable pairs
    assert first["embed/quarantined"] == 2
    resharded = embed.extract(cfg, data["shards3"], str(tmp_path / "out-b"), DistInfo(), LOG)
    assert resharded["embed/computed"] == 0 and resharded["embed/cache_hits"] == 8
    a, b = read_outputs(str(tmp_path / "out-a")), read_outputs(str(tmp_path / "out-b"))
    for name in a:
        assert a[name].equals(b[name], check_metadata=True), name
    # A new training config reruns the stage on the same shards: nothing to compute either.
    assert embed.extract(cfg, data["shards2"], str(tmp_path / "out-c"), DistInfo(), LOG)["embed/computed"] == 0

    other = embed_config(str(tmp_path / "root"), data["model1"])
    changed = embed.extract(other, data["shards3"], str(tmp_path / "out-d"), DistInfo(), LOG)
    assert changed["embed/computed"] == 8 and changed["embed/cache_hits"] == 0
    assert len(fs.listdir(str(tmp_path / "root" / "cache" / "embeddings"))) == 2  # one folder per model
    d = read_outputs(str(tmp_path / "out-d"))["lqcls"]
    assert d.column("id").equals(a["lqcls"].column("id")) and not d.column("embedding").equals(
        a["lqcls"].column("embedding"))


def test_cached_vectors_equal_computed_ones_and_cache_off_writes_nothing(data, tmp_path, one_thread):
    off = embed_config(str(tmp_path / "root-off"), data["model0"], cache=False)
    counts = embed.extract(off, data["shards2"], str(tmp_path / "off"), DistInfo(), LOG)
    assert counts["embed/computed"] == 8 and not fs.exists(str(tmp_path / "root-off" / "cache"))
    on = embed_config(str(tmp_path / "root-on"), data["model0"])
    embed.extract(on, data["shards2"], str(tmp_path / "fill"), DistInfo(), LOG)  # the same batches as "off"
    assert embed.extract(on, data["shards2"], str(tmp_path / "hit"), DistInfo(), LOG)["embed/computed"] == 0
    computed, cached = read_outputs(str(tmp_path / "off")), read_outputs(str(tmp_path / "hit"))
    for name in computed:
        assert computed[name].equals(cached[name], check_metadata=True), name


def test_an_image_seen_twice_in_one_run_is_embedded_once(tmp_path):
    encoder = clip_embed.load_clip(register_tiny_arch(tmp_path), "none", seed=0)
    rng = np.random.default_rng(0)
    img = [torch.from_numpy(rng.integers(0, 256, (3, 20, 28), dtype=np.uint8)) for _ in range(3)]
    # Two samples sharing their GT (as dehazing sets do), and a third whose LQ is that GT.
    items = [{"lq": img[0], "gt": img[2], "lq_sha256": "x0", "gt_sha256": "x2"},
             {"lq": img[1], "gt": img[2], "lq_sha256": "x1", "gt_sha256": "x2"}]
    known = embed._KnownVectors({})
    lq, gt = known.embed(encoder, items)
    assert (known.computed, known.hits) == (3, 1) and sorted(known.fresh) == ["x0", "x1", "x2"]
    assert torch.equal(gt[0], gt[1])
    lq2, _ = known.embed(encoder, [{"lq": None, "gt": None, "lq_sha256": "x2", "gt_sha256": "x0"}])
    assert (known.computed, known.hits) == (3, 3) and torch.equal(lq2[0], gt[0])
