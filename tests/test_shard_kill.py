"""The shard writer under a real SIGKILL: a process killed while shards are in flight leaves no
shard that looks finished but is not, and the rerun writes only what is missing, giving the
same bytes as an uninterrupted run (issue 4). test_shards.py covers the same promise with
faults raised inside the process; here nothing of the writer's own clean-up gets to run."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from storage import fs, shards, tables
from test_shards import _png, _record_rewrites, snapshot

REPO = Path(__file__).resolve().parents[1]
MAXCOUNT = 2
PAIRS = 24  # 12 shards: enough that the kill lands with several still to write


@pytest.fixture(scope="module")
def manifest_url(tmp_path_factory) -> str:
    """PAIRS real PNG pairs (train and val, one degradation) and their manifest on disk."""
    root = tmp_path_factory.mktemp("kill-pairs")
    rng = np.random.default_rng(3)
    rows = []
    for i in range(PAIRS):
        split = "train" if i % 3 else "val"
        lq = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
        lq_png, gt_png = _png(lq), _png(255 - lq)
        lq_path, gt_path = root / "LQ" / f"{i:03d}.png", root / "GT" / f"{i:03d}.png"
        for path, data in ((lq_path, lq_png), (gt_path, gt_png)):
            fs.atomic_write_bytes(str(path), data)
        rows.append({"id": f"{split}/hazy/{i:03d}", "dataset": "tiny", "degradation": "hazy", "split": split,
                     "lq_path": str(lq_path), "gt_path": str(gt_path), "width": 20, "height": 24,
                     "lq_sha256": fs.sha256_bytes(lq_png), "gt_sha256": fs.sha256_bytes(gt_png)})
    url = str(root / "pairs.parquet")
    tables.write_table(url, pa.Table.from_pylist(rows, schema=tables.PAIRS_SCHEMA))
    return url


# The child writes with each member copy slowed down (a slow disk, not a fault), so other
# shards are in flight too, and stops for good in the first member of BLOCKED_SHARD, having
# touched a marker: the kill then lands with that shard's temporary open, whatever the timing.
# Its own clean-up never runs.
BLOCKED_SHARD = "train/hazy/pairs-000003.tar"
CHILD = textwrap.dedent("""
    import pathlib, sys, time
    from storage import shards, tables
    manifest_url, out, workers, blocked_member, marker = sys.argv[1:6]
    real_copy = shards.member_bytes
    def slow_copy(member, *args):
        if member.name == blocked_member:
            pathlib.Path(marker).touch()
            time.sleep(3600)
        time.sleep(0.02)
        return real_copy(member, *args)
    shards.member_bytes = slow_copy
    shards.write_shards(tables.read_table(manifest_url), out, maxcount=%d, workers=int(workers))
""" % MAXCOUNT)


def _sidecars(out: Path) -> list[Path]:
    return sorted(out.rglob("pairs-*.tar.json"))


def _kill_mid_shard(manifest_url: str, out: Path, workers: int, finished: int) -> None:
    """Start the child writer; SIGKILL it once it is inside BLOCKED_SHARD and at least
    ``finished`` shards have their sidecars."""
    plan = next(p for p in shards.plan_shards(tables.read_table(manifest_url), maxcount=MAXCOUNT)
                if p.name == BLOCKED_SHARD)
    marker = out.with_name(out.name + ".blocked")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, manifest_url, str(out), str(workers),
                              f"{plan.samples.keys[0]}.lq.png", str(marker)], env=env, cwd=REPO,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() or len(_sidecars(out)) < finished:
            if child.poll() is not None:
                pytest.fail(f"the writer exited ({child.returncode}) before blocking: {child.stderr.read()}")
            if time.monotonic() > deadline:
                pytest.fail(f"the writer did not reach {BLOCKED_SHARD} with {finished} shards done in 120 s")
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL


def _looks_finished(out: Path) -> dict[str, bytes]:
    """Shards the writer would keep (their sidecar names their size), with their bytes."""
    kept = {}
    for sidecar in _sidecars(out):
        shard = sidecar.with_suffix("")
        meta = json.loads(sidecar.read_bytes())
        if shard.exists() and shard.stat().st_size == meta["bytes"]:
            kept[str(shard.relative_to(out))] = shard.read_bytes()
    return kept


@pytest.mark.parametrize("workers", [2, 4])  # local: one shard at a time, or two at once
def test_sigkill_mid_write_then_rerun_equals_an_uninterrupted_run(manifest_url, tmp_path, monkeypatch, workers):
    manifest = tables.read_table(manifest_url)
    reference = tmp_path / "uninterrupted"
    shards.write_shards(manifest, str(reference), maxcount=MAXCOUNT, workers=workers)
    expected = snapshot(str(reference))
    total = sum(1 for name in expected if name.endswith(".tar"))
    assert total == PAIRS // MAXCOUNT

    out = tmp_path / "killed"
    _kill_mid_shard(manifest_url, out, workers, finished=3)
    assert not (out / shards.INDEX_NAME).exists()  # the commit marker is written last
    assert list((out / "train/hazy").glob(".pairs-000003.tar.*.tmp")), "killed mid-shard: its temporary is left"
    finished = _looks_finished(out)
    assert 3 <= len(finished) < total and BLOCKED_SHARD not in finished
    for name, data in finished.items():  # nothing looks finished that is not
        assert data == expected[name], f"{name} has a matching sidecar but other bytes"
        assert json.loads((out / f"{name}.json").read_bytes())["sha256"] == hashlib.sha256(data).hexdigest()

    rewritten = _record_rewrites(monkeypatch)
    shards.write_shards(manifest, str(out), maxcount=MAXCOUNT, workers=workers)
    assert sorted(rewritten) == sorted(n for n in expected if n.endswith(".tar") and n not in finished)
    assert snapshot(str(out)) == expected  # temporaries gone, bytes identical, index and sidecars as well
