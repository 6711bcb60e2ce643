"""Safe extraction of zip and tar archives from untrusted sources.

Dataset archives come from mirrors we do not control. Extraction therefore refuses absolute
paths, ``..`` components, links and devices that point outside the target, and stops at a cap on
the total uncompressed size and on the number of members (zip bombs). It writes into a
``<target>.partial`` folder and renames it to ``<target>`` only when every member is out, so a
killed extraction is redone cleanly on the next run and never half-used.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import shutil
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

_COPY_CHUNK = 1 << 20
# Folders that archivers add beside the real content (macOS resource forks).
JUNK_PARTS = ("__MACOSX",)


class ArchiveError(ValueError):
    """The archive is truncated, corrupt or not an archive."""


class UnsafeArchiveError(ArchiveError):
    """The archive tries to write outside its target (or through a link, or a device)."""


class ArchiveUnsupported(ArchiveError):
    """A sound archive that Python cannot unpack (Deflate64, encryption, name clashes)."""


class ArchiveTooLarge(UnsafeArchiveError):
    """The archive exceeds the size or member-count cap (zip bomb, or a cap set too low).

    ``limit`` names the cap that was hit: the :class:`Limits` field ("max_files" or "max_bytes"),
    ``cap`` its value; the caller, which knows where the cap came from, says how to raise it."""

    def __init__(self, message: str, *, archive: Path | None = None, limit: str = "", cap: int = 0):
        super().__init__(message)
        self.archive, self.limit, self.cap = archive, limit, cap


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 64 << 30      # total uncompressed bytes
    max_files: int = 500_000       # members (files, folders, links)


def archive_kind(path: str | os.PathLike) -> str | None:
    """"zip", "tar" (any compression tarfile reads) or None, from the content, not the name."""
    path = Path(path)
    if not path.is_file():
        return None
    if zipfile.is_zipfile(path):
        return "zip"
    try:
        return "tar" if tarfile.is_tarfile(path) else None
    except (OSError, tarfile.TarError, EOFError):
        return None


def looks_like_archive(path: str | os.PathLike) -> bool:
    """By name: used to refuse a truncated archive that the content check no longer recognises."""
    name = Path(path).name.lower()
    return name.endswith((".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz"))


def member_names(path: str | os.PathLike) -> list[str]:
    """Member names without extracting (used to recognise which dataset an archive holds)."""
    kind = archive_kind(path)
    if kind == "zip":
        with zipfile.ZipFile(path) as zf:
            return zf.namelist()
    if kind == "tar":
        with tarfile.open(path) as tf:
            return tf.getnames()
    raise ArchiveError(f"{path} is not a zip or tar archive")


def safe_extract(archive: str | os.PathLike, target: str | os.PathLike, limits: Limits = Limits()) -> Path:
    """Extract ``archive`` into the folder ``target`` (which must not exist yet) and return it."""
    archive, target = Path(archive), Path(target)
    kind = archive_kind(archive)
    if kind is None:
        raise ArchiveError(f"{archive} is truncated or corrupt (not a readable zip or tar archive)")
    partial = target.with_name(target.name + ".partial")
    if partial.exists():  # left by a killed run: never reuse half an extraction
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    try:
        (_extract_zip if kind == "zip" else _extract_tar)(archive, partial, limits)
    except ArchiveError:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile) as e:
        shutil.rmtree(partial, ignore_errors=True)
        raise ArchiveError(f"{archive} is truncated or corrupt ({type(e).__name__}: {e})") from e
    except (NotImplementedError, RuntimeError, OSError) as e:
        # Deflate64 (Windows' zip for large files), encrypted members, a file and a folder of
        # the same name: the archive is fine but Python cannot unpack it as it is.
        shutil.rmtree(partial, ignore_errors=True)
        raise ArchiveUnsupported(f"{archive} cannot be extracted here ({type(e).__name__}: {e}); extract it with "
                           "7-Zip or unzip and pass the folder with --from DATASET=FOLDER") from e
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    os.replace(partial, target)
    return target


def remove_tree(path: Path) -> None:
    """Delete a folder so that a kill half way never leaves something that looks complete:
    rename it first (atomic), then delete the renamed copy."""
    if not path.exists():
        return
    doomed = path.with_name(f"{path.name}.deleting-{os.getpid()}")
    os.replace(path, doomed)
    shutil.rmtree(doomed)


def _checked_relative(name: str, archive: Path) -> PurePosixPath:
    """The member's path relative to the target, or UnsafeArchiveError (zip-slip)."""
    posix = name.replace("\\", "/")
    parts = PurePosixPath(posix).parts
    if posix.startswith("/") or (parts and len(parts[0]) == 2 and parts[0][1] == ":"):
        raise UnsafeArchiveError(f"{archive}: member {name!r} has an absolute path; refusing to extract "
                                 "this archive (get it from another source)")
    if ".." in parts:
        raise UnsafeArchiveError(f"{archive}: member {name!r} escapes the target with '..'; refusing to "
                                 "extract this archive (get it from another source)")
    return PurePosixPath(*[p for p in parts if p not in ("", ".")])


