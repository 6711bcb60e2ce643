"""What `srdiff run` prints when something fails: one `srdiff:` line, the traceback in the run's
log file, exit 2 for what the user can fix; command-line mistakes before Prefect starts."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

TINY = str(Path(__file__).parent / "configs" / "tiny.yaml")
SRDIFF = str(Path(sys.executable).parent / "srdiff")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def srdiff(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([SRDIFF, *args], env=ENV, capture_output=True, text=True, timeout=timeout)


def test_cli_mistakes_fail_before_prefect_starts(tmp_path):
    bad_stage = srdiff("run", "--config", TINY, "--set", f"data_root={tmp_path}", "--stages", "trian")
    bad_refresh = srdiff("run", "--config", TINY, "--set", f"data_root={tmp_path}", "--refresh", "all")
    (tmp_path / "a-file").write_text("")
    unwritable = srdiff("run", "--config", TINY, "--set", f"data_root={tmp_path / 'a-file' / 'data'}")
    for result, words in ((bad_stage, "unknown stage(s) in --stages ['trian']"),
                          (bad_refresh, "unknown stage(s) in --refresh ['all']"),
                          (unwritable, "cannot write under data_root")):
        out = result.stdout + result.stderr
        assert result.returncode == 2, out
        assert result.stderr.startswith("srdiff: ") and words in result.stderr, out
        assert "Traceback" not in out and "Flow run" not in out, out
    assert "--set data_root=PATH" in unwritable.stderr


@pytest.mark.slow
def test_a_failing_stage_prints_its_error_once_and_the_traceback_goes_to_the_log(tmp_path):
    catalog = tmp_path / "my-datasets.yaml"
    catalog.write_text("lol: [this is: not a catalog\n")
    args = ["run", "--config", TINY, "--stages", "download", "--set", f"data_root={tmp_path / 'data'}",
            "--set", "download.source=real", "--set", "download.datasets=[lol]",
            "--set", f"download.datasets_file={catalog}"]
    result = srdiff(*args)
    out = result.stdout + result.stderr
    assert result.returncode == 2, out
    assert "Traceback" not in out, out
    errors = [line for line in result.stderr.splitlines() if line.startswith("srdiff: ")]
    assert len(errors) == 1 and str(catalog) in errors[0], out
    (log,) = (tmp_path / "data" / "logs").glob("srdiff-run-*.log")
    assert str(log) in result.stderr and "Traceback" in log.read_text()
    verbose = srdiff(*args, "--verbose")
    assert verbose.returncode == 2 and "Traceback" in verbose.stdout + verbose.stderr
