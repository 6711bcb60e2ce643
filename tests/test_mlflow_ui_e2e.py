"""What the MLflow and Prefect UIs show of one tiny pipeline run, read the way the UIs read it: a
real `mlflow server` on 127.0.0.1 and its REST API (the registered model and its version, the
runs' dataset inputs, system metrics on the train run, the experiment kind, run names and
headline metrics), the registered model through mlflow.pyfunc and `srdiff restore`, and the
Prefect artifacts of the flow run (results table, report, dataset counts, training progress)."""

from __future__ import annotations

import json
import os
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from servers import background, free_port, post_json  # noqa: E402

from flows import cli  # noqa: E402
from flows.pipeline import srdiff  # noqa: E402
from srdiff_core.config import load_config  # noqa: E402
from tasks import artifacts, tracking  # noqa: E402

TINY = str(Path(__file__).parent / "configs" / "tiny.yaml")
pytestmark = pytest.mark.slow
STAGES = ("download", "shard", "embed", "train", "evaluate")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, prefect_harness):
    """One tiny pipeline run with system metrics on (sampled every half second)."""
    root = tmp_path_factory.mktemp("mlflow-ui")
    overrides = [f"data_root={root}", "tracking.system_metrics=true", "tracking.system_metrics_interval_s=0.5"]
    summary = srdiff(config_path=TINY, overrides=overrides)
    return {"cfg": load_config(TINY, overrides), "summary": summary, "overrides": overrides, "root": root}


def get_json(url: str, **params) -> dict:
    with urllib.request.urlopen(f"{url}?{urllib.parse.urlencode(params)}", timeout=30) as r:
        return json.loads(r.read())


def tags_of(entity: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in entity.get("tags", entity.get("data", {}).get("tags", []))}


def test_the_mlflow_server_shows_the_registered_model_datasets_and_system_metrics(pipeline, tmp_path):
    cfg, summary = pipeline["cfg"], pipeline["summary"]
    runs = {s: summary["stages"][s]["run_id"] for s in STAGES}
    port = free_port()
    base = f"http://127.0.0.1:{port}/api/2.0/mlflow"
    with background(tracking.mlflow_server_command(cfg, port), env=dict(os.environ), log=tmp_path / "mlflow.log",
                    health_url=f"http://127.0.0.1:{port}/health", timeout=180):
        exps = post_json(f"{base}/experiments/search", {"max_results": 10})["experiments"]
        exp = next(e for e in exps if e["name"] == "srdiff")
        model = get_json(f"{base}/registered-models/get", name="srdiff")["registered_model"]
        versions = get_json(f"{base}/model-versions/search", filter="name='srdiff'")["model_versions"]
        found = post_json(f"{base}/runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 100})["runs"]
        by_id = {r["info"]["run_id"]: r for r in found}
        history = get_json(f"{base}/metrics/get-history", run_id=runs["train"],
                           metric_key="system/cpu_utilization_percentage")["metrics"]

    # The experiment opens on training runs, not on MLflow's GenAI overview.
    assert tags_of(exp)["mlflow.experimentKind"] == "custom_model_development"
    # One registered version, linked to the train run, tagged with what distinguishes it, with the
    # evaluate stage's headline metrics.
    assert model["name"] == "srdiff" and model["latest_versions"][0]["version"] == "1"
    (version,) = versions
    assert version["run_id"] == runs["train"] and version["status"] == "READY"
    vtags = tags_of(version)
    assert (vtags["unet.conditioning"], vtags["unet.layout"], vtags["clip.pretrained"]) == ("semantic", "srdiff", "none")
    assert vtags["srdiff.evaluate_run"] == runs["evaluate"] and "eval/all/psnr" in vtags
    assert "| all |" in version["description"]
    # Every stage run names the datasets it read, with their context.
    contexts = {}
    for stage, run_id in runs.items():
        inputs = by_id[run_id]["inputs"]["dataset_inputs"]
        contexts[stage] = sorted((i["dataset"]["name"], tags_of(i)["mlflow.data.context"]) for i in inputs)
    assert contexts == {"download": [("demo", "evaluation"), ("demo", "training")],
                        "shard": [("demo", "evaluation"), ("demo", "training")],
                        "embed": [("demo-shards", "evaluation"), ("demo-shards", "training")],
                        "train": [("demo-shards", "training")], "evaluate": [("demo-shards", "evaluation")]}
    # System metrics on the train and embed runs only.
    metric_names = {s: {m["key"] for m in by_id[r]["data"].get("metrics", [])} for s, r in runs.items()}
    for stage in ("train", "embed"):
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= metric_names[stage]
    assert not any(k.startswith("system/") for s in ("download", "shard", "evaluate") for k in metric_names[s])
    assert history and all(0 <= m["value"] <= 100 * os.cpu_count() for m in history)
    # Run names and columns: a parent run a person can tell apart, with the headline metrics;
    # stage runs with the UNet settings and whether they were reused.
    parent = by_id[summary["parent_run_id"]]
    assert parent["info"]["run_name"].startswith("srdiff-tiny semantic srdiff ")
    assert "eval/all/psnr" in {m["key"] for m in parent["data"]["metrics"]}
    for stage in ("train", "evaluate"):
        t = tags_of(by_id[runs[stage]])
        assert (t["unet.conditioning"], t["unet.layout"], t["clip.pretrained"], t[tracking.CACHED_TAG]) == \
            ("semantic", "srdiff", "none", "false")
        assert by_id[runs[stage]]["info"]["run_name"] == stage
    assert tags_of(by_id[runs["train"]])["srdiff.model_uri"] == "models:/srdiff/1"
    assert vtags["srdiff.cache_key"] == tags_of(by_id[runs["train"]])["srdiff.cache_key"]


def test_the_registered_model_restores_through_pyfunc_and_srdiff_restore(pipeline, tmp_path, capsys):
    cfg = pipeline["cfg"]
    img = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking.tracking_uri(cfg))
    try:
        restored = mlflow.pyfunc.load_model("models:/srdiff/1").predict(img)
    finally:
        mlflow.set_tracking_uri(previous)
    assert restored.shape == img.shape and restored.dtype == np.uint8
    Image.fromarray(img).save(tmp_path / "photo.png")
    overrides = sum((["--set", o] for o in pipeline["overrides"]), [])
    assert cli.main(["promote", "1", "--alias", "champion", "--config", TINY, *overrides]) == 0
    assert cli.main(["restore", str(tmp_path / "photo.png"), str(tmp_path / "out.png"), "--checkpoint",
                     "models:/srdiff@champion", "--config", TINY, *overrides]) == 0
    # The same image, the same seed and steps (evaluate.steps): the same restoration.
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out.png")), restored)


