"""storage.shards: deterministic, resumable WebDataset shards; srdiff_core.data: the DDP-aware PairDataset."""

from __future__ import annotations

import gc
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
import uuid
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pytest
import torch
import webdataset as wds
from PIL import Image

from srdiff_core import data
from storage import fs, shard_plan, shard_stream, shard_tar, shards, tables
from tasks.advice import REPAIR_HINT, advised

DEGRADATIONS = ("hazy", "rainy")
PER_GROUP = {"train": 4, "val": 2}  # maxcount 3 -> train groups 3+1, val groups 2: 6 shards
SIZES = [(9, 11), (12, 8), (16, 16), (7, 13)]  # (h, w); 7x13 is smaller than the 8-px patches
LONG_ID = "val/hazy/" + "x" * 120  # > 100 bytes: its tar members need PAX headers
# test_shard_bytes_are_pinned: the shards of _fixed_manifest, as written since SHARD_FORMAT 2.
PINNED_SHARD_SHA256 = ["f7fde1523e35af1f2098dd226e57d5d26fffb25fa957dfcb85d65913afb97e7a",
                       "f17672e8b3f04cc57864ecfa2cd66d971e43126273ad32fe63cb4317a240a41c",
                       "31c5d61d80068d172d91d28fe2964a8a34b3ee35c0c966894d0ad62b6877c616"]


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _ids(split: str, degradation: str) -> list[str]:
    # "/" and "." in ids exercise the tar key escaping.
    ids = [f"{split}/{degradation}/img.{i}" for i in range(PER_GROUP[split])]
    return ids[:-1] + [LONG_ID] if (split, degradation) == ("val", "hazy") else ids


def make_pairs(root: str) -> pa.Table:
    """12 real PNG pairs under ``root``; GT = 255 - LQ, so any misaligned crop is visible."""
    rng = np.random.default_rng(0)
    rows = []
    for split in PER_GROUP:
        for degradation in DEGRADATIONS:
            for i, sample_id in enumerate(_ids(split, degradation)):
                h, w = SIZES[i % len(SIZES)]
                lq = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                name = f"{split}-{degradation}-{i}.png"
                lq_url, gt_url = fs.join(root, "LQ", name), fs.join(root, "GT", name)
                lq_png, gt_png = _png(lq), _png(255 - lq)
                fs.atomic_write_bytes(lq_url, lq_png)
                fs.atomic_write_bytes(gt_url, gt_png)
                rows.append({"id": sample_id, "dataset": "tiny", "degradation": degradation, "split": split,
                             "lq_path": lq_url, "gt_path": gt_url, "width": w, "height": h,
                             "lq_sha256": fs.sha256_bytes(lq_png), "gt_sha256": fs.sha256_bytes(gt_png)})
    rows.reverse()  # the writer must sort, not trust the manifest order
    return pa.Table.from_pylist(rows, schema=tables.PAIRS_SCHEMA)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> pa.Table:
    return make_pairs(str(tmp_path_factory.mktemp("pairs")))


@pytest.fixture
def memory_root():
    url = f"memory://shards-test-{uuid.uuid4().hex}"
    yield url
    if fs.exists(url):
        fs.remove(url, recursive=True)


@pytest.fixture(scope="module")
def written(source, tmp_path_factory) -> str:
    """One finished shard folder shared by the read-only tests."""
    out = str(tmp_path_factory.mktemp("written") / "shards")
    shards.write_shards(source, out, maxcount=3, workers=2)
    return out


def snapshot(url: str) -> dict[str, bytes]:
    """Relative path -> bytes of every file under ``url``."""
    filesystem, root = fs.resolve(url)
    return {p[len(root):].lstrip("/"): filesystem.cat_file(p) for p in filesystem.find(root)}


def expected_samples(manifest: pa.Table) -> dict[str, dict]:
    return {r["id"]: r for r in manifest.to_pylist()}


# --------------------------------------------------------------------------------------------
# planning (pure)

def _fake_rows(n: int, gt_size: int = 600) -> tuple[list[dict], dict[str, int]]:
    rows = [{"id": f"s{i}", "dataset": "d", "degradation": "hazy", "split": "train",
             "lq_path": f"memory://src/{i}.lq.png", "gt_path": f"memory://src/{i}.gt.png",
             "width": 1, "height": 1, "lq_sha256": "", "gt_sha256": ""} for i in range(n)]
    sizes = {r["lq_path"]: 100 for r in rows} | {r["gt_path"]: gt_size for r in rows}
    return rows, sizes


def _plan_rows(rows: list[dict], sizes: dict[str, int], **limits) -> list[shards.ShardPlan]:
    return shards.plan_shards(pa.Table.from_pylist(rows, schema=tables.PAIRS_SCHEMA), sizes=sizes, **limits)


def test_plan_sizes_are_exact_tar_arithmetic():
    rows, sizes = _fake_rows(5)
    # Per sample: lq 512+512, gt 512+1024, json 512+512 = 3584 bytes; a tar adds two 512-byte
    # end blocks and pads to a 10240-byte record.
    plans = _plan_rows(rows, sizes, maxcount=3, maxsize=1 << 30)
    assert [p.samples.ids for p in plans] == [["s0", "s1", "s2"], ["s3", "s4"]]
    assert [p.size for p in plans] == [20480, 10240]  # 3*3584+1024 -> 20480; 2*3584+1024 -> 10240
    assert plans[1].name == "train/hazy/pairs-000001.tar"
    # maxsize 10240 fits two samples (8192 -> 10240) but not three (11776 -> 20480).
    by_size = _plan_rows(rows, sizes, maxcount=99, maxsize=10240)
    assert [len(p.samples.ids) for p in by_size] == [2, 2, 1]
    # A sample larger than maxsize still gets a shard, alone.
    big_rows, big_sizes = _fake_rows(2, gt_size=50_000)
    alone = _plan_rows(big_rows, big_sizes, maxcount=99, maxsize=10240)
    assert [len(p.samples.ids) for p in alone] == [1, 1]


def test_sample_keys_have_no_dots_or_slashes():
    assert shards.sample_key("val/hazy/0001_0.8_0.2") == "val%2Fhazy%2F0001_0%2E8_0%2E2"
    assert shards.sample_key("a-b_c") == "a-b_c"
    for odd in ("", "~a", "é", "a b", "x.png", "A-9_z"):  # the shortcut for safe ids agrees with quote()
        assert shards.sample_key(odd) == quote(odd, safe="-_").replace(".", "%2E").replace("~", "%7E")
    assert shard_plan.sample_json({"id": "x", "dataset": "d", "degradation": "hazy", "split": "val",
                               "width": np.int32(3), "height": 2}) == \
        b'{"dataset":"d","degradation":"hazy","height":2,"id":"x","split":"val","width":3}'
    # Filled in directly for string fields; the bytes must stay json.dumps' own.
    for odd in ('q"uote\\back', "tab\tnew\nline", "é ü \u2603", "\x00\x1f", "\ud800"):
        row = {"id": odd, "dataset": odd, "degradation": "hazy", "split": "train", "width": 5, "height": 7}
        want = json.dumps({**{k: row[k] for k in ("id", "dataset", "degradation", "split")},
                           "width": 5, "height": 7}, sort_keys=True, separators=(",", ":")).encode()
        assert shard_plan.sample_json(row) == want, odd
    assert shard_plan.sample_json({**row, "dataset": None}) == want.replace(b'"dataset":"\\ud800"', b'"dataset":null')


