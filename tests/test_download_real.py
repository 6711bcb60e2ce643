"""The real-data download stage end to end, with no network: archives in each dataset's real layout,
built here and served by a loopback HTTP server with Range support (tests/http_files.py)."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest
import yaml

from srdiff_core.config import load_config
from storage import tables
from tasks.download import DownloadError, download
import dataset_archives as A  # noqa: E402 (tests/ is on sys.path under pytest rootdir conftest)
from http_files import FileServer

LOG = logging.getLogger("test")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_catalog(path: Path, datasets: dict) -> str:
    path.write_text(yaml.safe_dump(datasets))
    return str(path)


def entry(layout: str, degradation: str, expected: dict, files: list[tuple[str, list[dict]]]) -> dict:
    return {"layout": layout, "degradation": degradation, "expected": expected,
            "files": [{"name": name, "sources": sources} for name, sources in files]}


def config(tmp_path: Path, catalog: str, names: list[str], *extra: str):
    return load_config(None, [f"data_root={tmp_path / 'data'}", "download.source=real",
                              f"download.datasets_file={catalog}", f"download.datasets={names}",
                              "download.backoff_s=0", "download.workers=2", *extra])


def manifest_of(result) -> list[dict]:
    return tables.read_table(result.outputs["manifest"]).to_pylist()


def quarantine_of(result) -> dict[str, str]:
    return {r["id"]: r["reason"] for r in tables.read_table(result.outputs["quarantine"]).to_pylist()}


GOPRO = A.gopro_members({"GOPR0372_07_00": ("train", ["000047", "000048"]),
                         "GOPR0374_11_00": ("train", ["000001"]),
                         "GOPR0384_11_00": ("test", ["000001", "000002"])})
RESIDE = A.reside_members(train=["0001_0.8_0.2", "0002_0.9_0.16"], test=["0003_1_0.2"])
RAIN_TRAIN, RAIN_TEST = A.rain_train_members([1, 2, 10]), A.rain_test_members([1, 2])
LOL = A.lol_members(train=[2, 5, 100], val=[1, 22])


def four_dataset_server() -> tuple[FileServer, dict[str, bytes]]:
    # RESIDE-6k: one GT larger than its hazy image (centre-cropped, recorded).
    reside = dict(RESIDE)
    reside["train/GT/0002_0.9_0.16.png"] = A.image_bytes(9, size=(24, 20))
    blobs = {"/GOPRO_Large.zip": A.zip_bytes(GOPRO), "/RESIDE-6K.tar.gz": A.tar_bytes(reside),
             "/RainTrainH.zip": A.zip_bytes(RAIN_TRAIN), "/Rain100H.zip": A.zip_bytes(RAIN_TEST),
             "/lol_dataset.zip": A.zip_bytes(LOL)}
    return FileServer(files=dict(blobs)), blobs


def four_dataset_catalog(tmp_path: Path, server: FileServer, blobs: dict[str, bytes]) -> str:
    def http(path: str, **kw) -> list[dict]:
        return [{"kind": "http", "url": server.url(path), **kw}]
    return write_catalog(tmp_path / "datasets.yaml", {
        "gopro": entry("gopro", "motion-blurry", {"train": 3, "val": 2}, [("GOPRO_Large.zip", http("/GOPRO_Large.zip"))]),
        "reside6k": entry("reside6k", "hazy", {"train": 2, "val": 1}, [("RESIDE-6K.tar.gz", http("/RESIDE-6K.tar.gz"))]),
        "rain100h": entry("rain100h", "rainy", {"train": 3, "val": 2},
                          [("RainTrainH.zip", http("/RainTrainH.zip")), ("Rain100H.zip", http("/Rain100H.zip"))]),
        "lol": entry("lol", "low-light", {"train": 3, "val": 2},
                     [("lol_dataset.zip", http("/lol_dataset.zip", sha256=sha(blobs["/lol_dataset.zip"])))]),
    })


def test_four_datasets_from_their_real_layouts(tmp_path):
    server, blobs = four_dataset_server()
    with server:
        catalog = four_dataset_catalog(tmp_path, server, blobs)
        cfg = config(tmp_path, catalog, ["gopro", "reside6k", "rain100h", "lol"])
        result = download.fn(cfg, key="k")
        rows = manifest_of(result)
        by_id = {r["id"]: r for r in rows}
        assert sorted(by_id) == sorted([
            "gopro-train-GOPR0372_07_00_000047", "gopro-train-GOPR0372_07_00_000048",
            "gopro-train-GOPR0374_11_00_000001", "gopro-val-GOPR0384_11_00_000001",
            "gopro-val-GOPR0384_11_00_000002",
            "reside6k-train-0001_0.8_0.2", "reside6k-train-0002_0.9_0.16", "reside6k-val-0003_1_0.2",
            "rain100h-train-1", "rain100h-train-2", "rain100h-train-10", "rain100h-val-001", "rain100h-val-002",
            "lol-train-2", "lol-train-5", "lol-train-100", "lol-val-1", "lol-val-22"])
        # Pairs joined by id: each LQ/GT is byte-identical to the archive member it came from
        # (PNG copied, never re-encoded), so a sorted-order mix-up would show here.
        gopro = by_id["gopro-train-GOPR0372_07_00_000048"]
        assert gopro["lq_sha256"] == sha(GOPRO["GOPRO_Large/train/GOPR0372_07_00/blur/000048.png"])
        assert gopro["gt_sha256"] == sha(GOPRO["GOPRO_Large/train/GOPR0372_07_00/sharp/000048.png"])
        assert Path(gopro["lq_path"]) == tmp_path / "data/datasets/train/motion-blurry/LQ/gopro-train-GOPR0372_07_00_000048.png"
        assert Path(gopro["lq_path"]).read_bytes() == GOPRO["GOPRO_Large/train/GOPR0372_07_00/blur/000048.png"]
        rain = by_id["rain100h-train-10"]
        assert (rain["degradation"], rain["lq_sha256"], rain["gt_sha256"]) == (
            "rainy", sha(RAIN_TRAIN["RainTrainH/rain-10.png"]), sha(RAIN_TRAIN["RainTrainH/norain-10.png"]))
        assert by_id["rain100h-val-002"]["gt_sha256"] == sha(RAIN_TEST["Rain100H/norain-002.png"])
        assert by_id["lol-val-22"]["lq_sha256"] == sha(LOL["lol_dataset/eval15/low/22.png"])
        assert by_id["lol-train-100"]["gt_sha256"] == sha(LOL["lol_dataset/our485/high/100.png"])
        assert {r["dataset"] for r in rows} == {"gopro", "reside6k", "rain100h", "lol"}
        # RESIDE: JPEG hazy -> PNG; the larger GT centre-cropped to the hazy size, recorded.
        notes = {r["id"]: r["note"] for r in tables.read_table(tmp_path / "data/manifests/notes.parquet").to_pylist()}
        assert notes["reside6k-train-0002_0.9_0.16"] == "GT centre-cropped 24x20 -> 20x16; LQ JPG -> PNG"
        assert notes["reside6k-train-0001_0.8_0.2"] == "LQ JPG -> PNG"
        cropped = by_id["reside6k-train-0002_0.9_0.16"]
        assert (cropped["width"], cropped["height"]) == (20, 16)
        assert Path(cropped["lq_path"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert result.metrics["dataset/gopro/train"] == 3 and result.metrics["dataset/lol/val"] == 2
        assert result.metrics["quarantined"] == 0
        assert result.params["download.lol.sha256"] == sha(blobs["/lol_dataset.zip"])
        assert result.params["download.lol.sources"] == f"lol_dataset.zip from {server.url('/lol_dataset.zip')}"
        assert (result.params["download.lol.origin"], result.params["download.lol.reused"]) == ("sources", "false")
        # The extracted archives are gone (the archives stay, so nothing is fetched again).
        assert not (tmp_path / "data/downloads/gopro/extracted").exists()

        # A rerun after success does nothing: no request reaches the server, same manifest.
        server.log.clear()
        again = download.fn(cfg, key="k")
        assert server.log == [] and again.digest == result.digest


def test_a_failing_source_falls_through_to_the_next(tmp_path, caplog):
    lol = A.zip_bytes(LOL)
    quota_page = ('<html><body><p class="uc-error-subcaption">Too many users have viewed or downloaded '
                  'this file recently. Please try accessing the file again later.</p></body></html>')
    with FileServer(files={"/mirror/lol_dataset.zip": lol}, pages={"/uc?id=LOLID": (200, quota_page)}) as server:
        sources = [
            {"kind": "http", "url": "http://127.0.0.1:9/lol_dataset.zip"},           # unreachable host
            {"kind": "gdrive", "id": "LOLID", "endpoint": server.url("")},           # Drive quota page
            {"kind": "hf-file", "repo": "someone/LoL", "filename": "lol_dataset.zip"},  # hub offline in tests
            {"kind": "http", "url": server.url("/gone/lol_dataset.zip")},            # 404
            {"kind": "http", "url": server.url("/mirror/lol_dataset.zip"), "sha256": sha(lol)},
        ]
        catalog = write_catalog(tmp_path / "c.yaml", {
            "lol": entry("lol", "low-light", {"train": 3, "val": 2}, [("lol_dataset.zip", sources)])})
        with caplog.at_level(logging.WARNING):
            result = download.fn(config(tmp_path, catalog, ["lol"], "download.retries=1"), key="k")
    assert len(manifest_of(result)) == 5
    assert "/mirror/lol_dataset.zip" in result.params["download.lol.sources"]
    text = caplog.text
    assert "unreachable" in text and "HTTP 404" in text
    assert "Google Drive file LOLID: the server sent a web page" in text and "Too many users" in text
    assert "HF_HUB_OFFLINE" in text


def test_all_sources_failing_says_what_to_do(tmp_path):
    with FileServer() as server:
        catalog = write_catalog(tmp_path / "c.yaml", {"lol": entry("lol", "low-light", {"train": 3, "val": 2}, [
            ("lol_dataset.zip", [{"kind": "http", "url": server.url("/nope.zip")}])])})
        with pytest.raises(DownloadError) as err:
            download.fn(config(tmp_path, catalog, ["lol"]), key="k")
    message = str(err.value)
    assert "could not fetch lol_dataset.zip from any source" in message and "HTTP 404" in message
    assert "--from lol=PATH" in message


def test_a_dropped_download_resumes_with_only_the_rest(tmp_path, monkeypatch):
    lol = A.zip_bytes(A.lol_members(train=list(range(30)), val=[1, 22]))
    half = len(lol) // 2
    with FileServer(files={"/lol.zip": lol}, drop_after={"/lol.zip": half}) as server:
        catalog = write_catalog(tmp_path / "c.yaml", {"lol": entry("lol", "low-light", {"train": 30, "val": 2}, [
            ("lol_dataset.zip", [{"kind": "http", "url": server.url("/lol.zip")}])])})
        cfg = config(tmp_path, catalog, ["lol"], "download.retries=0")
        # Small range requests, so about half the file is on disk when the connection drops.
        monkeypatch.setattr("storage.fetch.HTTP_CHUNK", 4096)
        with pytest.raises(DownloadError, match="a rerun resumes from there"):
            download.fn(cfg, key="k")
        kept = sum(p.stat().st_size for p in (tmp_path / "data/downloads/lol").rglob("*.part"))
        assert half - 4096 < kept <= half
        server.log.clear()
        result = download.fn(cfg, key="k")
    assert len(manifest_of(result)) == 32
    assert server.sent("/lol.zip") == len(lol) - kept       # only the rest was fetched
    assert min(s.range_start for s in server.log) == kept


def _lol_catalog(tmp_path, server, path="/lol.zip", **source) -> str:
    return write_catalog(tmp_path / "c.yaml", {"lol": entry("lol", "low-light", {"train": 3, "val": 2}, [
        ("lol_dataset.zip", [{"kind": "http", "url": server.url(path), **source}])])})


def test_wrong_sha256_keeps_the_file_aside_and_names_both_digests(tmp_path):
    lol = A.zip_bytes(LOL)
    with FileServer(files={"/lol.zip": lol}) as server:
        with pytest.raises(DownloadError) as err:
            download.fn(config(tmp_path, _lol_catalog(tmp_path, server, sha256="ab" * 32), ["lol"]), key="k")
    assert sha(lol) in str(err.value) and "ab" * 32 in str(err.value)
    aside = list((tmp_path / "data/downloads/lol").rglob("*.sha256-mismatch"))
    assert len(aside) == 1 and aside[0].read_bytes() == lol


def test_truncated_archive_is_set_aside_and_refetched_on_rerun(tmp_path):
    lol = A.zip_bytes(LOL)
    with FileServer(files={"/lol.zip": lol[: len(lol) // 2]}) as server:
        cfg = config(tmp_path, _lol_catalog(tmp_path, server), ["lol"])
        with pytest.raises(DownloadError, match=r"\* lol: .*lol_dataset.zip is truncated or corrupt.*rerun to fetch it again"):
            download.fn(cfg, key="k")
        server.files["/lol.zip"] = lol  # the mirror is fixed
        assert len(manifest_of(download.fn(cfg, key="k"))) == 5


def test_zip_slip_entry_is_refused(tmp_path):
    evil = A.zip_bytes({**LOL, "lol_dataset/../../evil.png": b"x"})
    with FileServer(files={"/lol.zip": evil}) as server:
        with pytest.raises(DownloadError, match=r"escapes the target with '\.\.'"):
            download.fn(config(tmp_path, _lol_catalog(tmp_path, server), ["lol"]), key="k")
    assert not list(tmp_path.rglob("evil.png"))


def test_link_escaping_the_target_is_refused(tmp_path):
    evil = A.tar_bytes(LOL, links={"lol_dataset/our485/low/7.png": "../../../../../../etc/passwd"})
    with FileServer(files={"/lol.tar.gz": evil}) as server:
        with pytest.raises(DownloadError, match="points outside the target"):
            download.fn(config(tmp_path, _lol_catalog(tmp_path, server, "/lol.tar.gz"), ["lol"]), key="k")
    assert not list((tmp_path / "data").rglob("7.png"))


def test_oversized_archive_is_refused(tmp_path):
    bomb = A.zip_bytes({**LOL, "lol_dataset/padding.bin": bytes(2_000_000)})  # compresses to ~2 kB
    with FileServer(files={"/lol.zip": bomb}) as server:
        with pytest.raises(DownloadError, match="expands to more than 1000000 bytes.*The archive is kept at"):
            download.fn(config(tmp_path, _lol_catalog(tmp_path, server), ["lol"],
                               "download.max_extract_bytes=1000000"), key="k")
        assert len(list((tmp_path / "data/downloads/lol").rglob("lol_dataset.zip"))) == 1  # kept: only the cap was hit
        server.log.clear()
        with pytest.raises(DownloadError, match="more than 5 members"):
            download.fn(config(tmp_path, _lol_catalog(tmp_path, server), ["lol"],
                               "download.max_extract_files=5"), key="k")
    assert server.log == []  # the archive was not fetched again


def _corrupt(m):
    m["lol_dataset/our485/low/5.png"] = m["lol_dataset/our485/low/5.png"][:60]  # truncated PNG
    return "lol-train-5", "unreadable LQ image 5.png: "


def _size_mismatch(m):
    m["lol_dataset/our485/high/5.png"] = A.image_bytes(1, size=(24, 16))
    return "lol-train-5", "size mismatch: LQ (20, 16) vs GT (24, 16)"


def _missing_gt(m):
    del m["lol_dataset/our485/high/5.png"]
    return "lol-train-5", "missing GT partner"


def _greyscale(m):
    m["lol_dataset/our485/low/5.png"] = A.image_bytes(2, mode="L")
    return "lol-train-5", "LQ image 5.png is greyscale (L) where RGB is expected"


@pytest.mark.parametrize("damage", [_corrupt, _size_mismatch, _missing_gt, _greyscale],
                         ids=["corrupt-png", "size-mismatch", "missing-gt", "greyscale"])
def test_a_bad_pair_is_quarantined_and_every_good_pair_kept(tmp_path, damage):
    members = dict(LOL)
    bad_id, reason = damage(members)
    with FileServer(files={"/lol.zip": A.zip_bytes(members)}) as server:
        cfg = config(tmp_path, _lol_catalog(tmp_path, server), ["lol"], "download.allow_partial=true")
        result = download.fn(cfg, key="k")
    assert sorted(r["id"] for r in manifest_of(result)) == ["lol-train-100", "lol-train-2", "lol-val-1", "lol-val-22"]
    assert list(quarantine_of(result)) == [bad_id] and quarantine_of(result)[bad_id].startswith(reason)


def test_shortfall_is_an_error_unless_partial_data_is_allowed(tmp_path, caplog):
    with FileServer(files={"/lol.zip": A.zip_bytes(LOL)}) as server:
        catalog = write_catalog(tmp_path / "c.yaml", {"lol": entry("lol", "low-light", {"train": 485, "val": 15}, [
            ("lol_dataset.zip", [{"kind": "http", "url": server.url("/lol.zip")}])])})
        with pytest.raises(DownloadError, match=r"lol/train: 3 pairs, 485 expected.*allow_partial=true"):
            download.fn(config(tmp_path, catalog, ["lol"]), key="k")
        server.log.clear()
        with caplog.at_level(logging.WARNING):
            result = download.fn(config(tmp_path, catalog, ["lol"], "download.allow_partial=true"), key="k")
    assert server.log == []  # the normalised data was kept: only the verdict changed
    assert len(manifest_of(result)) == 5 and "SHORTFALL of 482" in caplog.text


def test_one_failing_dataset_does_not_lose_the_others(tmp_path):
    with FileServer(files={"/lol.zip": A.zip_bytes(LOL)}) as server:
        catalog = write_catalog(tmp_path / "c.yaml", {
            "lol": entry("lol", "low-light", {"train": 3, "val": 2}, [("lol_dataset.zip", [{"kind": "http", "url": server.url("/lol.zip")}])]),
            "rain100h": entry("rain100h", "rainy", {"train": 3, "val": 2}, [("RainTrainH.zip", [{"kind": "http", "url": server.url("/missing.zip")}])]),
        })
        with pytest.raises(DownloadError, match="rain100h: could not fetch RainTrainH.zip"):
            download.fn(config(tmp_path, catalog, ["lol", "rain100h"]), key="k")
        assert (tmp_path / "data/manifests/datasets/lol.json").exists()
        server.files["/missing.zip"] = A.zip_bytes({**RAIN_TRAIN, **RAIN_TEST})
        server.log.clear()
        result = download.fn(config(tmp_path, catalog, ["lol", "rain100h"]), key="k")
    assert [s.path for s in server.log] == ["/missing.zip"]  # lol was reused, not fetched again
    assert len(manifest_of(result)) == 10


def test_from_path_imports_an_archive_or_an_extracted_folder(tmp_path):
    archive = tmp_path / "LOLdataset.zip"
    archive.write_bytes(A.zip_bytes(LOL))
    catalog = write_catalog(tmp_path / "c.yaml", {"lol": entry("lol", "low-light", {"train": 3, "val": 2},
                                                               [("lol_dataset.zip", [])])})
    result = download.fn(config(tmp_path, catalog, ["lol"], f"download.from_paths={{lol: [{archive}]}}"), key="k")
    assert len(manifest_of(result)) == 5 and archive.exists()  # the user's file is never moved
    folder = tmp_path / "extracted"
    for name, data in LOL.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    again = download.fn(config(tmp_path / "two", catalog, ["lol"], f"download.from_paths={{lol: [{folder}]}}"), key="k")
    assert again.digest != result.digest  # paths differ (other data_root) ...
    assert sorted(r["lq_sha256"] for r in manifest_of(again)) == sorted(r["lq_sha256"] for r in manifest_of(result))


def test_seed_layout_source_still_indexes_an_existing_folder(tmp_path):
    base = tmp_path / "datasets/train/hazy"
    for side in ("LQ", "GT"):
        (base / side).mkdir(parents=True)
        (base / side / "a.png").write_bytes(A.image_bytes(1 if side == "LQ" else 2))
    cfg = load_config(None, [f"data_root={tmp_path}", "download.source=seed"])
    assert [r["id"] for r in manifest_of(download.fn(cfg, key="k"))] == ["a"]


def test_extraction_killed_half_way_is_redone_cleanly(tmp_path):
    from storage import archives
    archive = tmp_path / "lol.zip"
    archive.write_bytes(A.zip_bytes(LOL))
    target = tmp_path / "out"
    (tmp_path / "out.partial/lol_dataset").mkdir(parents=True)
    (tmp_path / "out.partial/lol_dataset/half-written.png").write_bytes(b"\x89PNG")
    archives.safe_extract(archive, target)
    files = sorted(str(p.relative_to(target)) for p in archives.content_files(target))
    assert files == sorted(LOL) and not (tmp_path / "out.partial").exists()


def test_layout_rules_find_wrapper_folders_and_never_pair_by_sorted_order():
    from tasks import datasets
    # GT 2 is missing: pairing sorted lists would match LQ 10 with GT 3.
    names = ["x/y/lol_dataset/our485/low/1.png", "x/y/lol_dataset/our485/low/10.png", "x/y/lol_dataset/our485/low/2.png",
             "x/y/lol_dataset/our485/high/1.png", "x/y/lol_dataset/our485/high/10.png", "x/y/lol_dataset/our485/high/3.png"]
    pairs, rejected = datasets.find_pairs("lol", [(Path(n), Path(n).parts) for n in names])
    assert [(p.native_id, p.lq.name, p.gt.name) for p in pairs] == [("1", "1.png", "1.png"), ("10", "10.png", "10.png")]
    assert sorted((r.native_id, r.reason) for r in rejected) == [("2", "missing GT partner"), ("3", "missing LQ partner")]
    # The same id twice (two copies of the folder): rejected, not silently picking one.
    twice = ["a/lol_dataset/eval15/low/1.png", "a/lol_dataset/eval15/high/1.png", "b/lol_dataset/eval15/low/1.png"]
    pairs, rejected = datasets.find_pairs("lol", [(Path(n), Path(n).parts) for n in twice])
    assert pairs == [] and rejected[0].reason.startswith("duplicate id: 2 files")
    assert datasets.matching_layouts(GOPRO) == ["gopro"]
    assert datasets.matching_layouts(list(RAIN_TEST)) == ["rain100h"]
    assert datasets.matching_layouts(["README.txt"]) == []
    gamma = datasets.parse_gopro(("test", "GOPR0384_11_00", "blur_gamma", "000001.png"), lq_folder="blur_gamma")
    assert gamma == datasets.Member("val", "GOPR0384_11_00_000001", "LQ")
    assert datasets.parse_gopro(("test", "GOPR0384_11_00", "blur_gamma", "000001.png")) is None


def test_cli_from_recognises_the_dataset_or_asks(tmp_path):
    from flows.cli import from_overrides
    from srdiff_core.config import ConfigError
    archive = tmp_path / "LOLdataset.zip"
    archive.write_bytes(A.zip_bytes(LOL))
    catalog = write_catalog(tmp_path / "c.yaml", {
        "lol": entry("lol", "low-light", {"train": 3, "val": 2}, [("lol_dataset.zip", [])]),
        "rain100h": entry("rain100h", "rainy", {"train": 3, "val": 2}, [("RainTrainH.zip", [])])})
    base = [f"download.datasets_file={catalog}"]
    out = from_overrides(None, base, [str(archive), f"rain100h={tmp_path}"])
    cfg = load_config(None, out)
    assert cfg.download.from_paths == {"lol": [str(archive)], "rain100h": [str(tmp_path)]}
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "README.txt").write_text("nothing here")
    with pytest.raises(ConfigError, match="cannot tell which dataset.*--from DATASET="):
        from_overrides(None, base, [str(junk)])


def test_prefect_retries_the_stage_only_for_network_failures(tmp_path):
    from prefect.states import Failed
    from tasks.download import network_failure

    def failure(sources: list[dict]) -> DownloadError:
        catalog = write_catalog(tmp_path / "c.yaml", {"lol": entry("lol", "low-light", {"train": 3, "val": 2},
                                                                   [("lol_dataset.zip", sources)])})
        with pytest.raises(DownloadError) as err:
            download.fn(config(tmp_path, catalog, ["lol"], "download.retries=0"), key="k")
        return err.value

    lol = A.zip_bytes(LOL)
    with FileServer(files={"/lol.zip": lol}) as server:
        unreachable = failure([{"kind": "http", "url": "http://127.0.0.1:9/lol.zip"}])
        not_found = failure([{"kind": "http", "url": "http://127.0.0.1:9/lol.zip"}, {"kind": "http", "url": server.url("/x.zip")}])
        bad_sha = failure([{"kind": "http", "url": server.url("/lol.zip"), "sha256": "0" * 64}])
    assert network_failure(None, None, Failed(data=unreachable))
    assert not network_failure(None, None, Failed(data=not_found))  # one source answered: waiting will not help
    assert not network_failure(None, None, Failed(data=bad_sha))
    assert not network_failure(None, None, Failed(data=ValueError("bug")))


def test_hugging_face_and_drive_sources_deliver(tmp_path, monkeypatch):
    """The hub client and gdown against loopback servers that answer like the Hub and like a
    Drive download (offline mode is lifted for this test only; every endpoint is 127.0.0.1)."""
    import huggingface_hub.constants
    from http_files import hub_repo
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    lol = A.zip_bytes(LOL)
    reside_files, reside_headers = hub_repo("someone/RESIDE-6K", RESIDE)
    lol_files, lol_headers = hub_repo("someone/LoL", {"lol_dataset.zip": lol})
    with FileServer(files={**reside_files, **lol_files, "/uc": A.zip_bytes({**RAIN_TRAIN, **RAIN_TEST})},
                    headers={**reside_headers, **lol_headers}) as server:
        hub = server.url("")
        catalog = write_catalog(tmp_path / "c.yaml", {
            "reside6k": entry("reside6k", "hazy", {"train": 2, "val": 1}, [("RESIDE-6K", [
                {"kind": "hf-dataset", "repo": "someone/RESIDE-6K", "endpoint": hub}])]),
            "lol": entry("lol", "low-light", {"train": 3, "val": 2}, [("lol_dataset.zip", [
                {"kind": "hf-file", "repo": "someone/LoL", "filename": "lol_dataset.zip", "endpoint": hub,
                 "sha256": sha(lol)}])]),
            "rain100h": entry("rain100h", "rainy", {"train": 3, "val": 2}, [("rain.zip", [
                {"kind": "gdrive", "id": "RAINID", "endpoint": hub}])]),
        })
        result = download.fn(config(tmp_path, catalog, ["reside6k", "lol", "rain100h"]), key="k")
    ids = {r["id"] for r in manifest_of(result)}
    assert len(ids) == 13 and {"reside6k-val-0003_1_0.2", "lol-val-22", "rain100h-val-002"} <= ids
    assert result.params["download.lol.sha256"] == sha(lol)


def test_download_stage_in_the_flow_logs_the_dataset_summary_to_mlflow(tmp_path, prefect_harness):
    from mlflow.tracking import MlflowClient

    from flows.pipeline import srdiff
    from tasks.tracking import PARENT_TAG, STAGE_TAG, tracking_uri
    lol = A.zip_bytes(LOL)
    with FileServer(files={"/lol.zip": lol}) as server:
        catalog = _lol_catalog(tmp_path, server, sha256=sha(lol))
        overrides = [f"data_root={tmp_path / 'data'}", "download.source=real", f"download.datasets_file={catalog}",
                     "download.datasets=[lol]"]
        default = str(Path(__file__).parents[1] / "configs" / "default.yaml")
        summary = srdiff(config_path=default, overrides=overrides, stages=["download"])
        again = srdiff(config_path=default, overrides=overrides, stages=["download"])
    assert again["stages"]["download"]["reused"]
    client = MlflowClient(tracking_uri(load_config(default, overrides)))
    exp = client.get_run(summary["parent_run_id"]).info.experiment_id
    run = next(r for r in client.search_runs([exp], filter_string=f"tags.`{PARENT_TAG}` = '{summary['parent_run_id']}'")
               if r.data.tags[STAGE_TAG] == "download")
    m = run.data.metrics
    assert (m["dataset/lol/train"], m["dataset/lol/train_expected"], m["dataset/lol/val"]) == (3, 3, 2)
    assert m["dataset/lol/quarantined"] == 0 and m["pairs/total"] == 5
    assert run.data.params["download.lol.sha256"] == sha(lol)


def test_rain_train_set_with_a_rainy_folder_and_both_sets_in_one_archive(tmp_path):
    members = {f"RainTrainH/rainy/rain-{n}.png": A.image_bytes(n) for n in (1, 2)}
    members |= {f"RainTrainH/norain-{n}.png": A.image_bytes(10 + n) for n in (1, 2)}
    members |= A.rain_test_members([1])
    with FileServer(files={"/rain.zip": A.zip_bytes(members)}) as server:
        catalog = write_catalog(tmp_path / "c.yaml", {"rain100h": entry("rain100h", "rainy", {"train": 2, "val": 1}, [
            ("rain.zip", [{"kind": "http", "url": server.url("/rain.zip")}])])})
        result = download.fn(config(tmp_path, catalog, ["rain100h"]), key="k")
    assert sorted(r["id"] for r in manifest_of(result)) == ["rain100h-train-1", "rain100h-train-2", "rain100h-val-001"]


def test_from_folder_holding_its_archive_and_the_extracted_copy_gives_each_pair_once(tmp_path):
    folder = tmp_path / "lol"
    for name, data in LOL.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    (folder / "LOLdataset.zip").write_bytes(A.zip_bytes(LOL))
    catalog = write_catalog(tmp_path / "c.yaml", {"lol": entry("lol", "low-light", {"train": 3, "val": 2},
                                                               [("lol_dataset.zip", [])])})
    result = download.fn(config(tmp_path, catalog, ["lol"], f"download.from_paths={{lol: [{folder}]}}"), key="k")
    assert len(manifest_of(result)) == 5 and quarantine_of(result) == {}


def test_an_archive_of_another_dataset_says_which_layout_was_expected(tmp_path):
    with FileServer(files={"/lol.zip": A.zip_bytes(RAIN_TRAIN)}) as server:
        with pytest.raises(DownloadError, match=r"no file matches the lol layout .*RainTrainH/rain-1.png"):
            download.fn(config(tmp_path, _lol_catalog(tmp_path, server), ["lol"]), key="k")


def test_a_web_page_served_in_place_of_the_archive_is_refused(tmp_path):
    page = "<!DOCTYPE html><html><head><title>Sign in to continue</title></head></html>"
    with FileServer(files={"/lol.zip": page.encode()}) as server:
        with pytest.raises(DownloadError, match=r"sent a web page instead of the file \(Sign in to continue\)"):
            download.fn(config(tmp_path, _lol_catalog(tmp_path, server), ["lol"]), key="k")


def test_16_bit_png_is_re_encoded_as_8_bit(tmp_path):
    members = dict(LOL)
    rgb16 = _png_16bit(20, 16)
    members["lol_dataset/our485/high/2.png"] = rgb16
    with FileServer(files={"/lol.zip": A.zip_bytes(members)}) as server:
        result = download.fn(config(tmp_path, _lol_catalog(tmp_path, server), ["lol"]), key="k")
    row = next(r for r in manifest_of(result) if r["id"] == "lol-train-2")
    written = Path(row["gt_path"]).read_bytes()
    assert written != rgb16 and written[24] == 8 and written[25] == 2  # IHDR: 8-bit RGB
    notes = {r["id"]: r["note"] for r in tables.read_table(tmp_path / "data/manifests/notes.parquet").to_pylist()}
    assert notes["lol-train-2"] == "GT PNG re-encoded as 8-bit RGB"


def _png_16bit(width: int, height: int) -> bytes:
    """A 16-bit RGB PNG written by hand (Pillow does not write 16-bit RGB)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    row = b"\x00" + b"\x9c\x40\x10\x00\x80\x00" * width
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(row * height))
            + chunk(b"IEND", b""))


