"""Command-line arguments shared by `srdiff` (flows/cli.py) and the torchrun entry points
(flows/embed_ddp.py, flows/train_ddp.py): a module of its own, so that neither imports the other."""

from __future__ import annotations

import argparse


def add_config_args(p: argparse.ArgumentParser, default: str = "configs/default.yaml") -> argparse.ArgumentParser:
    p.add_argument("--config", default=default, help="YAML config (default: %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=100 (repeatable)")
    return p


def torchrun_parser(module: str, doc: str) -> argparse.ArgumentParser:
    """The arguments every torchrun entry point shares: config, overrides, the shard folder."""
    p = add_config_args(argparse.ArgumentParser(prog=f"torchrun ... -m {module}", description=doc.splitlines()[0]))
    p.add_argument("--shards", required=True, help="the shard stage's output folder (holds index.parquet)")
    return p