def test_tar_header_is_tarfiles_own_bytes():
    # The template fast path must give tarfile's PAX-format header byte for byte, at the ustar
    # limits too (100-byte names, 8**11 - 1 bytes); past them tarfile itself adds PAX records.
    names = ["", "k.json", "hazy-000001.lq.png", "x" * 100, "x" * 101, "caf\u00e9.png", LONG_ID]
    sizes = [0, 1, 511, 512, 15_500, 8 ** 11 - 1, 8 ** 11]
    for name in names:
        for size in sizes:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o444, "", ""
            assert shard_tar.tar_header(name, size) == info.tobuf(tarfile.PAX_FORMAT, "utf-8",
                                                               "surrogateescape"), (name, size)
    assert len(shard_tar.tar_header("x" * 100, 1)) == 512 and len(shard_tar.tar_header("x" * 101, 1)) == 1536


def test_local_os_path_takes_only_local_urls(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert shard_stream.local_os_path("/data/a.png") == "/data/a.png"
    assert shard_stream.local_os_path("file:///data/a.png") == "/data/a.png"
    assert shard_stream.local_os_path("rel/a.png") == f"{os.getcwd()}/rel/a.png"
    assert shard_stream.local_os_path("~/a.png") == os.path.expanduser("~/a.png")
    for url in ("memory://x/a.png", "s3://bucket/a.png", "simplecache::file:///data/a.png"):
        assert shard_stream.local_os_path(url) is None, url


def test_manifest_problems_are_named(source):
    with pytest.raises(ValueError, match="has no pairs: rerun the download stage"), advised():
        shards.plan_shards(source.slice(0, 0))
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['lq_sha256'\]"):
        shards.plan_shards(source.drop(["lq_sha256"]))
    doubled = pa.concat_tables([source, source.slice(0, 1)])
    with pytest.raises(ValueError, match="repeats sample id"):
        shards.plan_shards(doubled)


# --------------------------------------------------------------------------------------------
# writing and reading

@pytest.mark.parametrize("where", ["local", "memory"])
def test_round_trip_copies_bytes_verbatim(source, tmp_path, memory_root, where):
    root = str(tmp_path) if where == "local" else memory_root
    manifest = make_pairs(fs.join(root, "src")) if where == "memory" else source
    out = fs.join(root, "shards")
    calls = []
    index = shards.write_shards(manifest, out, maxcount=3, workers=2, progress=lambda d, t: calls.append((d, t)))
    assert index.column("shard").to_pylist() == [
        "train/hazy/pairs-000000.tar", "train/hazy/pairs-000001.tar",
        "train/rainy/pairs-000000.tar", "train/rainy/pairs-000001.tar",
        "val/hazy/pairs-000000.tar", "val/rainy/pairs-000000.tar"]
    assert index.column("count").to_pylist() == [3, 1, 3, 1, 2, 2]
    assert index.column("first_id").to_pylist()[:2] == ["train/hazy/img.0", "train/hazy/img.3"]
    assert sorted(calls) == [(i, 6) for i in range(1, 7)]
    assert tables.read_table(fs.join(out, "index.parquet")).equals(index)

    expected = expected_samples(manifest)
    seen = []
    for row in index.to_pylist():
        url = fs.join(out, row["shard"])
        assert fs.sha256_file(url) == row["sha256"] and fs.sizes([url])[url] == row["bytes"]
        for sample in shards.iter_samples([url]):
            want = expected[sample["id"]]
            assert sample["lq_png"] == fs.read_bytes(want["lq_path"])
            assert sample["gt_png"] == fs.read_bytes(want["gt_path"])
            assert sample["meta"] == {k: want[k] for k in ("id", "dataset", "degradation", "split",
                                                            "width", "height")}
            seen.append(sample["id"])
    assert sorted(seen) == sorted(expected)
    shards.verify_shards(out)


def test_tar_members_have_fixed_metadata(written):
    url = shards.shard_urls(written, split="val", degradations=["hazy"])[0]
    with tarfile.open(fs.local_path(url)) as tar:
        members = tar.getmembers()
    # webdataset's TarWriter writes a sample's fields in sorted order.
    assert [m.name.split(".", 1)[1] for m in members] == ["gt.png", "json", "lq.png"] * 2
    for m in members:
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o444)
    assert any(len(m.name) > 100 for m in members)  # the long id went through a PAX header


def test_rerun_into_fresh_folder_is_byte_identical(source, written, tmp_path):
    again = str(tmp_path / "again")
    shards.write_shards(source, again, maxcount=3, workers=1)
    assert snapshot(again) == snapshot(written)


def test_small_copy_blocks_give_the_same_bytes(source, written, tmp_path, monkeypatch):
    # 100-byte blocks: every source is read in several chunks and every shard is written in
    # many blocks, more than the writer thread may hold at once. 4 workers: two local shards
    # at once, each started as soon as its group is planned.
    monkeypatch.setattr(shard_stream, "COPY_BUFSIZE", 100)
    again = str(tmp_path / "again")
    shards.write_shards(source, again, maxcount=3, workers=4)
    assert snapshot(again) == snapshot(written)


def test_resume_after_kill_writes_only_missing_shards(source, written, tmp_path, monkeypatch):
    out = str(tmp_path / "shards")
    shutil.copytree(written, out)
    # A run killed after four shards: the last two shards, a sidecar and the index are
    # missing, and a killed writer's temporary is left behind.
    for rel in ("val/hazy/pairs-000000.tar", "val/hazy/pairs-000000.tar.json",
                "val/rainy/pairs-000000.tar.json", "index.parquet"):
        os.remove(os.path.join(out, rel))
    leftover = os.path.join(out, "val/rainy/.pairs-000001.tar.0123456789ab.tmp")
    with open(leftover, "wb") as f:
        f.write(b"half a shard")
    kept = os.stat(os.path.join(out, "train/hazy/pairs-000000.tar")).st_mtime_ns

    rewritten = _record_rewrites(monkeypatch)
    shards.write_shards(source, out, maxcount=3, workers=2)

    assert sorted(rewritten) == ["val/hazy/pairs-000000.tar", "val/rainy/pairs-000000.tar"]
    assert os.stat(os.path.join(out, "train/hazy/pairs-000000.tar")).st_mtime_ns == kept
    assert snapshot(out) == snapshot(written)


