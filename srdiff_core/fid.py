"""Fréchet Inception Distance (Heusel et al. 2017), only with the standard weights, offline.

The FID that papers report uses the TensorFlow Inception-v3 graph of 2015-12-05; pytorch-fid ships
it ported to PyTorch as ``pt_inception-2015-12-05-6726825d.pth``. Its network differs from
torchvision's ImageNet Inception-v3 in four block types (average pools that exclude padding, a max
pool in the last block, 1008 classes), so FID computed with torchvision's weights is a different
number. We build that variant from torchvision's blocks and use it only when the weights file is
in the torch hub cache; otherwise FID is reported as unavailable, never computed another way.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.inception import Inception3, InceptionA, InceptionC, InceptionE

from srdiff_core.metrics import MetricAvailability, _sha256_prefix

FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
FID_SHA256_PREFIX = "6726825d"


def fid_weights_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS


def _avg_pool_no_pad(x: Tensor) -> Tensor:
    # The TF graph averages over valid pixels only at the border (count_include_pad=False).
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _FIDInceptionA(InceptionA):
    def _forward(self, x: Tensor) -> list[Tensor]:
        return [self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(_avg_pool_no_pad(x))]


class _FIDInceptionC(InceptionC):
    def _forward(self, x: Tensor) -> list[Tensor]:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d7 = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            d7 = conv(d7)
        return [self.branch1x1(x), b7, d7, self.branch_pool(_avg_pool_no_pad(x))]


class _FIDInceptionE(InceptionE):
    """``max_pool``: the last block (Mixed_7c) of the TF graph pools by max, the one before by average."""

    def __init__(self, in_channels: int, max_pool: bool):
        super().__init__(in_channels)
        self.max_pool = max_pool

    def _forward(self, x: Tensor) -> list[Tensor]:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d3 = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d3 = torch.cat([self.branch3x3dbl_3a(d3), self.branch3x3dbl_3b(d3)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool_no_pad(x)
        return [self.branch1x1(x), b3, d3, self.branch_pool(pooled)]


def fid_inception() -> Inception3:
    """Inception-v3 with the TF-graph block variants, randomly initialised (load the weights after)."""
    net = Inception3(num_classes=1008, aux_logits=False, init_weights=False, transform_input=False)
    net.Mixed_5b, net.Mixed_5c, net.Mixed_5d = (_FIDInceptionA(192, 32), _FIDInceptionA(256, 64),
                                                _FIDInceptionA(288, 64))
    net.Mixed_6b, net.Mixed_6c, net.Mixed_6d, net.Mixed_6e = (
        _FIDInceptionC(768, 128), _FIDInceptionC(768, 160), _FIDInceptionC(768, 160), _FIDInceptionC(768, 192))
    net.Mixed_7b, net.Mixed_7c = _FIDInceptionE(1280, max_pool=False), _FIDInceptionE(2048, max_pool=True)
    return net


class FIDFeatures(nn.Module):
    """Images in [0,1] -> 2048-d pool features (resized to 299 bilinearly, scaled to [-1,1])."""

    BLOCKS = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
              "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
              "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool")

    def __init__(self, net: Inception3):
        super().__init__()
        self.net = net.eval()

    @torch.inference_mode()
    def forward(self, images: Tensor) -> Tensor:
        x = F.interpolate(images.float(), size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
        for name in self.BLOCKS:
            x = getattr(self.net, name)(x)
        return x.flatten(1).double()


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2}) (Heusel et al. 2017, eq. 6).

    With fewer images than feature dimensions the covariances are singular; as pytorch-fid does,
    a small multiple of the identity is added when the square root comes out non-finite."""
    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(feats_a, rowvar=False)), np.atleast_2d(np.cov(feats_b, rowvar=False))
    with warnings.catch_warnings():  # singular covariances are expected with few images (see above)
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(cov_a @ cov_b)
        if not np.isfinite(root).all():
            offset = np.eye(cov_a.shape[0]) * 1e-6
            root = scipy.linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    root = root.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(root))


class FIDMetric:
    """Loaded FID feature network; :meth:`load` returns it or why it is unavailable."""

    def __init__(self, features: FIDFeatures, device: torch.device):
        self.features, self.device = features, device

    @classmethod
    def load(cls, device: str | torch.device = "cpu", *, verify_sha256: bool = True) -> "FIDMetric | MetricAvailability":
        path = fid_weights_path()
        if not path.is_file():
            return MetricAvailability(False, f"FID unavailable: the Inception weights are not at {path} and are "
                                             f"never downloaded here. Copy pytorch-fid's {FID_WEIGHTS} there (or "
                                             f"point $TORCH_HOME at a cache that has hub/checkpoints/{FID_WEIGHTS}).")
        if verify_sha256 and _sha256_prefix(path, len(FID_SHA256_PREFIX)) != FID_SHA256_PREFIX:
            return MetricAvailability(False, f"FID unavailable: {path} is not the FID Inception file (its sha256 "
                                             f"does not start with {FID_SHA256_PREFIX}); replace it with {FID_WEIGHTS}")
        net = fid_inception()
        try:
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
        except (RuntimeError, OSError, ValueError) as e:
            return MetricAvailability(False, f"FID unavailable: {path} could not be loaded ({e})")
        device = torch.device(device)
        return cls(FIDFeatures(net).to(device), device)

    def features_of(self, images: Tensor) -> np.ndarray:
        return self.features(images.to(self.device)).cpu().numpy()

    def __call__(self, feats_restored: np.ndarray, feats_target: np.ndarray) -> float:
        return frechet_distance(feats_restored, feats_target)
