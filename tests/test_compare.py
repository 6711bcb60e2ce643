"""`srdiff compare`: per-degradation metrics of MLflow runs side by side, with differences.

The fast tests build the run store directly with MlflowClient (runs shaped like the pipeline's:
a parent tagged `pipeline` with the flattened config as params and the eval metrics, nested
embed/evaluate runs) and pin the printed tables; the slow one runs the real ablation.
"""

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from flows import cli
from srdiff_core.config import DEGRADATIONS, load_config
from tasks.compare import CompareError, RunMetrics, open_store, parse_metrics, render
from tasks.tracking import PARENT_TAG, STAGE_TAG, tracking_uri

TINY = str(Path(__file__).parent / "configs" / "tiny.yaml")
RANDOM_CLIP = "random CLIP weights (seed 0; not for real results)"

# Known eval metrics per run: {degradation: {metric: value}} (an LQ baseline and image count each).
METRICS_A = {
    "hazy": {"psnr": 20.0, "lq_psnr": 15.0, "ssim": 0.6, "lq_ssim": 0.5, "psnr_y": 21.0, "lq_psnr_y": 16.0,
             "images": 1.0},
    "low-light": {"psnr": 10.0, "lq_psnr": 8.0, "ssim": 0.3, "lq_ssim": 0.2, "psnr_y": 11.0, "lq_psnr_y": 9.0,
                  "images": 1.0},
    "all": {"psnr": 15.0, "lq_psnr": 11.5, "ssim": 0.45, "lq_ssim": 0.35, "psnr_y": 16.0, "lq_psnr_y": 12.5,
            "images": 2.0},
}
METRICS_B = {
    "hazy": {**METRICS_A["hazy"], "psnr": 21.25, "ssim": 0.5875, "psnr_y": 21.0},
    "low-light": {**METRICS_A["low-light"], "psnr": 9.5, "ssim": 0.3125, "psnr_y": 10.0},
    "all": {**METRICS_A["all"], "psnr": 15.4, "ssim": 0.45, "psnr_y": 15.5},
}


def flat(per_degradation: dict[str, dict[str, float]]) -> dict[str, float]:
    return {f"eval/{d}/{k}": v for d, values in per_degradation.items() for k, v in values.items()}


def pipeline_run(client: MlflowClient, exp: str, conditioning: str, metrics: dict[str, float] | None) -> dict:
    """A parent run as `flows.pipeline.execute` leaves it, with its embed and evaluate runs."""
    parent = client.create_run(exp, run_name="srdiff-tiny", tags={STAGE_TAG: "pipeline"}).info.run_id
    for key, value in {"name": "srdiff-tiny", "unet.conditioning": conditioning, "train.steps": "4"}.items():
        client.log_param(parent, key, value)
    embed = client.create_run(exp, run_name="embed", tags={STAGE_TAG: "embed", PARENT_TAG: parent}).info.run_id
    client.log_param(embed, "clip.weights", RANDOM_CLIP)
    ids = {"parent": parent}
    if metrics is not None:
        ev = client.create_run(exp, run_name="evaluate", tags={STAGE_TAG: "evaluate", PARENT_TAG: parent})
        client.log_param(ev.info.run_id, "eval.steps", "2")
        client.log_param(ev.info.run_id, "eval.clip_x0", "true")
        for run_id in (ev.info.run_id, parent):
            for key, value in metrics.items():
                client.log_metric(run_id, key, value)
        ids["evaluate"] = ev.info.run_id
    return ids


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    overrides = [f"data_root={root}"]
    client = MlflowClient(tracking_uri(load_config(TINY, overrides)))
    exp = client.create_experiment("srdiff")
    return {"a": pipeline_run(client, exp, "semantic", flat(METRICS_A)),
            "b": pipeline_run(client, exp, "null", flat(METRICS_B)),
            "untrained": pipeline_run(client, exp, "semantic", None),
            "set": sum((["--set", o] for o in overrides), []), "client": client}


def run_cli(store: dict, *args: str) -> int:
    return cli.main(["compare", *args, "--config", TINY, *store["set"]])


