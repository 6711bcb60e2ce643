"""Full-state training checkpoints on the local filesystem, crash-safe.

Layout of a checkpoint directory::

    ckpt-00005000.pt   complete checkpoints, one per saved step
    ckpt-00010000.pt
    latest             text file naming the newest complete checkpoint, written last

A checkpoint is written to ``<name>.tmp``, fsynced, then renamed (``os.replace`` is atomic on
POSIX); only after that is ``latest`` replaced the same way. A process killed at any moment
therefore leaves either the old or the new ``latest``, each naming a complete file, and at
most a ``*.tmp`` file that every reader ignores.

Checkpoints hold only tensors and plain Python values (dicts, lists, str, int, float, None)
so they load with ``torch.load(weights_only=True)``: loading one never executes pickled code.
"""

from __future__ import annotations

import os
import pickle
import random
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

LATEST_POINTER = "latest"
_CKPT_PATTERN = re.compile(r"^ckpt-(\d+)\.pt$")
_MISSING = object()


class CheckpointMismatch(ValueError):
    """A checkpoint was written with settings that the current run cannot continue from.

    ``differences``: one "key: checkpoint X, config Y" line per differing setting (empty when the
    weights themselves do not fit). A caller with a way of its own to start a fresh run (e.g. a
    command-line argument naming the run folder) adds it to the message."""

    def __init__(self, message: str, differences: tuple[str, ...] = ()):
        super().__init__(message)
        self.differences = tuple(differences)


# ----------------------------------------------------------------------------- RNG state

def capture_rng_state() -> dict:
    """Python, numpy, torch CPU and (if present) CUDA generator states, weights_only-loadable."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state = {
        "python": {"version": py_version, "state": list(py_state), "gauss_next": py_gauss},
        "numpy": {"kind": np_kind, "keys": np_keys.tolist(), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "torch": torch.get_rng_state(),
        "cuda": [],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of :func:`capture_rng_state`; CUDA states are restored only where CUDA is in use."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], np.asarray(npy["keys"], dtype=np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available():
        # A run resumed on fewer GPUs restores the devices it has; extra saved states are unused.
        for index, cuda_state in enumerate(cuda_states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device=index)


# ------------------------------------------------------------------------- atomic writes

def _fsync_directory(directory: Path) -> None:
    # The rename itself is only durable once the directory entry is flushed (POSIX rename(2)).
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Any) -> None:
    """Call ``write(file)`` on ``<path>.tmp``, fsync, rename onto ``path``; no partial file survives."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def refused_global(error: Exception) -> str | None:
    """The global ``torch.load(weights_only=True)`` refused to unpickle, when ``error`` is that
    refusal. Its text advises weights_only=False, which srdiff never uses: callers name the
    global instead of quoting the advice."""
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
    return found.group(1) if found else None