def _record_rewrites(monkeypatch) -> list[str]:
    """The names of the shards the writer (re)writes from now on, in a list it fills."""
    rewritten, real_start = [], shards.start_shard
    monkeypatch.setattr(shards, "start_shard",
                        lambda plan, url, side, **kw: rewritten.append(plan.name) or real_start(plan, url, side, **kw))
    return rewritten


def _kill_after_copies(monkeypatch, n: int):
    """Make the writer die (as a kill would) when it starts reading its (n+1)-th source file
    (two per sample: GT, then LQ); returns the real copy function for the rerun."""
    real_copy, copies = shards.member_bytes, []

    def dying_copy(member, *args):
        if len(copies) == n:
            raise KeyboardInterrupt("killed")
        copies.append(member.name)
        return real_copy(member, *args)

    monkeypatch.setattr(shards, "member_bytes", dying_copy)
    return real_copy


def test_failure_mid_shard_leaves_no_finished_looking_file(source, written, tmp_path, monkeypatch):
    out = str(tmp_path / "shards")
    real_copy = _kill_after_copies(monkeypatch, 5)  # inside the third sample of the first shard
    with pytest.raises(KeyboardInterrupt):
        shards.write_shards(source, out, maxcount=3, workers=1)
    assert snapshot(out) == {}  # no shard, no sidecar, no temporary, no index
    monkeypatch.setattr(shards, "member_bytes", real_copy)
    shards.write_shards(source, out, maxcount=3, workers=1)
    assert snapshot(out) == snapshot(written)


def test_empty_or_torn_sidecar_means_the_shard_is_rewritten(source, written, tmp_path, monkeypatch):
    # A sidecar that does not parse (emptied or cut short: a full disk, a copy interrupted by
    # hand) does not vouch for its shard: the shard is rewritten, not trusted, and the result
    # is what an uninterrupted run writes.
    out = str(tmp_path / "shards")
    shutil.copytree(written, out)
    os.remove(os.path.join(out, "index.parquet"))
    for rel, keep in (("train/hazy/pairs-000000.tar.json", 0), ("val/rainy/pairs-000000.tar.json", 17)):
        path = os.path.join(out, rel)
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data[:keep])
    rewritten = _record_rewrites(monkeypatch)
    shards.write_shards(source, out, maxcount=3, workers=1)
    assert sorted(rewritten) == ["train/hazy/pairs-000000.tar", "val/rainy/pairs-000000.tar"]
    assert snapshot(out) == snapshot(written)


