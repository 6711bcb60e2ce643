"""Fetch dataset files over the network: plain HTTP(S) through fsspec (resumable, bounded retries
with backoff), Google Drive files and folders through gdown, Hugging Face Hub datasets through
huggingface_hub; and sha256 verification that keeps a mismatching file aside.

Every fetcher raises :class:`FetchError` with a message a user can act on; callers try the next
source on it. Nothing here knows about datasets or layouts.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import fsspec
from tqdm.auto import tqdm

HTTP_CHUNK = 16 << 20  # one Range request per chunk: a dropped connection costs at most this much


class FetchError(RuntimeError):
    """This source cannot deliver the file now; try the next one."""


class Unreachable(FetchError):
    """The source could not be reached or kept dropping the connection: worth retrying later
    (unlike a 404, a checksum mismatch or a quota page)."""


class ChecksumError(FetchError):
    """The file arrived but its sha256 differs from the expected one."""


def sha256_path(path: str | os.PathLike, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_sha256(path: Path, expected: str | None) -> str:
    """The file's sha256. On a mismatch the file is moved aside (never used, never deleted) and
    :class:`ChecksumError` names both digests."""
    actual = sha256_path(path)
    if expected and actual != expected.lower():
        aside = path.with_name(path.name + ".sha256-mismatch")
        os.replace(path, aside)
        raise ChecksumError(f"{path.name}: sha256 is {actual} but {expected} was expected; the file is kept "
                            f"aside at {aside} and not used (a changed mirror or a corrupt download)")
    return actual


class ByteProgress:
    """A tqdm bar with bytes and rate, plus a log line every ``every_s`` seconds for the Prefect UI."""

    def __init__(self, name: str, total: int | None, initial: int, log: logging.Logger | None,
                 every_s: float = 10.0):
        self.name, self.total, self.log, self.every_s = name, total, log, every_s
        self.bar = tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024,
                        desc=name, leave=False, mininterval=1.0)
        self.done, self.start_done = initial, initial
        self.start = self.last = time.perf_counter()

    def update(self, n: int) -> None:
        self.bar.update(n)
        self.done += n
        now = time.perf_counter()
        if self.log and now - self.last >= self.every_s:
            self.last = now
            self.log.info(self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.perf_counter()) - self.start, 1e-9)
        rate = (self.done - self.start_done) / elapsed / 2**20
        of = f" of {self.total / 2**20:.1f}" if self.total else ""
        return f"{self.name}: {self.done / 2**20:.1f}{of} MiB ({rate:.1f} MiB/s)"

    def close(self) -> None:
        self.bar.close()
        if self.log:
            self.log.info(self.line())


def _http_filesystem():
    # A fresh instance per fetch: fsspec caches filesystems (and their aiohttp sessions) per
    # argument set, and a session bound to a dead event loop would break the retry.
    return fsspec.filesystem("http", skip_instance_cache=True)


def _http_fetch_once(url: str, part: Path, chunk: int, log, use_ranges: bool = True) -> None:
    """Append the missing bytes of ``url`` to ``part``: resuming from its size with Range
    requests when the server announces a size, else streaming from the start."""
    http = _http_filesystem()
    info = http.info(url)
    size = info.get("size")
    offset = part.stat().st_size if part.exists() else 0
    if size is None or not use_ranges or offset > size or not _same_remote_file(part, info, log):
        offset = 0  # no size, no ranges, or the file on the server changed since the partial download
    progress = ByteProgress(part.name.removesuffix(".part"), size, offset, log)
    try:
        if size is not None and use_ranges:
            _copy_ranges(http, url, part, offset, size, chunk, progress)
        else:
            with http.open(url, "rb", block_size=0) as src, open(part, "wb") as out:
                while data := src.read(chunk):
                    out.write(data)
                    progress.update(len(data))
    finally:
        progress.close()


def _validator_file(part: Path) -> Path:
    return part.with_name(part.name + ".validator")


def _same_remote_file(part: Path, info: dict, log) -> bool:
    """Whether the bytes in ``part`` came from the file the server has now (ETag or
    Last-Modified); records the current validator for the next resume."""
    current = info.get("ETag") or info.get("Last-Modified")
    record = _validator_file(part)
    previous = record.read_text() if record.exists() else None
    if current:
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(current)
    same = previous is None or current is None or previous == current
    if not same and part.exists() and log:
        log.warning(f"{part.name}: the file on the server changed ({previous} -> {current}); starting over")
    return same


def _copy_ranges(http, url: str, part: Path, offset: int, size: int, chunk: int, progress: ByteProgress) -> None:
    with http.open(url, "rb", block_size=chunk, cache_type="none") as src, open(part, "ab") as out:
        out.truncate(offset)
        src.seek(offset)
        while offset < size and (data := src.read(min(chunk, size - offset))):
            out.write(data)  # whole chunks only: the file on disk is always a prefix
            out.flush()
            offset += len(data)
            progress.update(len(data))
    if offset != size:
        raise OSError(f"server sent {offset} of {size} bytes")


def _no_range_support(e: Exception) -> bool:
    # fsspec's words when a server answers a Range request with the whole file.
    return isinstance(e, ValueError) and "support range requests" in str(e)


def fetch_http(url: str, dest: Path, *, retries: int = 4, backoff_s: float = 2.0, chunk: int | None = None,
               log: logging.Logger | None = None, sleep: Callable[[float], None] = time.sleep) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part``; a killed or dropped download resumes
    from the bytes already on disk. Retries transient errors ``retries`` times with exponential
    backoff; a 404 is not retried."""
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    use_ranges = True
    for attempt in range(retries + 1):
        try:
            try:
                _http_fetch_once(url, part, chunk or HTTP_CHUNK, log, use_ranges)
            except Exception as e:
                if not (use_ranges and _no_range_support(e)):
                    raise
                if log:
                    log.warning(f"{url}: the server ignores Range requests; downloading from the start "
                                "(an interrupted download cannot resume from this server)")
                use_ranges = False
                _http_fetch_once(url, part, chunk or HTTP_CHUNK, log, use_ranges)
            _reject_web_page(part, url)
            os.replace(part, dest)
            _validator_file(part).unlink(missing_ok=True)
            return dest
        except FetchError:
            raise
        except FileNotFoundError as e:
            status = getattr(e.__cause__, "status", None)
            if status is not None:  # the server answered: retrying will not help
                raise FetchError(f"{url}: HTTP {status} {getattr(e.__cause__, 'message', '')}".rstrip()) from e
            reason = e.__cause__ or e  # fsspec reports an unreachable host as FileNotFoundError too
            if attempt == retries:
                raise Unreachable(f"{url}: unreachable ({type(reason).__name__}: {reason}) after "
                                 f"{retries + 1} attempts") from e
            _wait(log, url, reason, part, attempt, retries, backoff_s, sleep)
        except Exception as e:  # aiohttp/fsspec raise many types for resets, timeouts and refusals
            have = part.stat().st_size if part.exists() else 0
            if attempt == retries:
                raise Unreachable(f"{url}: {type(e).__name__}: {e} (after {retries + 1} attempts; "
                                 f"{have} bytes kept in {part}, a rerun resumes from there)") from e
            _wait(log, url, e, part, attempt, retries, backoff_s, sleep)
    raise AssertionError("unreachable")


