"""Download stage: make `datasets/{train,val}/<degradation>/{LQ,GT}/<id>.png` and the manifest."""

from __future__ import annotations

import io
import json
import time
from collections import Counter

import pyarrow as pa
from PIL import Image
from prefect import task
from prefect.context import FlowRunContext

from srdiff_core import demo_data
from srdiff_core.config import DEGRADATIONS, Config
from storage import fs, tables
from tasks import acquire, common, datasets, normalise
from tasks.common import RateLogger, StageResult, stage_logger

MANIFEST = "manifests/pairs.parquet"
QUARANTINE = "manifests/quarantine.parquet"
NOTES = "manifests/notes.parquet"  # what normalisation changed (JPEG -> PNG, GT centre crop)
NOTES_SCHEMA = pa.schema([("id", pa.string()), ("dataset", pa.string()), ("note", pa.string())])
SPLITS = ("train", "val")


def write_pair(cfg: Config, pair: demo_data.DemoPair) -> dict:
    """Write one LQ/GT pair atomically and return its manifest row."""
    lq_url, gt_url = common.pair_urls(cfg, pair.split, pair.degradation, pair.id)
    lq_png, gt_png = normalise.encode_png(Image.fromarray(pair.lq)), normalise.encode_png(Image.fromarray(pair.gt))
    fs.atomic_write_bytes(lq_url, lq_png)
    fs.atomic_write_bytes(gt_url, gt_png)
    height, width = pair.gt.shape[:2]
    return {"id": pair.id, "dataset": "demo", "degradation": pair.degradation, "split": pair.split,
            "lq_path": lq_url, "gt_path": gt_url, "width": width, "height": height,
            "lq_sha256": fs.sha256_bytes(lq_png), "gt_sha256": fs.sha256_bytes(gt_png),
            "lq_bytes": len(lq_png), "gt_bytes": len(gt_png)}


def materialize_demo_set(cfg: Config, log) -> list[dict]:
    demo = cfg.download.demo
    total = demo_data.demo_pair_count(demo)
    progress = RateLogger(log, "demo set", total, "pairs")
    rows = []
    for pair in demo_data.iter_demo_pairs_from_config(demo):
        rows.append(write_pair(cfg, pair))
        progress.update()
    return rows


def scan_seed_layout(cfg: Config, log) -> tuple[list[dict], list[dict]]:
    """Index a folder already in the seed layout (e.g. from the SR-Diff code), joining LQ and GT
    by file name (the id), never by sorted order; unmatched files go to quarantine."""
    rows, quarantine = [], []
    for split in SPLITS:
        for degradation in DEGRADATIONS:
            base = common.path(cfg, "datasets", split, degradation)
            lq = {_stem(u): u for u in fs.glob(fs.join(base, "LQ", "*.png"))}
            gt = {_stem(u): u for u in fs.glob(fs.join(base, "GT", "*.png"))}
            for sample_id in sorted(lq.keys() | gt.keys()):
                if sample_id not in gt or sample_id not in lq:
                    missing = "GT" if sample_id not in gt else "LQ"
                    quarantine.append({"id": sample_id, "dataset": "local", "split": split, "degradation": degradation,
                                       "path": lq.get(sample_id) or gt.get(sample_id),
                                       "reason": f"missing {missing} partner"})
                    continue
                row = _pair_row(sample_id, split, degradation, lq[sample_id], gt[sample_id])
                if isinstance(row, str):
                    quarantine.append({"id": sample_id, "dataset": "local", "split": split, "degradation": degradation,
                                       "path": lq[sample_id], "reason": row})
                else:
                    rows.append(row)
    log.info(f"seed layout: {len(rows)} good pairs, {len(quarantine)} quarantined")
    return rows, quarantine


def _stem(url: str) -> str:
    return url.rsplit("/", 1)[-1].rsplit(".", 1)[0]


def _pair_row(sample_id: str, split: str, degradation: str, lq_url: str, gt_url: str) -> dict | str:
    """A manifest row, or the reason the pair is rejected."""
    lq_bytes, gt_bytes = fs.read_bytes(lq_url), fs.read_bytes(gt_url)
    try:
        lq_img, gt_img = Image.open(io.BytesIO(lq_bytes)), Image.open(io.BytesIO(gt_bytes))
        lq_img.load(), gt_img.load()
    except Exception as e:  # PIL raises many types for truncated/corrupt files
        return f"unreadable image: {e}"
    if lq_img.size != gt_img.size:
        return f"size mismatch: LQ {lq_img.size} vs GT {gt_img.size}"
    width, height = gt_img.size
    return {"id": sample_id, "dataset": "local", "degradation": degradation, "split": split,
            "lq_path": lq_url, "gt_path": gt_url, "width": width, "height": height,
            "lq_sha256": fs.sha256_bytes(lq_bytes), "gt_sha256": fs.sha256_bytes(gt_bytes),
            "lq_bytes": len(lq_bytes), "gt_bytes": len(gt_bytes)}


