"""Training loop: EMA math, the LR schedule, one step, bit-exact resume, and that the model learns."""

from __future__ import annotations

import itertools
import math
import random
import time
import typing

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from srdiff_core.checkpoint import CheckpointMismatch, latest_checkpoint, load_checkpoint
from srdiff_core.config import TrainConfig
from srdiff_core.ema import ema_decay_at, ema_update, make_ema
from srdiff_core.samplers import posterior_sample
from srdiff_core.sde import IRSDE, TRAINING_LOSSES
from srdiff_core.training import (
    TrainState,
    build_optimizer,
    cosine_lr,
    load_train_state,
    segmented_batches,
    train,
    train_state_dict,
    train_step,
    unwrap,
)
from srdiff_core.unet import ConditionalUNet

CONTEXT_DIM = 8
CONFIG = {"unet": {"nf": 8, "ch_mult": [1, 2]}, "sde": {"max_sigma": 10.0}}
COMPATIBLE_KEYS = ("unet.nf", "unet.ch_mult", "sde.max_sigma")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def tiny_unet(seed: int = 0) -> ConditionalUNet:
    torch.manual_seed(seed)
    return ConditionalUNet(nf=8, ch_mult=(1, 2), num_res_blocks=1, context_dim=CONTEXT_DIM, attn_heads=1)


def tiny_config(**overrides) -> TrainConfig:
    values = dict(steps=4, batch_size=2, patch_size=16, lr=1e-3, warmup_steps=1, precision="fp32",
                  channels_last=False, checkpoint_every=2, log_every=1, sample_every=2, ema_decay=0.9,
                  resume="auto", seed=0)
    return TrainConfig(**(values | overrides))


def random_batches(start_step: int, *, batch: int = 2, size: int = 16):
    """An endless, position-addressable stream: batch k depends only on k (like resampled shards)."""
    for step in itertools.count(start_step):
        g = torch.Generator().manual_seed(10_000 + step)
        gt = torch.rand(batch, 3, size, size, generator=g)
        yield {"lq": 0.5 * gt, "gt": gt, "context": torch.randn(batch, CONTEXT_DIM, generator=g)}