def _wait(log, url: str, error: BaseException, part: Path, attempt: int, retries: int, backoff_s: float,
          sleep: Callable[[float], None]) -> None:
    """Exponential backoff between attempts, with a visible line saying why."""
    wait = backoff_s * 2 ** attempt
    have = part.stat().st_size if part.exists() else 0
    if log:
        log.warning(f"{url}: {type(error).__name__}: {error}; retrying in {wait:.1f} s "
                    f"({have} bytes on disk, attempt {attempt + 2} of {retries + 1})")
    sleep(wait)


GDRIVE = "https://drive.google.com"


@contextmanager
def _gdrive_errors(what: str) -> Iterator[None]:
    """gdown's errors as FetchError: a quota or permission page says what to do, a connection
    failure is :class:`Unreachable` (worth a later retry)."""
    import gdown
    import requests
    try:
        yield
    except gdown.exceptions.FileURLRetrievalError as e:
        raise FetchError(f"Google Drive refused {what} (download quota exceeded or not public): "
                         f"{_first_line(e)}. Wait a day, or download it in a browser and pass --from") from e
    except (gdown.exceptions.DownloadError, requests.RequestException, OSError) as e:
        kind = Unreachable if _connection_failure(e) else FetchError
        raise kind(f"{what}: {type(e).__name__}: {_first_line(e)}") from e


def fetch_gdrive(file_id: str, dest: Path, *, endpoint: str | None = None, retries: int = 4) -> Path:
    """A Google Drive file through gdown (resumable). Quota and permission pages become a
    :class:`FetchError` that says what to do."""
    import gdown
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    url = f"{(endpoint or GDRIVE).rstrip('/')}/uc?id={file_id}"
    with _gdrive_errors(f"Google Drive file {file_id}"):
        out = gdown.download(url=url, output=str(dest), quiet=False, resume=True, retries=retries)
    if out is None or not dest.exists():
        raise FetchError(f"Google Drive file {file_id}: gdown returned without a file")
    _reject_web_page(dest, f"Google Drive file {file_id}")
    return dest


