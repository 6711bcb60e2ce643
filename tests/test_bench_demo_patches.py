"""bench/demo_patches.py: each exploratory patch does what its row in demo-recipe.md says, and undoes itself."""

import numpy as np
import pytest
import torch

from srdiff_core import data, degradations
from srdiff_core.restorer import Restorer
from srdiff_core.unet import ConditionalUNet


def tiny_unet() -> ConditionalUNet:
    return ConditionalUNet(nf=8, ch_mult=(1, 2), num_res_blocks=1, context_dim=6, attn_heads=2, norm_groups=1)


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


def test_context_time_starts_as_the_unpatched_unet_then_reads_the_context(bench):
    x, context = torch.rand(2, 3, 8, 8), torch.randn(2, 6)
    plain = tiny_unet()
    for p in plain.parameters():  # the zero-initialised output conv would hide every difference
        p.data.add_(0.1 * torch.randn_like(p))
    expected = plain(x, x, 3, context)
    with bench.applied({"context-time": ""}):
        patched = tiny_unet()
        assert isinstance(patched.time_mlp, bench.TimeWithContext)
        weights = {k.replace("time_mlp.", "time_mlp.time_mlp.", 1): v for k, v in plain.state_dict().items()}
        missing = patched.load_state_dict(weights, strict=False).missing_keys
        assert missing and all(k.startswith("time_mlp.context_mlp.") for k in missing)
        torch.testing.assert_close(patched(x, x, 3, context), expected)  # zero MLP: no change
        torch.testing.assert_close(patched.time_mlp.context, patched.context_norm(context))
        torch.nn.init.normal_(patched.time_mlp.context_mlp[-1].weight)
        assert not torch.allclose(patched(x, x, 3, context), expected)
        # The time path itself reads the context (cross-attention alone would also move the output).
        emb = torch.randn(2, patched.nf)
        patched.time_mlp.context = patched.context_norm(context)
        with_context = patched.time_mlp(emb)
        patched.time_mlp.context = patched.context_norm(-context)
        assert not torch.allclose(with_context, patched.time_mlp(emb))
        torch.testing.assert_close(with_context - plain.time_mlp(emb),
                                   patched.time_mlp.context_mlp(patched.context_norm(context)))


def test_lqcls_time_splits_the_context_between_the_two_paths(bench):
    restore, lq = torch.randn(2, 6), torch.randn(2, 6)
    with bench.applied({"context-time": "", "lqcls-time": ""}):
        unet = tiny_unet()
        tokens = unet.context_tokens(torch.cat([restore, lq], dim=1), 2)
        torch.testing.assert_close(tokens, unet.context_norm(restore)[:, None])  # cross-attention: RestoreCLS
        torch.testing.assert_close(unet.time_mlp.context, unet.context_norm(lq))  # time path: LQCLS


def test_lqcls_reader_appends_the_lq_vector_of_each_sample(bench):
    tables = {"e/restorecls.parquet": {"a": np.ones(2, np.float32)}, "e/lqcls.parquet": {"a": np.zeros(2, np.float32)}}
    read = bench.with_lqcls(tables.__getitem__)
    np.testing.assert_array_equal(read("e/restorecls.parquet")["a"], [1, 1, 0, 0])
    with pytest.raises(ValueError, match="restorecls.parquet"):
        read("e/lqcls.parquet")


def test_applied_patches_are_undone(bench):
    import tasks.evaluate
    import tasks.train

    originals = (data.PairDataset.prepare, data.PairDataset.context, Restorer.restore,
                 degradations.DEGRADATIONS["motion-blurry"], ConditionalUNet.__init__,
                 ConditionalUNet.context_tokens, tasks.train.read_embeddings, tasks.evaluate.read_embeddings)
    patches = bench.parse(["clean=0.25", "exposure=0.3", "exposure-skip=low-light", "self-ensemble",
                           "context-time", "lqcls-time", 'blur={"angle_range": [-15, 15]}'])
    with bench.applied(patches):
        assert data.PairDataset.prepare is not originals[0] and Restorer.restore is not originals[2]
        blur = degradations.DEGRADATIONS["motion-blurry"]
        assert blur.keywords == {"angle_range": (-15, 15)}
        assert tasks.train.read_embeddings is not originals[6]
    with bench.applied(bench.parse(["oracle"])):
        assert data.PairDataset.context is not originals[1]
    assert (data.PairDataset.prepare, data.PairDataset.context, Restorer.restore,
            degradations.DEGRADATIONS["motion-blurry"], ConditionalUNet.__init__,
            ConditionalUNet.context_tokens, tasks.train.read_embeddings, tasks.evaluate.read_embeddings) == originals


def test_bad_patch_names_and_orphan_options_are_refused(bench):
    with pytest.raises(SystemExit, match="unknown patch 'gn1'"):
        bench.parse(["gn1"])
    with pytest.raises(SystemExit, match="needs exposure"):
        with bench.applied({"exposure-skip": "low-light"}):
            pass
    for patches in ({"lqcls-time": ""}, {"lqcls-time": "", "context-time": "", "oracle": ""}):
        with pytest.raises(SystemExit, match="lqcls-time needs context-time"):
            with bench.applied(patches):
                pass