def assert_same_tree(a, b, where: str = "") -> None:
    """Nested dicts/lists of tensors and plain values are equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"tensor differs at {where}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"keys differ at {where}"
        for key in a:
            assert_same_tree(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"length differs at {where}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{a!r} != {b!r} at {where}"


# ------------------------------------------------------------------------------- EMA

class TwoParams(nn.Module):
    def __init__(self, a: float, b: float):
        super().__init__()
        self.a = nn.Parameter(torch.tensor([a]))
        self.b = nn.Parameter(torch.tensor([b]))
        self.register_buffer("count", torch.tensor(0))


def test_ema_update_is_lerp_of_params_and_copy_of_buffers():
    model = TwoParams(1.0, 2.0)
    ema = make_ema(model)
    with torch.no_grad():
        model.a.fill_(3.0)
        model.b.fill_(-2.0)
        model.count.fill_(7)

    ema_update(ema, model, decay=0.75)
    assert (ema.a.item(), ema.b.item(), ema.count.item()) == (1.5, 1.0, 7)  # 0.75*1 + 0.25*3, 0.75*2 + 0.25*-2
    ema_update(ema, model, decay=0.75)
    assert (ema.a.item(), ema.b.item()) == (1.875, 0.25)
    ema_update(ema, model, decay=0.0)  # decay 0 copies the model
    assert (ema.a.item(), ema.b.item()) == (3.0, -2.0)
    assert (model.a.item(), model.b.item()) == (3.0, -2.0)  # the model is never touched


def test_ema_decay_warms_up_to_the_configured_value():
    assert ema_decay_at(0.995, 0) == pytest.approx(0.1)      # (1 + 0) / (10 + 0)
    assert ema_decay_at(0.995, 90) == pytest.approx(0.91)    # 91 / 100
    assert ema_decay_at(0.995, 1790) == 0.995                # 1791 / 1800 = 0.99500.. capped
    assert ema_decay_at(0.9, 10_000) == 0.9


def test_make_ema_is_a_frozen_eval_copy():
    model = TwoParams(1.0, 2.0).train()
    ema = make_ema(model)
    assert not ema.training and model.training
    assert all(not p.requires_grad for p in ema.parameters())
    assert ema.a.data_ptr() != model.a.data_ptr()


def test_ema_update_rejects_a_wrapped_model():
    model = TwoParams(1.0, 2.0)
    ema = make_ema(model)
    with pytest.raises(ValueError, match="pass the unwrapped model"):
        ema_update(ema, nn.Sequential(model), decay=0.9)
    with pytest.raises(ValueError, match="train.ema_decay"):
        ema_update(ema, model, decay=1.5)


# -------------------------------------------------------------------------- schedule

def test_cosine_lr_warmup_then_cosine_to_floor():
    lr = [cosine_lr(step, base_lr=1.0, total_steps=10, warmup_steps=2, min_lr_ratio=0.1) for step in range(12)]
    assert lr[0] == pytest.approx(1 / 3) and lr[1] == pytest.approx(2 / 3)  # (step + 1) / (warmup + 1)
    assert lr[2] == pytest.approx(1.0)  # the cosine starts at its peak
    assert lr[4] == pytest.approx(0.1 + 0.45 * (1 + math.sqrt(0.5)))  # a quarter of the way: cos(pi/4)
    assert lr[6] == pytest.approx(0.55)  # half way: the mean of peak and floor
    assert lr[10] == pytest.approx(0.1) and lr[11] == pytest.approx(0.1)  # floor at and after the end


def test_cosine_lr_without_warmup_starts_at_base():
    assert cosine_lr(0, base_lr=2e-4, total_steps=100) == 2e-4
    assert cosine_lr(50, base_lr=2e-4, total_steps=100) == pytest.approx(1e-4)
    assert cosine_lr(100, base_lr=2e-4, total_steps=100) == 0.0


def test_build_optimizer_follows_schedule_and_skips_decay_on_vectors():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    cfg = tiny_config(steps=10, warmup_steps=2, lr=1e-3, min_lr_ratio=0.1, weight_decay=0.05)
    optimizer, scheduler = build_optimizer(model, cfg)

    decay_group, no_decay_group = optimizer.param_groups
    assert [p.shape for p in decay_group["params"]] == [torch.Size([4, 3])]
    assert decay_group["weight_decay"] == 0.05 and no_decay_group["weight_decay"] == 0.0
    assert optimizer.defaults["betas"] == (0.9, 0.99)
    seen = []
    for _ in range(11):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [cosine_lr(s, base_lr=1e-3, total_steps=10, warmup_steps=2, min_lr_ratio=0.1) for s in range(11)]
    assert seen == pytest.approx(expected)


# ------------------------------------------------------------------------------ step

def _fresh_state(cfg: TrainConfig, seed: int = 0) -> TrainState:
    model = tiny_unet(seed)
    optimizer, scheduler = build_optimizer(model, cfg)
    return TrainState(model, make_ema(model), optimizer, scheduler, 0, torch.Generator().manual_seed(cfg.seed))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_train_step_updates_model_ema_and_step(precision):
    cfg = tiny_config(precision=precision, grad_clip=1e-5, channels_last=precision == "bf16")
    state = _fresh_state(cfg)
    before = {k: v.clone() for k, v in state.model.state_dict().items()}
    batch = next(random_batches(0))

    metrics = train_step(state, IRSDE(10.0), batch, cfg, device="cpu")

    assert set(metrics) == {"loss", "grad_norm", "lr"}
    assert math.isfinite(metrics["loss"]) and metrics["loss"] > 0
    assert metrics["lr"] == pytest.approx(0.5e-3)  # first warmup step: lr * 1/2
    assert state.step == 1 and state.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    after = state.model.state_dict()
    ema = state.ema.state_dict()
    # Zero-initialised output conv: it moves first; the EMA follows by the warmed-up decay.
    name = "final_conv.weight"
    assert not torch.equal(before[name], after[name])
    decay = ema_decay_at(0.9, 0)  # 0.1: the warm-up, not yet the configured 0.9
    torch.testing.assert_close(ema[name], decay * before[name] + (1 - decay) * after[name])
    # clip_grad_norm_ reports the norm before clipping; the gradients left behind are clipped.
    assert metrics["grad_norm"] > 1e-5
    grads = [p.grad for p in state.model.parameters() if p.grad is not None]
    assert torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item() == pytest.approx(1e-5, rel=0.01)  # clip adds 1e-6 to the norm


def test_train_loss_choices_are_the_losses_srdiff_core_has():
    assert set(typing.get_args(TrainConfig.model_fields["loss"].annotation)) == set(TRAINING_LOSSES)


@pytest.mark.parametrize("loss", sorted(TRAINING_LOSSES))
def test_train_step_optimises_the_configured_loss(loss):
    """train.loss picks the objective: the step reports exactly that loss of the model before it."""
    cfg = tiny_config(loss=loss)
    state = _fresh_state(cfg)
    batch = next(random_batches(0))
    sde = IRSDE(10.0)
    expected = TRAINING_LOSSES[loss](sde, state.model, batch["gt"], batch["lq"], batch["context"],
                                     generator=torch.Generator().manual_seed(cfg.seed)).item()
    assert train_step(state, sde, batch, cfg, device="cpu")["loss"] == pytest.approx(expected, rel=1e-6)
    for other in (fn for name, fn in TRAINING_LOSSES.items() if name != loss):  # the test can tell them apart
        assert other(sde, _fresh_state(cfg).model, batch["gt"], batch["lq"], batch["context"],
                     generator=torch.Generator().manual_seed(cfg.seed)).item() != pytest.approx(expected, rel=1e-3)
    with pytest.raises(ValueError, match="loss"):
        tiny_config(loss="l2")


def test_train_step_draws_t_from_train_timesteps():
    cfg = tiny_config(timesteps=[100, 7])
    state = _fresh_state(cfg)
    seen = []
    forward = state.model.forward
    state.model.forward = lambda xt, mu, t, context: seen.append(t.tolist()) or forward(xt, mu, t, context)
    for batch in itertools.islice(random_batches(0, batch=8), 2):
        train_step(state, IRSDE(10.0), batch, cfg, device="cpu")
    assert set(seen[0] + seen[1]) == {7, 100}


def test_ema_every_10_updates_only_after_steps_10_and_20():
    """train.ema_every = 10 (DA-CLIP: 0.995 every 10 steps): the EMA stays put for 9 steps, then
    becomes exactly lerp(previous EMA, model, 1 - decay) with the decay of step index 9 (19)."""
    cfg = tiny_config(steps=20, ema_every=10)
    state = _fresh_state(cfg)
    batches = random_batches(0)
    ema = [p.detach().clone() for p in state.ema.parameters()]
    for step in range(1, 21):
        train_step(state, IRSDE(10.0), next(batches), cfg, device="cpu")
        now = [p.detach().clone() for p in state.ema.parameters()]
        if step % 10:
            assert all(torch.equal(a, b) for a, b in zip(now, ema)), f"EMA moved after step {step}"
            continue
        expected = [p.clone() for p in ema]
        torch._foreach_lerp_(expected, [p.detach() for p in state.model.parameters()],
                             1.0 - ema_decay_at(0.9, step - 1))
        assert all(torch.equal(a, b) for a, b in zip(now, expected)), f"EMA after step {step}"
        assert not all(torch.equal(a, b) for a, b in zip(now, ema))
        ema = now
    assert state.step == 20
    assert ema_decay_at(0.9, 9) == pytest.approx(10 / 19) and ema_decay_at(0.9, 19) == pytest.approx(20 / 29)


def test_resume_is_bit_exact_when_the_ema_skips_steps(tmp_path):
    """ema_every 3 with checkpoints every 2: the EMA's updates (after steps 3 and 6) straddle the resume."""
    cfg = tiny_config(steps=6, checkpoint_every=2, ema_every=3)
    sde = IRSDE(10.0)
    torch.manual_seed(0)
    straight = train(tiny_unet(), sde, random_batches, cfg, checkpoint_dir=tmp_path / "straight",
                     config_dict=CONFIG, compatible_keys=COMPATIBLE_KEYS)
    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match="ran out of batches at step 4"):
        train(tiny_unet(), sde, lambda start: random_batches(start) if start < 4 else iter(()), cfg,
              checkpoint_dir=tmp_path / "resumed", config_dict=CONFIG, compatible_keys=COMPATIBLE_KEYS)
    _scramble_global_rngs()
    resumed = train(tiny_unet(seed=99), sde, random_batches, cfg, checkpoint_dir=tmp_path / "resumed",
                    config_dict=CONFIG, compatible_keys=COMPATIBLE_KEYS)
    assert resumed.step == straight.step == 6
    assert_same_tree(resumed.ema.state_dict(), straight.ema.state_dict(), "ema")
    assert_same_tree(unwrap(resumed.model).state_dict(), unwrap(straight.model).state_dict(), "model")


