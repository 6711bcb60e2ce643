"""`srdiff restore` at its edges (issue 16, items 5 and 7): every PIL mode restored as 8-bit RGB or
refused with a `srdiff restore:` line and exit 2; input, output, --steps and --tile-size checked
before the model loads; progress with rate and ETA; on the CPU, large images tiled by default with
a warning and the expected time (restore and the evaluate stage's EvalLines). A tiny UNet with a
non-zero output layer (so tiles change the result) and the tiny CLIP of tests/embed_data.py."""

from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from embed_data import TINY_ARCH, register_tiny_arch
from flows import cli
from flows import restore as restore_flow
from srdiff_core import clip_embed, images, srm
from srdiff_core.config import Config, EvalConfig
from srdiff_core.ema import make_ema
from srdiff_core.restorer import Restorer, Tiling, calls_per_jump, network_pixels, tiling_for
from srdiff_core.unet import ConditionalUNet
from tasks import evaluate as evaluate_task
from tasks.embed import table_metadata
from tasks.pyfunc_model import RestorerModel
from tasks.refine import save_srm
from tasks.train import model_file_state

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread
DIM = 16  # the tiny CLIP's embed_dim
STEPS = 3


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> dict:
    """A config file and a model.pt: a tiny UNet whose output layer is not zero (a zero output would
    restore every image the same whole or tiled)."""
    root = tmp_path_factory.mktemp("restore-edges")
    register_tiny_arch(root)
    data = {"name": "tiny-restore", "data_root": str(root / "data"), "device": "cpu",
            "embed": {"arch": TINY_ARCH, "pretrained": "none", "srm": {"hidden": 8, "depth": 1}},
            "unet": {"nf": 8, "ch_mult": [1, 2], "num_res_blocks": 1, "context_dim": DIM, "attn_heads": 1},
            "evaluate": {"steps": STEPS}}
    (root / "cfg.yaml").write_text(yaml.safe_dump(data))
    cfg = Config.model_validate(data)
    torch.manual_seed(0)
    unet = ConditionalUNet.from_config(cfg.unet)
    torch.nn.init.normal_(unet.final_conv.weight, std=0.05)
    save_srm(str(root / "srm.pt"), srm.SemanticRefinementModule.from_config(DIM, cfg.embed.srm), cfg, DIM)
    save_model_file(unet, cfg, root / "srm.pt", root / "model.pt")
    junk = root / "junk.pt"
    junk.write_bytes(b"not a model")  # loading it fails: an error about anything else came first
    return {"cfg": cfg, "config": str(root / "cfg.yaml"), "model": str(root / "model.pt"), "junk": str(junk)}


def save_model_file(unet: ConditionalUNet, cfg: Config, srm_path: Path, target: Path) -> None:
    """model.pt for ``unet`` trained under ``cfg``, with the tiny CLIP's weights digest."""
    meta = table_metadata(clip_embed.load_clip(TINY_ARCH, "none"))
    torch.save(model_file_state(make_ema(unet), cfg, str(srm_path), clip_meta=meta), target)


def restore(model: dict, src: Path, out: Path, *args: str, checkpoint: str | None = None) -> int:
    return cli.main(["restore", str(src), str(out), "--checkpoint", checkpoint or model["model"],
                     "--config", model["config"], *args])


