"""The `srdiff` flow: five stage subflows, content-keyed caching, one MLflow parent run.

The stages, their inputs and outputs are declared once in flows/stages.py. Each stage's cache
key is the digest of its upstream outputs' digests, its config sections and its code (the import
closure of its task module, tasks/closure.py; see `Stage.cache_key`), so rerunning the pipeline
skips what is already done and reruns exactly what changed. A cached stage still gets a nested MLflow run under the new
parent, tagged with the run that produced its outputs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from prefect import flow, get_run_logger, runtime
from prefect.artifacts import create_link_artifact
from prefect.cache_policies import CacheKeyFnPolicy

from flows import interrupt
from flows.stages import BY_NAME, STAGES, Stage, stages_to_run, unknown
from srdiff_core.config import Config, load_config
from storage import fs
from tasks import tracking
from tasks.advice import advised
from tasks.common import StageResult, data_root
from tasks.stage_hooks import StageHooks

__all__ = ["PipelineRun", "execute", "run_stage", "srdiff", "stages_to_run", "summary"]


@dataclass
class PipelineRun:
    """What `srdiff run` prints: per-stage results and whether each was reused from cache."""

    parent_run_id: str
    results: dict[str, StageResult] = field(default_factory=dict)
    reused: dict[str, bool] = field(default_factory=dict)


def _cache_dir(cfg: Config) -> Path:
    """Where Prefect's cache records and the stage results they point to live: beside the data
    (never in $PREFECT_HOME, so another PREFECT_HOME or a cleaned ~/.prefect keeps the cache);
    for a remote data root, in the user's cache folder."""
    root = data_root(cfg)
    if "://" in root:
        return Path.home() / ".cache" / "srdiff" / "prefect-cache"
    return Path(root).resolve()


def _key_storage(cfg: Config) -> Path:
    return _cache_dir(cfg) / ".prefect-cache-keys"


def _result_storage(cfg: Config) -> Path:
    return _cache_dir(cfg) / ".prefect-results"


