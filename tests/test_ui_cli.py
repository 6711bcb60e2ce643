"""`srdiff ui` (issue 16, items 8 and 9): the line `srdiff run` prints opens that run's store from
any folder; without a store it refuses instead of starting an empty one; SIGTERM or Ctrl-C stops
the MLflow server with every process it started, and srdiff exits 143 / 130 without a traceback."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from servers import free_port, kill_survivors, post_json, process_tree, survivors, wait_http  # noqa: E402

from flows import cli  # noqa: E402
from srdiff_core.config import load_config  # noqa: E402
from tasks.common import data_root  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY = str(Path(__file__).parent / "configs" / "tiny.yaml")
BIN = Path(sys.executable).parent


def parse_ui_line(line: str) -> tuple[str, list[str]]:
    """(config, overrides) of a printed `srdiff ui ...` line, parsed by srdiff's own parser."""
    argv = shlex.split(line)
    assert argv[:2] == ["srdiff", "ui"], line
    args = cli.build_parser().parse_args(argv[1:])
    return args.config, args.set


def test_the_ui_line_names_the_runs_store_from_any_folder(tmp_path, monkeypatch):
    run_folder, elsewhere = tmp_path / "ran-here", tmp_path / "elsewhere"
    run_folder.mkdir()
    elsewhere.mkdir()
    (run_folder / "mine.yaml").write_text("base: " + str(REPO / "configs" / "demo.yaml") + "\n")
    monkeypatch.chdir(run_folder)
    overrides = ["train.steps=3", "data_root=rel store", "download.from_paths={}"]
    demo_line = cli.ui_command("configs/demo.yaml", overrides)
    own_line = cli.ui_command("mine.yaml", [])
    expected_root = data_root(load_config(cli.resolve_config("configs/demo.yaml"), overrides))

    monkeypatch.chdir(elsewhere)
    config, sets = parse_ui_line(demo_line)
    assert config == "configs/demo.yaml"  # a repository config reads the same from anywhere
    assert sets == [f"data_root={run_folder.resolve() / 'rel store'}"]  # only the store's setting, made absolute
    assert data_root(load_config(cli.resolve_config(config), sets)) == expected_root
    config, sets = parse_ui_line(own_line)
    assert (config, sets) == (str(run_folder.resolve() / "mine.yaml"), [])
    assert "tracking.mlflow_uri=sqlite:////x/m.db" in cli.ui_command(TINY, ["tracking.mlflow_uri=sqlite:////x/m.db"])


def test_ui_refuses_a_folder_without_a_run_store_and_creates_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = cli.main(["ui", "--config", "configs/demo.yaml", "--port", str(free_port())])
    err = capsys.readouterr().err
    assert code == 2
    line = err.strip()
    assert line.startswith("srdiff: ") and "\n" not in line and "Traceback" not in err
    assert str(tmp_path / "data" / "demo") in line  # the folder it looked in
    assert "--set data_root=" in line and "relative to the current folder" in line  # how to point it
    assert not (tmp_path / "data").exists()  # no empty store made

    code = cli.main(["ui", "--config", TINY, "--set", f"data_root={tmp_path / 'gone'}"])
    assert code == 2 and str(tmp_path / "gone") in capsys.readouterr().err
    assert not (tmp_path / "gone").exists()


# ---------------------------------------------------------------- real runs, real servers