def test_train_step_refuses_a_nan_loss():
    cfg = tiny_config()
    state = _fresh_state(cfg)
    batch = next(random_batches(0))
    batch["gt"][0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="training loss is nan at step 0: lower train.lr"):
        train_step(state, IRSDE(10.0), batch, cfg, device="cpu")
    assert state.step == 0


def test_unwrap_sees_through_compile_and_data_parallel():
    model = tiny_unet()
    assert unwrap(nn.DataParallel(torch.compile(model))) is model
    assert unwrap(model) is model


def test_train_state_dict_loads_with_weights_only(tmp_path):
    cfg = tiny_config()
    state = _fresh_state(cfg)
    train_step(state, IRSDE(10.0), next(random_batches(0)), cfg, device="cpu")
    torch.save(train_state_dict(state, CONFIG | {"betas": (0.9, 0.99)}), tmp_path / "c.pt")

    ckpt = load_checkpoint(tmp_path / "c.pt", weights_only=True)
    assert ckpt["step"] == 1 and ckpt["config"]["betas"] == [0.9, 0.99]
    other = _fresh_state(cfg, seed=1)
    load_train_state(other, ckpt)
    assert_same_tree(other.model.state_dict(), state.model.state_dict())
    assert_same_tree(other.optimizer.state_dict(), state.optimizer.state_dict())
    assert torch.equal(other.generator.get_state(), state.generator.get_state())


