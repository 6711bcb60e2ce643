"""Stopping `srdiff run` cleanly: Ctrl-C / SIGTERM, servers that must not outlive the command,
and MLflow runs a killed command left RUNNING.

Ctrl-C sends SIGINT to the whole process group, Prefect's temporary API server included: left
to Prefect, the flow engine then retries its dead API for minutes, printing connection
tracebacks. So `srdiff run` handles SIGINT and SIGTERM itself: it marks its open MLflow runs
KILLED, stops its child processes (the temporary server, torchrun ranks), prints one line that
says what was interrupted and how to resume, and exits 130 / 143. Nothing is lost: finished
stages are in the cache, shards and checkpoints are written atomically, so the same command
resumes (tests/test_resume_kill.py).

`kill -9` cannot be handled: a small guard process (``python -m flows.interrupt PARENT SERVER``)
stops the temporary server when srdiff's process is gone, and the next run marks the runs the
killed one left RUNNING as KILLED (:func:`close_abandoned_runs`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psutil

# What a signal handler needs to know: the stage running and the MLflow runs open (cfg, run id).
_state: dict[str, Any] = {"stage": None, "runs": {}}

RESUME_HINT = ("rerun the same command to resume: finished stages are reused from the cache and training "
               "continues from its last checkpoint")


def note_stage(name: str | None) -> None:
    _state["stage"] = name


def note_run(cfg: Any, run_id: str) -> None:
    _state["runs"][run_id] = cfg


def forget_run(run_id: str) -> None:
    _state["runs"].pop(run_id, None)


@contextmanager
def handled_signals() -> Iterator[None]:
    """While open, SIGINT and SIGTERM stop the process within seconds, quietly (main thread only;
    elsewhere, as in a test's worker thread, nothing changes). The old handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _on_signal(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the clean-up
    name = signal.Signals(signum).name
    stage = _state["stage"]
    where = f" during the {stage} stage" if stage else ""
    _bounded(_close_open_runs, timeout=4.0)
    stop_children(timeout=3.0)
    sys.stdout.flush()
    # Not print(): inside a flow with log_prints Prefect turns print into a log record.
    sys.stderr.write(f"srdiff: interrupted ({name}){where}; {RESUME_HINT}\n")
    sys.stderr.flush()
    os._exit(128 + signum)  # not SystemExit: Prefect's engine would report the crash to a dead API


def _close_open_runs() -> None:
    from tasks import tracking

    for run_id, cfg in list(_state["runs"].items()):
        try:
            tracking.end_run(cfg, run_id, "KILLED")
        except Exception:  # the store may be the thing that is gone; the next run closes it then
            pass


def _bounded(fn: Any, timeout: float) -> None:
    worker = threading.Thread(target=fn, daemon=True)
    worker.start()
    worker.join(timeout)


def stop_children(timeout: float) -> None:
    """SIGTERM every descendant process, then SIGKILL what is left after ``timeout`` seconds."""
    children = psutil.Process().children(recursive=True)
    for child in children:
        try:
            child.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(children, timeout=timeout)
    for child in alive:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


# ---------------------------------------------------------------- Prefect's temporary server

def start_guarded_prefect_server() -> None:
    """Start Prefect's temporary API server now (when no PREFECT_API_URL is set) with a guard process
    that stops it if srdiff dies without cleaning up (kill -9). Prefect reuses this same server."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    if PREFECT_API_URL.value():
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    # Prefect waits 20 s by default: too short for a busy 2-core machine, where a run would fail
    # before it began. The setting still raises it further.
    server.start(timeout=max(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value(), 120))
    if server.server_process is not None:
        subprocess.Popen([sys.executable, "-m", "flows.interrupt", str(os.getpid()), str(server.server_process.pid)],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def guard(parent: int, server: int, poll_s: float = 0.5) -> None:
    """Wait until ``parent`` or ``server`` is gone; if the parent went first, stop the server."""
    while True:
        if not psutil.pid_exists(server):
            return
        try:
            alive = psutil.Process(parent).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            alive = False
        if not alive:
            try:
                proc = psutil.Process(server)
                proc.terminate()
                proc.wait(10)
            except psutil.TimeoutExpired:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
            return
        time.sleep(poll_s)


# ---------------------------------------------------------------- runs a killed command left open

def close_abandoned_runs(cfg: Any) -> list[str]:
    """Mark KILLED the runs of this experiment still RUNNING whose process (env.host, env.pid) is
    gone from this machine; returns their ids. Runs of live processes, or of other hosts, stay."""
    import platform

    from tasks import tracking

    client = tracking.client_for(cfg)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is None:
        return []
    host = platform.node()
    closed = []
    for run in client.search_runs([experiment.experiment_id], filter_string="attributes.status = 'RUNNING'",
                                  max_results=1000):
        tags = run.data.tags
        pid = tags.get("env.pid", "")
        if tags.get("env.host") != host or not pid.isdigit() or _alive(int(pid), run.info.start_time):
            continue
        client.set_tag(run.info.run_id, "srdiff.closed_by", "a later srdiff run: its process was gone")
        client.set_terminated(run.info.run_id, status="KILLED")
        closed.append(run.info.run_id)
    return closed


def _alive(pid: int, since_ms: int | None) -> bool:
    """Whether process ``pid`` still runs and is the one that started the run at ``since_ms``
    (a process created after the run began is another that reuses the number)."""
    if pid == os.getpid():
        return True
    try:
        created_ms = psutil.Process(pid).create_time() * 1000
    except psutil.NoSuchProcess:
        return False
    return since_ms is None or created_ms <= since_ms + 1000


if __name__ == "__main__":  # the guard process: python -m flows.interrupt PARENT_PID SERVER_PID
    guard(int(sys.argv[1]), int(sys.argv[2]))
