"""The `srdiff` flow end to end on the tiny config, under prefect_test_harness."""

import math
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from flows import cli
from flows.pipeline import srdiff
from flows.stages import STAGE_NAMES as STAGES
from srdiff_core.config import DEGRADATIONS, load_config
from tasks.tracking import PARENT_TAG, REUSED_TAG, STAGE_TAG, tracking_uri

TINY = str(Path(__file__).parent / "configs" / "tiny.yaml")
pytestmark = pytest.mark.slow


def runs_of(client: MlflowClient, parent_id: str) -> dict[str, object]:
    exp = client.get_run(parent_id).info.experiment_id
    children = client.search_runs([exp], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'")
    return {r.data.tags[STAGE_TAG]: r for r in children}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, prefect_harness):
    root = tmp_path_factory.mktemp("pipeline")
    overrides = [f"data_root={root}"]
    first = srdiff(config_path=TINY, overrides=overrides)
    second = srdiff(config_path=TINY, overrides=overrides)
    changed = srdiff(config_path=TINY, overrides=overrides + ["train.steps=6"])
    reshard = srdiff(config_path=TINY, overrides=overrides + ["shard.maxcount=1"])
    refreshed = srdiff(config_path=TINY, overrides=overrides, stages=["shard"], refresh=["shard"])
    cfg = load_config(TINY, overrides)
    return {"root": root, "cfg": cfg, "first": first, "second": second, "changed": changed,
            "reshard": reshard, "refreshed": refreshed,
            "client": MlflowClient(tracking_uri(cfg)), "overrides": overrides}


def test_first_run_runs_every_stage_with_nested_mlflow_runs(pipeline):
    first, client = pipeline["first"], pipeline["client"]
    assert list(first["stages"]) == list(STAGES)
    assert not any(s["reused"] for s in first["stages"].values())
    parent = client.get_run(first["parent_run_id"])
    assert parent.info.status == "FINISHED"
    children = runs_of(client, first["parent_run_id"])
    assert set(children) == set(STAGES)
    assert all(r.info.status == "FINISHED" for r in children.values())
    assert children["embed"].data.tags["clip.weights"].startswith("random CLIP weights")
    # Random CLIP weights (the tiny config) are said on every run, not only the embed stage's.
    for run in (parent, *children.values()):
        assert run.data.tags["clip.random_weights"] == "true" and run.data.tags["clip.pretrained"] == "none"


def test_train_run_logs_loss_lr_throughput_and_sample_grids(pipeline):
    client, first = pipeline["client"], pipeline["first"]
    train = runs_of(client, first["parent_run_id"])["train"]
    run_id = train.info.run_id
    for name in ("loss", "lr", "grad_norm", "images_per_s"):  # log_every 2 of 4 steps
        history = client.get_metric_history(run_id, f"train/{name}")
        assert [m.step for m in history] == [2, 4] and all(math.isfinite(m.value) for m in history), name
    assert all(m.value > 0 for m in client.get_metric_history(run_id, "train/images_per_s"))
    assert [a.path for a in client.list_artifacts(run_id, "samples")] == ["samples/step_00000004.png"]
    assert train.data.params["unet.conditioning"] == "semantic" and train.data.params["train.nproc"] == "1"


def test_embed_run_logs_the_srm_cosines_per_degradation_and_the_tables_name_the_model(pipeline):
    import pyarrow.parquet as pq

    client, first = pipeline["client"], pipeline["first"]
    embed = runs_of(client, first["parent_run_id"])["embed"]
    for deg in DEGRADATIONS:
        before, after = (embed.data.metrics[f"srm/{deg}/val_cos_{w}"] for w in ("before", "after"))
        assert -1.0 <= before <= 1.0 and -1.0 <= after <= 1.0, deg
    outputs = first["stages"]["embed"]["outputs"]
    for name in ("lqcls", "gtcls", "restorecls"):
        meta = {k.decode(): v.decode() for k, v in pq.read_schema(outputs[name]).metadata.items()}
        assert meta["arch"] == "ViT-B-32" and meta["random_weights"] == "true", name
        assert meta["weights"].startswith("random") and meta["weights_digest"] and meta["preprocessing"], name