# ---------------------------------------------------------------------- train + resume

def _scramble_global_rngs() -> None:
    random.seed(12345)
    np.random.seed(12345)
    torch.manual_seed(12345)


def test_resume_is_bit_exact(tmp_path):
    """4 steps straight == 2 steps, a crash, a fresh process state, then resume to 4."""
    torch.use_deterministic_algorithms(True)
    try:
        cfg = tiny_config(steps=4, checkpoint_every=2)
        sde = IRSDE(10.0)
        torch.manual_seed(0)
        straight = train(tiny_unet(), sde, random_batches, cfg, checkpoint_dir=tmp_path / "straight",
                         config_dict=CONFIG, compatible_keys=COMPATIBLE_KEYS)

        # The first attempt dies after step 2's checkpoint (its data stream ends there).
        torch.manual_seed(0)
        with pytest.raises(RuntimeError, match="ran out of batches at step 2"):
            train(tiny_unet(), sde, lambda start: random_batches(start) if start < 2 else iter(()), cfg,
                  checkpoint_dir=tmp_path / "resumed", config_dict=CONFIG, compatible_keys=COMPATIBLE_KEYS)
        assert latest_checkpoint(tmp_path / "resumed").name == "ckpt-00000002.pt"

        _scramble_global_rngs()
        starts = []
        resumed = train(tiny_unet(seed=99), sde, lambda start: starts.append(start) or random_batches(start), cfg,
                        checkpoint_dir=tmp_path / "resumed", config_dict=CONFIG, compatible_keys=COMPATIBLE_KEYS)
    finally:
        torch.use_deterministic_algorithms(False)

    assert starts == [2] and resumed.step == straight.step == 4
    assert_same_tree(unwrap(resumed.model).state_dict(), unwrap(straight.model).state_dict(), "model")
    assert_same_tree(resumed.ema.state_dict(), straight.ema.state_dict(), "ema")
    assert_same_tree(resumed.optimizer.state_dict(), straight.optimizer.state_dict(), "optimizer")
    assert resumed.scheduler.state_dict() == straight.scheduler.state_dict()
    assert torch.equal(resumed.generator.get_state(), straight.generator.get_state())
    assert sorted(p.name for p in (tmp_path / "straight").iterdir()) == ["ckpt-00000002.pt", "ckpt-00000004.pt", "latest"]


