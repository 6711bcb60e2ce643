"""The download stage with what users really pass: `--from` paths with awkward names, runs that
forget `--from`, mistakes that must fail before any download, catalogs written by hand, renamed
folders. Real archives in the datasets' layouts (tests/dataset_archives.py), a loopback HTTP
server, and a real MLflow store (SQLite in data_root) read back through mlflow's client."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from prefect.states import Failed

import dataset_archives as A  # tests/ is on sys.path (pytest rootdir-relative imports)
from http_files import FileServer
from srdiff_core.config import ConfigError, load_config
from storage import tables
from tasks import acquire, datasets, tracking
from tasks.download import DownloadError, download, network_failure

DEFAULT = str(Path(__file__).parents[1] / "configs" / "default.yaml")
LOL = A.lol_members(train=[2, 5, 100], val=[1, 22])
RAIN_TRAIN, RAIN_TEST = A.rain_train_members([1, 2, 10]), A.rain_test_members([1, 2])
# Every character class the issue names: spaces, (), [], #, %, a comma, a quote, non-ASCII letters.
AWKWARD = "dl (1) [copy] #2 100% a,b it's Ünïcödé ñ"
# MLflow's own rule is wider; ours for names is narrower: nothing a path or file name could bring.
FIXED_NAME = re.compile(r"[A-Za-z0-9_.\-/]+")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def long_path(base: Path, length: int, name: str) -> Path:
    """A path of exactly ``length`` characters ending in ``name`` (folders of at most 100 characters)."""
    path = base
    while len(str(path / name)) < length:
        room = length - len(str(path / name)) - 1  # minus the separator the next folder adds
        path = path / ("L" * max(1, min(100, room)))
    assert len(str(path / name)) == length
    return path / name


def catalog(tmp_path: Path, lol_sources: list[dict], rain_sources: list[dict], **lol_extra) -> str:
    def entry(layout, degradation, expected, files):
        return {"layout": layout, "degradation": degradation, "expected": expected,
                "files": [{"name": n, "sources": s} for n, s in files]}
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump({
        "lol": entry("lol", "low-light", lol_extra.get("expected", {"train": 3, "val": 2}),
                     [("lol_dataset.zip", lol_sources)]),
        "rain100h": entry("rain100h", "rainy", {"train": 3, "val": 2},
                          [("RainTrainH.zip", rain_sources), ("Rain100H.zip", rain_sources)])}))
    return str(path)


def overrides(tmp_path: Path, catalog_file: str, names: list[str], *extra: str) -> list[str]:
    return [f"data_root={tmp_path / 'data'}", "download.source=real", f"download.datasets_file={catalog_file}",
            f"download.datasets={names}", "download.retries=0", "download.backoff_s=0", "download.workers=2", *extra]


def stage_run(client: MlflowClient, parent_run_id: str, stage: str):
    exp = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.`{tracking.PARENT_TAG}` = '{parent_run_id}'")
    return next(r for r in runs if r.data.tags[tracking.STAGE_TAG] == stage)


def test_awkward_from_paths_are_values_of_fixed_param_names_and_reused_without_from(tmp_path, prefect_harness):
    """`--from` paths with every awkward character and one of 300 characters: the download stage
    logs them as VALUES under fixed names in MLflow. The next run without --from reuses the
    normalised datasets, says where they came from, and never touches the (failing) sources."""
    from flows.cli import from_overrides
    from flows.pipeline import srdiff

    tmp_path = tmp_path.resolve()  # --from paths are recorded resolved
    lol = write(tmp_path / AWKWARD / "LOLdataset (1).zip", A.zip_bytes(LOL))
    rain_train = write(long_path(tmp_path / "far", 300, "RainTrainH [2].zip"), A.zip_bytes(RAIN_TRAIN))
    rain_test = write(tmp_path / AWKWARD / "Rain100H, test's #1 (ü).zip", A.zip_bytes(RAIN_TEST))
    # The sources serve the datasets too: any fetch would succeed, and show in server.log.
    with FileServer(files={"/lol_dataset.zip": A.zip_bytes(LOL), "/rain.zip": A.zip_bytes(RAIN_TRAIN)}) as server:
        cat = catalog(tmp_path, [{"kind": "http", "url": server.url("/lol_dataset.zip")}],
                      [{"kind": "http", "url": server.url("/rain.zip")}])
        base = overrides(tmp_path, cat, ["lol", "rain100h"])
        given = [f"lol={lol}", f"rain100h={rain_train}", str(rain_test)]  # the last one recognised by its names
        first = srdiff(config_path=DEFAULT, overrides=from_overrides(DEFAULT, base, given), stages=["download"])
        started = time.monotonic()
        second = srdiff(config_path=DEFAULT, overrides=base, stages=["download"])  # no --from this time
        took = time.monotonic() - started
        assert server.log == []  # nothing was fetched, in either run
    client = MlflowClient(tracking.tracking_uri(load_config(DEFAULT, base)))
    params = stage_run(client, first["parent_run_id"], "download").data.params
    assert all(FIXED_NAME.fullmatch(k) for k in params), sorted(params)
    assert params["download.lol.from"] == str(lol)
    assert json.loads(params["download.rain100h.from"]) == [str(rain_train), str(rain_test)]
    assert len(str(rain_train)) == 300
    assert (params["download.lol.origin"], params["download.lol.reused"]) == ("--from", "false")
    assert params["download.lol.sha256"] == sha(lol.read_bytes())
    parent = client.get_run(first["parent_run_id"]).data.params
    assert json.loads(parent["download.from_paths.lol"]) == [str(lol)]

    assert not second["stages"]["download"]["reused"]  # the stage ran (its config changed) ...
    again = stage_run(client, second["parent_run_id"], "download")
    params = again.data.params  # ... and reused both datasets, saying where they came from
    assert (params["download.lol.reused"], params["download.lol.origin"]) == ("true", "--from")
    assert params["download.lol.from"] == str(lol)
    assert params["download.lol.normalised_in_run"] == stage_run(client, first["parent_run_id"], "download").info.run_id
    assert params["download.rain100h.reused"] == "true"
    assert again.data.metrics["pairs/total"] == 10 and took < 60  # no retry waited for a source


def test_refresh_download_normalises_again_from_the_sources(tmp_path, prefect_harness):
    from flows.pipeline import srdiff

    lol = write(tmp_path / "mine" / "lol.zip", A.zip_bytes(LOL))
    with FileServer(files={"/lol_dataset.zip": A.zip_bytes(LOL)}) as server:
        cat = catalog(tmp_path, [{"kind": "http", "url": server.url("/lol_dataset.zip")}], [])
        base = overrides(tmp_path, cat, ["lol"])
        srdiff(config_path=DEFAULT, overrides=[*base, f"download.from_paths={{lol: ['{lol}']}}"], stages=["download"])
        reused = srdiff(config_path=DEFAULT, overrides=base, stages=["download"])
        assert server.log == []
        refreshed = srdiff(config_path=DEFAULT, overrides=base, stages=["download"], refresh=["download"])
        assert {s.path for s in server.log} == {"/lol_dataset.zip"}
    client = MlflowClient(tracking.tracking_uri(load_config(DEFAULT, base)))
    assert stage_run(client, reused["parent_run_id"], "download").data.params["download.lol.origin"] == "--from"
    params = stage_run(client, refreshed["parent_run_id"], "download").data.params
    assert (params["download.lol.origin"], params["download.lol.reused"]) == ("sources", "false")


def test_a_changed_catalog_entry_or_other_from_files_normalise_again(tmp_path, caplog):
    lol = write(tmp_path / "lol.zip", A.zip_bytes(LOL))
    with FileServer(files={"/lol_dataset.zip": A.zip_bytes(LOL)}) as server:
        sources = [{"kind": "http", "url": server.url("/lol_dataset.zip")}]
        cat = catalog(tmp_path, sources, [])
        with_from = overrides(tmp_path, cat, ["lol"], f"download.from_paths={{lol: ['{lol}']}}")
        download.fn(load_config(None, with_from), key="k")
        # The other dataset's entry changed, lol's did not: lol is still reused.
        catalog(tmp_path, sources, [{"kind": "http", "url": server.url("/elsewhere.zip")}])
        with caplog.at_level(logging.INFO):
            result = download.fn(load_config(None, overrides(tmp_path, cat, ["lol"])), key="k")
        assert server.log == [] and result.params["download.lol.reused"] == "true"
        assert f"lol: reusing the pairs already in data_root (5 pairs from --from {lol}" in caplog.text
        # Other files given with --from: normalised from them.
        bigger = write(tmp_path / "lol2.zip", A.zip_bytes(A.lol_members(train=[2, 5, 100, 7], val=[1, 22])))
        result = download.fn(load_config(None, overrides(tmp_path, cat, ["lol"], "download.allow_partial=true",
                                                         f"download.from_paths={{lol: ['{bigger}']}}")), key="k")
        assert result.params["download.lol.reused"] == "false" and result.metrics["dataset/lol/train"] == 4
        assert server.log == []
        # lol's own entry changed (its expected counts): normalised again, from its sources now.
        catalog(tmp_path, sources, [], expected={"train": 3, "val": 1})
        result = download.fn(load_config(None, overrides(tmp_path, cat, ["lol"])), key="k")
        assert [s.path for s in server.log] == ["/lol_dataset.zip"]
        assert (result.params["download.lol.origin"], result.params["download.lol.reused"]) == ("sources", "false")


def test_user_mistakes_fail_before_any_download_and_are_never_retried(tmp_path):
    rain = A.zip_bytes({**RAIN_TRAIN, **RAIN_TEST})
    with FileServer(files={"/rain.zip": rain}) as server:
        cat = catalog(tmp_path, [{"kind": "http", "url": "http://127.0.0.1:9/lol.zip"}],   # unreachable
                      [{"kind": "http", "url": server.url("/rain.zip")}])

        def fails(from_path: Path, match: str) -> None:
            cfg = load_config(None, overrides(tmp_path, cat, ["rain100h", "lol"],
                                              f"download.from_paths={{lol: ['{from_path}']}}"))
            started = time.monotonic()
            with pytest.raises(acquire.BadInput, match=match) as err:
                download.fn(cfg, key="k")
            assert time.monotonic() - started < 10 and server.log == []  # before rain100h was fetched
            assert not network_failure(None, None, Failed(data=err.value))  # Prefect does not retry it

        fails(tmp_path / "nowhere" / "LOL (1).zip", r"lol: --from .*LOL \(1\).zip does not exist")
        other = write(tmp_path / "rain.zip", rain)  # an archive of another dataset
        fails(other, "holds no file of the lol layout .*look like the rain100h layout")
        notes = write(tmp_path / "notes.txt", b"just text")
        fails(notes, "neither a folder nor a zip/tar archive")
        half = write(tmp_path / "half.zip", A.zip_bytes(LOL)[:300])
        fails(half, "half.zip is a truncated or corrupt archive")


def test_cli_from_with_a_missing_file_or_an_unknown_dataset_is_a_clean_exit_2(tmp_path, capsys):
    from flows.cli import from_overrides, main

    cat = catalog(tmp_path, [], [])
    base = [f"download.datasets_file={cat}"]
    with pytest.raises(ConfigError, match=r"--from lol=.*LOL \(1\).zip: no such file or folder"):
        from_overrides(DEFAULT, base, [f"lol={tmp_path / 'LOL (1).zip'}"])
    archive = write(tmp_path / "lol.zip", A.zip_bytes(LOL))
    with pytest.raises(ConfigError, match=r"has no dataset 'lolv2'; write one of \['lol', 'rain100h'\]"):
        from_overrides(DEFAULT, base, [f"lolv2={archive}"])
    code = main(["run", "--set", base[0], "--set", f"data_root={tmp_path / 'data'}",
                 "--from", f"lol={tmp_path / 'gone.zip'}", "--stages", "download"])
    assert code == 2 and capsys.readouterr().err.startswith("srdiff: --from lol=")


def test_params_too_long_for_mlflow_are_shortened_with_a_digest_and_kept_whole_as_an_artifact(tmp_path):
    """The parent run logs the config, download.from_paths included: 25 paths of 300 characters
    are more than MLflow keeps, and a dataset name that is not a plain name stays in a value."""
    paths = [str(long_path(tmp_path / f"p{i}", 300, "lol.zip")) for i in range(25)]
    cfg = load_config(None, [f"data_root={tmp_path / 'data'}",
                             f"download.from_paths={json.dumps({'lol': paths, 'my data (2)': ['x']})}"])
    run_id = tracking.start_parent_run(cfg, flow_run_id=None, stages=["download"], config_path=None)
    client = tracking.client_for(cfg)
    params = client.get_run(run_id).data.params
    assert all(FIXED_NAME.fullmatch(k) for k in params), [k for k in params if not FIXED_NAME.fullmatch(k)]
    whole = json.dumps({"lol": paths, "my data (2)": ["x"]})
    value = params["download.from_paths"]
    assert len(whole) > 6000 and len(value) <= 6000
    assert value.startswith(whole[:5000]) and sha(whole.encode()) in value
    assert "params-full/download.from_paths.txt" in value
    local = client.download_artifacts(run_id, "params-full/download.from_paths.txt", str(tmp_path))
    assert Path(local).read_text() == whole


def test_catalog_sha256_is_a_string_whatever_yaml_reads(tmp_path):
    decimal, octal = "1234567890" * 6 + "1234", "0" + "1234567" * 9  # both 64 digits; unquoted, YAML reads ints
    path = tmp_path / "c.yaml"
    path.write_text(f"""
