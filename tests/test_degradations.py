import math

import numpy as np
import pytest
import skimage.data
from scipy import ndimage

from srdiff_core import config
from srdiff_core.degradations import (
    DEGRADATIONS,
    add_haze,
    add_low_light,
    add_motion_blur,
    add_rain,
    degrade,
    haze_depth_proxy,
    motion_blur_kernel,
)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """64x64 float crop of the cat photograph (2x box-downsampled, so it has real detail)."""
    crop = skimage.data.chelsea()[100:228, 150:278].astype(np.float32) / 255.0
    return crop.reshape(64, 2, 64, 2, 3).mean(axis=(1, 3))


def luminance(image: np.ndarray) -> np.ndarray:
    return image @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601


def laplacian_energy(image: np.ndarray) -> float:
    y = luminance(image)
    lap = 4 * y[1:-1, 1:-1] - y[:-2, 1:-1] - y[2:, 1:-1] - y[1:-1, :-2] - y[1:-1, 2:]
    return float(np.mean(lap ** 2))


# ----------------------------------------------------------------------------- contract, all four

@pytest.mark.parametrize("name", list(DEGRADATIONS))
def test_output_contract(name, photo):
    before = photo.copy()
    out = DEGRADATIONS[name](photo, np.random.default_rng(0))
    assert out.shape == photo.shape and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert np.mean(np.abs(out - photo)) > 0.01, "degradation left the image (nearly) unchanged"
    np.testing.assert_array_equal(photo, before)  # pure: the input is not modified


@pytest.mark.parametrize("name", list(DEGRADATIONS))
def test_deterministic_for_a_seed(name, photo):
    fn = DEGRADATIONS[name]
    a = fn(photo, np.random.default_rng(7))
    b = fn(photo, np.random.default_rng(7))
    c = fn(photo, np.random.default_rng(8))
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != c.tobytes()


