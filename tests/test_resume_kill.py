"""Killing the pipeline in the middle of the train stage, then running it again."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from srdiff_core.config import load_config
from tasks.tracking import PARENT_TAG, STAGE_TAG, tracking_uri

TINY = str(Path(__file__).parent / "configs" / "tiny.yaml")
SRDIFF = str(Path(sys.executable).parent / "srdiff")


def start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:  # its own process group, as a terminal gives a command
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_checkpoint(proc: subprocess.Popen, root: Path, log: Path, newer_than: float = 0.0) -> None:
    deadline = time.monotonic() + 300
    while not [p for p in root.glob("runs/train/*/checkpoints/ckpt-*.pt") if p.stat().st_mtime > newer_than]:
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.1)


@pytest.mark.slow
def test_kill_or_ctrl_c_during_train_then_rerun_resumes_without_redoing_or_duplicating(tmp_path):
    overrides = [f"data_root={tmp_path}", "train.steps=150", "train.checkpoint_every=5", "train.log_every=50"]
    cmd = [SRDIFF, "run", "--config", TINY, *sum((["--set", o] for o in overrides), [])]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)  # srdiff's own temporary Prefect server

    # 1. kill -9 of srdiff alone (no chance to clean up): its temporary Prefect server must not outlive it.
    proc = start(cmd, env, tmp_path / "first.log")
    try:
        wait_for_checkpoint(proc, tmp_path, tmp_path / "first.log")
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children, "srdiff started no Prefect server"
        proc.kill()
        proc.wait()
        _, alive = psutil.wait_procs(children, timeout=15)
        assert not alive, f"left running after kill -9: {[p.cmdline()[:4] for p in alive]}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not list(tmp_path.glob("runs/train/*/model.pt")), "killed before the end of training"
    cfg = load_config(TINY, overrides)
    client = MlflowClient(tracking_uri(cfg))
    exp = client.get_experiment_by_name("srdiff").experiment_id
    abandoned = [r.info.run_id for r in client.search_runs([exp], filter_string="attributes.status = 'RUNNING'")]
    assert len(abandoned) == 2  # the parent and the train run: nobody closed them

    # 2. Ctrl-C (SIGINT to the process group) while it trains again: out within 10 s, one line, no traceback.
    checkpoint_time = time.time()
    proc = start(cmd, env, tmp_path / "second.log")
    try:
        wait_for_checkpoint(proc, tmp_path, tmp_path / "second.log", newer_than=checkpoint_time)
        os.killpg(proc.pid, signal.SIGINT)
        sent = time.monotonic()
        proc.wait(timeout=30)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out = (tmp_path / "second.log").read_text()
    assert proc.returncode == 130 and took < 10, (proc.returncode, took, out[-3000:])
    assert "Traceback" not in out and "ConnectError" not in out, out[-3000:]
    (line,) = [x for x in out.splitlines() if x.startswith("srdiff: interrupted")]
    assert "during the train stage" in line and "rerun the same command to resume" in line
    assert f"marked 2 MLflow run(s) left RUNNING by a killed srdiff as KILLED" in out
    assert {client.get_run(r).info.status for r in abandoned} == {"KILLED"}
    assert not client.search_runs([exp], filter_string="attributes.status = 'RUNNING'"), "Ctrl-C left runs open"

    # 3. The same command again finishes what was started.
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-4000:]
    for stage in ("download", "shard", "embed"):
        assert f"{stage}: reused cached outputs" in out
    assert "resuming from" in out and "train step 150/150" in out
    # The steps this run took, not the total.
    ran, resumed_at = map(int, re.search(r"train: (\d+) steps in [\d.]+ s \(resumed at step (\d+), 150 in all\)",
                                         out).groups())
    assert resumed_at > 0 and ran + resumed_at == 150

    # one copy of everything: one folder per stage key, one model file, one model artifact
    for folder in ("shards", "embeddings", "runs/train", "runs/evaluate"):
        assert len([p for p in (tmp_path / folder).iterdir() if p.is_dir()]) == 1, folder
    assert len(list(tmp_path.glob("runs/train/*/model.pt"))) == 1
    trains = client.search_runs([exp], filter_string=f"tags.`{STAGE_TAG}` = 'train'")
    finished = [r for r in trains if r.info.status == "FINISHED"]
    assert len(finished) == 1 and [a.path for a in client.list_artifacts(finished[0].info.run_id, "model")] == \
        ["model/model.pt"]
    parents = client.search_runs([exp], filter_string=f"tags.`{STAGE_TAG}` = 'pipeline'",
                                 order_by=["attributes.start_time DESC"])
    last = client.search_runs([exp], filter_string=f"tags.`{PARENT_TAG}` = '{parents[0].info.run_id}'")
    assert {r.data.tags[STAGE_TAG] for r in last} == {"download", "shard", "embed", "train", "evaluate"}