def test_each_archive_is_hashed_once(tmp_path, monkeypatch):
    import storage.fetch
    calls = []
    real = storage.fetch.sha256_path
    monkeypatch.setattr(storage.fetch, "sha256_path", lambda p, *a, **k: calls.append(Path(p).name) or real(p, *a, **k))
    lol = A.zip_bytes(LOL)
    with FileServer(files={"/lol.zip": lol}) as server:
        download.fn(config(tmp_path, _lol_catalog(tmp_path, server, sha256=sha(lol)), ["lol"]), key="k")
    assert calls == ["lol_dataset.zip"]  # verified once; the extraction folder reuses the digest


def test_png_from_our_extraction_is_hard_linked_but_a_users_file_never_is(tmp_path):
    lol = A.zip_bytes(LOL)
    with FileServer(files={"/lol.zip": lol}) as server:
        result = download.fn(config(tmp_path, _lol_catalog(tmp_path, server), ["lol"], "download.keep_extracted=true"),
                             key="k")
    row = next(r for r in manifest_of(result) if r["id"] == "lol-val-22")
    extracted = next((tmp_path / "data/downloads/lol/extracted").rglob("eval15/low/22.png"))
    assert Path(row["lq_path"]).samefile(extracted)  # one copy on disk, not two
    assert Path(row["lq_path"]).read_bytes() == LOL["lol_dataset/eval15/low/22.png"]
    folder = tmp_path / "mine"
    for name, data in LOL.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    catalog = write_catalog(tmp_path / "c2.yaml", {"lol": entry("lol", "low-light", {"train": 3, "val": 2},
                                                                [("lol_dataset.zip", [])])})
    mine = download.fn(config(tmp_path / "two", catalog, ["lol"], f"download.from_paths={{lol: [{folder}]}}"), key="k")
    row = next(r for r in manifest_of(mine) if r["id"] == "lol-val-22")
    assert not Path(row["lq_path"]).samefile(folder / "lol_dataset/eval15/low/22.png")  # edits of theirs never leak in
