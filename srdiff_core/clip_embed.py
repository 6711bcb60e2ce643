"""open_clip image embeddings: load a CLIP model from any offline source, preprocess uint8
images with tensor ops on the target device, and embed them in batches.

The batched path reimplements open_clip's inference transform (resize the short side with
PIL bicubic, centre crop, ToTensor, Normalize; open_clip/transform.py ``image_transform``)
as tensor ops, so decoding and resizing stay on the GPU and batch; ``embed_reference`` runs
open_clip's own PIL transform one image at a time and is the yardstick the tests hold the
batched path to.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from open_clip.transformer import QuickGELU
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError
from torch import Tensor

from srdiff_core.checkpoint import refused_global, state_dict_mismatch, unreadable_torch_file
from srdiff_core.config import random_clip_weights

LOCAL_DIR_PREFIX = "local-dir:"
WEIGHT_FILE_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors")
_HASH_CHUNK = 1 << 22


class ClipWeightsUnavailable(RuntimeError):
    """CLIP weights could not be had (offline and not cached, download failure, missing file)."""


@dataclass(frozen=True)
class ClipEncoder:
    model: torch.nn.Module  # the full open_clip model, eval mode, fp32 weights
    arch: str  # open_clip architecture name, e.g. "ViT-B-32"
    weights: str  # human text: "openai (pretrained tag)", "random CLIP weights (seed 0) ...", ...
    weights_digest: str  # sha256 of the weights file(s), or "random-seed-<n>-<sha256 of state_dict>"
    random_weights: bool
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    embed_dim: int
    precision: str = "fp32"  # "bf16": autocast on CUDA (CPU always runs fp32)
    interpolation: str = "bicubic"  # open_clip preprocess_cfg["interpolation"]
    resize_mode: str = "shortest"  # open_clip preprocess_cfg["resize_mode"]
    quick_gelu: bool = False  # the model uses QuickGELU (OpenAI's tags); the same weights with GELU differ

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def compute(self) -> str:
        """Where and in what precision embeddings are computed, e.g. "cuda-bf16", "cpu-fp32" (the
        CPU always runs fp32): the same image gives slightly different vectors in each."""
        device = self.device.type
        return f"{device}-{'bf16' if self.precision == 'bf16' and device == 'cuda' else 'fp32'}"

    @property
    def preprocessing(self) -> str:
        """The batched preprocessing in words (recorded with every embedding table)."""
        return (f"resize ({self.resize_mode}, {self.interpolation}, antialias) to {self.image_size}, "
                f"centre crop, normalise mean {self.mean} std {self.std}")


# Bump when the batched preprocessing's output changes (e.g. a fix to _resize_like_pil): cached
# embeddings made by the older code then stop matching (see cache_descriptor).
PREPROCESSING_VERSION = 1


def _flag(read) -> str:
    try:
        return str(read())
    except (AttributeError, RuntimeError):  # absent in this torch, or set through the other TF32 API
        return "n/a"


def fp32_math(device: torch.device) -> str:
    """How this process computes fp32 matmuls and convolutions on ``device``: torch's
    float32_matmul_precision (on CPU "medium" lets oneDNN use bf16), and on CUDA whether
    cuBLAS and cuDNN use TF32 (both the legacy flags and the fp32_precision API, since torch
    refuses to read one when the other was set). TF32 changes fp32 results in the 3rd decimal."""
    parts = [f"float32_matmul_precision {_flag(torch.get_float32_matmul_precision)}"]
    if torch.device(device).type == "cuda":
        backends = torch.backends
        parts += [f"cuda.matmul.allow_tf32 {_flag(lambda: backends.cuda.matmul.allow_tf32)}",
                  f"cudnn.allow_tf32 {_flag(lambda: backends.cudnn.allow_tf32)}",
                  f"cuda.matmul.fp32_precision {_flag(lambda: backends.cuda.matmul.fp32_precision)}",
                  f"cudnn.conv.fp32_precision {_flag(lambda: backends.cudnn.conv.fp32_precision)}"]
    return ", ".join(parts)


def cache_descriptor(encoder: ClipEncoder) -> dict[str, str]:
    """Everything an image's embedding depends on besides the image bytes: the model part of a
    content-keyed cache key (storage.embed_cache). Two encoders with equal descriptors give the
    same vector for the same image: the weights and the architecture that reads them (QuickGELU
    or not: OpenAI's tag sets it, a local file of the same weights does not), the preprocessing,
    the device and precision with this process's fp32 math settings (read now: build the
    descriptor where the embeddings are computed), and the open_clip and torch versions."""
    return {"arch": encoder.arch, "weights_digest": encoder.weights_digest,
            "quick_gelu": str(encoder.quick_gelu).lower(),
            "preprocessing": f"v{PREPROCESSING_VERSION}: {encoder.preprocessing}", "compute": encoder.compute,
            "fp32_math": fp32_math(encoder.device), "open_clip": open_clip.__version__, "torch": torch.__version__,
            "embed_dim": str(encoder.embed_dim)}


# ---------------------------------------------------------------- weights: where they come from


def _sha256_files(paths: list[Path]) -> str:
    """sha256 over the files' names and bytes, in the given order (streamed, constant memory)."""
    digest = hashlib.sha256()
    for path in paths:
        if len(paths) > 1:
            digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def state_dict_digest(model: torch.nn.Module) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes: a content key for in-memory weights."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\0".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _local_dir_weight_files(folder: Path) -> list[Path]:
    # The same suffixes open_clip's local-dir route searches (factory._find_checkpoint_in_dir).
    return sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pth"))


