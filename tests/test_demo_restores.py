"""`make demo`'s configuration end to end: the trained model restores (issue #13).

Deterministic on one machine: the demo set, the training and the sampler are seeded. The "all"
row must gain at least 1 dB over the untouched input, and hazy, rainy and low light must beat
their inputs on PSNR and SSIM (bench/results/demo-recipe.md; rainy SSIM by the smallest margin,
0.324 against 0.320 on the development machine). Motion blur is not asserted: at this budget the
model still lowers it (docs/demo.md says why).
"""

from pathlib import Path

import pytest

from flows.pipeline import srdiff

DEMO = str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
pytestmark = pytest.mark.slow


def test_the_demo_model_beats_its_input(tmp_path, prefect_harness):
    summary = srdiff(config_path=DEMO, overrides=[f"data_root={tmp_path}"])
    m = summary["stages"]["evaluate"]["metrics"]
    assert m["eval/all/images"] == 24
    assert m["eval/all/psnr"] >= m["eval/all/lq_psnr"] + 1.0, m
    assert m["eval/all/ssim"] > m["eval/all/lq_ssim"], m
    for degradation in ("hazy", "rainy", "low-light"):
        for metric in ("psnr", "ssim"):
            assert m[f"eval/{degradation}/{metric}"] > m[f"eval/{degradation}/lq_{metric}"], (degradation, metric, m)
