"""CLIP loading from every offline route, and the batched preprocessing against open_clip's own.

Most tests use a tiny ViT registered with open_clip (image 64, width 64, 2 layers) so they run
in well under a second each; one test runs the real ViT-B-32 architecture, and one loads the
real "openai" tag of ViT-B-32 from a pre-filled Hugging Face cache.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import huggingface_hub.constants
import open_clip
import open_clip.pretrained
import pytest
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import save_file

from srdiff_core.clip_embed import (
    ClipWeightsUnavailable,
    embed_batch,
    embed_reference,
    hf_hub_location,
    load_clip,
    preprocess_batch,
)

TINY_ARCH = "srdiff-test-tiny-vit"
TINY_MODEL_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}
FAKE_TAG = "srdiff_fake"
FAKE_HF_REPO = "srdiff-test/tiny-clip"
COMMIT = "0123456789abcdef0123456789abcdef01234567"  # any 40-hex string names a snapshot


@pytest.fixture(scope="session", autouse=True)
def tiny_arch(tmp_path_factory) -> str:
    """Register the tiny architecture through open_clip's public add_model_config."""
    folder = tmp_path_factory.mktemp("open_clip_configs")
    (folder / f"{TINY_ARCH}.json").write_text(json.dumps(TINY_MODEL_CFG))
    open_clip.add_model_config(folder / f"{TINY_ARCH}.json")
    return TINY_ARCH


