"""Image-quality metrics under one fixed evaluation protocol (DESIGN.md, "Evaluation protocol").

- Inputs are float NCHW RGB tensors in [0, 1]. We evaluate the 8-bit images a user would save:
  the caller rounds both images to k/255 levels first (:func:`quantize_uint8`), as BasicSR's
  ``tensor2img`` does before ``calculate_psnr``/``calculate_ssim``.
- PSNR and SSIM drop ``border`` pixels on every side first (BasicSR ``crop_border``, default 4)
  and use data range 1, on RGB and on the BT.601 luma channel Y (BasicSR ``rgb2ycbcr(y_only=True)``;
  Y lives in [16/255, 235/255] but the data range stays 1, as in BasicSR's ``test_y_channel``).
- SSIM follows Wang et al. 2004 (IEEE TIP 13(4)): 11x11 Gaussian window, sigma 1.5, K1 0.01,
  K2 0.03, population (co)variances, statistics only where the window fits ('valid'), which is
  what BasicSR's ``_ssim`` and scikit-image's ``structural_similarity(gaussian_weights=True,
  use_sample_covariance=False)`` compute. RGB SSIM is the mean of the per-channel SSIMs.
- LPIPS (Zhang et al. 2018, AlexNet trunk, v0.1 linear heads) runs on the whole image, scaled to
  [-1, 1], and only with the real ImageNet AlexNet weights from the torch hub cache: we never
  download them and never compute "LPIPS" with a random trunk (DESIGN.md).

Every metric returns one value per image, shape [N], so callers can average per degradation.
"""

from __future__ import annotations

import hashlib
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

METRIC_NAMES = ("psnr", "ssim", "psnr_y", "ssim_y", "lpips")  # stable MLflow metric names

# ITU-R BT.601 luma for [0,1] RGB, scaled to 8-bit studio range (BasicSR rgb2ycbcr, y_only=True).
BT601_Y_WEIGHTS = (65.481, 128.553, 24.966)
BT601_Y_OFFSET = 16.0

# Wang et al. 2004, Sec. III-C: Gaussian window 11x11, sigma 1.5; K1, K2 stabilise the divisions.
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03

# torchvision's ImageNet AlexNet (AlexNet_Weights.IMAGENET1K_V1). The 8 hex digits in the name
# are the sha256 prefix torch.hub checks on download; we check the cached file the same way.
ALEXNET_FILENAME = "alexnet-owt-7be5be79.pth"
ALEXNET_SHA256_PREFIX = "7be5be79"
LPIPS_VERSION = "0.1"


# ----------------------------------------------------------------------------- pixel helpers

def quantize_uint8(img: Tensor) -> Tensor:
    """Round [0,1] values to the nearest of the 256 levels k/255 (what saving a PNG does)."""
    return torch.round(img.clamp(0.0, 1.0) * 255.0) / 255.0


def crop_border(img: Tensor, border: int) -> Tensor:
    """Drop ``border`` pixels from each side of the last two (H, W) dims; works for NCHW and CHW."""
    if border < 0:
        raise ValueError(f"border must be >= 0, got {border}")
    if border == 0:
        return img
    height, width = img.shape[-2:]
    if height <= 2 * border or width <= 2 * border:
        raise ValueError(f"cannot crop {border} px from each side of a {height}x{width} image; "
                         f"lower evaluate.crop_border or evaluate on larger images")
    return img[..., border:height - border, border:width - border]


def rgb_to_y(img: Tensor) -> Tensor:
    """BT.601 luma of [...,3,H,W] RGB in [0,1] -> [...,1,H,W] in [16/255, 235/255] (BasicSR)."""
    if img.shape[-3] != 3:
        raise ValueError(f"rgb_to_y needs 3 RGB channels in dim -3, got shape {tuple(img.shape)}")
    weights = torch.tensor(BT601_Y_WEIGHTS, dtype=img.dtype, device=img.device).view(3, 1, 1)
    return ((img * weights).sum(dim=-3, keepdim=True) + BT601_Y_OFFSET) / 255.0