def test_evaluation_metrics_are_finite_and_named_per_degradation(pipeline):
    client, first = pipeline["client"], pipeline["first"]
    ev = runs_of(client, first["parent_run_id"])["evaluate"]
    for deg in DEGRADATIONS:
        for name in ("psnr", "ssim", "psnr_y", "lq_psnr", "lq_ssim", "lq_psnr_y"):
            value = ev.data.metrics[f"eval/{deg}/{name}"]
            assert math.isfinite(value), (deg, name, value)
    assert ev.data.params["eval.protocol.border_crop"] == "4"
    assert ev.data.params["eval.steps"] == "2" and ev.data.params["eval.seed"] == "0"
    assert ev.data.params["eval.max_sigma"] == str(pipeline["cfg"].sde.max_sigma)  # the model file's SDE
    assert ev.data.params["eval.clip_weights"].startswith("random CLIP weights")
    # LPIPS weights are not in this machine's torch hub cache: reported, never faked.
    assert "eval/hazy/lpips" not in ev.data.metrics
    assert ev.data.params["eval.protocol.lpips"].startswith("unavailable")


def test_artifacts_grids_report_and_model(pipeline):
    client, first = pipeline["client"], pipeline["first"]
    children = runs_of(client, first["parent_run_id"])
    report = {a.path for a in client.list_artifacts(children["evaluate"].info.run_id, "report")}
    assert {f"report/grid_{d}.png" for d in DEGRADATIONS} <= report
    assert {"report/report.md", "report/report.html"} <= report
    model = [a.path for a in client.list_artifacts(children["train"].info.run_id, "model")]
    assert model == ["model/model.pt"]
    text = (Path(first["stages"]["evaluate"]["outputs"]["report"])).read_text()
    assert all(d in text for d in DEGRADATIONS)
    assert "- eval.clip_weights: random CLIP weights (embed.pretrained: none)" in text


def test_seed_layout_manifest_and_pt_export(pipeline):
    root = pipeline["root"]
    for split, n in (("train", 3), ("val", 1)):
        for deg in DEGRADATIONS:
            lq = sorted(p.name for p in (root / "datasets" / split / deg / "LQ").glob("*.png"))
            gt = sorted(p.name for p in (root / "datasets" / split / deg / "GT").glob("*.png"))
            assert lq == gt and len(lq) == n
    emb_dir = Path(pipeline["first"]["stages"]["embed"]["outputs"]["embeddings"])
    assert len(list((emb_dir / "LQCLS").glob("*.pt"))) == 16
    assert len(list((emb_dir / "RestoreCLS").glob("*.pt"))) == 16


def test_second_run_hits_the_cache_everywhere(pipeline):
    first, second, client = pipeline["first"], pipeline["second"], pipeline["client"]
    assert all(s["reused"] for s in second["stages"].values())
    children = runs_of(client, second["parent_run_id"])
    assert set(children) == set(STAGES)
    for stage, run in children.items():
        assert run.data.tags[REUSED_TAG] == first["stages"][stage]["run_id"]
    assert second["stages"]["evaluate"]["metrics"] == first["stages"]["evaluate"]["metrics"]
    ev = children["evaluate"].data.metrics
    assert math.isfinite(ev["eval/hazy/psnr"])


def test_changing_a_training_setting_reruns_train_and_evaluate_only(pipeline):
    changed = pipeline["changed"]["stages"]
    assert [s for s, r in changed.items() if r["reused"]] == ["download", "shard", "embed"]
    assert changed["train"]["metrics"]["train/final_step"] == 6.0


def test_changing_the_shard_size_reruns_shard_onward(pipeline):
    stages = pipeline["reshard"]["stages"]
    assert [s for s, r in stages.items() if r["reused"]] == ["download"]
    assert stages["shard"]["metrics"]["shards/count"] == 16.0  # one pair per shard


def test_refresh_forces_one_stage_and_runs_only_up_to_it(pipeline):
    stages = pipeline["refreshed"]["stages"]
    assert list(stages) == ["download", "shard"]
    assert stages["download"]["reused"] and not stages["shard"]["reused"]
    # same inputs, deterministic writer: the recomputed shards are the cached ones, byte for byte
    assert stages["shard"]["outputs"] == pipeline["first"]["stages"]["shard"]["outputs"]


def test_every_run_records_config_and_environment(pipeline):
    client, first = pipeline["client"], pipeline["first"]
    for run in [client.get_run(first["parent_run_id"]), *runs_of(client, first["parent_run_id"]).values()]:
        assert "config.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
        assert run.data.tags["env.torch"] and run.data.tags["env.device"] == "cpu"


