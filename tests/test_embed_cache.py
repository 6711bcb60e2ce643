"""The content-keyed embedding cache: storage.embed_cache, and the embed stage's extraction using it.

An image's embedding is keyed by (sha256 of its PNG bytes, model descriptor): a re-shard, a rerun
or another training config computes nothing new; another model computes everything.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import numpy as np
import pytest
import torch

from safetensors.torch import save_file

from embed_data import embed_config, register_tiny_arch, tiny_local_dir, write_corrupt_shards
from srdiff_core import clip_embed
from srdiff_core.distributed import DistInfo
from storage import fs, tables
from tasks.advice import advised
from storage.embed_cache import BAD_SUFFIX, DESCRIPTOR_NAME, EmbeddingCache, model_key
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
    with pytest.raises(ValueError, match="holds another model's embeddings.*delete that folder"), advised():
        cache.load()


def test_compaction_folds_the_parts_into_one_with_every_row(tmp_path):
    cache = EmbeddingCache(str(tmp_path), DESCRIPTOR)
    # One vector per image, as the cache holds (the same image under the same model): parts that
    # overlap (two runs both computed k1, ...) agree on it, and the union is exactly `expected`.
    expected = vectors(*(f"k{i}" for i in range(6)))
    for i in range(5):
        cache.append({k: expected[k] for k in (f"k{i}", f"k{i + 1}")})
    assert len(cache.parts()) == 5
    assert not cache.compact(above=5) and len(cache.parts()) == 5
    assert cache.compact(above=2)
    [part] = cache.parts()
    assert_same(cache.load(), expected)
    assert tables.read_table(part).num_rows == 6  # each image once
    # Compacting the compacted part rewrites the same content under the same name: it is kept.
    assert cache.compact(above=0) and cache.parts() == [part]
    assert_same(cache.load(), expected)


def test_compaction_removes_temp_files_of_killed_writers_only(tmp_path):
    cache = EmbeddingCache(str(tmp_path), DESCRIPTOR)
    cache.append(vectors("a"))
    stale, fresh = (os.path.join(cache.url, f".part-{n}.parquet.0123456789ab.tmp") for n in ("old", "new"))
    for path in (stale, fresh):
        with open(path, "wb") as f:
            f.write(b"half a part")
    hours_ago = time.time() - 2 * 3600
    os.utime(stale, (hours_ago, hours_ago))
    assert not cache.compact()  # one part: nothing to fold, but the stale temp file goes
    assert not os.path.exists(stale) and os.path.exists(fresh)  # a live writer's file stays
    assert sorted(cache.load()) == ["a"]


def test_a_part_compacted_away_under_a_reader_is_found_in_the_merged_part(tmp_path, monkeypatch):
    cache = EmbeddingCache(str(tmp_path), DESCRIPTOR)
    kept, gone = cache.append(vectors("a")), cache.append(vectors("b", seed=1))
    stale = cache.parts()
    # Another process compacts after this one listed the parts: writes the merged part, then
    # deletes the old ones. This reader's listing still names them.
    merged = vectors("a") | vectors("b", seed=1)
    fs.remove(gone)
    cache.append(merged)
    listings = iter([stale])
    real_parts = EmbeddingCache.parts
    monkeypatch.setattr(cache, "parts", lambda: next(listings, None) or real_parts(cache))
    assert_same(cache.load(), merged)  # "b" from the merged part: one more listing, not a miss
    # A part simply gone (deleted by hand) is a miss.
    fs.remove(kept)
    for url in cache.parts():
        fs.remove(url)
    cache.append(vectors("a"))
    listings = iter([[*cache.parts(), gone]])
    assert sorted(cache.load()) == ["a"]


def test_a_damaged_part_is_set_aside_with_a_warning_and_its_rows_are_misses(tmp_path, caplog):
    cache = EmbeddingCache(str(tmp_path), DESCRIPTOR)
    good, bad = cache.append(vectors("a")), cache.append(vectors("b", seed=1))
    fs.atomic_write_bytes(bad, b"not parquet")
    with caplog.at_level(logging.WARNING, logger="storage.embed_cache"):
        assert sorted(cache.load()) == ["a"]
    assert any(f"embedding cache part {bad} is unreadable" in r.message and "misses" in r.message
               for r in caplog.records)
    assert cache.parts() == [good] and fs.exists(bad + BAD_SUFFIX)  # out of every later listing
    # Compaction leaves it aside too (it holds no rows to fold).
    cache.append(vectors("c", seed=2))
    assert cache.compact(above=1) and sorted(cache.load()) == ["a", "c"] and fs.exists(bad + BAD_SUFFIX)


@pytest.mark.parametrize("damage, why", [(b'{"arch": "A", "weigh', "JSONDecodeError"),
                                         (b"\x80\x81 garbage", "UnicodeDecodeError"),
                                         (b"[1, 2]", "a JSON list, not a descriptor")])
def test_a_damaged_model_json_sets_the_folder_aside_with_a_warning_and_all_are_misses(damage, why, tmp_path,
                                                                                     caplog):
    cache = EmbeddingCache(str(tmp_path), DESCRIPTOR)
    parts = [cache.append(vectors("a")), cache.append(vectors("b", seed=1))]
    descriptor_url = fs.join(cache.url, DESCRIPTOR_NAME)
    fs.atomic_write_bytes(descriptor_url, damage)
    with caplog.at_level(logging.WARNING, logger="storage.embed_cache"):
        assert cache.load() == {}
    [record] = caplog.records
    assert record.message.startswith(f"embedding cache {cache.url}: {DESCRIPTOR_NAME} is damaged ({why}")
    assert "2 part(s) are set aside too (*.bad)" in record.message and "counts as a miss" in record.message
    [aside] = fs.glob(fs.join(cache.url, f"{DESCRIPTOR_NAME}.*{BAD_SUFFIX}"))
    assert record.message.endswith(f"{DESCRIPTOR_NAME} renamed to {aside}") and fs.read_bytes(aside) == damage
    assert not fs.exists(descriptor_url) and cache.parts() == []
    assert all(fs.exists(part + BAD_SUFFIX) for part in parts)
    # Another rank loading while the folder is being set aside (a part not yet renamed) trusts nothing.
    fs.atomic_write_bytes(parts[0], fs.read_bytes(parts[0] + BAD_SUFFIX))
    assert EmbeddingCache(str(tmp_path), DESCRIPTOR).load() == {}
    fs.remove(parts[0])
    # The next append starts the folder afresh: a new model.json, and only the new rows.
    cache.append(vectors("c", seed=2))
    assert json.loads(fs.read_bytes(descriptor_url)) == DESCRIPTOR
    assert_same(cache.load(), vectors("c", seed=2))


def test_the_descriptor_covers_weights_quick_gelu_preprocessing_compute_and_versions(tmp_path, monkeypatch):
    encoder = clip_embed.load_clip(register_tiny_arch(tmp_path), "none", seed=0)
    descriptor = clip_embed.cache_descriptor(encoder)
    key = model_key(descriptor)
    assert descriptor["weights_digest"] == encoder.weights_digest and descriptor["compute"] == "cpu-fp32"
    assert descriptor["preprocessing"].startswith(f"v{clip_embed.PREPROCESSING_VERSION}: resize (shortest, bicubic")
    assert descriptor["quick_gelu"] == "false" and descriptor["torch"] == torch.__version__
    assert descriptor["open_clip"] == clip_embed.open_clip.__version__
    assert model_key(clip_embed.cache_descriptor(encoder)) == key  # stable

    # Weights.
    assert model_key(clip_embed.cache_descriptor(clip_embed.load_clip(encoder.arch, "none", seed=1))) != key

    # QuickGELU: the same weights file read by an architecture with QuickGELU (as OpenAI's tags set
    # it) is another model with the same weights digest.
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in encoder.model.state_dict().items()}, weights)
    gelu = clip_embed.load_clip(encoder.arch, str(weights))
    quick = clip_embed.load_clip(register_tiny_arch(tmp_path, quick_gelu=True), str(weights))
    assert (gelu.quick_gelu, quick.quick_gelu) == (False, True) and gelu.weights_digest == quick.weights_digest
    image = [torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 32, 32), dtype=np.uint8))]
    assert not torch.equal(clip_embed.embed_batch(gelu, image), clip_embed.embed_batch(quick, image))
    # Under one arch name (OpenAI's tag vs a local file of its weights) only quick_gelu tells them apart.
    as_if_same_arch = {**clip_embed.cache_descriptor(quick), "arch": gelu.arch}
    assert {**as_if_same_arch, "quick_gelu": "false"} == clip_embed.cache_descriptor(gelu)
    assert model_key(as_if_same_arch) != model_key(clip_embed.cache_descriptor(gelu))

    # Preprocessing: the resize's interpolation, the resize mode, the normalisation.
    for change in ({"interpolation": "bilinear"}, {"resize_mode": "squash"}, {"mean": (0.5, 0.5, 0.5)}):
        assert model_key(clip_embed.cache_descriptor(dataclasses.replace(encoder, **change))) != key, change

    # Compute: the device and precision ...
    monkeypatch.setattr(clip_embed.ClipEncoder, "compute", property(lambda self: "cuda-bf16"))
    assert model_key(clip_embed.cache_descriptor(encoder)) != key
    monkeypatch.undo()
    # ... and the fp32 math settings: float32_matmul_precision everywhere, TF32 on CUDA.
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        assert model_key(clip_embed.cache_descriptor(encoder)) != key
    finally:
        torch.set_float32_matmul_precision(previous)
    assert model_key(clip_embed.cache_descriptor(encoder)) == key
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        cuda = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = False
        off = clip_embed.fp32_math(cuda)
        torch.backends.cuda.matmul.allow_tf32 = True
        assert clip_embed.fp32_math(cuda) != off and "allow_tf32 True" in clip_embed.fp32_math(cuda)
        assert clip_embed.fp32_math(torch.device("cpu")) == clip_embed.fp32_math(torch.device("cpu"))
        assert "tf32" not in clip_embed.fp32_math(torch.device("cpu"))  # no churn for CPU caches
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


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


def test_an_image_twice_in_a_batch_is_embedded_once_and_in_a_later_batch_again(tmp_path):
    """Only the cache as it was before the run is looked up: an image embedded in an earlier batch
    is embedded again, so each batch is a function of its own samples (see the shared-GT test of
    tests/test_embed_ddp.py for what that buys)."""
    encoder = clip_embed.load_clip(register_tiny_arch(tmp_path), "none", seed=0)
    rng = np.random.default_rng(0)
    img = [torch.from_numpy(rng.integers(0, 256, (3, 20, 28), dtype=np.uint8)) for _ in range(3)]
    cached = clip_embed.embed_batch(encoder, [img[1]])[0].numpy()
    # Two samples sharing their GT (as dehazing sets do); the second's LQ is in the cache.
    items = [{"lq": img[0], "gt": img[2], "lq_sha256": "x0", "gt_sha256": "x2"},
             {"lq": None, "gt": img[2], "lq_sha256": "x1", "gt_sha256": "x2"}]
    known = embed._KnownVectors({"x1": cached})
    lq, gt = known.embed(encoder, items)
    assert (known.computed, known.hits) == (2, 2) and sorted(known.fresh) == ["x0", "x2"]
    assert torch.equal(gt[0], gt[1]) and np.array_equal(lq[1].numpy(), cached)
    first_x2 = known.fresh["x2"].clone()
    # A later batch with x2 (as an LQ) and x0: both go through the model again.
    lq2, gt2 = known.embed(encoder, [{"lq": img[2], "gt": img[0], "lq_sha256": "x2", "gt_sha256": "x0"}])
    assert (known.computed, known.hits) == (4, 2)
    assert torch.allclose(lq2[0], gt[0], atol=1e-6) and torch.allclose(gt2[0], lq[0], atol=1e-6)
    assert torch.equal(known.fresh["x2"], first_x2)  # the cache gets the first vector computed


def test_a_damaged_cache_part_does_not_stop_the_stage(data, tmp_path, one_thread, caplog):
    cfg = embed_config(str(tmp_path / "root"), data["model0"])
    embed.extract(cfg, data["shards2"], str(tmp_path / "first"), DistInfo(), LOG)
    [part] = fs.glob(str(tmp_path / "root" / "cache" / "embeddings" / "*" / "part-*.parquet"))
    fs.atomic_write_bytes(part, b"PAR1 torn")
    with caplog.at_level(logging.WARNING, logger="storage.embed_cache"):
        counts = embed.extract(cfg, data["shards2"], str(tmp_path / "again"), DistInfo(), LOG)
    assert counts["embed/computed"] == 8 and any("is unreadable" in r.message for r in caplog.records)
    first, again = read_outputs(str(tmp_path / "first")), read_outputs(str(tmp_path / "again"))
    for name in first:
        assert first[name].equals(again[name], check_metadata=True), name
    assert embed.extract(cfg, data["shards2"], str(tmp_path / "third"), DistInfo(), LOG)["embed/computed"] == 0


def test_a_damaged_model_json_does_not_stop_the_stage(data, tmp_path, one_thread, caplog):
    cfg = embed_config(str(tmp_path / "root"), data["model0"])
    embed.extract(cfg, data["shards2"], str(tmp_path / "first"), DistInfo(), LOG)
    [descriptor] = fs.glob(str(tmp_path / "root" / "cache" / "embeddings" / "*" / DESCRIPTOR_NAME))
    fs.atomic_write_bytes(descriptor, b"{torn")
    with caplog.at_level(logging.WARNING, logger="storage.embed_cache"):
        counts = embed.extract(cfg, data["shards2"], str(tmp_path / "again"), DistInfo(), LOG)
    assert counts["embed/computed"] == 8 and counts["embed/cache_hits"] == 0
    assert any(f"{DESCRIPTOR_NAME} is damaged" in r.message for r in caplog.records)
    first, again = read_outputs(str(tmp_path / "first")), read_outputs(str(tmp_path / "again"))
    for name in first:
        assert first[name].equals(again[name], check_metadata=True), name
    assert embed.extract(cfg, data["shards2"], str(tmp_path / "third"), DistInfo(), LOG)["embed/computed"] == 0