def test_text_table_has_each_value_baseline_and_signed_difference(store, capsys):
    a, b = store["a"]["parent"], store["b"]["parent"]
    assert run_cli(store, a, b) == 0
    out = capsys.readouterr().out
    assert out == f"""\
                   A                                                   B
run                {a[:8]}                                            {b[:8]}
name               srdiff-tiny                                         srdiff-tiny
unet.conditioning  semantic                                            null
clip.weights       {RANDOM_CLIP}  {RANDOM_CLIP}
eval.steps         2                                                   2
eval.clip_x0       true                                                true

degradation  metric      LQ       A       B    B - A
hazy         psnr     15.00   20.00   21.25    +1.25
hazy         ssim    0.5000  0.6000  0.5875  -0.0125
hazy         psnr_y   16.00   21.00   21.00    +0.00
low-light    psnr      8.00   10.00    9.50    -0.50
low-light    ssim    0.2000  0.3000  0.3125  +0.0125
low-light    psnr_y    9.00   11.00   10.00    -1.00
all          psnr     11.50   15.00   15.40    +0.40
all          ssim    0.3500  0.4500  0.4500  +0.0000
all          psnr_y   12.50   16.00   15.50    -0.50

LQ: the degraded input scored against GT (run A's val set); X - A: positive is better for psnr, ssim, psnr_y
"""


def test_an_evaluate_run_resolves_to_the_same_numbers_as_its_parent(store, capsys):
    ids = [store["a"]["parent"], store["b"]["parent"]]
    assert run_cli(store, *ids) == 0
    by_parent = capsys.readouterr().out
    assert run_cli(store, store["a"]["evaluate"], store["b"]["parent"]) == 0
    mixed = capsys.readouterr().out
    assert mixed.split("\n\n")[2:] == by_parent.split("\n\n")[2:]  # metric table and notes
    header = mixed.split("\n\n")[0].splitlines()
    assert header[1].split()[1:] == [store["a"]["evaluate"][:8], store["b"]["parent"][:8]]
    assert header[2].split()[1:] == ["srdiff-tiny/evaluate", "srdiff-tiny"]
    assert header[3].split()[1:] == ["semantic", "null"]  # the parent's config, found from its evaluate run
    assert header[5].split()[1:] == ["2", "2"]


def test_markdown_with_chosen_metrics(store, capsys):
    a, b = store["a"]["parent"], store["b"]["parent"]
    assert run_cli(store, a, b, "--metrics", "psnr", "--format", "markdown") == 0
    assert capsys.readouterr().out == f"""\
|   | A | B |
| --- | --- | --- |
| run | {a[:8]} | {b[:8]} |
| name | srdiff-tiny | srdiff-tiny |
| unet.conditioning | semantic | null |
| clip.weights | {RANDOM_CLIP} | {RANDOM_CLIP} |
| eval.steps | 2 | 2 |
| eval.clip_x0 | true | true |

| degradation | metric | LQ | A | B | B - A |
| --- | --- | ---: | ---: | ---: | ---: |
| hazy | psnr | 15.00 | 20.00 | 21.25 | +1.25 |
| low-light | psnr | 8.00 | 10.00 | 9.50 | -0.50 |
| all | psnr | 11.50 | 15.00 | 15.40 | +0.40 |

LQ: the degraded input scored against GT (run A's val set); X - A: positive is better for psnr
"""


def test_a_run_without_eval_metrics_is_named_with_what_to_do(store, capsys):
    untrained = store["untrained"]["parent"]
    assert run_cli(store, store["a"]["parent"], untrained) == 2
    err = capsys.readouterr().err
    assert err == (f"srdiff compare: run {untrained} (srdiff-tiny, stage pipeline) has no evaluation metrics "
                   f"(eval/<degradation>/<metric>): run the evaluate stage first, e.g. `srdiff run --config "
                   f"<its config> --stages evaluate`, and compare that pipeline run\n")


def test_the_short_ids_it_prints_are_accepted(store, capsys):
    a, b = store["a"]["parent"], store["b"]["parent"]
    assert run_cli(store, a, b) == 0
    full = capsys.readouterr().out
    assert run_cli(store, a[:8], b[:8]) == 0
    assert capsys.readouterr().out == full
    assert run_cli(store, a[:8], "ffffffff") == 2
    assert "no MLflow run id starts with 'ffffffff'" in capsys.readouterr().err


def test_an_unknown_run_id_is_an_error_naming_it(store, capsys):
    assert run_cli(store, store["a"]["parent"], "0123456789abcdef0123456789abcdef") == 2
    err = capsys.readouterr().err
    assert err.startswith("srdiff compare: no MLflow run '0123456789abcdef0123456789abcdef' in sqlite:///")
    assert "copy the full run id from `srdiff run`'s output or the MLflow UI" in err


