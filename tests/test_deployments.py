"""Deployments against a real Prefect server: `srdiff serve`, then `prefect deployment run`."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

sys.path.insert(0, str(Path(__file__).parent))
from servers import background, free_port  # noqa: E402

from flows.deployments import deployments  # noqa: E402
from flows.stages import BY_NAME, STAGE_NAMES as STAGES  # noqa: E402
from srdiff_core.config import load_config  # noqa: E402
from tasks.tracking import PARENT_TAG, REUSED_TAG, STAGE_TAG, tracking_uri  # noqa: E402

TINY = str(Path(__file__).parent / "configs" / "tiny.yaml")
BIN = Path(sys.executable).parent


def test_deployment_parameters():
    deps = {d.name: d for d in deployments("cfg.yaml", ["train.steps=3"])}
    assert set(deps) == {"full-pipeline", *STAGES}
    assert deps["full-pipeline"].parameters == {"config_path": "cfg.yaml", "overrides": ["train.steps=3"]}
    assert deps["evaluate"].parameters["stages"] == ["evaluate"]
    assert deps["evaluate"].parameters["refresh"] == ["evaluate"]


def _run_deployment(name: str, env: dict, log: Path) -> str:
    proc = subprocess.run([str(BIN / "prefect"), "deployment", "run", name, "--watch", "--watch-timeout", "900"],
                          env=env, capture_output=True, text=True, timeout=960)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Completed" in out, f"{name}:\n{out[-3000:]}\nserve log:\n{log.read_text()[-4000:]}"
    return out


def _latest_parent(client: MlflowClient):
    exp = client.get_experiment_by_name("srdiff")
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`{STAGE_TAG}` = 'pipeline'",
                              order_by=["attributes.start_time DESC"], max_results=1)[0]


@pytest.mark.slow
def test_serve_then_run_full_pipeline_and_rerun_evaluate(tmp_path):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "HF_HUB_OFFLINE": "1"}
    env.pop("PREFECT_API_URL", None)
    server_cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with background(server_cmd, env=env, log=tmp_path / "server.log", health_url=f"{api}/health", timeout=180):
        client_env = {**env, "PREFECT_API_URL": api}
        serve_cmd = [str(BIN / "srdiff"), "serve", "--config", TINY, "--set", f"data_root={tmp_path / 'data'}"]
        serve_log = tmp_path / "serve.log"
        with background(serve_cmd, env=client_env, log=serve_log):
            _wait_for_deployment(client_env, "srdiff/full-pipeline", serve_log)
            _run_deployment("srdiff/full-pipeline", client_env, serve_log)
            cfg = load_config(TINY, [f"data_root={tmp_path / 'data'}"])
            client = MlflowClient(tracking_uri(cfg))
            first = _latest_parent(client)
            _run_deployment("srdiff/evaluate", client_env, serve_log)
            second = _latest_parent(client)
    assert second.info.run_id != first.info.run_id
    children = client.search_runs([second.info.experiment_id],
                                  filter_string=f"tags.`{PARENT_TAG}` = '{second.info.run_id}'")
    reused = {r.data.tags[STAGE_TAG]: REUSED_TAG in r.data.tags for r in children}
    assert reused == {"download": True, "shard": True, "embed": True, "train": True, "evaluate": False}
    assert first.data.tags.get("prefect.flow_run_id") and second.data.tags.get("prefect.flow_run_id")


def _wait_for_deployment(env: dict, name: str, log: Path, timeout: float = 120) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc = subprocess.run([str(BIN / "prefect"), "deployment", "inspect", name], env=env,
                              capture_output=True, text=True, timeout=60)
        if proc.returncode == 0:
            return
        time.sleep(2)
    raise TimeoutError(f"deployment {name} never appeared; serve log:\n{log.read_text()[-3000:]}")


def test_prefect_yaml_matches_the_served_deployments():
    """prefect.yaml (work pools) declares the same deployments and parameters as `srdiff serve`."""
    import yaml

    spec = yaml.safe_load((Path(__file__).parents[1] / "prefect.yaml").read_text())
    declared = {d["name"]: d for d in spec["deployments"]}
    served = {d.name: d for d in deployments("configs/default.yaml")}
    assert set(declared) == set(served)
    for name, dep in declared.items():
        assert dep["entrypoint"] == "flows/pipeline.py:srdiff"
        assert dep["parameters"] == {k: v for k, v in served[name].parameters.items() if v != []}
        pool = dep["work_pool"]["name"]
        assert pool == ("srdiff-gpu" if name == "full-pipeline" else f"srdiff-{BY_NAME[name].pool}")
        if pool == "srdiff-gpu":
            assert dep["concurrency_limit"] == 1
    assert (Path(__file__).parents[1] / "configs" / "default.yaml").exists()
