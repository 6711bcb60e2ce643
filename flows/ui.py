"""`srdiff ui`: which run store to open, and an `mlflow server` that stops with srdiff."""

from __future__ import annotations

import os
from pathlib import Path

from flows.args import REPO_ROOT, resolve_config


UI_STORE_KEYS = ("data_root", "tracking.mlflow_uri")  # the --set keys that say where the run store is


def ui_command(config: str, overrides: list[str]) -> str:
    """The `srdiff ui` line that opens a run's store from any folder: the run's --config and its
    data_root / tracking.mlflow_uri overrides, a local data_root made absolute (a relative one
    names another folder wherever the line is pasted)."""
    import shlex

    from storage import fs

    parts = ["srdiff", "ui", "--config", _portable_config(config)]
    for item in overrides:
        key, _, value = (s.strip() for s in item.partition("="))
        if key in UI_STORE_KEYS:
            value = fs.resolve(value)[1] if key == "data_root" and "://" not in value else value
            parts += ["--set", f"{key}={value}"]
    return shlex.join(parts)


def _portable_config(config: str) -> str:
    """``config`` as given where it names the same file from any folder (a repository config, see
    resolve_config), else absolute."""
    resolved = Path(resolve_config(config)).resolve()
    return config if resolved == (REPO_ROOT / config).resolve() else str(resolved)


def ui_store(cfg) -> str:
    """The run store `srdiff ui` opens. A SQLite store that is not there is an error: `mlflow
    server` would silently create an empty one, which looks like "all runs are gone"."""
    from srdiff_core.config import ConfigError
    from tasks.tracking import tracking_uri

    try:
        uri = tracking_uri(cfg)
    except ValueError as e:  # a remote data_root without tracking.mlflow_uri
        raise ConfigError(str(e)) from None
    db = _sqlite_file(uri)
    if db is not None and not db.exists():
        raise ConfigError(_missing_store(cfg, db))
    return uri


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a SQLAlchemy ``sqlite:///PATH`` URI (``sqlite:////abs`` is /abs)."""
    from urllib.parse import unquote

    prefix = "sqlite:///"
    return Path(unquote(uri[len(prefix):].split("?")[0])) if uri.startswith(prefix) else None


def _missing_store(cfg, db: Path) -> str:
    where = f"no MLflow run store in {db.parent} ({db.name} is not there)"
    if cfg.tracking.mlflow_uri:
        return (f"{where}: point tracking.mlflow_uri at the store your runs wrote, "
                f"e.g. --set tracking.mlflow_uri=sqlite:////path/to/mlflow.db")
    how = (f"{where}: pass the --config and --set data_root=PATH of the runs you want to see (the last "
           f"lines of `srdiff run` print the exact `srdiff ui` command)")
    if not Path(cfg.data_root).expanduser().is_absolute():
        how += (f", or run it from the folder you ran `srdiff run` in (data_root {cfg.data_root} is "
                f"relative to the current folder)")
    return how


def stop_process_group(proc, grace_s: float) -> None:
    """SIGTERM the process group ``proc`` leads, give all of it ``grace_s`` seconds to exit, then
    SIGKILL what is left (by process group id: its members may have been reparented by now)."""
    import signal
    import time

    _signal_group(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        proc.poll()  # reap the leader: a zombie still counts as a member of the group
        if not _group_running(proc.pid):
            break
        time.sleep(0.1)
    if _group_running(proc.pid):
        _signal_group(proc.pid, signal.SIGKILL)
    proc.wait()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:  # every member has exited
        pass


def _group_running(pgid: int) -> bool:
    import psutil

    for p in psutil.process_iter(["status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(p.pid) == pgid:
                return True
        except (OSError, psutil.Error):  # it exited while we looked
            pass
    return False


def serve_until_signal(cmd: list[str], grace_s: float = 10.0) -> int:
    """Run the server ``cmd`` until it exits (its exit status) or srdiff gets SIGINT / SIGTERM /
    SIGHUP (130 / 143 / 129, quietly); either way the server and every process it started are
    stopped. It runs in a session of its own so that one signal to its group reaches all of it:
    MLflow's main process, sent SIGTERM alone, leaves its job runner and huey consumers running.
    (Outside srdiff's terminal, it hears no Ctrl-C or hang-up itself: srdiff passes them on.)"""
    import signal
    import subprocess

    received: list[int] = []
    stop_signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    # Handlers before the server starts, so a signal that comes early is not lost; they only
    # record it: the loop below stops the server outside the handler.
    saved = {sig: signal.signal(sig, lambda signum, _frame: received.append(signum)) for sig in stop_signals}
    try:
        server = subprocess.Popen(cmd, start_new_session=True)
        try:
            while not received:
                try:
                    return server.wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    pass
            return 128 + received[0]
        finally:
            stop_process_group(server, grace_s)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
