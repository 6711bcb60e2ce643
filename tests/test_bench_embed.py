"""bench/embed.py runs on the CPU at toy size: the same code paths the default run times."""

import json
import math

import numpy as np
import pytest

MEASUREMENTS = ["model-only", "decode-only", "end-to-end", "naive"]


def test_embed_bench_toy_run_writes_json_and_prints_the_table_last(tmp_path, capsys, load_bench):
    bench = load_bench("embed")
    results = bench.main(["--toy", "--out", str(tmp_path / "embed.json")])
    saved = json.loads((tmp_path / "embed.json").read_text())
    assert saved["rows"] == results["rows"] and list(results["rows"]) == MEASUREMENTS
    assert (results["images"], results["precision"], results["shards"]) == (8, "fp32", 2)
    for name, row in results["rows"].items():
        assert math.isfinite(row["img_per_s"]) and row["img_per_s"] > 0, name
        assert row["img_per_s"] * row["seconds"] == pytest.approx(8), name
    rates = {name: row["img_per_s"] for name, row in results["rows"].items()}
    assert results["ratios"]["end_to_end_vs_bound"] == rates["end-to-end"] / min(rates["model-only"],
                                                                                 rates["decode-only"])
    assert results["ratios"]["end_to_end_vs_naive"] == rates["end-to-end"] / rates["naive"]
    out = capsys.readouterr().out.rstrip().splitlines()
    assert out[-2].startswith("end-to-end / min(model-only, decode-only) = ")
    assert out[-1].startswith("end-to-end / naive") and "(target >= 10:" in out[-1]


def test_synthetic_images_are_deterministic_and_compress_like_photos(load_bench):
    bench = load_bench("embed")
    a = bench.synthetic_image(np.random.default_rng(0), (400, 600))
    b = bench.synthetic_image(np.random.default_rng(0), (400, 600))
    assert a.shape == (400, 600, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    # Between a flat image (~1 kB) and pure noise (~720 kB): a PNG size in the range of real photos.
    assert 100_000 < len(bench.png_bytes(a)) < 700_000
