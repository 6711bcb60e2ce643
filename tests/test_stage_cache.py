"""The stage cache lives under data_root: any PREFECT_HOME reuses it, and a record whose result
cannot be read makes the stage recompute (with a warning), never a traceback."""

import json
from pathlib import Path

import pytest
from prefect.settings import PREFECT_HOME, PREFECT_LOCAL_STORAGE_PATH, temporary_settings

from flows.pipeline import srdiff

TINY = str(Path(__file__).parent / "configs" / "tiny.yaml")


def download_reused(root: Path) -> bool:
    summary = srdiff(config_path=TINY, overrides=[f"data_root={root}"], stages=["download"])
    return summary["stages"]["download"]["reused"]


def test_the_cache_survives_another_prefect_home_and_lost_results(tmp_path, prefect_harness):
    root = tmp_path / "data"
    assert download_reused(root) is False
    (record,) = (root / ".prefect-cache-keys").iterdir()
    stored = Path(json.loads(record.read_text())["storage_key"])
    assert stored.parent == (root / ".prefect-results").resolve() and stored.is_file()
    # Another PREFECT_HOME (its storage folder empty): the cache is still found, under data_root.
    other = tmp_path / "other-prefect-home"
    with temporary_settings({PREFECT_HOME: other, PREFECT_LOCAL_STORAGE_PATH: other / "storage"}):
        assert download_reused(root) is True
    # The result file deleted (as a cleaned storage folder would): recomputed, not a path error.
    stored.unlink()
    assert download_reused(root) is False
    assert download_reused(root) is True
    # A record of an older srdiff that points into Prefect's home: recomputed too.
    record.write_text(json.dumps({**json.loads(record.read_text()),
                                  "storage_key": f"/root/.prefect/storage/{record.name}"}))
    assert download_reused(root) is False
    assert download_reused(root) is True
