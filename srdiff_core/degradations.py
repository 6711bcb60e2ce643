"""Synthetic degradations for the embedded demo set: haze, rain, motion blur, low light.

Every degradation is a pure function ``(clean, rng, **ranges) -> degraded`` on a float32
HxWx3 image in [0, 1]. Its parameters are drawn from ``rng`` inside the ranges given as
keyword arguments, so one ``np.random.Generator`` state gives one exact output, and a
range of ``(v, v)`` pins a parameter (the tests use that). Outputs have the input's shape,
are float32 and are clipped to [0, 1].

These are stand-ins for the real paired datasets (RESIDE-6k, Rain100H, GoPro, LOL): each
follows the physical model those datasets were made with or measured under, at a cost of
milliseconds for a 96 px crop, and the default ranges are calibrated so that the demo set's
untouched inputs score like the benchmarks' published "input" rows (PSNR of LQ against GT;
tests/test_demo_data.py pins the demo set's per-degradation means to these ranges):

| degradation   | benchmark (input PSNR / SSIM as published)                          | demo target |
|---------------|---------------------------------------------------------------------|-------------|
| hazy          | RESIDE SOTS: about 12 dB indoor, 16 dB outdoor (figures commonly    | 12-18 dB    |
|               | quoted in dehazing papers, not checked against a table here)        |             |
| rainy         | Rain100H: 13.56 dB / 0.371 (Y channel; RCDNet, Wang et al. CVPR     | 12-15 dB    |
|               | 2020, Table 2; other papers quote 12-14 dB depending on the channel)|             |
| motion-blurry | GoPro test: about 25-26 dB (Nah et al. CVPR 2017 data; the figure   | 24-27 dB    |
|               | most deblurring papers' "blurry input" rows quote)                  |             |
| low-light     | LOL eval15: 7.77 dB / 0.126-0.19 (Jin, Yang & Tan, ECCV 2022,       | 7-10.5 dB   |
|               | Table 3; the SSIM differs with the implementation)                  |             |

The demo's crops are 96 px views of whole photographs, so each range was set by measuring the
generated set, not by copying the benchmarks' physical parameters.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
from scipy import ndimage

Range = tuple[float, float]
Degradation = Callable[..., np.ndarray]


# ----------------------------------------------------------------------------- helpers

def _check_image(clean: np.ndarray) -> np.ndarray:
    """Validate the common input contract and return the image as float32."""
    if not isinstance(clean, np.ndarray) or clean.ndim != 3 or clean.shape[2] != 3:
        shape = getattr(clean, "shape", None)
        raise ValueError(f"expected an HxWx3 RGB array, got shape {shape}; "
                         f"drop an alpha channel with img[..., :3] or stack a grey image to 3 channels")
    if not np.issubdtype(clean.dtype, np.floating):
        raise ValueError(f"expected a float image in [0, 1], got dtype {clean.dtype}; "
                         f"convert uint8 with img.astype(np.float32) / 255")
    lo, hi = float(clean.min()), float(clean.max())
    if not (0.0 <= lo and hi <= 1.0):
        raise ValueError(f"expected values in [0, 1], got [{lo:.4g}, {hi:.4g}]; "
                         f"rescale (uint8 / 255) or np.clip the image first")
    return clean.astype(np.float32, copy=False)


def _sample(rng: np.random.Generator, bounds: Range, name: str) -> float:
    """One uniform draw from [lo, hi]; lo == hi pins the parameter (still one draw, so the
    rng stream, and every later parameter, stays the same whichever ranges are pinned)."""
    lo, hi = bounds
    if lo > hi:
        raise ValueError(f"{name} range {bounds} has lower bound above upper bound; pass (low, high)")
    return float(rng.uniform(lo, hi))


def _sample_log(rng: np.random.Generator, bounds: Range, name: str) -> float:
    """Log-uniform draw: for scale parameters (photon counts) spanning a decade."""
    lo, hi = bounds
    if not 0 < lo <= hi:
        raise ValueError(f"{name} range {bounds} must satisfy 0 < low <= high")
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _finish(image: np.ndarray) -> np.ndarray:
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def _normalise(x: np.ndarray) -> np.ndarray:
    """Affine map to [0, 1]; a constant map becomes all zeros."""
    lo, hi = float(x.min()), float(x.max())
    if hi - lo < 1e-12:
        return np.zeros_like(x, dtype=np.float32)
    return ((x - lo) / (hi - lo)).astype(np.float32)


# ----------------------------------------------------------------------------- haze

def haze_depth_proxy(clean: np.ndarray, *, gradient_weight: float = 0.6,
                     blur_sigma_fraction: float = 0.05) -> np.ndarray:
    """Relative scene depth in [0, 1] (1 = far) guessed from image structure.

    Two cues, mixed by ``gradient_weight``: (1) a vertical gradient, far at the top, since
    in outdoor photographs the horizon and sky sit above the ground; (2) the blurred
    per-pixel dark channel min_c J_c. The dark channel prior (He, Sun & Tang, CVPR 2009)
    says haze-free near objects have a dark channel near 0 while bright, grey regions (sky,
    distant haze-washed objects) do not, so a high dark channel reads as far. (Plain inverse
    brightness would put the sky nearest, the opposite of how haze looks.) The blur keeps
    depth smooth, as transmission is, so haze does not trace texture.
    """
    h, w = clean.shape[:2]
    vertical = np.broadcast_to(np.linspace(1.0, 0.0, h, dtype=np.float32)[:, None], (h, w))
    dark_channel = clean.min(axis=2)
    sigma = blur_sigma_fraction * max(h, w)
    dark_smooth = ndimage.gaussian_filter(dark_channel, sigma=sigma, mode="reflect")
    return _normalise(gradient_weight * vertical + (1.0 - gradient_weight) * dark_smooth)


def add_haze(clean: np.ndarray, rng: np.random.Generator, *,
             beta_range: Range = (0.4, 1.0), airlight_range: Range = (0.7, 1.0),
             near_depth: float = 0.2) -> np.ndarray:
    """Haze by the atmospheric scattering model I = J t + A (1 - t), t = exp(-beta d).

    Koschmieder's law (1924), in the form of McCartney (1976) / Narasimhan & Nayar (2002),
    which is also how RESIDE synthesised its hazy images. d is :func:`haze_depth_proxy`
    mapped to [near_depth, 1] so even the nearest pixels get some haze; beta (scattering
    coefficient per unit of that depth) and the grey airlight A are drawn from the ranges.
    """
    clean = _check_image(clean)
    beta = _sample(rng, beta_range, "beta")
    airlight = _sample(rng, airlight_range, "airlight")
    depth = near_depth + (1.0 - near_depth) * haze_depth_proxy(clean)
    transmission = np.exp(-beta * depth)[..., None]
    return _finish(clean * transmission + airlight * (1.0 - transmission))


# ----------------------------------------------------------------------------- motion blur

def motion_blur_kernel(length: float, angle_deg: float) -> np.ndarray:
    """Normalised linear motion kernel: an anti-aliased line segment ``length`` pixels long.

    ``angle_deg`` is counter-clockwise from the image x axis (0 = horizontal, 90 = vertical).
    Each pixel's weight is max(0, 1 - distance from its centre to the segment), the
    approximate sub-pixel coverage of a 1-pixel-wide line (anti-aliasing), so non-integer
    lengths and any angle give a smooth kernel. The segment runs +/- (length - 1) / 2 about
    the centre, so length L at angle 0 is exactly an L-tap box, and length 1 is the identity.
    """
    if length < 1:
        raise ValueError(f"motion blur length must be >= 1 pixel, got {length}")
    half = (length - 1.0) / 2.0
    radius = math.ceil(half)  # a pixel with weight > 0 lies < 1 px from the segment
    coords = np.arange(-radius, radius + 1, dtype=np.float64)
    x, y = np.meshgrid(coords, coords)  # x: column offset, y: row offset (rows point down)
    theta = math.radians(angle_deg)
    direction = np.array([math.cos(theta), -math.sin(theta)])  # row axis points down
    along = np.clip(x * direction[0] + y * direction[1], -half, half)
    distance = np.hypot(x - along * direction[0], y - along * direction[1])
    kernel = np.clip(1.0 - distance, 0.0, None)
    return (kernel / kernel.sum()).astype(np.float32)


def convolve_reflect(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Convolve each channel of an HxWxC image with a 2-D kernel, reflect-padded borders.

    scipy.ndimage skips zero weights, so a thin line kernel costs about its length per pixel.
    """
    return ndimage.convolve(image, kernel[..., None], mode="reflect")


