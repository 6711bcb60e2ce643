"""The train stage alone on several GPUs/machines: ``torchrun --nproc_per_node=N -m flows.train_ddp ...``.

Runs the same :func:`tasks.train.fit` as the pipeline's train stage, one process per GPU, on
outputs the shard and embed stages already wrote (their URLs are in the pipeline's summary and
in the MLflow runs of those stages). No Prefect; rank 0 logs to MLflow when ``--run-id`` is
given, writes the checkpoints and, at the end, ``model.pt`` under ``data_root/runs/train/<key>``.
Rerunning the same command resumes from the latest checkpoint (``train.resume: auto``).
"""

from __future__ import annotations

import argparse
import gc
import logging
import time
from pathlib import Path

from flows.args import torchrun_parser
from srdiff_core.checkpoint import CheckpointMismatch
from srdiff_core.config import load_config
from srdiff_core.distributed import barrier, cleanup, default_backend, init_from_env, is_main
from storage import fs
from tasks.common import stage_dir
from tasks.train import fit, write_model


# What starts a fresh run of this entry point, beside train.resume: never (the core's advice).
KEY_ADVICE = "(with flows/train_ddp.py the run folder is its --key argument: pass a new --key)"


def with_key_advice(error: CheckpointMismatch) -> CheckpointMismatch:
    """srdiff_core's refusal to resume, plus this entry point's own way to start fresh: a new --key."""
    return CheckpointMismatch(f"{error}\n{KEY_ADVICE}", error.differences)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = torchrun_parser("flows.train_ddp", __doc__)
    p.add_argument("--restorecls", required=True, help="the embed stage's RestoreCLS table")
    p.add_argument("--srm", required=True, help="the embed stage's SRM weights (bundled into model.pt)")
    p.add_argument("--key", default="ddp", help="output folder name under data_root/runs/train (default: %(default)s)")
    p.add_argument("--run-id", default=None, help="an MLflow run to log metrics, samples and model.pt to")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = load_config(args.config, args.set)
    # force: importing Prefect (via tasks/) installed its own root handler at WARNING level.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
    log = logging.getLogger("srdiff")
    backend = "gloo" if cfg.device == "cpu" else default_backend()
    info = init_from_env(backend)
    try:
        start = time.perf_counter()
        out_dir = Path(fs.local_path(stage_dir(cfg, "runs/train", args.key)))
        try:
            state = fit(cfg, out_dir, args.shards, args.restorecls, args.run_id, log, info)
        except CheckpointMismatch as e:
            raise with_key_advice(e) from None
        if is_main(info):
            write_model(state.ema, cfg, args.srm, out_dir, args.run_id, args.restorecls)
            log.info(f"train: {state.step} steps on {info.world_size} rank(s) in "
                     f"{time.perf_counter() - start:.1f} s -> {out_dir / 'model.pt'}")
        barrier(info)  # no rank leaves (and tears down the group) before model.pt is written
        # The DDP model's reducer holds the process group: free it while the group exists, not at
        # interpreter exit after destroy_process_group. Why: once in CI a rank of a resumed run that
        # trained nothing aborted after the barrier ("terminate called without an active exception"),
        # failing a stage whose model.pt was written; the cause was not reproduced (10 reruns).
        del state
        gc.collect()
    finally:
        cleanup(info)


if __name__ == "__main__":
    main()