def hf_hub_location(arch: str, tag: str) -> tuple[str, str] | None:
    """(repo id, weights file name) that open_clip reads for a pretrained tag, or None if the
    tag has no Hugging Face mirror. Follows open_clip.pretrained.download_pretrained: the
    ``hf_hub`` entry is "org/repo/" (default file) or "org/repo/file"; for the default
    open_clip_pytorch_model.bin the safetensors alternative is tried first."""
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg or not cfg.get("hf_hub"):
        return None
    repo_id, filename = os.path.split(cfg["hf_hub"])
    if not filename or filename == "open_clip_pytorch_model.bin":
        filename = "open_clip_model.safetensors"
    return repo_id, filename


def _hub_fetch_hint(arch: str, pretrained: str) -> str:
    """How to fill the HF cache on a machine with network: for this tag, or (when ``pretrained``
    is a path, not a tag) for the first tag of ``arch`` that has a Hugging Face mirror."""
    tags = [pretrained] + [t for t in open_clip.list_pretrained_tags_by_model(arch) if t != pretrained]
    for tag in tags:
        location = hf_hub_location(arch, tag)
        if location is not None:
            repo_id, filename = location
            for_tag = "" if tag == pretrained else f" (for the '{tag}' tag, then set embed.pretrained: {tag})"
            fallback = (" (or open_clip_pytorch_model.bin where the repo has no safetensors file)"
                        if filename == "open_clip_model.safetensors" else "")
            return (f"on a machine with network run `hf download {repo_id} {filename}`{for_tag} "
                    f"(older huggingface_hub: `huggingface-cli download {repo_id} {filename}`){fallback}")
    return (f"on a machine with network run `python -c \"import open_clip; "
            f"open_clip.create_model('{arch}', pretrained='<tag>')\"` with a tag from "
            f"open_clip.list_pretrained_tags_by_model('{arch}')")


def weights_help(arch: str, pretrained: str) -> str:
    """The three offline ways to supply weights, with the exact download command for this tag."""
    fetch = _hub_fetch_hint(arch, pretrained)
    return (
        "Supply the weights in one of three offline ways:\n"
        f"  1. a local file: set embed.pretrained to the path of a .bin/.pt/.pth/.safetensors state_dict "
        f"or an open_clip training checkpoint for {arch};\n"
        f"  2. a local folder: set embed.pretrained to local-dir:/path/to/folder holding "
        f"open_clip_config.json and the weights file;\n"
        f"  3. a pre-filled Hugging Face cache: {fetch}, copy its cache folder (~/.cache/huggingface) "
        f"here and point HF_HOME at it (HF_HUB_OFFLINE=1 then reads it without network);\n"
        f"or set embed.pretrained: none for random weights (not for real results)."
    )


def _unavailable(arch: str, pretrained: str, reason: str) -> ClipWeightsUnavailable:
    return ClipWeightsUnavailable(
        f"CLIP weights for arch {arch!r} with pretrained {pretrained!r} are not available: {reason}.\n"
        + weights_help(arch, pretrained))


def _resolve_tag_file(arch: str, tag: str) -> Path:
    """Local path of a pretrained tag's weights, from the HF cache (or a download when online)."""
    try:
        path = open_clip.download_pretrained(open_clip.get_pretrained_cfg(arch, tag))
    except Exception as e:  # offline cache miss, HTTP error, checksum mismatch: all mean "no weights"
        offline = "HF_HUB_OFFLINE=1 and they are not in the Hugging Face cache" \
            if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") else "download failed"
        raise _unavailable(arch, tag, f"{offline} ({type(e).__name__}: {e})") from e
    if not path or not Path(path).is_file():
        raise _unavailable(arch, tag, f"open_clip resolved the tag to {path!r}, which is not a file")
    return Path(path)


