"""fsspec URLs in one place: resolve, list, hash, and write atomically.

Every location in the pipeline is a URL understood by fsspec (a plain local path, ``file://``,
``memory://``, ``s3://`` through s3fs, ...). Remote credentials and endpoints come from the
usual places, never from our config: ``AWS_*`` variables for s3fs/botocore, and fsspec's own
``FSSPEC_<PROTOCOL>_<KWARG>`` variables (e.g. ``FSSPEC_S3_ENDPOINT_URL`` for MinIO or moto),
which fsspec reads once at import (fsspec.config.set_conf_env).

Atomic writes: a file is written under a hidden temporary name in its final folder and only
renamed (local: ``os.replace``; remote: ``fs.mv``, a server-side copy on object stores) once it
is complete, so a killed writer never leaves a half file under the final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import fsspec
from fsspec.core import url_to_fs

LOCAL_PROTOCOLS = ("file", "local")
TEMP_SUFFIX = ".tmp"


def resolve(url: str | os.PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a URL; local paths come back absolute."""
    return url_to_fs(os.fspath(url))


def is_local(url: str | os.PathLike) -> bool:
    fs, _ = resolve(url)
    return _fs_is_local(fs)


def _fs_is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return any(p in LOCAL_PROTOCOLS for p in protocols)


def local_path(url: str | os.PathLike) -> Path:
    """The absolute local path behind ``url``; an error for remote URLs."""
    fs, path = resolve(url)
    if not _fs_is_local(fs):
        raise ValueError(f"{url} is not on the local filesystem; copy it locally first or use the "
                         f"storage.fs functions, which accept any fsspec URL")
    return Path(path)


def _to_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    # Local paths stay plain (what users type and what other tools expect); everything else
    # keeps its protocol so the result can be passed straight back to resolve().
    return path if _fs_is_local(fs) else fs.unstrip_protocol(path)


def join(url: str | os.PathLike, *parts: str) -> str:
    """Join path parts onto a URL with "/" (URLs are POSIX-style, whatever the OS)."""
    out = os.fspath(url)
    for part in parts:
        part = part.lstrip("/")
        out = out + part if out.endswith("/") else f"{out}/{part}"
    return out


def exists(url: str | os.PathLike) -> bool:
    fs, path = resolve(url)
    return fs.exists(path)


def read_bytes(url: str | os.PathLike) -> bytes:
    fs, path = resolve(url)
    return fs.cat_file(path)


def listdir(url: str | os.PathLike) -> list[str]:
    """Full URLs of the entries directly inside ``url``, sorted."""
    fs, path = resolve(url)
    return sorted(_to_url(fs, p) for p in fs.ls(path, detail=False))


def glob(url_pattern: str | os.PathLike) -> list[str]:
    """Full URLs matching a glob pattern, sorted."""
    fs, pattern = resolve(url_pattern)
    return sorted(_to_url(fs, p) for p in fs.glob(pattern))


def makedirs(url: str | os.PathLike) -> None:
    fs, path = resolve(url)
    fs.makedirs(path, exist_ok=True)


def remove(url: str | os.PathLike, recursive: bool = False) -> None:
    fs, path = resolve(url)
    fs.rm(path, recursive=recursive)


def sizes(urls: list[str]) -> dict[str, int]:
    """Byte size of each URL, one directory listing per parent folder.

    On object stores one listing answers for up to 1000 keys, where a size() per file would
    be one request each.
    """
    by_parent: dict[str, list[str]] = {}
    for url in urls:
        by_parent.setdefault(url.rstrip("/").rsplit("/", 1)[0], []).append(url)
    out: dict[str, int] = {}
    for parent, members in by_parent.items():
        fs, parent_path = resolve(parent)
        try:
            listed = {p["name"].rstrip("/"): p["size"] for p in fs.ls(parent_path, detail=True)}
        except FileNotFoundError:
            listed = {}
        for url in members:
            _, path = resolve(url)
            size = listed.get(path)
            if size is None:
                # Not in the listing: let size() raise FileNotFoundError naming the path.
                size = fs.size(path)
            out[url] = int(size)
    return out


def _temp_path(path: str) -> str:
    parent, name = posixpath.split(path)
    return posixpath.join(parent, f".{name}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}")


@contextmanager
def atomic_open(url: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open ``url`` for writing; it appears under its name only if the block succeeds.

    On an exception the temporary file is removed and nothing appears under ``url`` (an
    existing file there is left untouched).
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'wb' or 'w', not {mode!r}")
    fs, path = resolve(url)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = _temp_path(path)
    text = {} if "b" in mode else {"encoding": "utf-8"}
    if _fs_is_local(fs):
        with _local_atomic(tmp, path, mode, text) as f:
            yield f
        return
    f = fs.open(tmp, mode, **text)
    try:
        yield f
    except BaseException:
        _discard_remote(fs, f, tmp)
        raise
    f.close()
    fs.mv(tmp, path)


@contextmanager
def _local_atomic(tmp: str, path: str, mode: str, text: dict) -> Iterator[IO]:
    f = open(tmp, mode, **text)
    try:
        yield f
        f.flush()
        # fsync before the rename: otherwise a crash can leave the new name with empty contents.
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
    except BaseException:
        f.close()
        with _suppress_missing():
            os.unlink(tmp)
        raise


def _discard_remote(fs: fsspec.AbstractFileSystem, f: IO, tmp: str) -> None:
    # Closing commits the temporary (fsspec files have no portable abort); it is then removed.
    # Its unique name means a leftover can never be mistaken for the real file.
    try:
        f.close()
    except Exception:
        pass
    with _suppress_missing():
        if fs.exists(tmp):
            fs.rm(tmp)


@contextmanager
def _suppress_missing() -> Iterator[None]:
    try:
        yield
    except FileNotFoundError:
        pass


def atomic_write_bytes(url: str | os.PathLike, data: bytes) -> None:
    with atomic_open(url, "wb") as f:
        f.write(data)


def link_or_write_bytes(url: str | os.PathLike, data: bytes, source: str | os.PathLike) -> bool:
    """Put ``data`` (the exact content of the local file ``source``) at ``url``: a hard link
    when both are on one local filesystem (no second copy of a 9 GB dataset on disk), else an
    atomic write. Either way the name appears only when complete. Returns whether it linked."""
    if is_local(url):
        path = str(local_path(url))
        tmp = _temp_path(path)
        try:
            os.makedirs(posixpath.dirname(path) or ".", exist_ok=True)
            os.link(source, tmp)
            os.replace(tmp, path)
            return True
        except OSError:  # another filesystem (EXDEV), no link support, no permission: copy
            with _suppress_missing():
                os.unlink(tmp)
    atomic_write_bytes(url, data)
    return False


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(url: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file, streamed in ``chunk``-byte reads (memory flat in file size)."""
    fs, path = resolve(url)
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json(url: str | os.PathLike, obj) -> None:
    """Atomic JSON (sorted keys, so equal content gives equal bytes)."""
    atomic_write_bytes(url, json.dumps(obj, indent=1, sort_keys=True).encode())


def read_json(url: str | os.PathLike):
    return json.loads(read_bytes(url))
