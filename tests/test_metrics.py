"""Metrics against hand-computed values and scikit-image; LPIPS loading strictly offline."""

from __future__ import annotations

import math
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from srdiff_core import metrics
from srdiff_core.metrics import (
    LPIPSMetric,
    MetricAvailability,
    crop_border,
    image_metrics,
    lpips_weights_path,
    protocol_description,
    psnr,
    quantize_uint8,
    rgb_to_y,
    ssim,
)


def _random_pair(n: int = 2, h: int = 23, w: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit-quantised target and a noisy, clipped prediction (the protocol's inputs)."""
    g = torch.Generator().manual_seed(seed)
    target = quantize_uint8(torch.rand(n, 3, h, w, generator=g))
    pred = quantize_uint8(target + 0.1 * torch.randn(n, 3, h, w, generator=g))
    return pred, target


def _hwc64(img: torch.Tensor) -> np.ndarray:
    return img.permute(1, 2, 0).double().numpy()


def _skimage_ssim(pred: np.ndarray, target: np.ndarray) -> float:
    return structural_similarity(target, pred, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False, data_range=1.0, channel_axis=-1)


# ----------------------------------------------------------------------------- pixel helpers

def test_crop_border_hand_values_nchw_and_chw():
    img = torch.arange(20.0).view(1, 1, 4, 5)
    assert crop_border(img, 1).tolist() == [[[[6.0, 7.0, 8.0], [11.0, 12.0, 13.0]]]]
    assert crop_border(img[0], 1).tolist() == [[[6.0, 7.0, 8.0], [11.0, 12.0, 13.0]]]
    assert crop_border(img, 0) is img
    with pytest.raises(ValueError, match="crop_border"):
        crop_border(img, 2)  # 4 rows cannot lose 2 on each side
    with pytest.raises(ValueError, match=">= 0"):
        crop_border(img, -1)


def test_rgb_to_y_bt601_on_pure_colours():
    # red, green, blue, white, black as a 1x5 image
    img = torch.tensor([[[1, 0, 0, 1, 0]], [[0, 1, 0, 1, 0]], [[0, 0, 1, 1, 0]]], dtype=torch.float64)
    y = rgb_to_y(img[None])
    assert y.shape == (1, 1, 1, 5)
    expected = [(16 + 65.481) / 255, (16 + 128.553) / 255, (16 + 24.966) / 255, 235 / 255, 16 / 255]
    torch.testing.assert_close(y.flatten(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="3 RGB channels"):
        rgb_to_y(torch.zeros(1, 1, 2, 2))


def test_quantize_uint8_rounds_to_k_over_255_and_clamps():
    x = torch.tensor([-0.2, 0.0, 0.5, 1 / 255 * 0.49, 1 / 255 * 0.51, 1.0, 1.3])
    levels = quantize_uint8(x) * 255
    assert levels.tolist() == pytest.approx([0, 0, 128, 0, 1, 255, 255], abs=1e-4)  # float32 re-scaling


# ----------------------------------------------------------------------------- PSNR / SSIM
# Tolerances vs scikit-image are 1e-8: the computations agree to rounding, and a looser bound
# would miss e.g. K2 = 0.031 instead of 0.03 (an SSIM shift of ~2e-5 on these inputs).

def test_identical_images_give_inf_psnr_and_unit_ssim():
    _, target = _random_pair()
    for y_channel in (False, True):
        assert torch.isinf(psnr(target, target.clone(), y_channel=y_channel)).all()
        torch.testing.assert_close(ssim(target, target.clone(), y_channel=y_channel),
                                   torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-12)


def test_constant_pair_psnr_is_20_db_and_ssim_is_the_luminance_term():
    pred = torch.full((1, 3, 16, 16), 0.5, dtype=torch.float64)
    target = torch.full((1, 3, 16, 16), 0.6, dtype=torch.float64)
    assert psnr(pred, target).item() == pytest.approx(20.0, abs=1e-9)  # MSE 0.01, peak 1
    # Zero variances: SSIM = (2*mu_x*mu_y + C1) / (mu_x^2 + mu_y^2 + C1) with C1 = 0.01^2.
    assert ssim(pred, target, border=0).item() == pytest.approx(0.6001 / 0.6101, abs=1e-12)


@pytest.mark.parametrize("border", [0, 4])
def test_rgb_psnr_ssim_match_skimage(border: int):
    pred, target = _random_pair()
    got_psnr, got_ssim = psnr(pred, target, border=border), ssim(pred, target, border=border)
    for i in range(pred.shape[0]):
        p, t = _hwc64(crop_border(pred[i], border)), _hwc64(crop_border(target[i], border))
        assert got_psnr[i].item() == pytest.approx(peak_signal_noise_ratio(t, p, data_range=1.0), abs=1e-8)
        assert got_ssim[i].item() == pytest.approx(_skimage_ssim(p, t), abs=1e-8)


def test_y_channel_psnr_ssim_match_skimage_on_hand_converted_y():
    pred, target = _random_pair(seed=1)
    got_psnr = psnr(pred, target, border=4, y_channel=True)
    got_ssim = ssim(pred, target, border=4, y_channel=True)

    def y_image(img: torch.Tensor) -> np.ndarray:  # BasicSR rgb2ycbcr(y_only=True), then crop
        rgb = _hwc64(img)
        y = (16.0 + rgb @ np.array([65.481, 128.553, 24.966])) / 255.0
        return y[4:-4, 4:-4]

    for i in range(pred.shape[0]):
        p, t = y_image(pred[i]), y_image(target[i])
        assert got_psnr[i].item() == pytest.approx(peak_signal_noise_ratio(t, p, data_range=1.0), abs=1e-8)
        ssim_ref = structural_similarity(t, p, gaussian_weights=True, sigma=1.5,
                                         use_sample_covariance=False, data_range=1.0)
        assert got_ssim[i].item() == pytest.approx(ssim_ref, abs=1e-8)


def test_metrics_reject_wrong_range_shape_and_too_small_images():
    pred, target = _random_pair()
    with pytest.raises(ValueError, match=r"\(x \+ 1\) / 2"):
        psnr(pred * 2 - 1, target)
    with pytest.raises(ValueError, match="shapes differ"):
        ssim(pred[:, :, :-1], target)
    with pytest.raises(ValueError, match="img\\[None\\]"):
        psnr(pred[0], target[0])
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(pred[:, :, :18], target[:, :, :18], border=4)  # 10 rows left after the crop


def test_image_metrics_keys_and_values():
    pred, target = _random_pair()
    scores = image_metrics(pred, target, border=4)
    assert list(scores) == ["psnr", "ssim", "psnr_y", "ssim_y"]
    assert all(v.shape == (2,) for v in scores.values())
    torch.testing.assert_close(scores["ssim_y"], ssim(pred, target, y_channel=True))
    # Luma averages the colour noise, so Y-PSNR beats RGB-PSNR on independent channel noise.
    assert (scores["psnr_y"] > scores["psnr"]).all()


def test_protocol_description_is_flat_strings():
    desc = protocol_description(4, lpips_available=False, lpips_reason="LPIPS unavailable: no weights at /x")
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in desc.items())
    assert desc["eval.protocol.border_crop"] == "4"
    assert desc["eval.protocol.lpips"] == "unavailable: no weights at /x"
    assert "AlexNet" in protocol_description(4, lpips_available=True)["eval.protocol.lpips"]


# ----------------------------------------------------------------------------- LPIPS

@pytest.fixture(scope="module")
def random_alexnet_file(tmp_path_factory) -> Iterator[tuple[torch.nn.Module, Path]]:
    """A correctly shaped, randomly initialised torchvision AlexNet checkpoint in a torch home."""
    torch_home = tmp_path_factory.mktemp("torch_home")
    checkpoint = torch_home / "hub" / "checkpoints" / metrics.ALEXNET_FILENAME
    checkpoint.parent.mkdir(parents=True)
    torch.manual_seed(0)
    alexnet = torchvision.models.alexnet(weights=None)
    torch.save(alexnet.state_dict(), checkpoint)
    yield alexnet, torch_home
    checkpoint.unlink()  # 244 MB; pytest keeps its last three temp dirs


@pytest.fixture
def offline(monkeypatch):
    """Fail loudly on any download or network connection attempt."""
    def refuse(*args, **kwargs):
        raise AssertionError("LPIPS loading tried to reach the network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _use_torch_home(monkeypatch, torch_home) -> None:
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # undo any torch.hub.set_dir elsewhere
    monkeypatch.setenv("TORCH_HOME", str(torch_home))


def test_lpips_unavailable_without_alexnet_file_names_the_path(monkeypatch, tmp_path, offline):
    _use_torch_home(monkeypatch, tmp_path)
    expected = tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    assert lpips_weights_path() == expected
    result = LPIPSMetric.load()
    assert isinstance(result, MetricAvailability) and not result.available
    assert str(expected) in result.reason


def test_lpips_rejects_a_file_that_is_not_the_imagenet_alexnet(monkeypatch, random_alexnet_file, offline):
    _use_torch_home(monkeypatch, random_alexnet_file[1])
    result = LPIPSMetric.load()
    assert isinstance(result, MetricAvailability)
    assert "sha256" in result.reason and str(lpips_weights_path()) in result.reason


def test_lpips_rejects_a_corrupt_file(monkeypatch, tmp_path, offline):
    _use_torch_home(monkeypatch, tmp_path)
    lpips_weights_path().parent.mkdir(parents=True)
    lpips_weights_path().write_bytes(b"not a checkpoint")
    result = LPIPSMetric.load(verify_sha256=False)
    assert isinstance(result, MetricAvailability) and str(lpips_weights_path()) in result.reason


def test_lpips_loads_cached_trunk_and_wheel_heads_offline(monkeypatch, random_alexnet_file, offline):
    alexnet, torch_home = random_alexnet_file
    _use_torch_home(monkeypatch, torch_home)
    # Accept the random file's own hash so the default (verifying) path is exercised too.
    prefix = metrics._sha256_prefix(lpips_weights_path(), 8)
    monkeypatch.setattr(metrics, "ALEXNET_SHA256_PREFIX", prefix)
    metric = LPIPSMetric.load()
    assert isinstance(metric, LPIPSMetric), metric

    # The trunk holds the file's weights (lpips slice k, child "i" is torchvision features[i]) ...
    trunk = metric.model.net.state_dict()
    assert len(trunk) == 10  # five convolutions, weight and bias each
    torch.testing.assert_close(trunk["slice1.0.weight"], alexnet.features[0].weight, rtol=0, atol=0)
    torch.testing.assert_close(trunk["slice5.10.bias"], alexnet.features[10].bias, rtol=0, atol=0)
    # ... and the heads hold the wheel's calibrated linear layers.
    heads = torch.load(metrics._lpips_linear_weights_path(), map_location="cpu", weights_only=True)
    torch.testing.assert_close(metric.model.lin3.model[1].weight, heads["lin3.model.1.weight"], rtol=0, atol=0)

    pred, target = _random_pair(n=2, h=32, w=32)
    same = metric(target, target.clone())
    different = metric(pred, target)
    assert same.shape == different.shape == (2,)
    assert same.tolist() == [0.0, 0.0]
    assert (different > 0).all()
    # End to end equal to lpips' own pipeline built around the same trunk ([0,1] via normalize=True).
    import lpips

    monkeypatch.setattr(lpips.pretrained_networks.tv, "alexnet", lambda **kwargs: alexnet)
    reference = lpips.LPIPS(net="alex", version="0.1", verbose=False)
    with torch.no_grad():
        expected = reference(pred, target, normalize=True).flatten()
    torch.testing.assert_close(different, expected, rtol=1e-5, atol=1e-6)

    scores = image_metrics(pred, target, lpips=metric)
    assert list(scores) == list(metrics.METRIC_NAMES)
    torch.testing.assert_close(scores["lpips"], different)
    assert math.isfinite(scores["lpips"].sum().item())
