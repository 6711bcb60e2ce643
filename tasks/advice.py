"""What a user should do next after a refusal from storage or srdiff_core.

Those layers raise typed errors that state facts only (storage/errors.py, srdiff_core/data.py):
they do not know the stages, the `srdiff` commands or the config keys. This module does, and is
the one place that words the advice: ``advice(error)`` is the next step for an error, by its type
and facts, and ``advised()`` / ``with_advice()`` append it to the error's message where errors
reach users (a stage run by the flow, a rank of a torchrun stage, the `srdiff` commands).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from srdiff_core.data import MissingEmbedding, NoShardUrls, PairMismatch, TooFewShards
from storage.errors import (BadManifest, DamagedShard, EmptyManifest, MissingDegradations, MissingFile, MissingSplit,
                            OtherModelCache, Refusal, RepeatedIds, ShardVerificationError, StaleManifest,
                            UnreadableTable)
from storage.shards import INDEX_KIND

__all__ = ["REPAIR_HINT", "advice", "advised", "with_advice"]

# A reader's error sends the user through verify-shards, which marks damaged shards unfinished
# (a damaged shard of the right size still looks finished to the writer: its sidecar matches).
REPAIR_HINT = ("run `srdiff verify-shards` on the shard folder (it marks damaged shards for rewriting), "
               "then rerun the shard stage with --refresh shard")
RERUN_DOWNLOAD = "rerun the download stage"
MORE_SHARDS = "or lower shard.maxcount so the shard stage writes more, smaller shards"
# Training's processes, however started: the flow's train.nproc, or torchrun run by hand.
TRAINING_RANKS = "the training processes (train.nproc, or torchrun's --nproc_per_node x --nnodes)"
# What writes the files storage knows by kind (others are named by their reader: ``written_by``).
WRITERS = {INDEX_KIND: "the shard stage (`srdiff run --stages shard`)"}

E = TypeVar("E", bound=BaseException)


def _writer(error: MissingFile | UnreadableTable) -> str:
    return error.written_by or WRITERS.get(error.kind) or "an earlier pipeline stage"


def _missing_file(error: MissingFile) -> str:
    return f"it is written by {_writer(error)}: run that first (or check data_root)"


def _unreadable_table(error: UnreadableTable) -> str:
    return f"it is written by {_writer(error)}: rerun that with --refresh"


def _verification(error: ShardVerificationError) -> str | None:
    """The report's closing lines: how the marked shards get rewritten, what to do for the rest."""
    lines = []
    if error.marked:
        lines.append("the damaged shards are marked for rewriting: rerun the shard stage with the config that "
                     "wrote them and --refresh shard (`srdiff run --config <it> --stages shard --refresh shard`), "
                     "which rewrites only these")
    if error.unmarked:
        lines.append(f"not marked: {', '.join(error.unmarked)}; run `srdiff verify-shards` again, or delete those "
                     f"shards and rerun the shard stage")
    return "\n".join(lines) or None


def _too_few_shards(error: TooFewShards) -> str | None:
    if error.num_shards is None:  # a copy rebuilt from a DataLoader worker's text: no numbers to go by
        return None
    if error.too_many_ranks:
        return f"lower {TRAINING_RANKS} to at most {max(error.num_shards, 1)}, {MORE_SHARDS}"
    return f"lower train.num_workers to at most {error.num_shards // error.world_size}, {MORE_SHARDS}"


# By error type; advice() takes the entry of the most specific type an error is.
_ADVICE: dict[type[Refusal], Callable[[Refusal], str | None]] = {
    MissingFile: _missing_file,
    UnreadableTable: _unreadable_table,
    BadManifest: lambda e: RERUN_DOWNLOAD,
    EmptyManifest: lambda e: f"{RERUN_DOWNLOAD} (check its quarantine table for rejected files)",
    RepeatedIds: lambda e: "fix the download stage's id scheme",
    StaleManifest: lambda e: RERUN_DOWNLOAD,
    DamagedShard: lambda e: REPAIR_HINT,
    MissingSplit: lambda e: "check the manifest's split names or rerun the download and shard stages",
    MissingDegradations: lambda e: "fix the degradation list or rerun the download and shard stages",
    ShardVerificationError: _verification,
    OtherModelCache: lambda e: "delete that folder and rerun",
    PairMismatch: lambda e: RERUN_DOWNLOAD,
    MissingEmbedding: lambda e: "rerun the embed stage (its tables must cover every id in the shards)",
    NoShardUrls: lambda e: "run the shard stage, and check the split and degradations asked of shard_urls()",
    TooFewShards: _too_few_shards,
}


def advice(error: BaseException) -> str | None:
    """The next step a user should take after ``error``; None where there is nothing to add."""
    for kind in type(error).__mro__:
        if kind in _ADVICE:
            return _ADVICE[kind](error)
    return None


def with_advice(error: E) -> E:
    """``error`` itself, its message now ending with the advice (added once: an error may pass
    several places that advise, e.g. a rank's training inside a stage)."""
    if isinstance(error, Refusal) and error.advice is None:
        error.advice = advice(error)
    return error


@contextmanager
def advised() -> Iterator[None]:
    """Re-raise a typed error from the block (the same error, same type and traceback) with the
    advice appended to its message. Also a decorator: ``@advised()``."""
    try:
        yield
    except Refusal as e:
        with_advice(e)
        raise