def _check_pair(pred: Tensor, target: Tensor) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}; "
                         f"crop or resize the restoration to the ground truth first")
    if pred.ndim != 4:
        raise ValueError(f"metrics take NCHW batches, got shape {tuple(pred.shape)}; "
                         f"add a batch dimension with img[None]")
    for name, img in (("pred", pred), ("target", target)):
        # Catches the usual slip of passing [-1,1] model outputs straight to the metrics.
        if img.numel() and (img.min() < 0 or img.max() > 1):
            raise ValueError(f"{name} has values outside [0,1] (min {img.min().item():.4g}, "
                             f"max {img.max().item():.4g}); map model outputs with (x + 1) / 2 "
                             f"and round with quantize_uint8")


def _prepare(img: Tensor, border: int, y_channel: bool) -> Tensor:
    """float64 (accuracy: SSIM subtracts nearly equal moments), optional Y, then crop."""
    img = img.to(torch.float64)
    if y_channel:
        img = rgb_to_y(img)
    return crop_border(img, border)


# ----------------------------------------------------------------------------- PSNR / SSIM

def psnr(pred: Tensor, target: Tensor, *, border: int = 4, y_channel: bool = False) -> Tensor:
    """Per-image PSNR in dB, data range 1, shape [N]; +inf where the images are equal."""
    _check_pair(pred, target)
    x, y = _prepare(pred, border, y_channel), _prepare(target, border, y_channel)
    mse = (x - y).square().flatten(1).mean(dim=1)
    return 10.0 * torch.log10(1.0 / mse)  # 1/0 = inf -> +inf dB, as BasicSR returns


def _gaussian_window_1d(size: int, sigma: float, device: torch.device) -> Tensor:
    """Normalised 1-D Gaussian taps (cv2.getGaussianKernel / scipy's truncated kernel)."""
    radius = size // 2
    x = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    taps = torch.exp(-0.5 * (x / sigma) ** 2)
    return taps / taps.sum()


def _gaussian_filter_valid(maps: Tensor, taps: Tensor) -> Tensor:
    """Separable Gaussian blur of [B,1,H,W] maps, 'valid' region only (no padding)."""
    maps = F.conv2d(maps, taps.view(1, 1, -1, 1))
    return F.conv2d(maps, taps.view(1, 1, 1, -1))