def camera_trajectory(rng: np.random.Generator, length: float, angle_deg: float, curvature: float,
                      points: int = 64) -> np.ndarray:
    """``points`` (x, y) positions of a camera path ``length`` pixels long, centred on its bounding box.

    A random walk of the heading, in the spirit of the trajectory model of Boracchi & Foi (IEEE
    TIP 2012) that DeblurGAN's synthetic blur also uses: the heading starts at ``angle_deg``
    (counter-clockwise from x, rows pointing down) and diffuses along the path (Brownian in arc
    length: over the whole path it turns by ``curvature * sqrt(length)`` radians of standard
    deviation). ``curvature`` 0 is a straight line, the classic linear kernel.
    """
    step = length / (points - 1)
    turns = rng.normal(0.0, curvature * math.sqrt(step), size=points - 1)
    turns[0] = 0.0  # the first segment runs at angle_deg
    headings = math.radians(angle_deg) + np.cumsum(turns)
    steps = step * np.stack([np.cos(headings), -np.sin(headings)], axis=1)
    xy = np.concatenate([np.zeros((1, 2)), np.cumsum(steps, axis=0)])
    return xy - (xy.max(axis=0) + xy.min(axis=0)) / 2.0


def trajectory_kernel(xy: np.ndarray) -> np.ndarray:
    """Blur kernel of a camera path: the average of the sharp frames at each position.

    GoPro's blurry images are the average of 7-13 consecutive sharp frames (Nah, Kim & Lee,
    CVPR 2017); averaging shifted copies of an image is a convolution with the sum of the
    shifts, each splatted bilinearly onto the pixel grid for sub-pixel positions.
    """
    radius = int(math.ceil(float(np.abs(xy).max()))) + 1
    kernel = np.zeros((2 * radius + 1, 2 * radius + 1), dtype=np.float64)
    for x, y in xy:
        x0, y0 = math.floor(x), math.floor(y)
        fx, fy = x - x0, y - y0
        for dx, dy, w in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
            kernel[radius + y0 + dy, radius + x0 + dx] += w
    return (kernel / kernel.sum()).astype(np.float32)


