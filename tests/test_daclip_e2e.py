"""A demo-sized run with `unet.layout: daclip` (DA-CLIP's released UNet) trains and evaluates end to end."""

import math
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from flows.pipeline import srdiff
from flows.stages import STAGE_NAMES as STAGES
from srdiff_core.config import DEGRADATIONS, load_config
from srdiff_core.restorer import Restorer
from srdiff_core.unet_daclip import DAClipUNet
from tasks.tracking import PARENT_TAG, STAGE_TAG, tracking_uri

TINY = str(Path(__file__).parent / "configs" / "tiny.yaml")
pytestmark = pytest.mark.slow


def test_daclip_layout_trains_and_evaluates_end_to_end(tmp_path, prefect_harness):
    overrides = [f"data_root={tmp_path}", "unet.layout=daclip", "train.ema_every=2"]
    result = srdiff(config_path=TINY, overrides=overrides)
    assert list(result["stages"]) == list(STAGES)

    cfg = load_config(TINY, overrides)
    client = MlflowClient(tracking_uri(cfg))
    exp = client.get_run(result["parent_run_id"]).info.experiment_id
    children = {r.data.tags[STAGE_TAG]: r for r in client.search_runs(
        [exp], filter_string=f"tags.`{PARENT_TAG}` = '{result['parent_run_id']}'")}
    assert all(r.info.status == "FINISHED" for r in children.values()) and set(children) == set(STAGES)
    assert children["train"].data.params["unet.layout"] == "daclip"
    assert client.get_run(result["parent_run_id"]).data.params["unet.layout"] == "daclip"
    for deg in DEGRADATIONS:
        for name in ("psnr", "ssim", "psnr_y"):
            assert math.isfinite(children["evaluate"].data.metrics[f"eval/{deg}/{name}"]), (deg, name)

    # model.pt records the layout: restoring it builds DA-CLIP's UNet.
    model_path = result["stages"]["train"]["outputs"]["model"]
    assert torch.load(model_path, weights_only=True)["unet"]["layout"] == "daclip"
    restorer = Restorer.from_file(model_path)
    assert isinstance(restorer.unet, DAClipUNet)
    lq = torch.rand(1, 3, 21, 27, generator=torch.Generator().manual_seed(0))
    out = restorer.restore(lq, torch.randn(1, restorer.srm.dim), steps=2, seed=0)
    assert out.shape == lq.shape and torch.isfinite(out).all()