def test_finished_run_returns_without_training(tmp_path):
    cfg = tiny_config(steps=2)
    first = train(tiny_unet(), IRSDE(10.0), random_batches, cfg, checkpoint_dir=tmp_path, config_dict=CONFIG)

    def no_batches(start):
        raise AssertionError("a finished run must not ask for data")

    again = train(tiny_unet(seed=5), IRSDE(10.0), no_batches, cfg, checkpoint_dir=tmp_path, config_dict=CONFIG)
    assert again.step == 2
    assert_same_tree(unwrap(again.model).state_dict(), unwrap(first.model).state_dict())


def test_resume_refuses_an_incompatible_checkpoint(tmp_path):
    cfg = tiny_config(steps=2)
    train(tiny_unet(), IRSDE(10.0), random_batches, cfg, checkpoint_dir=tmp_path, config_dict=CONFIG,
          compatible_keys=COMPATIBLE_KEYS)
    changed = {"unet": {"nf": 16, "ch_mult": [1, 2]}, "sde": {"max_sigma": 10.0}}
    with pytest.raises(CheckpointMismatch, match="unet.nf: checkpoint 8, config 16"):
        train(tiny_unet(), IRSDE(10.0), random_batches, tiny_config(steps=4), checkpoint_dir=tmp_path,
              config_dict=changed, compatible_keys=COMPATIBLE_KEYS)


