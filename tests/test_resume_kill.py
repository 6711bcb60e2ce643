"""Killing the pipeline in the middle of the train stage, then running it again."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from srdiff_core.config import load_config
from tasks.tracking import PARENT_TAG, STAGE_TAG, tracking_uri

TINY = str(Path(__file__).parent / "configs" / "tiny.yaml")
SRDIFF = str(Path(sys.executable).parent / "srdiff")


@pytest.mark.slow
def test_kill_during_train_then_rerun_resumes_without_redoing_or_duplicating(tmp_path):
    overrides = [f"data_root={tmp_path}", "train.steps=150", "train.checkpoint_every=5", "train.log_every=50"]
    cmd = [SRDIFF, "run", "--config", TINY, *sum((["--set", o] for o in overrides), [])]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    with open(tmp_path / "first.log", "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not list(tmp_path.glob("runs/train/*/checkpoints/ckpt-*.pt")):
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # no chance to clean up: the worst case
        proc.wait()
    assert not list(tmp_path.glob("runs/train/*/model.pt")), "killed before the end of training"

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-4000:]
    for stage in ("download", "shard", "embed"):
        assert f"{stage}: reused cached outputs" in out
    assert "resuming from" in out and "train step 150/150" in out

    # one copy of everything: one folder per stage key, one model file, one model artifact
    for folder in ("shards", "embeddings", "runs/train", "runs/evaluate"):
        assert len([p for p in (tmp_path / folder).iterdir() if p.is_dir()]) == 1, folder
    assert len(list(tmp_path.glob("runs/train/*/model.pt"))) == 1
    cfg = load_config(TINY, overrides)
    client = MlflowClient(tracking_uri(cfg))
    exp = client.get_experiment_by_name("srdiff").experiment_id
    trains = client.search_runs([exp], filter_string=f"tags.`{STAGE_TAG}` = 'train'")
    finished = [r for r in trains if r.info.status == "FINISHED"]
    assert len(finished) == 1 and [a.path for a in client.list_artifacts(finished[0].info.run_id, "model")] == \
        ["model/model.pt"]
    parents = client.search_runs([exp], filter_string=f"tags.`{STAGE_TAG}` = 'pipeline'",
                                 order_by=["attributes.start_time DESC"])
    last = client.search_runs([exp], filter_string=f"tags.`{PARENT_TAG}` = '{parents[0].info.run_id}'")
    assert {r.data.tags[STAGE_TAG] for r in last} == {"download", "shard", "embed", "train", "evaluate"}