@pytest.mark.parametrize("name", list(DEGRADATIONS))
@pytest.mark.parametrize("bad, message", [
    (np.zeros((8, 8, 3), dtype=np.uint8), "astype"),
    (np.zeros((8, 8), dtype=np.float32), "HxWx3"),
    (np.full((8, 8, 3), 1.5, dtype=np.float32), "[0, 1]"),
])
def test_rejects_bad_input_with_a_fix(name, bad, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        DEGRADATIONS[name](bad, np.random.default_rng(0))


def test_inverted_range_is_an_error(photo):
    with pytest.raises(ValueError, match="lower bound above upper bound"):
        add_haze(photo, np.random.default_rng(0), beta_range=(2.0, 1.0))


# ----------------------------------------------------------------------------- registry

def test_registry_matches_config_order():
    assert tuple(DEGRADATIONS) == config.DEGRADATIONS


def test_degrade_dispatches_by_name(photo):
    for name, fn in DEGRADATIONS.items():
        via_name = degrade(name, photo, np.random.default_rng(3))
        direct = fn(photo, np.random.default_rng(3))
        assert via_name.tobytes() == direct.tobytes()


def test_degrade_unknown_name_lists_valid_ones(photo):
    with pytest.raises(ValueError, match="unknown degradation 'snowy'") as err:
        degrade("snowy", photo, np.random.default_rng(0))
    for name in config.DEGRADATIONS:
        assert name in str(err.value)


# ----------------------------------------------------------------------------- haze

def test_haze_depth_proxy_is_vertical_gradient_on_flat_image():
    depth = haze_depth_proxy(np.full((5, 4, 3), 0.5, dtype=np.float32))
    np.testing.assert_allclose(depth[:, 0], [1.0, 0.75, 0.5, 0.25, 0.0], atol=1e-6)
    assert depth.min() == 0.0 and depth.max() == 1.0


def test_haze_follows_koschmieder_exactly():
    # J = 0.2 flat, beta = 1, A = 0.9, depth 1 at the top row and 0 at the bottom row.
    flat = np.full((5, 4, 3), 0.2, dtype=np.float32)
    out = add_haze(flat, np.random.default_rng(0), beta_range=(1.0, 1.0),
                   airlight_range=(0.9, 0.9), near_depth=0.0)
    top = 0.2 * math.exp(-1) + 0.9 * (1 - math.exp(-1))  # 0.64248...
    np.testing.assert_allclose(out[0], top, atol=1e-6)
    np.testing.assert_allclose(out[-1], 0.2, atol=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_haze_brightens_and_lowers_contrast(seed, photo):
    out = add_haze(photo, np.random.default_rng(seed))
    assert out.mean() > photo.mean() + 0.05
    assert luminance(out).std() < 0.8 * luminance(photo).std()


# ----------------------------------------------------------------------------- motion blur

def test_motion_kernel_exact_small_cases():
    np.testing.assert_array_equal(motion_blur_kernel(1, 33.0), [[1.0]])
    box = np.array([[0, 0, 0], [1, 1, 1], [0, 0, 0]], dtype=np.float32) / 3
    np.testing.assert_allclose(motion_blur_kernel(3, 0.0), box, atol=1e-7)
    np.testing.assert_allclose(motion_blur_kernel(3, 90.0), box.T, atol=1e-7)
    # 45 degrees counter-clockwise: lower-left to upper-right, anti-aliased off the diagonal.
    diag = motion_blur_kernel(3, 45.0)
    assert diag[0, 2] == diag[2, 0] > 0 and diag[0, 0] == diag[2, 2] == 0
    assert diag[1, 1] > diag[0, 2] > diag[0, 1] > 0


@pytest.mark.parametrize("length", [1.0, 2.5, 7.3, 21.0])
@pytest.mark.parametrize("angle", [0.0, 17.0, 45.0, 90.0, 133.7])
def test_motion_kernel_sums_to_one_and_is_point_symmetric(length, angle):
    kernel = motion_blur_kernel(length, angle)
    assert kernel.dtype == np.float32
    assert kernel.shape[0] == kernel.shape[1] and kernel.shape[0] % 2 == 1  # square, centred
    assert abs(float(kernel.sum()) - 1.0) < 1e-6
    np.testing.assert_allclose(kernel, kernel[::-1, ::-1], atol=1e-7)  # centred: no image shift


def test_motion_kernel_rejects_sub_pixel_length():
    with pytest.raises(ValueError, match=">= 1 pixel"):
        motion_blur_kernel(0.5, 0.0)


def test_horizontal_blur_keeps_horizontally_flat_image(photo):
    rows_only = np.broadcast_to(photo[:, :1], photo.shape).copy()  # varies down, flat across
    straight = {"curvature_range": (0.0, 0.0)}
    out = add_motion_blur(rows_only, np.random.default_rng(0), angle_range=(0.0, 0.0), **straight)
    np.testing.assert_allclose(out, rows_only, atol=1e-6)
    blurred_vertically = add_motion_blur(rows_only, np.random.default_rng(0), angle_range=(90.0, 90.0), **straight)
    assert np.abs(blurred_vertically - rows_only).mean() > 0.01


@pytest.mark.parametrize("seed", range(4))
def test_motion_blur_removes_high_frequencies(seed, photo):
    out = add_motion_blur(photo, np.random.default_rng(seed))
    assert laplacian_energy(out) < 0.5 * laplacian_energy(photo)
    assert abs(float(out.mean()) - float(photo.mean())) < 0.01  # a sum-1 kernel keeps brightness


# ----------------------------------------------------------------------------- rain

def streak_gradient_angle(diff: np.ndarray) -> float:
    """Dominant gradient orientation (degrees, x right / y down) from the structure tensor.

    Gaussian-derivative gradients (sigma 1): central differences are anisotropic on 1-px
    lines and read a 15 degree streak as about 21 degrees.
    """
    diff = diff.astype(np.float64)
    gx = ndimage.gaussian_filter(diff, 1.0, order=(0, 1), mode="wrap")
    gy = ndimage.gaussian_filter(diff, 1.0, order=(1, 0), mode="wrap")
    jxx, jyy, jxy = (gx * gx).sum(), (gy * gy).sum(), (gx * gy).sum()
    return math.degrees(0.5 * math.atan2(2 * jxy, jxx - jyy))


@pytest.mark.parametrize("angle", [-15.0, 0.0, 15.0])
def test_rain_adds_bright_streaks_at_the_drawn_angle(angle):
    grey = np.full((96, 96, 3), 0.3, dtype=np.float32)
    out = add_rain(grey, np.random.default_rng(1), angle_range=(angle, angle))  # layers fan out symmetrically
    diff = luminance(out - grey)
    assert diff.min() >= -1e-6  # screen blending only brightens
    assert diff.max() > 0.3  # some streaks are clearly visible
    # Gradients run across the streaks: for a streak leaning `angle` degrees right of
    # vertical at the bottom, the gradient direction is (cos a, -sin a), i.e. -angle.
    assert abs(streak_gradient_angle(diff) - (-angle)) < 2.5


@pytest.mark.parametrize("seed", range(4))
def test_rain_on_a_photo_is_streaky_and_brightening(seed, photo):
    out = add_rain(photo, np.random.default_rng(seed))
    diff = luminance(out) - luminance(photo)
    assert diff.min() >= -1e-6 and out.mean() > photo.mean()
    # Heavy rain like Rain100H's covers much of the image, but in streaks, not as a uniform veil.
    assert 0.01 < float(np.mean(diff > 0.05)) < 0.9
    assert float(np.mean(diff < 0.02)) > 0.05


# ----------------------------------------------------------------------------- low light

@pytest.mark.parametrize("seed", range(4))
def test_low_light_darkens_strongly_on_8bit_levels(seed, photo):
    out = add_low_light(photo, np.random.default_rng(seed))
    assert out.mean() < 0.4 * photo.mean()
    levels = out * 255.0
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)


def test_low_light_noise_free_value_is_exact():
    flat = np.full((4, 4, 3), 0.6, dtype=np.float32)
    out = add_low_light(flat, np.random.default_rng(0), gamma_range=(2.0, 2.0), gain_range=(0.4, 0.4),
                        photons_range=(1e9, 1e9), read_noise_range=(0.0, 0.0), tint_range=(1.0, 1.0))
    # 0.4 * 0.6**2 = 0.144 -> 36.72 / 255 -> level 37
    np.testing.assert_array_equal(out, np.float32(37 / 255))


def test_low_light_noise_matches_poisson_gaussian_variance():
    # Foi et al. 2008: var = x / photons + read_noise^2 = 0.3 / 100 + 0.02^2 = 0.0034.
    flat = np.full((64, 64, 3), 0.6, dtype=np.float32)
    out = add_low_light(flat, np.random.default_rng(5), gamma_range=(1.0, 1.0), gain_range=(0.5, 0.5),
                        photons_range=(100.0, 100.0), read_noise_range=(0.02, 0.02), tint_range=(1.0, 1.0))
    assert abs(float(out.mean()) - 0.3) < 0.003
    assert abs(float(out.var()) / 0.0034 - 1.0) < 0.06


# ----------------------------------------------------------------------------- camera-path blur

def test_straight_trajectory_kernel_is_the_line_kernel():
    from srdiff_core.degradations import camera_trajectory, trajectory_kernel
    xy = camera_trajectory(np.random.default_rng(0), 4.0, 0.0, 0.0, points=5)  # 4 px straight, horizontal
    np.testing.assert_allclose(xy, [[-2, 0], [-1, 0], [0, 0], [1, 0], [2, 0]], atol=1e-12)
    kernel = trajectory_kernel(xy)
    centre = kernel.shape[0] // 2
    np.testing.assert_allclose(kernel[centre, centre - 2:centre + 3], 0.2, atol=1e-7)  # frame average: 5 equal taps
    assert abs(float(kernel.sum()) - 1.0) < 1e-6


def test_curved_trajectory_bends_and_keeps_its_length():
    from srdiff_core.degradations import camera_trajectory
    xy = camera_trajectory(np.random.default_rng(3), 12.0, 30.0, 0.3)
    steps = np.diff(xy, axis=0)
    np.testing.assert_allclose(np.hypot(*steps.T).sum(), 12.0, rtol=1e-9)  # the path is `length` long
    headings = np.unwrap(np.arctan2(-steps[:, 1], steps[:, 0]))
    assert math.degrees(headings[0]) == pytest.approx(30.0, abs=1e-9)
    assert np.ptp(headings) > 0.05  # it turns: camera shake, not a straight slide


@pytest.mark.parametrize("seed", range(3))
def test_rain_layers_fan_out_and_add_up(seed):
    grey = np.full((64, 64, 3), 0.2, dtype=np.float32)
    one = add_rain(grey, np.random.default_rng(seed), layers_range=(1.0, 1.0))
    three = add_rain(grey, np.random.default_rng(seed), layers_range=(3.0, 3.0))
    # The same total drop density spread over three directions: similar coverage, other streaks.
    assert abs(float(np.mean(one > 0.3)) - float(np.mean(three > 0.3))) < 0.15
    assert np.abs(one - three).mean() > 0.01


def test_low_light_tint_shifts_the_colour():
    flat = np.full((4, 4, 3), 0.8, dtype=np.float32)
    out = add_low_light(flat, np.random.default_rng(0), gamma_range=(1.0, 1.0), gain_range=(0.25, 0.25),
                        photons_range=(1e9, 1e9), read_noise_range=(0.0, 0.0), tint_range=(0.8, 1.1))
    channel_means = out.reshape(-1, 3).mean(axis=0)
    assert np.ptp(channel_means) > 2 / 255  # the channels were scaled differently
    assert all(0.8 * 0.2 - 1 / 255 <= m <= 1.1 * 0.2 + 1 / 255 for m in channel_means)
