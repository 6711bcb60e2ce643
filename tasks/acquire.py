"""One real dataset from its sources (or the user's ``--from`` paths) to the seed layout:
fetch -> verify sha256 -> extract safely -> pair by id -> decode, check, write -> per-dataset table.

Each finished dataset leaves ``manifests/datasets/<name>.parquet`` (its rows), a quarantine
table and, written last, ``<name>.json``: the record of what produced it (its catalog entry, the
settings that shape its files, where its files came from). Later runs reuse it whatever its
origin, ``--from`` or a source, so a run without ``--from`` never goes to the network for a
dataset a ``--from`` run prepared; only ``--refresh download``, a changed catalog entry, other
``--from`` files or settings normalise it again (see :func:`plan`). Downloads resume from their
``.part`` file, extraction restarts from the archive, so a kill at any point loses little.
"""

from __future__ import annotations

import lzma
import os
import tarfile
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from srdiff_core.config import Config, DownloadConfig
from storage import archives, fetch, fs, tables
from tasks import closure, common, datasets, normalise
from tasks.common import RateLogger

QUARANTINE_SCHEMA = pa.schema([("id", pa.string()), ("dataset", pa.string()), ("split", pa.string()),
                               ("degradation", pa.string()), ("path", pa.string()), ("reason", pa.string())])
ROWS_SCHEMA = tables.PAIRS_SCHEMA.append(pa.field("note", pa.string()))


class DatasetError(RuntimeError):
    """This dataset cannot be prepared; the message says what to do."""


class DatasetUnavailable(DatasetError):
    """No source could deliver a file: the network kind of failure, worth retrying later."""


class BadInput(DatasetError):
    """Something the user gave cannot be used (a ``--from`` path that does not exist, is no
    archive, or holds another dataset): found before any download, and never worth a retry."""


@dataclass
class Prepared:
    name: str
    rows: list[dict]                 # PAIRS_SCHEMA + note
    quarantine: list[dict]
    # Where its files came from: {"kind": "--from"|"sources", "files": [{"path"|"name", "source", "sha256"}]}
    origin: dict = field(default_factory=dict)
    reused: bool = False
    marker: dict = field(default_factory=dict)  # the record it was reused from (reused only)


# --- where things go ---------------------------------------------------------------------------

def work_dir(cfg: Config) -> Path:
    if cfg.download.work_dir:
        return Path(cfg.download.work_dir)
    root = common.path(cfg, "downloads")
    if not fs.is_local(root):
        raise DatasetError(f"data_root {cfg.data_root} is not a local disk, but downloads and extraction need "
                           "one: set download.work_dir to a local folder")
    return fs.local_path(root)


def _table_url(cfg: Config, name: str, suffix: str) -> str:
    return common.path(cfg, "manifests", "datasets", f"{name}{suffix}")


MARKER_VERSION = 2  # records of version 1 (a fingerprint only) cannot tell what changed: redone once


def entry_digest(spec: datasets.DatasetSpec) -> str:
    """The dataset's catalog entry (sources, digests, layout, counts): a change renormalises it."""
    return common.sha256_json(spec.model_dump(mode="json"))


def shaping_settings(cfg: Config, spec: datasets.DatasetSpec) -> dict:
    """The settings besides the catalog entry that change a dataset's normalised files (the rows
    hold absolute paths under data_root). allow_partial does not: it only judges the counts."""
    out = {"data_root": common.data_root(cfg)}
    if spec.layout == "gopro":
        out["gopro_lq_folder"] = cfg.download.gopro_lq_folder
    return out


def code_digest() -> str:
    """This module and every project module it can run: recorded, so a reused dataset made by
    other code can say so, but never a reason to refetch by itself."""
    return closure.cached_code_digest((__name__,))


def from_identity(paths: list[str]) -> list:
    return [_path_identity(Path(p)) for p in paths]


def _path_identity(path: Path) -> list:
    """A --from path by name, size and modification time (a replaced archive is noticed
    without hashing gigabytes on every run)."""
    path = path.expanduser()
    if not path.exists():
        return [str(path), None]
    files = [path] if path.is_file() else archives.content_files(path)
    return [str(path), [[str(f.relative_to(path)) if f != path else "", f.stat().st_size, f.stat().st_mtime_ns]
                        for f in files]]  # lists, not tuples: compared with the JSON record as read back