def test_changed_plan_rewrites_and_removes_stale_shards(source, written, tmp_path, monkeypatch):
    out = str(tmp_path / "shards")
    shutil.copytree(written, out)
    # Killed while rewriting for a new plan: the old index must not survive to describe the
    # half-changed folder.
    def killed(plan, url, side, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(shards, "start_shard", killed)
    with pytest.raises(KeyboardInterrupt):
        shards.write_shards(source, out, maxcount=2, workers=1)
    assert not os.path.exists(os.path.join(out, "index.parquet"))
    monkeypatch.undo()
    shards.write_shards(source, out, maxcount=2, workers=2)
    fresh = str(tmp_path / "fresh")
    shards.write_shards(source, fresh, maxcount=2, workers=2)
    assert snapshot(out) == snapshot(fresh)
    assert "train/hazy/pairs-000001.tar" in snapshot(out) and "train/hazy/pairs-000002.tar" not in snapshot(out)


def test_changed_source_file_is_refused(source, tmp_path):
    src = make_pairs(str(tmp_path / "src"))
    victim = src.to_pylist()[0]["lq_path"]
    data = bytearray(fs.read_bytes(victim))
    data[-20] ^= 0xFF  # same size, different bytes: only the manifest sha256 can tell
    fs.atomic_write_bytes(victim, bytes(data))
    with pytest.raises(RuntimeError, match="does not match its manifest sha256.*rerun the download stage"), \
            advised():
        shards.write_shards(src, str(tmp_path / "shards"), maxcount=3, workers=1, check_sources=True)
    # Sizes come from the plan: a file that grew or shrank since is caught while copying.
    sizes = fs.sizes([r[k] for r in src.to_pylist() for k in ("lq_path", "gt_path")])
    plan = next(p for p in shards.plan_shards(src, maxcount=3, sizes=sizes)
                if victim in {m.source for m in p.samples.members()})
    for delta, word in [(1, "longer"), (-1, "shorter")]:
        fs.atomic_write_bytes(victim, b"x" * (sizes[victim] + delta))
        with pytest.raises(RuntimeError, match=f"{victim} is {word} than {sizes[victim]} bytes"):
            shards.write_shard(plan, str(tmp_path / "shards"))
    assert not fs.exists(str(tmp_path / "shards" / plan.name))


def test_default_copies_sources_as_they_are_now(source, tmp_path, monkeypatch):
    # The shard stage's default (check_sources=False) does not re-hash sources: one changed
    # since the manifest was written is copied as it is now. Its size is taken when planning,
    # and a file that changes size between planning and copying is still refused.
    src = make_pairs(str(tmp_path / "src"))
    victim = src.to_pylist()[0]["lq_path"]
    data = bytearray(fs.read_bytes(victim))
    data[-20] ^= 0xFF
    data += b"trailing bytes"
    fs.atomic_write_bytes(victim, bytes(data))
    out = str(tmp_path / "shards")
    shards.write_shards(src, out, maxcount=3, workers=1)
    urls = shards.shard_urls(out, split="train") + shards.shard_urls(out, split="val")
    assert bytes(data) in [s["lq_png"] for s in shards.iter_samples(urls)]

    real_sizes = shard_plan.source_sizes

    def sizes_then_change(urls: list[str]) -> dict[str, int]:
        sizes = real_sizes(urls)
        fs.atomic_write_bytes(victim, bytes(data) + b"x")
        return sizes

    monkeypatch.setattr(shard_plan, "source_sizes", sizes_then_change)
    with pytest.raises(RuntimeError, match=f"{victim} is longer than {len(data)} bytes"):
        shards.write_shards(src, str(tmp_path / "again"), maxcount=3, workers=1)
    assert _no_temporaries(str(tmp_path / "again"))


@pytest.mark.parametrize("copy_bufsize, workers", [(1 << 20, 1), (700, 1), (700, 4)])
def test_index_and_sidecars_hold_each_shards_own_sha256(source, tmp_path, monkeypatch, copy_bufsize, workers):
    # The sha256 is computed while the blocks stream out, on another thread: it must still be
    # that of the bytes on disk, with one block per shard or many (700 bytes), shards one
    # after another (1 worker: each finished while the next is read) or two at once (4).
    monkeypatch.setattr(shard_stream, "COPY_BUFSIZE", copy_bufsize)
    out = str(tmp_path / "shards")
    index = shards.write_shards(source, out, maxcount=3, workers=workers)
    for row in index.to_pylist():
        path = os.path.join(out, row["shard"])
        with open(path, "rb") as f:
            data = f.read()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (row["bytes"], row["sha256"]), row["shard"]
        sidecar = json.loads(fs.read_bytes(path + ".json"))
        assert (sidecar["bytes"], sidecar["sha256"]) == (row["bytes"], row["sha256"])


def _no_temporaries(out: str) -> bool:
    return not [p for p in snapshot(out) if p.rsplit("/", 1)[-1].startswith(".")]


def test_kill_in_a_later_shard_keeps_finished_ones_whole(source, written, tmp_path, monkeypatch):
    # One shard is finished (fsync, rename, sidecar) on a side thread while the next one is
    # read: a kill then must leave earlier shards whole or absent, and no temporary.
    out = str(tmp_path / "shards")
    real_copy = _kill_after_copies(monkeypatch, 7)  # inside the second shard (the first has 3 samples of 2 files)
    with pytest.raises(KeyboardInterrupt):
        shards.write_shards(source, out, maxcount=3, workers=1)
    left, reference = snapshot(out), snapshot(written)
    assert _no_temporaries(out) and "index.parquet" not in left
    assert left == {"train/hazy/pairs-000000.tar": reference["train/hazy/pairs-000000.tar"],
                    "train/hazy/pairs-000000.tar.json": reference["train/hazy/pairs-000000.tar.json"]}
    monkeypatch.setattr(shards, "member_bytes", real_copy)
    shards.write_shards(source, out, maxcount=3, workers=1)
    assert snapshot(out) == reference


def test_failed_block_write_leaves_no_finished_looking_shard(source, written, tmp_path, monkeypatch):
    # A write error on the side thread (a full disk, say) must surface, and the shard it hit
    # must not appear under its name; 700-byte blocks put the failure mid-shard.
    monkeypatch.setattr(shard_stream, "COPY_BUFSIZE", 700)
    real_write, calls = shard_stream.write_all, []

    def failing_write(fd, data):
        calls.append(len(data))
        if len(calls) == 10:
            raise OSError(28, "No space left on device")
        real_write(fd, data)

    monkeypatch.setattr(shard_stream, "write_all", failing_write)
    out = str(tmp_path / "shards")
    with pytest.raises(OSError, match="No space left on device"):
        shards.write_shards(source, out, maxcount=3, workers=1)
    left, reference = snapshot(out), snapshot(written)
    assert _no_temporaries(out) and "index.parquet" not in left
    for name, data in left.items():  # whatever was finished is whole, with its sidecar
        assert data == reference[name] and (name.endswith(".json") or name + ".json" in left)
    assert "train/hazy/pairs-000000.tar" not in left  # 20480 bytes: its 10th 700-byte block failed
    assert len({id(b) for b in shard_stream.SPARE_BLOCKS}) == len(shard_stream.SPARE_BLOCKS)  # none given back twice
    monkeypatch.setattr(shard_stream, "write_all", real_write)
    shards.write_shards(source, out, maxcount=3, workers=1)
    assert snapshot(out) == reference


def test_block_buffers_are_reused_not_reallocated(source, tmp_path, monkeypatch):
    # Flat memory: one writer holds at most MAX_PENDING_BLOCKS + 1 block buffers, and a
    # second run takes the same ones back.
    monkeypatch.setattr(shard_stream, "SPARE_BLOCKS", [])
    shards.write_shards(source, str(tmp_path / "a"), maxcount=3, workers=1)
    spare = {id(b) for b in shard_stream.SPARE_BLOCKS}
    assert 0 < len(spare) <= shard_stream.Side.MAX_PENDING_BLOCKS + 1
    shards.write_shards(source, str(tmp_path / "b"), maxcount=3, workers=1)
    assert {id(b) for b in shard_stream.SPARE_BLOCKS} == spare


def test_cycle_collector_is_paused_only_while_writing(source, tmp_path, monkeypatch):
    seen = []
    real_start = shards.start_shard
    monkeypatch.setattr(shards, "start_shard",
                        lambda *a, **kw: seen.append(gc.isenabled()) or real_start(*a, **kw))
    shards.write_shards(source, str(tmp_path / "a"), maxcount=3, workers=1)
    assert seen and not any(seen) and gc.isenabled()
    monkeypatch.setattr(shards, "start_shard", lambda *a, **kw: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        shards.write_shards(source, str(tmp_path / "b"), maxcount=3, workers=1)
    assert gc.isenabled()
    monkeypatch.setattr(shards, "start_shard", real_start)
    gc.disable()  # a caller that turned it off keeps it off
    try:
        shards.write_shards(source, str(tmp_path / "c"), maxcount=3, workers=1)
        assert not gc.isenabled()
    finally:
        gc.enable()


def _flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_verify_names_corrupted_and_missing_shards(written, tmp_path):
    out = str(tmp_path / "shards")
    shutil.copytree(written, out)
    shards.verify_shards(out)
    _flip_byte(os.path.join(out, "train/rainy/pairs-000000.tar"), 612)  # inside the first PNG
    _flip_byte(os.path.join(out, "train/rainy/pairs-000001.tar"), 1500)  # inside the second header
    os.remove(os.path.join(out, "val/rainy/pairs-000000.tar"))
    with pytest.raises(shards.ShardVerificationError) as err, advised():
        shards.verify_shards(out)
    lines = str(err.value).splitlines()
    assert lines[0] == f"3 of 6 shard(s) under {out} failed verification:"
    assert lines[1] == "  train/rainy/pairs-000000.tar: sha256 differs from the index"
    assert lines[2].startswith("  train/rainy/pairs-000001.tar: unreadable (") and "damaged tar header" in lines[2]
    assert lines[3] == "  val/rainy/pairs-000000.tar: missing"
    assert lines[4] == ("the damaged shards are marked for rewriting: rerun the shard stage with the config that "
                        "wrote them and --refresh shard (`srdiff run --config <it> --stages shard --refresh shard`), "
                        "which rewrites only these")
    assert len(lines) == 5
    for rel in ("train/rainy/pairs-000000.tar", "train/rainy/pairs-000001.tar"):
        assert not os.path.exists(os.path.join(out, rel + ".json"))
    assert os.path.exists(os.path.join(out, "train/hazy/pairs-000000.tar.json"))


def test_verify_marks_only_what_it_saw_damaged(written, tmp_path, monkeypatch):
    """No mark for a shard that could not be read (an I/O error may pass), nor through a sidecar
    written since the index (it describes bytes verify did not read); a sidecar that cannot be
    removed is named, the report kept."""
    out = str(tmp_path / "shards")
    shutil.copytree(written, out)
    for rel in ("train/hazy/pairs-000000.tar", "train/hazy/pairs-000001.tar", "train/rainy/pairs-000000.tar"):
        _flip_byte(os.path.join(out, rel), 612)
    newer = os.path.join(out, "train/hazy/pairs-000001.tar.json")
    sidecar = json.loads(open(newer, "rb").read())
    fs.atomic_write_bytes(newer, json.dumps({**sidecar, "sha256": "0" * 64}).encode())
    real_remove = fs.remove

    def failing_remove(url, *args, **kwargs):
        if "rainy" in str(url):
            raise PermissionError(13, "Read-only file system")
        return real_remove(url, *args, **kwargs)

    monkeypatch.setattr(fs, "remove", failing_remove)
    monkeypatch.setattr(shards, "_raw_samples", _raising_for(shards._raw_samples, "val/rainy"))
    with pytest.raises(shards.ShardVerificationError) as err, advised():
        shards.verify_shards(out, workers=1)
    lines = str(err.value).splitlines()
    assert lines[1] == "  train/hazy/pairs-000000.tar: sha256 differs from the index"
    assert lines[2] == ("  train/hazy/pairs-000001.tar: sha256 differs from the index; its sidecar is newer than "
                        "the index (another shard run since?)")
    assert lines[3] == ("  train/rainy/pairs-000000.tar: sha256 differs from the index; its sidecar could not be "
                        "removed (PermissionError: [Errno 13] Read-only file system)")
    assert lines[4] == ("  val/rainy/pairs-000000.tar: could not be read ([Errno 5] Input/output error); it was not "
                        "marked for rewriting")
    assert lines[5].startswith("the damaged shards are marked for rewriting")
    assert lines[6] == ("not marked: train/hazy/pairs-000001.tar, train/rainy/pairs-000000.tar, "
                        "val/rainy/pairs-000000.tar; run `srdiff verify-shards` again, or delete those shards and "
                        "rerun the shard stage")
    assert not os.path.exists(os.path.join(out, "train/hazy/pairs-000000.tar.json"))
    for rel in ("train/hazy/pairs-000001.tar", "train/rainy/pairs-000000.tar", "val/rainy/pairs-000000.tar"):
        assert os.path.exists(os.path.join(out, rel + ".json")), rel


def _raising_for(real, part: str):
    """_raw_samples that fails with EIO for shards whose URL contains ``part``."""
    def samples(stream, url):
        if part in url:
            raise OSError(5, "Input/output error")
        return real(stream, url)
    return samples


def test_verify_marks_damaged_shards_so_the_rerun_rewrites_only_them(source, written, tmp_path, monkeypatch):
    """The repair verify's message promises: a damaged shard of the right size (which the
    writer would otherwise keep, its sidecar matching) is rewritten by the next run, and only it."""
    out = str(tmp_path / "shards")
    shutil.copytree(written, out)
    intact = snapshot(out)
    _flip_byte(os.path.join(out, "train/rainy/pairs-000000.tar"), 612)  # same size, other bytes
    _flip_byte(os.path.join(out, "val/hazy/pairs-000000.tar"), 1500)
    rewritten = _record_rewrites(monkeypatch)
    shards.write_shards(source, out, maxcount=3, workers=2)
    assert rewritten == []  # without verify, the damage goes unnoticed: that is why verify marks
    with pytest.raises(shards.ShardVerificationError):
        shards.verify_shards(out)
    shards.write_shards(source, out, maxcount=3, workers=2)
    assert sorted(rewritten) == ["train/rainy/pairs-000000.tar", "val/hazy/pairs-000000.tar"]
    shards.verify_shards(out)
    assert snapshot(out) == intact


def test_verify_shards_cli(written, tmp_path, capsys):
    """`srdiff verify-shards DIR`: 0 when intact; 1 naming the damaged shard, a missing index or
    an unreadable one (no traceback)."""
    from flows import cli

    out = str(tmp_path / "shards")
    shutil.copytree(written, out)
    assert cli.main(["verify-shards", out]) == 0
    assert capsys.readouterr().out == f"{out}: every shard matches index.parquet\n"
    _flip_byte(os.path.join(out, "train/hazy/pairs-000001.tar"), 600)  # same size, other bytes
    assert cli.main(["verify-shards", out]) == 1
    assert "  train/hazy/pairs-000001.tar: sha256 differs from the index" in capsys.readouterr().err
    fs.atomic_write_bytes(os.path.join(out, "index.parquet"), b"not parquet")
    assert cli.main(["verify-shards", out]) == 1
    assert "index.parquet is not a readable Parquet table" in capsys.readouterr().err
    assert cli.main(["verify-shards", str(tmp_path / "nothing")]) == 1
    assert "index.parquet does not exist; it is written by the shard stage" in capsys.readouterr().err


def test_reader_refuses_damaged_or_truncated_shards(written, tmp_path):
    url = shards.shard_urls(written, split="train", degradations=["hazy"])[0]
    data = fs.read_bytes(url)
    cases = {"header": bytearray(data), "truncated": data[:2048], "no-end": data[:3 * 3584 - 512]}
    cases["header"][1500] ^= 0xFF
    for name, damaged in cases.items():
        path = str(tmp_path / f"{name}.tar")
        fs.atomic_write_bytes(path, bytes(damaged))
        with (pytest.raises(ValueError, match=r"run `srdiff verify-shards` on the shard folder \(it marks damaged "
                                               r"shards for rewriting\), then rerun the shard stage with --refresh "
                                               r"shard"),
              advised()):
            list(shards.iter_samples([path]))
        with pytest.raises(ValueError) as err:  # advice is the task layer's: storage states the facts
            list(shards.iter_samples([path]))
        assert str(err.value).startswith(f"{path}: ") and REPAIR_HINT not in str(err.value)


def test_shard_urls_and_missing_stage_messages(written, tmp_path):
    urls = shards.shard_urls(written, split="train")
    assert [u[len(written) + 1:] for u in urls] == [
        "train/hazy/pairs-000000.tar", "train/hazy/pairs-000001.tar",
        "train/rainy/pairs-000000.tar", "train/rainy/pairs-000001.tar"]
    assert len(shards.shard_urls(written, split="val", degradations=["rainy"])) == 1
    with pytest.raises(ValueError, match=r"no shards for split 'test'.*\['train', 'val'\]"):
        shards.shard_urls(written, split="test")
    with pytest.raises(ValueError, match=r"no shards for degradation\(s\) \['low-light'\]"):
        shards.shard_urls(written, split="val", degradations=["hazy", "low-light"])
    with pytest.raises(FileNotFoundError, match="index.parquet does not exist; it is written by the shard stage"), \
            advised():
        shards.shard_urls(str(tmp_path / "never-written"), split="train")
    with pytest.raises(ValueError, match="no shard URLs"):
        data.PairDataset([])


# --------------------------------------------------------------------------------------------
# decoding and PairDataset

def test_decode_png_gives_rgb_uint8():
    grey = np.array([[0, 128], [255, 7]], np.uint8)
    assert data.decode_png(_png(grey)).tolist() == np.repeat(grey[:, :, None], 3, 2).tolist()
    rgba = np.arange(16, dtype=np.uint8).reshape(2, 2, 4)
    assert data.decode_png(_png(rgba)).tolist() == rgba[:, :, :3].tolist()
    buf = io.BytesIO()
    Image.fromarray(np.array([[0, 257, 65535]], np.uint16)).save(buf, format="PNG")
    assert data.decode_png(buf.getvalue())[..., 0].tolist() == [[0, 1, 255]]
    rgb = data.decode_png(_png(np.full((3, 5, 3), 9, np.uint8)))
    assert rgb.dtype == np.uint8 and rgb.shape == (3, 5, 3)


def test_paired_crop_pads_with_reflection():
    img = np.arange(6, dtype=np.uint8).reshape(2, 3, 1)
    lq, gt = data.paired_random_crop(img, img + 10, 4, np.random.default_rng(0))
    # rows [0 1 2],[3 4 5] reflect-padded to 4x4: rows 0,1,0,1 and columns 0,1,2,1.
    assert lq[..., 0].tolist() == [[0, 1, 2, 1], [3, 4, 5, 4], [0, 1, 2, 1], [3, 4, 5, 4]]
    assert (gt == lq + 10).all()
    with pytest.raises(ValueError, match="differ in size"):
        data.paired_random_crop(img, img[:1], 2, np.random.default_rng(0))


def test_paired_augment_covers_the_eight_symmetries_identically():
    img = np.arange(6, dtype=np.uint8).reshape(2, 3, 1)
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(200):
        lq, gt = data.paired_augment(img, img + 100, rng)
        assert (gt == lq + 100).all()
        seen.add((lq.shape, lq.tobytes()))
    assert len(seen) == 8


def _crop_is_aligned(sample: dict) -> bool:
    # The fixture's GT is 255 - LQ pixel by pixel.
    lq, gt = (sample[k].mul(255).round().to(torch.int32) for k in ("lq", "gt"))
    return bool((lq + gt == 255).all())


def test_pair_dataset_crops_and_augments_lq_and_gt_together(written):
    urls = shards.shard_urls(written, split="train")
    samples = list(data.PairDataset(urls, patch_size=8, augment=True, seed=3))
    assert len(samples) == 8
    for s in samples:
        assert s["lq"].shape == s["gt"].shape == (3, 8, 8) and s["lq"].dtype == torch.float32
        assert 0 <= float(s["lq"].min()) and float(s["lq"].max()) <= 1
        assert _crop_is_aligned(s)
        assert s["degradation"] == s["id"].split("/")[1]
    again = list(data.PairDataset(urls, patch_size=8, augment=True, seed=3))
    assert all(torch.equal(a["lq"], b["lq"]) for a, b in zip(samples, again))
    full = next(iter(data.PairDataset(urls)))  # no crop: the stored size
    assert full["id"] == "train/hazy/img.0" and full["lq"].shape == (3, 9, 11) and _crop_is_aligned(full)


def test_exact_mode_split_covers_each_sample_once(written):
    urls = shards.shard_urls(written, split="train")  # 4 shards, 8 samples
    parts = [data.split_shards(urls, rank=r, world_size=2, worker_id=w, num_workers=2)
             for r in range(2) for w in range(2)]
    assert sorted(u for p in parts for u in p) == sorted(urls) and all(len(p) == 1 for p in parts)
    ids = []
    for rank in range(2):
        dataset = data.PairDataset(urls, patch_size=8, rank=rank, world_size=2)
        loader = data.make_loader(dataset, batch_size=2, num_workers=2)
        ids += [i for batch in loader for i in batch["id"]]
    assert sorted(ids) == sorted(f"train/{d}/img.{i}" for d in DEGRADATIONS for i in range(4))
    with pytest.raises(ValueError, match=r"^4 shards cannot feed 2 ranks x 3 workers \(one each at least\): lower "
                                         r"train.num_workers to at most 2, or lower shard.maxcount so the shard "
                                         r"stage writes more, smaller shards$"), advised():
        data.make_loader(data.PairDataset(urls, world_size=2), batch_size=2, num_workers=3)
    with pytest.raises(ValueError, match=r"^4 shards cannot feed 5 ranks \(one each at least\): lower the training "
                                         r"processes \(train.nproc, or torchrun's --nproc_per_node x --nnodes\) "
                                         r"to at most 4, or lower shard.maxcount"), advised():
        data.make_loader(data.PairDataset(urls, world_size=5), batch_size=2, num_workers=0)


def _as_worker(monkeypatch, worker: int, workers: int) -> None:
    """Read as DataLoader worker ``worker`` of ``workers``, named the way webdataset's
    split_by_worker reads it outside a DataLoader (WORKER, NUM_WORKERS)."""
    monkeypatch.setenv("WORKER", str(worker))
    monkeypatch.setenv("NUM_WORKERS", str(workers))


def test_resampled_mode_is_endless_and_seeded_per_rank_and_worker(written, monkeypatch):
    urls = shards.shard_urls(written, split="train")

    def first_ids(n: int, worker: int = 0, **kw) -> list[str]:
        dataset = data.PairDataset(urls, resampled=True, **kw)
        _as_worker(monkeypatch, worker, 2)
        stream = dataset.raw_samples()
        return [next(stream)["id"] for _ in range(n)]

    a = first_ids(30, seed=1)  # 30 draws from 8 samples: the stream does not end
    assert len(a) == 30 and set(a) <= {f"train/{d}/img.{i}" for d in DEGRADATIONS for i in range(4)}
    assert first_ids(30, seed=1) == a
    assert first_ids(30, seed=2) != a
    assert first_ids(30, seed=1, rank=1, world_size=2) != a
    assert first_ids(30, worker=1, seed=1) != a
    assert first_ids(30, seed=1, shuffle_buffer=4) != a
    with pytest.raises(ValueError, match="shuffle_buffer needs resampled=True"):
        data.PairDataset(urls, shuffle_buffer=4)


def test_resampled_workers_draw_from_shards_of_their_own(written, monkeypatch):
    """Resampled mode gives worker w of n the shards w, w+n, ... (as exact mode), so no two
    workers stream one shard in the same order; with fewer shards than workers, all of them."""
    urls = shards.shard_urls(written, split="train")  # 4 shards
    by_shard = {s["id"]: u for u in urls for s in shards.iter_samples([u])}
    dataset = data.PairDataset(urls, resampled=True, seed=3)

    def shards_read(worker: int, workers: int) -> set[str]:
        _as_worker(monkeypatch, worker, workers)
        stream = dataset.raw_samples()
        return {by_shard[next(stream)["id"]] for _ in range(60)}

    assert shards_read(0, 2) == {urls[0], urls[2]} and shards_read(1, 2) == {urls[1], urls[3]}
    assert shards_read(3, 4) == {urls[3]}
    assert shards_read(4, 5) == set(urls)


def test_embeddings_join_by_id(written):
    urls = shards.shard_urls(written, split="val")
    ids = [s["id"] for s in shards.iter_samples(urls)]
    embeddings = {i: np.array([n, -n, 0.5], np.float64) for n, i in enumerate(ids)}
    samples = list(data.PairDataset(urls, embeddings=embeddings))
    for s in samples:
        n = ids.index(s["id"])
        assert s["context"].dtype == torch.float32 and s["context"].tolist() == [n, -n, 0.5]
    del embeddings[ids[2]]
    with pytest.raises(KeyError, match=f"no embedding for sample id '{ids[2]}': rerun the embed stage"), advised():
        list(data.PairDataset(urls, embeddings=embeddings))


# --------------------------------------------------------------------------------------------
# S3 through s3fs against a real S3 API (moto's server on loopback)

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    # Imported, not importorskip'd: both are test dependencies (pyproject's "test" extra), and
    # a missing one must fail the suite rather than quietly drop the S3 round trip.
    import fsspec.config
    import moto.server  # noqa: F401
    import s3fs

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(port), "-H", "127.0.0.1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"moto_server did not start on {endpoint}")
                time.sleep(0.1)
        with pytest.MonkeyPatch.context() as mp:
            # What a user sets: AWS_* for botocore, FSSPEC_S3_ENDPOINT_URL for fsspec. fsspec reads
            # FSSPEC_* once at import, so apply them the way it does (set_conf_env).
            env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                   "AWS_DEFAULT_REGION": "us-east-1", "FSSPEC_S3_ENDPOINT_URL": endpoint,
                   "NO_PROXY": "127.0.0.1,localhost"}
            for key, value in env.items():
                mp.setenv(key, value)
            conf: dict = {}
            fsspec.config.set_conf_env(conf, env)
            mp.setitem(fsspec.config.conf, "s3", conf["s3"])
            s3fs.S3FileSystem.clear_instance_cache()
            filesystem, _ = fs.resolve("s3://srdiff-test")
            filesystem.mkdir("srdiff-test")
            yield "s3://srdiff-test"
            s3fs.S3FileSystem.clear_instance_cache()
    finally:
        os.kill(server.pid, 15)
        server.wait(timeout=10)


def test_s3_round_trip_and_atomic_writes(source, written, s3_endpoint, tmp_path):
    out = fs.join(s3_endpoint, "run1", "shards")
    index = shards.write_shards(source, out, maxcount=3, workers=2)
    assert snapshot(out) == snapshot(written)  # same bytes as on local disk
    shards.verify_shards(out)
    urls = shards.shard_urls(out, split="val")
    assert all(u.startswith("s3://srdiff-test/run1/shards/val/") for u in urls)
    expected = expected_samples(source)
    samples = list(shards.iter_samples(urls))
    assert len(samples) == 4 == sum(r["count"] for r in index.to_pylist() if r["split"] == "val")
    for s in samples:
        assert s["lq_png"] == fs.read_bytes(expected[s["id"]]["lq_path"])
    # A failed write on S3 leaves neither the object nor its temporary.
    with pytest.raises(RuntimeError):
        with fs.atomic_open(fs.join(s3_endpoint, "run1", "x.bin")) as f:
            f.write(b"partial")
            raise RuntimeError("killed")
    assert [u.rsplit("/", 1)[-1] for u in fs.listdir(fs.join(s3_endpoint, "run1"))] == ["shards"]


def test_sizes_recorded_in_the_manifest_plan_the_shards_and_a_stale_one_is_refused(tmp_path):
    """The download stage records lq_bytes / gt_bytes: the writer plans from them (no stat per
    file) with the same bytes as planning from the files, and a file whose size no longer
    matches is refused when copied, with what to do."""
    import os
    rows = []
    for i in range(4):
        lq, gt = tmp_path / f"lq{i}.png", tmp_path / f"gt{i}.png"
        lq.write_bytes(bytes([i]) * (100 + i))
        gt.write_bytes(bytes([i]) * (300 + i))
        rows.append({"id": f"s{i}", "dataset": "d", "degradation": "hazy", "split": "train",
                     "lq_path": str(lq), "gt_path": str(gt), "width": 1, "height": 1,
                     "lq_sha256": "", "gt_sha256": "", "lq_bytes": 100 + i, "gt_bytes": 300 + i})
    with_sizes = pa.Table.from_pylist(rows, schema=tables.PAIRS_SCHEMA)
    without = pa.Table.from_pylist([{k: v for k, v in r.items() if not k.endswith("_bytes")} for r in rows],
                                   schema=tables.PAIRS_SCHEMA)
    a = shards.write_shards(with_sizes, str(tmp_path / "a"), maxcount=2, workers=1)
    b = shards.write_shards(without, str(tmp_path / "b"), maxcount=2, workers=1)
    assert a.column("sha256").to_pylist() == b.column("sha256").to_pylist()
    stat_calls = []
    real_stat = os.stat
    try:
        os.stat = lambda p, *a, **k: stat_calls.append(str(p)) or real_stat(p, *a, **k)
        shards.plan_shards(with_sizes, maxcount=2)
    finally:
        os.stat = real_stat
    assert not [p for p in stat_calls if p.endswith(".png")]
    (tmp_path / "gt3.png").write_bytes(b"x" * 10)  # replaced after the manifest was written
    with pytest.raises(RuntimeError, match="gt3.png is shorter than 303 bytes.*rerun the download stage"), advised():
        shards.write_shards(with_sizes, str(tmp_path / "c"), maxcount=2, workers=1)


def _fixed_manifest(root) -> pa.Table:
    """Three samples of fixed bytes (the writer copies, never decodes): a plain id, one that
    needs escaping, and one whose members need PAX headers; plus a second group."""
    rows = []
    for n, (sample_id, degradation) in enumerate([("b-1", "hazy"), ("a.é/2", "hazy"), ("z" * 95, "hazy"),
                                                  ("c_3", "rainy")]):
        lq, gt = root / f"{n}.lq", root / f"{n}.gt"
        lq.write_bytes(bytes(range(n, n + 40)) * (n + 1))
        gt.write_bytes(b"gt" * (300 + n))
        rows.append({"id": sample_id, "dataset": "tiny", "degradation": degradation, "split": "train",
                     "lq_path": str(lq), "gt_path": str(gt), "width": 3 + n, "height": 2,
                     "lq_sha256": "", "gt_sha256": ""})
    return pa.Table.from_pylist(rows, schema=tables.PAIRS_SCHEMA)


def test_shard_bytes_are_pinned(tmp_path):
    # The exact bytes of a tiny dataset's shards: a change here changes every user's shards,
    # so it must come with a SHARD_FORMAT bump (their sidecars then no longer match).
    manifest = _fixed_manifest(tmp_path)
    index = shards.write_shards(manifest, str(tmp_path / "out"), maxcount=2, workers=1)
    assert [(r["shard"], r["first_id"], r["last_id"], r["count"], r["bytes"]) for r in index.to_pylist()] == [
        ("train/hazy/pairs-000000.tar", "a.é/2", "b-1", 2, 10240),
        ("train/hazy/pairs-000001.tar", "z" * 95, "z" * 95, 1, 10240),
        ("train/rainy/pairs-000000.tar", "c_3", "c_3", 1, 10240)]
    assert index.column("sha256").to_pylist() == PINNED_SHARD_SHA256


# The plan digests of _fixed_manifest's shards (maxcount 2) as every sidecar since SHARD_FORMAT
# 2 holds them (each the sha256 of one json.dumps of the plan: _one_shot_digest): a change would
# make every existing shard look unfinished and be rewritten.
PINNED_PLAN_DIGESTS = ["aa489c5b31a63896e956e24b92737b68385015272a022a0f9215c7b2921bd5d6",
                       "38b4291e69d33b403464c2054541dc995882a6369a351b2461c39add9bf356ad",
                       "90ed6e88ee87549f4d91b746e2c566a6a0c1336a8bc0aa1b28e5ec1fd0039140"]


def _one_shot_digest(plan: shards.ShardPlan) -> str:
    """A plan's digest as its definition reads: sha256 of json.dumps of the whole plan at once."""
    members = [[m.name, m.size, m.sha256 if m.data is None else hashlib.sha256(m.data).hexdigest()]
               for m in plan.samples.members()]
    spec = {"format": shards.SHARD_FORMAT, "members": members, "name": plan.name, "size": plan.size}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def test_shards_are_webdatasets_own_bytes(tmp_path):
    """The shards are what webdataset's stock TarWriter writes for the same samples (fixed
    metadata, PAX format): the template headers of shard_tar._ShardTarFile change no byte."""
    manifest = _fixed_manifest(tmp_path)
    index = shards.write_shards(manifest, str(tmp_path / "out"), maxcount=2, workers=1)
    for plan, row in zip(shards.plan_shards(manifest, maxcount=2), index.to_pylist(), strict=True):
        buf = io.BytesIO()
        writer = wds.TarWriter(buf, user="", group="", mode=0o444, mtime=0, encoder=False, format="PAX_FORMAT")
        samples = plan.samples
        for key, lq, gt, meta in zip(samples.keys, samples.lq_paths, samples.gt_paths, samples.metas):
            writer.write({"__key__": key, "lq.png": fs.read_bytes(lq), "gt.png": fs.read_bytes(gt), "json": meta})
        writer.close()
        assert fs.read_bytes(str(tmp_path / "out" / row["shard"])) == buf.getvalue(), row["shard"]


def test_plan_digests_and_bytes_are_pinned_across_chunk_boundaries(tmp_path, monkeypatch):
    """Plans are built, hashed and written a chunk at a time: with one-row chunks, two-row
    planning slices and a manifest in several Arrow chunks, the same digests and bytes
    (test_shard_bytes_are_pinned and the reference test cover the default sizes)."""
    monkeypatch.setattr(shard_plan, "CHUNK_ROWS", 1)
    monkeypatch.setattr(shard_plan, "PLAN_SLICE_ROWS", 2)
    whole = _fixed_manifest(tmp_path)
    manifest = pa.concat_tables([whole.slice(0, 1), whole.slice(1, 2), whole.slice(3)])
    assert manifest.column("id").num_chunks == 3
    planned = shards.plan_shards(manifest, maxcount=2)
    assert [p.digest for p in planned] == [_one_shot_digest(p) for p in planned] == PINNED_PLAN_DIGESTS
    index = shards.write_shards(manifest, str(tmp_path / "out"), maxcount=2, workers=1)
    assert index.column("sha256").to_pylist() == PINNED_SHARD_SHA256
    sidecars = [json.loads(fs.read_bytes(str(tmp_path / "out" / f"{r}.json")))["plan"]
                for r in index.column("shard").to_pylist()]
    assert sidecars == PINNED_PLAN_DIGESTS  # what the writer hashed while writing
    rows = manifest.to_pylist()
    sizes = fs.sizes([r[k] for r in rows for k in ("lq_path", "gt_path")])
    for maxcount, maxsize in [(2, 1 << 30), (99, 10240)]:
        planned = shards.plan_shards(manifest, maxcount=maxcount, maxsize=maxsize)
        assert [(p.name, p.samples.ids, p.size) for p in planned] == \
            _reference_plan(rows, sizes, maxcount=maxcount, maxsize=maxsize)


def _reference_plan(rows: list[dict], sizes: dict[str, int], *, maxcount: int,
                    maxsize: int) -> list[tuple[str, list[str], int]]:
    """(name, ids, bytes) of each shard, sample by sample as the issue describes the cut, every
    member sized on its own (member_tar_size: tarfile's own header where PAX records are needed)."""
    plans = []
    for split, degradation in sorted({(r["split"], r["degradation"]) for r in rows}):
        group = sorted((r for r in rows if (r["split"], r["degradation"]) == (split, degradation)),
                       key=lambda r: r["id"])
        current, current_bytes, count = [], 0, 0

        def close() -> None:
            plans.append((f"{split}/{degradation}/pairs-{count:06d}.tar", current, shard_tar.tar_size(current_bytes)))

        for row in group:
            key, meta = shards.sample_key(row["id"]), shard_plan.sample_json(row)
            nbytes = sum(shard_tar.member_tar_size(name, size) for name, size in (
                (f"{key}.lq.png", sizes[row["lq_path"]]), (f"{key}.gt.png", sizes[row["gt_path"]]),
                (f"{key}.json", len(meta))))
            if current and (len(current) >= maxcount or shard_tar.tar_size(current_bytes + nbytes) > maxsize):
                close()
                current, current_bytes, count = [], 0, count + 1
            current, current_bytes = current + [row["id"]], current_bytes + nbytes
        close()
    return plans


def test_manifest_plan_equals_a_sample_by_sample_reference(tmp_path):
    # plan_shards sizes samples with numpy and cuts with searchsorted over Arrow columns; the
    # reference walks the rows one by one and sizes every member on its own.
    everything = _fixed_manifest(tmp_path)
    rows = everything.to_pylist()
    sizes = fs.sizes([r[k] for r in rows for k in ("lq_path", "gt_path")])
    safe_ids_only = everything.take([0, 2, 3])  # their keys are the ids themselves (a shortcut)
    for manifest, maxcount, maxsize in [(everything, 2, 1 << 30), (everything, 99, 1 << 16),
                                        (everything, 99, 10240), (safe_ids_only, 2, 1 << 30)]:
        planned = shards.plan_shards(manifest, maxcount=maxcount, maxsize=maxsize)
        assert [(p.name, p.samples.ids, p.size) for p in planned] == \
            _reference_plan(manifest.to_pylist(), sizes, maxcount=maxcount, maxsize=maxsize)
