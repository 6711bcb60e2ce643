"""FID: the Fréchet distance against an independent formula, the network's weight layout, and the
offline rule (standard weights in the torch hub cache, or "unavailable")."""

import numpy as np
import pytest
import torch

from srdiff_core.fid import FID_WEIGHTS, FIDMetric, fid_inception, fid_weights_path, frechet_distance
from srdiff_core.metrics import MetricAvailability

pytestmark = pytest.mark.usefixtures("one_thread")


def frechet_by_eigenvalues(a: np.ndarray, b: np.ndarray) -> float:
    """Independent route: Tr((S_a S_b)^{1/2}) = sum of sqrt of the eigenvalues of S_a S_b."""
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eig = np.linalg.eigvals(ca @ cb)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca) + np.trace(cb)
                 - 2 * np.sqrt(np.clip(eig.real, 0, None)).sum())


def test_frechet_distance_matches_the_eigenvalue_formula():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 6))
    b = rng.normal(loc=0.5, scale=1.5, size=(200, 6)) @ rng.normal(size=(6, 6))
    assert frechet_distance(a, b) == pytest.approx(frechet_by_eigenvalues(a, b), rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # 1-D Gaussians: (mu1-mu2)^2 + (s1-s2)^2 exactly, for sample statistics
    x, y = rng.normal(size=(5000, 1)), 3 + 2 * rng.normal(size=(5000, 1))
    expected = (x.mean() - y.mean()) ** 2 + (x.std(ddof=1) - y.std(ddof=1)) ** 2
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-6)


def test_missing_weights_are_reported_not_replaced(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    loaded = FIDMetric.load()
    assert isinstance(loaded, MetricAvailability) and not loaded.available
    assert str(tmp_path / "checkpoints" / FID_WEIGHTS) in loaded.reason


@pytest.mark.slow
def test_fid_with_weights_in_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    fid_weights_path().parent.mkdir(parents=True)
    torch.manual_seed(0)
    net = fid_inception()
    torch.save(net.state_dict(), fid_weights_path())
    # a stand-in file under the real name fails the sha256 check by default
    assert isinstance(FIDMetric.load(), MetricAvailability)
    metric = FIDMetric.load(verify_sha256=False)
    assert isinstance(metric, FIDMetric)
    loaded = metric.features.net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in net.state_dict().items())
    gen = torch.Generator().manual_seed(1)
    imgs = torch.rand(3, 3, 40, 52, generator=gen)
    feats = metric.features_of(imgs)
    assert feats.shape == (3, 2048) and np.isfinite(feats).all()
    assert metric(feats, feats) == pytest.approx(0.0, abs=1e-6)
    other = metric.features_of(torch.rand(3, 3, 40, 52, generator=gen) * 0.2)
    assert metric(feats, other) > 0
    fid_weights_path().unlink()  # ~100 MB