_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path, known: str | None = None) -> str:
    """sha256 of a file, computed once per (path, size, mtime): a 9 GB archive is hashed when
    verified and would be again to name its extraction folder."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if known is not None:
        _DIGESTS[key] = known
    if key not in _DIGESTS:
        _DIGESTS[key] = fetch.sha256_path(path)
    return _DIGESTS[key]


# --- fetching ------------------------------------------------------------------------------------

def _source_slug(source: datasets.Source) -> str:
    """Each source gets its own folder: two mirrors' partial files must never be mixed."""
    where = source.model_dump(mode="json", exclude={"sha256"})  # adding a digest must not refetch
    return f"{source.kind}-{common.sha256_json(where)[:12]}"


def fetch_from_source(source: datasets.Source, name: str, dest_dir: Path, dl: DownloadConfig, log) -> Path:
    dest_dir = dest_dir / _source_slug(source)
    if source.kind == "http":
        return fetch.fetch_http(source.url, dest_dir / name, retries=dl.retries, backoff_s=dl.backoff_s, log=log)
    if source.kind == "gdrive":
        return fetch.fetch_gdrive(source.id, dest_dir / name, endpoint=source.endpoint, retries=dl.retries)
    if source.kind == "gdrive-folder":
        return fetch.fetch_gdrive_folder(source.id, dest_dir / name, endpoint=source.endpoint, retries=dl.retries)
    if source.kind == "hf-file":
        return fetch.fetch_hf_file(source.repo, source.filename, dest_dir, endpoint=source.endpoint,
                                   revision=source.revision)
    return fetch.fetch_hf_dataset(source.repo, dest_dir / name, endpoint=source.endpoint, revision=source.revision)


def fetch_file(dataset: str, item: datasets.DatasetFile, dest_dir: Path, dl: DownloadConfig, log) -> tuple[Path, dict]:
    """Try the sources in order; return the local path and where it came from (an origin file record)."""
    failures: list[fetch.FetchError] = []
    for source in item.sources:
        try:
            path = fetch_from_source(source, item.name, dest_dir, dl, log)
            digest = file_sha256(path, fetch.verify_sha256(path, source.sha256)) if path.is_file() else "folder"
            return path, {"name": item.name, "source": source.describe(), "sha256": digest}
        except fetch.FetchError as e:
            log.warning(f"{dataset}/{item.name}: source failed: {e}")
            failures.append(e)
    tried = "\n".join(f"  - {e}" for e in failures) or "  (no sources configured)"
    # Only "could not connect" is worth a later retry; a 404, a checksum or a quota page is not.
    error = DatasetUnavailable if failures and all(isinstance(e, fetch.Unreachable) for e in failures) else DatasetError
    raise error(f"{dataset}: could not fetch {item.name} from any source:\n{tried}\n"
                f"Download it yourself and run with --from {dataset}=PATH (an archive or an extracted "
                f"folder), or list a mirror in a catalog of your own and point download.datasets_file at "
                f"it (see {datasets.OWN_COPIES_DOC})")


def local_inputs(cfg: Config, name: str, spec: datasets.DatasetSpec, log) -> tuple[list[Path], dict, set[Path]]:
    """The archives/folders to read: the user's --from paths, else fetched files. Also returns
    where they came from and which of them we own (downloaded): only those may be moved aside."""
    given = cfg.download.from_paths.get(name)
    if given:
        paths = [Path(p).expanduser() for p in given]
        if problems := from_path_problems(cfg, name, spec, check_layout=False):  # checked before, but
            raise BadInput("\n".join(problems))                              # a file may vanish since
        files = [{"path": str(p), "sha256": _from_sha256(p, spec, log)} for p in paths]
        return paths, {"kind": "--from", "files": files}, set()
    dest = work_dir(cfg) / name
    paths, files = [], []
    for item in spec.files:
        path, record = fetch_file(name, item, dest, cfg.download, log)
        paths.append(path)
        files.append(record)
    return paths, {"kind": "sources", "files": files}, set(paths)