def test_cli_run_prints_the_results_table(pipeline, capsys):
    code = cli.main(["run", "--config", TINY, *sum((["--set", o] for o in pipeline["overrides"]), [])])
    out = capsys.readouterr().out
    assert code == 0
    assert "reused (cache)" in out and "LQ PSNR" in out
    for deg in DEGRADATIONS:
        assert deg in out
    assert "srdiff ui" in out
    assert "note: random CLIP weights (embed.pretrained: none)" in out


def test_restore_cli_on_a_folder_by_path_and_by_run_id(pipeline, tmp_path, capsys):
    """A folder with a non-image file and a greyscale image: both handled with a message, the
    colour image restored; the checkpoint given as a file and as an MLflow train run id."""
    import numpy as np
    from PIL import Image

    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)).save(src / "colour.png")
    Image.fromarray(rng.integers(0, 256, (33, 30), dtype=np.uint8)).save(src / "grey.png")
    (src / "notes.txt").write_text("not an image")
    first = pipeline["first"]["stages"]["train"]
    set_args = sum((["--set", o] for o in pipeline["overrides"]), [])
    for checkpoint, out in ((first["outputs"]["model"], tmp_path / "out_path"), (first["run_id"], tmp_path / "out_run")):
        temp_before = set(os.listdir(tempfile.gettempdir()))
        assert cli.main(["restore", str(src), str(out), "--checkpoint", checkpoint, "--config", TINY,
                         "--steps", "2", *set_args]) == 0
        err = capsys.readouterr().err
        assert "notes.txt: not an image file" in err and "grey.png: L image converted to RGB" in err
        assert "note: this model was trained with random CLIP weights" in err
        assert sorted(p.name for p in out.iterdir()) == ["colour.png", "grey.png"]
        assert Image.open(out / "colour.png").size == (52, 40) and Image.open(out / "grey.png").mode == "RGB"
        assert set(os.listdir(tempfile.gettempdir())) == temp_before  # the run's model.pt download is removed
    assert (np.asarray(Image.open(tmp_path / "out_path" / "colour.png")) ==
            np.asarray(Image.open(tmp_path / "out_run" / "colour.png"))).all()  # same seed, same model


def tiny_png(folder: Path) -> str:
    """An image to restore: restore checks its input before it loads the model."""
    from PIL import Image

    Image.new("RGB", (8, 8), (90, 120, 150)).save(folder / "in.png")
    return str(folder / "in.png")


def test_restore_cli_rejects_an_unknown_checkpoint(pipeline, tmp_path):
    with pytest.raises(SystemExit, match="neither a model.pt file nor an MLflow train run"):
        cli.main(["restore", tiny_png(tmp_path), str(tmp_path / "o.png"), "--checkpoint", "0123456789abcdef",
                  "--config", TINY, *sum((["--set", o] for o in pipeline["overrides"]), [])])


def test_restore_cli_names_a_training_checkpoint_given_for_a_model(pipeline, tmp_path, capsys):
    checkpoints = Path(pipeline["first"]["stages"]["train"]["outputs"]["checkpoints"])
    code = cli.main(["restore", tiny_png(tmp_path), str(tmp_path / "o.png"), "--checkpoint",
                     str(checkpoints / "ckpt-00000004.pt"),
                     "--config", TINY, *sum((["--set", o] for o in pipeline["overrides"]), [])])
    err = capsys.readouterr().err
    assert code == 1 and "is not an srdiff model file" in err and "model.pt" in err


def test_restore_cli_names_a_bad_model_of_a_run_by_the_run(pipeline, tmp_path, capsys):
    """A run whose model/model.pt is not a model file: the error names the run's artifact, not
    the temporary copy that is gone by the time the user reads it."""
    client, first = pipeline["client"], pipeline["first"]
    checkpoint = Path(first["stages"]["train"]["outputs"]["checkpoints"]) / "ckpt-00000004.pt"
    bad = tmp_path / "model"
    bad.mkdir()
    shutil.copyfile(checkpoint, bad / "model.pt")
    run = client.create_run(client.get_run(first["parent_run_id"]).info.experiment_id)
    client.log_artifact(run.info.run_id, str(bad / "model.pt"), "model")
    client.set_terminated(run.info.run_id)
    code = cli.main(["restore", tiny_png(tmp_path), str(tmp_path / "o.png"), "--checkpoint", run.info.run_id,
                     "--config", TINY, *sum((["--set", o] for o in pipeline["overrides"]), [])])
    err = capsys.readouterr().err
    assert code == 1 and f"model/model.pt of MLflow run {run.info.run_id} is not an srdiff model file" in err
    assert "srdiff-run-" not in err