@dataclass(frozen=True)
class _WeightsSource:
    """Where the weights come from, resolved before the model is built."""
    model_name: str  # what open_clip.create_model_and_transforms gets as model_name
    pretrained: str | None  # ... and as pretrained
    weights: str
    digest: str | None  # None: random init, digest of the state_dict after construction
    quick_gelu: bool  # the tag was trained with QuickGELU (e.g. OpenAI's ViT-B-32)
    files: tuple[Path, ...] = ()  # the weights file(s) open_clip reads: named when one is unreadable

    @property
    def local_dir(self) -> bool:
        """The architecture comes from the folder's open_clip_config.json, not arch."""
        return self.model_name.startswith(LOCAL_DIR_PREFIX)


def _resolve_source(arch: str, pretrained: str, seed: int) -> _WeightsSource:
    if random_clip_weights(pretrained):
        return _WeightsSource(arch, None, f"random CLIP weights (seed {seed}; not for real results)", None, False)

    if pretrained.startswith(LOCAL_DIR_PREFIX):
        folder = Path(pretrained[len(LOCAL_DIR_PREFIX):]).expanduser()
        config = folder / "open_clip_config.json"
        if not config.is_file():
            raise _unavailable(arch, pretrained, f"{config} does not exist")
        files = _local_dir_weight_files(folder)
        if not files:
            # open_clip would only warn and build a random model: refuse instead.
            raise _unavailable(arch, pretrained, f"{folder} holds no .safetensors/.bin/.pth weights file")
        return _WeightsSource(f"{LOCAL_DIR_PREFIX}{folder}", None,
                              f"local-dir {folder} ({', '.join(p.name for p in files)})",
                              _sha256_files([config, *files]), False, tuple(files))

    tag_cfg = open_clip.get_pretrained_cfg(arch, pretrained)
    if tag_cfg:
        path = _resolve_tag_file(arch, pretrained)
        return _WeightsSource(arch, pretrained, f"{pretrained} (pretrained tag)", _sha256_files([path]),
                              bool(tag_cfg.get("quick_gelu", False)), (path,))

    path = Path(pretrained).expanduser()
    if path.is_file():
        return _WeightsSource(arch, str(path), f"local file {path}", _sha256_files([path]), False, (path,))
    if path.suffix in WEIGHT_FILE_SUFFIXES or os.sep in pretrained:
        raise _unavailable(arch, pretrained, f"no such file {path}")
    tags = open_clip.list_pretrained_tags_by_model(arch)
    raise _unavailable(arch, pretrained, f"it is neither an open_clip pretrained tag for {arch} "
                                         f"(known tags: {tags or 'none'}) nor an existing file")


def _unreadable_weights(error: Exception, source: _WeightsSource, arch: str) -> str | None:
    """Why open_clip could not read the weights file(s), with the fix, for the three ways an
    existing file fails inside open_clip; None for any other error, which is raised unchanged."""
    if not source.files:
        return None
    file = str(source.files[0]) if len(source.files) == 1 else f"one of {', '.join(map(str, source.files))}"
    if isinstance(error, SafetensorError):
        return f"{file} is not a readable safetensors file ({error}): it is truncated or corrupt; download it again"
    refused = refused_global(error) if isinstance(error, pickle.UnpicklingError) else None
    if refused:
        return (f"{file} holds pickled Python objects ({refused}), which srdiff "
                f"does not load for safety; re-save it as a plain state dict (torch.save(model.state_dict(), path)) "
                f"or as .safetensors")
    if isinstance(error, RuntimeError) and str(error).startswith("Error(s) in loading state_dict"):
        if source.local_dir:
            config = source.files[0].parent / "open_clip_config.json"
            return (f"{file} does not fit the model_cfg of {config} ({state_dict_mismatch(error)}); put the model_cfg "
                    f"of the architecture the weights were saved from in that file, or the matching weights "
                    f"in the folder")
        return (f"{file} does not fit embed.arch {arch!r} ({state_dict_mismatch(error)}); set embed.arch to the "
                f"architecture the file was saved from, or point embed.pretrained at weights for {arch}")
    return _damaged_torch_file(source.files)


def _damaged_torch_file(files: tuple[Path, ...]) -> str | None:
    """For another error from inside open_clip: whether one of the torch weight files is itself
    unreadable (truncated, random bytes: torch raises RuntimeError, EOFError, KeyError, ... there),
    found by loading it alone; None when they all load, so the original error stands."""
    for path in files:
        if path.suffix == ".safetensors":
            continue  # safetensors' own errors are translated above
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            return f"{path}: {unreadable_torch_file(e)}; download it again, or re-save it with torch.save(state_dict)"
    return None