def test_a_missing_store_is_not_created(tmp_path):
    cfg = load_config(TINY, [f"data_root={tmp_path / 'nothing'}"])
    with pytest.raises(CompareError, match="no MLflow store at .*nothing/mlflow.db: pass the --config"):
        open_store(cfg)
    assert not (tmp_path / "nothing").exists()


def test_metric_names_are_checked():
    assert parse_metrics("psnr, lpips") == ["psnr", "lpips"]
    with pytest.raises(CompareError, match=r"unknown metric\(s\) \['psrn'\]: choose from psnr,ssim,psnr_y,ssim_y"):
        parse_metrics("psrn")


def one(run_id: str, metrics: dict[str, float], **facts: str) -> RunMetrics:
    return RunMetrics(run_id=run_id, name=run_id, metrics=metrics, facts=facts)


def test_lpips_lower_is_better_other_settings_that_differ_and_a_third_run():
    base = {"eval/all/psnr": 20.0, "eval/all/lq_psnr": 15.0, "eval/all/images": 4.0}
    runs = [one("run-a", {**base, "eval/all/lpips": 0.25, "eval/all/lq_lpips": 0.5}, **{"train.steps": "4"}),
            one("run-b", {**base, "eval/all/lpips": 0.125}, **{"train.steps": "6"}),
            one("run-c", {**base, "eval/all/psnr": 19.994}, **{"train.steps": "4"})]
    assert render(runs) == """\
                   A      B      C
run                run-a  run-b  run-c
name               run-a  run-b  run-c
unet.conditioning  -      -      -
clip.weights       -      -      -
eval.steps         -      -      -
eval.clip_x0       -      -      -
train.steps        4      6      4

degradation  metric      LQ       A       B      C    B - A  C - A
all          psnr     15.00   20.00   20.00  19.99    +0.00  -0.01
all          lpips   0.5000  0.2500  0.1250    n/a  -0.1250    n/a

LQ: the degraded input scored against GT (run A's val set); X - A: positive is better for psnr, \
negative is better for lpips"""


def test_runs_scored_on_different_images_are_flagged():
    a = one("a", {"eval/hazy/psnr": 20.0, "eval/hazy/lq_psnr": 15.0, "eval/hazy/images": 4.0,
                  "eval/rainy/psnr": 20.0, "eval/rainy/lq_psnr": 15.0, "eval/rainy/images": 4.0})
    b = one("b", {**a.metrics, "eval/hazy/images": 8.0})
    notes = render([a, b], ["psnr"]).split("\n\n")[-1].splitlines()
    assert notes[1] == ("warning: the runs were scored on different images for hazy (image count or LQ baseline "
                        "differs): those differences are not the model's alone")


# A bare YAML `null` selects the null-token mode (UNetConfig maps None to "null").
NULL_CONDITIONING = "unet.conditioning=null"


@pytest.mark.slow
def test_the_conditioning_ablation_end_to_end(tmp_path, prefect_harness, capsys):
    """The tiny pipeline with semantic guidance, then with the null token in the same data root:
    the second run takes download/shard/embed from cache, trains and evaluates anew, and
    `srdiff compare` sets the two parent runs side by side for every degradation."""
    from flows.pipeline import srdiff

    overrides = [f"data_root={tmp_path}"]
    semantic = srdiff(config_path=TINY, overrides=overrides)
    null = srdiff(config_path=TINY, overrides=overrides + [NULL_CONDITIONING])
    assert {s: r["reused"] for s, r in null["stages"].items()} == {
        "download": True, "shard": True, "embed": True, "train": False, "evaluate": False}
    ids = [semantic["parent_run_id"], null["parent_run_id"]]
    capsys.readouterr()
    assert cli.main(["compare", *ids, "--config", TINY, "--set", overrides[0]]) == 0
    header, table, _ = capsys.readouterr().out.split("\n\n")
    header_lines = header.splitlines()
    assert header_lines[1].split()[1:] == [i[:8] for i in ids]
    # Parent runs are named "<config> <conditioning> <layout> <time>" (tasks.tracking), so they tell apart.
    assert "srdiff-tiny semantic srdiff" in header_lines[2] and "srdiff-tiny null srdiff" in header_lines[2]
    assert header_lines[3].split()[1:] == ["semantic", "null"]
    rows = [line.split() for line in table.splitlines()[1:]]
    assert [(r[0], r[1]) for r in rows] == [(d, m) for d in (*DEGRADATIONS, "all") for m in ("psnr", "ssim", "psnr_y")]
    assert all("n/a" not in r for r in rows)  # LQ, A, B and B - A for every row (no LPIPS weights here)
