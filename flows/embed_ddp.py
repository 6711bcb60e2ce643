"""Embedding extraction on several GPUs: ``torchrun --nproc_per_node=N -m flows.embed_ddp ...``.

The embed stage launches this itself (on one machine) when ``embed.nproc`` > 1, then trains the
SRM on the merged tables in its own process. Run by hand it does the extraction alone, e.g. on
several machines (``--nnodes``, with data_root and ``--out`` on storage they all share). Each
rank runs :func:`tasks.embed.extract` on its share of the shards (every N-th; the embedding
cache first) and writes a part; rank 0 merges the parts into ``lqcls.parquet``,
``gtcls.parquet`` and ``embed_quarantine.parquet`` under ``--out``, sorted by id: the same
tables one process writes. No Prefect, no MLflow.
"""

from __future__ import annotations

import argparse
import logging

from srdiff_core.config import load_config
from srdiff_core.distributed import cleanup, default_backend, init_from_env
from tasks.embed import extract


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="torchrun ... -m flows.embed_ddp", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/default.yaml", help="YAML config (default: %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--shards", required=True, help="the shard stage's output folder (holds index.parquet)")
    p.add_argument("--out", required=True, help="folder for lqcls / gtcls / embed_quarantine.parquet")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = load_config(args.config, args.set)
    backend = "gloo" if cfg.device == "cpu" else default_backend()
    info = init_from_env(backend)
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