def _create_model(source: _WeightsSource, arch: str, pretrained: str, device: torch.device) -> torch.nn.Module:
    """open_clip's model with the source's weights, fp32 (open_clip's "bf16" casts the weights,
    whereas we keep fp32 weights and autocast: embed_batch)."""
    try:
        model, _, _ = open_clip.create_model_and_transforms(
            source.model_name, pretrained=source.pretrained, precision="fp32", device=device,
            force_quick_gelu=source.quick_gelu, weights_only=True)
    except Exception as e:
        reason = _unreadable_weights(e, source, arch)
        if reason is None:
            raise
        raise _unavailable(arch, pretrained, reason) from e
    return model


# ---------------------------------------------------------------- model


def _image_size(preprocess_cfg: dict) -> int:
    size = preprocess_cfg["size"]
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if h != w:
        raise ValueError(f"non-square CLIP input size {size} is not supported by the batched preprocessing; "
                         f"pick a model with a square image_size")
    return int(h)


def load_clip(arch: str = "ViT-B-32", pretrained: str = "openai", *, device: str | torch.device = "cpu",
              precision: str = "fp32", seed: int = 0) -> ClipEncoder:
    """Build an open_clip model and its weights from an offline-capable source.

    ``pretrained``: "none" (random weights, deterministic for ``seed``), a local weights file
    (state_dict in .bin/.pt/.pth/.safetensors, or an open_clip training checkpoint with
    "state_dict" and "module." prefixes; read with ``torch.load(weights_only=True)``),
    "local-dir:/path" (open_clip_config.json + weights), or an open_clip pretrained tag (read
    from the Hugging Face cache; downloaded only when the hub is reachable). Raises
    :class:`ClipWeightsUnavailable`, naming the three offline ways, when weights cannot be had,
    and naming the file and the fix when it is corrupt, pickles Python objects, or holds weights
    of another architecture.
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    if not pretrained.startswith(LOCAL_DIR_PREFIX) and arch not in open_clip.list_models():
        raise ValueError(f"unknown open_clip architecture {arch!r}; pick one of open_clip.list_models(), "
                         f"e.g. 'ViT-B-32'")
    source = _resolve_source(arch, pretrained, seed)
    device = torch.device(device)
    # Seeded construction without disturbing the caller's RNG: open_clip initialises with the
    # global generator, and random weights must be the same for the same seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _create_model(source, arch, pretrained, device)
    model.eval().requires_grad_(False)
    if device.type == "cuda" and precision == "bf16":
        model = model.to(memory_format=torch.channels_last)

    preprocess_cfg = model.visual.preprocess_cfg
    digest = source.digest or f"random-seed-{seed}-{state_dict_digest(model)}"
    return ClipEncoder(
        model=model, arch=arch, weights=source.weights, weights_digest=digest,
        random_weights=source.digest is None, image_size=_image_size(preprocess_cfg),
        mean=tuple(float(m) for m in preprocess_cfg["mean"]), std=tuple(float(s) for s in preprocess_cfg["std"]),
        embed_dim=int(model.visual.output_dim), precision=precision,
        interpolation="bilinear" if preprocess_cfg["interpolation"] == "bilinear" else "bicubic",
        resize_mode=preprocess_cfg["resize_mode"],
        quick_gelu=any(isinstance(m, QuickGELU) for m in model.modules()))


# ---------------------------------------------------------------- preprocessing


def _shortest_side_size(h: int, w: int, size: int) -> tuple[int, int]:
    """Output (h, w) of torchvision Resize(size) on an h x w image: the short side becomes
    ``size``, the long side int(size * long / short) (torchvision _compute_resized_output_size)."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if w <= h else (new_short, new_long)


def _resize_like_pil(img: Tensor, out_hw: tuple[int, int], interpolation: str) -> Tensor:
    """Resize float [N,3,H,W] in 0..255 the way PIL resizes a uint8 image.

    torch's antialiased bicubic uses PIL's kernel (a = -0.5) and support scaling. PIL
    (libImaging/Resample.c, ImagingResample) resamples separably, horizontal pass first, and
    rounds and clips each pass to uint8; bicubic overshoot on sharp edges is clipped in
    between. Two one-axis passes with the same rounding reproduce that (a single 2-D float
    resize differs by up to ~20 grey levels on noisy images).
    """
    h, w = img.shape[-2:]
    out_h, out_w = out_hw
    if (h, w) == (out_h, out_w):
        return img  # PIL / torchvision skip the resize when the size already matches
    if w != out_w:
        img = F.interpolate(img, size=(h, out_w), mode=interpolation, align_corners=False, antialias=True)
        img = img.round_().clamp_(0.0, 255.0)
    if h != out_h:
        img = F.interpolate(img, size=(out_h, out_w), mode=interpolation, align_corners=False, antialias=True)
        img = img.round_().clamp_(0.0, 255.0)
    return img


