"""MLflow bookkeeping: one parent run per pipeline run, one nested run per stage.

Everything goes through an explicit ``MlflowClient`` and run ids rather than MLflow's fluent
``start_run`` stack: Prefect may run tasks in worker threads, where a thread-local "active run"
would silently attach metrics to the wrong run.
"""

from __future__ import annotations

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

from srdiff_core.config import Config, random_clip_weights
from tasks.common import data_root

PARENT_TAG = "mlflow.parentRunId"
STAGE_TAG = "srdiff.stage"
FLOW_RUN_TAG = "prefect.flow_run_id"
REUSED_TAG = "srdiff.reused_from_run"
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
        return exp.experiment_id
    location = artifact_root(cfg) if not cfg.tracking.mlflow_uri else None
    return client.create_experiment(cfg.tracking.experiment, artifact_location=location)


def environment_tags() -> dict[str, str]:
    tags = {"env.python": platform.python_version(), "env.host": platform.node()}
    for pkg in PACKAGES:
        try:
            tags[f"env.{pkg}"] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    tags["env.device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return tags


def flatten(prefix: str, value: Any) -> dict[str, str]:
    """Nested config -> dotted MLflow params (values truncated to MLflow's 6000-char limit)."""
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for k, v in value.items():
            out.update(flatten(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    return {prefix: json.dumps(value)[:6000] if not isinstance(value, str) else value[:6000]}


def clip_weights_tags(cfg: Config) -> dict[str, str]:
    """Which CLIP weights the run's semantic guidance comes from, on every run: a run made with
    random weights (embed.pretrained: none) must say so wherever it is read alone."""
    return {"clip.pretrained": cfg.embed.pretrained,
            "clip.random_weights": str(random_clip_weights(cfg.embed.pretrained)).lower()}


def start_parent_run(cfg: Config, *, flow_run_id: str | None, stages: list[str],
                     config_path: str | None) -> str:
    client = client_for(cfg)
    tags = {STAGE_TAG: "pipeline", "srdiff.stages": ",".join(stages), **environment_tags(), **clip_weights_tags(cfg)}
    if flow_run_id:
        tags[FLOW_RUN_TAG] = flow_run_id
    if config_path:
        tags["srdiff.config_path"] = str(config_path)
    run = client.create_run(experiment_id(client, cfg), run_name=f"{cfg.name}", tags=tags)
    log_params(cfg, run.info.run_id, flatten("", cfg.model_dump(mode="json")))
    client.log_text(run.info.run_id, cfg.model_dump_json(indent=2), "config.json")
    return run.info.run_id


def start_stage_run(cfg: Config, parent_run_id: str, stage: str, *, flow_run_id: str | None,
                    tags: dict[str, str] | None = None) -> str:
    client = client_for(cfg)
    all_tags = {PARENT_TAG: parent_run_id, STAGE_TAG: stage, **environment_tags(), **clip_weights_tags(cfg),
                **(tags or {})}
    if flow_run_id:
        all_tags[FLOW_RUN_TAG] = flow_run_id
    run = client.create_run(experiment_id(client, cfg), run_name=stage, tags=all_tags)
    # The resolved config with every run, so a stage run read alone still says how it was made.
    client.log_text(run.info.run_id, cfg.model_dump_json(indent=2), "config.json")
    return run.info.run_id


def log_params(cfg: Config, run_id: str, params: dict[str, Any]) -> None:
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    client = client_for(cfg)
    for i in range(0, len(items), 100):  # MLflow's batch limit is 100 params per call
        client.log_batch(run_id, params=items[i:i + 100])


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

