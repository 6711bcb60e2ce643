"""`make demo`'s own config end to end: the trained model restores every degradation.

Not a timing test: the demo's recipe (configs/demo.yaml, chosen on held-out train images, see
bench/results/demo-recipe.md) is run as `srdiff demo` runs it, on fixed seeds, and its val
table must beat the untouched input everywhere, "all" by at least 1 dB PSNR.
"""

from pathlib import Path

import pytest

from flows.pipeline import srdiff
from srdiff_core.config import DEGRADATIONS

DEMO = str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
pytestmark = pytest.mark.slow


def test_the_demo_beats_its_input_on_every_degradation(tmp_path, prefect_harness):
    summary = srdiff(config_path=DEMO, overrides=[f"data_root={tmp_path}", "evaluate.lpips=false", "evaluate.fid=false"])
    m = summary["stages"]["evaluate"]["metrics"]
    for degradation in (*DEGRADATIONS, "all"):
        row = {k: m[f"eval/{degradation}/{k}"] for k in ("psnr", "lq_psnr", "ssim", "lq_ssim")}
        assert row["psnr"] > row["lq_psnr"], (degradation, row)
        assert row["ssim"] > row["lq_ssim"], (degradation, row)
    assert m["eval/all/psnr"] >= m["eval/all/lq_psnr"] + 1.0, m
