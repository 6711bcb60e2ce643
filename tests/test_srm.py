"""Semantic Refinement Module: loss, schedule, and training on pairs with a known LQ -> GT map."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from srdiff_core.config import SRMConfig
from srdiff_core.srm import (
    SemanticRefinementModule,
    cosine,
    refine,
    split_holdout,
    srm_loss,
    stratified_holdout,
    train_srm,
    warmup_cosine_factor,
)

DIM = 16


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def known_mapping_pairs(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """LQ = random unit vectors; GT = normalize(A @ LQ + b) with A a fixed random matrix near
    the identity: a degradation that shifts every embedding the same learnable way."""
    g = torch.Generator().manual_seed(seed)
    a = torch.eye(DIM) + 0.5 * torch.randn(DIM, DIM, generator=torch.Generator().manual_seed(99)) / math.sqrt(DIM)
    b = 0.3 * torch.randn(DIM, generator=torch.Generator().manual_seed(98)) / math.sqrt(DIM)
    lq = F.normalize(torch.randn(n, DIM, generator=g), dim=-1)
    return lq, F.normalize(lq @ a.T + b, dim=-1)


def small_cfg(**overrides) -> SRMConfig:
    values = dict(hidden=64, depth=1, epochs=25, batch_size=64, lr=3e-3, weight_decay=1e-4,
                  warmup_epochs=2, patience=40, val_fraction=0.2, seed=0)
    return SRMConfig(**(values | overrides))


def test_srm_loss_pinned_values():
    # L1 = mean |diff| = 0.25; cos = (1, 1/sqrt 2) -> mean(1 - cos) = (1 - 1/sqrt 2) / 2.
    pred = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    target = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    expected = 0.7 * 0.25 + 0.3 * (1 - 1 / math.sqrt(2)) / 2
    assert srm_loss(pred, target).item() == pytest.approx(expected, abs=1e-7)
    assert srm_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])).item() == pytest.approx(1.0)
    assert torch.allclose(cosine(pred, target), torch.tensor([1.0, 1 / math.sqrt(2)]))


def test_warmup_then_cosine_schedule_pinned_values():
    factors = [warmup_cosine_factor(s, warmup_steps=4, total_steps=12) for s in range(13)]
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert factors[4] == pytest.approx(1.0)  # the cosine starts at its top
    assert factors[8] == pytest.approx(0.5)  # half-way through the 8 decay steps
    assert factors[12] == pytest.approx(0.0)
    assert all(x >= y for x, y in zip(factors[3:], factors[4:]))


def test_untrained_module_is_the_normalised_identity():
    # Zero-initialised residual branches + identity projection: the SRM starts as x -> x/|x|.
    model = SemanticRefinementModule(DIM, hidden=32, depth=3)
    x = torch.randn(5, DIM)
    assert torch.allclose(model(x), F.normalize(x, dim=-1), atol=1e-6)


def test_from_config_uses_hidden_and_depth():
    model = SemanticRefinementModule.from_config(DIM, small_cfg(hidden=48, depth=3))
    assert len(model.blocks) == 3 and model.blocks[0].fc_in.out_features == 48


def test_split_holdout_is_seeded_disjoint_and_complete():
    train, val = split_holdout(50, 0.2, seed=3)
    assert len(val) == 10 and len(train) == 40
    assert sorted(torch.cat([train, val]).tolist()) == list(range(50))
    assert torch.equal(split_holdout(50, 0.2, seed=3)[1], val)
    assert not torch.equal(split_holdout(50, 0.2, seed=4)[1], val)
    assert len(split_holdout(50, 0.0, seed=3)[1]) == 0


def test_stratified_holdout_takes_rows_of_every_group_seeded_and_per_group():
    groups = ["hazy"] * 20 + ["rainy"] * 3 + ["low-light"] + ["motion-blurry"] * 2
    train, val = stratified_holdout(groups, 0.1, seed=7)
    assert sorted(torch.cat([train, val]).tolist()) == list(range(len(groups)))
    held = [groups[i] for i in val.tolist()]
    # round(10% of n), at least one of a group of two or more; a group of one stays in training
    assert {g: held.count(g) for g in set(held)} == {"hazy": 2, "rainy": 1, "motion-blurry": 1}
    assert torch.equal(stratified_holdout(groups, 0.1, seed=7)[1], val)
    assert not torch.equal(stratified_holdout(groups, 0.1, seed=8)[1], val)
    # a group's rows are drawn with a seed of its own: dropping another group does not move them
    hazy_only = stratified_holdout(groups[:20], 0.1, seed=7)[1]
    assert hazy_only.tolist() == [i for i in val.tolist() if groups[i] == "hazy"]
    assert len(stratified_holdout(groups, 0.0, seed=7)[1]) == 0
    assert [len(t) for t in stratified_holdout([], 0.1, seed=7)] == [0, 0]


def test_training_improves_held_out_cosine_and_lowers_the_loss():
    lq, gt = known_mapping_pairs(320)
    logged: list[tuple[int, dict]] = []
    result = train_srm(lq, gt, small_cfg(), log_fn=lambda epoch, m: logged.append((epoch, m)))
    assert result.val_cos_before == pytest.approx(cosine(*[t[split_holdout(320, 0.2, 0)[1]] for t in (lq, gt)]).mean().item())
    assert result.val_cos_before < 0.95
    assert result.val_cos_after > 0.99
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < 0.2 * losses[0]
    assert [epoch for epoch, _ in logged] == list(range(1, len(result.history) + 1))
    assert [m for _, m in logged] == result.history
    # The returned weights are the best epoch's: their validation cosine is the one logged there.
    best = result.history[result.best_epoch - 1]
    assert best["val_loss"] == min(h["val_loss"] for h in result.history)
    assert result.val_cos_after == pytest.approx(best["val_cos"], abs=1e-6)


def test_training_generalises_to_explicit_validation_pairs():
    lq, gt = known_mapping_pairs(256, seed=0)
    val_lq, val_gt = known_mapping_pairs(64, seed=1)
    result = train_srm(lq, gt, small_cfg(epochs=20), val_lq=val_lq, val_gt=val_gt)
    refined = refine(result.model, val_lq)
    assert cosine(refined, val_gt).mean().item() == pytest.approx(result.val_cos_after, abs=1e-6)
    assert result.val_cos_after > result.val_cos_before + 0.05


def test_training_is_deterministic_for_the_seed():
    lq, gt = known_mapping_pairs(256)
    cfg = small_cfg(epochs=5)
    rng_before = torch.get_rng_state()
    first, second = train_srm(lq, gt, cfg), train_srm(lq, gt, cfg)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is left alone
    assert first.history == second.history
    for (name, p), (_, q) in zip(first.model.state_dict().items(), second.model.state_dict().items()):
        assert torch.equal(p, q), name
    other = train_srm(lq, gt, small_cfg(epochs=5, seed=1))
    assert other.history[-1]["train_loss"] != first.history[-1]["train_loss"]


def test_early_stopping_triggers_and_keeps_the_best_epoch():
    # GT unrelated to LQ: the validation loss has nothing to learn, stops improving and the run
    # ends `patience` epochs after its best, well before cfg.epochs.
    g = torch.Generator().manual_seed(0)
    lq = F.normalize(torch.randn(200, DIM, generator=g), dim=-1)
    gt = F.normalize(torch.randn(200, DIM, generator=g), dim=-1)
    cfg = small_cfg(epochs=200, patience=5, lr=1e-2, warmup_epochs=0)
    result = train_srm(lq, gt, cfg)
    assert len(result.history) < cfg.epochs
    assert len(result.history) == result.best_epoch + cfg.patience
    val_losses = [h["val_loss"] for h in result.history]
    assert min(val_losses) == val_losses[result.best_epoch - 1]
    assert all(v >= val_losses[result.best_epoch - 1] for v in val_losses[result.best_epoch:])
    # The model handed back holds the best epoch's weights, not the last epoch's.
    val_idx = split_holdout(200, cfg.val_fraction, cfg.seed)[1]
    kept_loss = srm_loss(refine(result.model, lq[val_idx]), gt[val_idx]).item()
    assert kept_loss == pytest.approx(val_losses[result.best_epoch - 1], abs=1e-6)
    assert kept_loss < val_losses[-1]


def test_refine_in_batches_equals_one_pass():
    model = SemanticRefinementModule(DIM, hidden=32, depth=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # leave the identity start
    emb = torch.randn(23, DIM)
    assert torch.allclose(refine(model, emb, batch_size=5), model(emb), atol=1e-6)
    assert refine(model, emb[:0]).shape == (0, DIM)


def test_mismatched_pairs_are_refused():
    with pytest.raises(ValueError, match="equal shapes"):
        train_srm(torch.zeros(4, DIM), torch.zeros(5, DIM), small_cfg())
    with pytest.raises(ValueError, match="both val_lq and val_gt"):
        train_srm(torch.zeros(4, DIM), torch.zeros(4, DIM), small_cfg(), val_lq=torch.zeros(2, DIM))