def add_motion_blur(clean: np.ndarray, rng: np.random.Generator, *,
                    length_range: Range = (5.0, 12.0), angle_range: Range = (0.0, 360.0),
                    curvature_range: Range = (0.0, 0.3)) -> np.ndarray:
    """Camera-shake blur B = J * k, k the frame average along a random camera path.

    The path (:func:`camera_trajectory`) is ``length`` pixels long, starts heading at ``angle``
    and bends with ``curvature``; the kernel is :func:`trajectory_kernel`. Lengths of 5-12 px on
    the demo's 96 px crops put the blurry inputs at GoPro's input PSNR (module docstring).
    """
    clean = _check_image(clean)
    length = _sample(rng, length_range, "length")
    angle = _sample(rng, angle_range, "angle")
    curvature = _sample(rng, curvature_range, "curvature")
    kernel = trajectory_kernel(camera_trajectory(rng, length, angle, curvature))
    return _finish(convolve_reflect(clean, kernel))


# ----------------------------------------------------------------------------- rain

def rain_layer(shape: tuple[int, int], rng: np.random.Generator, *, density: float, length: float,
               angle_from_vertical_deg: float, width_sigma: float, brightness: float) -> np.ndarray:
    """Streak intensity map in [0, brightness]: random drops smeared along one direction.

    Drops are sparse seeds with random intensity; convolving them with a line kernel turns
    each into a streak (the drop's motion during the exposure, as motion blur does to the
    scene). The convolution wraps around the borders: seeds are i.i.d. uniform, so a
    wrapped streak looks exactly like one entering from outside the frame.
    """
    h, w = shape
    is_drop = rng.random((h, w)) < density
    drop_intensity = rng.uniform(0.5, 1.0, size=(h, w))
    seeds = np.where(is_drop, drop_intensity, 0.0).astype(np.float32)
    kernel = motion_blur_kernel(length, 90.0 + angle_from_vertical_deg)
    kernel /= kernel.max()  # peak 1: a streak keeps its drop's intensity along its length
    streaks = np.minimum(ndimage.convolve(seeds, kernel, mode="wrap"), 1.0)
    # Blur across the streak for its width; rescale so the blur thins, not dims, a streak.
    thick = ndimage.gaussian_filter(streaks, sigma=width_sigma, mode="wrap")
    peak_gain = _gaussian_line_peak(width_sigma)
    return np.clip(thick / peak_gain, 0.0, 1.0) * brightness


def _gaussian_line_peak(sigma: float) -> float:
    """Peak of a 1-px line blurred by a Gaussian of std ``sigma`` (sampled as ndimage does)."""
    line = np.zeros(33, dtype=np.float64)
    line[16] = 1.0
    return float(ndimage.gaussian_filter1d(line, sigma)[16])