def test_model_file_records_the_clip_weights_of_its_embeddings(pipeline):
    import torch

    client, first = pipeline["client"], pipeline["first"]
    embed = runs_of(client, first["parent_run_id"])["embed"]
    state = torch.load(first["stages"]["train"]["outputs"]["model"], weights_only=True)
    assert state["embed"]["pretrained"] == "none"
    assert state["embed"]["weights_digest"] == embed.data.params["clip.weights_digest"]


def test_a_real_mlflow_server_serves_the_runs(pipeline, tmp_path):
    """`mlflow server` (what `srdiff ui` starts) on the pipeline's store: its REST API returns the
    parent and nested runs with the stable metric names."""
    import os
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from servers import background, free_port, post_json

    from tasks.tracking import mlflow_server_command

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with background(mlflow_server_command(pipeline["cfg"], port), env=dict(os.environ), log=tmp_path / "mlflow.log",
                    health_url=f"{base}/health", timeout=180):
        exps = post_json(f"{base}/api/2.0/mlflow/experiments/search", {"max_results": 10})["experiments"]
        exp_id = next(e["experiment_id"] for e in exps if e["name"] == "srdiff")
        parent = pipeline["first"]["parent_run_id"]
        runs = post_json(f"{base}/api/2.0/mlflow/runs/search",
                         {"experiment_ids": [exp_id], "filter": f"tags.`mlflow.parentRunId` = '{parent}'"})["runs"]
    stages = {next(t["value"] for t in r["data"]["tags"] if t["key"] == STAGE_TAG): r for r in runs}
    assert set(stages) == set(STAGES)
    names = {m["key"] for m in stages["evaluate"]["data"]["metrics"]}
    assert {f"eval/{d}/{m}" for d in DEGRADATIONS for m in ("psnr", "ssim", "psnr_y", "lq_psnr")} <= names


def test_prefect_flow_run_links_to_its_mlflow_run(pipeline):
    """The MLflow parent run carries the Prefect flow-run id, and that flow run has a link artifact
    pointing at the MLflow run."""
    from prefect.client.orchestration import get_client

    client, first = pipeline["client"], pipeline["first"]
    flow_run_id = client.get_run(first["parent_run_id"]).data.tags["prefect.flow_run_id"]
    with get_client(sync_client=True) as prefect:
        artifacts = [a for a in prefect.read_artifacts() if str(a.flow_run_id) == flow_run_id]
    assert any(first["parent_run_id"] in str(a.data) for a in artifacts)


def test_an_image_restores_the_same_alone_or_in_a_batch(pipeline):
    import torch

    from srdiff_core.restorer import Restorer

    restorer = Restorer.from_file(pipeline["first"]["stages"]["train"]["outputs"]["model"])
    gen = torch.Generator().manual_seed(0)
    lq = torch.rand(3, 3, 24, 20, generator=gen)
    ctx = torch.nn.functional.normalize(torch.randn(3, restorer.srm.dim, generator=gen), dim=-1)
    together = restorer.restore(lq, ctx, steps=3, seed=5)
    for i in range(3):
        alone = restorer.restore(lq[i:i + 1], ctx[i:i + 1], steps=3, seed=5)
        torch.testing.assert_close(alone, together[i:i + 1], rtol=0, atol=1e-5)
    assert not torch.equal(together[0], together[1])  # different inputs, different outputs


def test_editing_a_module_training_imports_makes_the_train_stage_recompute(pipeline, monkeypatch):
    """As a user after `make demo`: edit a module that training runs only through its imports
    (srdiff_core/ema.py, which no hand-kept list named) and run `--stages train` in a new process
    (here: the code digest taken again, with that file's source edited). Train recomputes; the
    stages before it come from the cache."""
    from tasks import closure

    read = closure.read_source  # the sources as this process first read them (the pipeline's runs)
    ema = Path(closure.module_path("srdiff_core.ema"))
    monkeypatch.setattr(closure, "read_source", lambda p: read(p) + (b"\n# an edit\n" if p == ema else b""))
    closure.cached_code_digest.cache_clear()
    try:
        stages = srdiff(config_path=TINY, overrides=pipeline["overrides"], stages=["train"])["stages"]
    finally:
        monkeypatch.undo()
        closure.cached_code_digest.cache_clear()
    assert list(stages) == ["download", "shard", "embed", "train"]
    assert [s for s, r in stages.items() if r["reused"]] == ["download", "shard", "embed"]
    assert stages["train"]["outputs"]["model"] != pipeline["first"]["stages"]["train"]["outputs"]["model"]
