"""`make demo`'s configuration end to end: the trained model restores (issue #13).

Deterministic on one machine: the demo set, the training and the sampler are seeded. The "all"
row must beat the untouched input on PSNR, and so must the three degradations the recipe lifts
(bench/results/demo-recipe.md); motion blur is not asserted: at this budget the model lowers it.
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
    assert m["eval/all/psnr"] > m["eval/all/lq_psnr"], m
    for degradation in ("hazy", "rainy", "low-light"):
        assert m[f"eval/{degradation}/psnr"] > m[f"eval/{degradation}/lq_psnr"], (degradation, m)