def test_resume_never_starts_over_and_sets_old_checkpoints_aside(tmp_path):
    train(tiny_unet(), IRSDE(10.0), random_batches, tiny_config(steps=4), checkpoint_dir=tmp_path, config_dict=CONFIG)
    fresh = train(tiny_unet(), IRSDE(10.0), random_batches, tiny_config(steps=2, resume="never"),
                  checkpoint_dir=tmp_path, config_dict=CONFIG)
    assert fresh.step == 2
    assert latest_checkpoint(tmp_path).name == "ckpt-00000002.pt"
    (archive,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert archive.name.startswith("previous-")
    assert sorted(p.name for p in archive.iterdir()) == ["ckpt-00000002.pt", "ckpt-00000004.pt", "latest"]


def test_train_logs_samples_and_checkpoints_on_schedule(tmp_path):
    cfg = tiny_config(steps=5, log_every=2, sample_every=3, checkpoint_every=4)
    logged, sampled = [], []
    state = train(tiny_unet(), IRSDE(10.0), random_batches, cfg, checkpoint_dir=tmp_path, config_dict=CONFIG,
                  log_fn=lambda step, metrics: logged.append((step, metrics)),
                  sample_fn=lambda step, ema: sampled.append((step, ema, ema.training)))
    assert [step for step, _ in logged] == [2, 4]
    for _, metrics in logged:
        assert set(metrics) == {"loss", "lr", "grad_norm", "images_per_s"}
        assert metrics["images_per_s"] > 0
    assert [(step, ema is state.ema, training) for step, ema, training in sampled] == [(3, True, False)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000004.pt", "ckpt-00000005.pt", "latest"]
    ckpt = load_checkpoint(latest_checkpoint(tmp_path))
    assert ckpt["step"] == 5 and ckpt["config"] == CONFIG
    assert_same_tree(ckpt["ema"], state.ema.state_dict())


# ------------------------------------------------------------------------- learning

def _psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    return (10 * torch.log10(1 / ((pred - target) ** 2).mean(dim=(1, 2, 3)))).mean().item()


@pytest.mark.slow
def test_tiny_unet_learns_to_brighten(tmp_path):
    """400 steps on 4 fixed pairs of 32 px (GT smooth colour fields, LQ = GT / 2, a low-light
    degradation) lift the 20-step posterior sample >= 3 dB above the LQ input (measured: 20.45 vs
    11.61 dB at seed 0; at 16 px seeds 0-4 all gained >= 6 dB). ~42 s on the 2-core box.

    max_sigma = 50: at the default 10, x0 is recovered from x_t through a factor
    lambda * e^{thetabar_T} ~ 8 applied to the noise estimate, and this budget leaves the estimate
    too coarse (samples diverge below the LQ PSNR until ~2000 steps).
    """
    g = torch.Generator().manual_seed(0)
    gt = F.interpolate(torch.rand(4, 3, 4, 4, generator=g), size=(32, 32), mode="bilinear", align_corners=False)
    lq = 0.5 * gt
    context = torch.randn(4, CONTEXT_DIM, generator=g)
    sde = IRSDE(max_sigma=50.0)
    cfg = tiny_config(steps=400, batch_size=4, lr=1e-2, warmup_steps=0, checkpoint_every=400)

    started = time.perf_counter()
    state = train(tiny_unet(), sde, lambda start: itertools.repeat({"lq": lq, "gt": gt, "context": context}),
                  cfg, checkpoint_dir=tmp_path, config_dict=CONFIG)
    restored = posterior_sample(state.ema, lq, sde, context, steps=20, generator=torch.Generator().manual_seed(1))
    seconds = time.perf_counter() - started

    baseline, result = _psnr(lq, gt), _psnr(restored, gt)
    assert result >= baseline + 3.0, f"PSNR {result:.2f} dB vs LQ {baseline:.2f} dB after {seconds:.0f} s"


def test_training_backend_settings_are_restored_after_training():
    """TF32 and cuDNN autotuning hold inside the train stage only: a later stage in the same
    process (evaluate, or embed whose cache key records the fp32 math) sees the settings it had."""
    import torch

    from srdiff_core import training
    before = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with training.cuda_backends_for_training():
            assert torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 is False
        assert torch.backends.cudnn.benchmark == before[0]
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_segmented_batches_restart_the_source_at_every_checkpoint_step():
    starts, closed = [], []

    def source(start: int):
        starts.append(start)
        try:
            yield from ({"step": s} for s in itertools.count(start))
        finally:  # a DataLoader's workers stop here
            closed.append(start)

    batches = segmented_batches(source, 3, every=4)
    assert [next(batches)["step"] for _ in range(7)] == [3, 4, 5, 6, 7, 8, 9]
    assert starts == [3, 4, 8]  # the resumed start, then each checkpoint step
    assert closed == [3, 4]  # each source is closed when the next one starts...
    batches.close()
    assert closed == [3, 4, 8]  # ...and the current one when the batches are closed (train does)
    with pytest.raises(RuntimeError, match="ran out of batches at step 5"):
        list(segmented_batches(lambda start: iter([{"step": start}]), 4, every=8))


@pytest.mark.slow
def test_compiled_training_matches_eager_and_its_checkpoints_are_plain(tmp_path):
    """train.compile: torch.compile (inductor, C++ on the CPU) runs the same steps as eager, up to
    float reordering, and the checkpoint holds the plain module's keys (no "_orig_mod."), so it
    loads into an uncompiled UNet and resumes either way."""
    sde = IRSDE(10.0)
    runs = {}
    for name, compile_ in (("eager", False), ("compiled", True)):
        runs[name] = train(tiny_unet(), sde, random_batches, tiny_config(steps=2, compile=compile_),
                           checkpoint_dir=tmp_path / name, config_dict=CONFIG)
    assert hasattr(runs["compiled"].model, "_orig_mod") and not hasattr(runs["eager"].model, "_orig_mod")
    eager, compiled = unwrap(runs["eager"].model).state_dict(), unwrap(runs["compiled"].model).state_dict()
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-4, atol=1e-5, msg=key)
    saved = load_checkpoint(latest_checkpoint(tmp_path / "compiled"))
    assert not [k for k in saved["model"] if "_orig_mod" in k]
    tiny_unet().load_state_dict(saved["model"])  # strict: every key of the plain module
