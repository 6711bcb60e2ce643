"""IR-SDE schedule math against hand-written formulas, a simulation of the SDE itself, and Bayes."""

from __future__ import annotations

import math

import pytest
import torch

from srdiff_core.config import SDEConfig
from srdiff_core.sde import TRAINING_LOSSES, IRSDE, matching_loss, sample_timesteps, x0_loss, x0_psnr_loss


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def reference_schedule(max_sigma: float, T: int, eps: float, s: float = 0.008):
    """The IR-SDE cosine schedule written out with the math module, one value at a time."""
    n = T + 2
    alphabar = [math.cos(((i / n) + s) / (1 + s) * math.pi / 2) ** 2 for i in range(n + 1)]
    alphabar = [a / alphabar[0] for a in alphabar]
    thetas = [1 - alphabar[i] for i in range(1, n)]  # T + 1 values
    cumsum, total = [], 0.0
    for theta in thetas:
        total += theta
        cumsum.append(total - thetas[0])
    dt = -math.log(eps) / cumsum[-1]
    lam = max_sigma / 255
    sigma_bars = [lam * math.sqrt(-math.expm1(-2 * c * dt)) for c in cumsum]
    return thetas, cumsum, dt, sigma_bars


@pytest.mark.parametrize("T", [4, 100])
def test_schedule_matches_hand_computed_values(T):
    sde = IRSDE(max_sigma=10, T=T, eps=0.005)
    thetas, cumsum, dt, sigma_bars = reference_schedule(10, T, 0.005)
    assert sde.thetas.dtype == torch.float64 and sde.thetas.shape == (T + 1,)
    torch.testing.assert_close(sde.thetas, torch.tensor(thetas, dtype=torch.float64), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(sde.thetas_cumsum, torch.tensor(cumsum, dtype=torch.float64), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(sde.sigma_bars, torch.tensor(sigma_bars, dtype=torch.float64), rtol=1e-12, atol=1e-15)
    assert sde.dt == pytest.approx(dt, rel=1e-12)
    assert sde.lam == 10 / 255


def test_default_schedule_pinned_numbers():
    sde = IRSDE.from_config(SDEConfig())
    assert sde.T == 100 and sde.lam == pytest.approx(0.0392156862745098)
    assert sde.dt == pytest.approx(0.10409380785667743, rel=1e-12)
    assert sde.thetas_cumsum[100].item() == pytest.approx(50.89944806172405, rel=1e-12)
    assert sde.thetas[1].item() == pytest.approx(0.001694615641964492, rel=1e-12)
    assert sde.thetas[50].item() == pytest.approx(0.5061564095593623, rel=1e-12)
    assert sde.sigma_bars[0].item() == 0.0  # step 0 is the clean image
    assert sde.sigma_bars[50].item() == pytest.approx(0.036573915675272795, rel=1e-12)


def test_sigma_bar_at_T_is_lambda():
    # dt makes exp(-thetabar_T) = eps, so sigma_bar_T = lambda sqrt(1 - eps^2): 1.25e-5 below lambda
    # for eps = 0.005 (the "1%" of a coarser bound is far looser than what the schedule gives).
    sde = IRSDE(max_sigma=50, eps=0.005)
    assert sde.sigma_bars[-1].item() == pytest.approx(sde.lam * math.sqrt(1 - 0.005 ** 2), rel=1e-12)
    assert abs(sde.sigma_bars[-1].item() / sde.lam - 1) < 2e-5
    assert sde.sigma_bar(100).shape == (1, 1, 1, 1)
    assert sde.sigma_bar(torch.tensor([0, 100])).flatten().tolist() == pytest.approx([0.0, sde.lam], rel=2e-5)


def test_forward_marginal_matches_simulated_sde():
    """Euler-Maruyama simulation of dx = theta (mu - x) dt + sqrt(2 lambda^2 theta) dw, 8 substeps per
    schedule step, 50k paths in float64, against mu_bar / sigma_bar at t = 25.

    Tolerances: the standard error of the mean is sigma_bar / sqrt(N) (0.45% of sigma_bar), that of the
    variance sqrt(2/N) (0.63% relative); the Euler bias, sum_i (theta_i dt)^2 / (2 * 8) < 2e-4 here,
    is negligible. Five standard errors plus margin: 2.5% of sigma_bar for the mean, 3.5% for the
    variance. Either would catch a wrong dt, a missing factor 2 in sigma_t^2 or a wrong exponent.
    """
    sde, t, n_paths, substeps = IRSDE(max_sigma=50), 25, 50_000, 8
    x0, mu = 0.8, 0.2
    gen = torch.Generator().manual_seed(0)
    x = torch.full((n_paths,), x0, dtype=torch.float64)
    h = sde.dt / substeps
    for i in range(1, t + 1):  # step i runs at rate thetas[i] (thetas_cumsum[i] - thetas_cumsum[i-1])
        theta = sde.thetas[i].item()
        diffusion = math.sqrt(2 * sde.lam ** 2 * theta * h)
        for _ in range(substeps):
            x = x + theta * (mu - x) * h + diffusion * torch.randn(n_paths, generator=gen, dtype=torch.float64)
    mean = sde.mu_bar(torch.tensor([[[[x0]]]]), torch.tensor([[[[mu]]]]), t).item()
    std = sde.sigma_bar(t).item()
    assert abs(x.mean().item() - mean) < 0.025 * std
    assert x.var().item() == pytest.approx(std ** 2, rel=0.035)


@pytest.mark.parametrize("t", [1, 25, 100])
def test_forward_marginal_matches_euler_moment_recursion(t):
    """The same SDE without sampling noise: Euler's mean and variance obey m <- m + theta h (mu - m),
    v <- (1 - theta h)^2 v + sigma^2 h; with 2000 substeps per step their O(h) bias is < 1e-4."""
    sde, substeps = IRSDE(max_sigma=50), 2000
    x0, mu = 0.8, 0.2
    m, v, h = x0, 0.0, sde.dt / substeps
    for i in range(1, t + 1):
        theta = sde.thetas[i].item()
        for _ in range(substeps):
            m, v = m + theta * h * (mu - m), (1 - theta * h) ** 2 * v + 2 * sde.lam ** 2 * theta * h
    mean = sde.mu_bar(torch.tensor([[[[x0]]]]), torch.tensor([[[[mu]]]]), t).item()
    assert m == pytest.approx(mean, rel=1e-4)
    assert v == pytest.approx(sde.sigma_bar(t).item() ** 2, rel=1e-4)


def test_q_sample_and_predict_x0_invert_each_other():
    sde = IRSDE(max_sigma=10)
    gen = torch.Generator().manual_seed(1)
    x0, mu, noise = (torch.rand(3, 3, 5, 7, generator=gen) for _ in range(3))
    t = torch.tensor([1, 37, 100])
    xt = sde.q_sample(x0, mu, t, noise)
    assert xt.dtype == torch.float32
    # At t=100 the x0 term is scaled by eps and recovered through 1/eps = 200: float32 rounding x 200.
    torch.testing.assert_close(sde.predict_x0(xt, mu, t, noise), x0, atol=2e-4, rtol=0)
    torch.testing.assert_close(sde.q_sample(x0, mu, 0, noise), x0)  # step 0 is the clean image


def information_form_posterior(sde: IRSDE, xt: float, x0: float, mu: float, t: int, s: int):
    """q(x_s | x_t, x0) by precision-weighted Bayes (a different route from the closed form):
    prior x_s ~ N(m_s, v_s); likelihood x_t = mu + A (x_s - mu) + N(0, lambda^2 (1 - A^2))."""
    dt, lam = sde.dt, sde.lam
    tb_t, tb_s = sde.thetas_cumsum[t].item() * dt, sde.thetas_cumsum[s].item() * dt
    m_s = mu + (x0 - mu) * math.exp(-tb_s)
    v_s = lam ** 2 * (1 - math.exp(-2 * tb_s))
    A = math.exp(-(tb_t - tb_s))
    v_ts = lam ** 2 * (1 - A ** 2)
    if v_s == 0.0:  # s = 0: x_s is x0 itself
        return x0, 0.0
    precision = 1 / v_s + A ** 2 / v_ts
    mean = (m_s / v_s + A * (xt - mu * (1 - A)) / v_ts) / precision
    return mean, 1 / precision


@pytest.mark.parametrize("t,s", [(1, 0), (2, 1), (50, 49), (100, 99), (100, 0), (60, 20), (7, 3)])
def test_posterior_matches_information_form(t, s):
    sde = IRSDE(max_sigma=10)
    xt, x0, mu = 0.45, 0.9, 0.3
    as_img = lambda v: torch.tensor([[[[v]]]], dtype=torch.float64)  # noqa: E731
    mean, var = sde.posterior_mean_var(as_img(xt), as_img(x0), as_img(mu), t, s)
    ref_mean, ref_var = information_form_posterior(sde, xt, x0, mu, t, s)
    assert mean.item() == pytest.approx(ref_mean, rel=1e-9, abs=1e-12)
    assert var.item() == pytest.approx(ref_var, rel=1e-9, abs=1e-15)


def test_optimal_prev_equals_one_step_posterior_mean():
    sde = IRSDE(max_sigma=10)
    gen = torch.Generator().manual_seed(2)
    xt, x0, mu = (torch.rand(4, 3, 6, 6, generator=gen) for _ in range(3))
    t = torch.tensor([1, 2, 55, 100])
    mean, var = sde.posterior_mean_var(xt, x0, mu, t, t - 1)
    torch.testing.assert_close(sde.optimal_prev(xt, x0, mu, t), mean, rtol=0, atol=0)
    assert var.shape == (4, 1, 1, 1) and var[0].item() == 0.0 and bool((var[1:] > 0).all())


def test_posterior_variance_is_zero_at_s0_and_marginals_compose():
    """Averaging q(x_s | x_t, x0) over x_t ~ q(x_t | x0) must give back q(x_s | x0):
    a B + b = C and a^2 v_t + var = v_s (so K-step jumps sample the right marginals)."""
    sde = IRSDE(max_sigma=10)
    for t, s in [(100, 0), (100, 75), (40, 13), (2, 1)]:
        a, b, var = (c.item() for c in sde.posterior_coefficients(t, s))
        B = math.exp(-sde.thetas_cumsum[t].item() * sde.dt)
        C = math.exp(-sde.thetas_cumsum[s].item() * sde.dt)
        assert a * B + b == pytest.approx(C, rel=1e-12)
        assert a ** 2 * sde.sigma_bars[t].item() ** 2 + var == pytest.approx(sde.sigma_bars[s].item() ** 2,
                                                                            rel=1e-12, abs=1e-18)
        if s == 0:
            assert var == 0.0 and a == 0.0 and b == pytest.approx(1.0, rel=1e-12)


def test_posterior_rejects_s_not_below_t():
    sde = IRSDE(max_sigma=10)
    x = torch.zeros(1, 3, 2, 2)
    with pytest.raises(ValueError, match="0 <= s < t"):
        sde.posterior_mean_var(x, x, x, 5, 5)
    with pytest.raises(ValueError, match="0..100"):
        sde.sigma_bar(101)


def test_reverse_mean_is_euler_step_of_reverse_sde():
    sde = IRSDE(max_sigma=10)
    gen = torch.Generator().manual_seed(3)
    xt, mu, eps = (torch.rand(1, 3, 4, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    t = 30
    theta, dt, lam = sde.thetas[t].item(), sde.dt, sde.lam
    score = -eps / sde.sigma_bars[t].item()
    expected = xt - (theta * (mu - xt) - 2 * lam ** 2 * theta * score) * dt
    torch.testing.assert_close(sde.reverse_mean(xt, mu, t, eps), expected, rtol=1e-12, atol=1e-15)


class TrueNoiseOracle:
    """Predicts the noise that produced x_t exactly: (x_t - m_t) / sqrt(v_t)."""

    def __init__(self, sde: IRSDE, x0: torch.Tensor):
        self.sde, self.x0 = sde, x0

    def __call__(self, xt, mu, t, context):
        return (xt - self.sde.mu_bar(self.x0, mu, t)) / self.sde.sigma_bar(t)


class MatchingOracle(TrueNoiseOracle):
    """Predicts the noise at which the Euler mean equals x*_{t-1} exactly (the loss minimiser)."""

    def __call__(self, xt, mu, t, context):
        target = self.sde.optimal_prev(xt, self.x0, mu, t)
        with_zero = self.sde.reverse_mean(xt, mu, t, torch.zeros_like(xt))
        per_unit = with_zero - self.sde.reverse_mean(xt, mu, t, torch.ones_like(xt))
        return (with_zero - target) / per_unit


def random_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, mu): four random 8x8 images each, the same every call."""
    gen = torch.Generator().manual_seed(4)
    return torch.rand(4, 3, 8, 8, generator=gen), torch.rand(4, 3, 8, 8, generator=gen)


def decay_and_std(sde: IRSDE, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e^{-thetabar_t} and sqrt(v_t) = lambda sqrt(1 - e^{-2 thetabar_t}) by hand, [B, 1, 1, 1] float32."""
    thetabar = (sde.thetas_cumsum[t] * sde.dt)[:, None, None, None]
    return torch.exp(-thetabar).float(), (sde.lam * torch.sqrt(-torch.expm1(-2 * thetabar))).float()


def test_matching_loss_oracles_and_backprop():
    sde = IRSDE(max_sigma=10)
    x0, mu = random_pair()

    def loss_of(model):
        return matching_loss(sde, model, x0, mu, None, generator=torch.Generator().manual_seed(5))

    zero_loss = loss_of(lambda xt, mu, t, c: torch.zeros_like(xt)).item()
    true_noise_loss = loss_of(TrueNoiseOracle(sde, x0)).item()
    minimiser_loss = loss_of(MatchingOracle(sde, x0)).item()
    # The true noise leaves only the Euler discretisation gap of the reverse step (O((theta dt)^2),
    # theta dt reaches 0.1 at large t): ~2% of the no-information loss here (t = 12, 15, 68, 86).
    assert zero_loss == pytest.approx(3.2227e-3, rel=1e-3)
    assert true_noise_loss == pytest.approx(7.5226e-5, rel=1e-3)
    assert true_noise_loss < 0.05 * zero_loss
    assert minimiser_loss < 1e-7

    weight = torch.zeros((), requires_grad=True)
    loss = loss_of(lambda xt, mu, t, c: weight * (xt - mu))
    assert torch.isfinite(loss) and loss.ndim == 0
    loss.backward()
    assert weight.grad is not None and weight.grad.item() != 0.0


def test_x0_loss_is_the_l1_of_the_x0_estimate_at_uniform_t():
    sde = IRSDE(max_sigma=10)
    x0, mu = random_pair()

    def loss_of(model):
        return x0_loss(sde, model, x0, mu, None, generator=torch.Generator().manual_seed(5))

    # The same draws by hand: t ~ U{1..100}, then the noise; a zero noise estimate leaves
    # x0_hat - x0 = e^{thetabar_t} sqrt(v_t) noise, the x_t noise scaled back to the x0 scale.
    draw = torch.Generator().manual_seed(5)
    t = torch.randint(1, 101, (4,), generator=draw)
    noise = torch.randn(x0.shape, generator=draw)
    decay, std = decay_and_std(sde, t)
    expected = (std / decay * noise).abs().mean().item()
    assert loss_of(lambda xt, mu, t, c: torch.zeros_like(xt)).item() == pytest.approx(expected, rel=1e-5)
    assert loss_of(TrueNoiseOracle(sde, x0)).item() < 1e-5
    assert expected > 1e-2

    weight = torch.zeros((), requires_grad=True)
    loss = loss_of(lambda xt, mu, t, c: weight * (xt - mu))
    loss.backward()
    assert weight.grad is not None and weight.grad.item() != 0.0
    with pytest.raises(ValueError, match="same shape"):
        x0_loss(sde, TrueNoiseOracle(sde, x0), x0, mu[:, :, :4], None)


def test_x0_psnr_loss_is_minus_the_mean_per_image_psnr():
    sde = IRSDE(max_sigma=10)
    x0 = torch.full((2, 3, 4, 4), 0.5)
    mu = x0.clone()

    def constant_error(errors):
        # A noise estimate whose x0 estimate is off by errors[i] everywhere in image i.
        def model(xt, mu_, t, c):
            wanted = x0 + torch.tensor(errors)[:, None, None, None]
            decay, std = decay_and_std(sde, t)
            return (xt - mu_ - decay * (wanted - mu_)) / std
        return model

    # Per image, then averaged: errors 0.1 and 0.01 are 20 and 40 dB, so the loss is -30.
    loss = x0_psnr_loss(sde, constant_error([0.1, 0.01]), x0, mu, None, generator=torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(-30.0, abs=1e-3)
    # A pixel loss would rank the two images 10:1; this one gains as much from either getting 10x better.
    better_small = x0_psnr_loss(sde, constant_error([0.1, 0.001]), x0, mu, None, generator=torch.Generator().manual_seed(0))
    better_large = x0_psnr_loss(sde, constant_error([0.01, 0.01]), x0, mu, None, generator=torch.Generator().manual_seed(0))
    # (float32 rounding of the x0 estimate, scaled up by e^{thetabar_t}, shows at a 0.001 error)
    assert better_small.item() == pytest.approx(-40.0, abs=0.05)
    assert better_large.item() == pytest.approx(-40.0, abs=1e-3)
    perfect = x0_psnr_loss(sde, TrueNoiseOracle(sde, x0), x0, mu + 0.2, None)
    assert perfect.item() < -60  # the 1e-8 floor, not -inf


def test_matching_loss_draws_t_and_noise_from_generator():
    sde = IRSDE(max_sigma=10)
    x0, mu = torch.full((2, 3, 4, 4), 0.7), torch.full((2, 3, 4, 4), 0.2)
    seen = []

    def spy(xt, mu, t, context):
        seen.append((t.clone(), xt.clone()))
        return torch.zeros_like(xt)

    for seed in (0, 0, 1):
        matching_loss(sde, spy, x0, mu, None, generator=torch.Generator().manual_seed(seed))
    assert seen[0][0].dtype == torch.long and 1 <= seen[0][0].min() and seen[0][0].max() <= 100
    assert torch.equal(seen[0][0], seen[1][0]) and torch.equal(seen[0][1], seen[1][1])
    assert not torch.equal(seen[0][1], seen[2][1])


def test_sample_timesteps_draws_only_the_chosen_steps():
    sde = IRSDE(max_sigma=10)
    t = sample_timesteps(sde, 1000, generator=torch.Generator().manual_seed(0), device=torch.device("cpu"),
                         choices=[100, 50])
    assert t.dtype == torch.long and set(t.tolist()) == {50, 100}
    assert 400 < int((t == 100).sum()) < 600  # uniform over the choices
    # None or empty: every step 1..T, as before the setting existed (the same draws).
    every = sample_timesteps(sde, 8, generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    assert torch.equal(every, torch.randint(1, 101, (8,), generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("loss", sorted(TRAINING_LOSSES))
def test_every_loss_trains_only_at_the_chosen_timesteps(loss):
    sde = IRSDE(max_sigma=10)
    x0, mu = random_pair()
    seen = []

    def spy(xt, mu, t, context):
        seen.append(t.clone())
        return torch.zeros_like(xt)

    TRAINING_LOSSES[loss](sde, spy, x0, mu, None, generator=torch.Generator().manual_seed(5), timesteps=[100])
    assert seen[0].tolist() == [100] * 4


def test_x0_loss_at_t_T_is_the_l1_of_the_x0_estimate_there():
    # The one-jump recipe (train.timesteps [T]): a zero noise estimate leaves x0_hat - x0 =
    # e^{thetabar_T} sqrt(v_T) noise, the noise drawn right after the (single-valued) t.
    sde = IRSDE(max_sigma=10)
    x0, mu = random_pair()
    draw = torch.Generator().manual_seed(5)
    torch.randint(0, 1, (4,), generator=draw)  # the draw of t among one choice
    noise = torch.randn(x0.shape, generator=draw)
    decay, std = decay_and_std(sde, torch.full((4,), 100))
    expected = (std / decay * noise).abs().mean().item()
    loss = x0_loss(sde, lambda xt, mu, t, c: torch.zeros_like(xt), x0, mu, None,
                   generator=torch.Generator().manual_seed(5), timesteps=[100])
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # About 1/eps = 200 times the x_T noise (std lambda = 0.039; E|z| = 0.8): 6.3 expected, 5.99 drawn.
    assert expected == pytest.approx(5.9936, rel=1e-4)
