"""MLflow beyond params and metrics, without running the pipeline: the train stage's model as a
logged pyfunc model and a registered version (tasks/registry.py), `srdiff restore` and `srdiff
promote` with models:/ URIs, the stage hooks (tasks/stage_hooks.py: nothing registered for a
reused train stage; the evaluate stage's metrics on the version), dataset inputs
(tasks/lineage.py), system metrics, the experiment kind and run names (tasks/tracking.py) and the
Prefect artifacts' content (tasks/artifacts.py). The tiny CLIP of tests/embed_data.py, random
weights (embed.pretrained: none), a SQLite store per test."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from embed_data import TINY_ARCH, register_tiny_arch
from flows import cli
from srdiff_core import clip_embed, srm
from srdiff_core.config import Config, load_config
from srdiff_core.ema import make_ema
from srdiff_core.restorer import Restorer
from srdiff_core.unet import ConditionalUNet
from storage import tables
from tasks import artifacts, lineage, registry, tracking
from tasks.common import StageResult
from tasks.embed import table_metadata
from tasks.refine import save_srm
from tasks.stage_hooks import StageHooks
from tasks.train import model_file_state

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread
DIM = 16  # the tiny CLIP's embed_dim


def config_data(root: Path) -> dict:
    return {"name": "Tiny Registry", "data_root": str(root), "device": "cpu", "download": {"source": "demo"},
            "embed": {"arch": TINY_ARCH, "pretrained": "none", "srm": {"hidden": 8, "depth": 1}},
            "unet": {"nf": 8, "ch_mult": [1, 2], "num_res_blocks": 1, "context_dim": DIM, "attn_heads": 1},
            "evaluate": {"steps": 2}, "tracking": {"system_metrics": False}}


@pytest.fixture
def store(tmp_path):
    """A config (also as a YAML file, for the CLI), a model.pt of a tiny UNet, and a train run."""
    register_tiny_arch(tmp_path)
    data = config_data(tmp_path)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(data))
    cfg = Config.model_validate(data)
    torch.manual_seed(0)
    unet = ConditionalUNet.from_config(cfg.unet)
    save_srm(str(tmp_path / "srm.pt"), srm.SemanticRefinementModule.from_config(DIM, cfg.embed.srm), cfg, DIM)
    meta = table_metadata(clip_embed.load_clip(TINY_ARCH, "none"))
    torch.save(model_file_state(make_ema(unet), cfg, str(tmp_path / "srm.pt"), clip_meta=meta), tmp_path / "model.pt")
    parent = tracking.start_parent_run(cfg, flow_run_id=None, stages=["download", "train"], config_path=None)
    return {"cfg": cfg, "path": str(tmp_path / "cfg.yaml"), "model": tmp_path / "model.pt", "parent": parent,
            "client": MlflowClient(tracking.tracking_uri(cfg)), "root": tmp_path}


def train_run(store, key: str = "k" * 64) -> tuple[str, StageResult]:
    run_id = tracking.start_stage_run(store["cfg"], store["parent"], "train", flow_run_id=None)
    return run_id, StageResult("train", key, "digest", outputs={"model": str(store["model"])}, run_id=run_id)


def image(h: int = 20, w: int = 28) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture
def global_uri(store):
    """mlflow.pyfunc.load_model reads the global tracking URI: the test's store, then the previous one."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking.tracking_uri(store["cfg"]))
    yield
    mlflow.set_tracking_uri(previous)


# ---------------------------------------------------------------- the registered model