@pytest.fixture
def offline_hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face hub cache, offline. huggingface_hub reads HF_HOME/HF_HUB_OFFLINE at
    import, so the module constants are patched too (the env var is what our message checks)."""
    cache = tmp_path / "hf_home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def write_hf_snapshot(cache: Path, repo_id: str, filename: str, state_dict: dict) -> Path:
    """The hub cache layout hf_hub_download reads offline: refs/main -> snapshots/<commit>/file."""
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
    snapshot = repo_dir / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, snapshot / filename)
    return snapshot / filename


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sample_images(seed: int = 0) -> list[torch.Tensor]:
    """uint8 [3,H,W] images of different sizes and aspect ratios: noise (worst case for resize
    rounding), smooth gradients, and a hard-edged checkerboard; some up-, some down-sampled."""
    g = torch.Generator().manual_seed(seed)
    noise = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in [(48, 80), (131, 97)]]
    yy, xx = torch.meshgrid(torch.arange(72), torch.arange(200), indexing="ij")
    gradient = torch.stack([xx * 255 // 199, yy * 255 // 71, (xx + yy) % 256]).to(torch.uint8)
    checker = (((torch.arange(90)[:, None] // 9 + torch.arange(64)[None, :] // 9) % 2) * 255).to(torch.uint8)
    return [*noise, gradient, checker.expand(3, -1, -1).contiguous(), torch.full((3, 64, 64), 77, dtype=torch.uint8)]


def to_pil(img: torch.Tensor) -> Image.Image:
    return Image.fromarray(img.permute(1, 2, 0).numpy())


def relative_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).norm(dim=-1) / b.norm(dim=-1)


def reference_embeddings(encoder, images) -> torch.Tensor:
    return torch.cat([embed_reference(encoder, to_pil(img)) for img in images])


# ---------------------------------------------------------------- preprocessing and embedding


def test_batched_path_matches_open_clip_reference_on_mixed_sizes():
    encoder = load_clip(TINY_ARCH, "none")
    images = sample_images()
    batched = embed_batch(encoder, images)
    reference = reference_embeddings(encoder, images)
    assert batched.shape == (len(images), 32) and batched.dtype == torch.float32
    assert torch.allclose(batched.norm(dim=-1), torch.ones(len(images)), atol=1e-6)
    assert relative_error(batched, reference).max() < 1e-3


def test_preprocessing_is_within_one_grey_level_of_pil():
    encoder = load_clip(TINY_ARCH, "none")
    transform = open_clip.image_transform(64, is_train=False)  # open_clip's inference transform
    one_level = 1.0 / 255.0 / min(encoder.std)
    for img in sample_images():
        ours = preprocess_batch([img], encoder)[0]
        theirs = transform(to_pil(img))
        assert ours.shape == theirs.shape == (3, 64, 64)
        diff = (ours - theirs).abs()
        assert diff.max() <= one_level + 1e-5  # PIL's fixed-point rounding, never more
        assert (diff > 1e-5).float().mean() < 0.01


def test_same_size_tensor_batch_equals_list_path():
    encoder = load_clip(TINY_ARCH, "none")
    g = torch.Generator().manual_seed(1)
    batch = torch.randint(0, 256, (3, 3, 50, 90), generator=g, dtype=torch.uint8)
    assert torch.allclose(embed_batch(encoder, batch), embed_batch(encoder, list(batch)), atol=1e-6)


def mixed_size_list() -> list[torch.Tensor]:
    """Seven noise images of three sizes (one already 64 x 64, i.e. not resized) in interleaved order."""
    g = torch.Generator().manual_seed(2)
    sizes = [(48, 80), (131, 97), (48, 80), (64, 64), (131, 97), (48, 80), (64, 64)]
    return [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in sizes]


def test_list_of_mixed_sizes_equals_per_image_preprocessing():
    # Same-size images are resized as one batch: that must not change a single value.
    encoder = load_clip(TINY_ARCH, "none")
    images = mixed_size_list()
    per_image = torch.cat([preprocess_batch(img.unsqueeze(0), encoder) for img in images])
    assert torch.equal(preprocess_batch(images, encoder), per_image)


def test_list_preprocessing_keeps_the_input_order():
    # Flat grey images stay flat through resize and crop, so each output names its input by its value.
    encoder = load_clip(TINY_ARCH, "none")
    sizes = [(48, 80), (131, 97), (48, 80), (64, 64), (131, 97), (48, 80)]
    levels = [10, 200, 60, 120, 30, 250]
    images = [torch.full((3, h, w), level, dtype=torch.uint8) for (h, w), level in zip(sizes, levels)]
    out = preprocess_batch(images, encoder)
    mean, std = torch.tensor(encoder.mean).view(3, 1, 1), torch.tensor(encoder.std).view(3, 1, 1)
    for pixels, level in zip(out, levels):
        assert torch.allclose(pixels, ((level / 255.0 - mean) / std).expand(3, 64, 64), atol=1e-6)


def test_preprocess_rejects_float_images():
    encoder = load_clip(TINY_ARCH, "none")
    with pytest.raises(ValueError, match="uint8"):
        preprocess_batch(torch.rand(1, 3, 64, 64), encoder)


def test_real_vit_b32_random_weights_batched_matches_reference():
    encoder = load_clip("ViT-B-32", "none")
    assert (encoder.image_size, encoder.embed_dim, encoder.random_weights) == (224, 512, True)
    assert encoder.mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    images = sample_images()[:3]
    assert relative_error(embed_batch(encoder, images), reference_embeddings(encoder, images)).max() < 1e-3


# ---------------------------------------------------------------- random weights


def test_random_weights_are_labelled_and_deterministic_for_the_seed():
    rng_before = torch.get_rng_state()
    a, b, c = load_clip(TINY_ARCH, "none", seed=3), load_clip(TINY_ARCH, "none", seed=3), load_clip(TINY_ARCH, "none", seed=4)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is left alone
    assert a.random_weights and "random CLIP weights" in a.weights
    assert a.weights_digest == b.weights_digest and a.weights_digest.startswith("random-seed-3-")
    assert c.weights_digest != a.weights_digest
    images = sample_images()[:2]
    assert torch.equal(embed_batch(a, images), embed_batch(b, images))
    assert not torch.allclose(embed_batch(a, images), embed_batch(c, images))


# ---------------------------------------------------------------- offline weight routes


def write_state_dict_bin(folder: Path, state_dict: dict) -> str:
    path = folder / "weights.bin"
    torch.save(state_dict, path)
    return str(path)


def write_safetensors(folder: Path, state_dict: dict) -> str:
    path = folder / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in state_dict.items()}, path)
    return str(path)


def write_training_checkpoint(folder: Path, state_dict: dict) -> str:
    """What open_clip's trainer saves under DDP: epoch, name, 'module.'-prefixed state_dict, optimizer."""
    path = folder / "epoch_3.pt"
    torch.save({"epoch": 3, "name": "tiny-run", "state_dict": {f"module.{k}": v for k, v in state_dict.items()},
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": []}]}}, path)
    return str(path)


def write_local_dir(folder: Path, state_dict: dict) -> str:
    model_dir = folder / "tiny-clip"
    model_dir.mkdir()
    preprocess = {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD),
                  "interpolation": "bicubic", "resize_mode": "shortest"}
    (model_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_MODEL_CFG,
                                                                 "preprocess_cfg": preprocess}))
    save_file({k: v.contiguous() for k, v in state_dict.items()}, model_dir / "open_clip_model.safetensors")
    return f"local-dir:{model_dir}"


