"""A stage's work in several processes on this machine: torchrun running a stage's entry point
(one process per GPU), its output streamed into the stage's log, stopped with the stage. Used by
the embed stage (``embed.nproc``) and the train stage (``train.nproc``). The entry point is a
module the caller passes in (the flow's stage registry names flows/embed_ddp.py and
flows/train_ddp.py): tasks never name a flows module themselves."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections import deque
from pathlib import Path
from types import ModuleType

import torch
import yaml

from srdiff_core.config import Config
from tasks import common
from tasks.common import pick_device

STOP_GRACE_S = 10.0  # after SIGTERM, torchrun's time to stop its ranks before SIGKILL


def torchrun_command(nproc: int, module: str, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", module, *args]


def entry_module(entry: ModuleType | None, stage: str, nproc: int) -> str:
    """The name torchrun runs (``-m``) for the entry point module ``entry``; an error naming the
    way out when none was passed in (a stage task called directly with ``<stage>.nproc`` > 1)."""
    if entry is None:
        raise ValueError(f"{stage}.nproc is {nproc} but no torchrun entry point was passed in: run the stage through "
                         f"the srdiff flow (`srdiff run`), pass ddp_entry= the stage's entry point module, or set "
                         f"{stage}.nproc: 1 to run it in this process")
    return entry.__name__


def check_nproc(cfg: Config, setting: str, nproc: int) -> None:
    """One process per GPU: refuse more processes than visible CUDA devices (``setting``, e.g.
    "train.nproc", names the config value in the message)."""
    if pick_device(cfg).type == "cuda" and nproc > torch.cuda.device_count():
        raise ValueError(f"{setting} is {nproc} but only {torch.cuda.device_count()} CUDA device(s) are "
                         f"visible (one process per GPU): lower {setting}, or set device: cpu for CPU processes")


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the child's process group (torchrun and its ranks), SIGKILL what is left after
    STOP_GRACE_S, and reap the child."""
    pgid = proc.pid  # the child leads a session of its own: its process group id is its pid
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:  # the whole group is gone already
        proc.wait()
        return
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(pgid, signal.SIGKILL)  # ranks torchrun did not stop in time, or torchrun itself
    except ProcessLookupError:
        pass
    proc.wait()


def run_logged(cmd: list[str], env: dict[str, str], log, prefix: str = "torchrun") -> tuple[int, list[str]]:
    """Run ``cmd``, every output line into ``log`` as "<prefix> line" (a Prefect run's log reaches
    the UI); returns the exit code and the last lines, for the error message.

    The child leads a session of its own, so when this process fails, is interrupted or is
    cancelled (any BaseException) the whole group, torchrun's ranks included, is stopped rather
    than left holding GPUs. Output that is not UTF-8 is decoded with replacement characters."""
    tail: deque[str] = deque(maxlen=30)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            encoding="utf-8", errors="replace", start_new_session=True)
    try:
        for line in proc.stdout:
            line = line.rstrip()
            tail.append(line)
            (log.warning if "WARNING" in line or "Error" in line else log.info)(f"{prefix} {line}")
        return proc.wait(), list(tail)
    except BaseException:
        _stop_group(proc)
        raise
    finally:
        proc.stdout.close()


def run_torchrun(cfg: Config, stage: str, nproc: int, module: str, args: list[str], log) -> None:
    """``module`` (a stage's torchrun entry point, by module name) in ``nproc`` processes on this
    machine under torchrun, given ``cfg`` as a config file plus ``args``; its output streamed into
    ``log``. A failure is an error holding torchrun's last lines."""
    setting = f"{stage}.nproc"
    check_nproc(cfg, setting, nproc)
    data = cfg.model_dump(mode="json")
    data["data_root"] = common.data_root(cfg)  # absolute: the children agree on every stage folder
    # The children import tasks/ and flows/ from this checkout, wherever they start.
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)}
    with tempfile.TemporaryDirectory(prefix=f"srdiff-{stage}-") as tmp:
        cfg_path = str(Path(tmp) / "config.yaml")
        Path(cfg_path).write_text(yaml.safe_dump(data, sort_keys=True))
        cmd = torchrun_command(nproc, module, ["--config", cfg_path, *args])
        log.info(f"{stage}: {nproc} processes: {' '.join(cmd)}")
        code, tail = run_logged(cmd, env, log, prefix=f"{stage}[torchrun]")
    if code != 0:
        raise RuntimeError(f"{stage}: torchrun with {nproc} processes failed (exit {code}); its last lines:\n"
                           + "\n".join(tail) + f"\nrerun with --set {setting}=1 to see the error in one process")
