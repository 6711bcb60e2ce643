"""IR-SDE: the mean-reverting SDE of Luo et al., "Image Restoration with Mean-Reverting Stochastic
Differential Equations" (ICML 2023), and its "matching" training loss.

The forward process drifts a clean image x0 towards the degraded image mu while adding noise:

    dx = theta_t (mu - x) dt + sigma_t dw,   sigma_t^2 = 2 lambda^2 theta_t   (IR-SDE, the mean-reverting SDE)

whose solution is Gaussian in closed form (IR-SDE, "closed-form solution"):

    x_t | x0 ~ N(m_t, v_t),  m_t = mu + (x0 - mu) e^{-thetabar_t},  v_t = lambda^2 (1 - e^{-2 thetabar_t})

so its stationary law is N(mu, lambda^2): at t = T the state is "mu plus noise of std lambda", which
is exactly where sampling starts. Everything here is schedule math (no network). Discrete step i
of the schedule lasts ``dt`` and has the constant rate ``thetas[i]``; thetabar_i is the integral of
theta from 0 to step i, i.e. ``thetas_cumsum[i] * dt``.

Conventions: images are float NCHW; ``t`` is an int or a LongTensor [B] of step indices in 0..T.
Schedule coefficients are computed in float64 and cast to the data's dtype at the end, because
exp(thetabar_T) = 1/eps = 200 amplifies float32 rounding of the exponent.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from srdiff_core.config import SDEConfig

# model(x_t, mu, t, context) -> predicted noise, the signature of ConditionalUNet.forward.
NoiseModel = Callable[[Tensor, Tensor, Tensor, "Tensor | None"], Tensor]


# ------------------------------------------------------------------------------ schedule

def cosine_thetas(T: int, s: float = 0.008) -> Tensor:
    """theta_0..theta_T (float64, T+1 values) of the IR-SDE cosine schedule.

    The IR-SDE code reuses the cosine alpha-bar of Nichol & Dhariwal (2021, eq. 17) on a grid of
    T+2 intervals and takes theta_i = 1 - alphabar_i for i = 1..T+1 (dropping both ends, so no
    theta is exactly 0 or 1). theta grows from ~0 to ~1: slow mean reversion near the clean image,
    fast near the degraded one.
    """
    n = T + 2
    x = torch.linspace(0, n, n + 1, dtype=torch.float64)
    alphas_cumprod = torch.cos(((x / n) + s) / (1 + s) * math.pi * 0.5) ** 2
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    return 1 - alphas_cumprod[1:-1]


SCHEDULES: dict[str, Callable[[int], Tensor]] = {"cosine": cosine_thetas}


class IRSDE:
    """Schedule of the IR-SDE: thetas, their running sum and the marginal std, indexed 0..T.

    ``thetas_cumsum[0] == 0`` (thetabar at the clean image) and ``dt`` is chosen so that
    exp(-thetabar_T) = eps: the mean at t = T keeps only a fraction eps of (x0 - mu), and the
    marginal std there is lambda * sqrt(1 - eps^2) (within 1.3e-5 of lambda for eps = 0.005).
    """

    def __init__(self, max_sigma: float, T: int = 100, eps: float = 0.005, schedule: str = "cosine"):
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown IR-SDE schedule '{schedule}'; use one of {sorted(SCHEDULES)}")
        if T < 2:
            raise ValueError(f"IR-SDE needs T >= 2 steps, got T={T}")
        if not 0 < eps < 1:
            raise ValueError(f"eps is the fraction of (x0 - mu) left at t=T and must lie in (0, 1), got {eps}")
        if max_sigma <= 0:
            raise ValueError(f"max_sigma must be positive (in 0..255 pixel units), got {max_sigma}")
        self.max_sigma = float(max_sigma)
        self.lam = self.max_sigma / 255.0  # lambda: stationary std on the [0,1] image scale
        self.T = int(T)
        self.eps = float(eps)
        self.schedule = schedule

        thetas = SCHEDULES[schedule](self.T)
        # Subtracting theta_0 makes thetabar_0 = 0, i.e. step 0 *is* the clean image (IR-SDE code).
        thetas_cumsum = torch.cumsum(thetas, dim=0) - thetas[0]
        # exp(-thetas_cumsum[T] * dt) = eps fixes the duration of one step.
        self.dt = -math.log(self.eps) / thetas_cumsum[-1].item()
        self.thetas = thetas
        self.thetas_cumsum = thetas_cumsum
        # Forward marginal std (IR-SDE, closed-form solution): sqrt(v_t) = lambda sqrt(1 - e^{-2 thetabar_t}).
        self.sigma_bars = self._sigma_bar64(thetas_cumsum * self.dt)
        self._device_cache: dict[torch.device, dict[str, Tensor]] = {}

    @classmethod
    def from_config(cls, cfg: "SDEConfig") -> "IRSDE":
        return cls(max_sigma=cfg.max_sigma, T=cfg.T, eps=cfg.eps, schedule=cfg.schedule)

    def __repr__(self) -> str:
        return (f"IRSDE(max_sigma={self.max_sigma}, T={self.T}, eps={self.eps}, "
                f"schedule='{self.schedule}', lam={self.lam:.5f}, dt={self.dt:.5f})")

    def to(self, device: torch.device | str) -> "IRSDE":
        """Move the float64 buffers to ``device`` (optional: lookups follow the device of ``t``)."""
        device = torch.device(device)
        self.thetas = self.thetas.to(device)
        self.thetas_cumsum = self.thetas_cumsum.to(device)
        self.sigma_bars = self.sigma_bars.to(device)
        return self

    # -------------------------------------------------------------- coefficient helpers

    def _lookup(self, name: str, t: Tensor | int) -> Tensor:
        """float64 ``thetabar`` (thetas_cumsum * dt) or ``theta_dt`` (thetas * dt) at steps ``t``,
        on the device of ``t``. Per-device copies are cached, so a CUDA ``t`` never forces a host sync."""
        t = _as_index(t, self.T)
        tables = self._device_cache.get(t.device)
        if tables is None:
            tables = {"thetabar": (self.thetas_cumsum * self.dt).to(t.device),
                      "theta_dt": (self.thetas * self.dt).to(t.device)}
            self._device_cache[t.device] = tables
        return tables[name][t]

    def _thetabar(self, t: Tensor | int) -> Tensor:
        return self._lookup("thetabar", t)

    def sigma_bar(self, t: Tensor | int) -> Tensor:
        """Forward marginal std sqrt(v_t), float32 [B,1,1,1] (broadcasts against NCHW)."""
        return _broadcast(self._sigma_bar64(self._thetabar(t)), 4, torch.float32)

    def _sigma_bar64(self, thetabar: Tensor) -> Tensor:
        # expm1 keeps full precision near t = 0, where 1 - e^{-2 thetabar} would cancel.
        return self.lam * torch.sqrt(-torch.expm1(-2 * thetabar))

    def input_scales(self, residual_std: float) -> Tensor:
        """1 / sqrt(v_t + e^{-2 thetabar_t} s^2) for t = 0..T (float32): the reciprocal std of
        x_t - mu under the forward marginal when the clean residual x0 - mu has std ``s``, i.e.
        EDM's input preconditioning c_in (Karras et al. 2022, sec. 5 and table 1)."""
        thetabar = self.thetas_cumsum * self.dt
        variance = self._sigma_bar64(thetabar) ** 2 + torch.exp(-2 * thetabar) * residual_std ** 2
        return variance.rsqrt().to(torch.float32)

    def x0_coefficients(self, residual_std: float = 0.0) -> Tensor:
        """[4, T+1] float32 rows (decay, std, skip, out) for t = 0..T, for a network whose output F
        gives the clean residual as x0 - mu = skip (x_t - mu) + out F, and the noise as
        eps = (x_t - mu - decay (x0 - mu)) / std, from x_t = mu + e^{-thetabar_t}(x0 - mu) + sqrt(v_t) eps.

        decay = e^{-thetabar_t}, std = sqrt(v_t) (1 at t = 0, where v_0 = 0: the network never runs there).
        ``residual_std`` s > 0: EDM's c_skip and c_out (Karras et al., NeurIPS 2022, eq. 7 and table 1)
        for this SDE, with y = x_t - mu = decay r + std n and r = x0 - mu of std s: skip = decay s^2 /
        (decay^2 s^2 + v_t), the least-squares linear estimate of r from y, and out = s std /
        sqrt(decay^2 s^2 + v_t), the std of what it leaves. So near t = 0 the output is x_t itself plus
        a small correction, which a small network need not learn to copy. s = 0: skip 0, out 1.
        """
        thetabar = self.thetas_cumsum * self.dt
        decay, std = torch.exp(-thetabar), self._sigma_bar64(thetabar)
        if residual_std > 0:
            total = decay ** 2 * residual_std ** 2 + std ** 2
            skip, out = decay * residual_std ** 2 / total, residual_std * std / total.sqrt()
        else:
            skip, out = torch.zeros_like(decay), torch.ones_like(decay)
        std = torch.where(std > 0, std, torch.ones_like(std))
        return torch.stack([decay, std, skip, out]).to(torch.float32)

    # -------------------------------------------------------------- forward process

    def mu_bar(self, x0: Tensor, mu: Tensor, t: Tensor | int) -> Tensor:
        """Forward marginal mean m_t = mu + (x0 - mu) e^{-thetabar_t} (IR-SDE closed-form solution)."""
        decay = _broadcast(torch.exp(-self._thetabar(t)), x0.ndim, x0.dtype)
        return mu + (x0 - mu) * decay.to(x0.device)

    def q_sample(self, x0: Tensor, mu: Tensor, t: Tensor | int, noise: Tensor) -> Tensor:
        """x_t = m_t + sqrt(v_t) * noise, a draw from the forward marginal p(x_t | x0)."""
        std = _broadcast(self._sigma_bar64(self._thetabar(t)), x0.ndim, x0.dtype).to(x0.device)
        return self.mu_bar(x0, mu, t) + std * noise

    def predict_x0(self, xt: Tensor, mu: Tensor, t: Tensor | int, noise_pred: Tensor) -> Tensor:
        """Invert x_t = mu + (x0 - mu) e^{-thetabar_t} + sqrt(v_t) eps for x0 given a noise estimate."""
        thetabar = self._thetabar(t)
        growth = _broadcast(torch.exp(thetabar), xt.ndim, xt.dtype).to(xt.device)
        std = _broadcast(self._sigma_bar64(thetabar), xt.ndim, xt.dtype).to(xt.device)
        return mu + (xt - mu - std * noise_pred) * growth

    # -------------------------------------------------------------- reverse process

    def reverse_mean(self, xt: Tensor, mu: Tensor, t: Tensor | int, noise_pred: Tensor) -> Tensor:
        """Mean of one Euler-Maruyama step t -> t-1 of the reverse-time SDE.

        Reverse SDE (IR-SDE, after Anderson 1982): dx = [theta_t (mu - x) - sigma_t^2 score] dt + sigma_t dw_bar,
        with the score from the noise estimate, score = -eps / sqrt(v_t) (IR-SDE, ground-truth score).
        Stepping backwards by dt: x_{t-1} = x_t - [theta_t (mu - x_t) - sigma_t^2 score] dt.
        """
        theta_dt = self._lookup("theta_dt", t)
        sigma2_dt = 2 * self.lam ** 2 * theta_dt  # sigma_t^2 dt = 2 lambda^2 theta_t dt
        # -sigma_t^2 score dt = sigma_t^2 dt * eps / sqrt(v_t): folded into one float64 coefficient.
        noise_coef = sigma2_dt / self._sigma_bar64(self._thetabar(t))
        drift_coef = _broadcast(theta_dt, xt.ndim, xt.dtype).to(xt.device)
        noise_coef = _broadcast(noise_coef, xt.ndim, xt.dtype).to(xt.device)
        return xt - drift_coef * (mu - xt) - noise_coef * noise_pred

    def posterior_coefficients(self, t: Tensor | int, s: Tensor | int) -> tuple[Tensor, Tensor, Tensor]:
        """(a, b, var) in float64 with q(x_s | x_t, x0) = N(mu + a (x_t - mu) + b (x0 - mu), var), 0 <= s < t.

        Bayes on two Gaussians from the closed-form solution: x_s | x0 ~ N(mu + e^{-thetabar_s}(x0 - mu), v_s)
        and, since the OU process restarted at s is again the same SDE,
        x_t | x_s ~ N(mu + e^{-(thetabar_t - thetabar_s)}(x_s - mu), lambda^2 (1 - e^{-2(thetabar_t - thetabar_s)})).
        With A = e^{-(thetabar_t - thetabar_s)}, B = e^{-thetabar_t}, C = e^{-thetabar_s} (so B = A C):
            a = A (1 - C^2) / (1 - B^2),  b = C (1 - A^2) / (1 - B^2),
            var = lambda^2 (1 - A^2)(1 - C^2) / (1 - B^2).
        For s = t - 1 this is IR-SDE Proposition 3.1 (the optimal reverse state x*_{t-1}).
        """
        t = _as_index(t, self.T)
        s = _as_index(s, self.T).to(t.device)
        if s.device.type == "cpu" and (bool((s < 0).any()) or bool((s >= t).any())):
            raise ValueError("posterior q(x_s | x_t, x0) needs 0 <= s < t for every element; "
                             f"got t={t.tolist()}, s={s.tolist()}")
        thetabar_t, thetabar_s = self._thetabar(t), self._thetabar(s)
        one_minus_A2 = -torch.expm1(-2 * (thetabar_t - thetabar_s))
        one_minus_B2 = -torch.expm1(-2 * thetabar_t)
        one_minus_C2 = -torch.expm1(-2 * thetabar_s)
        A = torch.exp(-(thetabar_t - thetabar_s))
        C = torch.exp(-thetabar_s)
        a = A * one_minus_C2 / one_minus_B2
        b = C * one_minus_A2 / one_minus_B2
        var = self.lam ** 2 * one_minus_A2 * one_minus_C2 / one_minus_B2
        return a, b, var

    def posterior_mean_var(self, xt: Tensor, x0: Tensor, mu: Tensor, t: Tensor | int,
                           s: Tensor | int) -> tuple[Tensor, Tensor]:
        """Mean and variance of the Gaussian q(x_s | x_t, x0) for any 0 <= s < t (variance [B,1,1,1])."""
        a, b, var = self.posterior_coefficients(t, s)
        a = _broadcast(a, xt.ndim, xt.dtype).to(xt.device)
        b = _broadcast(b, xt.ndim, xt.dtype).to(xt.device)
        mean = mu + a * (xt - mu) + b * (x0 - mu)
        return mean, _broadcast(var, xt.ndim, xt.dtype).to(xt.device)

    def optimal_prev(self, xt: Tensor, x0: Tensor, mu: Tensor, t: Tensor | int) -> Tensor:
        """The optimal reverse state x*_{t-1} given x0 (IR-SDE Proposition 3.1), the matching-loss target."""
        t = _as_index(t, self.T)
        mean, _ = self.posterior_mean_var(xt, x0, mu, t, t - 1)
        return mean