def web_page_reason(path: Path) -> str | None:
    """The message of an HTML page saved in place of a file (Drive's quota page, a login or
    error page), or None when the file is not a web page."""
    with open(path, "rb") as f:
        head = f.read(64 << 10)
    if not head.lstrip()[:15].lower().startswith((b"<!doctype html", b"<html")):
        return None
    text = head.decode("utf-8", "replace")
    match = re.search(r'class="uc-error-subcaption">(.*?)<', text, re.S) or re.search(r"<title>(.*?)</title>", text, re.S)
    return " ".join(match.group(1).split()) if match else "an HTML page"


def _reject_web_page(path: Path, what: str) -> None:
    """A server that answers with a web page (Drive's quota page, a login wall) must not have
    it taken for the archive: remove it and report the page's own message."""
    reason = web_page_reason(path)
    if reason is None:
        return
    path.unlink()
    raise FetchError(f"{what}: the server sent a web page instead of the file ({reason}); for Google Drive "
                     "the download quota may be exceeded or the file not public. Wait a day, or download it "
                     "in a browser and pass --from")


def fetch_gdrive_folder(folder_id: str, dest_dir: Path, *, endpoint: str | None = None, retries: int = 4) -> Path:
    """A Google Drive folder through gdown (files already complete are kept on a rerun)."""
    import gdown
    if _is_complete(dest_dir):
        return dest_dir
    dest_dir.mkdir(parents=True, exist_ok=True)
    kwargs = {"url": f"{endpoint.rstrip('/')}/drive/folders/{folder_id}"} if endpoint else {"id": folder_id}
    with _gdrive_errors(f"Google Drive folder {folder_id}"):
        files = gdown.download_folder(**kwargs, output=str(dest_dir), quiet=False, resume=True, retries=retries)
    if not files:
        raise FetchError(f"Google Drive folder {folder_id}: no files downloaded")
    _mark_complete(dest_dir)
    return dest_dir


def fetch_hf_file(repo: str, filename: str, dest_dir: Path, *, endpoint: str | None = None,
                  revision: str | None = None) -> Path:
    """One file of a Hugging Face Hub dataset repo (the hub client resumes partial files)."""
    from huggingface_hub import hf_hub_download
    _refuse_offline(f"Hugging Face dataset {repo} file {filename}")
    try:
        return Path(hf_hub_download(repo, filename, repo_type="dataset", revision=revision,
                                    local_dir=dest_dir, endpoint=endpoint))
    except Exception as e:  # 404, gated repo, connection errors: all mean "next source"
        kind = Unreachable if _connection_failure(e) else FetchError
        raise kind(f"Hugging Face dataset {repo} file {filename}: {type(e).__name__}: {_first_line(e)}") from e


def fetch_hf_dataset(repo: str, dest_dir: Path, *, endpoint: str | None = None,
                     revision: str | None = None) -> Path:
    """A whole Hugging Face Hub dataset repo as a folder. Only a folder that an online
    snapshot completed is used (offline, the hub client would hand back a partial one)."""
    from huggingface_hub import snapshot_download
    if _is_complete(dest_dir):
        return dest_dir
    _refuse_offline(f"Hugging Face dataset {repo}")
    try:
        path = Path(snapshot_download(repo, repo_type="dataset", revision=revision, local_dir=dest_dir,
                                      endpoint=endpoint))
    except Exception as e:
        kind = Unreachable if _connection_failure(e) else FetchError
        raise kind(f"Hugging Face dataset {repo}: {type(e).__name__}: {_first_line(e)}") from e
    _mark_complete(path)
    return path


def _refuse_offline(what: str) -> None:
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        raise FetchError(f"{what}: HF_HUB_OFFLINE is set, so the hub is not contacted (unset it, or pass --from)")


COMPLETE = ".srdiff-complete"  # written into a fetched folder once every file of it is there


def _is_complete(folder: Path) -> bool:
    return (folder / COMPLETE).exists()


def _mark_complete(folder: Path) -> None:
    (folder / COMPLETE).write_text("complete\n")


def _connection_failure(e: BaseException) -> bool:
    """Whether a client library's error comes from not reaching the server (DNS, refused,
    reset, timeout), looking through the exception chain."""
    seen = 0
    while e is not None and seen < 10:
        name = type(e).__name__
        if isinstance(e, (ConnectionError, TimeoutError)) or "Connect" in name or "Timeout" in name:
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
