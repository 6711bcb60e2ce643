"""Embedding extraction on several GPUs: ``torchrun --nproc_per_node=N -m flows.embed_ddp ...``.

The embed stage launches this itself (on one machine) when ``embed.nproc`` > 1, then trains the
SRM on the merged tables in its own process. Run by hand it does the extraction alone, e.g. on
several machines (``--nnodes``, with data_root and ``--out`` on storage they all share). Each
rank runs :func:`tasks.embed.extract` on its share of the shards (every N-th; the embedding
cache first) and writes a part; rank 0 merges the parts into ``lqcls.parquet``,
``gtcls.parquet`` and ``embed_quarantine.parquet`` under ``--out``, sorted by id: the same
tables one process writes. No Prefect, no MLflow.

The ranks join a gloo group even on GPUs: no collective moves a tensor (barriers only), and
NCCL's watchdog would kill a rank that waits longer than its 10-minute default while rank 0
merges and writes. ``--timeout-minutes`` (default 120) bounds every wait instead.
"""

from __future__ import annotations

import argparse
import logging
from datetime import timedelta

import torch
import torch.distributed as dist

from flows.args import torchrun_parser
from srdiff_core.config import load_config
from srdiff_core.distributed import DistInfo, cleanup, info_from_env
from tasks.common import pick_device
from tasks.embed import extract

DEFAULT_TIMEOUT_MINUTES = 120.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = torchrun_parser("flows.embed_ddp", __doc__)
    p.add_argument("--out", required=True, help="folder for lqcls / gtcls / embed_quarantine.parquet")
    p.add_argument("--timeout-minutes", type=float, default=DEFAULT_TIMEOUT_MINUTES,
                   help="longest a rank waits for the others at a barrier (default: %(default)s)")
    return p.parse_args(argv)


def join_group(cuda: bool, timeout: timedelta) -> DistInfo:
    """torchrun's rank; on CUDA its device (LOCAL_RANK) selected; a gloo process group with
    ``timeout`` when there are several ranks."""
    info = info_from_env()
    if cuda:
        torch.cuda.set_device(info.local_rank)
    if info.distributed and not dist.is_initialized():
        dist.init_process_group(backend="gloo", rank=info.rank, world_size=info.world_size, timeout=timeout)
    return info


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = load_config(args.config, args.set)
    info = join_group(pick_device(cfg).type == "cuda", timedelta(minutes=args.timeout_minutes))
    # force: importing Prefect (via tasks/) installed its own root handler. Other libraries'
    # INFO lines (open_clip narrates every model load) stay out; ours go in.
    logging.basicConfig(level=logging.WARNING, force=True,
                        format=f"%(asctime)s rank {info.rank} %(levelname)s %(message)s")
    log = logging.getLogger("srdiff")
    log.setLevel(logging.INFO)
    try:
        extract(cfg, args.shards, args.out, info, log)
    finally:
        cleanup(info)


if __name__ == "__main__":
    main()