@pytest.mark.parametrize("write", [write_state_dict_bin, write_safetensors, write_training_checkpoint, write_local_dir])
def test_offline_file_routes_load_the_written_weights(write, tmp_path):
    source = load_clip(TINY_ARCH, "none", seed=7)
    pretrained = write(tmp_path, source.model.state_dict())
    loaded = load_clip(TINY_ARCH, pretrained, seed=0)  # a different seed: only the file can make them equal
    assert not loaded.random_weights and "random" not in loaded.weights
    images = sample_images()
    assert torch.equal(embed_batch(loaded, images), embed_batch(source, images))
    if not pretrained.startswith("local-dir:"):
        assert loaded.weights_digest == sha256_file(Path(pretrained))


def test_fake_tag_loads_from_prefilled_hf_cache(offline_hf_cache, monkeypatch):
    tag_cfg = open_clip.pretrained._pcfg(hf_hub=f"{FAKE_HF_REPO}/")
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, TINY_ARCH, {FAKE_TAG: tag_cfg})
    assert hf_hub_location(TINY_ARCH, FAKE_TAG) == (FAKE_HF_REPO, "open_clip_model.safetensors")
    source = load_clip(TINY_ARCH, "none", seed=5)
    path = write_hf_snapshot(offline_hf_cache, FAKE_HF_REPO, "open_clip_model.safetensors", source.model.state_dict())
    loaded = load_clip(TINY_ARCH, FAKE_TAG)
    assert loaded.weights == f"{FAKE_TAG} (pretrained tag)" and loaded.weights_digest == sha256_file(path)
    images = sample_images()
    assert torch.equal(embed_batch(loaded, images), embed_batch(source, images))


def test_real_openai_tag_loads_from_prefilled_hf_cache(offline_hf_cache):
    # OpenAI's ViT-B-32 was trained with QuickGELU; open_clip's tag config says so and the
    # plain "ViT-B-32" config does not, so load_clip must switch QuickGELU on for this tag.
    repo_id, filename = hf_hub_location("ViT-B-32", "openai")
    assert (repo_id, filename) == ("timm/vit_base_patch32_clip_224.openai", "open_clip_model.safetensors")
    source = load_clip("ViT-B-32-quickgelu", "none", seed=1)
    write_hf_snapshot(offline_hf_cache, repo_id, filename, source.model.state_dict())
    loaded = load_clip("ViT-B-32", "openai")
    assert loaded.weights == "openai (pretrained tag)" and not loaded.random_weights
    images = sample_images()[:1]
    assert torch.equal(embed_batch(loaded, images), embed_batch(source, images))


# ---------------------------------------------------------------- when weights cannot be had


def test_missing_tag_weights_error_names_tag_and_the_three_offline_ways(offline_hf_cache):
    with pytest.raises(ClipWeightsUnavailable) as info:
        load_clip("ViT-B-32", "openai")
    message = str(info.value)
    assert "'ViT-B-32'" in message and "'openai'" in message
    assert "HF_HUB_OFFLINE=1" in message
    assert ".safetensors" in message and "training checkpoint" in message  # 1. a local file
    assert "local-dir:" in message and "open_clip_config.json" in message  # 2. a local-dir folder
    assert "HF_HOME" in message and "huggingface-cli download timm/vit_base_patch32_clip_224.openai" in message  # 3.
    assert "embed.pretrained: none for random weights (not for real results)" in message


def test_missing_file_and_weightless_local_dir_are_refused(tmp_path):
    with pytest.raises(ClipWeightsUnavailable, match="no such file"):
        load_clip(TINY_ARCH, str(tmp_path / "absent.safetensors"))
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_MODEL_CFG}))
    # open_clip itself would only warn and hand back a random model here.
    with pytest.raises(ClipWeightsUnavailable, match="no .safetensors/.bin/.pth weights"):
        load_clip(TINY_ARCH, f"local-dir:{tmp_path}")
    with pytest.raises(ClipWeightsUnavailable, match="known tags: .*openai"):
        load_clip("ViT-B-32", "not-a-tag")


