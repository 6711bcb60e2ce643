"""The `srdiff` flow: five stage subflows, content-keyed caching, one MLflow parent run.

The stages, their inputs and outputs are declared once in flows/stages.py. Each stage's cache
key is the digest of its upstream outputs' digests, its config sections and its code (the import
closure of its task module, tasks/closure.py; see `Stage.cache_key`), so rerunning the pipeline
skips what is already done and reruns exactly what changed. A cached stage still gets a nested MLflow run under the new
parent, tagged with the run that produced its outputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from prefect import flow, get_run_logger, runtime
from prefect.artifacts import create_link_artifact
from prefect.cache_policies import CacheKeyFnPolicy

from flows.stages import BY_NAME, STAGES, Stage, stages_to_run, unknown
from srdiff_core.config import Config, load_config
from storage import fs
from tasks import tracking
from tasks.common import StageResult, data_root
from tasks.stage_hooks import StageHooks

__all__ = ["PipelineRun", "execute", "run_stage", "srdiff", "stages_to_run", "summary"]


@dataclass
class PipelineRun:
    """What `srdiff run` prints: per-stage results and whether each was reused from cache."""

    parent_run_id: str
    results: dict[str, StageResult] = field(default_factory=dict)
    reused: dict[str, bool] = field(default_factory=dict)


def _key_storage(cfg: Config) -> Path:
    root = data_root(cfg)
    if "://" in root:
        return Path.home() / ".cache" / "srdiff" / "prefect-cache-keys"
    return Path(root) / ".prefect-cache-keys"


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
    hooks = StageHooks(cfg, stage.name, run_id, parent_run_id=parent_run_id, upstream=upstream).start()
    policy = CacheKeyFnPolicy(cache_key_fn=lambda context, params: params["key"]).configure(
        key_storage=_key_storage(cfg))
    try:
        state = stage.task.with_options(cache_policy=policy, refresh_cache=refresh)(
            cfg, key=key, run_id=run_id, return_state=True, **inputs)
        result: StageResult = state.result()
        reused = result.run_id != run_id
        if reused and not _outputs_exist(result):
            log.warning(f"{stage.name}: cached outputs are gone ({result.outputs}); recomputing")
            state = stage.task.with_options(cache_policy=policy, refresh_cache=True)(
                cfg, key=key, run_id=run_id, return_state=True, **inputs)
            result, reused = state.result(), False
        stage.check_outputs(result)
    except BaseException:
        hooks.failed()
        tracking.end_run(cfg, run_id, "FAILED")
        raise
    tracking.log_params(cfg, run_id, result.params)
    tracking.log_metrics(cfg, run_id, result.metrics)
    if reused:
        tracking.set_tags(cfg, run_id, {tracking.REUSED_TAG: result.run_id or "unknown", "srdiff.cached": "true"})
        log.info(f"{stage.name}: reused cached outputs of MLflow run {result.run_id} (key {key[:12]})")
    hooks.finished(result, reused)  # system metrics, datasets, registered model, Prefect artifacts
    tracking.end_run(cfg, run_id)
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
    parent = tracking.start_parent_run(cfg, flow_run_id=flow_run_id, stages=plan, config_path=config_path)
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
        raise
    tracking.end_run(cfg, parent)
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
