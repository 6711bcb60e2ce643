"""Data-parallel training: two CPU ranks (gloo) over real tiny shards, through the train stage's code."""

from __future__ import annotations

import io
import logging
import socket
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from flows import train_ddp
from srdiff_core import training
from srdiff_core.checkpoint import CheckpointMismatch, check_compatible, list_checkpoints
from srdiff_core.config import Config
from srdiff_core.distributed import (
    DistInfo,
    cleanup,
    info_from_env,
    init_from_env,
    is_main,
    rank_seed,
    wrap_ddp,
)
from srdiff_core.sde import IRSDE
from srdiff_core.unet import ConditionalUNet
from storage import fs, shards, tables
from tasks import embed_tables, launch
from tasks import train as train_task
from tasks.advice import advised
from tasks.train import batch_source, rank_shards, rank_workers

CONTEXT_DIM = 8
TRAIN_IDS = [f"train/noisy/img.{i}" for i in range(8)]  # maxcount 2 -> 4 shards, 2 per rank


def tiny_config(steps: int = 3) -> Config:
    return Config.model_validate({
        "device": "cpu",
        "unet": {"nf": 8, "ch_mult": [1, 2], "num_res_blocks": 1, "context_dim": CONTEXT_DIM, "attn_heads": 1},
        "train": {"steps": steps, "batch_size": 2, "patch_size": 8, "lr": 1e-3, "warmup_steps": 1,
                  "precision": "fp32", "channels_last": False, "checkpoint_every": 2, "log_every": 1,
                  "sample_every": 1000, "ema_decay": 0.9, "resume": "auto", "seed": 0, "num_workers": 0,
                  "shuffle_buffer": 0, "compile": False},
    })


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def write_tiny_shards(root: Path, val_ids: tuple[str, ...] = ()) -> list[str]:
    """8 real 12x12 PNG pairs -> a manifest -> 4 train shards of 2 samples (storage.shards.write_shards),
    plus val shards of ``val_ids``; returns the train shards' URLs (all are under ``root/shards``)."""
    rng = np.random.default_rng(0)
    rows = []
    for i, sample_id in enumerate([*TRAIN_IDS, *val_ids]):
        lq = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
        lq_png, gt_png = _png(lq), _png(255 - lq)
        lq_url, gt_url = str(root / "LQ" / f"{i}.png"), str(root / "GT" / f"{i}.png")
        fs.atomic_write_bytes(lq_url, lq_png)
        fs.atomic_write_bytes(gt_url, gt_png)
        rows.append({"id": sample_id, "dataset": "tiny", "degradation": "noisy", "split": sample_id.split("/")[0],
                     "lq_path": lq_url, "gt_path": gt_url, "width": 12, "height": 12,
                     "lq_sha256": fs.sha256_bytes(lq_png), "gt_sha256": fs.sha256_bytes(gt_png)})
    out = str(root / "shards")
    shards.write_shards(pa.Table.from_pylist(rows, schema=tables.PAIRS_SCHEMA), out, maxcount=2, workers=1)
    return shards.shard_urls(out, split="train")


def embeddings(ids: list[str] = TRAIN_IDS) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {i: rng.standard_normal(CONTEXT_DIM).astype(np.float32) for i in ids}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def recording(source, seen: list[str]):
    """batch_source wrapper that records the sample ids each batch carries."""
    def make(start_step: int):
        for batch in source(start_step):
            seen.extend(batch["id"])
            yield batch
    return make


def train_rank(info: DistInfo, urls: list[str], checkpoint_dir: Path, steps: int) -> dict:
    """Train this rank through the train stage's batch_source; what the test compares afterwards."""
    cfg = tiny_config(steps)
    torch.manual_seed(100 + info.rank)  # different initial weights: DDP must broadcast rank 0's
    initial = {k: v.clone() for k, v in ConditionalUNet.from_config(cfg.unet).state_dict().items()}
    torch.manual_seed(100 + info.rank)
    model = wrap_ddp(ConditionalUNet.from_config(cfg.unet), info, torch.device("cpu"))
    seen: list[str] = []
    logged: list[int] = []
    source = recording(batch_source(cfg, urls, embeddings(), rank=info.rank, world_size=info.world_size), seen)
    state = training.train(model, IRSDE.from_config(cfg.sde), source, cfg.train, checkpoint_dir=checkpoint_dir,
                           config_dict=cfg.model_dump(mode="json"), log_fn=lambda step, m: logged.append(step),
                           is_main_process=is_main(info), rank=info.rank, world_size=info.world_size)
    return {"initial": initial, "model": training.unwrap(state.model).state_dict(), "ema": state.ema.state_dict(),
            "ids": seen, "logged": logged, "generator": state.generator.get_state(), "step": state.step}