def _center_crop(img: Tensor, size: int) -> Tensor:
    """torchvision CenterCrop offsets: int(round((H - size) / 2))."""
    h, w = img.shape[-2:]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return img[..., top:top + size, left:left + size]


def _to_model_input(img_uint8: Tensor, encoder: ClipEncoder) -> Tensor:
    """One same-size uint8 [N,3,H,W] batch -> normalised float [N,3,S,S] on the encoder's device."""
    x = img_uint8.to(encoder.device, non_blocking=True).float()
    size = encoder.image_size
    if encoder.resize_mode == "shortest":
        x = _center_crop(_resize_like_pil(x, _shortest_side_size(*x.shape[-2:], size), encoder.interpolation), size)
    elif encoder.resize_mode == "squash":
        x = _resize_like_pil(x, (size, size), encoder.interpolation)
    else:
        raise ValueError(f"resize_mode {encoder.resize_mode!r} of this model is not supported by the batched "
                         f"path (only 'shortest' and 'squash'); use embed_reference for such models")
    mean = torch.tensor(encoder.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(encoder.std, device=x.device).view(1, 3, 1, 1)
    return (x / 255.0 - mean) / std


def _check_uint8_image(img: Tensor, ndim: int) -> None:
    if img.dtype != torch.uint8 or img.ndim != ndim or img.shape[-3] != 3:
        shape = "[N,3,H,W]" if ndim == 4 else "[3,H,W]"
        raise ValueError(f"expected uint8 RGB images {shape}, got dtype {img.dtype} shape {tuple(img.shape)}; "
                         f"decode to uint8 RGB first (e.g. torchvision.io.decode_png)")


def preprocess_batch(images: Tensor | list[Tensor], encoder: ClipEncoder) -> Tensor:
    """uint8 [N,3,H,W] (one size) or a list of uint8 [3,H,W] (any sizes) -> float32 [N,3,S,S]
    model input on the encoder's device, matching open_clip's PIL preprocessing. A list is
    preprocessed one batch per image size (the same values as one image at a time), in input order."""
    if isinstance(images, Tensor):
        _check_uint8_image(images, 4)
        return _to_model_input(images, encoder)
    if len(images) == 0:
        raise ValueError("preprocess_batch got an empty list of images")
    for img in images:
        _check_uint8_image(img, 3)
    groups = _indices_by_size(images)
    parts = [_to_model_input(torch.stack([images[i] for i in indices]), encoder) for indices in groups]
    if len(groups) == 1:
        return parts[0]
    grouped_order = torch.tensor([i for indices in groups for i in indices], device=parts[0].device)
    return torch.cat(parts)[grouped_order.argsort()]


def _indices_by_size(images: list[Tensor]) -> list[list[int]]:
    """Positions of the images grouped by (H, W), groups in order of first appearance."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault(tuple(img.shape[-2:]), []).append(i)
    return list(groups.values())


# ---------------------------------------------------------------- embedding


@torch.no_grad()
def _encode(encoder: ClipEncoder, pixels: Tensor) -> Tensor:
    use_bf16 = encoder.precision == "bf16" and pixels.device.type == "cuda"
    if use_bf16:
        pixels = pixels.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device_type=pixels.device.type, dtype=torch.bfloat16, enabled=use_bf16):
        features = encoder.model.encode_image(pixels)
    # Normalise in fp32: the embeddings are stored and compared as unit vectors.
    return F.normalize(features.float(), dim=-1)


@torch.no_grad()
def embed_batch(encoder: ClipEncoder, images: Tensor | list[Tensor]) -> Tensor:
    """float32 [N, D] L2-normalised image embeddings (bf16 autocast on CUDA if precision == "bf16")."""
    return _encode(encoder, preprocess_batch(images, encoder))


@torch.no_grad()
def embed_reference(encoder: ClipEncoder, pil_image: Image.Image) -> Tensor:
    """float32 [1, D] embedding through open_clip's own inference transform (PIL, batch 1)."""
    transform = image_transform_v2(PreprocessCfg(**encoder.model.visual.preprocess_cfg), is_train=False)
    pixels = transform(pil_image.convert("RGB")).unsqueeze(0).to(encoder.device)
    return _encode(encoder, pixels)
