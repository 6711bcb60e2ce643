"""The tar side of shards: webdataset's TarWriter for writing, tarfile plus webdataset's grouping
for reading, and the tar arithmetic the planner sizes shards with.

Writing: every sample goes through ``webdataset.TarWriter.write`` (member ``<key>.<ext>`` per
field, in sorted field order), with fixed metadata (mtime 0, uid/gid 0, empty owner names, mode
0o444, PAX format), so the same samples always give the same bytes. One thing is kept here that
neither library does fast enough: tarfile builds each header in ~20 us of Python (TarInfo.tobuf),
and at three members per sample that alone took as long as `tar -cf` takes for the whole job
(bench/results/shards-cpu.md). _ShardTarFile, the TarFile that TarWriter writes through, fills
the header of a usual member (ASCII name of at most 100 bytes, under 8 GiB, our fixed metadata)
into a template of tarfile's own header bytes (~1 us; test_tar_header_is_tarfiles_own_bytes
checks it byte for byte) and leaves every other member to tarfile's addfile.

Reading: tarfile parses the headers, reading forward only (remote shards stream), then
webdataset's group_by_keys makes samples of the members. webdataset's own tar_file_iterator is not
used: tarfile ends quietly at a damaged or cut-off header after the first member, which would
drop the rest of a shard without a word, so here the bytes where tarfile stopped must be the
tar's end marker followed by zeros only (_check_end), or the shard is refused; and its
extractfile reader per member cost as much as the header, where a plain read of the member's
bytes does (tar_files).
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable, Iterator
from functools import cached_property
from typing import IO, Any

import numpy as np
import webdataset as wds
from webdataset.tariterators import group_by_keys

from storage.errors import DamagedShard

BLOCK, RECORD = tarfile.BLOCKSIZE, tarfile.RECORDSIZE
# TarWriter's arguments: fixed metadata, so a rerun (any machine, user or time) gives identical bytes.
FIXED = {"user": "", "group": "", "mode": 0o444, "mtime": 0}
FORMAT, ENCODING = tarfile.PAX_FORMAT, "utf-8"


def _tarinfo_header(name: str, size: int) -> bytes:
    """tarfile's own header bytes for a member with our fixed metadata (PAX records if needed)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o444, "", ""
    return info.tobuf(FORMAT, ENCODING, "surrogateescape")


# The ustar block tarfile writes for an empty name and size 0. Only the name, size and checksum
# fields differ between usual members, so a header is this block with those three filled in.
_TEMPLATE = _tarinfo_header("", 0)
_NAME, _SIZE, _CHKSUM = slice(0, 100), slice(124, 136), slice(148, 156)
# The checksum is the sum of the header's bytes, its own field read as 8 spaces (POSIX ustar).
_TEMPLATE_CHKSUM = (sum(_TEMPLATE) - sum(_TEMPLATE[_NAME]) - sum(_TEMPLATE[_SIZE]) - sum(_TEMPLATE[_CHKSUM])
                    + 8 * ord(" "))
_MAX_USTAR_SIZE = 8 ** 11  # 11 octal digits; larger sizes go in a PAX record
_MODE_TO_UID, _MTIME, _REST = _TEMPLATE[100:124], _TEMPLATE[136:148], _TEMPLATE[156:]


def _one_block(name: str, size: int) -> bool:
    """Whether a member's header is a single ustar block (else tarfile adds PAX records)."""
    return name.isascii() and len(name) <= 100 and 0 <= size < _MAX_USTAR_SIZE


def tar_header(name: str, size: int) -> bytes:
    """The header bytes tarfile (PAX format, our fixed metadata) writes for a regular file."""
    return _usual_header(name, size) if _one_block(name, size) else _tarinfo_header(name, size)