def ddp_worker(rank: int, world_size: int, port: int, urls: list[str], out: str) -> None:
    """One rank, set up as torchrun would (env vars); three runs in one process group (one start-up):

    fresh: 3 steps, checkpoints in ``out/ckpt-<rank>`` (only rank 0 should write);
    resumed: to step 5, every rank resuming from rank 0's ``out/ckpt-0`` (shared storage);
    refused: to step 6 from per-rank folders, where rank 1 finds none (unshared storage).
    Results go to ``out/rank<rank>.pt``.
    """
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    info = init_from_env("gloo")
    root = Path(out)
    try:
        results = {"fresh": train_rank(info, urls, root / f"ckpt-{rank}", 3)}
        results["fresh_checkpoints"] = [p.name for p in list_checkpoints(root / f"ckpt-{rank}")]
        results["resumed"] = train_rank(info, urls, root / "ckpt-0", 5)
        try:
            train_rank(info, urls, root / f"ckpt-{rank}", 6)
            results["refused"] = ""
        except RuntimeError as e:
            results["refused"] = str(e)
        torch.save(results, root / f"rank{rank}.pt")
    finally:
        cleanup(info)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[list[str], list[dict]]:
    root = tmp_path_factory.mktemp("ddp")
    urls = write_tiny_shards(root)
    mp.spawn(ddp_worker, args=(2, free_port(), urls, str(root)), nprocs=2, join=True)
    return urls, [torch.load(root / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_ranks_read_disjoint_shards(two_ranks):
    urls, results = two_ranks
    assert len(urls) == 4
    fresh = [r["fresh"] for r in results]
    assert len(fresh[0]["ids"]) == len(fresh[1]["ids"]) == 3 * 2  # 3 steps x batch 2 each
    ids = [set(r["ids"]) for r in fresh]
    assert ids[0] and ids[1] and not ids[0] & ids[1]
    for rank, seen in enumerate(ids):
        own = {s["id"] for s in shards.iter_samples(rank_shards(urls, rank, 2))}
        assert seen <= own


def test_ranks_end_with_identical_weights(two_ranks):
    r0, r1 = (r["fresh"] for r in two_ranks[1])
    assert any(not torch.equal(r0["initial"][k], r1["initial"][k]) for k in r0["initial"])
    for key in r0["model"]:
        assert torch.equal(r0["model"][key], r1["model"][key]), key
        assert torch.equal(r0["ema"][key], r1["ema"][key]), key
    assert any(not torch.equal(r0["model"][k], r0["initial"][k]) for k in r0["model"])


def test_ranks_draw_their_own_noise_and_only_rank0_logs_and_checkpoints(two_ranks):
    (a, b) = two_ranks[1]
    r0, r1 = a["fresh"], b["fresh"]
    assert not torch.equal(r0["generator"], r1["generator"])
    assert r0["logged"] == [1, 2, 3] and r1["logged"] == []
    assert a["fresh_checkpoints"] == ["ckpt-00000002.pt", "ckpt-00000003.pt"]
    assert b["fresh_checkpoints"] == []


def test_resume_with_shared_checkpoints_continues_in_step(two_ranks):
    r0, r1 = (r["resumed"] for r in two_ranks[1])
    assert r0["step"] == r1["step"] == 5
    assert len(r0["ids"]) == len(r1["ids"]) == 2 * 2  # steps 4 and 5 only: both resumed at step 3
    assert r0["logged"] == [4, 5] and r1["logged"] == []
    for key in r0["model"]:
        assert torch.equal(r0["model"][key], r1["model"][key]), key


def test_ranks_that_resume_at_different_steps_are_refused(two_ranks):
    for result in two_ranks[1]:  # rank 0 finds its step-5 checkpoint, rank 1 an empty folder
        assert "ranks resumed at different steps [5, 0]" in result["refused"]


def test_rank_seed_keeps_the_single_process_seed_and_splits_the_rest():
    assert rank_seed(7, 0) == 7
    seeds = {rank_seed(7, rank, step) for rank in range(4) for step in (0, 10)}
    assert len(seeds) == 8
    assert rank_seed(7, 1, 10) == rank_seed(7, 1, 10)
    assert rank_seed(7, 1) == int(np.random.SeedSequence([7, 1, 0]).generate_state(1, np.uint64)[0])


def test_rank_shards_splits_round_robin_and_needs_a_shard_per_rank():
    assert rank_shards(list("abcde"), 1, 2) == ["b", "d"]
    with pytest.raises(ValueError, match=r"^2 shards cannot feed 3 ranks \(one each at least\): lower the training "
                                         r"processes \(train.nproc, or torchrun's --nproc_per_node x --nnodes\) "
                                         r"to at most 2, or lower shard.maxcount"), advised():
        rank_shards(["a", "b"], 0, 3)


def test_rank_workers_are_capped_at_the_ranks_shards_with_a_warning(caplog):
    log = logging.getLogger("srdiff-test")
    with caplog.at_level(logging.WARNING, logger="srdiff-test"):
        assert rank_workers(2, 3, log) == 2 and rank_workers(0, 1, log) == 0
        assert not caplog.records
        assert rank_workers(4, 3, log) == 3
    assert caplog.messages == ["train.num_workers is 4 but this rank has 3 shard(s): using 3 DataLoader worker(s), "
                               "each with shards of its own (a lower shard.maxcount makes more shards)"]


def test_single_process_env_has_no_process_group(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = init_from_env("gloo")
    assert info == DistInfo(0, 1, 0) and is_main(info)
    assert not torch.distributed.is_initialized()
    model = torch.nn.Linear(2, 2)
    assert wrap_ddp(model, info, torch.device("cpu")) is model


def test_env_is_validated(monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="outside WORLD_SIZE 2"):
        info_from_env()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="RANK='x' is not an integer"):
        info_from_env()


# ---------------------------------------------------------------------------------------------
# The train stage with train.nproc > 1: torchrun running flows/train_ddp.py, as a user's
# pipeline run on a several-GPU machine does (gloo processes here: device cpu).

VAL_IDS = ("val/noisy/img.0",)


def _restorecls_table(root: Path, arch: str = "ViT-B-32") -> str:
    """A RestoreCLS table as the embed stage writes it, with the metadata naming its CLIP model."""
    vectors = embeddings([*TRAIN_IDS, *VAL_IDS])
    url = str(root / "restorecls.parquet")
    table = pa.table({"id": list(vectors), "embedding": embed_tables.vector_column(
        torch.from_numpy(np.stack(list(vectors.values()))))})
    tables.write_table(url, table.replace_schema_metadata({"arch": arch, "weights": "a test's",
                                                           "weights_digest": "d1g357"}))
    return url


def test_the_train_stage_with_two_processes_runs_ddp_under_torchrun_and_resumes(tmp_path, caplog):
    write_tiny_shards(tmp_path, VAL_IDS)
    restorecls, srm = _restorecls_table(tmp_path), tmp_path / "srm.pt"
    torch.save({"weight": torch.ones(2)}, srm)
    cfg = tiny_config(steps=3).model_copy(update={"data_root": str(tmp_path / "data")})
    cfg.train.nproc = 2
    args = dict(key="ddp-stage", shards_url=str(tmp_path / "shards"), restorecls_url=restorecls, srm_url=str(srm),
                ddp_entry=train_ddp)  # the entry point the stage registry passes in (flows/stages.py)
    with caplog.at_level(logging.INFO, logger="srdiff"):
        result = train_task.train.fn(cfg, **args)
    out_dir = Path(result.outputs["checkpoints"]).parent
    assert result.metrics["train/final_step"] == 3 and result.params["train.nproc"] == 2
    assert [p.name for p in list_checkpoints(out_dir / "checkpoints")] == ["ckpt-00000002.pt", "ckpt-00000003.pt"]
    model = (out_dir / "model.pt").read_bytes()
    assert result.digest == fs.sha256_bytes(model)
    saved = torch.load(io.BytesIO(model), weights_only=True)
    assert saved["srm"]["weight"].tolist() == [1.0, 1.0] and saved["embed"]["weights_digest"] == "d1g357"
    streamed = [r.message for r in caplog.records if r.message.startswith("train[torchrun]")]
    assert any("on cpu x 2 rank(s)" in m for m in streamed), streamed  # rank 0's summary line
    assert any("train: 3 steps on 2 rank(s)" in m for m in streamed), streamed

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="srdiff"):
        again = train_task.train.fn(cfg, **args)  # everything done: resumes at step 3, trains nothing
    assert again.metrics["train/final_step"] == 3 and again.digest == result.digest
    assert any("resuming from" in r.message and "ckpt-00000003.pt" in r.message for r in caplog.records)


def test_embeddings_of_another_clip_arch_are_refused_before_training(tmp_path):
    cfg = tiny_config()
    with pytest.raises(ValueError, match=r"made with CLIP 'RN50' but embed.arch is 'ViT-B-32': set embed.arch: RN50"):
        train_task.fit(cfg, tmp_path / "run", str(tmp_path / "shards"), _restorecls_table(tmp_path, "RN50"), None,
                       logging.getLogger("srdiff"))
    assert not (tmp_path / "run").exists()


def test_a_failed_train_torchrun_names_its_last_lines_and_the_one_process_setting(tmp_path, monkeypatch):
    failing = [sys.executable, "-c", "import sys; print('rank 1 Error: CUDA out of memory'); sys.exit(1)"]
    monkeypatch.setattr(launch, "torchrun_command", lambda *args: failing)
    cfg = tiny_config().model_copy(update={"data_root": str(tmp_path)})
    cfg.train.nproc = 2
    with pytest.raises(RuntimeError, match=r"(?s)train: torchrun with 2 processes failed \(exit 1\).*out of memory"
                                           r".*--set train.nproc=1"):
        train_task.train.fn(cfg, key="k", shards_url="s", restorecls_url="r", srm_url="m", ddp_entry=train_ddp)


def test_train_processes_without_an_entry_point_say_how_to_run_them(tmp_path):
    """tasks/ never names a flows module: called directly with train.nproc > 1 and no entry point,
    the task says what to pass, before starting anything."""
    cfg = tiny_config().model_copy(update={"data_root": str(tmp_path)})
    cfg.train.nproc = 2
    with pytest.raises(ValueError, match=r"train.nproc is 2 but no torchrun entry point was passed in.*ddp_entry="
                                         r".*set train.nproc: 1"):
        train_task.train.fn(cfg, key="k", shards_url="s", restorecls_url="r", srm_url="m")


def test_train_ddp_adds_its_own_way_to_start_fresh_to_a_checkpoint_mismatch():
    with pytest.raises(CheckpointMismatch) as info:
        check_compatible({"unet": {"nf": 64}}, {"unet": {"nf": 32}}, ["unet"])
    message = str(train_ddp.with_key_advice(info.value))
    assert message.startswith(str(info.value))
    assert "set train.resume: never, or use a new data_root/run name" in message
    assert "(with flows/train_ddp.py the run folder is its --key argument: pass a new --key)" in message
    assert train_ddp.with_key_advice(info.value).differences == ("unet.nf: checkpoint 64, config 32",)


def test_more_train_processes_than_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cfg = tiny_config().model_copy(update={"device": "cuda"})
    with pytest.raises(ValueError, match=r"train.nproc is 2 but only 1 CUDA device\(s\).*lower train.nproc"):
        launch.run_torchrun(cfg, "train", 2, "flows.train_ddp", [], logging.getLogger("srdiff"))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_on_real_shards_equals_the_uninterrupted_run(tmp_path, num_workers):
    """The train stage's own data stream (resampled shards, shuffle buffer, crops, flips; DataLoader
    workers or none): 4 steps straight == 2 steps, then a resume to 4, bit for bit, with the same
    sample ids in the same order."""
    urls = write_tiny_shards(tmp_path)
    cfg = tiny_config(steps=4)
    cfg.train.num_workers, cfg.train.shuffle_buffer = num_workers, 3
    sde, context = IRSDE.from_config(cfg.sde), embeddings()

    def run(folder: str, seen: list[str], killed_at: int | None = None) -> training.TrainState:
        source = recording(batch_source(cfg, urls, context), seen)
        if killed_at is not None:  # the run dies when it reaches this step (after its checkpoint)
            source = (lambda make: lambda start: make(start) if start < killed_at else iter(()))(source)
        torch.manual_seed(cfg.train.seed)
        return training.train(ConditionalUNet.from_config(cfg.unet), sde, source, cfg.train,
                              checkpoint_dir=tmp_path / folder, config_dict=cfg.model_dump(mode="json"),
                              compatible_keys=("unet", "sde"))

    torch.use_deterministic_algorithms(True)
    try:
        straight_ids, first_ids, rest_ids = [], [], []
        straight = run("straight", straight_ids)
        with pytest.raises(RuntimeError, match="ran out of batches at step 2"):
            run("resumed", first_ids, killed_at=2)
        torch.manual_seed(12345)  # a fresh process's global RNG: the checkpoint restores it
        resumed = run("resumed", rest_ids)
    finally:
        torch.use_deterministic_algorithms(False)
    assert len(straight_ids) == 4 * cfg.train.batch_size and straight_ids == first_ids + rest_ids
    for name, a, b in (("model", training.unwrap(straight.model).state_dict(), training.unwrap(resumed.model).state_dict()),
                       ("ema", straight.ema.state_dict(), resumed.ema.state_dict())):
        assert all(torch.equal(a[k], b[k]) for k in a), name