def test_a_train_run_registers_a_pyfunc_model_that_restores_like_srdiff_restore(store, global_uri):
    cfg, client = store["cfg"], store["client"]
    run_id, result = train_run(store)
    version = registry.log_and_register(cfg, run_id, result)
    assert (version.name, str(version.version)) == ("srdiff", "1")
    got = client.get_model_version("srdiff", "1")
    assert got.run_id == run_id
    assert {k: got.tags[k] for k in ("unet.conditioning", "unet.layout", "clip.pretrained", "clip.random_weights",
                                     "srdiff.cache_key")} == {"unet.conditioning": "semantic", "unet.layout": "srdiff",
                                                              "clip.pretrained": "none", "clip.random_weights": "true",
                                                              "srdiff.cache_key": "k" * 64}
    run = client.get_run(run_id)
    assert run.data.tags[registry.MODEL_URI_TAG] == "models:/srdiff/1"
    (logged,) = run.outputs.model_outputs  # the run's logged model (the UI's Models column) is the version's
    assert got.source == store["client"].get_logged_model(logged.model_id).artifact_location

    model = mlflow.pyfunc.load_model("models:/srdiff/1")
    sig = model.metadata.signature
    assert sig.inputs.to_dict() == [{"type": "tensor", "tensor-spec": {"dtype": "uint8", "shape": (-1, -1, 3)}}]
    assert {p.name for p in sig.params.params} == {"steps", "seed", "clip_x0", "tile_size"}
    assert model.metadata.saved_input_example_info is not None  # the input example is logged
    img = image()
    out = model.predict(img, params={"seed": 3})
    assert out.shape == img.shape and out.dtype == np.uint8
    # The same as restoring with the model file itself (srdiff restore's code path).
    restorer = Restorer.from_file(store["model"])
    lq = torch.from_numpy(img).permute(2, 0, 1)
    expected = restorer.restore(lq.float()[None] / 255, restorer.context_for([lq]), steps=2, seed=3)[0]
    np.testing.assert_array_equal(out, (expected.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())
    # A float image in [0, 1] through the Python model answers in float.
    floats = model.unwrap_python_model().predict(None, img.astype(np.float32) / 255, params={"seed": 3})
    assert floats.dtype == np.float32 and np.abs(floats * 255 - out).max() <= 1
    with pytest.raises(Exception, match="dtype of input float32 does not match expected dtype uint8"):
        model.predict(img.astype(np.float32))
    # The model holds model.pt and our code by reference to the installed package: no repository copy.
    local = Path(mlflow.artifacts.download_artifacts("models:/srdiff/1", dst_path=str(store["root"] / "dl")))
    assert not (local / "code").exists()
    assert (local / "artifacts" / "model.pt").read_bytes() == store["model"].read_bytes()
    assert any(line.startswith("srdiff==") for line in (local / "requirements.txt").read_text().split())


def test_registration_off_logs_the_model_without_a_version(store):
    cfg = store["cfg"].model_copy(update={"tracking": store["cfg"].tracking.model_copy(update={"register_model": False})})
    run_id, result = train_run(store)
    assert registry.log_and_register(cfg, run_id, result) is None
    assert store["client"].search_registered_models() == []
    assert len(store["client"].get_run(run_id).outputs.model_outputs) == 1


def test_restore_and_promote_take_models_uris(store, tmp_path, capsys):
    cfg, client = store["cfg"], store["client"]
    for _ in range(2):
        run_id, result = train_run(store)
        registry.log_and_register(cfg, run_id, result)
    src = tmp_path / "in.png"
    from PIL import Image
    Image.fromarray(image()).save(src)
    args = ["--config", store["path"]]
    assert cli.main(["promote", "2", "--alias", "champion", *args]) == 0
    assert "models:/srdiff@champion -> version 2" in capsys.readouterr().out
    assert client.get_model_version_by_alias("srdiff", "champion").version in ("2", 2)
    outputs = {}
    for uri in ("models:/srdiff/1", "models:/srdiff@champion"):
        out = tmp_path / f"{re.sub(r'[^a-z0-9]', '_', uri)}.png"
        assert cli.main(["restore", str(src), str(out), "--checkpoint", uri, "--steps", "2", *args]) == 0
        outputs[uri] = np.asarray(Image.open(out))
    assert outputs["models:/srdiff/1"].shape == (20, 28, 3)
    np.testing.assert_array_equal(outputs["models:/srdiff/1"], outputs["models:/srdiff@champion"])  # same weights

    with pytest.raises(SystemExit, match=r"models:/srdiff/7 is not in the model registry of sqlite:///.*: registered "
                                         r"model 'srdiff' has versions 1, 2 \(aliases: @champion -> 2\)"):
        cli.main(["restore", str(src), str(tmp_path / "x.png"), "--checkpoint", "models:/srdiff/7", *args])
    capsys.readouterr()
    assert cli.main(["promote", "9", "--alias", "champion", *args]) == 1
    assert "no version 9 of 'srdiff'" in capsys.readouterr().err


# ---------------------------------------------------------------- the stage hooks


def test_a_reused_train_stage_registers_nothing_and_says_cached(store):
    cfg, client = store["cfg"], store["client"]
    run_id, result = train_run(store)
    StageHooks(cfg, "train", run_id, parent_run_id=store["parent"]).start().finished(result, reused=False)
    again, _ = train_run(store)
    StageHooks(cfg, "train", again, parent_run_id=store["parent"]).start().finished(result, reused=True)
    assert [str(v.version) for v in client.search_model_versions("name = 'srdiff'")] == ["1"]
    first, second = client.get_run(run_id), client.get_run(again)
    assert (first.info.run_name, first.data.tags[tracking.CACHED_TAG]) == ("train", "false")
    assert (second.info.run_name, second.data.tags[tracking.CACHED_TAG]) == ("train (cached)", "true")
    assert first.data.tags["unet.conditioning"] == "semantic" and first.data.tags["unet.layout"] == "srdiff"


def test_the_evaluate_stage_writes_its_metrics_on_the_version_it_evaluated(store):
    cfg, client = store["cfg"], store["client"]
    run_id, result = train_run(store)
    registry.log_and_register(cfg, run_id, result)
    eval_run = tracking.start_stage_run(cfg, store["parent"], "evaluate", flow_run_id=None)
    metrics = {"eval/hazy/psnr": 21.5, "eval/hazy/lq_psnr": 18.25, "eval/hazy/images": 2.0,
               "eval/all/psnr": 21.5, "eval/all/ssim": 0.75, "eval/all/images": 2.0, "eval/seconds": 3.0}
    report = store["root"] / "report.md"
    report.write_text("# SR-Diff evaluation\n\n![hazy](grid_hazy.png)\n")
    evaluated = StageResult("evaluate", "e" * 64, "d", outputs={"report": str(report)}, metrics=metrics)
    StageHooks(cfg, "evaluate", eval_run, parent_run_id=store["parent"],
               upstream={"train": result}).start().finished(evaluated, reused=False)
    version = client.get_model_version("srdiff", "1")
    assert {k: version.tags[k] for k in ("eval/all/psnr", "eval/all/ssim", "eval/hazy/psnr", "srdiff.evaluate_run")} \
        == {"eval/all/psnr": "21.5000", "eval/all/ssim": "0.7500", "eval/hazy/psnr": "21.5000",
            "srdiff.evaluate_run": eval_run}
    assert "eval/seconds" not in version.tags
    assert "| hazy | 2 | 18.25 | 21.50 |" in version.description and eval_run in version.description


# ---------------------------------------------------------------- datasets, system metrics, names


def test_stage_runs_log_the_tables_they_read_as_datasets(store):
    cfg, client, root = store["cfg"], store["client"], store["root"]
    manifest = pa.Table.from_pylist([{"id": f"{s}/{i}", "dataset": "demo", "split": s, "degradation": "hazy"}
                                     for s, n in (("train", 3), ("val", 1)) for i in range(n)])
    tables.write_table(str(root / "pairs.parquet"), manifest)
    index = pa.Table.from_pylist([{"shard": f"{s}/hazy/pairs-{i}.tar", "split": s, "degradation": "hazy", "count": c}
                                  for s, i, c in (("train", 0, 2), ("train", 1, 1), ("val", 0, 1))])
    tables.write_table(str(root / "shards" / "index.parquet"), index)
    download = StageResult("download", "d" * 64, "x", outputs={"manifest": str(root / "pairs.parquet")})
    shard = StageResult("shard", "s" * 64, "y", outputs={"shards": str(root / "shards"),
                                                         "index": str(root / "shards" / "index.parquet")})
    seen = {}
    for stage, upstream in (("shard", {"download": download}), ("train", {"shard": shard}),
                            ("evaluate", {"shard": shard}), ("embed", {"shard": shard})):
        run_id = tracking.start_stage_run(cfg, store["parent"], stage, flow_run_id=None)
        StageHooks(cfg, stage, run_id, upstream=upstream).start()
        inputs = client.get_run(run_id).inputs.dataset_inputs
        seen[stage] = sorted((i.dataset.name, {t.key: t.value for t in i.tags}["mlflow.data.context"],
                              eval(i.dataset.profile)["num_rows"]) for i in inputs)
        if stage == "train":
            (train_input,) = inputs
            assert train_input.dataset.digest == tables.table_digest(index.slice(0, 2))[:16]
            assert eval(train_input.dataset.profile)["num_samples"] == 3
            assert json.loads(train_input.dataset.source)["uri"] == str(root / "shards" / "index.parquet")
            assert "count" in train_input.dataset.schema
    assert seen == {"shard": [("demo", "evaluation", 1), ("demo", "training", 3)],
                    "train": [("demo-shards", "training", 2)],
                    "evaluate": [("demo-shards", "evaluation", 1)],
                    "embed": [("demo-shards", "evaluation", 1), ("demo-shards", "training", 2)]}


def test_system_metrics_are_logged_on_the_train_run_even_when_it_is_short(store):
    cfg = store["cfg"].model_copy(update={"tracking": store["cfg"].tracking.model_copy(
        update={"system_metrics": True, "system_metrics_interval_s": 30.0})})
    run_id, _ = train_run(store)
    assert tracking.system_metrics(cfg, run_id, "download") is None  # only embed and train
    monitor = tracking.system_metrics(cfg, run_id, "train")
    monitor.stop()  # well before the first 30 s window: the partial window is published
    metrics = store["client"].get_run(run_id).data.metrics
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(metrics)


def test_the_experiment_is_a_model_training_experiment_and_parent_runs_are_told_apart(store):
    cfg, client = store["cfg"], store["client"]
    exp = client.get_experiment_by_name("srdiff")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    name = client.get_run(store["parent"]).info.run_name
    assert re.fullmatch(r"Tiny Registry semantic srdiff to-train \d{4}-\d{6}", name), name
    full = tracking.parent_run_name(cfg, ["download", "shard", "embed", "train", "evaluate"], now=0)
    assert full.startswith("Tiny Registry semantic srdiff ") and "to-" not in full
    # An experiment created before the tag gets it; a user's own kind is kept.
    client.set_experiment_tag(exp.experiment_id, "mlflow.experimentKind", "finetuning")
    tracking.experiment_id(client, cfg)
    assert client.get_experiment(exp.experiment_id).tags["mlflow.experimentKind"] == "finetuning"


# ---------------------------------------------------------------- Prefect artifacts' content


def test_prefect_artifact_content_and_keys(store):
    cfg = store["cfg"]
    assert artifacts.artifact_key(cfg, "evaluation") == "tiny-registry-evaluation"
    assert re.fullmatch(r"[a-z0-9-]+", artifacts.artifact_key(cfg.model_copy(update={"name": "A_b.C  d"}), "x"))
    rows = artifacts.evaluation_rows({"eval/rainy/psnr": 20.0, "eval/rainy/images": 1.0, "eval/hazy/psnr": 19.0,
                                      "eval/hazy/images": 2.0, "eval/all/psnr": 19.3, "eval/all/images": 3.0})
    assert [r["degradation"] for r in rows] == ["hazy", "rainy", "all"]
    assert rows[0]["PSNR"] == "19.00" and rows[0]["LPIPS"] == "n/a"
    md = artifacts.report_markdown("# t\n\n![hazy](grid_hazy.png)\n", {"evaluate run": "http://x/run"})
    assert md.startswith("**MLflow**: [evaluate run](http://x/run)") and "![" not in md and "report/grid_hazy.png" in md
    counts = artifacts.dataset_rows([{"dataset": "lol", "split": "train"}, {"dataset": "lol", "split": "val"}],
                                    [{"dataset": "lol"}], {"dataset/lol/train_expected": 485.0})
    assert counts == [{"dataset": "lol", "train pairs": 1, "val pairs": 1, "train expected": 485,
                       "val expected": "-", "quarantined": 1}]
    progress = artifacts.Progress(cfg, "train", 100, "steps")
    assert progress.update(10) == ""  # the first call starts the clock
    assert re.fullmatch(r" \([\d.e+]+ steps/s, ETA \S+\)", progress.update(20))
    assert progress.artifact_id is None  # outside a Prefect run: nothing published
    assert re.fullmatch(r", ETA \S+", progress.update(30, rate=False))


def test_the_evaluate_stage_knows_how_many_images_it_will_score(tmp_path):
    index = pa.Table.from_pylist([{"shard": f"{s}-{d}-{i}", "split": s, "degradation": d, "count": c}
                                  for s, d, i, c in (("val", "hazy", 0, 4), ("val", "hazy", 1, 3),
                                                     ("val", "rainy", 0, 2), ("train", "hazy", 0, 9))])
    tables.write_table(str(tmp_path / "index.parquet"), index)
    url = str(tmp_path / "index.parquet")
    assert artifacts.images_to_score(url) == 9
    assert artifacts.images_to_score(url, max_images=5) == 7  # hazy capped at 5, rainy 2
    assert artifacts.images_to_score(url, max_images=5, skipped=1) == 6
    assert artifacts.images_to_score(url, "train") == 9
