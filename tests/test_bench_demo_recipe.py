"""bench/demo_recipe.py's held-out folders: what it trains on and what it scores, never the demo's val."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from srdiff_core import demo_data
from srdiff_core.config import DEGRADATIONS


@pytest.fixture(scope="module")
def bench(load_bench):
    return load_bench("demo_recipe")


def pngs(root: Path, split: str, degradation: str, side: str) -> dict[str, np.ndarray]:
    folder = root / "datasets" / split / degradation / side
    return {p.stem: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def test_holdout_seeds_score_other_seeds_val_pairs(bench, tmp_path):
    bench.write_holdout_root(tmp_path, holdout=2, train_pairs=1, holdout_seeds=[1, 2])
    for degradation in DEGRADATIONS:
        train = pngs(tmp_path, "train", degradation, "LQ")
        assert list(train) == [demo_data.make_demo_pair(seed=0, degradation=degradation, split="train", index=0,
                                                        crop_size=96).id]
        val = pngs(tmp_path, "val", degradation, "LQ")
        assert len(val) == 4  # 2 pairs from each seed's val split
        for seed in (1, 2):
            for index in range(2):
                pair = demo_data.make_demo_pair(seed=seed, degradation=degradation, split="val", index=index,
                                                crop_size=96)
                np.testing.assert_array_equal(val[f"{pair.id}-seed{seed}"], pair.lq)
        demo_val = {demo_data.make_demo_pair(seed=0, degradation=degradation, split="val", index=i,
                                             crop_size=96).lq.tobytes() for i in range(6)}
        assert not demo_val & {image.tobytes() for image in val.values()}


def test_default_holdout_is_train_pairs_after_the_demos_own(bench, tmp_path):
    bench.write_holdout_root(tmp_path, holdout=1, train_pairs=2)
    pair = demo_data.make_demo_pair(seed=0, degradation="hazy", split="train", index=32, crop_size=96)
    assert list(pngs(tmp_path, "val", "hazy", "GT")) == [pair.id]
    assert len(pngs(tmp_path, "train", "hazy", "GT")) == 2


def test_the_demos_own_seed_is_refused(bench, tmp_path):
    with pytest.raises(SystemExit, match="evaluation set"):
        bench.write_holdout_root(tmp_path, holdout=1, train_pairs=1, holdout_seeds=[3, 0])