lol:
  degradation: low-light
  layout: lol
  expected: {{train: 3, val: 2}}
  files:
    - name: lol_dataset.zip
      sources:
        - {{kind: http, url: "http://127.0.0.1:9/a.zip", sha256: {decimal}}}
        - {{kind: http, url: "http://127.0.0.1:9/b.zip", sha256: {octal}}}
        - {{kind: http, url: "http://127.0.0.1:9/c.zip", sha256: {"AB" * 32}}}
""")
    assert isinstance(yaml.safe_load(path.read_text())["lol"]["files"][0]["sources"][0]["sha256"], int)
    sources = datasets.load_catalog(path)["lol"].files[0].sources
    assert [s.sha256 for s in sources] == [decimal, octal, "ab" * 32]
    # And a download checked against a digest YAML read as a number says what it expected.
    lol = A.zip_bytes(LOL)
    with FileServer(files={"/lol.zip": lol}) as server:
        path.write_text(path.read_text().replace("http://127.0.0.1:9/a.zip", server.url("/lol.zip")))
        with pytest.raises(DownloadError, match=f"sha256 is {sha(lol)} but {decimal} was expected"):
            download.fn(load_config(None, overrides(tmp_path, str(path), ["lol"])), key="k")
    path.write_text("lol: {degradation: low-light, layout: lol, expected: {train: 1}, files: [{name: x, "
                    "sources: [{kind: http, url: u, sha256: abc}]}]}")
    with pytest.raises(ConfigError, match="sha256 'abc' is not 64 hexadecimal digits"):
        datasets.load_catalog(path)
    path.write_text("lol: [unclosed")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        datasets.load_catalog(path)
    path.write_text(yaml.safe_dump({"lol (v1)": {}}))
    with pytest.raises(ConfigError, match="must be letters, digits"):
        datasets.load_catalog(path)


def test_renamed_rain100h_folder_keeps_its_test_pairs_out_of_train(tmp_path):
    """Rain100H's train and test sets use the same names (rain-1.png ...): a copy renamed to
    myrain/{train,test} is split by those folder names, not all put into train."""
    folder = tmp_path / "myrain"
    for n in (1, 2, 3):
        write(folder / "train" / f"rain-{n}.png", A.image_bytes(n))
        write(folder / "train" / f"norain-{n}.png", A.image_bytes(10 + n))
    for n in (1, 2):
        write(folder / "test" / "rainy" / f"rain-{n}.png", A.image_bytes(20 + n))
        write(folder / "test" / f"norain-{n}.png", A.image_bytes(30 + n))
    cat = catalog(tmp_path, [], [])
    result = download.fn(load_config(None, overrides(tmp_path, cat, ["rain100h"],
                                                     f"download.from_paths={{rain100h: ['{folder}']}}")), key="k")
    rows = {r["id"]: r for r in tables.read_table(result.outputs["manifest"]).to_pylist()}
    assert sorted(rows) == ["rain100h-train-1", "rain100h-train-2", "rain100h-train-3",
                            "rain100h-val-1", "rain100h-val-2"]
    assert rows["rain100h-val-2"]["lq_sha256"] == sha((folder / "test/rainy/rain-2.png").read_bytes())
    assert tables.read_table(result.outputs["quarantine"]).num_rows == 0


def test_shortfall_line_points_at_the_quarantine_only_when_it_holds_something(tmp_path, caplog):
    cat = catalog(tmp_path, [], [], expected={"train": 4, "val": 2})
    short = write(tmp_path / "short.zip", A.zip_bytes(LOL))  # 3 train pairs of 4, none rejected
    with caplog.at_level(logging.WARNING):
        download.fn(load_config(None, overrides(tmp_path, cat, ["lol"], "download.allow_partial=true",
                                                f"download.from_paths={{lol: ['{short}']}}")), key="k")
    line = next(r.message for r in caplog.records if "SHORTFALL" in r.message)
    assert "quarantine.parquet" not in line and "nothing was quarantined" in line
    caplog.clear()
    members = dict(A.lol_members(train=[2, 5, 100, 7], val=[1, 22]))
    del members["lol_dataset/our485/high/7.png"]  # one LQ without its GT: quarantined
    broken = write(tmp_path / "broken.zip", A.zip_bytes(members))
    with caplog.at_level(logging.WARNING):
        download.fn(load_config(None, overrides(tmp_path, cat, ["lol"], "download.allow_partial=true",
                                                f"download.from_paths={{lol: ['{broken}']}}")), key="k")
    line = next(r.message for r in caplog.records if "SHORTFALL" in r.message)
    assert "1 of its files are in manifests/quarantine.parquet" in line


def test_failure_messages_point_at_a_catalog_of_ones_own_not_the_repository_file(tmp_path):
    with FileServer() as server:
        cat = catalog(tmp_path, [{"kind": "http", "url": server.url("/nope.zip")}], [])
        with pytest.raises(DownloadError) as err:
            download.fn(load_config(None, overrides(tmp_path, cat, ["lol"])), key="k")
    message = str(err.value)
    assert "download.datasets_file" in message and "docs/datasets.md" in message
    assert "add a mirror to" not in message
    with pytest.raises(ConfigError, match="download.datasets_file.*docs/datasets.md"):
        datasets.load_catalog(tmp_path / "missing.yaml")
    # `--set download.datasets_file=~/...`: the shell leaves that ~ alone, the catalog lookup does not.
    assert datasets.resolve_catalog("~/my-datasets.yaml") == str(Path.home() / "my-datasets.yaml")
