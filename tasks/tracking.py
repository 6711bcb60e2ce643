"""MLflow bookkeeping: one parent run per pipeline run, one nested run per stage.

Everything goes through an explicit ``MlflowClient`` and run ids rather than MLflow's fluent
``start_run`` stack: Prefect may run tasks in worker threads, where a thread-local "active run"
would silently attach metrics to the wrong run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from srdiff_core.config import Config, random_clip_weights
from tasks.common import data_root

PARENT_TAG = "mlflow.parentRunId"
STAGE_TAG = "srdiff.stage"
FLOW_RUN_TAG = "prefect.flow_run_id"
REUSED_TAG = "srdiff.reused_from_run"
CACHED_TAG = "srdiff.cached"  # "true"/"false" on every stage run: a column the run list can show
# MLflow 3's UI opens an experiment by its kind; without this tag it may infer a GenAI experiment
# and open on the traces overview. The values are the UI's (ExperimentKind in mlflow/server/js).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
RUN_NAME_TAG = "mlflow.runName"
# The stages whose runs carry MLflow's system metrics (system/*) when tracking.system_metrics is on.
SYSTEM_METRICS_STAGES = ("embed", "train")
# The stages whose runs carry the UNet settings as tags (what differs between two of their runs).
UNET_STAGES = ("train", "evaluate")
PACKAGES = ("srdiff", "torch", "torchvision", "open_clip_torch", "prefect", "mlflow", "webdataset",
            "pyarrow", "numpy")


def tracking_uri(cfg: Config) -> str:
    """The configured URI, or a SQLite file in the data root (MLflow 3 refuses ./mlruns)."""
    if cfg.tracking.mlflow_uri:
        return cfg.tracking.mlflow_uri
    root = data_root(cfg)
    if "://" in root:
        raise ValueError(f"data_root {root} is remote: set tracking.mlflow_uri to an MLflow server "
                         f"(e.g. http://127.0.0.1:5000) or a sqlite:/// path on local disk")
    return f"sqlite:///{Path(root) / 'mlflow.db'}"


def artifact_root(cfg: Config) -> str:
    return (Path(data_root(cfg)) / "mlartifacts").as_uri()


def mlflow_server_command(cfg: Config, port: int) -> list[str]:
    """`mlflow server` on the pipeline's run store: loopback, one worker (small machines)."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", tracking_uri(cfg)]
    if not cfg.tracking.mlflow_uri:
        cmd += ["--default-artifact-root", artifact_root(cfg)]
    return cmd


def client_for(cfg: Config) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri(cfg))


def experiment_id(client: MlflowClient, cfg: Config) -> str:
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is not None:
        if EXPERIMENT_KIND_TAG not in exp.tags:  # an experiment made before the tag (a user's value stays)
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    location = artifact_root(cfg) if not cfg.tracking.mlflow_uri else None
    return client.create_experiment(cfg.tracking.experiment, artifact_location=location,
                                     tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})