class _Budget:
    """Counts members and bytes against the caps while extracting."""

    def __init__(self, archive: Path, limits: Limits):
        self.archive, self.limits, self.files, self.bytes = archive, limits, 0, 0

    def member(self) -> None:
        self.files += 1
        if self.files > self.limits.max_files:
            raise ArchiveTooLarge(f"{self.archive} has more than {self.limits.max_files} members; refusing to extract",
                                  archive=self.archive, limit="max_files", cap=self.limits.max_files)

    def add(self, n: int) -> None:
        self.bytes += n
        if self.bytes > self.limits.max_bytes:
            raise ArchiveTooLarge(f"{self.archive} expands to more than {self.limits.max_bytes} bytes; refusing to "
                                  f"extract", archive=self.archive, limit="max_bytes", cap=self.limits.max_bytes)


def _extract_zip(archive: Path, target: Path, limits: Limits) -> None:
    budget = _Budget(archive, limits)
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            budget.member()
            rel = _checked_relative(info.filename, archive)
            if not rel.parts:
                continue
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                _check_zip_link(zf, info, rel, archive)
                continue  # links inside the target are harmless but never needed by an image dataset
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
                raise UnsafeArchiveError(f"{archive}: member {info.filename!r} is a device or pipe")
            dest = target.joinpath(*rel.parts)
            if info.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            # Count the bytes actually inflated: the sizes in a zip header can lie.
            with zf.open(info) as src, open(dest, "wb") as out:
                while chunk := src.read(_COPY_CHUNK):
                    budget.add(len(chunk))
                    out.write(chunk)


def _check_zip_link(zf: zipfile.ZipFile, info: zipfile.ZipInfo, rel: PurePosixPath, archive: Path) -> None:
    link_target = zf.read(info).decode("utf-8", "replace")
    resolved = PurePosixPath(*rel.parts[:-1], link_target)
    if link_target.startswith("/") or ".." in _normalised_parts(resolved):
        raise UnsafeArchiveError(f"{archive}: link {info.filename!r} -> {link_target!r} points outside "
                                 "the target; refusing to extract this archive")


def _normalised_parts(path: PurePosixPath) -> list[str]:
    """Resolve '..' lexically; a leading '..' that survives means the path leaves the root."""
    out: list[str] = []
    for part in path.parts:
        if part == "..":
            if out and out[-1] != "..":
                out.pop()
            else:
                out.append("..")
        elif part not in ("", "."):
            out.append(part)
    return out


def _extract_tar(archive: Path, target: Path, limits: Limits) -> None:
    """Regular files and folders only, written by us: links are never created (so nothing can
    be written through one, whatever chain of links the archive holds), devices are refused."""
    budget = _Budget(archive, limits)
    with tarfile.open(archive) as tf:
        for member in tf:  # one pass, members checked as they come
            budget.member()
            rel = _checked_relative(member.name, archive)
            if not rel.parts:
                continue
            if member.issym() or member.islnk():
                _check_tar_link(member, rel, archive)
                continue  # an image dataset never needs links; following them is how escapes happen
            if not (member.isfile() or member.isdir()):
                raise UnsafeArchiveError(f"{archive}: member {member.name!r} is a device, pipe or other "
                                         "special file; refusing to extract this archive")
            dest = target.joinpath(*rel.parts)
            if member.isdir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            budget.add(member.size)  # tar headers hold the real sizes
            dest.parent.mkdir(parents=True, exist_ok=True)
            with tf.extractfile(member) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, _COPY_CHUNK)
    _verify_compressed_stream(archive)


def _check_tar_link(member: tarfile.TarInfo, rel: PurePosixPath, archive: Path) -> None:
    base = rel.parts[:-1] if member.issym() else ()  # hard link targets are archive-relative
    if member.linkname.startswith("/") or ".." in _normalised_parts(PurePosixPath(*base, member.linkname)):
        raise UnsafeArchiveError(f"{archive}: link {member.name!r} -> {member.linkname!r} points outside the "
                                 "target; refusing to extract this archive (get it from another source)")


def _verify_compressed_stream(archive: Path) -> None:
    """tarfile stops at the end-of-archive marker and never reads a gzip/bz2/xz trailer, so a
    corrupted member would go unnoticed: decompress the whole stream once to check its CRC."""
    with open(archive, "rb") as f:
        magic = f.read(6)
    opener = (gzip.open if magic.startswith(b"\x1f\x8b") else bz2.open if magic.startswith(b"BZh")
              else lzma.open if magic.startswith(b"\xfd7zXZ\x00") else None)
    if opener is None:
        return
    with opener(archive, "rb") as stream:
        while stream.read(_COPY_CHUNK):
            pass


def content_files(root: str | os.PathLike) -> list[Path]:
    """Every regular file under ``root``, sorted, without archiver junk (``__MACOSX``, ``._*``)
    or hidden folders (a Hugging Face download keeps its bookkeeping in ``.cache/``)."""
    files, root = [], Path(root)
    for path in root.rglob("*"):
        rel = path.relative_to(root).parts
        if any(p in JUNK_PARTS or p.startswith(".") for p in rel[:-1]) or path.name.startswith("._"):
            continue
        if path.is_file():
            files.append(path)
    return sorted(files)
