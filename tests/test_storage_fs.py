"""storage.fs (URLs, atomic writes, hashing) and storage.tables (Parquet, digests)."""

from __future__ import annotations

import os
import uuid

import pyarrow as pa
import pytest

from storage import fs, tables
from tasks.advice import advised

ABC_SHA256 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # FIPS 180-2 B.1


@pytest.fixture(params=["local", "memory"])
def root(request, tmp_path):
    """An empty folder URL on the local disk or in fsspec's in-process memory filesystem."""
    if request.param == "local":
        yield str(tmp_path)
        return
    url = f"memory://test-{uuid.uuid4().hex}"
    fs.makedirs(url)
    yield url
    fs.remove(url, recursive=True)


def test_join_keeps_protocols_and_single_slashes():
    assert fs.join("s3://bucket", "shards", "train/a.tar") == "s3://bucket/shards/train/a.tar"
    assert fs.join("data/", "/manifests", "pairs.parquet") == "data/manifests/pairs.parquet"
    assert fs.join("memory://", "x") == "memory://x"
    assert fs.join("/", "tmp") == "/tmp"


def test_resolve_makes_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    filesystem, path = fs.resolve("data/x.png")
    assert path == str(tmp_path / "data" / "x.png")
    assert fs.is_local("data/x.png") and fs.is_local(f"file://{tmp_path}")
    assert fs.local_path("data/x.png") == tmp_path / "data" / "x.png"
    assert not fs.is_local("memory://a/b")
    with pytest.raises(ValueError, match="not on the local filesystem"):
        fs.local_path("memory://a/b")


def test_atomic_write_leaves_only_the_final_file(root):
    url = fs.join(root, "sub", "blob.bin")
    fs.atomic_write_bytes(url, b"first")
    fs.atomic_write_bytes(url, b"second")
    assert fs.read_bytes(url) == b"second"
    assert [u.rsplit("/", 1)[-1] for u in fs.listdir(fs.join(root, "sub"))] == ["blob.bin"]


def test_atomic_open_error_leaves_nothing_and_keeps_old_file(root):
    new, old = fs.join(root, "new.bin"), fs.join(root, "old.bin")
    fs.atomic_write_bytes(old, b"old contents")
    for url in (new, old):
        with pytest.raises(RuntimeError, match="killed"):
            with fs.atomic_open(url) as f:
                f.write(b"half a file")
                raise RuntimeError("killed mid-write")
    assert not fs.exists(new)
    assert fs.read_bytes(old) == b"old contents"
    assert [u.rsplit("/", 1)[-1] for u in fs.listdir(root)] == ["old.bin"]


def test_atomic_open_text_mode(root):
    url = fs.join(root, "note.txt")
    with fs.atomic_open(url, "w") as f:
        f.write("héllo\n")
    assert fs.read_bytes(url) == "héllo\n".encode()
    with pytest.raises(ValueError, match="mode must be"):
        with fs.atomic_open(url, "ab"):
            pass


def test_sha256_known_value(root):
    assert fs.sha256_bytes(b"abc") == ABC_SHA256
    url = fs.join(root, "abc.txt")
    fs.atomic_write_bytes(url, b"abc")
    assert fs.sha256_file(url, chunk=2) == ABC_SHA256  # chunking must not matter


def test_listdir_glob_sizes_are_sorted_full_urls(root):
    for name, data in [("b.png", b"12"), ("a.png", b"1"), ("c.txt", b"123")]:
        fs.atomic_write_bytes(fs.join(root, "d", name), data)
    pngs = fs.glob(fs.join(root, "d", "*.png"))
    assert [u.rsplit("/", 1)[-1] for u in pngs] == ["a.png", "b.png"]
    assert len(fs.listdir(fs.join(root, "d"))) == 3
    for url in pngs:  # returned URLs resolve back to the same files
        assert fs.exists(url)
    if root.startswith("memory://"):
        assert all(u.startswith("memory://") for u in pngs)
    else:
        assert all(os.path.isabs(u) for u in pngs)
    assert fs.sizes(pngs) == {pngs[0]: 1, pngs[1]: 2}
    with pytest.raises(FileNotFoundError):
        fs.sizes([fs.join(root, "d", "missing.png")])
    fs.remove(fs.join(root, "d"), recursive=True)
    assert not fs.exists(fs.join(root, "d", "a.png"))


# --------------------------------------------------------------------------------------------
# tables

def _pair_rows(n: int) -> list[dict]:
    return [{"id": f"p{i}", "dataset": "demo", "degradation": "hazy", "split": "train",
             "lq_path": f"memory://x/LQ/p{i}.png", "gt_path": f"memory://x/GT/p{i}.png",
             "width": 8 + i, "height": 4, "lq_sha256": "0" * 64, "gt_sha256": "1" * 64,
             "lq_bytes": 100 + i, "gt_bytes": 200 + i} for i in range(n)]


def test_table_round_trip(root):
    url = fs.join(root, "manifests", "pairs.parquet")
    tables.write_table(url, _pair_rows(3), schema=tables.PAIRS_SCHEMA)
    back = tables.read_table(url)
    assert back.schema.equals(tables.PAIRS_SCHEMA)
    assert back.to_pylist() == _pair_rows(3)
    # A Table with extra or reordered columns is conformed to the schema on write.
    shuffled = pa.Table.from_pylist(_pair_rows(2)).select(["width", "id", *tables.PAIRS_SCHEMA.names[1:6],
                                                          "height", "lq_sha256", "gt_sha256", "gt_bytes", "lq_bytes"])
    tables.write_table(url, shuffled.append_column("extra", pa.array([1, 2])), schema=tables.PAIRS_SCHEMA)
    assert tables.read_table(url).to_pylist() == _pair_rows(2)
    # An optional (nullable) column the table lacks comes back as nulls; a required one is an error.
    tables.write_table(url, shuffled.drop(["lq_bytes", "gt_bytes"]), schema=tables.PAIRS_SCHEMA)
    assert [r["lq_bytes"] for r in tables.read_table(url).to_pylist()] == [None, None]