def _usual_header(name: str, size: int) -> bytes:
    """tar_header of a member whose header is one block (_one_block), from the template."""
    name_bytes, size_bytes = name.encode("ascii"), b"%011o\0" % size  # tarfile.itn
    chksum = _TEMPLATE_CHKSUM + sum(name_bytes) + sum(size_bytes)
    # tarfile writes the checksum as "%06o\0" and keeps the field's last space.
    return b"".join((name_bytes.ljust(100, b"\0"), _MODE_TO_UID, size_bytes, _MTIME, b"%06o\0 " % chksum, _REST))


def padded(n: int, block: int = BLOCK) -> int:
    return -(-n // block) * block


def member_tar_size(name: str, size: int) -> int:
    """Bytes a member takes in a tar: its header (one block unless PAX records), data, padding."""
    return (BLOCK if _one_block(name, size) else len(_tarinfo_header(name, size))) + padded(size)


def tar_size(members_bytes: int) -> int:
    """Bytes of a finished tar: two zero end blocks, then padding to a whole record (tarfile's close)."""
    return padded(members_bytes + 2 * BLOCK, RECORD)


def needs_pax(name_lengths: np.ndarray, data_sizes: np.ndarray) -> np.ndarray:
    """Which members' headers are not single ustar blocks (names past 100 bytes, sizes past 8 GiB)."""
    return (name_lengths > 100) | (data_sizes >= _MAX_USTAR_SIZE)


# ---------------------------------------------------------------------------------------------
# Writing.

_PADDING = tuple(bytes(n) for n in range(BLOCK))  # zero fill after member data
_FIXED_INFO = (0, 0o444, 0, 0, "", "", tarfile.REGTYPE, "")  # mtime, mode, uid, gid, uname, gname, type, link


class _ShardTarFile(tarfile.TarFile):
    """The TarFile TarWriter writes through: tarfile's own, but a usual member's header is
    filled into a template of tarfile's bytes (tar_header) rather than built by TarInfo.tobuf."""

    def addfile(self, tarinfo: tarfile.TarInfo, fileobj: IO[bytes] | None = None) -> None:
        name, size = tarinfo.name, tarinfo.size
        if (fileobj is None or not _one_block(name, size) or tarinfo.pax_headers
                or (tarinfo.mtime, tarinfo.mode, tarinfo.uid, tarinfo.gid, tarinfo.uname, tarinfo.gname,
                    tarinfo.type, tarinfo.linkname) != _FIXED_INFO):
            return super().addfile(tarinfo, fileobj)
        self._check("awx")
        data = fileobj.read(size)  # TarWriter's BytesIO: its bytes object itself, not a copy
        if len(data) != size:
            raise OSError(f"{name}: {len(data)} bytes for a member of {size}")
        padding = _PADDING[-size % BLOCK]
        self._write_member(_usual_header(name, size), data, padding)
        self.offset += BLOCK + size + len(padding)

    @cached_property
    def _write_member(self) -> Callable[[bytes, bytes, bytes], None]:
        """Write a member's header, data and padding: storage.shard_stream.ShardStream's
        write_member (one call for the three), else three writes."""
        write_member = getattr(self.fileobj, "write_member", None)
        if write_member is not None:
            return write_member

        def write_parts(*parts: bytes) -> None:
            for part in parts:
                self.fileobj.write(part)
        return write_parts


def tar_writer(stream: IO[bytes]) -> wds.TarWriter:
    """webdataset's TarWriter on ``stream`` with our fixed metadata, writing through _ShardTarFile.

    Close it (which writes the end blocks) only when every sample is written: a failed shard is
    discarded, never finished."""
    writer = wds.TarWriter(stream, encoder=False, format="PAX_FORMAT", **FIXED)
    # TarWriter opened a stock tarfile on the stream ("w|"), which has written nothing and writes
    # nothing when dropped (its buffer is empty); ours takes its place, in the same format.
    writer.tarstream = _ShardTarFile(fileobj=stream, mode="w", format=FORMAT, encoding=ENCODING)
    return writer


# ---------------------------------------------------------------------------------------------
# Reading.

class Recording(io.RawIOBase):
    """A shard's file as tarfile reads it, forward only: counted, optionally hashed (every byte,
    skipped ones included), the last read kept (the block where tarfile stopped, for _check_end)."""

    def __init__(self, source: IO[bytes], sha: Any = None):
        self.source, self.sha, self.count = source, sha, 0
        self.last = (0, b"")  # (offset, bytes) of the last read

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.count

    def read(self, n: int = -1) -> bytes:
        data = self.source.read(n)
        if self.sha is not None:
            self.sha.update(data)
        self.last = (self.count, data)
        self.count += len(data)
        return data

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Forward only (tarfile skips member padding): the bytes skipped are read, and hashed."""
        if whence != io.SEEK_SET or offset < self.count:
            raise io.UnsupportedOperation(f"Recording seeks forward only, not from {self.count} to {offset}")
        while self.count < offset and self.read(min(offset - self.count, 1 << 20)):
            pass
        return self.count


def tar_files(stream: Recording, url: str) -> Iterator[dict]:
    """{"fname", "data", "__url__"} of each regular member, as webdataset's tar_file_iterator
    gives them, then the check that the tar ends properly (_check_end).

    tarfile parses every header (PAX records included); a member's bytes are then read straight
    from the file, where tarfile left it (its data offset), rather than through tarfile's
    extractfile, whose reader per member took as long as parsing the header.
    """
    try:
        tar = tarfile.open(fileobj=stream, mode="r:", encoding=ENCODING)
        for info in tar:
            if info.isreg():
                data = stream.read(info.size)
                if len(data) != info.size:
                    raise tarfile.ReadError("unexpected end of data")
                stream.read(-info.size % BLOCK)  # the padding: tarfile then finds the next header here
                yield {"fname": info.name, "data": data, "__url__": url}
            tar.members = []  # as webdataset: no list of every member read
        end = tar.offset
    except tarfile.ReadError as e:
        if "unexpected end of data" in str(e):
            raise DamagedShard(url, "ends in the middle of a tar member (truncated)") from None
        raise DamagedShard(url, f"damaged tar header ({e})") from None
    _check_end(stream, end, url)


def _check_end(stream: Recording, end: int, url: str) -> None:
    """From ``end``, where tarfile stopped reading members, to the end of the file: a zero block,
    a second one, then only zero padding. Anything else is a damaged or cut-off shard."""
    start, tail = stream.last  # tarfile's last read: the block at ``end``, or what is left of it
    if start + len(tail) != stream.count or start > end:
        raise AssertionError(f"{url}: tarfile stopped at {end}, but its last read was at {start}")
    tail = tail[end - start:] if start < end else tail
    while len(tail) < 2 * BLOCK and (more := stream.read(RECORD)):
        tail += more
    header = tail[:BLOCK]
    if len(header) < BLOCK or header.count(0) == BLOCK and len(tail) < 2 * BLOCK:
        raise DamagedShard(url, "no tar end marker (truncated)")
    if header.count(0) != BLOCK:
        try:
            tarfile.TarInfo.frombuf(header, ENCODING, "surrogateescape")
            why = "a header tarfile did not read"
        except tarfile.HeaderError as e:
            why = str(e)
        raise DamagedShard(url, f"damaged tar header ({why})")
    rest = tail[BLOCK:]
    while rest:
        if rest.count(0) != len(rest):
            raise DamagedShard(url, "data after the tar end marker")
        rest = stream.read(1 << 20)


# A sample's fields: TarWriter writes them in sorted order, each a member <key>.<field>.
FIELDS = ("gt.png", "json", "lq.png")


def tar_samples(stream: Recording, url: str) -> Iterator[dict]:
    """webdataset samples ({"__key__", "__url__", "gt.png", "json", "lq.png"}) of one shard, each
    checked to have all three members."""
    for sample in group_by_keys(tar_files(stream, url)):
        missing = [p for p in FIELDS if p not in sample]
        if missing:
            raise DamagedShard(url, f"sample '{sample['__key__']}' lacks {missing}")
        yield sample
