"""Restorer.from_file: a model.pt that tasks.train.model_file_state wrote loads; every other file (a
training checkpoint, any .pt, another srdiff version's or architecture's model.pt) and other CLIP
weights than the embeddings were made with are refused with ModelFileMismatch, naming the fix."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from embed_data import TINY_ARCH, register_tiny_arch, tiny_local_dir
from srdiff_core import clip_embed, srm
from srdiff_core.checkpoint import save_checkpoint
from srdiff_core.config import Config, TrainConfig
from srdiff_core.ema import make_ema
from srdiff_core.restorer import ModelFileMismatch, Restorer
from srdiff_core.training import TrainState, build_optimizer, train_state_dict
from srdiff_core.unet import ConditionalUNet
from tasks.embed import table_metadata
from tasks.refine import save_srm
from tasks.train import model_file_state

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread

PASS_A_MODEL_FILE = ("pass the model.pt that the train stage wrote (data_root/runs/train/<key>/model.pt) "
                     "or the MLflow run id of a train run")
OTHER_VERSION_FIX = "retrain with this srdiff, or restore with the srdiff version that wrote it"
DIM = 16  # the tiny CLIP's embed_dim: the SRM's and the UNet's context width


@dataclasses.dataclass
class Pickled:  # a Python object: torch.load(weights_only=True) refuses it
    value: int = 1


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> dict:
    """Two local-dir CLIP weights of the tiny arch (seeds 0 and 1: two weights digests)."""
    root = tmp_path_factory.mktemp("restorer-clip")
    register_tiny_arch(root)
    return {"weights0": tiny_local_dir(root, seed=0), "weights1": tiny_local_dir(root, seed=1)}


def config(data_root: Path, pretrained: str) -> Config:
    return Config.model_validate({
        "data_root": str(data_root), "device": "cpu",
        "embed": {"arch": TINY_ARCH, "pretrained": pretrained, "srm": {"hidden": 8, "depth": 1}},
        "unet": {"nf": 8, "ch_mult": [1, 2], "num_res_blocks": 1, "context_dim": DIM, "attn_heads": 1},
    })


def model_state(tmp_path: Path, pretrained: str, clip_meta: dict | None = None) -> dict:
    """What the train stage writes to model.pt, for a tiny UNet and SRM."""
    cfg = config(tmp_path, pretrained)
    torch.manual_seed(0)
    unet = ConditionalUNet.from_config(cfg.unet)
    srm_url = str(tmp_path / "srm.pt")
    save_srm(srm_url, srm.SemanticRefinementModule.from_config(DIM, cfg.embed.srm), cfg, DIM)
    return model_file_state(make_ema(unet), cfg, srm_url, clip_meta=clip_meta)


def save(state: object, path: Path) -> Path:
    torch.save(state, path)
    return path


def refused(path: Path, **kwargs) -> str:
    with pytest.raises(ModelFileMismatch) as info:
        Restorer.from_file(path, **kwargs)
    return str(info.value)


def lq_image() -> torch.Tensor:
    return torch.randint(0, 256, (3, 20, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- a model file, and its CLIP weights


def test_model_file_records_the_clip_weights_digest_of_the_embeddings(clip, tmp_path):
    encoder = clip_embed.load_clip(TINY_ARCH, clip["weights0"])
    meta = table_metadata(encoder)
    state = model_state(tmp_path, clip["weights0"], clip_meta=meta)
    assert state["embed"] == {"arch": TINY_ARCH, "pretrained": clip["weights0"],
                              "weights_digest": encoder.weights_digest}
    # Not knowing it records None.
    assert model_state(tmp_path, clip["weights0"])["embed"]["weights_digest"] is None
    with pytest.raises(ValueError, match=r"clip_meta has no weights_digest \(keys \['arch'\]\); pass the embedding "
                                         r"tables' metadata \(tasks.embed.table_metadata\), or None"):
        model_state(tmp_path, clip["weights0"], clip_meta={"arch": TINY_ARCH})


def test_a_model_file_restores_with_the_clip_weights_it_was_trained_with(clip, tmp_path):
    encoder = clip_embed.load_clip(TINY_ARCH, clip["weights0"])
    path = save(model_state(tmp_path, clip["weights0"], clip_meta=table_metadata(encoder)), tmp_path / "model.pt")
    restorer = Restorer.from_file(path)
    assert (restorer.clip_pretrained, restorer.trained_clip_digest) == (clip["weights0"], encoder.weights_digest)
    context = restorer.context_for([lq_image()])
    assert context.shape == (1, DIM)
    assert torch.allclose(context, srm.refine(restorer.srm, clip_embed.embed_batch(encoder, [lq_image()])))


def test_other_clip_weights_than_the_embeddings_were_made_with_are_refused(clip, tmp_path):
    trained = clip_embed.load_clip(TINY_ARCH, clip["weights0"])
    other = clip_embed.load_clip(TINY_ARCH, clip["weights1"])
    assert trained.weights_digest != other.weights_digest
    path = save(model_state(tmp_path, clip["weights0"], clip_meta=table_metadata(trained)), tmp_path / "model.pt")
    restorer = Restorer.from_file(path, clip_pretrained=clip["weights1"])
    with pytest.raises(ModelFileMismatch) as info:
        restorer.context_for([lq_image()])
    assert str(info.value) == (
        f"the CLIP weights {clip['weights1']!r} ({other.weights}, digest {other.weights_digest}) are not those the "
        f"embeddings of {path} were made with (embed.pretrained {clip['weights0']!r}, digest "
        f"{trained.weights_digest}): the semantic guidance would not match what the model was trained on. Load "
        f"the same weights (the evaluate stage: embed.pretrained; srdiff restore: --clip-pretrained, e.g. a local "
        f"copy of them), or retrain with these")
    assert restorer._encoder is None  # refused, not kept for the next call


@pytest.mark.parametrize("older", ["digest None", "no digest entry"])
def test_a_model_file_without_the_clip_digest_loads_with_any_weights_as_before(older, clip, tmp_path):
    state = model_state(tmp_path, clip["weights0"])
    if older == "no digest entry":  # as srdiff wrote model.pt before it recorded the digest
        del state["embed"]["weights_digest"]
    restorer = Restorer.from_file(save(state, tmp_path / "model.pt"), clip_pretrained=clip["weights1"])
    assert restorer.trained_clip_digest is None
    assert restorer.context_for([lq_image()]).shape == (1, DIM)


# ---------------------------------------------------------------- files that are not a model.pt


def test_a_training_checkpoint_is_refused_naming_the_model_file_to_pass(clip, tmp_path):
    cfg = config(tmp_path, clip["weights0"])
    unet = ConditionalUNet.from_config(cfg.unet)
    optimizer, scheduler = build_optimizer(unet, TrainConfig(steps=4))
    state = TrainState(unet, make_ema(unet), optimizer, scheduler, 4, torch.Generator().manual_seed(0))
    path = save_checkpoint(tmp_path / "checkpoints", train_state_dict(state, cfg.model_dump(mode="json")), 4)
    assert refused(path) == (f"{path} is not an srdiff model file (srdiff-model-v1): this is a training checkpoint "
                             f"(step 4), which the train stage turns into model.pt when it finishes; "
                             f"{PASS_A_MODEL_FILE}")
    # Once the run has finished, the message names its model.pt.
    save(model_state(tmp_path, clip["weights0"]), tmp_path / "model.pt")
    assert f"when it finishes (this run's: {tmp_path / 'model.pt'}); pass the model.pt" in refused(path)


@pytest.mark.parametrize("content, why", [
    ({"weights": torch.zeros(2)}, "it has no format 'srdiff-model-v1' (keys: ['weights'])"),
    ({"format": "something-else"}, "it has no format 'srdiff-model-v1' (keys: ['format'])"),
    (torch.zeros(2), "it holds a Tensor, not a dict"),
    ({"format": "srdiff-model-v1", "note": Pickled()}, "it holds pickled Python objects (test_restorer.Pickled), "
                                                       "which srdiff does not load for safety"),
    (b"no torch file", "it is not a torch file, or is damaged (the unpickler refused its bytes)"),
    (b"these bytes", "it is not a readable torch file, or is damaged or truncated (IndexError: pop from empty "
                     "list)"),
    (b"", "it is not a readable torch file, or is damaged or truncated (EOFError: )"),
    ("half a model.pt", "it is not a readable torch file, or is damaged or truncated (RuntimeError: "
                        "PytorchStreamReader failed reading zip archive: failed finding central directory"),
])
def test_a_file_that_is_no_model_file_is_refused_naming_the_model_file_to_pass(content, why, clip, tmp_path):
    path = tmp_path / "some.pt"
    if content == "half a model.pt":
        whole = save(model_state(tmp_path, clip["weights0"]), tmp_path / "model.pt").read_bytes()
        path.write_bytes(whole[: len(whole) // 2])
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        save(content, path)
    message = refused(path)
    assert message.startswith(f"{path} is not an srdiff model file (srdiff-model-v1): {why}")
    assert message.endswith(f"; {PASS_A_MODEL_FILE}") and "weights_only=False" not in message


# ---------------------------------------------------------------- another srdiff version or architecture


def _format_v2(state: dict) -> None:
    state["format"] = "srdiff-model-v2"


def _unet_key_of_another_version(state: dict) -> None:
    state["unet"]["dropout"] = 0.1


def _no_srm(state: dict) -> None:
    del state["srm"]


def _srm_layout_of_another_version(state: dict) -> None:
    state["srm"] = [state["srm"]]


def _wider_unet(state: dict) -> None:
    state["unet"]["nf"] = 16


def _deeper_srm(state: dict) -> None:
    state["srm"]["srm"]["depth"] = 2


@pytest.mark.parametrize("change, why", [
    (_format_v2, "its format is 'srdiff-model-v2', this srdiff reads 'srdiff-model-v1'"),
    (_unet_key_of_another_version, "its unet settings do not fit this srdiff (unet.dropout: Extra inputs are not "
                                   "permitted)"),
    (_no_srm, "it has no entry 'srm'"),
    (_srm_layout_of_another_version, "its entries are laid out differently (list indices must be integers or "
                                     "slices, not str)"),
    (_wider_unet, "its UNet (EMA) weights do not fit the network its settings describe (size mismatch for "),
    (_deeper_srm, "its SRM weights do not fit the network its settings describe (Missing key(s) in state_dict: "
                  "\"blocks.1."),
])
def test_a_model_file_of_another_version_or_architecture_is_refused_naming_the_fix(change, why, clip, tmp_path):
    state = model_state(tmp_path, clip["weights0"])
    change(state)
    path = save(state, tmp_path / "model.pt")
    message = refused(path)
    assert message.startswith(f"{path} was written by another srdiff version or for another architecture: {why}")
    assert message.endswith(f"; {OTHER_VERSION_FIX}")
    assert len(message) < 600  # torch's full key list stays in the chained error
    assert not re.search(r"Traceback|pydantic\.dev", message)
