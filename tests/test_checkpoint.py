"""Crash-safe checkpoints: atomic writes, pointer last, pruning, weights_only loads, mismatches."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from srdiff_core import checkpoint as ckpt_mod
from srdiff_core.checkpoint import (
    CheckpointMismatch,
    capture_rng_state,
    check_compatible,
    latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)


def _payload(value: float) -> dict:
    return {"weights": {"w": torch.full((2, 2), value)}, "step": int(value), "config": {"unet": {"nf": 8}}}


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_save_writes_checkpoint_then_pointer(tmp_path, monkeypatch):
    renamed: list[str] = []
    real_replace = os.replace

    def recording_replace(src, dst):
        renamed.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(ckpt_mod.os, "replace", recording_replace)
    path = save_checkpoint(tmp_path, _payload(1.0), step=1)

    assert path == tmp_path / "ckpt-00000001.pt"
    assert renamed == ["ckpt-00000001.pt", "latest"]
    assert (tmp_path / "latest").read_text() == "ckpt-00000001.pt\n"
    assert _names(tmp_path) == ["ckpt-00000001.pt", "latest"]


def test_crash_mid_write_keeps_previous_latest_and_hides_partial_file(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, _payload(1.0), step=1)

    def crashing_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(ckpt_mod.torch, "save", crashing_save)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path, _payload(2.0), step=2)
    monkeypatch.undo()

    assert _names(tmp_path) == ["ckpt-00000001.pt", "latest"]
    latest = latest_checkpoint(tmp_path)
    assert latest == tmp_path / "ckpt-00000001.pt"
    assert torch.equal(load_checkpoint(latest)["weights"]["w"], torch.full((2, 2), 1.0))


def test_killed_writer_leftovers_are_ignored_and_cleaned(tmp_path):
    save_checkpoint(tmp_path, _payload(1.0), step=1)
    # A SIGKILL during torch.save leaves its temp file behind (no except clause runs).
    (tmp_path / "ckpt-00000002.pt.tmp").write_bytes(b"\x80\x02garbage")
    (tmp_path / "latest.tmp").write_bytes(b"ckpt-00000002.pt\n")

    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt-00000001.pt"
    save_checkpoint(tmp_path, _payload(3.0), step=3)
    assert _names(tmp_path) == ["ckpt-00000001.pt", "ckpt-00000003.pt", "latest"]


def test_pointer_to_missing_file_falls_back_to_newest_complete(tmp_path):
    save_checkpoint(tmp_path, _payload(1.0), step=1)
    save_checkpoint(tmp_path, _payload(2.0), step=20)
    (tmp_path / "latest").write_text("ckpt-00000099.pt\n")
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt-00000020.pt"
    # A pointer that escapes the directory is not followed either.
    (tmp_path / "latest").write_text("../ckpt-00000001.pt\n")
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt-00000020.pt"


def test_latest_checkpoint_of_empty_or_missing_directory_is_none(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "absent") is None


def test_pruning_keeps_last_n_by_step(tmp_path):
    for step in (100, 200, 300, 400, 500):
        save_checkpoint(tmp_path, _payload(float(step)), step=step, keep_last=2)
    assert _names(tmp_path) == ["ckpt-00000400.pt", "ckpt-00000500.pt", "latest"]
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt-00000500.pt"


def test_keep_last_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="keep_last"):
        save_checkpoint(tmp_path, _payload(1.0), step=1, keep_last=0)


def _draws() -> tuple:
    """Draws from copies of the global states, taken at once: a background thread of an earlier
    test (Prefect's, MLflow's) may draw from the global ``random`` between two of our lines."""
    py, npy = random.Random(), np.random.RandomState()
    py.setstate(random.getstate())
    npy.set_state(np.random.get_state())
    return py.random(), py.gauss(0, 1), npy.standard_normal(3), torch.rand(3)


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    np.random.standard_normal()  # and one in numpy's
    state = capture_rng_state()
    expected = _draws()
    path = save_checkpoint(tmp_path, {"rng": state}, step=0)

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    restore_rng_state(load_checkpoint(path, weights_only=True)["rng"])
    actual = _draws()

    assert actual[:2] == expected[:2]
    np.testing.assert_array_equal(actual[2], expected[2])
    assert torch.equal(actual[3], expected[3])


def test_weights_only_load_refuses_pickled_objects(tmp_path):
    path = save_checkpoint(tmp_path, {"bad": Path("x")}, step=0)
    with pytest.raises(RuntimeError, match="cannot be loaded"):
        load_checkpoint(path)
    assert load_checkpoint(path, weights_only=False)["bad"] == Path("x")


def test_truncated_checkpoint_error_says_what_to_do(tmp_path):
    path = save_checkpoint(tmp_path, _payload(1.0), step=1)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(RuntimeError, match="Delete it to resume from the previous checkpoint"):
        load_checkpoint(path)


def test_non_dict_checkpoint_error_says_what_to_do(tmp_path):
    path = tmp_path / "ckpt-1.pt"  # a checkpoint name holding a bare tensor
    torch.save(torch.zeros(2), path)
    with pytest.raises(RuntimeError) as info:
        load_checkpoint(path)
    assert str(info.value) == (
        f"checkpoint {path} holds a Tensor, not a dict: it was not written by "
        f"srdiff_core.checkpoint.save_checkpoint. Delete or move it out of {tmp_path} to resume from "
        f"the previous checkpoint, or set train.resume: never to start over")


def test_check_compatible_names_every_differing_key():
    saved = {"unet": {"nf": 64, "ch_mult": [1, 2, 4, 8]}, "sde": {"max_sigma": 10.0}, "train": {"betas": [0.9, 0.99]}}
    current = {"unet": {"nf": 32, "ch_mult": [1, 2, 4, 8]}, "sde": {"max_sigma": 50.0}, "train": {"betas": (0.9, 0.99)}}
    keys = ["unet.nf", "unet.ch_mult", "sde.max_sigma", "train.betas", "unet.context_dim"]
    current["unet"]["context_dim"] = 512

    with pytest.raises(CheckpointMismatch) as info:
        check_compatible(saved, current, keys)
    message = str(info.value)
    assert "  unet.nf: checkpoint 64, config 32\n" in message
    assert "  sde.max_sigma: checkpoint 10.0, config 50.0\n" in message
    assert "  unet.context_dim: checkpoint <absent>, config 512\n" in message
    assert "ch_mult" not in message and "betas" not in message  # equal values, tuple == list
    assert "set train.resume: never, or use a new data_root/run name" in message
    # The facts travel typed; a torchrun entry point's own advice (a new --key) is its to add
    # (flows/train_ddp.with_key_advice, tested in test_ddp).
    assert info.value.differences == ("unet.nf: checkpoint 64, config 32", "sde.max_sigma: checkpoint 10.0, config 50.0",
                                      "unet.context_dim: checkpoint <absent>, config 512")
    assert "flows/" not in message
    assert "restore the old values" in message


def test_check_compatible_on_a_section_names_its_leaves():
    saved = {"unet": {"nf": 64, "ch_mult": [1, 2, 4, 8], "conditioning": "semantic"}}
    current = {"unet": {"nf": 64, "ch_mult": [1, 2], "conditioning": "null"}}
    with pytest.raises(CheckpointMismatch) as info:
        check_compatible(saved, current, ["unet"])
    assert str(info.value).splitlines()[1:3] == [
        "  unet.ch_mult: checkpoint [1, 2, 4, 8], config [1, 2]",
        "  unet.conditioning: checkpoint 'semantic', config 'null'",
    ]


def test_check_compatible_accepts_identical_configs():
    config = {"unet": {"nf": 8}, "sde": {"max_sigma": 10.0}}
    check_compatible(config, dict(config), ["unet.nf", "sde.max_sigma"])