def unreadable_torch_file(error: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` could not read a file, as a clause ("it holds ..."),
    from the error it raised."""
    if isinstance(error, pickle.UnpicklingError):
        refused = refused_global(error)
        if refused:
            return f"it holds pickled Python objects ({refused}), which srdiff does not load for safety"
        return "it is not a torch file, or is damaged (the unpickler refused its bytes)"
    # A cut zip gives RuntimeError; stray bytes give whatever the pickle opcodes trip on (IndexError, ...).
    return f"it is not a readable torch file, or is damaged or truncated ({type(error).__name__}: {error})"


def state_dict_mismatch(error: Exception, limit: int = 200) -> str:
    """The first detail line of ``load_state_dict``'s error (its full list can run to thousands of
    keys; the chained exception keeps all of it), to go inside a sentence."""
    lines = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
    detail = (lines[0] if lines else str(error) or type(error).__name__).rstrip(".")
    return detail if len(detail) <= limit else detail[:limit] + " ..."


def checkpoint_step(path: Path) -> int | None:
    """The step in a checkpoint's file name (``ckpt-<step>.pt``), None for any other name."""
    match = _CKPT_PATTERN.match(path.name)
    return int(match.group(1)) if match else None


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:08d}.pt"


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints in ``directory``, oldest step first (``*.tmp`` files excluded)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(step, p) for p in directory.iterdir() if (step := checkpoint_step(p)) is not None and p.is_file()]
    return [p for _, p in sorted(found)]


def _prune(directory: Path, keep: Path, keep_last: int) -> None:
    complete = list_checkpoints(directory)
    survivors = set(complete[-keep_last:]) | {keep}
    for path in complete:
        if path not in survivors:
            path.unlink(missing_ok=True)
    # *.tmp files are leftovers of killed writers (ours was renamed or removed above).
    for stale in directory.glob("*.tmp"):
        stale.unlink(missing_ok=True)


def save_checkpoint(directory: str | Path, state: dict, step: int, *, keep_last: int = 3) -> Path:
    """Write ``ckpt-<step>.pt`` atomically, then the ``latest`` pointer, then prune old ones.

    Keeps the ``keep_last`` newest checkpoints (by step) and always the one just written.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / checkpoint_name(step)
    _atomic_write(path, lambda f: torch.save(state, f))
    # Pointer last: a reader that sees the new pointer is guaranteed a complete file behind it.
    _atomic_write(directory / LATEST_POINTER, lambda f: f.write((path.name + "\n").encode()))
    _prune(directory, path, keep_last)
    return path


# ---------------------------------------------------------------------------------- reads

def latest_checkpoint(directory: str | Path) -> Path | None:
    """The checkpoint ``latest`` names; if that is missing or unreadable, the newest complete one."""
    directory = Path(directory)
    pointer = directory / LATEST_POINTER
    try:
        name = pointer.read_text().strip()
    except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
        name = ""
    # Only a bare checkpoint file name is trusted; anything else falls back to a directory scan.
    if checkpoint_step(Path(name)) is not None and Path(name).name == name:
        candidate = directory / name
        if candidate.is_file():
            return candidate
    complete = list_checkpoints(directory)
    return complete[-1] if complete else None


def load_checkpoint(path: str | Path, *, weights_only: bool = True) -> dict:
    """Load a checkpoint onto the CPU (callers move tensors with ``load_state_dict``)."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=weights_only)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - torch raises several types for truncated/corrupt files
        raise RuntimeError(
            f"checkpoint {path} cannot be loaded: {unreadable_torch_file(e)}. Delete it to resume from "
            f"the previous checkpoint in {path.parent}, or set train.resume: never to start over") from e
    if not isinstance(ckpt, dict):
        raise RuntimeError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a dict: "
                           f"it was not written by srdiff_core.checkpoint.save_checkpoint. Delete or move "
                           f"it out of {path.parent} to resume from the previous checkpoint, or set "
                           f"train.resume: never to start over")
    return ckpt


# ---------------------------------------------------------------------------- compatibility

def _lookup(config: dict, dotted_key: str) -> Any:
    node: Any = config
    for part in dotted_key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _normalise(value: Any) -> Any:
    # JSON-stored configs turn tuples into lists; (0.9, 0.99) and [0.9, 0.99] are the same setting.
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    return value


def _show(value: Any) -> str:
    return "<absent>" if value is _MISSING else repr(value) if isinstance(value, str) else str(value)


def _differences(key: str, saved: Any, current: Any) -> list[str]:
    """Leaf-level differences, so a section key ("unet") reports "unet.nf", not two whole dicts."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return [line for sub in sorted(saved.keys() | current.keys(), key=str)
                for line in _differences(f"{key}.{sub}", saved.get(sub, _MISSING), current.get(sub, _MISSING))]
    if _normalise(saved) == _normalise(current):
        return []
    return [f"  {key}: checkpoint {_show(saved)}, config {_show(current)}"]


def check_compatible(saved_config: dict, current_config: dict, keys: Iterable[str]) -> None:
    """Raise :class:`CheckpointMismatch` naming every differing value under the dotted ``keys``
    (a key may name a whole section: ``"unet"`` checks every ``unet.*`` value)."""
    differences = [line for key in keys
                   for line in _differences(key, _lookup(saved_config, key), _lookup(current_config, key))]
    if differences:
        raise CheckpointMismatch(
            "the checkpoint to resume from was trained with different settings:\n"
            + "\n".join(differences)
            + "\nTo start a fresh run, set train.resume: never, or use a new data_root/run name; "
              "to continue the old run, restore the old values.", tuple(d.strip() for d in differences))
