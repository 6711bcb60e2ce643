"""storage.fetch and storage.archives on their own: range-less servers, checksums, unsafe members."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
import zipfile

import pytest

import dataset_archives as A  # tests/ is on sys.path (pytest rootdir-relative imports)
from http_files import FileServer
from storage import archives, fetch


def test_a_server_without_range_support_is_streamed_from_the_start(tmp_path):
    data = os.urandom(100_000)
    with FileServer(files={"/a.zip": data}, ranges=False) as server:
        (tmp_path / "a.zip.part").write_bytes(data[:5000])  # a stale partial file cannot be resumed here
        path = fetch.fetch_http(server.url("/a.zip"), tmp_path / "a.zip", retries=0, chunk=16384)
    assert path.read_bytes() == data and not (tmp_path / "a.zip.part").exists()


def test_retries_back_off_exponentially_and_404_is_not_retried(tmp_path):
    waits = []
    with pytest.raises(fetch.FetchError, match="unreachable .* after 4 attempts"):
        fetch.fetch_http("http://127.0.0.1:9/x.zip", tmp_path / "x.zip", retries=3, backoff_s=1.5, sleep=waits.append)
    assert waits == [1.5, 3.0, 6.0]
    waits.clear()
    with FileServer() as server, pytest.raises(fetch.FetchError, match="HTTP 404"):
        fetch.fetch_http(server.url("/gone.zip"), tmp_path / "g.zip", retries=3, sleep=waits.append)
    assert waits == []


def test_checksum_mismatch_moves_the_file_aside(tmp_path):
    path = tmp_path / "f.zip"
    path.write_bytes(b"abc")
    assert fetch.verify_sha256(path, hashlib.sha256(b"abc").hexdigest().upper()) == hashlib.sha256(b"abc").hexdigest()
    with pytest.raises(fetch.ChecksumError, match=hashlib.sha256(b"abc").hexdigest()):
        fetch.verify_sha256(path, "0" * 64)
    assert not path.exists() and (tmp_path / "f.zip.sha256-mismatch").read_bytes() == b"abc"


def _zip_with(info: zipfile.ZipInfo, data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("ok/a.png", A.image_bytes(0))
        zf.writestr(info, data)
    return buf.getvalue()


@pytest.mark.parametrize("name", ["/etc/evil.png", "C:/evil.png", "a/../../evil.png", "..\\evil.png"])
def test_zip_members_leaving_the_target_are_refused(tmp_path, name):
    archive = tmp_path / "a.zip"
    archive.write_bytes(_zip_with(zipfile.ZipInfo(name), b"x"))
    with pytest.raises(archives.UnsafeArchiveError):
        archives.safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_zip_symlink_pointing_outside_is_refused_and_one_inside_is_skipped(tmp_path):
    def link(name: str, target: str) -> zipfile.ZipInfo:
        info = zipfile.ZipInfo(name)
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        return info
    outside, inside = tmp_path / "outside.zip", tmp_path / "inside.zip"
    outside.write_bytes(_zip_with(link("ok/b.png", "x"), b"../../../etc/passwd"))
    inside.write_bytes(_zip_with(link("ok/b.png", "x"), b"a.png"))
    with pytest.raises(archives.UnsafeArchiveError, match="points outside"):
        archives.safe_extract(outside, tmp_path / "o1")
    out = archives.safe_extract(inside, tmp_path / "o2")
    assert [p.name for p in archives.content_files(out)] == ["a.png"]


def test_tar_devices_and_absolute_links_are_refused(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        dev = tarfile.TarInfo("dev/null")
        dev.type = tarfile.CHRTYPE
        tf.addfile(dev)
    (tmp_path / "dev.tar").write_bytes(buf.getvalue())
    with pytest.raises(archives.UnsafeArchiveError, match="is a device"):
        archives.safe_extract(tmp_path / "dev.tar", tmp_path / "out")
    (tmp_path / "abs.tar").write_bytes(A.tar_bytes({"x/a.png": b"1"}, links={"x/b.png": "/etc/passwd"}))
    with pytest.raises(archives.UnsafeArchiveError, match="points outside"):
        archives.safe_extract(tmp_path / "abs.tar", tmp_path / "out")


def _tar(entries: list[tarfile.TarInfo | tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for e in entries:
            if isinstance(e, tarfile.TarInfo):
                tf.addfile(e)
            else:
                info = tarfile.TarInfo(e[0])
                info.size = len(e[1])
                tf.addfile(info, io.BytesIO(e[1]))
    return buf.getvalue()


def _link(name: str, target: str, hard: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = (tarfile.LNKTYPE if hard else tarfile.SYMTYPE), target
    return info


def test_tar_links_are_never_created_so_nothing_is_written_through_them(tmp_path):
    outside = tmp_path / "victim"
    outside.mkdir()
    # A chain of in-target links (the CVE-2025-4517 pattern needs links to be created), an
    # internal link reusing another image, then files written "through" the link names.
    chain = [_link("d", "."), _link("d/e", "."), _link("x/low/9.png", "../high/2.png"),
             ("x/high/2.png", b"gt"), ("d/e/f.png", b"through"), _link("x/hard.png", "x/high/2.png", hard=True)]
    (tmp_path / "chain.tar").write_bytes(_tar(chain))
    out = archives.safe_extract(tmp_path / "chain.tar", tmp_path / "out")
    assert not any(p.is_symlink() for p in out.rglob("*"))
    assert sorted(str(p.relative_to(out)) for p in archives.content_files(out)) == ["d/e/f.png", "x/high/2.png"]
    assert list(outside.iterdir()) == []
    (tmp_path / "hard.tar").write_bytes(_tar([("a.png", b"1"), _link("b.png", "../../etc/passwd", hard=True)]))
    with pytest.raises(archives.UnsafeArchiveError, match="points outside"):
        archives.safe_extract(tmp_path / "hard.tar", tmp_path / "out2")


def test_a_corrupted_compressed_tar_is_detected_by_its_checksum(tmp_path):
    data = bytearray(A.tar_bytes({"lol/a.png": os.urandom(50_000)}, mode="w:gz"))
    data[-20] ^= 0xFF  # inside the last deflate block or the CRC trailer, not the headers
    (tmp_path / "bad.tar.gz").write_bytes(bytes(data))
    with pytest.raises(archives.ArchiveError, match="truncated or corrupt"):
        archives.safe_extract(tmp_path / "bad.tar.gz", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_file_and_a_folder_of_the_same_name_is_a_clear_error(tmp_path):
    (tmp_path / "clash.tar").write_bytes(_tar([("a", b"file"), ("a/b.png", b"x")]))
    with pytest.raises(archives.ArchiveUnsupported, match="extract it with 7-Zip"):
        archives.safe_extract(tmp_path / "clash.tar", tmp_path / "out")


def test_hugging_face_folder_left_partial_is_not_used_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    partial = tmp_path / "RESIDE"
    (partial / "train/hazy").mkdir(parents=True)
    (partial / "train/hazy/a.jpg").write_bytes(b"half of the files")
    with pytest.raises(fetch.FetchError, match="HF_HUB_OFFLINE is set"):
        fetch.fetch_hf_dataset("someone/RESIDE-6K", partial)
    (partial / fetch.COMPLETE).write_text("complete\n")  # a snapshot that finished online is reused offline
    assert fetch.fetch_hf_dataset("someone/RESIDE-6K", partial) == partial


def test_a_changed_remote_file_restarts_the_resume(tmp_path):
    old, new = os.urandom(50_000), os.urandom(50_000)
    with FileServer(files={"/a.zip": old}, headers={"/a.zip": {"ETag": '"v1"'}}, drop_after={"/a.zip": 20_000}) as server:
        with pytest.raises(fetch.Unreachable):
            fetch.fetch_http(server.url("/a.zip"), tmp_path / "a.zip", retries=0, chunk=4096)
        assert (tmp_path / "a.zip.part").stat().st_size > 0
        server.files["/a.zip"], server.headers["/a.zip"] = new, {"ETag": '"v2"'}
        server.log.clear()
        path = fetch.fetch_http(server.url("/a.zip"), tmp_path / "a.zip", retries=0, chunk=4096)
    assert path.read_bytes() == new and min(s.range_start for s in server.log) == 0


def test_archive_kind_is_read_from_the_content_and_junk_is_skipped(tmp_path):
    (tmp_path / "really-a-tar.zip").write_bytes(A.tar_bytes({"x/a.png": b"1"}))
    (tmp_path / "text.zip").write_bytes(b"<html>not an archive</html>")
    assert archives.archive_kind(tmp_path / "really-a-tar.zip") == "tar"
    assert archives.archive_kind(tmp_path / "text.zip") is None
    with pytest.raises(archives.ArchiveError, match="truncated or corrupt"):
        archives.safe_extract(tmp_path / "text.zip", tmp_path / "out")
    members = {"d/a.png": b"1", "__MACOSX/d/._a.png": b"2", "d/._b.png": b"3", "d/.cache/x.png": b"4"}
    (tmp_path / "j.zip").write_bytes(A.zip_bytes(members))
    out = archives.safe_extract(tmp_path / "j.zip", tmp_path / "j")
    assert [str(p.relative_to(out)) for p in archives.content_files(out)] == ["d/a.png"]