def test_the_prefect_flow_run_has_the_results_as_artifacts(pipeline):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    cfg, summary = pipeline["cfg"], pipeline["summary"]
    client = tracking.client_for(cfg)
    flow_run_id = client.get_run(summary["parent_run_id"]).data.tags[tracking.FLOW_RUN_TAG]
    keys = {what: artifacts.artifact_key(cfg, what)
            for what in ("evaluation", "evaluation-report", "datasets", "embed-progress", "train-progress",
                         "evaluate-progress")}
    assert keys["evaluation"] == "srdiff-tiny-evaluation"
    # The session's Prefect server also holds other tests' srdiff-tiny runs (same keys, older
    # versions): read this pipeline's flow run's own.
    with get_client(sync_client=True) as prefect:
        found = {what: prefect.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
            for what, key in keys.items() if not what.endswith("progress")}
        # Progress artifacts belong to the stage's own (sub)flow run: the newest of the key is this run's.
        found |= {what: sorted(prefect.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))),
                               key=lambda a: a.created)[-1:]
                  for what, key in keys.items() if what.endswith("progress")}
    for what in ("evaluation", "evaluation-report", "datasets"):
        (artifact,) = found[what]
        assert str(artifact.flow_run_id) == flow_run_id, what  # on the pipeline's own flow run
    table = json.loads(found["evaluation"][0].data)
    assert [row["degradation"] for row in table] == ["hazy", "rainy", "motion-blurry", "low-light", "all"]
    assert table[-1]["PSNR"] == f"{summary['stages']['evaluate']['metrics']['eval/all/psnr']:.2f}"
    report = found["evaluation-report"][0].data
    assert summary["stages"]["evaluate"]["run_id"] in report and "| degradation |" in report
    (datasets,) = json.loads(found["datasets"][0].data)
    assert datasets["dataset"] == "demo" and datasets["train pairs"] == 12 and datasets["quarantined"] == 0
    for what in ("embed-progress", "train-progress", "evaluate-progress"):
        (progress,) = found[what]
        assert progress.type == "progress" and float(progress.data) == 100.0, what
    # `prefect deployment run --watch` follows the top-level flow run's logs: the stages' progress is there.
    with get_client(sync_client=True) as prefect:
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

        lines = [entry.message for entry in prefect.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))]
    for done in ("embed: 32/32 images (100%", "train: 4/4 steps (100%", "evaluate: 4/4 images (100%"):
        assert any(line.startswith(done) for line in lines), (done, lines)
