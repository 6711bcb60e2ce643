"""One real dataset from its sources (or the user's ``--from`` paths) to the seed layout:
fetch -> verify sha256 -> extract safely -> pair by id -> decode, check, write -> per-dataset table.

Each finished dataset leaves ``manifests/datasets/<name>.parquet`` (its rows), a quarantine
table and, written last, ``<name>.json`` with the fingerprint of what produced it; a rerun with
the same fingerprint reads the table and touches nothing else. Downloads resume from their
``.part`` file, extraction restarts from the archive, so a kill at any point loses little.
"""

from __future__ import annotations

import os
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


@dataclass
class Prepared:
    name: str
    rows: list[dict]                 # PAIRS_SCHEMA + note
    quarantine: list[dict]
    origin: dict[str, str] = field(default_factory=dict)  # file -> where it came from (+ sha256)
    reused: bool = False


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


def fingerprint(cfg: Config, name: str, spec: datasets.DatasetSpec) -> str:
    """What determines a dataset's normalised output (allow_partial does not: it only decides
    whether a shortfall is an error)."""
    dl = cfg.download
    return common.sha256_json({
        "spec": spec.model_dump(mode="json"), "from": [_path_identity(Path(p)) for p in dl.from_paths.get(name, [])],
        "gopro_lq_folder": dl.gopro_lq_folder, "data_root": cfg.data_root,
        "code": closure.cached_code_digest((__name__,))})  # this module and every project module it can run


def _path_identity(path: Path) -> list:
    """A --from path by name, size and modification time (a replaced archive is noticed
    without hashing gigabytes on every run)."""
    path = path.expanduser()
    if not path.exists():
        return [str(path), None]
    files = [path] if path.is_file() else archives.content_files(path)
    return [str(path), [(str(f.relative_to(path)) if f != path else "", f.stat().st_size, f.stat().st_mtime_ns)
                        for f in files]]


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


def fetch_file(dataset: str, item: datasets.DatasetFile, dest_dir: Path, dl: DownloadConfig, log) -> tuple[Path, str]:
    """Try the sources in order; return the local path and where it came from."""
    failures: list[fetch.FetchError] = []
    for source in item.sources:
        try:
            path = fetch_from_source(source, item.name, dest_dir, dl, log)
            digest = file_sha256(path, fetch.verify_sha256(path, source.sha256)) if path.is_file() else "folder"
            return path, f"{source.describe()} (sha256 {digest})"
        except fetch.FetchError as e:
            log.warning(f"{dataset}/{item.name}: source failed: {e}")
            failures.append(e)
    tried = "\n".join(f"  - {e}" for e in failures) or "  (no sources configured)"
    # Only "could not connect" is worth a later retry; a 404, a checksum or a quota page is not.
    error = DatasetUnavailable if failures and all(isinstance(e, fetch.Unreachable) for e in failures) else DatasetError
    raise error(f"{dataset}: could not fetch {item.name} from any source:\n{tried}\n"
                f"Download it yourself and run with --from {dataset}=PATH (an archive or an "
                f"extracted folder), or add a mirror to {dl.datasets_file}")


def local_inputs(cfg: Config, name: str, spec: datasets.DatasetSpec, log) -> tuple[list[Path], dict[str, str], set[Path]]:
    """The archives/folders to read: the user's --from paths, else fetched files. Also returns
    which of them we own (downloaded), since only those may be moved aside when bad."""
    given = cfg.download.from_paths.get(name)
    if given:
        paths = [Path(p).expanduser() for p in given]
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise DatasetError(f"{name}: --from path(s) {missing} do not exist")
        return paths, {str(p): _from_origin(p, spec, log) for p in paths}, set()
    dest = work_dir(cfg) / name
    paths, origin = [], {}
    for item in spec.files:
        path, where = fetch_file(name, item, dest, cfg.download, log)
        paths.append(path)
        origin[item.name] = where
    return paths, origin, set(paths)


def _from_origin(path: Path, spec: datasets.DatasetSpec, log) -> str:
    """Record a --from archive's sha256, and say so when it is none of the published ones."""
    if not path.is_file():
        return "--from folder"
    digest = file_sha256(path)
    known = {s.sha256.lower() for f in spec.files for s in f.sources if s.sha256}
    if known and digest not in known:
        log.warning(f"--from {path}: sha256 {digest} matches no published digest of this dataset "
                    f"({', '.join(sorted(known))}); using it anyway, check the counts below")
    return f"--from (sha256 {digest})"


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

def prepare_dataset(cfg: Config, name: str, spec: datasets.DatasetSpec, log) -> Prepared:
    marker_url = _table_url(cfg, name, ".json")
    stamp = fingerprint(cfg, name, spec)
    marker = fs.read_json(marker_url) if fs.exists(marker_url) else {}
    if marker.get("fingerprint") == stamp:
        rows = tables.read_table(_table_url(cfg, name, ".parquet")).to_pylist()
        if _outputs_present(rows):
            log.info(f"{name}: already normalised ({marker_url}); nothing to do")
            return Prepared(name, rows, tables.read_table(_table_url(cfg, name, ".quarantine.parquet")).to_pylist(),
                            marker.get("origin", {}), reused=True)
        log.warning(f"{name}: normalised images are missing under {common.path(cfg, 'datasets')}; redoing")
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
    fs.write_json(marker_url, {"fingerprint": stamp, "origin": origin, "pairs": len(rows),
                               "quarantined": len(quarantine)})  # last: the table above is complete
    if not cfg.download.keep_extracted:
        archives.remove_tree(extracted)
    return Prepared(name, rows, quarantine, origin)


def detect_dataset(cfg: Config, path: Path) -> str:
    """Which catalog dataset an archive or folder holds, from the names of the files inside."""
    if not path.exists():
        raise DatasetError(f"--from {path}: no such file or folder")
    if path.is_dir():
        names = [str(p.relative_to(path)) for p in archives.content_files(path)]
        names += [n for p in archives.content_files(path) if archives.archive_kind(p) for n in archives.member_names(p)]
    elif archives.archive_kind(path):
        names = archives.member_names(path)
    else:
        raise DatasetError(f"--from {path}: not a folder or a readable zip/tar archive")
    catalog = datasets.load_catalog(datasets.resolve_catalog(cfg.download.datasets_file))
    found = [name for layout in datasets.matching_layouts(names) for name, spec in catalog.items()
             if spec.layout == layout]
    if len(found) != 1:
        what = f"it matches {found}" if found else "no dataset layout matches the files inside"
        raise DatasetError(f"--from {path}: cannot tell which dataset this is ({what}); write "
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
            log.warning(f"{line} (SHORTFALL of {expected - got}; see manifests/quarantine.parquet)")
            problems.append(f"{prepared.name}/{split}: {got} pairs, {expected} expected")
        elif got > expected:
            log.warning(f"{line} (more than expected: a different version of the dataset?)")
        else:
            log.info(line)
    return problems