def drop_duplicate_ids(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """Ids key every table downstream, so they must be unique over the whole manifest: the
    first pair (in split/degradation/id order) stays, later ones are quarantined."""
    seen: dict[str, dict] = {}
    kept, rejected = [], []
    for r in sorted(rows, key=lambda r: (r["split"], r["degradation"], r["id"])):
        if r["id"] in seen:
            first = seen[r["id"]]
            rejected.append({"id": r["id"], "dataset": r["dataset"], "split": r["split"], "degradation": r["degradation"],
                             "path": r["lq_path"], "reason": f"duplicate id (already used by "
                                                              f"{first['split']}/{first['degradation']})"})
        else:
            seen[r["id"]] = r
            kept.append(r)
    return kept, rejected


def summarize(rows: list[dict]) -> dict[str, float]:
    counts = Counter((r["split"], r["degradation"]) for r in rows)
    return {f"pairs/{split}/{deg}": float(n) for (split, deg), n in sorted(counts.items())}


def write_quarantine(cfg: Config, rows: list[dict]) -> str:
    url = common.path(cfg, QUARANTINE)
    tables.write_table(url, rows, schema=acquire.QUARANTINE_SCHEMA)
    return url


def real_datasets(cfg: Config, log, *, refresh: bool = False, run_id: str | None = None
                  ) -> tuple[list[dict], list[dict], dict[str, float], dict[str, str]]:
    """Prepare every configured dataset; one that fails does not stop the others (their work is
    kept, and a rerun reuses it). Raises at the end with every problem listed. What the user gave
    (dataset names, --from paths) is checked first, so a mistake there fails before any download."""
    catalog = datasets.load_catalog(datasets.resolve_catalog(cfg.download.datasets_file))
    unknown = [n for n in [*cfg.download.datasets, *cfg.download.from_paths] if n not in catalog]
    if unknown:
        raise datasets.CatalogError(f"unknown dataset(s) {unknown}: the catalog {cfg.download.datasets_file} has "
                                    f"{sorted(catalog)} (for others, see {datasets.OWN_COPIES_DOC})")
    ignored = sorted(set(cfg.download.from_paths) - set(cfg.download.datasets))
    if ignored:
        log.warning(f"--from given for {ignored}, which download.datasets {cfg.download.datasets} does not "
                    "include: ignored (add them with --set download.datasets=[...])")
    plans = [acquire.plan(cfg, name, catalog[name], refresh=refresh, run_id=run_id) for name in cfg.download.datasets]
    bad_inputs = [p for plan in plans if plan.redo is not None
                  for p in acquire.from_path_problems(cfg, plan.name, plan.spec)]
    if bad_inputs:
        raise acquire.BadInput("cannot use what --from gives (nothing was downloaded):\n" +
                               "\n".join(f"* {p}" for p in bad_inputs))
    rows, quarantine, metrics, params, problems = [], [], {}, {}, []
    network = False
    for planned in plans:
        name, spec = planned.name, planned.spec
        try:
            prepared = acquire.prepare_dataset(cfg, planned, log, run_id)
        except (acquire.DatasetError, datasets.CatalogError) as e:
            problems.append(_named(name, e))
            log.error(problems[-1])
            network |= isinstance(e, acquire.DatasetUnavailable)
            continue
        rows += prepared.rows
        quarantine += prepared.quarantine
        metrics.update(dataset_metrics(prepared, spec))
        params.update(origin_params(prepared))
        shortfall = acquire.count_problems(prepared, spec, log)
        if shortfall and not cfg.download.allow_partial:
            problems.append("pair count shortfall: " + "; ".join(shortfall) +
                            " (set download.allow_partial=true to go on with what there is)")
    if problems:
        raise DownloadError("download stage failed for:\n" + "\n".join(f"* {p}" for p in problems) +
                            "\nDatasets that succeeded are kept and are reused by the rerun.", network=network)
    return rows, quarantine, metrics, params


def _named(name: str, error: Exception) -> str:
    """The error's message, starting with the dataset it is about (an archive path alone may not say)."""
    message = str(error)
    return message if message.startswith(f"{name}:") else f"{name}: {message}"


def origin_params(prepared: acquire.Prepared) -> dict[str, str]:
    """Where a dataset's files came from, as MLflow params under fixed names
    (download.<dataset>.<field>): paths, file names and digests are values, never part of a name,
    since MLflow refuses most characters a path can hold."""
    origin, key = prepared.origin, f"download.{prepared.name}"
    files = origin.get("files", [])
    out = {f"{key}.origin": origin.get("kind", "unrecorded"), f"{key}.reused": str(prepared.reused).lower(),
           f"{key}.sha256": " ".join(f.get("sha256", "?") for f in files)}
    if origin.get("kind") == "--from":
        paths = [f["path"] for f in files]
        out[f"{key}.from"] = paths[0] if len(paths) == 1 else json.dumps(paths, ensure_ascii=False)
    else:
        out[f"{key}.sources"] = acquire.describe_origin(origin)
    if prepared.reused and prepared.marker.get("run_id"):
        out[f"{key}.normalised_in_run"] = prepared.marker["run_id"]
    return out


def refresh_requested() -> bool:
    """Whether the user asked for --refresh download. It reaches the task as the ``refresh``
    parameter of the flow running it (the stage subflow of flows/pipeline.py: a bool; the srdiff
    flow: a list of stages). The task's own refresh_cache is no sign: the pipeline also sets it
    when a cache record is merely unusable, and that must never refetch every dataset."""
    ctx = FlowRunContext.get()
    value = ctx.parameters.get("refresh") if ctx is not None else None
    return value is True or (isinstance(value, (list, tuple)) and "download" in value)


class DownloadError(RuntimeError):
    def __init__(self, message: str, network: bool = False):
        super().__init__(message)
        self.network = network  # a source could not be reached: a later retry may succeed


def network_failure(task, task_run, state) -> bool:
    """Prefect retry condition: retry the stage only when a source was unreachable, never for a
    checksum, an unsafe archive, a count shortfall or a user's mistake (acquire.BadInput, a
    CatalogError: found before any download; retrying cannot fix those)."""
    return isinstance(state.data, DownloadError) and state.data.network


def dataset_metrics(prepared: acquire.Prepared, spec: datasets.DatasetSpec) -> dict[str, float]:
    """The per-dataset summary MLflow shows: pairs per split against the expected counts."""
    out = {}
    for split in SPLITS:
        out[f"dataset/{prepared.name}/{split}"] = float(sum(r["split"] == split for r in prepared.rows))
        out[f"dataset/{prepared.name}/{split}_expected"] = float(spec.expected.get(split, 0))
    out[f"dataset/{prepared.name}/quarantined"] = float(len(prepared.quarantine))
    out[f"dataset/{prepared.name}/converted"] = float(sum(bool(r.get("note")) for r in prepared.rows))
    return out


# Retries with backoff on network failures only (finished datasets are reused by the retry).
@task(name="download", persist_result=True, retries=2, retry_delay_seconds=[60, 600],
      retry_condition_fn=network_failure)
def download(cfg: Config, key: str, run_id: str | None = None) -> StageResult:
    """Materialise the dataset in the seed layout and write the pairs manifest."""
    log = stage_logger()
    start = time.perf_counter()
    quarantine: list[dict] = []
    metrics: dict[str, float] = {}
    params = {"download.source": cfg.download.source}
    if cfg.download.source == "demo":
        rows = materialize_demo_set(cfg, log)
    elif cfg.download.source == "seed":
        rows, quarantine = scan_seed_layout(cfg, log)
        params["download.seed_folder"] = common.path(cfg, "datasets")
        if not rows:
            raise FileNotFoundError(
                f"no image pairs under {common.path(cfg, 'datasets')}: put the datasets there in the layout "
                f"datasets/{{train,val}}/<degradation>/{{LQ,GT}}/<id>.png, use download.source: real to "
                f"fetch them, or run the demo with `srdiff demo` (download.source: demo)")
    else:
        rows, quarantine, metrics, params = real_datasets(cfg, log, refresh=refresh_requested(), run_id=run_id)
        params["download.source"] = "real"
        notes = [{"id": r["id"], "dataset": r["dataset"], "note": r["note"]} for r in rows if r.get("note")]
        tables.write_table(common.path(cfg, NOTES), notes, schema=NOTES_SCHEMA)
    rows, duplicates = drop_duplicate_ids(rows)
    quarantine += duplicates
    manifest = tables.as_table([{k: r.get(k) for k in tables.PAIRS_SCHEMA.names} for r in rows], tables.PAIRS_SCHEMA)
    manifest_url = common.path(cfg, MANIFEST)
    tables.write_table(manifest_url, manifest)
    quarantine_url = write_quarantine(cfg, quarantine)
    metrics.update({**summarize(rows), "pairs/total": float(len(rows)), "quarantined": float(len(quarantine))})
    log.info(f"manifest: {len(rows)} pairs -> {manifest_url} ({len(quarantine)} quarantined -> {quarantine_url})")
    return StageResult(stage="download", key=key, digest=tables.table_digest(manifest),
                       outputs={"manifest": manifest_url, "quarantine": quarantine_url},
                       metrics=metrics, params=params, run_id=run_id, seconds=time.perf_counter() - start)