def test_write_table_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="pass schema="):
        tables.write_table(tmp_path / "t.parquet", [])
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['gt_sha256'\]"):
        tables.write_table(tmp_path / "t.parquet", pa.Table.from_pylist(_pair_rows(1)).drop(["gt_sha256"]),
                           schema=tables.PAIRS_SCHEMA)
    tables.write_table(tmp_path / "empty.parquet", [], schema=tables.PAIRS_SCHEMA)
    assert tables.read_table(tmp_path / "empty.parquet").num_rows == 0


def test_read_table_missing_names_url_and_stage(tmp_path):
    url = str(tmp_path / "manifests" / "pairs.parquet")
    with pytest.raises(FileNotFoundError) as err, advised():
        tables.read_table(url, hint="the download stage")
    assert url in str(err.value) and "written by the download stage" in str(err.value)
    assert (err.value.url, err.value.written_by) == (url, "the download stage")
    with pytest.raises(FileNotFoundError, match="an earlier pipeline stage"), advised():
        tables.read_table(url)


def test_unreadable_table_names_the_file_and_its_writer(root):
    url = fs.join(root, "index.parquet")
    tables.write_table(url, pa.table({"id": ["a", "b"]}))
    whole = fs.read_bytes(url)
    footer = len(whole) - 8 - int.from_bytes(whole[-8:-4], "little")  # Parquet: footer, its length, "PAR1"
    damaged = {"not parquet": b"PAR1 this is not a parquet file",
               "damaged footer": whole[:footer] + bytes(len(whole) - footer - 8) + whole[-8:]}
    for case, data in damaged.items():
        fs.atomic_write_bytes(url, data)
        for read in (tables.read_table, tables.read_metadata):
            with pytest.raises(tables.UnreadableTable) as err, advised():
                read(url, hint="the shard stage (`srdiff run --stages shard`)")
            assert str(err.value).startswith(f"{url} is not a readable Parquet table ("), case
            assert str(err.value).endswith("; it is written by the shard stage (`srdiff run --stages shard`): "
                                           "rerun that with --refresh"), case


def test_shard_task_names_a_missing_manifest(tmp_path):
    from srdiff_core.config import load_config
    from tasks.shard import shard

    cfg = load_config(None, [f"data_root={tmp_path}"])
    url = str(tmp_path / "manifests" / "pairs.parquet")
    with pytest.raises(FileNotFoundError) as err, advised():  # as the flow runs it (flows.pipeline.run_stage)
        shard.fn(cfg, "key", url)
    assert str(err.value) == (f"{url} does not exist; it is written by the download stage "
                              f"(`srdiff run --stages download`): run that first (or check data_root)")


def test_read_metadata_gives_the_schema_metadata_as_text(root):
    url = fs.join(root, "emb.parquet")
    tables.write_table(url, pa.table({"id": ["a"]}).replace_schema_metadata({"arch": "ViT-B-32", "n": "3"}))
    assert tables.read_metadata(url) == {"arch": "ViT-B-32", "n": "3"}
    tables.write_table(url, pa.table({"id": ["a"]}))
    assert tables.read_metadata(url) == {}
    with pytest.raises(FileNotFoundError, match="written by the embed stage"), advised():
        tables.read_metadata(fs.join(root, "missing.parquet"), hint="the embed stage")


def _digest_table() -> pa.Table:
    return pa.table({"id": ["a", "b", None], "n": pa.array([1, 2, 3], pa.int32()),
                     "x": [0.5, float("nan"), -1.0], "blob": [b"\x00", b"", b"z"],
                     "emb": pa.array([[1.0, 2.0], [3.0], []], pa.list_(pa.float32()))})


def test_table_digest_is_content_only_and_order_sensitive():
    table = _digest_table()
    # Pinned: a change here changes every cache key built on table digests.
    assert tables.table_digest(table) == "ca38acb796e23a7bc9f99a12b32697c959e62b15d6bce36327bb5e0c13f1f20a"
    rechunked = pa.concat_tables([table.slice(0, 1), table.slice(1, 2)])
    assert rechunked.column("emb").num_chunks == 2
    assert tables.table_digest(rechunked) == tables.table_digest(table)
    assert tables.table_digest(pa.Table.from_pylist(table.to_pylist(), schema=table.schema)) == \
        tables.table_digest(table)
    reversed_rows = table.take([2, 1, 0])
    assert tables.table_digest(reversed_rows) != tables.table_digest(table)
    assert tables.table_digest(table.select(["n", "id", "x", "blob", "emb"])) != tables.table_digest(table)
    assert tables.table_digest(table.rename_columns(["id", "m", "x", "blob", "emb"])) != \
        tables.table_digest(table)
    as_int64 = table.set_column(1, "n", table.column("n").cast(pa.int64()))
    assert tables.table_digest(as_int64) != tables.table_digest(table)
    # Moving a value across list boundaries changes the digest (lengths are hashed).
    moved = table.set_column(4, "emb", pa.array([[1.0], [2.0, 3.0], []], pa.list_(pa.float32())))
    assert tables.table_digest(moved) != tables.table_digest(table)
