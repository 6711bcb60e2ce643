"""bench/demo_patches.py: each exploratory patch does what its row in demo-recipe.md says, and undoes itself."""

import numpy as np
import pytest
import torch

from srdiff_core import data, degradations
from srdiff_core.restorer import Restorer


@pytest.fixture(scope="module")
def bench(load_bench):
    return load_bench("demo_patches")


class Loader:
    """Stands in for a PairDataset: ``augment`` marks the training loader."""

    def __init__(self, augment: bool):
        self.augment = augment


def prepare(self, raw, rng):
    lq = torch.full((3, 2, 2), 0.5)
    return {"id": raw["id"], "degradation": raw["degradation"], "lq": lq, "gt": lq + 0.25}


def test_exposure_darkens_both_images_by_one_gain(bench):
    patched = bench.with_exposure(prepare, 0.3, skip=frozenset({"low-light"}))
    out = patched(Loader(True), {"id": "a", "degradation": "hazy"}, np.random.default_rng(0))
    gain = np.random.default_rng(0).uniform(0.3, 1.0)
    torch.testing.assert_close(out["lq"], torch.full((3, 2, 2), 0.5 * gain))
    torch.testing.assert_close(out["gt"], torch.full((3, 2, 2), 0.75 * gain))
    for loader, degradation in ((Loader(True), "low-light"), (Loader(False), "hazy")):  # skipped; evaluation
        out = patched(loader, {"id": "a", "degradation": degradation}, np.random.default_rng(0))
        assert float(out["lq"].max()) == 0.5 and float(out["gt"].max()) == 0.75
    with pytest.raises(SystemExit, match="exposure=0"):
        bench.with_exposure(prepare, 0.0)


def test_clean_pairs_replace_training_lq_by_gt(bench):
    raw = {"id": "a", "degradation": "rainy"}
    every = bench.with_clean_pairs(prepare, 1.0)
    torch.testing.assert_close(every(Loader(True), raw, None)["lq"], torch.full((3, 2, 2), 0.75))
    assert float(every(Loader(False), raw, None)["lq"].max()) == 0.5  # never at evaluation
    assert float(bench.with_clean_pairs(prepare, 0.0)(Loader(True), raw, None)["lq"].max()) == 0.5


def test_oracle_context_is_the_degradation_one_hot(bench):
    patched = bench.with_oracle_context(lambda self, sample_id: torch.ones(8))
    np.testing.assert_array_equal(patched(None, "motion-blurry-val-rocket-0001").numpy(), [0, 0, 1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(patched(None, "hazy-train-coffee-0003").numpy(), [1, 0, 0, 0, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="degradation name"):
        patched(None, "snowy-train-0001")


def test_self_ensemble_undoes_each_transform(bench):
    lq = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    seen = []

    def restore(self, x, context, **kwargs):
        seen.append(x)
        return 2 * x  # equivariant: every transformed output turns back into 2 * lq

    out = bench.with_self_ensemble(restore)(None, lq, torch.zeros(2, 5), steps=1)
    torch.testing.assert_close(out, 2 * lq)
    assert len({tuple(x.flatten().tolist()) for x in seen}) == 8  # the 8 symmetries, all distinct here


def test_applied_patches_are_undone(bench):
    originals = (data.PairDataset.prepare, data.PairDataset.context, Restorer.restore,
                 degradations.DEGRADATIONS["motion-blurry"])
    patches = bench.parse(["clean=0.25", "exposure=0.3", "exposure-skip=low-light", "oracle", "self-ensemble",
                           'blur={"angle_range": [-15, 15]}'])
    with bench.applied(patches):
        assert data.PairDataset.prepare is not originals[0] and Restorer.restore is not originals[2]
        blur = degradations.DEGRADATIONS["motion-blurry"]
        assert blur.keywords == {"angle_range": (-15, 15)}
    assert (data.PairDataset.prepare, data.PairDataset.context, Restorer.restore,
            degradations.DEGRADATIONS["motion-blurry"]) == originals


def test_bad_patch_names_and_orphan_options_are_refused(bench):
    with pytest.raises(SystemExit, match="unknown patch 'gn1'"):
        bench.parse(["gn1"])
    with pytest.raises(SystemExit, match="needs exposure"):
        with bench.applied({"exposure-skip": "low-light"}):
            pass