def register_tiny_variant(tmp_path: Path, name: str, **changes) -> str:
    """Another tiny architecture: the tiny config with top-level or vision_cfg entries changed."""
    cfg = json.loads(json.dumps(TINY_MODEL_CFG))
    for key, value in changes.items():
        (cfg if key in cfg else cfg["vision_cfg"])[key] = value
    (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    return name


@pytest.mark.parametrize("changes, write, torch_detail", [
    ({"embed_dim": 16}, write_state_dict_bin, "size mismatch for text_projection"),
    ({"layers": 3}, write_safetensors, "Unexpected key(s)"),
    ({"layers": 1}, write_training_checkpoint, "Missing key(s)"),
], ids=["embed-dim-bin", "more-layers-safetensors", "fewer-layers-checkpoint"])
def test_weights_of_another_arch_are_refused_naming_file_and_arch(changes, write, torch_detail, tmp_path):
    other = register_tiny_variant(tmp_path, f"srdiff-test-tiny-{'-'.join(map(str, changes.items()))}", **changes)
    path = write(tmp_path, load_clip(other, "none").model.state_dict())
    with pytest.raises(ClipWeightsUnavailable) as info:
        load_clip(TINY_ARCH, path)
    message = str(info.value)
    assert f"{path} does not fit embed.arch '{TINY_ARCH}'" in message and torch_detail in message
    assert (f"set embed.arch to the architecture the file was saved from, or point embed.pretrained at "
            f"weights for {TINY_ARCH}") in message
    assert isinstance(info.value.__cause__, RuntimeError)  # torch's full list stays in the traceback


def test_local_dir_whose_config_does_not_fit_its_weights_is_refused(tmp_path):
    other = register_tiny_variant(tmp_path, "srdiff-test-tiny-embed-16", embed_dim=16)
    pretrained = write_local_dir(tmp_path, load_clip(other, "none").model.state_dict())
    folder = pretrained[len("local-dir:"):]
    with pytest.raises(ClipWeightsUnavailable) as info:
        load_clip(TINY_ARCH, pretrained)
    message = str(info.value)
    weights, config = f"{folder}/open_clip_model.safetensors", f"{folder}/open_clip_config.json"
    assert f"{weights} does not fit the model_cfg of {config}" in message
    assert "size mismatch for text_projection" in message and "embed.arch" not in message


def test_file_holding_pickled_objects_is_refused_for_safety(tmp_path):
    # A trainer's checkpoint with its argparse arguments: torch's weights_only=True refuses it, and its
    # own advice (weights_only=False) is exactly what srdiff never does, so the message must replace it.
    path = tmp_path / "trainer.pt"
    state_dict = load_clip(TINY_ARCH, "none").model.state_dict()
    torch.save({"state_dict": state_dict, "args": argparse.Namespace(lr=1e-4)}, path)
    with pytest.raises(ClipWeightsUnavailable) as info:
        load_clip(TINY_ARCH, str(path))
    message = str(info.value)
    assert (f"{path} holds pickled Python objects (argparse.Namespace), which srdiff does not load for safety; "
            f"re-save it as a plain state dict (torch.save(model.state_dict(), path)) or as .safetensors") in message
    assert f"'{TINY_ARCH}'" in message and "weights_only=False" not in message


@pytest.mark.parametrize("damage", [lambda data: data[: len(data) // 2], lambda data: b"not torch" * 50,
                                    lambda data: b"\x80\x02garbage" * 50],
                         ids=["truncated", "random-bytes", "pickle-header-then-garbage"])
def test_damaged_torch_weights_file_is_refused_naming_it(damage, tmp_path):
    path = tmp_path / "weights.bin"
    torch.save(load_clip(TINY_ARCH, "none").model.state_dict(), path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ClipWeightsUnavailable) as info:
        load_clip(TINY_ARCH, str(path))
    message = str(info.value)
    assert f"{path}: it is not a " in message and "download it again, or re-save it with torch.save" in message
    assert f"'{TINY_ARCH}'" in message


@pytest.mark.parametrize("cut, safetensors_says", [
    (lambda data: b"abc", "header too small"),
    (lambda data: data[:1000], "invalid header length"),
    (lambda data: data[:-1000], "incomplete metadata"),
], ids=["3-bytes", "first-1000-bytes", "last-1000-bytes-missing"])
def test_corrupt_safetensors_file_is_refused_naming_file_and_arch(cut, safetensors_says, tmp_path):
    path = Path(write_safetensors(tmp_path, load_clip(TINY_ARCH, "none").model.state_dict()))
    path.write_bytes(cut(path.read_bytes()))
    with pytest.raises(ClipWeightsUnavailable) as info:
        load_clip(TINY_ARCH, str(path))
    message = str(info.value)
    assert f"{path} is not a readable safetensors file" in message and safetensors_says in message
    assert "download it again" in message and f"'{TINY_ARCH}'" in message
    assert isinstance(info.value.__cause__, SafetensorError)


def test_corrupt_safetensors_in_the_hf_cache_names_the_cached_file(offline_hf_cache, monkeypatch):
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, TINY_ARCH,
                        {FAKE_TAG: open_clip.pretrained._pcfg(hf_hub=f"{FAKE_HF_REPO}/")})
    path = write_hf_snapshot(offline_hf_cache, FAKE_HF_REPO, "open_clip_model.safetensors",
                             load_clip(TINY_ARCH, "none").model.state_dict())
    path.write_bytes(path.read_bytes()[:-1000])  # an interrupted copy of the cache
    with pytest.raises(ClipWeightsUnavailable, match=f"{path} is not a readable safetensors file"):
        load_clip(TINY_ARCH, FAKE_TAG)
