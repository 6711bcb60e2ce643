"""The `srdiff` flow: five stage subflows, content-keyed caching, one MLflow parent run.

Each stage's cache key is the digest of its upstream outputs' digests, its config sections and
its code (see `tasks.common.stage_key`), so rerunning the pipeline skips what is already done
and reruns exactly what changed. A cached stage still gets a nested MLflow run under the new
parent, tagged with the run that produced its outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from prefect import flow, get_run_logger, runtime
from prefect.artifacts import create_link_artifact
from prefect.cache_policies import CacheKeyFnPolicy

import tasks.acquire
import tasks.datasets
import tasks.download
import tasks.embed
import tasks.evaluate
import tasks.launch
import tasks.shard
import tasks.normalise
import tasks.train
from flows import embed_ddp, train_ddp
from srdiff_core import checkpoint, clip_embed, demo_data, degradations, distributed, fid, metrics, restorer
from srdiff_core import samplers, sde, srm, training, unet
from srdiff_core.config import STAGES, Config, load_config
from storage import archives, embed_cache, fetch, fs, shards
from storage import tables as storage_tables
from tasks import tracking
from tasks.common import StageResult, code_digest, data_root, stage_key

# The config sections and code each stage's outputs depend on (its own, not upstream's: those
# enter through the upstream digests).
STAGE_SECTIONS = {
    "download": ("download",),
    "shard": ("shard",),
    "embed": ("embed",),
    "train": ("sde", "unet", "train"),
    "evaluate": ("sde", "evaluate"),
}
STAGE_CODE = {
    "download": (tasks.download, tasks.acquire, tasks.datasets, tasks.normalise, archives, fetch, demo_data,
                 degradations, storage_tables),
    "shard": (tasks.shard, shards),
    "embed": (tasks.embed, tasks.embed_tables, tasks.launch, embed_ddp, clip_embed, srm, distributed,
              embed_cache),
    "train": (tasks.train, tasks.embed_tables, tasks.launch, train_ddp, training, checkpoint, distributed, sde,
              unet, samplers),
    "evaluate": (tasks.evaluate, tasks.embed_tables, metrics, fid, restorer, samplers),
}


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


def run_stage(stage_task, stage: str, cfg: Config, parent_run_id: str, upstream: dict[str, str],
              refresh: bool, **inputs) -> tuple[StageResult, bool]:
    """Run one stage task through Prefect's cache inside its own nested MLflow run."""
    log = get_run_logger()
    key = stage_key(stage, cfg, STAGE_SECTIONS[stage], upstream, code_digest(*STAGE_CODE[stage]))
    flow_run_id = str(runtime.flow_run.id) if runtime.flow_run.id else None
    run_id = tracking.start_stage_run(cfg, parent_run_id, stage, flow_run_id=flow_run_id,
                                      tags={"srdiff.cache_key": key})
    policy = CacheKeyFnPolicy(cache_key_fn=lambda context, params: params["key"]).configure(
        key_storage=_key_storage(cfg))
    try:
        state = stage_task.with_options(cache_policy=policy, refresh_cache=refresh)(
            cfg, key=key, run_id=run_id, return_state=True, **inputs)
        result: StageResult = state.result()
        reused = result.run_id != run_id
        if reused and not _outputs_exist(result):
            log.warning(f"{stage}: cached outputs are gone ({result.outputs}); recomputing")
            state = stage_task.with_options(cache_policy=policy, refresh_cache=True)(
                cfg, key=key, run_id=run_id, return_state=True, **inputs)
            result, reused = state.result(), False
    except BaseException:
        tracking.end_run(cfg, run_id, "FAILED")
        raise
    tracking.log_params(cfg, run_id, result.params)
    tracking.log_metrics(cfg, run_id, result.metrics)
    if reused:
        tracking.set_tags(cfg, run_id, {tracking.REUSED_TAG: result.run_id or "unknown", "srdiff.cached": "true"})
        log.info(f"{stage}: reused cached outputs of MLflow run {result.run_id} (key {key[:12]})")
    tracking.end_run(cfg, run_id)
    return result, reused


@flow(name="srdiff-download", flow_run_name="download")
def download_flow(cfg: Config, parent_run_id: str, refresh: bool = False) -> tuple[StageResult, bool]:
    # The dataset catalog is a file of its own: editing a source or an expected count reruns the stage.
    upstream = {"catalog": catalog_digest(cfg)} if cfg.download.source == "real" else {}
    return run_stage(tasks.download.download, "download", cfg, parent_run_id, upstream, refresh)


