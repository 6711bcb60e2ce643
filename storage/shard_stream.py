"""Moving a shard's bytes: source files in, 1 MB blocks out to disk, hashed on the way.

The shard writer (storage.shards) hands webdataset's TarWriter a :class:`ShardStream` as its
file: tar headers, member bytes and padding are copied into reusable 1 MB blocks, and each full
block goes to a side thread that sha256-hashes it (the index's per-shard sha256: every byte is
hashed once, as it is written) and writes it. For a local shard the block is written with
os.write on the descriptor and its writeback started at once (sync_file_range), so the fsync
before the atomic rename waits for the last block only. A second side thread finishes shards
(fsync, rename, sidecar) while the caller reads the next one's sources. None of this is tar:
it is what kept the writer at ~0.8x `tar -cf` (bench/results/shards-cpu.md).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import IO, Any, NamedTuple

from fsspec.implementations.local import LocalFileSystem

from storage import fs
from storage.errors import StaleManifest

COPY_BUFSIZE = 1 << 20


class Member(NamedTuple):
    # A named tuple rather than a frozen dataclass: three per sample are built while a shard is
    # written, and a tuple is built ~3x faster.
    name: str
    size: int
    source: str | None = None  # URL whose bytes are copied verbatim
    data: bytes | None = None  # in-memory bytes (the json member)
    sha256: str | None = None  # expected sha256 of the source bytes (from the manifest)


def local_os_path(url: str) -> str | None:
    """The OS path behind a local URL (plain path or file://), or None for any other URL.

    Local sources and shards are read and written with plain os calls: fsspec's url_to_fs
    and file objects cost ~20 us each per call, as much as reading a 15 kB PNG. The path is
    the one fsspec would use (LocalFileSystem._strip_protocol: "~" expanded, made absolute).
    """
    if "::" in url:  # a chained URL (e.g. simplecache::s3://...): fsspec's business
        return None
    protocol, sep, _ = url.partition("://")
    if not sep and url.startswith("/"):
        return url  # the common case, as _strip_protocol would return it (less ~1 us)
    if sep and protocol not in fs.LOCAL_PROTOCOLS:
        return None
    return LocalFileSystem._strip_protocol(url)


def source_sizes(urls: list[str]) -> dict[str, int]:
    """Byte size of each source URL: os.stat for local files, storage listings otherwise."""
    out: dict[str, int] = {}
    remote = []
    for url in urls:
        path = local_os_path(url)
        if path is None:
            remote.append(url)
        else:
            out[url] = os.stat(path).st_size
    if remote:
        out.update(fs.sizes(remote))
    return out


def member_bytes(member: Member, check_sources: bool = False) -> bytes:
    """A member's bytes: its data, or its source file's, which must have the planned size (and,
    with ``check_sources``, the manifest's sha256)."""
    if member.data is not None:
        return member.data
    path = local_os_path(member.source)
    if path is None:
        filesystem, path = fs.resolve(member.source)
        with filesystem.open(path, "rb") as f:
            data = f.read(member.size + 1)
    else:
        # os-level calls: io.open adds an fstat and a file object per source (~3 us of ~7). One
        # byte more than planned is asked for: a read of a regular file returns less than asked
        # only at its end (or, rarely, early: then the loop reads on), so getting exactly the
        # planned size means the file ends there, in one read.
        fd = os.open(path, os.O_RDONLY)
        try:
            data = os.read(fd, member.size + 1)
            while len(data) < member.size and (more := os.read(fd, member.size + 1 - len(data))):
                data += more
        finally:
            os.close(fd)
    if len(data) != member.size:
        longer = "longer" if len(data) > member.size else "shorter"
        raise StaleManifest(member.source, f"is {longer} than {member.size} bytes")
    if check_sources and member.sha256 and hashlib.sha256(data).hexdigest() != member.sha256:
        raise StaleManifest(member.source, "does not match its manifest sha256")
    return data



def _libc_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's sync_file_range(2) (Linux), or None where there is none."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call.restype = ctypes.c_int
    return call


_SYNC_FILE_RANGE = _libc_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of the range's dirty pages, do not wait

# Spare block buffers, shared by every shard writer of the process (list.pop and append are
# atomic) and kept between calls: at most Side.MAX_PENDING_BLOCKS + 1 per writing thread. A new
# ~1 MB buffer costs a page fault per 4 kB on first touch, more than reading the sources took.
SPARE_BLOCKS: list[memoryview] = []


def _take_block(size: int) -> memoryview:
    while SPARE_BLOCKS:
        try:
            block = SPARE_BLOCKS.pop()
        except IndexError:  # another writer took the last one
            break
        if len(block) == size:  # not one left from a different COPY_BUFSIZE
            return block
    return memoryview(bytearray(size))


class Side:
    """A writer's side threads: one hashes and writes full blocks, one finishes shards, in order.

    The caller hands over each full block and goes on with the next sources (hashing, writing and
    reading release the GIL); at the end of a shard it hands over the finishing too (fsync,
    rename, sidecar), which mostly waits for the disk. At most ``MAX_PENDING_BLOCKS`` blocks
    wait, which bounds memory whatever the shard size; their buffers are reused.
    """

    MAX_PENDING_BLOCKS = 4

    def __init__(self) -> None:
        self.executor = ThreadPoolExecutor(max_workers=1)
        self.finisher = ThreadPoolExecutor(max_workers=1)
        self.blocks: deque[tuple[Future, memoryview]] = deque()

    def __enter__(self) -> Side:
        return self

    def __exit__(self, *exc: object) -> None:
        # Finishing tasks must rename or discard their temporaries: none is cancelled.
        self.executor.shutdown(wait=True)
        self.finisher.shutdown(wait=True)
        self.drain()

    def hand_over(self, buffer: memoryview, fn: Callable[..., None], *args: Any) -> memoryview:
        """Run fn(*args), which reads ``buffer``, on the side thread; a free buffer for the next block."""
        self.blocks.append((self.executor.submit(fn, *args), buffer))
        if len(self.blocks) <= self.MAX_PENDING_BLOCKS:
            return _take_block(len(buffer))
        future, free = self.blocks.popleft()
        try:
            future.result()
        except BaseException:
            SPARE_BLOCKS.append(free)
            raise
        return free

    def finish(self, fn: Callable[..., Any], *args: Any) -> Future:
        """fn(*args) on the finishing thread once every block handed over so far is written."""
        written = self.executor.submit(_nothing)  # done once the blocks before it are
        return self.finisher.submit(_after, written, fn, *args)

    def drain(self) -> None:
        """Wait for every block handed over; their errors are left to the shards' finishing."""
        while self.blocks:
            future, buffer = self.blocks.popleft()
            wait([future])
            SPARE_BLOCKS.append(buffer)


def _nothing() -> None:
    pass


def _after(written: Future, fn: Callable[..., Any], *args: Any) -> Any:
    wait([written])
    return fn(*args)


class ShardStream:
    """The file TarWriter writes one shard to: blocks of ``COPY_BUFSIZE`` handed to a :class:`Side`.

    ``fd``: the local file's descriptor (blocks go out with os.write, no second copy through a
    file object's buffer), or None for a remote file object, which is given a copy of each block.
    """

    def __init__(self, target: IO[bytes], fd: int | None, side: Side):
        self.target, self.fd, self.side, self.sha = target, fd, side, hashlib.sha256()
        self.size = COPY_BUFSIZE  # read once: a block's capacity must not change mid-shard
        self.count = 0  # bytes handed to the side thread
        self.block: memoryview | None = _take_block(self.size)  # None while the side owns it
        self.pos = 0
        self.error: BaseException | None = None  # the first failed block write, if any

    def tell(self) -> int:
        return self.count + self.pos

    def write(self, data: bytes) -> int:
        end = self.pos + len(data)
        if end < self.size:  # the common case: it fits, the block is not full yet
            self.block[self.pos:end] = data
            self.pos = end
            return len(data)
        view = memoryview(data)
        while view:
            n = min(len(view), self.size - self.pos)
            self.block[self.pos:self.pos + n] = view[:n]
            self.pos += n
            view = view[n:]
            if self.pos == self.size:
                self.flush()
        return len(data)

    def write_member(self, header: bytes, data: bytes, padding: bytes) -> None:
        """write() of a member's three parts, in one call for the usual member that fits the block."""
        end = self.pos + len(header) + len(data) + len(padding)
        if end >= self.size:
            for part in (header, data, padding):
                self.write(part)
            return
        pos, block = self.pos, self.block
        block[pos:pos + len(header)] = header
        pos += len(header)
        block[pos:pos + len(data)] = data
        pos += len(data)
        block[pos:end] = padding
        self.pos = end

    def flush(self) -> None:
        if self.pos:
            # The side owns the buffer from here on, even if hand_over fails: no double release.
            full, self.block = self.block, None
            self.block = self.side.hand_over(full, self._write_block, full[:self.pos], self.count)
            self.count += self.pos
            self.pos = 0

    def release(self) -> None:
        """Give the current block's buffer back (once the last block is handed over, or on failure)."""
        if self.block is not None:
            SPARE_BLOCKS.append(self.block)
            self.block = None

    def _write_block(self, block: memoryview, offset: int) -> None:
        if self.error is not None:
            return  # the shard is discarded anyway
        try:
            if self.fd is None:
                # A remote file object may keep what it is given (until a part is uploaded),
                # and this buffer is reused: hand it a copy.
                self.target.write(bytes(block))
            else:
                write_all(self.fd, block)
                if _SYNC_FILE_RANGE is not None:
                    # Only a hint: a failed writeback is fsync's to report.
                    _SYNC_FILE_RANGE(self.fd, offset, len(block), _SYNC_FILE_RANGE_WRITE)
            self.sha.update(block)
        except BaseException as e:
            self.error = e
            raise


def write_all(fd: int, data: memoryview) -> None:
    while data:  # os.write may write less than asked (a signal, a full disk on some systems)
        data = data[os.write(fd, data):]