def colour(h: int = 40, w: int = 52, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def grey16() -> np.ndarray:
    """A 16-bit greyscale gradient whose values are whole multiples of 257, 0..65535 (8-bit k*257)."""
    return (np.arange(40 * 52).reshape(40, 52) % 256 * 257).astype(np.uint16)


# ---------------------------------------------------------------- every PIL mode as 8-bit RGB


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 1, 128, 129], [257, 32896, 65278, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode == "I;16"  # PIL's convert("RGB") clips these values to 0..255: 257 and up are white
        rgb, what = images.rgb_uint8(im)
    assert what == "16-bit greyscale scaled to 8 bits"
    np.testing.assert_array_equal(rgb[..., 0], [[0, 0, 0, 1], [1, 128, 254, 255]])  # round(v * 255 / 65535)
    assert (rgb == rgb[..., :1]).all() and rgb.dtype == np.uint8


def test_32_bit_images_are_scaled_in_the_16_bit_range_or_refused():
    rgb, _ = images.rgb_uint8(Image.fromarray(np.array([[0, 65535]], dtype=np.int32)))  # mode I
    np.testing.assert_array_equal(rgb[..., 0], [[0, 255]])
    with pytest.raises(images.UnsupportedImage, match=r"^I image: 32-bit integer pixels \(values -1\.\.70000\)"):
        images.rgb_uint8(Image.fromarray(np.array([[-1, 70000]], dtype=np.int32)))
    with pytest.raises(images.UnsupportedImage, match=r"^F image: 32-bit floating-point pixels \(values 0\.25\.\.2\)"):
        images.rgb_uint8(Image.fromarray(np.array([[0.25, 2.0]], dtype=np.float32)))


@pytest.mark.parametrize(("mode", "note"), [
    ("1", ""), ("L", ""), ("P", ""), ("RGB", ""), ("RGBX", ""), ("CMYK", ""), ("YCbCr", ""), ("LAB", ""),
    ("HSV", ""), ("RGBA", "alpha channel dropped"), ("LA", "alpha channel dropped"), ("PA", "alpha channel dropped"),
    ("La", "alpha channel dropped"), ("RGBa", "alpha channel dropped")])
def test_every_8_bit_mode_converts_as_pil_does(mode, note):
    im = Image.fromarray(colour(6, 5)).convert(mode)
    rgb, what = images.rgb_uint8(im)
    assert what == note and rgb.shape == (6, 5, 3) and rgb.dtype == np.uint8
    expected = im.convert({"La": "LA", "RGBa": "RGBA"}.get(mode, mode)).convert("RGB")
    np.testing.assert_array_equal(rgb, np.asarray(expected))


def test_a_16_bit_greyscale_png_restores_as_its_8_bit_twin(model, tmp_path, capsys):
    """Today's bug: the blank white image. Now the 16-bit file and its 8-bit twin restore alike."""
    g16 = grey16()
    Image.fromarray(g16).save(tmp_path / "g16.png")
    Image.fromarray((g16 // 257).astype(np.uint8)).save(tmp_path / "g8.png")
    assert restore(model, tmp_path / "g16.png", tmp_path / "out16.png") == 0
    assert "g16.png: I;16 image converted to RGB (16-bit greyscale scaled to 8 bits)" in capsys.readouterr().err
    assert restore(model, tmp_path / "g8.png", tmp_path / "out8.png") == 0
    out16 = np.asarray(Image.open(tmp_path / "out16.png"))
    assert out16.shape == (40, 52, 3) and out16.std() > 40  # the gradient, not a blank image
    np.testing.assert_array_equal(out16, np.asarray(Image.open(tmp_path / "out8.png")))


def with_orientation(rgb: np.ndarray, value: int) -> Image.Image:
    im = Image.fromarray(rgb)
    exif = im.getexif()
    exif[images.EXIF_ORIENTATION] = value
    im.info["exif"] = exif.tobytes()
    return im


@pytest.mark.parametrize("value,size", [(1, (40, 52)), (3, (40, 52)), (6, (52, 40)), (8, (52, 40)), (0, (40, 52))])
def test_exif_orientation_gives_the_size_and_pixels_viewers_show(tmp_path, value, size):
    """A phone's portrait photo is stored landscape with orientation 6 or 8; 0 is no valid value."""
    path = tmp_path / "o.png"
    rgb = colour()
    Image.fromarray(rgb).save(path, exif=with_orientation(rgb, value).getexif())
    with Image.open(path) as im:
        assert images.orientation(im) == max(value, 1) and images.shown_size(im) == size
        shown, note = images.upright(im)
        assert (shown.height, shown.width) == size
        assert note == ("" if value in (0, 1) else f"turned upright by its EXIF orientation {value}")
    if value == 6:  # stored turned 90 degrees counter-clockwise: shown turned clockwise
        np.testing.assert_array_equal(np.asarray(shown), np.rot90(rgb, k=-1))


def test_a_photo_with_exif_orientation_restores_upright(model, tmp_path, capsys):
    """The output (no EXIF) shows as the input did: restored from the upright pixels, in a folder
    planned by its upright size, like the same photo saved upright."""
    rgb = colour()
    (tmp_path / "in").mkdir()
    Image.fromarray(rgb).save(tmp_path / "in" / "phone.jpg", exif=with_orientation(rgb, 6).getexif(), quality=100)
    with Image.open(tmp_path / "in" / "phone.jpg") as im:
        Image.fromarray(np.rot90(np.asarray(im), k=-1)).save(tmp_path / "upright.png")
    assert restore(model, tmp_path / "in", tmp_path / "out") == 0
    assert "phone.jpg: turned upright by its EXIF orientation 6" in capsys.readouterr().err
    assert restore(model, tmp_path / "upright.png", tmp_path / "upright-out.png") == 0
    out = np.asarray(Image.open(tmp_path / "out" / "phone.png"))
    assert out.shape == (52, 40, 3)
    np.testing.assert_array_equal(out, np.asarray(Image.open(tmp_path / "upright-out.png")))


def test_a_floating_point_image_is_refused_before_the_model_loads(model, tmp_path, capsys):
    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)).save(tmp_path / "f.tif")
    assert restore(model, tmp_path / "f.tif", tmp_path / "out.png", checkpoint=model["junk"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"srdiff restore: {tmp_path / 'f.tif'}: F image: 32-bit floating-point pixels (values "
                          f"0.5..0.5) have no standard 8-bit scale: save it as an 8- or 16-bit image (e.g. PNG)")
    assert "junk" not in err and not (tmp_path / "out.png").exists()


def test_a_folder_skips_what_it_cannot_restore_and_restores_the_rest(model, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(colour()).save(src / "a.png")
    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)).save(src / "f.tif")
    (src / "b.png").write_bytes(b"\x89PNG truncated")
    assert restore(model, src, tmp_path / "out") == 0
    err = capsys.readouterr().err
    assert "skipped b.png: cannot be read as an image" in err and "skipped f.tif: F image: 32-bit" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png"]


# ---------------------------------------------------------------- checked before any work (exit 2)


@pytest.mark.parametrize(("args", "message"), [
    (["--steps", "0"], "--steps 0: the number of posterior steps must be at least 1 (default: evaluate.steps, 3)"),
    (["--steps", "-2"], "--steps -2: the number of posterior steps must be at least 1"),
    (["--tile-size", "-1"], "--tile-size -1: pass a tile size in pixels larger than the tiles' overlap "
                            "(evaluate.tile_overlap, 32), e.g. --tile-size 256, or 0 to restore images whole"),
    (["--tile-size", "32"], "--tile-size 32: pass a tile size in pixels larger than the tiles' overlap")])
def test_steps_and_tile_size_that_cannot_work_are_refused_before_the_model_loads(model, tmp_path, capsys, args,
                                                                                  message):
    Image.fromarray(colour()).save(tmp_path / "a.png")
    assert restore(model, tmp_path / "a.png", tmp_path / "out.png", *args, checkpoint=model["junk"]) == 2
    assert capsys.readouterr().err.startswith(f"srdiff restore: {message}")  # not the junk model's error
    assert not (tmp_path / "out.png").exists()


def test_steps_zero_is_never_the_default(model, tmp_path, capsys):
    Image.fromarray(colour()).save(tmp_path / "a.png")
    assert restore(model, tmp_path / "a.png", tmp_path / "out.png", "--steps", "0", checkpoint=model["junk"]) == 2
    assert capsys.readouterr().err == ("srdiff restore: --steps 0: the number of posterior steps must be at least 1 "
                                       "(default: evaluate.steps, 3); fewer steps are faster, e.g. --steps 20\n")
    assert restore(model, tmp_path / "a.png", tmp_path / "out.png", "--steps", "101") == 2
    assert "--steps 101 is outside 1..100, the SDE steps this model was trained with" in capsys.readouterr().err


def test_steps_the_model_was_not_trained_at_are_warned_about(model, tmp_path, capsys):
    """A model trained at t = T alone (train.timesteps [100], the demo's one-jump recipe) restores
    with --steps 1 silently; --steps 3 queries t = 67 and 33, which it never saw: a warning says so."""
    data = model["cfg"].model_dump(mode="json")
    data["train"]["timesteps"], data["evaluate"]["steps"] = [100], 1
    cfg = Config.model_validate(data)
    save_model_file(ConditionalUNet.from_config(cfg.unet), cfg, Path(model["model"]).parent / "srm.pt",
                    tmp_path / "t100.pt")
    Image.fromarray(colour()).save(tmp_path / "a.png")
    t100 = str(tmp_path / "t100.pt")
    assert restore(model, tmp_path / "a.png", tmp_path / "one.png", "--steps", "1", checkpoint=t100) == 0
    assert "warning" not in capsys.readouterr().err
    assert restore(model, tmp_path / "a.png", tmp_path / "three.png", "--steps", "3", checkpoint=t100) == 0
    assert ("srdiff restore: warning: --steps 3 queries the network at t = [67, 33], steps this model was not "
            "trained at (train.timesteps [100]): expect a worse restoration; pass --steps 1 to use the steps it "
            "learned") in capsys.readouterr().err
    # The fixture's model trained every step (train.timesteps null): no warning at any --steps.
    assert restore(model, tmp_path / "a.png", tmp_path / "any.png", "--steps", "5") == 0
    assert "warning" not in capsys.readouterr().err
    # The registered model (MLflow pyfunc) warns alike for a per-call steps param.
    pyfunc = RestorerModel(steps=1, seed=0, clip_x0=True, tile_size=0, tile_overlap=32)
    pyfunc.restorer = Restorer.from_file(t100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pyfunc.predict(None, colour()).shape == (40, 52, 3)
    with pytest.warns(UserWarning, match=r"steps 3 queries the network at t = \[67, 33\], steps this model was not"):
        pyfunc.predict(None, colour(), {"steps": 3})


def test_a_missing_or_empty_input_is_refused_before_the_model_loads(model, tmp_path, capsys):
    assert restore(model, tmp_path / "nope.png", tmp_path / "out.png", checkpoint=model["junk"]) == 2
    assert capsys.readouterr().err == (f"srdiff restore: {tmp_path / 'nope.png'} does not exist: pass an image file "
                                       f"or a folder of images\n")
    (tmp_path / "empty").mkdir()
    assert restore(model, tmp_path / "empty", tmp_path / "out", checkpoint=model["junk"]) == 2
    assert "empty holds no image to restore: no files." in capsys.readouterr().err
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("text")
    assert restore(model, tmp_path / "notes", tmp_path / "out", checkpoint=model["junk"]) == 2
    assert ("notes holds no image to restore: 1 file(s), none an image it reads (skipped a.txt: not an image file "
            "(.txt)). Pass an image file or a folder of images (PNG, JPEG, TIFF, BMP or WebP images)"
            in capsys.readouterr().err)
    (tmp_path / "notes.txt").write_text("text")
    assert restore(model, tmp_path / "notes.txt", tmp_path / "out.png", checkpoint=model["junk"]) == 2
    assert "notes.txt: not an image file (.txt): srdiff restore reads PNG, JPEG" in capsys.readouterr().err


def test_an_output_it_cannot_write_is_refused_before_the_model_loads(model, tmp_path, capsys):
    Image.fromarray(colour()).save(tmp_path / "a.png")
    (tmp_path / "folder").mkdir()
    Image.fromarray(colour()).save(tmp_path / "folder" / "b.png")
    (tmp_path / "file").write_text("a file")
    cases = [
        (tmp_path / "a.png", tmp_path / "out.xyz", "out.xyz: unknown image extension '.xyz': name the output with one "
                                                   "of .bmp, .jpeg, .jpg, .png, .tif, .tiff, .webp, e.g. out.png "
                                                   "(PNG keeps every restored value)"),
        (tmp_path / "a.png", tmp_path / "out", "out: no image extension: name the output with one of"),
        (tmp_path / "a.png", tmp_path / "a.png", "a.png is the input image: pass another output path, e.g. "),
        (tmp_path / "a.png", tmp_path / "file" / "out.png", f"cannot write to {tmp_path / 'file'} ("),
        (tmp_path / "folder", tmp_path / "file", "file is a file: the images of the folder"),
        (tmp_path / "folder", tmp_path / "folder", "folder is the input folder: the restored images would overwrite"),
    ]
    for src, out, message in cases:
        assert restore(model, src, out, checkpoint=model["junk"]) == 2, out
        err = capsys.readouterr().err
        assert err.startswith("srdiff restore: ") and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "file", "folder"]  # nothing written


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_refused(model, tmp_path, capsys):
    Image.fromarray(colour()).save(tmp_path / "a.png")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert restore(model, tmp_path / "a.png", locked / "out.png", checkpoint=model["junk"]) == 2
    finally:
        locked.chmod(0o755)
    assert f"cannot write to {locked} (Permission denied)" in capsys.readouterr().err


def test_an_output_folder_for_an_image_takes_its_name(model, tmp_path):
    Image.fromarray(colour()).save(tmp_path / "photo.jpg")
    (tmp_path / "out").mkdir()
    assert restore(model, tmp_path / "photo.jpg", tmp_path / "out") == 0
    assert Image.open(tmp_path / "out" / "photo.png").size == (52, 40)


# ---------------------------------------------------------------- progress, time and tiles on the CPU


def test_progress_lines_give_rate_and_eta(model, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(restore_flow, "PROGRESS_EVERY_S", 0.0)  # a line after every network call
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a", "b"):
        Image.fromarray(colour()).save(src / f"{name}.png")
    assert restore(model, src, tmp_path / "out", "--device", "cpu") == 0
    out, err = capsys.readouterr()
    err = err.splitlines()
    expected = [line for line in err if line.startswith("restore: expected")]
    assert len(expected) == 1 and re.fullmatch(
        r"restore: expected about \d+ s on the CPU \(2 image\(s\), 3 steps; timed on its first network calls\)",
        expected[0])
    progress = [line for line in err if re.match(r"restore: \d/2 ", line)]
    assert progress[-1].startswith("restore: 2/2 b.png: step 3/3 (")
    # The first network call is not timed (warm-up): its line has no ETA yet.
    assert re.fullmatch(r"restore: 1/2 a\.png: step 1/3 \(\S+ steps/s\)", progress[0])
    assert all(re.fullmatch(r"restore: [12]/2 [ab]\.png: step [0-3]/3 \((\S+ steps/s, )?ETA \d+ s\)"
                            r"; all images: ETA \d+ s", line) for line in progress[1:]), progress
    assert re.fullmatch(rf"restored 2 of 2 file\(s\) in \d+ s -> {re.escape(str(tmp_path / 'out'))}\n", out)


def test_hours_on_the_cpu_are_announced(model, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(restore_flow, "HOURS", 0.0)  # the threshold, so a tiny run crosses it
    Image.fromarray(colour()).save(tmp_path / "a.png")
    assert restore(model, tmp_path / "a.png", tmp_path / "out.png", "--device", "cpu") == 0
    assert re.search(r"^srdiff restore: warning: this will take about \d+ s on the CPU \(1 image\(s\), 3 steps\): a "
                     r"GPU \(--device cuda\), fewer steps \(e\.g\. --steps 20\) or smaller images make it faster; "
                     r"Ctrl-C stops it$", capsys.readouterr().err, re.M)


def test_large_images_on_the_cpu_are_tiled_by_default_with_a_warning(model, tmp_path, capsys):
    Image.fromarray(colour()).save(tmp_path / "a.png")  # 52x40 = 2080 pixels
    small = ["--set", "evaluate.cpu_large_pixels=2000", "--set", "evaluate.cpu_tile_size=24",
             "--set", "evaluate.tile_overlap=12", "--device", "cpu"]
    assert restore(model, tmp_path / "a.png", tmp_path / "auto.png", *small) == 0
    assert re.search(r"^restore: a\.png is 52x40, large for the CPU: restoring it in 24-px tiles "
                     r"\(evaluate\.cpu_tile_size; --tile-size N sets the size, --tile-size 0 restores it whole\)$",
                     capsys.readouterr().err, re.M)
    assert restore(model, tmp_path / "a.png", tmp_path / "tiled.png", *small, "--tile-size", "24") == 0
    assert restore(model, tmp_path / "a.png", tmp_path / "whole.png", *small, "--tile-size", "0") == 0
    assert "restoring it whole (tiles are faster here: e.g. --tile-size 256)" in capsys.readouterr().err
    auto, tiled, whole = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("auto", "tiled", "whole"))
    np.testing.assert_array_equal(auto, tiled)
    assert (auto != whole).any()
    assert restore(model, tmp_path / "a.png", tmp_path / "off.png", *small, "--set", "evaluate.cpu_tile_size=0") == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "off.png")), whole)


