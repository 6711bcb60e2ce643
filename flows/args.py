"""Command-line arguments and config paths shared by `srdiff` (flows/cli.py, flows/ui.py) and the
torchrun entry points (flows/embed_ddp.py, flows/train_ddp.py): a module of its own, so that
neither imports the other."""

from __future__ import annotations

import argparse
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def resolve_config(path: str) -> str:
    """A config path as given, or relative to the repository (so `srdiff demo` works anywhere)."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return str(p)
    candidate = REPO_ROOT / path
    return str(candidate) if candidate.exists() else str(p)


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