def environment_tags() -> dict[str, str]:
    # env.pid with env.host: a later run can tell a run whose process is gone (killed) from a live one.
    tags = {"env.python": platform.python_version(), "env.host": platform.node(), "env.pid": str(os.getpid())}
    for pkg in PACKAGES:
        try:
            tags[f"env.{pkg}"] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    tags["env.device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return tags


def flatten(prefix: str, value: Any) -> dict[str, str]:
    """Nested config -> dotted MLflow params (log_params shortens values over MLflow's limit). A
    mapping keyed by data rather than field names (download.from_paths: dataset -> paths) stays
    one JSON value when a key is not a plain name, since MLflow refuses such names."""
    if isinstance(value, dict) and (not prefix or all(_plain_name(str(k)) for k in value)):
        out: dict[str, str] = {}
        for k, v in value.items():
            out.update(flatten(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    return {prefix: value if isinstance(value, str) else json.dumps(value)}


def _plain_name(key: str) -> bool:
    return bool(key) and all(c.isascii() and (c.isalnum() or c in "_-") for c in key)


def clip_weights_tags(cfg: Config) -> dict[str, str]:
    """Which CLIP weights the run's semantic guidance comes from, on every run: a run made with
    random weights (embed.pretrained: none) must say so wherever it is read alone."""
    return {"clip.pretrained": cfg.embed.pretrained,
            "clip.random_weights": str(random_clip_weights(cfg.embed.pretrained)).lower()}


def unet_tags(cfg: Config) -> dict[str, str]:
    """The UNet settings that tell two trained models apart, as tags (columns in the run list)."""
    return {"unet.conditioning": cfg.unet.conditioning, "unet.layout": cfg.unet.layout}


def parent_run_name(cfg: Config, stages: list[str], now: float | None = None) -> str:
    """A parent run's name a person can tell apart in the run list: config name, conditioning,
    layout, the stages when not all five, and the start time (e.g. srdiff-demo semantic srdiff 0612-1830)."""
    stamp = time.strftime("%m%d-%H%M%S", time.localtime(time.time() if now is None else now))
    only = f" to-{stages[-1]}" if stages and stages[-1] != "evaluate" else ""
    return f"{cfg.name} {cfg.unet.conditioning} {cfg.unet.layout}{only} {stamp}"


def start_parent_run(cfg: Config, *, flow_run_id: str | None, stages: list[str],
                     config_path: str | None) -> str:
    client = client_for(cfg)
    tags = {STAGE_TAG: "pipeline", "srdiff.stages": ",".join(stages), **environment_tags(), **clip_weights_tags(cfg),
            **unet_tags(cfg)}
    if flow_run_id:
        tags[FLOW_RUN_TAG] = flow_run_id
    if config_path:
        tags["srdiff.config_path"] = str(config_path)
    run = client.create_run(experiment_id(client, cfg), run_name=parent_run_name(cfg, stages), tags=tags)
    log_params(cfg, run.info.run_id, flatten("", cfg.model_dump(mode="json")))
    client.log_text(run.info.run_id, cfg.model_dump_json(indent=2), "config.json")
    return run.info.run_id


def start_stage_run(cfg: Config, parent_run_id: str, stage: str, *, flow_run_id: str | None,
                    tags: dict[str, str] | None = None) -> str:
    client = client_for(cfg)
    all_tags = {PARENT_TAG: parent_run_id, STAGE_TAG: stage, **environment_tags(), **clip_weights_tags(cfg),
                **(unet_tags(cfg) if stage in UNET_STAGES else {}), **(tags or {})}
    if flow_run_id:
        all_tags[FLOW_RUN_TAG] = flow_run_id
    run = client.create_run(experiment_id(client, cfg), run_name=stage, tags=all_tags)
    # The resolved config with every run, so a stage run read alone still says how it was made.
    client.log_text(run.info.run_id, cfg.model_dump_json(indent=2), "config.json")
    return run.info.run_id


PARAMS_FULL_DIR = "params-full"  # artifacts holding the whole value of params too long for MLflow


def log_params(cfg: Config, run_id: str, params: dict[str, Any]) -> None:
    """Log params by name. A value over MLflow's limit (MAX_PARAM_VAL_LENGTH characters) is logged
    shortened, ending with its length and sha256, and whole as the artifact params-full/<name>.txt."""
    client = client_for(cfg)
    items = []
    for key, value in params.items():
        text = str(value)
        if len(text) > MAX_PARAM_VAL_LENGTH:
            artifact = f"{PARAMS_FULL_DIR}/{key}.txt"
            client.log_text(run_id, text, artifact)
            text = shortened_param(text, artifact)
        items.append(Param(key, text))
    for i in range(0, len(items), 100):  # MLflow's batch limit is 100 params per call
        client.log_batch(run_id, params=items[i:i + 100])


def shortened_param(text: str, artifact: str) -> str:
    """A value cut to MLflow's limit that says it was cut, how to recognise it and where it is whole."""
    tail = (f" ... [{len(text)} characters, sha256 {hashlib.sha256(text.encode()).hexdigest()}; "
            f"the whole value is the run's artifact {artifact}]")
    return text[:MAX_PARAM_VAL_LENGTH - len(tail)] + tail


def log_metrics(cfg: Config, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """Log finite metrics; a non-finite value (e.g. PSNR of identical images) becomes a tag."""
    client = client_for(cfg)
    now = int(1000 * time.time())
    finite = [Metric(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(float(v))]
    for i in range(0, len(finite), 500):
        client.log_batch(run_id, metrics=finite[i:i + 500])
    odd = {k: str(v) for k, v in metrics.items() if not math.isfinite(float(v))}
    if odd:
        client.log_batch(run_id, tags=[RunTag(f"nonfinite.{k}", v) for k, v in odd.items()])


def set_tags(cfg: Config, run_id: str, tags: dict[str, str]) -> None:
    client_for(cfg).log_batch(run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])


def log_artifact(cfg: Config, run_id: str, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
    client = client_for(cfg)
    if Path(local_path).is_dir():
        client.log_artifacts(run_id, str(local_path), artifact_path)
    else:
        client.log_artifact(run_id, str(local_path), artifact_path)


def end_run(cfg: Config, run_id: str, status: str = "FINISHED") -> None:
    client_for(cfg).set_terminated(run_id, status=status)


def run_url(cfg: Config, run_id: str) -> str:
    """A link to the run in the MLflow UI (the server ``srdiff ui`` starts, by default)."""
    base = cfg.tracking.mlflow_uri if (cfg.tracking.mlflow_uri or "").startswith("http") else "http://127.0.0.1:5000"
    exp = client_for(cfg).get_run(run_id).info.experiment_id
    return f"{base.rstrip('/')}/#/experiments/{exp}/runs/{run_id}"


def mark_reused(cfg: Config, run_id: str, stage: str, reused: bool) -> None:
    """Say in the run list whether a stage run reused cached outputs: its name ("train (cached)")
    and a column-friendly tag (srdiff.cached true/false; srdiff.reused_from_run names the run)."""
    tags = {CACHED_TAG: str(reused).lower()}
    if reused:
        tags[RUN_NAME_TAG] = f"{stage} (cached)"
    set_tags(cfg, run_id, tags)


class SystemMetrics:
    """MLflow's system metrics monitor (mlflow.system_metrics) on one run, by run id and tracking
    URI (no fluent active run): CPU, memory, disk, network and, with nvidia-ml-py and a GPU, GPU
    utilisation and memory, logged as system/* every ``interval_s`` seconds while the stage runs.

    MLflow's monitor publishes only full sampling windows; :meth:`stop` also publishes the samples
    of the last, partial one, so a stage shorter than the interval still has its system metrics."""

    def __init__(self, cfg: Config, run_id: str):
        self.monitor = None
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.monitor = SystemMetricsMonitor(run_id, sampling_interval=cfg.tracking.system_metrics_interval_s,
                                                tracking_uri=tracking_uri(cfg))
        except ImportError as e:  # psutil missing: the run goes on without system metrics
            import logging

            logging.getLogger("srdiff").warning(f"system metrics unavailable ({e}); pip install psutil")

    def start(self) -> "SystemMetrics":
        if self.monitor is not None:
            self.monitor.start()
        return self

    def stop(self) -> None:
        monitor, self.monitor = self.monitor, None
        if monitor is None:
            return
        monitor.finish()  # stops the sampling thread and flushes what it published
        if any(m.metrics for m in monitor.monitors):  # samples of the last, partial window
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()


def system_metrics(cfg: Config, run_id: str, stage: str) -> SystemMetrics | None:
    """A started :class:`SystemMetrics` for the embed and train runs when tracking.system_metrics is on."""
    if not cfg.tracking.system_metrics or stage not in SYSTEM_METRICS_STAGES:
        return None
    return SystemMetrics(cfg, run_id).start()