def test_tiling_rules():
    e = EvalConfig(cpu_large_pixels=1000, cpu_tile_size=24, tile_overlap=32)
    assert tiling_for(40, 52, "cpu", e) == Tiling(24, 12, cpu_default=True)  # the overlap kept below the tile
    assert tiling_for(40, 52, "cpu", e, tile_size=0) == Tiling(0, 32)  # asked for whole
    assert tiling_for(40, 52, "cpu", e, tile_size=48) == Tiling(48, 32)
    assert tiling_for(40, 52, "cuda", e) == Tiling(0, 32)
    assert tiling_for(20, 50, "cpu", e) == Tiling(0, 32)  # 1000 pixels: not over the limit
    assert tiling_for(40, 52, "cpu", e.model_copy(update={"tile_size": 40})) == Tiling(40, 32)
    assert tiling_for(40, 52, "cpu", e.model_copy(update={"cpu_large_pixels": 0})) == Tiling(0, 32)


def test_planned_network_work_is_what_the_sampler_does(model):
    """network_pixels and calls_per_jump (the basis of every estimate) against the calls of a real
    tiled restoration: 2 images of 40x52 in 24-px tiles with overlap 12 are 3x4 tiles each."""
    restorer = Restorer.from_file(model["model"])
    tiling = Tiling(24, 12)
    calls: list[int] = []
    lq = torch.rand(2, 3, 40, 52, generator=torch.Generator().manual_seed(0))
    restorer.restore(lq, torch.zeros(2, DIM), steps=STEPS, seed=0, tile_size=24, tile_overlap=12,
                     on_network_call=calls.append)
    assert network_pixels(40, 52, tiling, images=2) == 2 * 12 * 24 * 24
    assert calls_per_jump(40, 52, tiling, images=2) == 3  # 24 tiles, 8 a call
    assert len(calls) == STEPS * 3 and sum(calls) == STEPS * 2 * 12 * 24 * 24
    whole: list[int] = []
    restorer.restore(lq, torch.zeros(2, DIM), steps=STEPS, seed=0, on_network_call=whole.append)
    assert whole == [2 * 40 * 52] * STEPS == [network_pixels(40, 52, Tiling(0, 12), images=2)] * STEPS