@pytest.fixture(scope="module")
def run_store(tmp_path_factory):
    """A real `srdiff run --stages download` with a relative data_root; its printed `srdiff ui` line."""
    root = tmp_path_factory.mktemp("ui-run")
    # Prefect's temporary server gets 20 s to start by default: too few on a busy 2-core machine.
    env = {**os.environ, "PREFECT_HOME": str(root / "prefect-home"), "OMP_NUM_THREADS": "1",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run([str(BIN / "srdiff"), "run", "--config", TINY, "--stages", "download",
                           "--set", "data_root=store"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    hint = next(line.strip() for line in lines if line.strip().startswith("srdiff ui "))
    parent = next(line for line in lines if line.startswith("MLflow parent run ")).split()[3].rstrip(".")
    return {"root": root, "hint": hint, "parent": parent, "env": env}


def start_ui(hint: str, port: int, cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    """The printed line as a user runs it (plus a free port), in its own process group (a shell's job)."""
    argv = [str(BIN / "srdiff"), *shlex.split(hint)[1:], "--port", str(port)]
    with open(log, "wb") as out:
        return subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def nothing_listens_on(port: int) -> bool:
    """(Binding would fail for a while anyway: the closed connections' TIME_WAIT holds the port.)"""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


# A stand-in server: it starts a worker that ignores SIGTERM (only SIGKILL stops it), says when
# both run, and serves until stopped.
FAKE_SERVER = """
import pathlib, signal, subprocess, sys, time
worker = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
subprocess.Popen([sys.executable, "-c", worker])
time.sleep(1)
pathlib.Path(sys.argv[1]).touch()
time.sleep(600)
"""


def test_the_server_returns_its_own_exit_status():
    assert cli.serve_until_signal([sys.executable, "-c", "import sys; sys.exit(3)"]) == 3


def test_ctrl_c_stops_the_server_and_a_worker_that_ignores_sigterm(tmp_path):
    ready = tmp_path / "ready"
    server = [sys.executable, "-c", FAKE_SERVER, str(ready)]
    code = f"import sys; from flows.cli import serve_until_signal; sys.exit(serve_until_signal({server!r}, grace_s=1))"
    ui = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, start_new_session=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tree = []
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline and ui.poll() is None:
            time.sleep(0.1)
        tree = process_tree(ui.pid)
        assert len(tree) == 3, [p.cmdline() for p in tree]  # srdiff, the server, its worker
        os.killpg(ui.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        out, _ = ui.communicate(timeout=30)
    finally:
        left = stop_all(ui, tree)
    assert ui.returncode == 130 and "Traceback" not in out, out
    assert not left, [p.cmdline() for p in left]


def stop_all(ui: subprocess.Popen, tree: list) -> list:
    """Kill ``ui`` if it still runs; the processes of ``tree`` that were left running (then killed)."""
    if ui.poll() is None:
        ui.kill()
        ui.wait()
    left = survivors(tree)
    kill_survivors(tree)
    return left


@pytest.mark.slow
def test_ui_from_another_folder_serves_the_run_and_sigterm_stops_everything(run_store, tmp_path):
    assert "--set data_root=" in run_store["hint"]
    port = free_port()
    log = tmp_path / "ui.log"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    ui = start_ui(run_store["hint"], port, elsewhere, run_store["env"], log)
    tree = []
    try:
        wait_http(f"http://127.0.0.1:{port}/health", ui, timeout=180, log=log)
        api = f"http://127.0.0.1:{port}/api/2.0/mlflow"
        exps = post_json(f"{api}/experiments/search", {"max_results": 10})["experiments"]
        runs = post_json(f"{api}/runs/search", {"experiment_ids": [e["experiment_id"] for e in exps]})["runs"]
        assert run_store["parent"] in {r["info"]["run_id"] for r in runs}  # the run's store, not a new one
        tree = process_tree(ui.pid)
        assert len(tree) > 2  # srdiff, `mlflow server`, its uvicorn worker and job runner
        ui.send_signal(signal.SIGTERM)  # to srdiff alone, as `kill PID` does
        started = time.monotonic()
        code = ui.wait(timeout=60)
        took = time.monotonic() - started
    finally:
        left = stop_all(ui, tree)
    out = log.read_text(errors="replace")
    assert code == 143, out[-3000:]
    assert not left, f"still running after srdiff exited: {[p.cmdline() for p in left]}"
    assert nothing_listens_on(port)
    assert "Traceback" not in out, out[-3000:]
    assert took < 15, f"srdiff ui took {took:.1f} s to stop"