def catalog_digest(cfg: Config) -> str:
    catalog = Path(tasks.datasets.resolve_catalog(cfg.download.datasets_file))
    return fs.sha256_file(catalog) if catalog.exists() else "missing"


@flow(name="srdiff-shard", flow_run_name="shard")
def shard_flow(cfg: Config, parent_run_id: str, download: StageResult, refresh: bool = False):
    return run_stage(tasks.shard.shard, "shard", cfg, parent_run_id, {"manifest": download.digest}, refresh,
                     manifest_url=download.outputs["manifest"])


@flow(name="srdiff-embed", flow_run_name="embed")
def embed_flow(cfg: Config, parent_run_id: str, shard: StageResult, refresh: bool = False):
    return run_stage(tasks.embed.embed, "embed", cfg, parent_run_id, {"shards": shard.digest}, refresh,
                     shards_url=shard.outputs["shards"])


@flow(name="srdiff-train", flow_run_name="train")
def train_flow(cfg: Config, parent_run_id: str, shard: StageResult, embed: StageResult, refresh: bool = False):
    return run_stage(tasks.train.train, "train", cfg, parent_run_id,
                     {"shards": shard.digest, "restorecls": embed.digest}, refresh,
                     shards_url=shard.outputs["shards"], restorecls_url=embed.outputs["restorecls"],
                     srm_url=embed.outputs["srm"])


@flow(name="srdiff-evaluate", flow_run_name="evaluate")
def evaluate_flow(cfg: Config, parent_run_id: str, shard: StageResult, embed: StageResult, train: StageResult,
                  refresh: bool = False):
    return run_stage(tasks.evaluate.evaluate, "evaluate", cfg, parent_run_id,
                     {"shards": shard.digest, "restorecls": embed.digest, "model": train.digest}, refresh,
                     shards_url=shard.outputs["shards"], restorecls_url=embed.outputs["restorecls"],
                     model_url=train.outputs["model"])


def stages_to_run(stages: list[str] | None) -> list[str]:
    """The selected stages and every stage before the last one (upstream comes from cache)."""
    if not stages:
        return list(STAGES)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
    last = max(STAGES.index(s) for s in stages)
    return list(STAGES[:last + 1])


def execute(cfg: Config, *, stages: list[str] | None = None, refresh: list[str] | tuple[str, ...] = (),
            config_path: str | None = None) -> PipelineRun:
    """The pipeline body: stages in order inside one MLflow parent run."""
    plan = stages_to_run(stages)
    bad = [s for s in refresh if s not in STAGES]
    if bad:
        raise ValueError(f"unknown stage(s) to refresh {bad}; choose from {', '.join(STAGES)}")
    flow_run_id = str(runtime.flow_run.id) if runtime.flow_run.id else None
    parent = tracking.start_parent_run(cfg, flow_run_id=flow_run_id, stages=plan, config_path=config_path)
    run = PipelineRun(parent_run_id=parent)
    try:
        if flow_run_id:
            create_link_artifact(tracking.run_url(cfg, parent), link_text="MLflow run",
                                 description=f"MLflow parent run {parent} of this pipeline run")
        r = run.results
        steps = {
            "download": lambda: download_flow(cfg, parent, refresh="download" in refresh),
            "shard": lambda: shard_flow(cfg, parent, r["download"], refresh="shard" in refresh),
            "embed": lambda: embed_flow(cfg, parent, r["shard"], refresh="embed" in refresh),
            "train": lambda: train_flow(cfg, parent, r["shard"], r["embed"], refresh="train" in refresh),
            "evaluate": lambda: evaluate_flow(cfg, parent, r["shard"], r["embed"], r["train"],
                                              refresh="evaluate" in refresh),
        }
        for stage in plan:
            r[stage], run.reused[stage] = steps[stage]()
        reused = [s for s in plan if run.reused[s]]
        tracking.set_tags(cfg, parent, {"srdiff.reused_stages": ",".join(reused) or "none",
                                        **{f"srdiff.reused.{s}": r[s].run_id or "" for s in reused}})
        if "evaluate" in r:
            tracking.log_metrics(cfg, parent, {k: v for k, v in r["evaluate"].metrics.items()
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