# ------------------------------------------------------------------------------ loss

def sample_timesteps(sde: IRSDE, batch: int, *, generator: torch.Generator | None, device: torch.device,
                     choices: Sequence[int] | None = None) -> Tensor:
    """t ~ U{1..T} (t = 0 is the clean image: there is nothing to learn there), or uniform over
    ``choices`` (train.timesteps: the steps a few-step sampler queries the network at)."""
    gen_device = generator.device if generator is not None else device
    if not choices:
        return torch.randint(1, sde.T + 1, (batch,), generator=generator, device=gen_device).to(device)
    index = torch.randint(0, len(choices), (batch,), generator=generator, device=gen_device)
    return torch.as_tensor(list(choices), device=gen_device)[index].to(device)


def randn_like_from(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like ``x``, drawn on the generator's device and then moved,
    so a CPU generator gives the same numbers whatever device the data lives on."""
    gen_device = generator.device if generator is not None else x.device
    noise = torch.randn(x.shape, generator=generator, device=gen_device, dtype=torch.float32)
    return noise.to(device=x.device, dtype=x.dtype)


def _noised_prediction(sde: IRSDE, model: NoiseModel, x0: Tensor, mu: Tensor, context: Tensor | None,
                       generator: torch.Generator | None,
                       timesteps: Sequence[int] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """What every training loss starts from: t (:func:`sample_timesteps`, over ``timesteps`` when
    given), then the noise (both from ``generator``, in that order), x_t ~ p(x_t | x0) and the
    network's noise estimate there, cast to the data's dtype (the model may run under autocast;
    the losses compare in the data's precision).
    Returns (x_t, t, noise estimate)."""
    if x0.shape != mu.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and mu {tuple(mu.shape)} must have the same shape "
                         f"(crop GT and LQ to the same patch)")
    t = sample_timesteps(sde, x0.shape[0], generator=generator, device=x0.device, choices=timesteps)
    noise = randn_like_from(x0, generator)
    xt = sde.q_sample(x0, mu, t, noise)
    return xt, t, model(xt, mu, t, context).to(xt.dtype)


def matching_loss(sde: IRSDE, model: NoiseModel, x0: Tensor, mu: Tensor, context: Tensor | None, *,
                  generator: torch.Generator | None = None, timesteps: Sequence[int] | None = None) -> Tensor:
    """IR-SDE maximum-likelihood ("matching") loss: L1 between the reverse-SDE step mean built from
    the predicted noise and the optimal x*_{t-1} (IR-SDE Sec. 3.2, Proposition 3.1). Scalar mean.

    ``x0`` is the clean image, ``mu`` the degraded one; ``generator`` draws t and the noise.
    """
    xt, t, noise_pred = _noised_prediction(sde, model, x0, mu, context, generator, timesteps)
    return F.l1_loss(sde.reverse_mean(xt, mu, t, noise_pred), sde.optimal_prev(xt, x0, mu, t))


def _x0_estimate(sde: IRSDE, model: NoiseModel, x0: Tensor, mu: Tensor, context: Tensor | None,
                 generator: torch.Generator | None, timesteps: Sequence[int] | None = None) -> Tensor:
    """The network's x0 estimate at the x_t the matching loss would draw from ``generator``."""
    xt, t, noise_pred = _noised_prediction(sde, model, x0, mu, context, generator, timesteps)
    return sde.predict_x0(xt, mu, t, noise_pred)


def x0_loss(sde: IRSDE, model: NoiseModel, x0: Tensor, mu: Tensor, context: Tensor | None, *,
            generator: torch.Generator | None = None, timesteps: Sequence[int] | None = None) -> Tensor:
    """L1 between the clean image and the network's x0 estimate, t ~ U{1..T} or
    ``timesteps`` (train.loss x0).

    The matching loss weighs the x0 error at step t by the posterior's x0 coefficient
    (``posterior_coefficients(t, t - 1)``'s b), which falls from 1 at t = 1 to 1e-3 at t = T with
    eps 0.005: the estimate a few-step sampler starts from is the one trained least. This loss
    weighs every step alike, the x0 objective of Cold Diffusion (Bansal et al., NeurIPS 2023).
    """
    return F.l1_loss(_x0_estimate(sde, model, x0, mu, context, generator, timesteps), x0)


def x0_psnr_loss(sde: IRSDE, model: NoiseModel, x0: Tensor, mu: Tensor, context: Tensor | None, *,
                 generator: torch.Generator | None = None, timesteps: Sequence[int] | None = None) -> Tensor:
    """Minus the mean per-image PSNR of the x0 estimate, t as for x0_loss (train.loss x0_psnr):
    10 log10(MSE_i) averaged over the batch, NAFNet's PSNR loss (Chen et al., ECCV 2022).

    Per image on a log scale, so an image its input already matches closely (mild motion blur)
    weighs as much as a dark or hazy one, whose errors are ten times larger: under a pixel
    loss the network learns the large corrections first and lets them leak into the small.
    It is also what the evaluation averages (per-image PSNR).
    """
    estimate = _x0_estimate(sde, model, x0, mu, context, generator, timesteps)
    mse = (estimate.float() - x0.float()).pow(2).flatten(1).mean(1)
    # 1e-8: a perfect patch (MSE 0) gives -80 dB, not -inf (NAFNet's PSNRLoss adds the same).
    return 10.0 * torch.log10(mse + 1e-8).mean()


TRAINING_LOSSES = {"matching": matching_loss, "x0": x0_loss, "x0_psnr": x0_psnr_loss}


# ------------------------------------------------------------------------------ helpers

def _as_index(t: Tensor | int, T: int) -> Tensor:
    """Timestep(s) as a 1-D int64 tensor. CPU indices are range-checked; accelerator ones are not,
    since the check would stall the host on every call (an out-of-range index still fails there)."""
    if isinstance(t, Tensor):
        if t.is_floating_point():
            raise TypeError(f"timesteps must be integer step indices 0..{T}, got a {t.dtype} tensor")
        t = t.reshape(-1).long()
    else:
        t = torch.tensor([int(t)], dtype=torch.long)
    if t.device.type == "cpu" and t.numel() and (bool((t < 0).any()) or bool((t > T).any())):
        raise ValueError(f"timesteps must lie in 0..{T}, got min {t.min().item()} max {t.max().item()}")
    return t


def _broadcast(coef: Tensor, ndim: int, dtype: torch.dtype) -> Tensor:
    """[B] float64 coefficients -> [B, 1, ..., 1] in the data dtype, ready to scale an NCHW batch."""
    return coef.to(dtype).reshape(-1, *([1] * (ndim - 1)))