def unusable_cache_record(cfg: Config, key: str) -> str | None:
    """Why the cache record of ``key`` cannot give back its result (None: no record, or a usable
    one). Records written before results lived under the data root, or whose result file was
    deleted, would make Prefect fail with a path error; the stage recomputes instead."""
    record = _key_storage(cfg) / key
    if not record.is_file():
        return None
    try:
        stored = Path(json.loads(record.read_text())["storage_key"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable cache record {record} ({e})"
    if not stored.is_relative_to(_result_storage(cfg)):
        return f"its result {stored} is outside {_result_storage(cfg)} (a cache of an older srdiff or PREFECT_HOME)"
    if not stored.is_file():
        return f"its result {stored} is gone"
    return None


def _outputs_exist(result: StageResult) -> bool:
    return all(fs.exists(url) for url in result.outputs.values())


def run_stage(stage: Stage, cfg: Config, parent_run_id: str, upstream: Mapping[str, StageResult],
              refresh: bool) -> tuple[StageResult, bool]:
    """Run one stage task through Prefect's cache inside its own nested MLflow run."""
    log = get_run_logger()
    key = stage.cache_key(cfg, upstream)
    inputs = stage.task_inputs(upstream)
    flow_run_id = str(runtime.flow_run.id) if runtime.flow_run.id else None
    run_id = tracking.start_stage_run(cfg, parent_run_id, stage.name, flow_run_id=flow_run_id,
                                      tags={"srdiff.cache_key": key})
    interrupt.note_stage(stage.name)
    interrupt.note_run(cfg, run_id)
    hooks = StageHooks(cfg, stage.name, run_id, parent_run_id=parent_run_id, upstream=upstream).start()
    policy = CacheKeyFnPolicy(cache_key_fn=lambda context, params: params["key"]).configure(
        key_storage=_key_storage(cfg))
    if not refresh and (why := unusable_cache_record(cfg, key)) is not None:
        log.warning(f"{stage.name}: cannot reuse the cached result: {why}; recomputing")
        refresh = True
    try:
        def call(refresh_cache: bool) -> StageResult:
            with advised():  # a typed error from storage/srdiff_core reaches the user with its next step
                return stage.task.with_options(cache_policy=policy, refresh_cache=refresh_cache,
                                               result_storage=_result_storage(cfg))(
                    cfg, key=key, run_id=run_id, return_state=True, **inputs).result()

        result: StageResult = call(refresh)
        reused = result.run_id != run_id
        if reused and not _outputs_exist(result):
            log.warning(f"{stage.name}: cached outputs are gone ({result.outputs}); recomputing")
            result, reused = call(True), False
        stage.check_outputs(result)
    except BaseException:
        hooks.failed()
        tracking.end_run(cfg, run_id, "FAILED")
        interrupt.forget_run(run_id)
        raise
    tracking.log_params(cfg, run_id, result.params)
    tracking.log_metrics(cfg, run_id, result.metrics)
    if reused:
        tracking.set_tags(cfg, run_id, {tracking.REUSED_TAG: result.run_id or "unknown", "srdiff.cached": "true"})
        log.info(f"{stage.name}: reused cached outputs of MLflow run {result.run_id} (key {key[:12]})")
    hooks.finished(result, reused)  # system metrics, datasets, registered model, Prefect artifacts
    tracking.end_run(cfg, run_id)
    interrupt.forget_run(run_id)
    interrupt.note_stage(None)
    return result, reused


@flow
def stage_flow(stage: str, cfg: Config, parent_run_id: str, upstream: dict[str, StageResult],
               refresh: bool = False) -> tuple[StageResult, bool]:
    """One stage as a subflow of `srdiff`; ``upstream`` holds the results of the stages it reads."""
    return run_stage(BY_NAME[stage], cfg, parent_run_id, upstream, refresh)


# One subflow per stage, named after it (srdiff-download, ...; the flow run is named by the stage).
SUBFLOWS = {s.name: stage_flow.with_options(name=f"srdiff-{s.name}", flow_run_name=s.name) for s in STAGES}


def execute(cfg: Config, *, stages: list[str] | None = None, refresh: list[str] | tuple[str, ...] = (),
            config_path: str | None = None) -> PipelineRun:
    """The pipeline body: stages in order inside one MLflow parent run."""
    plan = stages_to_run(stages)
    if (error := unknown(list(refresh), "stage(s) to refresh")) is not None:
        raise error
    flow_run_id = str(runtime.flow_run.id) if runtime.flow_run.id else None
    if closed := interrupt.close_abandoned_runs(cfg):
        get_run_logger().warning(f"marked {len(closed)} MLflow run(s) left RUNNING by a killed srdiff as KILLED: "
                                 f"{', '.join(closed)}")
    parent = tracking.start_parent_run(cfg, flow_run_id=flow_run_id, stages=plan, config_path=config_path)
    interrupt.note_run(cfg, parent)
    run = PipelineRun(parent_run_id=parent)
    try:
        if flow_run_id:
            create_link_artifact(tracking.run_url(cfg, parent), link_text="MLflow run",
                                 description=f"MLflow parent run {parent} of this pipeline run")
        r = run.results
        for name in plan:
            upstream = {u: r[u] for u in BY_NAME[name].upstream}
            r[name], run.reused[name] = SUBFLOWS[name](name, cfg, parent, upstream, refresh=name in refresh)
        reused = [s for s in plan if run.reused[s]]
        tracking.set_tags(cfg, parent, {"srdiff.reused_stages": ",".join(reused) or "none",
                                        **{f"srdiff.reused.{s}": r[s].run_id or "" for s in reused}})
        # The evaluation metrics (eval/...) of the stages that ran are the parent run's too.
        tracking.log_metrics(cfg, parent, {k: v for result in r.values() for k, v in result.metrics.items()
                                           if k.startswith("eval/")})
    except BaseException:
        tracking.end_run(cfg, parent, "FAILED")
        interrupt.forget_run(parent)
        raise
    tracking.end_run(cfg, parent)
    interrupt.forget_run(parent)
    return run


@flow(name="srdiff", log_prints=True)
def srdiff(config_path: str = "configs/default.yaml", overrides: list[str] | None = None,
           stages: list[str] | None = None, refresh: list[str] | None = None) -> dict:
    """SR-Diff pipeline: download -> shard -> embed -> train -> evaluate."""
    cfg = load_config(config_path, overrides or [])
    run = execute(cfg, stages=stages, refresh=refresh or [], config_path=config_path)
    return summary(run)


def summary(run: PipelineRun) -> dict:
    return {"parent_run_id": run.parent_run_id,
            "stages": {s: {"run_id": r.run_id, "reused": run.reused[s], "metrics": r.metrics,
                           "outputs": r.outputs} for s, r in run.results.items()}}
