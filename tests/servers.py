"""Start and stop real servers on 127.0.0.1 for tests (stopped by process id, never by name)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout} s:\n{log.read_text()[-3000:]}")


@contextmanager
def background(cmd: list[str], *, env: dict, log: Path, health_url: str | None = None, timeout: float = 120):
    """Run ``cmd`` in its own process group; on exit, SIGTERM then SIGKILL that group by pid."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        if health_url:
            wait_http(health_url, proc, timeout, log)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def post_json(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@contextmanager
def prefect_server(home: Path, log: Path, timeout: float = 180):
    """A real `prefect server start` on a free 127.0.0.1 port with its own PREFECT_HOME (so its
    own database), stopped by process id on exit. Yields the environment for clients of it. No
    dashboard and no background services: the API is all the tests use, and it starts sooner."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    prefect = str(Path(sys.executable).parent / "prefect")
    cmd = [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-services"]
    with background(cmd, env=env, log=log, health_url=f"{api}/health", timeout=timeout):
        yield {**env, "PREFECT_API_URL": api}


def process_tree(pid: int) -> list:
    """The process and all its descendants now (psutil.Process objects, which stay valid after
    the process is reparented, so a test can check later that none of them survived)."""
    import psutil

    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def survivors(procs: list) -> list:
    """Those of ``procs`` still running (a zombie waiting to be reaped has stopped running)."""
    import psutil

    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def kill_survivors(procs: list) -> None:
    """SIGKILL, by process id, whichever of ``procs`` still run: a failed test leaves no server."""
    import psutil

    left = survivors(procs)
    for p in left:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(left, timeout=10)
