"""Evaluate-stage helpers: aggregation names and the best-of-N figure's labelling."""

import math

import torch

import numpy as np

from srdiff_core.fid import frechet_distance
from tasks.evaluate import aggregate, best_of_n, fid_by_degradation, same_size_batches, selected


def test_aggregate_means_per_degradation_and_all():
    rows = [{"id": "a", "degradation": "hazy", "psnr": 20.0, "lq_psnr": 10.0, "ssim": 0.5},
            {"id": "b", "degradation": "hazy", "psnr": 30.0, "lq_psnr": 12.0, "ssim": 0.7},
            {"id": "c", "degradation": "rainy", "psnr": 40.0, "lq_psnr": 35.0, "ssim": 0.9}]
    out = aggregate(rows)
    assert out["eval/hazy/psnr"] == 25.0 and out["eval/hazy/lq_psnr"] == 11.0
    assert out["eval/hazy/images"] == 2.0 and out["eval/rainy/images"] == 1.0
    assert out["eval/all/psnr"] == 30.0 and math.isclose(out["eval/all/ssim"], 0.7)
    assert "eval/hazy/lpips" not in out  # absent metrics stay absent, never zero


def test_best_of_n_is_its_own_oracle_figure():
    gt = torch.full((1, 3, 12, 12), 0.5)
    samples = [gt + 0.2, gt + 0.05, gt + 0.1]  # seeds 0, 1, 2
    out = best_of_n(samples, gt, border=0)
    assert list(out) == ["psnr_best_of_3"]
    best_error = round(0.55 * 255) / 255 - 0.5  # the seed-1 sample, rounded to 8 bits before scoring
    assert math.isclose(out["psnr_best_of_3"], -20 * math.log10(best_error), rel_tol=1e-6)
    rows = [{"id": "a", "degradation": "hazy", "psnr": 13.98, **out}]
    agg = aggregate(rows)
    assert agg["eval/hazy/psnr"] == 13.98  # the headline stays the first sample
    assert agg["eval/hazy/psnr_best_of_3"] == out["psnr_best_of_3"]


def test_batches_hold_one_image_size_and_max_images_caps_each_degradation():
    ex = lambda i, deg, h: {"id": str(i), "degradation": deg, "lq": torch.zeros(3, h, 8)}  # noqa: E731
    items = [ex(0, "hazy", 8), ex(1, "hazy", 8), ex(2, "hazy", 8), ex(3, "rainy", 8), ex(4, "rainy", 6),
             ex(5, "rainy", 6)]
    batches = [[e["id"] for e in b] for b in same_size_batches(items, batch_size=3)]
    assert batches == [["0", "1", "2"], ["3"], ["4", "5"]]
    assert [e["id"] for e in selected(items, max_images=2)] == ["0", "1", "3", "4"]


def test_fid_per_degradation_and_over_all_images():
    rng = np.random.default_rng(0)
    f = lambda n, loc: [row[None] for row in rng.normal(loc, 1.0, size=(n, 4))]  # noqa: E731
    features = {"hazy": {"restored": f(5, 0.0), "lq": f(5, 2.0), "gt": f(5, 0.1)},
                "rainy": {"restored": f(1, 0.0), "lq": f(1, 0.0), "gt": f(1, 0.0)}}  # one image: no FID
    out = fid_by_degradation(features, frechet_distance)
    hazy = features["hazy"]
    assert out["eval/hazy/fid"] == frechet_distance(np.concatenate(hazy["restored"]), np.concatenate(hazy["gt"]))
    assert out["eval/hazy/lq_fid"] > out["eval/hazy/fid"]
    assert "eval/rainy/fid" not in out and "eval/all/fid" in out