def add_rain(clean: np.ndarray, rng: np.random.Generator, *,
             density_range: Range = (0.008, 0.016), length_range: Range = (12.0, 30.0),
             angle_range: Range = (-20.0, 20.0), width_range: Range = (0.5, 1.0),
             brightness_range: Range = (0.55, 0.85), layers_range: Range = (1.0, 3.0),
             spread_range: Range = (5.0, 15.0)) -> np.ndarray:
    """Dense rain streaks screen-blended onto the image: O = 1 - (1 - J)(1 - R).

    Rain100H (Yang et al., CVPR 2017) is heavy rain in up to five streak directions. Here
    ``layers`` (1-3, rounded) layers of near-parallel streaks share the drops (``density`` is
    the total fraction of pixels that start a streak); their angles from vertical fan out
    symmetrically by +-``spread`` degrees around the drawn ``angle`` (positive leaning right at
    the bottom), so the mean streak direction is ``angle``. Each layer R_k is screen-blended in
    turn. Screen blending only brightens, like light scattered by the drops, and never
    overflows 1. ``length`` and ``width`` (Gaussian std across the streak) are in pixels.
    """
    clean = _check_image(clean)
    density = _sample(rng, density_range, "density")
    length = _sample(rng, length_range, "length")
    angle = _sample(rng, angle_range, "angle")
    width = _sample(rng, width_range, "width")
    brightness = _sample(rng, brightness_range, "brightness")
    layers = int(round(_sample(rng, layers_range, "layers")))
    spread = _sample(rng, spread_range, "spread")
    offsets = np.linspace(-spread, spread, layers) if layers > 1 else np.zeros(1)
    transmitted = 1.0 - clean
    for offset in offsets:
        layer = rain_layer(clean.shape[:2], rng, density=density / len(offsets), length=length,
                           angle_from_vertical_deg=angle + float(offset), width_sigma=width, brightness=brightness)
        transmitted = transmitted * (1.0 - layer[..., None])
    return _finish(1.0 - transmitted)


# ----------------------------------------------------------------------------- low light

def add_low_light(clean: np.ndarray, rng: np.random.Generator, *,
                  gamma_range: Range = (1.2, 1.8), gain_range: Range = (0.08, 0.22),
                  photons_range: Range = (300.0, 3000.0), read_noise_range: Range = (0.002, 0.01),
                  tint_range: Range = (0.8, 1.1)) -> np.ndarray:
    """Under-exposure: x = gain * tint_c * J^gamma, Poisson-Gaussian sensor noise, then 8-bit levels.

    gamma > 1 darkens shadows more than highlights and gain < 1 scales the exposure, which
    together lower the mean about 6-20x with the default ranges, towards LOL's dark inputs.
    ``tint_c`` is one gain per colour channel (each drawn from ``tint_range``): LOL's low-light
    shots have a colour cast as well as noise, since a camera's white balance drifts in the dark.
    Noise follows the Poisson-Gaussian model of Foi et al. (IEEE TIP 2008):
    y = Poisson(photons * x) / photons + N(0, read_noise^2), i.e. var(y) = x / photons +
    read_noise^2, where ``photons`` is the photon count of a full-scale pixel (drawn
    log-uniformly). The result is clipped to [0, 1] and rounded to the 1/255 grid, as a
    camera's 8-bit output is, so a later uint8 conversion is exact and shows the banding
    that real dark JPEGs have.
    """
    clean = _check_image(clean)
    gamma = _sample(rng, gamma_range, "gamma")
    gain = _sample(rng, gain_range, "gain")
    photons = _sample_log(rng, photons_range, "photons")
    read_noise = _sample(rng, read_noise_range, "read_noise")
    tint = np.array([_sample(rng, tint_range, "tint") for _ in range(3)])
    dark = gain * tint * clean.astype(np.float64) ** gamma
    shot = rng.poisson(dark * photons) / photons
    noisy = shot + rng.normal(0.0, read_noise, size=dark.shape)
    return _finish(np.round(np.clip(noisy, 0.0, 1.0) * 255.0) / 255.0)


# ----------------------------------------------------------------------------- registry

DEGRADATIONS: dict[str, Degradation] = {
    "hazy": add_haze,
    "rainy": add_rain,
    "motion-blurry": add_motion_blur,
    "low-light": add_low_light,
}


def degrade(name: str, clean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Apply the degradation called ``name`` (one of config.DEGRADATIONS) with default ranges."""
    try:
        fn = DEGRADATIONS[name]
    except KeyError:
        raise ValueError(f"unknown degradation {name!r}; valid names: {', '.join(DEGRADATIONS)}") from None
    return fn(clean, rng)
