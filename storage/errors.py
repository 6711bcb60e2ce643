"""Typed errors of storage and srdiff_core: each states facts only, and carries them as attributes.

What a user should do next (which stage to rerun, which command, which setting) is the task
layer's knowledge, not storage's: tasks/advice.py words it from an error's type and facts and
sets it as the error's ``advice``, which ``str()`` then appends. Each error also subclasses the
builtin these layers raised before (ValueError, FileNotFoundError, KeyError, RuntimeError), so
``except`` clauses written for those keep working.
"""

from __future__ import annotations

from itertools import zip_longest
from typing import Any, NamedTuple


class Refusal(Exception):
    """An error made of facts (``fields``, set as attributes from the constructor's arguments in
    order; a missing one is None), with room for the task layer's advice."""

    fields: tuple[str, ...] = ()
    joiner = "; "  # between the facts and the advice
    advice: str | None = None  # set by tasks.advice where the error reaches a user

    def __init__(self, *facts: Any, message: str | None = None):
        if len(facts) > len(self.fields):
            raise TypeError(f"{type(self).__name__} takes the facts {self.fields}, got {len(facts)} values")
        # Exception's own __init__ (not OSError's, which would read the facts as errno/strerror);
        # args keep the facts, so pickling (Prefect results, torch workers) rebuilds the error.
        Exception.__init__(self, *facts)
        for name, value in zip_longest(self.fields, facts):
            setattr(self, name, value)
        self.text = message

    # torch's DataLoader re-raises a worker's error as ``type(message=text)`` when the type has a
    # ``message`` attribute (else as a RuntimeError, losing the type): the text is the worker's
    # traceback, so the copy has no facts but keeps its type, and with it the task layer's advice.
    @property
    def message(self) -> str:
        return str(self)

    def facts(self) -> str:
        """The facts in words (what went wrong, where); no advice."""
        raise NotImplementedError

    def __str__(self) -> str:
        said = self.text.rstrip() if self.text is not None else self.facts()
        return said + self.joiner + self.advice if self.advice else said


# ---------------------------------------------------------------------------------------------
# Files and tables.

class MissingFile(Refusal, FileNotFoundError):
    """A file an earlier step writes is not there. ``kind`` names what it is (e.g. INDEX_KIND),
    ``written_by`` what writes it, as the caller knows it (either may be None)."""

    fields = ("url", "kind", "written_by")

    def facts(self) -> str:
        return f"{self.url} does not exist"


class UnreadableTable(Refusal, ValueError):
    """A file that exists but is not a Parquet table (truncated, overwritten, another format)."""

    fields = ("url", "problem", "kind", "written_by")

    def facts(self) -> str:
        return f"{self.url} is not a readable Parquet table ({self.problem})"


# ---------------------------------------------------------------------------------------------
# The manifest the shards are written from.

class BadManifest(Refusal, ValueError):
    """The manifest (the download stage's pairs table) cannot be sharded: ``problem`` says why."""

    fields = ("problem",)
    joiner = ": "

    def facts(self) -> str:
        return f"the manifest {self.problem}"


class EmptyManifest(BadManifest):
    """A manifest without pairs (every file rejected, or none found)."""

    def facts(self) -> str:
        return "the manifest has no pairs"


class RepeatedIds(BadManifest):
    """Sample ids the manifest holds more than once (``ids``: some of them)."""

    fields = ("ids",)
    joiner = "; "

    def facts(self) -> str:
        return f"the manifest repeats sample id(s) {self.ids}: ids must be unique across datasets and splits"


class StaleManifest(Refusal, RuntimeError):
    """A source file no longer matches the manifest: ``source`` ``problem`` (e.g. "is shorter
    than 303 bytes", "does not match its manifest sha256")."""

    fields = ("source", "problem")

    def facts(self) -> str:
        return f"{self.source} {self.problem}: it changed after the manifest was written"


# ---------------------------------------------------------------------------------------------
# Shards.

class DamagedShard(Refusal, ValueError):
    """A shard whose bytes are not a whole, well-formed shard: ``problem`` says what is wrong."""

    fields = ("url", "problem")

    def facts(self) -> str:
        return f"{self.url}: {self.problem}"


class MissingSplit(Refusal, ValueError):
    """The shard index has no shards for ``split`` (it has ``splits``)."""

    fields = ("index_url", "split", "splits")

    def facts(self) -> str:
        return f"no shards for split '{self.split}' in {self.index_url} (it has splits {self.splits})"


class MissingDegradations(Refusal, ValueError):
    """A split has no shards for the degradations ``missing`` (it has ``present``)."""

    fields = ("split", "missing", "present")

    def facts(self) -> str:
        return f"split '{self.split}' has no shards for degradation(s) {self.missing} (it has {self.present})"


class ShardFailure(NamedTuple):
    """One shard verify found bad: ``why``, and ``unmarked``: why it was not marked for rewriting
    (None: it was marked, its sidecar removed)."""

    shard: str
    why: str
    unmarked: str | None


class ShardVerificationError(Refusal, RuntimeError):
    """One or more shards do not match index.parquet (``failures``: ShardFailure each)."""

    fields = ("out_url", "total", "failures")
    joiner = "\n"  # the report is one line per shard; the advice follows on lines of its own

    @property
    def marked(self) -> list[str]:
        return [f.shard for f in self.failures or () if f.unmarked is None]

    @property
    def unmarked(self) -> list[str]:
        return [f.shard for f in self.failures or () if f.unmarked is not None]

    def facts(self) -> str:
        lines = [f"{len(self.failures)} of {self.total} shard(s) under {self.out_url} failed verification:"]
        lines += [f"  {f.shard}: {f.why}" + (f"; {f.unmarked}" if f.unmarked else "") for f in self.failures]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The embedding cache.

class OtherModelCache(Refusal, ValueError):
    """An embedding cache folder whose model.json describes another model than the one asked."""

    fields = ("url", "stored", "expected")

    def facts(self) -> str:
        return (f"the embedding cache {self.url} holds another model's embeddings ({self.stored}, "
                f"expected {self.expected})")