def _ssim_per_channel(x: Tensor, y: Tensor) -> Tensor:
    """Mean SSIM map of each (image, channel) plane of float64 NCHW x, y in [0,1] -> [N, C]."""
    n, c, h, w = x.shape
    if h < SSIM_WINDOW or w < SSIM_WINDOW:
        raise ValueError(f"SSIM needs at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels after the border "
                         f"crop, got {h}x{w}; lower evaluate.crop_border or use larger images")
    planes_x, planes_y = x.reshape(n * c, 1, h, w), y.reshape(n * c, 1, h, w)
    # One convolution pass over the five moment maps instead of five separate calls.
    moments = torch.cat([planes_x, planes_y, planes_x * planes_x, planes_y * planes_y, planes_x * planes_y])
    mu_x, mu_y, e_xx, e_yy, e_xy = _gaussian_filter_valid(
        moments, _gaussian_window_1d(SSIM_WINDOW, SSIM_SIGMA, x.device)).chunk(5)
    # Population (co)variances (use_sample_covariance=False), Wang et al. 2004 eq. (13).
    var_x, var_y, cov_xy = e_xx - mu_x * mu_x, e_yy - mu_y * mu_y, e_xy - mu_x * mu_y
    c1, c2 = (SSIM_K1 * 1.0) ** 2, (SSIM_K2 * 1.0) ** 2  # data range 1
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / (
        (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(dim=1).view(n, c)


def ssim(pred: Tensor, target: Tensor, *, border: int = 4, y_channel: bool = False) -> Tensor:
    """Per-image SSIM (mean over channels for RGB), shape [N]; exactly 1 for equal images."""
    _check_pair(pred, target)
    x, y = _prepare(pred, border, y_channel), _prepare(target, border, y_channel)
    return _ssim_per_channel(x, y).mean(dim=1)


# ----------------------------------------------------------------------------- LPIPS

@dataclass(frozen=True)
class MetricAvailability:
    """Whether a metric can be computed here; ``reason`` tells the user what to do if not."""

    available: bool
    reason: str


def lpips_weights_path() -> Path:
    """Where torchvision (and so lpips) looks for the ImageNet AlexNet weights: the torch hub cache.

    ``torch.hub.get_dir()`` honours ``torch.hub.set_dir`` and ``$TORCH_HOME`` (default
    ``~/.cache/torch``), so the file is ``$TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth``.
    """
    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILENAME


def _lpips_linear_weights_path() -> Path:
    import lpips  # lazy: lpips imports torchvision, which the PSNR/SSIM path does not need

    return Path(lpips.__file__).parent / "weights" / f"v{LPIPS_VERSION}" / "alex.pth"


def _sha256_prefix(path: Path, length: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]


def _alexnet_missing_reason(path: Path) -> str:
    return (f"LPIPS unavailable: the AlexNet backbone weights are not at {path} and are never "
            f"downloaded here. Copy torchvision's {ALEXNET_FILENAME} "
            f"(https://download.pytorch.org/models/{ALEXNET_FILENAME}) to that path, or point "
            f"$TORCH_HOME at a cache that has hub/checkpoints/{ALEXNET_FILENAME}.")


def _trunk_state_from_torchvision(trunk: torch.nn.Module, alexnet_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename torchvision's ``features.<i>.*`` keys to lpips' ``slice<k>.<i>.*`` keys.

    lpips' ``pretrained_networks.alexnet`` puts ``features[i]`` into its slices under the module
    name ``str(i)``, so each slice child's name is the torchvision feature index.
    """
    renamed = {}
    for slice_name, slice_module in trunk.named_children():
        for index, layer in slice_module.named_children():
            for param_name in layer.state_dict():
                source = f"features.{index}.{param_name}"
                if source not in alexnet_state:
                    raise KeyError(f"{source} missing from the AlexNet state dict")
                renamed[f"{slice_name}.{index}.{param_name}"] = alexnet_state[source]
    return renamed


class LPIPSMetric:
    """LPIPS v0.1 with the AlexNet trunk; build it with :meth:`load`, never directly."""

    def __init__(self, model: torch.nn.Module, device: torch.device, weights_path: Path):
        self.model = model
        self.device = device
        self.weights_path = weights_path

    @classmethod
    def load(cls, device: str | torch.device = "cpu", *,
             verify_sha256: bool = True) -> "LPIPSMetric | MetricAvailability":
        """The metric, or ``MetricAvailability(False, reason)`` when it cannot be computed honestly.

        Offline by construction: the trunk is built with random weights (``pnet_rand=True``, so
        torchvision never fetches anything) and then overwritten from the hub-cache file; the
        linear heads come from the lpips wheel. Both loads are strict, so a partial file cannot
        leave random weights behind. ``verify_sha256`` checks the file against the hash prefix
        in its name (as torch.hub does on download), rejecting a stand-in file; tests that write
        a correctly shaped random file pass False.
        """
        try:
            import lpips
        except ImportError as e:  # pragma: no cover - lpips is a core dependency
            return MetricAvailability(False, f"LPIPS unavailable: cannot import lpips ({e}); pip install lpips")
        weights_path = lpips_weights_path()
        if not weights_path.is_file():
            return MetricAvailability(False, _alexnet_missing_reason(weights_path))
        found = _sha256_prefix(weights_path, len(ALEXNET_SHA256_PREFIX)) if verify_sha256 else None
        if found is not None and found != ALEXNET_SHA256_PREFIX:
            return MetricAvailability(False, (
                f"LPIPS unavailable: {weights_path} has sha256 prefix {found}, expected "
                f"{ALEXNET_SHA256_PREFIX}; it is not torchvision's ImageNet AlexNet. Replace it with "
                f"https://download.pytorch.org/models/{ALEXNET_FILENAME}."))
        linear_path = _lpips_linear_weights_path()
        if not linear_path.is_file():
            return MetricAvailability(False, (
                f"LPIPS unavailable: the lpips package has no linear-layer weights at {linear_path}; "
                f"reinstall lpips (pip install --force-reinstall lpips)."))
        try:
            alexnet_state = torch.load(weights_path, map_location="cpu", weights_only=True)
            linear_state = torch.load(linear_path, map_location="cpu", weights_only=True)
            with warnings.catch_warnings():  # lpips passes torchvision's deprecated pretrained=False
                warnings.simplefilter("ignore", UserWarning)
                model = lpips.LPIPS(pretrained=False, net="alex", version=LPIPS_VERSION,
                                    pnet_rand=True, verbose=False)
            model.net.load_state_dict(_trunk_state_from_torchvision(model.net, alexnet_state), strict=True)
            # The wheel stores heads as lin0..lin4; model.lins aliases the same modules.
            heads = {f"lin{i}.{k}" for i, head in enumerate(model.lins) for k in head.state_dict()}
            if set(linear_state) != heads:
                raise KeyError(f"linear-layer keys {sorted(linear_state)} in {linear_path} do not "
                               f"match lpips' {sorted(heads)}")
            model.load_state_dict(linear_state, strict=False)  # trunk + scaling buffers already set
        except (RuntimeError, KeyError, OSError, ValueError, EOFError, pickle.UnpicklingError) as e:
            return MetricAvailability(False, (
                f"LPIPS unavailable: could not load its weights (AlexNet trunk from {weights_path}, "
                f"linear heads from {linear_path}): {e}. Replace the trunk file with torchvision's "
                f"{ALEXNET_FILENAME} or reinstall lpips."))
        device = torch.device(device)
        return cls(model.eval().to(device), device, weights_path)

    def __call__(self, pred: Tensor, target: Tensor) -> Tensor:
        """Per-image LPIPS distance, shape [N], for NCHW RGB inputs in [0,1]."""
        _check_pair(pred, target)
        x = pred.to(self.device, torch.float32) * 2 - 1  # lpips expects [-1,1]
        y = target.to(self.device, torch.float32) * 2 - 1
        with torch.inference_mode():
            return self.model(x, y).reshape(x.shape[0])


# ----------------------------------------------------------------------------- protocol

def lpips_version() -> str:
    """Installed lpips package version (part of the logged protocol)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lpips")
    except PackageNotFoundError:
        return "not installed"


def image_metrics(pred: Tensor, target: Tensor, *, border: int = 4,
                  lpips: LPIPSMetric | None = None) -> dict[str, Tensor]:
    """All protocol metrics per image ([N] each), keyed by the stable names in METRIC_NAMES.

    ``lpips`` is included only when a loaded :class:`LPIPSMetric` is passed.
    """
    scores = {
        "psnr": psnr(pred, target, border=border),
        "ssim": ssim(pred, target, border=border),
        "psnr_y": psnr(pred, target, border=border, y_channel=True),
        "ssim_y": ssim(pred, target, border=border, y_channel=True),
    }
    if lpips is not None:
        scores["lpips"] = lpips(pred, target).to(scores["psnr"].device)
    return scores


def protocol_description(border: int, lpips_available: bool, lpips_reason: str = "") -> dict[str, str]:
    """The evaluation protocol as flat string params, to log with every run (DESIGN.md).

    ``lpips_reason`` is the :class:`MetricAvailability` reason when LPIPS is unavailable.
    """
    if lpips_available:
        lpips_text = (f"lpips {lpips_version()} v{LPIPS_VERSION}, AlexNet trunk ({ALEXNET_FILENAME}), "
                      f"inputs scaled to [-1,1], whole image (no border crop)")
    else:
        lpips_text = "unavailable: " + (lpips_reason.removeprefix("LPIPS unavailable: ") or "no AlexNet weights")
    return {
        "eval.protocol.input": "RGB in [0,1], rounded to 8-bit levels k/255 before scoring",
        "eval.protocol.border_crop": str(border),
        "eval.protocol.psnr": ("10*log10(1/MSE), data range 1, MSE over C,H,W of each image; "
                               "runs report the mean over images"),
        "eval.protocol.ssim": (f"Wang et al. 2004, Gaussian {SSIM_WINDOW}x{SSIM_WINDOW} sigma {SSIM_SIGMA}, "
                               f"K1 {SSIM_K1} K2 {SSIM_K2}, data range 1, population covariance, valid "
                               f"window positions, RGB = mean over channels"),
        "eval.protocol.y_channel": ("ITU-R BT.601 Y = (16 + 65.481 R + 128.553 G + 24.966 B) / 255 "
                                    "(BasicSR rgb2ycbcr y_only), data range 1"),
        "eval.protocol.lpips": lpips_text,
    }
