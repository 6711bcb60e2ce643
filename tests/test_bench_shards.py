"""bench/shards.py at toy size: the same code paths as the real shard-stage benchmark."""

import json
import math

from storage import fs, shards


def test_shards_bench_toy_run_writes_json_and_valid_shards(tmp_path, capsys, load_bench):
    bench = load_bench("shards")
    out = tmp_path / "shards.json"
    results = bench.main(["--toy", "--out", str(out), "--workdir", str(tmp_path / "work")])

    saved = json.loads(out.read_text())
    assert saved["write"].keys() == saved["memory"].keys() == {"40", "80"}
    assert saved["read"]["rows"].keys() == saved["read"]["train_rows"].keys() == {"0", "1"}
    for pairs, write in saved["write"].items():
        assert write["rows"].keys() == {"ours", "ours+check", "tar", "tar+fsync"}
        for name, row in write["rows"].items():
            for key in ("mb_per_s", "pairs_per_s"):
                assert math.isfinite(row[key]) and row[key] > 0, (pairs, name, key)
            assert row["cpu_seconds"] >= 0 and len(row["all_seconds"]) == 1, (pairs, name)
        assert write["rows"]["ours"]["cpu_seconds"] > 0
        assert write["payload_bytes"] > 0 and math.isfinite(write["ratio_vs_tar"])
        assert math.isfinite(write["ratio_vs_tar_by_round"]) and write["ratio_vs_tar_by_round"] > 0
    for pairs, row in saved["memory"].items():
        assert row["pairs"] == int(pairs)
        assert 0 < row["after_import_mib"] <= row["peak_mib"], pairs
        assert math.isfinite(row["manifest_mib"]) and 0 < row["writer_mib"] < row["peak_mib"], pairs
        assert isinstance(row["peak_reset"], bool), pairs
    for workers, row in saved["read"]["rows"].items():
        assert row["pairs"] == 80, workers  # exact mode: every pair once
        assert math.isfinite(row["pairs_per_s"]) and row["pairs_per_s"] > 0, workers
    for workers, row in saved["read"]["train_rows"].items():  # whole batches until 80 pairs
        assert 80 <= row["pairs"] < 80 + saved["read"]["batch_size"] and row["pairs_per_s"] > 0, workers
    # The memory target is the writer's own share (imports and the manifest excluded), which
    # would show a writer that grows with the dataset; the whole-process ratio is reported too.
    own = [saved["memory"][p]["writer_mib"] for p in ("40", "80")]
    assert saved["targets"]["memory_ratio"] == own[1] / own[0]
    assert saved["targets"]["process_memory_ratio"] > 0
    assert saved["targets"].keys() == results["targets"].keys()

    # The benchmark timed real shards: 40 and 80 pairs in 4 degradation groups each.
    for pairs, url in saved["shards"].items():
        shards.verify_shards(url, workers=1)
        index = shards.read_index(url)
        assert sum(index.column("count").to_pylist()) == int(pairs)
        assert sorted(set(index.column("degradation").to_pylist())) == \
            ["hazy", "low-light", "motion-blurry", "rainy"]

    printed = capsys.readouterr().out
    assert "tar -cf" in printed and printed.rstrip().endswith('checks: {"shards_verified": true}')


def test_synthetic_pairs_are_deterministic_and_the_manifest_hashes_their_bytes(tmp_path, load_bench):
    bench = load_bench("shards")
    a = bench.generate_pairs(tmp_path / "a", 5, 24)
    b = bench.generate_pairs(tmp_path / "b", 5, 24)
    assert a.column("lq_sha256").to_pylist() == b.column("lq_sha256").to_pylist()
    assert a.column("id").to_pylist() == ["hazy-000000", "rainy-000001", "motion-blurry-000002",
                                          "low-light-000003", "hazy-000004"]
    row = a.to_pylist()[2]
    assert row["lq_path"].endswith("train/motion-blurry/LQ/motion-blurry-000002.png")
    assert row["dataset"] == "GoPro" and (row["width"], row["height"]) == (24, 24)
    assert fs.sha256_file(row["lq_path"]) == row["lq_sha256"]
    assert fs.sha256_file(row["gt_path"]) == row["gt_sha256"]
    lq, gt = bench.pair_arrays(2, 24)
    assert lq.shape == gt.shape == (24, 24, 3) and lq.dtype == gt.dtype
    assert not (lq == gt).all()  # LQ is a degraded GT, not a copy