def _from_sha256(path: Path, spec: datasets.DatasetSpec, log) -> str:
    """A --from archive's sha256 (a warning when it is none of the published ones); "folder" for a folder."""
    if not path.is_file():
        return "folder"
    digest = file_sha256(path)
    known = {s.sha256.lower() for f in spec.files for s in f.sources if s.sha256}
    if known and digest not in known:
        log.warning(f"--from {path}: sha256 {digest} matches no published digest of this dataset "
                    f"({', '.join(sorted(known))}); using it anyway, check the counts below")
    return digest


def from_path_problems(cfg: Config, name: str, spec: datasets.DatasetSpec, check_layout: bool = True) -> list[str]:
    """What is wrong with the dataset's --from paths, one line each saying what to do (empty: nothing).
    Reads file and member names without extracting, so it runs before any download or extraction."""
    problems = []
    for given in cfg.download.from_paths.get(name, []):
        path = Path(given).expanduser()
        if not path.exists():
            problems.append(f"{name}: --from {path} does not exist; check the path (quote it when it has "
                            "spaces or brackets) or drop that --from to download the dataset")
        elif check_layout:
            problems += _layout_problem(name, spec, path)
    return problems


def _layout_problem(name: str, spec: datasets.DatasetSpec, path: Path) -> list[str]:
    try:
        names = names_inside(path)
    except BadInput as e:
        return [f"{name}: {e}"]
    found = datasets.matching_layouts(names)
    if spec.layout in found:
        return []
    rule = (datasets.LAYOUTS[spec.layout].__doc__ or "").strip().splitlines()[0]
    looks = f"the {found[0]} layout" if found else f"{names[:3] or 'nothing (empty)'}"
    return [f"{name}: --from {path} holds no file of the {spec.layout} layout ({rule}); its files look like {looks}. Pass that "
            f"dataset's archive or folder, or extract it into that layout and pass the folder"]


