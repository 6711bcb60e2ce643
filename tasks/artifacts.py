"""Results in the Prefect UI: table and markdown artifacts, and training progress.

Artifacts are keyed by the config's name (``<config>-evaluation``, ``<config>-evaluation-report``,
``<config>-datasets``; Prefect keys are lowercase letters, digits and dashes), so the Artifacts
page shows the latest result of each config, and every version under the key stays in its
history. Results attach to the pipeline's top-level flow run (the one the MLflow parent run names
in its ``prefect.flow_run_id`` tag), so the `srdiff` flow run of a demo shows its results table.
Outside a Prefect run (a task's ``.fn`` called from a notebook or a test) nothing is published.
Publishing never fails a stage: a Prefect API that does not answer gives a warning.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from typing import Any

from srdiff_core.config import DEGRADATIONS, Config

log = logging.getLogger("srdiff")


def in_prefect_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def artifact_key(cfg: Config, what: str) -> str:
    """``<config name>-<what>`` as a Prefect artifact key (lowercase letters, digits, dashes)."""
    key = re.sub(r"[^a-z0-9-]+", "-", f"{cfg.name}-{what}".lower())
    return re.sub(r"-{2,}", "-", key).strip("-")


def _publish(cfg: Config, make, flow_run_id: str | None) -> None:
    if not cfg.tracking.prefect_artifacts or not in_prefect_run():
        return
    artifact = None
    try:
        artifact = make()
        if flow_run_id:
            artifact.flow_run_id = flow_run_id
        artifact.create()
    except Exception as e:  # the results are in MLflow too: a Prefect hiccup must not fail the stage
        log.warning(f"could not publish the Prefect artifact {getattr(artifact, 'key', '')}: {e}")


def publish_table(cfg: Config, what: str, rows: list[dict[str, Any]], description: str,
                  flow_run_id: str | None = None) -> None:
    from prefect.artifacts import TableArtifact

    _publish(cfg, lambda: TableArtifact(key=artifact_key(cfg, what), table=rows, description=description),
             flow_run_id)


def publish_markdown(cfg: Config, what: str, markdown: str, description: str,
                     flow_run_id: str | None = None) -> None:
    from prefect.artifacts import MarkdownArtifact

    _publish(cfg, lambda: MarkdownArtifact(key=artifact_key(cfg, what), markdown=markdown, description=description),
             flow_run_id)


# ---------------------------------------------------------------- the stages' results


def _fmt(value: float | None, places: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{places}f}"


def evaluation_rows(metrics: dict[str, float]) -> list[dict[str, Any]]:
    """Per degradation (then all): images, LQ and restored PSNR / SSIM / PSNR-Y / LPIPS."""
    present = {k.split("/")[1] for k in metrics if k.startswith("eval/") and k.count("/") == 2}
    degs = [d for d in DEGRADATIONS if d in present] + sorted(present - set(DEGRADATIONS) - {"all"}) + ["all"]
    rows = []
    for deg in degs:
        g = lambda m: metrics.get(f"eval/{deg}/{m}")  # noqa: E731
        if g("images") is None:
            continue
        rows.append({"degradation": deg, "images": int(g("images")),
                     "LQ PSNR": _fmt(g("lq_psnr")), "PSNR": _fmt(g("psnr")),
                     "LQ SSIM": _fmt(g("lq_ssim"), 4), "SSIM": _fmt(g("ssim"), 4),
                     "LQ PSNR-Y": _fmt(g("lq_psnr_y")), "PSNR-Y": _fmt(g("psnr_y")),
                     "LQ LPIPS": _fmt(g("lq_lpips"), 4), "LPIPS": _fmt(g("lpips"), 4)})
    return rows


def report_markdown(report: str, links: dict[str, str]) -> str:
    """report.md for the Prefect UI: links to the MLflow runs first; the grid images (files beside
    report.md) become pointers to the evaluate run's report/ artifacts."""
    head = ["**MLflow**: " + " · ".join(f"[{text}]({url})" for text, url in links.items()), ""]
    body = re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", r"(grid `\2`: in the MLflow evaluate run's artifacts, report/\2)", report)
    return "\n".join(head) + "\n" + body


def publish_evaluation(cfg: Config, metrics: dict[str, float], report: str, links: dict[str, str],
                       flow_run_id: str | None) -> None:
    rows = evaluation_rows(metrics)
    conditioning = f"conditioning {cfg.unet.conditioning}, layout {cfg.unet.layout}"
    publish_table(cfg, "evaluation", rows, f"SR-Diff evaluation of {cfg.name} ({conditioning}): one seeded sample "
                                           f"per image; MLflow: {links.get('evaluate run', '')}", flow_run_id)
    publish_markdown(cfg, "evaluation-report", report_markdown(report, links),
                     f"SR-Diff evaluation report of {cfg.name} ({conditioning})", flow_run_id)


def dataset_rows(manifest_rows: list[dict], quarantine_rows: list[dict],
                 metrics: dict[str, float]) -> list[dict[str, Any]]:
    """Per source dataset: pairs per split (and the expected counts of a real dataset), quarantined."""
    pairs = Counter((r["dataset"], r["split"]) for r in manifest_rows)
    rejected = Counter(r.get("dataset") or "unknown" for r in quarantine_rows)
    rows = []
    for name in sorted({d for d, _ in pairs} | set(rejected)):
        row = {"dataset": name, "train pairs": pairs.get((name, "train"), 0), "val pairs": pairs.get((name, "val"), 0)}
        for split in ("train", "val"):
            expected = metrics.get(f"dataset/{name}/{split}_expected")
            row[f"{split} expected"] = "-" if expected is None else int(expected)
        row["quarantined"] = rejected.get(name, 0)
        rows.append(row)
    return rows


def publish_datasets(cfg: Config, manifest_url: str, quarantine_url: str, metrics: dict[str, float],
                     flow_run_id: str | None) -> None:
    from storage import tables

    if not cfg.tracking.prefect_artifacts or not in_prefect_run():
        return
    manifest = tables.read_table(manifest_url, columns=["dataset", "split"]).to_pylist()
    quarantine = tables.read_table(quarantine_url).to_pylist()
    rows = dataset_rows(manifest, quarantine, metrics)
    publish_table(cfg, "datasets", rows, f"The pairs of {cfg.name} per source dataset and split, and the files "
                                         f"quarantined ({len(quarantine)}; {quarantine_url})", flow_run_id)


# ---------------------------------------------------------------- progress


def images_to_score(index_url: str, split: str = "val", max_images: int = 0, skipped: int = 0) -> int:
    """How many images the evaluate stage scores: the split's samples in the shard index (at most
    ``max_images`` per degradation when set), less those the embed stage quarantined."""
    from storage import tables

    per_degradation: Counter = Counter()
    for row in tables.read_table(index_url, columns=["split", "degradation", "count"]).to_pylist():
        if row["split"] == split:
            per_degradation[row["degradation"]] += row["count"]
    total = sum(min(n, max_images) if max_images else n for n in per_degradation.values())
    return max(total - skipped, 0)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """Rate and ETA of a counted job (training steps, images) as text for its log lines, and, inside
    a Prefect run, at most every ``every_s`` seconds: a progress artifact (0-100 %) and a progress
    line in the log of the pipeline's top-level flow run. The stages run as subflows, whose logs
    `prefect deployment run --watch` (which follows one flow run's logs) does not show; the line
    on the top-level run is what it shows while a stage works."""

    def __init__(self, cfg: Config, what: str, total: int, unit: str, every_s: float = 10.0):
        self.cfg, self.what, self.total, self.unit, self.every_s = cfg, what, max(int(total), 1), unit, every_s
        self.start_time: float | None = None
        self.start_done = 0
        self.artifact_id = None
        self.last_push = 0.0
        self.top_log: Any = None  # logger of the top-level flow run, found on the first push

    def update(self, done: int, rate: bool = True) -> str:
        """Record ``done`` units finished; returns " (R unit/s, ETA T)" for a log line (without
        ``rate``: ", ETA T", for a line that gives the rate already)."""
        now = time.perf_counter()
        if self.start_time is None:  # a resumed run counts its rate from where it resumed
            self.start_time, self.start_done = now, done
        elapsed, progressed = now - self.start_time, done - self.start_done
        per_s, eta = None, None
        if elapsed > 0 and progressed > 0:
            per_s = progressed / elapsed
            eta = _duration(max(self.total - done, 0) / per_s)
        percent = 100.0 * min(done, self.total) / self.total
        if self._due(now, final=done >= self.total):
            line = f"{self.what}: {done}/{self.total} {self.unit} ({percent:.0f}%"
            line += f", {per_s:.3g} {self.unit}/s, ETA {eta})" if per_s else ")"
            self._push(percent, line)
        if per_s is None:
            return ""
        return f" ({per_s:.3g} {self.unit}/s, ETA {eta})" if rate else f", ETA {eta}"

    def _due(self, now: float, final: bool) -> bool:
        if not self.cfg.tracking.prefect_artifacts or not in_prefect_run():
            return False
        if not final and self.artifact_id is not None and now - self.last_push < self.every_s:
            return False
        self.last_push = now
        return True

    def _push(self, percent: float, line: str) -> None:
        try:
            from prefect.artifacts import create_progress_artifact, update_progress_artifact

            if self.artifact_id is None:
                self.artifact_id = create_progress_artifact(
                    percent, key=artifact_key(self.cfg, f"{self.what}-progress"),
                    description=f"{self.what} of {self.cfg.name}: {self.total} {self.unit}")
                self.top_log = top_flow_run_logger()
            else:
                update_progress_artifact(self.artifact_id, percent)
            if self.top_log is not None:
                self.top_log.info(line)
        except Exception as e:
            log.warning(f"could not update the Prefect progress artifact of {self.what}: {e}")
            self.cfg = self.cfg.model_copy(update={"tracking": self.cfg.tracking.model_copy(
                update={"prefect_artifacts": False})})  # once is enough


def top_flow_run_logger() -> Any:
    """A logger writing to the top-level flow run's log when the caller runs in a subflow (None at
    the top level, where the caller's own log lines are there already)."""
    from prefect.client.orchestration import get_client
    from prefect.logging.loggers import flow_run_logger
    from prefect.runtime import flow_run

    current, top = flow_run.get_id(), flow_run.get_root_flow_run_id()
    if not top or top == current:
        return None
    with get_client(sync_client=True) as client:  # its name, for the console's "Flow run '<name>'"
        return flow_run_logger(flow_run=client.read_flow_run(top))