def test_the_evaluate_stage_warns_tiles_and_times_large_images_on_the_cpu(model, caplog, monkeypatch):
    """EvalLines inside evaluate_samples' batches, on a real restoration: the size warning, the
    expected time of the stage (for 6 images like the first), and step lines with rate and ETA."""
    monkeypatch.setattr(evaluate_task, "PROGRESS_EVERY_S", 0.0)
    cfg = model["cfg"].model_copy(update={"evaluate": model["cfg"].evaluate.model_copy(
        update={"cpu_large_pixels": 2000, "cpu_tile_size": 24, "tile_overlap": 12})})
    restorer = Restorer.from_file(model["model"])
    log = logging.getLogger("srdiff.test-evaluate")
    lines = evaluate_task.EvalLines(cfg, restorer.device, 6, log)
    tiling = tiling_for(40, 52, restorer.device, cfg.evaluate)
    lq = torch.rand(2, 3, 40, 52, generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.INFO, logger=log.name):
        lines.begin_batch(0, 2, 40, 52, tiling)
        lines.begin_sample(0)
        restorer.restore(lq, torch.zeros(2, DIM), steps=STEPS, seed=0, tile_size=tiling.size,
                         tile_overlap=tiling.overlap, on_network_call=lines.on_call)
        lines.end()
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == ("evaluate: val images of 52x40 are large for the CPU: restoring them in 24-px tiles "
                           "(evaluate.cpu_tile_size; evaluate.tile_size sets the size)")
    assert re.fullmatch(r"evaluate: expected about \d+ s on the CPU \(6 val image\(s\) of 52x40 like the first, 3 "
                        r"steps; timed on the first network calls\)", messages[2])  # after the second call
    steps = [m for m in messages if "batch of 2" in m]
    assert steps[-1].startswith("evaluate: 0/6 images done; batch of 2 (52x40): step 3/3 (")
    assert steps[0] == "evaluate: 0/6 images done; batch of 2 (52x40): step 0/3"  # 1 of 3 tile batches, untimed
    assert all(re.fullmatch(r"evaluate: 0/6 images done; batch of 2 \(52x40\): step [1-3]/3 "
                            r"\(\S+ steps/s, ETA \d+ s\)", m) for m in steps[1:]), steps
    assert evaluate_task.resolution(cfg.evaluate, torch.device("cpu")) == (
        "full; on the CPU, images over 2000 pixels in tiles 24/12")
    assert evaluate_task.resolution(cfg.evaluate, torch.device("cuda")) == "full"