def _member_names(archive: Path) -> list[str]:
    try:
        return archives.member_names(archive)
    except (archives.ArchiveError, tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as e:
        raise BadInput(f"--from {archive} is a truncated or corrupt archive ({type(e).__name__}: {e}); "
                       "fetch a fresh copy") from e


def names_inside(path: Path) -> list[str]:
    """The relative file names an archive or folder holds, as the layout rules will see them (a
    folder's own name first, archives inside it by their member names), without extracting."""
    if path.is_dir():
        files = archives.content_files(path)
        names = [str(f.relative_to(path.parent)) for f in files]
        # Images are never archives: skip opening each of a large folder's images to ask.
        for inner in (f for f in files if f.suffix.lower() not in datasets.IMAGE_SUFFIXES and archives.archive_kind(f)):
            names += [f"{inner.name}/{n}" for n in _member_names(inner)]
        return names
    if archives.archive_kind(path):
        return _member_names(path)
    reason = fetch.web_page_reason(path)
    what = (f"a web page ({reason})" if reason
            else "a truncated or corrupt archive" if archives.looks_like_archive(path)
            else "neither a folder nor a zip/tar archive")
    raise BadInput(f"--from {path} is {what}; pass the dataset's zip/tar archive or its extracted folder")


# --- extraction ----------------------------------------------------------------------------------

# The config setting behind each archives.Limits cap (see extraction's Limits below).
EXTRACT_CAP_SETTINGS = {"max_files": "download.max_extract_files", "max_bytes": "download.max_extract_bytes"}


def _extract_once(archive: Path, base: Path, limits: archives.Limits, owned: bool, log) -> Path:
    """Extract to ``base/<name>-<sha prefix>`` unless already complete there (the folder only
    gets that name, by an atomic rename, once every member is out)."""
    target = base / f"{archive.name}-{file_sha256(archive)[:16]}"
    if target.is_dir():
        return target
    log.info(f"extracting {archive.name} -> {target}")
    try:
        return archives.safe_extract(archive, target, limits)
    except archives.ArchiveTooLarge as e:  # the file itself is fine: only the cap was hit
        raise DatasetError(f"{e} (raise {EXTRACT_CAP_SETTINGS[e.limit]} if the archive is trusted). "
                           f"The archive is kept at {archive}") from e
    except archives.ArchiveUnsupported as e:
        raise DatasetError(f"{e}. The archive is kept at {archive}") from e  # the file itself is fine
    except archives.ArchiveError as e:
        raise _bad_file(archive, owned, str(e)) from e


def _bad_file(path: Path, owned: bool, reason: str) -> DatasetError:
    """A downloaded file that is unusable is moved aside, so the rerun fetches a fresh copy;
    a file the user gave is never touched."""
    if not owned:
        return DatasetError(f"{reason}. Check the file, or fetch a fresh copy")
    aside = path.with_name(path.name + ".rejected")
    os.replace(path, aside)
    return DatasetError(f"{reason}. The download was moved to {aside}; rerun to fetch it again, or pass "
                        "--from with a good copy")


def extraction_roots(paths: list[Path], base: Path, limits: archives.Limits, owned: set[Path],
                     has_layout: Callable[[Path], bool], log) -> list[Path]:
    """Folders to scan: a folder as it is (or, when it holds no file of the dataset's layout, the
    archives inside it, extracted), and each archive extracted."""
    roots = []
    for path in paths:
        if path.is_dir():
            if has_layout(path):  # an extracted copy: archives beside it would give every pair twice
                roots.append(path)
                continue
            inner = [f for f in archives.content_files(path) if archives.archive_kind(f)]
            roots += [path] + [_extract_once(f, base, limits, path in owned, log) for f in inner]
        elif archives.archive_kind(path) or archives.looks_like_archive(path):
            roots.append(_extract_once(path, base, limits, path in owned, log))  # a truncated one raises
        else:
            reason = fetch.web_page_reason(path)
            what = f"a web page ({reason})" if reason else "neither a folder nor a zip/tar archive"
            raise _bad_file(path, path in owned, f"{path} is {what}")
    return roots


def scan(roots: list[Path]):
    """(path, parts) of every content file; parts start at the root's own name so that folder
    names such as RainTrainH take part in the layout rules."""
    for root in roots:
        for path in archives.content_files(root):
            yield path, path.relative_to(root.parent).parts


# --- normalisation -------------------------------------------------------------------------------

def normalise_all(cfg: Config, name: str, spec: datasets.DatasetSpec, pairs: list[datasets.RawPair],
                  log, extracted: Path) -> tuple[list[dict], list[dict]]:
    """Decode, check and write every pair (threads: PIL releases the GIL while decoding). A bad
    pair becomes a quarantine row; its neighbours are unaffected. PNGs under ``extracted`` (our
    own extraction, deleted afterwards) are hard-linked rather than copied where possible."""
    progress = RateLogger(log, f"{name}: normalised", len(pairs), "pairs")

    def one(pair: datasets.RawPair) -> tuple[dict | None, dict | None]:
        sample_id = datasets.sample_id(name, pair.split, pair.native_id)
        lq_url, gt_url = common.pair_urls(cfg, pair.split, spec.degradation, sample_id)
        target = normalise.Target(sample_id, name, spec.degradation, pair.split, lq_url, gt_url)
        try:
            row, note = normalise.normalise_pair(pair.lq, pair.gt, target, crop_gt_to_lq=spec.layout == "reside6k",
                                                 link_root=extracted)
            return {**row, "note": note}, None
        except normalise.Reject as e:
            return None, quarantine_row(name, spec, pair.split, pair.native_id, pair.lq, str(e))
        finally:
            progress.update()

    workers = cfg.download.workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(one, pairs))
    rows = [r for r, _ in results if r is not None]
    rejected = [q for _, q in results if q is not None]
    return rows, rejected


def quarantine_row(name: str, spec: datasets.DatasetSpec, split: str, native_id: str, path, reason: str) -> dict:
    return {"id": datasets.sample_id(name, split, native_id), "dataset": name, "split": split,
            "degradation": spec.degradation, "path": str(path), "reason": reason}


