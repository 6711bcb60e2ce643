"""bench/colour_offset.py: the offset it removes is each channel's mean difference from GT."""

import math

import numpy as np
import pytest


@pytest.fixture(scope="module")
def bench(load_bench):
    return load_bench("colour_offset")


def test_a_pure_colour_offset_is_all_it_removes(bench):
    rng = np.random.default_rng(0)
    gt = rng.integers(40, 200, size=(16, 16, 3), dtype=np.uint8)
    restored = (gt.astype(np.int16) + np.array([10, -5, 0])).astype(np.uint8)
    lq = gt.copy()
    lq[8, 8, 0] += 1  # inside the 4 px border crop: one level off in one channel of one pixel
    r = bench.offset_scores(lq, restored, gt, border=4)
    assert (r["offset_r"], r["offset_g"], r["offset_b"]) == pytest.approx((10.0, -5.0, 0.0))
    assert r["offset_removed"] > 200  # equal to GT up to float rounding
    assert r["restored"] == pytest.approx(10 * math.log10(255 ** 2 / ((100 + 25) / 3)))
    assert r["input"] == pytest.approx(10 * math.log10(255 ** 2 / (1 / (8 * 8 * 3))))


def test_the_border_is_left_out_of_the_offset(bench):
    gt = np.full((12, 12, 3), 100, np.uint8)
    restored = gt.copy()
    restored[:2] = 200  # only inside the border
    r = bench.offset_scores(gt, restored, gt, border=2)
    assert r["offset_r"] == 0.0 and math.isinf(r["restored"])
