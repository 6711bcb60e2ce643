"""What the MLflow and Prefect UIs show of a stage run, beside its params and metrics: one hook
object per stage run, called by flows/pipeline.py ``run_stage`` where the stage's nested MLflow
run starts and ends.

* start: MLflow's system metrics on the embed and train runs (tasks/tracking.py SystemMetrics);
  the dataset inputs of the stages that read an upstream table (tasks/lineage.py).
* finish: cached or not, in the run name and a tag; the download stage's dataset inputs (the
  manifest it wrote) and its counts as a Prefect table; the train stage's model as a logged
  pyfunc model and a registered version, unless it was reused (tasks/registry.py); the evaluate
  stage's metrics on the version it evaluated, and its table and report as Prefect artifacts
  (tasks/artifacts.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

from srdiff_core.config import Config
from storage import fs
from tasks import artifacts, lineage, registry, tracking
from tasks.common import StageResult, stage_logger


class StageHooks:
    def __init__(self, cfg: Config, stage: str, run_id: str, *, parent_run_id: str | None = None,
                 upstream: Mapping[str, StageResult] | None = None):
        self.cfg, self.stage, self.run_id, self.parent_run_id = cfg, stage, run_id, parent_run_id
        self.upstream = dict(upstream or {})
        self.monitor: tracking.SystemMetrics | None = None

    def start(self) -> "StageHooks":
        """Before the stage's task; on an error the run is ended FAILED (and the error raised)."""
        with self._failing_the_run():
            self.monitor = tracking.system_metrics(self.cfg, self.run_id, self.stage)
            if self.stage != "download":
                lineage.log_inputs(self.cfg, self.run_id,
                                   lineage.stage_inputs(self.cfg, self.stage, None, self.upstream))
        return self

    @contextmanager
    def _failing_the_run(self):
        try:
            yield
        except BaseException:
            self._stop_monitor()
            tracking.end_run(self.cfg, self.run_id, "FAILED")
            raise

    def _stop_monitor(self) -> None:
        if self.monitor is not None:
            self.monitor.stop()
            self.monitor = None

    def failed(self) -> None:
        self._stop_monitor()

    def finished(self, result: StageResult, reused: bool) -> None:
        """After the stage's task and its params/metrics, before its run ends; on an error the run
        is ended FAILED (and the error raised)."""
        self._stop_monitor()
        with self._failing_the_run():
            self._finish(result, reused)

    def _finish(self, result: StageResult, reused: bool) -> None:
        cfg, run_id = self.cfg, self.run_id
        tracking.mark_reused(cfg, run_id, self.stage, reused)
        root_flow_run = self._root_flow_run()
        if self.stage == "download":
            lineage.log_inputs(cfg, run_id, lineage.stage_inputs(cfg, "download", result, self.upstream))
            artifacts.publish_datasets(cfg, result.outputs["manifest"], result.outputs["quarantine"],
                                       result.metrics, root_flow_run)
        elif self.stage == "train" and not reused:  # a reused train stage's version is its first run's
            version = registry.log_and_register(cfg, run_id, result)
            if version is not None:
                stage_logger().info(f"train: registered models:/{version.name}/{version.version} "
                                    f"(MLflow run {run_id})")
        elif self.stage == "evaluate":
            train = self.upstream.get("train")
            registry.record_evaluation(cfg, train.run_id if train else None, run_id, result.metrics)
            self._publish_evaluation(result, root_flow_run)

    def _root_flow_run(self) -> str | None:
        """The pipeline's top-level Prefect flow run (the MLflow parent run's prefect.flow_run_id)."""
        if not self.parent_run_id:
            return None
        return tracking.client_for(self.cfg).get_run(self.parent_run_id).data.tags.get(tracking.FLOW_RUN_TAG)

    def _publish_evaluation(self, result: StageResult, root_flow_run: str | None) -> None:
        cfg = self.cfg
        links = {"evaluate run": tracking.run_url(cfg, self.run_id)}
        if self.parent_run_id:
            links["pipeline run"] = tracking.run_url(cfg, self.parent_run_id)
        report_url = result.outputs.get("report", "")
        report = fs.read_bytes(report_url).decode() if report_url and fs.exists(report_url) else \
            f"(report {Path(report_url).name or 'report.md'} not found)"
        artifacts.publish_evaluation(cfg, result.metrics, report, links, root_flow_run)