# --- one dataset, end to end ---------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """One dataset's fate in this run: reuse what data_root holds (``redo`` is None, ``rows`` read)
    or normalise it (``redo`` says why)."""
    name: str
    spec: datasets.DatasetSpec
    marker: dict
    redo: str | None
    rows: list[dict] | None = None


def plan(cfg: Config, name: str, spec: datasets.DatasetSpec, *, refresh: bool = False,
         run_id: str | None = None) -> Plan:
    """Decide, without touching the network, whether a dataset must be normalised again. What is
    in data_root is reused whatever its origin (--from, a source) unless ``refresh`` (--refresh
    download; not again by the retries of the run ``run_id`` that already redid it), its catalog
    entry or shaping settings changed, or --from now names other files."""
    marker_url = _table_url(cfg, name, ".json")
    marker = fs.read_json(marker_url) if fs.exists(marker_url) else {}
    redo = _redo_reason(cfg, name, spec, marker, refresh, run_id)
    if redo is not None:
        return Plan(name, spec, marker, redo)
    rows = tables.read_table(_table_url(cfg, name, ".parquet")).to_pylist()
    if not _outputs_present(rows):
        return Plan(name, spec, marker, f"its normalised images are missing under {common.path(cfg, 'datasets')}")
    return Plan(name, spec, marker, None, rows)


def _redo_reason(cfg: Config, name: str, spec: datasets.DatasetSpec, marker: dict, refresh: bool,
                 run_id: str | None) -> str | None:
    if not marker:
        return "not normalised yet"
    if marker.get("version") != MARKER_VERSION:
        return "its record was written by an older srdiff"
    if refresh and (run_id is None or marker.get("run_id") != run_id):
        return "--refresh download"
    if marker.get("entry") != entry_digest(spec):
        return f"its entry in the catalog {cfg.download.datasets_file} changed"
    if marker.get("settings") != shaping_settings(cfg, spec):
        return f"settings that shape its files changed ({marker.get('settings')} -> {shaping_settings(cfg, spec)})"
    given = cfg.download.from_paths.get(name)
    if given and marker.get("from") != from_identity(given):
        return "--from names other (or changed) files than the ones it was made from"
    return None


def prepare_dataset(cfg: Config, planned: Plan, log, run_id: str | None = None) -> Prepared:
    """Reuse the dataset (see :func:`plan`) or fetch, extract and normalise it."""
    name, spec = planned.name, planned.spec
    if planned.redo is None:
        return _reuse(cfg, planned, log)
    if planned.marker:
        log.info(f"{name}: normalising again: {planned.redo}")
    paths, origin, owned = local_inputs(cfg, name, spec, log)
    extracted = work_dir(cfg) / name / "extracted"
    limits = archives.Limits(cfg.download.max_extract_bytes, cfg.download.max_extract_files)
    options = {"lq_folder": cfg.download.gopro_lq_folder} if spec.layout == "gopro" else {}
    roots = extraction_roots(paths, extracted, limits, owned,
                             lambda folder: _matches_layout(folder, spec.layout, options), log)
    pairs, rejected = datasets.find_pairs(spec.layout, scan(roots), **options)
    if not pairs and not rejected:
        raise DatasetError(no_layout_match(name, spec.layout, roots))
    log.info(f"{name}: found {len(pairs)} candidate pairs, {len(rejected)} unpartnered or duplicate files")
    rows, bad = normalise_all(cfg, name, spec, pairs, log, extracted)
    quarantine = [quarantine_row(name, spec, r.split, r.native_id, r.path, r.reason) for r in rejected] + bad
    tables.write_table(_table_url(cfg, name, ".parquet"), rows, schema=ROWS_SCHEMA)
    tables.write_table(_table_url(cfg, name, ".quarantine.parquet"), quarantine, schema=QUARANTINE_SCHEMA)
    given = cfg.download.from_paths.get(name)
    fs.write_json(_table_url(cfg, name, ".json"), {  # last: the tables above are complete
        "version": MARKER_VERSION, "entry": entry_digest(spec), "settings": shaping_settings(cfg, spec),
        "from": from_identity(given) if given else None, "origin": origin, "run_id": run_id,
        "code": code_digest(), "written": time.strftime("%Y-%m-%d %H:%M:%S"),
        "pairs": len(rows), "quarantined": len(quarantine)})
    if not cfg.download.keep_extracted:
        archives.remove_tree(extracted)
    return Prepared(name, rows, quarantine, origin)


def _reuse(cfg: Config, planned: Plan, log) -> Prepared:
    marker, name = planned.marker, planned.name
    origin = marker.get("origin", {})
    made = f", normalised {marker['written']}" if marker.get("written") else ""
    made += f" in MLflow run {marker['run_id']}" if marker.get("run_id") else ""
    log.info(f"{name}: reusing the pairs already in data_root ({len(planned.rows)} pairs from "
             f"{describe_origin(origin)}{made}); --refresh download normalises it again")
    if marker.get("code") != code_digest():
        log.info(f"{name}: it was normalised by another version of srdiff's download code; "
                 "--refresh download redoes it with this one")
    quarantine = tables.read_table(_table_url(cfg, name, ".quarantine.parquet")).to_pylist()
    return Prepared(name, planned.rows, quarantine, origin, reused=True, marker=marker)


def describe_origin(origin: dict) -> str:
    """Where a dataset's files came from, in words (a log line, an MLflow param value)."""
    files = origin.get("files", [])
    if origin.get("kind") == "--from":
        return "--from " + ", ".join(f["path"] for f in files)
    if origin.get("kind") == "sources":
        return "; ".join(f"{f['name']} from {f['source']}" for f in files)
    return "an unrecorded origin"


