"""What `srdiff run` shows when something fails: one error, once.

A failing stage raises through its task, its subflow and the flow, and Prefect logs the
exception with its traceback at each (about 300 lines for one error). On the console the
tracebacks are dropped (the log lines stay); the run's log file under data_root keeps them all,
and `--verbose` shows them on the console too. The CLI then prints the error itself once: a
`srdiff: ...` line, exit 2 for what the user can fix (config, catalog, command line, the files
given), exit 1 for the rest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class WithoutTraceback(logging.Formatter):
    """Formats a record as ``inner`` does, without its exception text (the record is copied:
    other handlers, such as the log file's, still get the traceback)."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            record = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None,
                                            "stack_info": None})
        return self.inner.format(record)


def _console_handlers() -> list[logging.Handler]:
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    return [h for lg in loggers for h in lg.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]


@contextmanager
def run_log(folder: Path, *, quiet: bool) -> Iterator[Path]:
    """While open: this run's log file in ``folder`` (INFO and above, tracebacks included), and with
    ``quiet`` no tracebacks on the console. Console formatters are restored afterwards."""
    from prefect.logging.configuration import PROCESS_LOGGING_CONFIG, setup_logging

    if not PROCESS_LOGGING_CONFIG:
        setup_logging()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"srdiff-run-{time.strftime('%Y%m%d-%H%M%S')}.log"
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    root.addHandler(handler)
    saved = {h: h.formatter for h in _console_handlers()} if quiet else {}
    for h in saved:
        h.setFormatter(WithoutTraceback(h.formatter))
    try:
        yield path
    finally:
        for h, formatter in saved.items():
            h.setFormatter(formatter)
        root.removeHandler(handler)
        handler.close()


def is_user_error(error: BaseException) -> bool:
    """Errors the user causes and fixes (config, catalog, command line, a file they gave)."""
    from srdiff_core.config import ConfigError
    from srdiff_core.restorer import ModelFileMismatch
    from storage.archives import ArchiveError
    from tasks.acquire import DatasetError, DatasetUnavailable
    from tasks.datasets import CatalogError

    if isinstance(error, DatasetUnavailable):  # the network: retrying later may work
        return False
    return isinstance(error, (ConfigError, CatalogError, DatasetError, ArchiveError, ModelFileMismatch))
