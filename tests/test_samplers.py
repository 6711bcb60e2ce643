"""Posterior sampler and tiled restoration: reference equality, determinism, oracles, seams."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from srdiff_core.samplers import (
    blend_window,
    per_image_noise,
    posterior_noise,
    posterior_sample,
    restore,
    sampling_timesteps,
    tile_starts,
    tiled_model,
    untrained_timesteps,
)
from srdiff_core.sde import IRSDE
from srdiff_core.unet import ConditionalUNet

CONTEXT_DIM = 16


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


@pytest.fixture(scope="module")
def sde() -> IRSDE:
    return IRSDE(max_sigma=10)


@pytest.fixture(scope="module")
def unet() -> ConditionalUNet:
    """A tiny UNet with its zero-initialised output layers re-drawn, so its prediction is not 0."""
    torch.manual_seed(0)
    model = ConditionalUNet(nf=8, ch_mult=(1, 2), num_res_blocks=1, context_dim=CONTEXT_DIM, attn_heads=2)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim > 0 and not param.any():
                param.copy_(0.05 * torch.randn(param.shape, generator=gen))
    return model.eval()


def images(batch: int, height: int, width: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, height, width, generator=gen), torch.randn(batch, CONTEXT_DIM, generator=gen)


def pointwise_model(xt, mu, t, context):
    """A network whose output at a pixel depends only on that pixel (and its sample's context):
    tiling cannot change what it sees, so tiled and untiled sampling must agree."""
    out = 0.5 * torch.tanh(3 * (xt - mu)) + 0.3 * torch.sin(7 * mu) * (t.float() / 100).view(-1, 1, 1, 1)
    if context is not None:
        out = out + 0.2 * context.mean(dim=-1).view(-1, 1, 1, 1)
    return out


def oracle_for(sde: IRSDE):
    """The exact noise for a clean image x0 = 1 - mu (a per-pixel function of the input, so the
    oracle is position-independent): every x0 estimate is exact, so sampling must return x0."""
    def model(xt, mu, t, context):
        return (xt - sde.mu_bar(1 - mu, mu, t)) / sde.sigma_bar(t)
    return model


def reference_posterior_sampler(model, lq, sde, context, noise, clip_x0=True):
    """IR-SDE's 100-step posterior sampler written out step by step (its posterior_sample loop):
    x0 from the noise (clamped to [0,1] when clip_x0), the optimum x*_{t-1} of Proposition 3.1,
    its std, one noise draw per step."""
    T, dt, lam = sde.T, sde.dt, sde.lam
    x = lq + lam * noise[0]
    for k, t in enumerate(range(T, 0, -1), start=1):
        eps = model(x, lq, torch.full((lq.shape[0],), t), context)
        thetabar_t, thetabar_prev = sde.thetas_cumsum[t].item() * dt, sde.thetas_cumsum[t - 1].item() * dt
        x0 = (x - lq - sde.sigma_bars[t].item() * eps) * math.exp(thetabar_t) + lq
        if clip_x0:
            x0 = x0.clamp(0, 1)
        A, B, C = math.exp(-sde.thetas[t].item() * dt), math.exp(-thetabar_t), math.exp(-thetabar_prev)
        mean = A * (1 - C ** 2) / (1 - B ** 2) * (x - lq) + C * (1 - A ** 2) / (1 - B ** 2) * (x0 - lq) + lq
        std = lam * math.sqrt((1 - A ** 2) * (1 - C ** 2) / (1 - B ** 2))
        x = mean + std * noise[k]
    return x.clamp(0, 1)


def test_sampling_timesteps():
    assert sampling_timesteps(100) == list(range(100, -1, -1))
    assert sampling_timesteps(100, 4) == [100, 75, 50, 25, 0]
    assert sampling_timesteps(100, 7) == [100, 86, 71, 57, 43, 29, 14, 0]
    assert sampling_timesteps(100, 1) == [100, 0]
    for steps in range(1, 101):
        ts = sampling_timesteps(100, steps)
        assert len(ts) == steps + 1 and ts[0] == 100 and ts[-1] == 0
        assert all(a > b for a, b in zip(ts, ts[1:]))
    with pytest.raises(ValueError, match="1..T=100"):
        sampling_timesteps(100, 101)


@pytest.mark.parametrize("clip_x0", [True, False])
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_full_steps_equal_reference_sampler(sde, unet, dtype, atol, clip_x0):
    """In float64 the two agree to rounding (1e-10). In float32 the order in which the coefficients are
    rounded differs, and x0 = (...) * exp(thetabar_T) amplifies that by 1/eps = 200: 1e-4."""
    lq, context = images(2, 8, 12)
    lq, context, model = lq.to(dtype), context.to(dtype), copy.deepcopy(unet).to(dtype)
    noise = posterior_noise(lq.shape, sde.T, generator=torch.Generator().manual_seed(3), device="cpu", dtype=dtype)
    with torch.no_grad():
        expected = reference_posterior_sampler(model, lq, sde, context, noise, clip_x0=clip_x0)
    ours = posterior_sample(model, lq, sde, context, noise=noise, clip_x0=clip_x0)
    assert ours.dtype == dtype
    assert torch.equal(ours, posterior_sample(model, lq, sde, context, steps=sde.T, noise=noise, clip_x0=clip_x0))
    torch.testing.assert_close(ours, expected, rtol=0, atol=atol)
    assert (ours - lq).abs().mean() > 1e-3  # the network did something


def test_generator_and_predrawn_noise_agree(sde, unet):
    lq, context = images(1, 12, 20)
    drawn = posterior_sample(unet, lq, sde, context, steps=6, generator=torch.Generator().manual_seed(7))
    noise = posterior_noise(lq.shape, 6, generator=torch.Generator().manual_seed(7), device="cpu")
    assert torch.equal(drawn, posterior_sample(unet, lq, sde, context, steps=6, noise=noise))


def test_same_seed_same_image_different_seed_different(sde, unet):
    lq, context = images(1, 16, 16)

    def sample(seed):
        return posterior_sample(unet, lq, sde, context, steps=10, generator=torch.Generator().manual_seed(seed))

    first, again, other = sample(0), sample(0), sample(1)
    assert torch.equal(first, again)
    assert (first - other).abs().max() > 1e-3


@pytest.mark.parametrize("steps", [1, 3, 10, 100])
def test_oracle_network_restores_ground_truth_at_any_step_count(sde, steps):
    lq, _ = images(2, 8, 8)
    out = posterior_sample(oracle_for(sde), lq, sde, None, steps=steps, generator=torch.Generator().manual_seed(0))
    # x0 is recovered through exp(thetabar_T) = 200 at the first jump: float32 rounding x 200.
    torch.testing.assert_close(out, 1 - lq, rtol=0, atol=1e-4)


def test_k_step_output_is_clamped_to_unit_range(sde, unet):
    lq, context = images(2, 9, 13)
    out = posterior_sample(unet, lq, sde, context, steps=5, generator=torch.Generator().manual_seed(0))
    assert out.shape == lq.shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    wild = posterior_sample(lambda xt, mu, t, c: 50 * torch.ones_like(xt), lq, sde, None, steps=5,
                            generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(wild).all() and wild.min() >= 0 and wild.max() <= 1 and wild.max() < 1e-6


def test_bf16_autocast_sampling(sde, unet):
    lq, context = images(1, 16, 16)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    ref = posterior_sample(unet, lq, sde, context, steps=5, generator=gen())
    low = posterior_sample(unet, lq, sde, context, steps=5, generator=gen(), autocast_dtype=torch.bfloat16)
    assert low.dtype == torch.float32
    assert (low - ref).abs().mean() < 0.02


def test_per_image_noise_draws_what_posterior_noise_draws_one_jump_at_a_time(sde, unet):
    """Image i's noise is its own generator's sequence, as posterior_noise draws it for that image
    alone; the iterator makes each jump's batch tensor only when the sampler asks."""
    lq, context = images(3, 8, 10)
    seeds = [4, 4, 9]
    generators = [torch.Generator().manual_seed(k) for k in seeds]
    noise = per_image_noise((1, 3, 8, 10), generators, device="cpu")
    alone = [posterior_noise((1, 3, 8, 10), 3, generator=torch.Generator().manual_seed(k), device="cpu") for k in seeds]
    for step in range(4):
        assert torch.equal(next(noise), torch.cat([a[step] for a in alone]))
        # Drawn on demand: each generator has given exactly the draws asked for so far.
        once_per_draw = torch.Generator().manual_seed(seeds[-1])
        posterior_noise((1, 3, 8, 10), step, generator=once_per_draw, device="cpu")
        assert torch.equal(generators[-1].get_state(), once_per_draw.get_state())
    lazily = per_image_noise((1, 3, 8, 10), [torch.Generator().manual_seed(k) for k in seeds], device="cpu")
    batch = posterior_sample(unet, lq, sde, context, steps=3, noise=lazily)
    for i, k in enumerate(seeds):
        single = posterior_sample(unet, lq[i:i + 1], sde, context[i:i + 1], steps=3,
                                  generator=torch.Generator().manual_seed(k))
        # Same noise; a batched convolution sums in another order (float32 rounding, 1e-6 here).
        torch.testing.assert_close(batch[i:i + 1], single, rtol=0, atol=1e-5)


def test_a_noise_iterator_that_runs_out_is_an_error(sde, unet):
    lq, context = images(1, 8, 8)
    short = iter(posterior_noise(lq.shape, 2, generator=torch.Generator().manual_seed(0), device="cpu"))
    with pytest.raises(ValueError, match="ran out before the sampler's last jump"):
        posterior_sample(unet, lq, sde, context, steps=5, noise=short)


def test_rejects_wrong_noise_list(sde, unet):
    lq, context = images(1, 8, 8)
    noise = posterior_noise(lq.shape, 4, generator=torch.Generator().manual_seed(0), device="cpu")
    with pytest.raises(ValueError, match="posterior_noise"):
        posterior_sample(unet, lq, sde, context, steps=5, noise=noise)


def test_tile_starts_and_blend_window():
    assert tile_starts(40, 16, 6) == [0, 10, 20, 24]
    assert tile_starts(16, 16, 6) == [0] and tile_starts(10, 16, 6) == [0]
    assert tile_starts(32, 16, 0) == [0, 16]
    w = blend_window(16, 12, 4)
    assert w.shape == (16, 12) and bool((w > 0).all()) and w.max() == 1.0
    assert w[4:12, 4:8].eq(1).all()
    torch.testing.assert_close(w, w.flip(0).flip(1))
    # Raised cosine at pixel centres: sin^2(pi/2 * (i + 0.5) / 4).
    ramp = [math.sin(math.pi / 2 * (i + 0.5) / 4) ** 2 for i in range(4)]
    torch.testing.assert_close(w[8, :4], torch.tensor(ramp))
    # Complementary ramps: two tiles overlapping by exactly `overlap` pixels sum to 1 there.
    torch.testing.assert_close(w[8, :4] + w[8, -4:], torch.ones(4))


def test_one_tile_equals_untiled_exactly(sde, unet):
    """An image that fits in one tile, run through the tiled wrapper itself (restore would skip it):
    the single tile is the whole image and its blend weight cancels exactly (float64 w * p / w), so
    the result is bit-identical to untiled sampling even with a raised-cosine ramp in the window."""
    lq, context = images(1, 16, 24)
    seen = []

    def spy(xt, mu, t, ctx):
        seen.append(tuple(xt.shape))
        return unet(xt, mu, t, ctx)

    tiled_net = tiled_model(spy, tile_size=24, tile_overlap=6)
    assert blend_window(16, 24, 6).min() < 0.1  # the weight is not all ones: cancelling it is tested
    untiled = posterior_sample(unet, lq, sde, context, steps=4, generator=torch.Generator().manual_seed(5))
    tiled = posterior_sample(tiled_net, lq, sde, context, steps=4, generator=torch.Generator().manual_seed(5))
    assert seen == [(1, 3, 16, 24)] * 4  # one whole-image tile per jump, through the blend
    assert torch.equal(untiled, tiled)


@pytest.mark.parametrize("steps", [4, 100])
def test_tiled_equals_untiled_for_position_independent_model(sde, steps):
    """A pointwise network predicts the same value for a pixel in every tile that holds it, so the
    normalised blend is that value and tiled sampling (same generator, same noise) equals untiled
    sampling up to float rounding: no seams. Uneven tiling (last tile shifted), two images with their
    own context, tiles split unevenly over model calls."""
    lq, context = images(2, 40, 37, seed=1)

    def run(**tiling):
        return restore(pointwise_model, lq, sde, context, steps=steps,
                       generator=torch.Generator().manual_seed(11), **tiling)

    untiled = run()
    tiled = run(tile_size=16, tile_overlap=6, tiles_per_batch=5)
    assert (untiled - lq).abs().mean() > 1e-2  # the noise and the model matter
    torch.testing.assert_close(tiled, untiled, rtol=0, atol=1e-5)


def test_tiles_are_batched_and_cropped_to_tile_size(sde):
    lq, context = images(2, 40, 37, seed=1)
    calls = []

    def spy(xt, mu, t, ctx):
        calls.append((tuple(xt.shape), tuple(ctx.shape), t.tolist()))
        return pointwise_model(xt, mu, t, ctx)

    restore(spy, lq, sde, context, steps=2, generator=torch.Generator().manual_seed(0),
            tile_size=16, tile_overlap=6, tiles_per_batch=5)
    # 4 x 4 tiles per image (starts 0, 10, 20, 24 and 0, 10, 20, 21), 2 images: 32 tiles, 7 calls per step.
    assert len(calls) == 2 * 7
    assert [c[0][0] for c in calls[:7]] == [5, 5, 5, 5, 5, 5, 2]
    assert all(c[0][1:] == (3, 16, 16) and c[1] == (c[0][0], CONTEXT_DIM) for c in calls)
    assert calls[0][2] == [100] * 5 and calls[7][2] == [50] * 5


def test_tiled_unet_is_valid_and_batching_invariant(sde, unet):
    """A real UNet sees different borders per tile, so its tile predictions differ in the overlaps;
    the blend must still give a valid image, and how tiles are grouped into calls must not matter."""
    lq, context = images(1, 24, 40, seed=2)

    def run(per_batch):
        return restore(unet, lq, sde, context, steps=3, generator=torch.Generator().manual_seed(0),
                       tile_size=16, tile_overlap=8, tiles_per_batch=per_batch)

    one_by_one, batched = run(1), run(4)
    assert one_by_one.shape == lq.shape and one_by_one.min() >= 0 and one_by_one.max() <= 1
    torch.testing.assert_close(batched, one_by_one, rtol=0, atol=1e-5)
    untiled = restore(unet, lq, sde, context, steps=3, generator=torch.Generator().manual_seed(0))
    assert (batched - untiled).abs().mean() < 0.05  # same noise path: tiling perturbs, not replaces


def test_tiling_rejects_overlap_not_below_tile(sde, unet):
    lq, context = images(1, 24, 24)
    with pytest.raises(ValueError, match="tile_overlap"):
        restore(unet, lq, sde, context, steps=2, tile_size=16, tile_overlap=16)


# ------------------------------------------------------------------------------ eta (DDIM-style noise)

def oracle_model(sde: IRSDE, x0: torch.Tensor):
    """Predicts the exact noise of x_t given the true clean image."""
    def model(xt, mu, t, context):
        return (xt - sde.mu_bar(x0, mu, t)) / sde.sigma_bar(t)
    return model


@pytest.mark.parametrize("eta", [1.0, 0.5, 0.0])
def test_every_eta_recovers_the_clean_image_from_the_true_noise(sde, eta):
    (lq, _), (x0, _) = images(2, 8, 8, seed=3), images(2, 8, 8, seed=5)
    out = restore(oracle_model(sde, x0), lq, sde, None, steps=10, generator=torch.Generator().manual_seed(0),
                  eta=eta, clip_x0=False)
    assert (out - x0).abs().max().item() < 1e-5


def test_eta_one_is_the_posterior_and_eta_zero_is_deterministic(sde, unet):
    lq, context = images(1, 12, 12, seed=4)
    def run(eta, seed):
        return restore(unet, lq, sde, context, steps=4, generator=torch.Generator().manual_seed(seed), eta=eta)
    posterior = run(1.0, 0)
    # The generic DDIM formula at eta just below 1 converges to the posterior path (same noise).
    assert (run(1.0 - 1e-7, 0) - posterior).abs().max().item() < 1e-4
    # eta 0 draws noise only for x_T: other seeds move the start, and nothing else.
    a, b = run(0.0, 0), run(0.0, 0)
    assert torch.equal(a, b) and not torch.equal(a, posterior)


def test_posterior_jump_rejects_an_eta_outside_zero_one(sde, unet):
    lq, context = images(1, 8, 8)
    with pytest.raises(ValueError, match="eta must lie in"):
        restore(unet, lq, sde, context, steps=2, generator=torch.Generator().manual_seed(0), eta=1.5)


def test_untrained_timesteps_are_the_queried_steps_outside_train_timesteps():
    # A K-jump sampler queries the network at every step of sampling_timesteps but t = 0.
    assert untrained_timesteps([100], 100, 3) == [67, 33]
    assert untrained_timesteps([100], 100, 1) == []
    assert untrained_timesteps([50, 100], 100, 2) == []
    assert untrained_timesteps(None, 100, 100) == []  # trained at every step