def detect_dataset(cfg: Config, path: Path) -> str:
    """Which catalog dataset an archive or folder holds, from the names of the files inside."""
    if not path.exists():
        raise BadInput(f"--from {path}: no such file or folder; check the path (quote it when it has spaces "
                       "or brackets)")
    names = names_inside(path)
    catalog = datasets.load_catalog(datasets.resolve_catalog(cfg.download.datasets_file))
    found = [name for layout in datasets.matching_layouts(names) for name, spec in catalog.items()
             if spec.layout == layout]
    if len(found) != 1:
        what = f"it matches {found}" if found else "no dataset layout matches the files inside"
        raise BadInput(f"--from {path}: cannot tell which dataset this is ({what}); write "
                       f"--from DATASET={path} with DATASET one of {sorted(catalog)}")
    return found[0]


def _outputs_present(rows: list[dict]) -> bool:
    urls = [u for r in rows for u in (r["lq_path"], r["gt_path"])]
    try:
        fs.sizes(urls)
    except FileNotFoundError:
        return False
    return True


def _matches_layout(folder: Path, layout: str, options: dict) -> bool:
    parse = datasets.LAYOUTS[layout]
    return any(parse(p.relative_to(folder.parent).parts, **options) for p in archives.content_files(folder))


def no_layout_match(name: str, layout: str, roots: list[Path]) -> str:
    sample = [str(p) for root in roots for p in archives.content_files(root)][:5]
    rule = (datasets.LAYOUTS[layout].__doc__ or "").strip().splitlines()[0]
    return (f"{name}: no file matches the {layout} layout ({rule}); the files found look like "
            f"{sample or 'nothing (empty)'}. Is this the right archive? Otherwise extract it into that "
            f"layout and pass the folder with --from {name}=FOLDER")


def count_problems(prepared: Prepared, spec: datasets.DatasetSpec, log) -> list[str]:
    """Compare pair counts with the catalog: a visible line always, a problem on a shortfall."""
    problems = []
    for split, expected in spec.expected.items():
        got = sum(r["split"] == split for r in prepared.rows)
        line = f"{prepared.name}: {split} {got} pairs of {expected} expected"
        if got < expected:
            log.warning(f"{line} (SHORTFALL of {expected - got}; {_shortfall_hint(prepared, split)})")
            problems.append(f"{prepared.name}/{split}: {got} pairs, {expected} expected")
        elif got > expected:
            log.warning(f"{line} (more than expected: a different version of the dataset?)")
        else:
            log.info(line)
    return problems


def _shortfall_hint(prepared: Prepared, split: str) -> str:
    """Where the missing pairs went: the quarantine when it holds some, else the source itself."""
    held = sum(q["split"] == split for q in prepared.quarantine)
    if held:
        return f"{held} of its files are in manifests/quarantine.parquet with the reason"
    return ("nothing was quarantined, so the archive or folder holds fewer pairs: is it the full release "
            "of this dataset, with its files in their original folders?")
