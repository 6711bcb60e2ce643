"""storage and srdiff_core state facts; the task layer (tasks/advice.py) words the next step."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from srdiff_core import data
from srdiff_core.data import MissingEmbedding, NoShardUrls, PairMismatch, TooFewShards
from storage import fs, shards, tables
from storage.errors import (BadManifest, DamagedShard, EmptyManifest, MissingDegradations, MissingFile, MissingSplit,
                            OtherModelCache, Refusal, RepeatedIds, ShardFailure, ShardVerificationError, StaleManifest,
                            UnreadableTable)
from tasks.advice import REPAIR_HINT, advice, advised, with_advice

ROOT = Path(__file__).resolve().parent.parent
# What only the task layer knows: the `srdiff` commands and their options.
CLI_WORDS = ("srdiff run", "--refresh", "--stages", "verify-shards")


def test_low_layers_word_no_cli_advice():
    """A grep over the source: advice about commands belongs in tasks/advice.py, not below it."""
    found = [f"{path.relative_to(ROOT)}:{n}: {word}"
             for folder in ("storage", "srdiff_core") for path in sorted((ROOT / folder).rglob("*.py"))
             for n, line in enumerate(path.read_text().splitlines(), 1) for word in CLI_WORDS if word in line]
    assert not found, "\n".join(found)


SHARD_INDEX = shards.INDEX_KIND
FAILURES = [ShardFailure("train/a/pairs-000000.tar", "missing", None),
            ShardFailure("train/a/pairs-000001.tar", "could not be read (EIO)", "it was not marked for rewriting")]
# (error, the builtin it is, its facts as attributes, words of its advice)
CASES = [
    (MissingFile("/d/shards/index.parquet", SHARD_INDEX, None), FileNotFoundError,
     {"url": "/d/shards/index.parquet", "kind": SHARD_INDEX, "written_by": None},
     ["it is written by the shard stage (`srdiff run --stages shard`): run that first (or check data_root)"]),
    (MissingFile("/d/m.parquet", None, "the download stage"), FileNotFoundError,
     {"url": "/d/m.parquet", "written_by": "the download stage"},
     ["it is written by the download stage: run that first"]),
    (UnreadableTable("/d/t.parquet", "magic bytes not found", None, None), ValueError,
     {"url": "/d/t.parquet", "problem": "magic bytes not found"},
     ["it is written by an earlier pipeline stage: rerun that with --refresh"]),
    (BadManifest("has empty 'id' values"), ValueError, {"problem": "has empty 'id' values"},
     ["rerun the download stage"]),
    (EmptyManifest(), ValueError, {}, ["rerun the download stage (check its quarantine table for rejected files)"]),
    (RepeatedIds(["a", "b"]), ValueError, {"ids": ["a", "b"]}, ["fix the download stage's id scheme"]),
    (StaleManifest("/d/LQ/1.png", "is shorter than 303 bytes"), RuntimeError,
     {"source": "/d/LQ/1.png", "problem": "is shorter than 303 bytes"}, ["rerun the download stage"]),
    (DamagedShard("/d/s/train/a/pairs-000000.tar", "no tar end marker (truncated)"), ValueError,
     {"url": "/d/s/train/a/pairs-000000.tar", "problem": "no tar end marker (truncated)"}, [REPAIR_HINT]),
    (MissingSplit("/d/s/index.parquet", "test", ["train", "val"]), ValueError,
     {"index_url": "/d/s/index.parquet", "split": "test", "splits": ["train", "val"]},
     ["check the manifest's split names or rerun the download and shard stages"]),
    (MissingDegradations("val", ["snowy"], ["hazy"]), ValueError,
     {"split": "val", "missing": ["snowy"], "present": ["hazy"]},
     ["fix the degradation list or rerun the download and shard stages"]),
    (ShardVerificationError("/d/s", 6, FAILURES), RuntimeError,
     {"out_url": "/d/s", "total": 6, "failures": FAILURES},
     ["rerun the shard stage with the config that wrote them and --refresh shard",
      "not marked: train/a/pairs-000001.tar; run `srdiff verify-shards` again"]),
    (OtherModelCache("/c/abc", {"arch": "B"}, {"arch": "A"}), ValueError,
     {"url": "/c/abc", "stored": {"arch": "B"}, "expected": {"arch": "A"}}, ["delete that folder and rerun"]),
    (PairMismatch((4, 4, 3), (4, 5, 3), "train/a/1"), ValueError,
     {"lq_shape": (4, 4, 3), "gt_shape": (4, 5, 3), "sample_id": "train/a/1"}, ["rerun the download stage"]),
    (MissingEmbedding("train/a/1"), KeyError, {"sample_id": "train/a/1"}, ["rerun the embed stage"]),
    (NoShardUrls(), ValueError, {}, ["run the shard stage"]),
    (TooFewShards(2, 3, 1), ValueError, {"num_shards": 2, "world_size": 3, "workers": 1},
     ["lower the training processes (train.nproc, or torchrun's --nproc_per_node x --nnodes) to at most 2",
      "lower shard.maxcount"]),
    (TooFewShards(4, 2, 3), ValueError, {"num_shards": 4, "world_size": 2, "workers": 3},
     ["lower train.num_workers to at most 2"]),
]


def _all_refusals(kind: type = Refusal) -> set[type]:
    return {sub for direct in kind.__subclasses__() for sub in {direct, *_all_refusals(direct)}}


def test_every_typed_error_has_a_case():
    assert _all_refusals() == {type(error) for error, *_ in CASES}


@pytest.mark.parametrize("error, builtin, facts, words", CASES, ids=[type(case[0]).__name__ for case in CASES])
def test_typed_errors_carry_facts_and_the_task_layer_words_the_next_step(error, builtin, facts, words):
    assert isinstance(error, builtin)  # except clauses written for the builtin still catch it
    for name, value in facts.items():
        assert getattr(error, name) == value, name
    said = str(error)
    next_step = advice(error)
    assert next_step and all(w in next_step for w in words), next_step
    assert next_step not in said and not any(w in said for w in CLI_WORDS)  # facts only, below the task layer
    assert str(with_advice(error)) == said + error.joiner + next_step
    assert str(with_advice(error)).count(next_step) == 1  # advised twice (a rank inside a stage): once
    copy = pickle.loads(pickle.dumps(error))  # Prefect's results and torch's workers pickle errors
    assert type(copy) is type(error) and str(copy) == str(error) and copy.args == error.args


def test_verification_advice_only_names_what_happened():
    only_marked = ShardVerificationError("/d/s", 2, FAILURES[:1])
    assert "not marked" not in advice(only_marked) and "marked for rewriting" in advice(only_marked)
    only_unmarked = ShardVerificationError("/d/s", 2, FAILURES[1:])
    assert advice(only_unmarked).startswith("not marked: ")


def test_other_errors_get_no_advice():
    assert advice(ValueError("x")) is None and advice(FileNotFoundError("x")) is None
    error = ValueError("x")
    assert with_advice(error) is error and str(error) == "x"
    with pytest.raises(ValueError, match="^x$"), advised():
        raise error


# --------------------------------------------------------------------------------------------
# A damaged shard read through the real code: written by write_shards, cut short, read.

def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _tiny_manifest(root: str) -> pa.Table:
    rows = []
    for i in range(4):
        lq = np.full((8, 8, 3), 10 * i, np.uint8)
        lq_url, gt_url = fs.join(root, "LQ", f"{i}.png"), fs.join(root, "GT", f"{i}.png")
        lq_png, gt_png = _png(lq), _png(255 - lq)
        fs.atomic_write_bytes(lq_url, lq_png)
        fs.atomic_write_bytes(gt_url, gt_png)
        rows.append({"id": f"train/hazy/{i}", "dataset": "tiny", "degradation": "hazy", "split": "train",
                     "lq_path": lq_url, "gt_path": gt_url, "width": 8, "height": 8,
                     "lq_sha256": fs.sha256_bytes(lq_png), "gt_sha256": fs.sha256_bytes(gt_png)})
    return pa.Table.from_pylist(rows, schema=tables.PAIRS_SCHEMA)


@pytest.fixture
def truncated(tmp_path) -> tuple[str, str]:
    """(shard folder, url of its first shard cut off in the middle of a member)."""
    out = str(tmp_path / "shards")
    shards.write_shards(_tiny_manifest(str(tmp_path / "pairs")), out, maxcount=2, workers=1)
    url = shards.shard_urls(out, split="train")[0]
    with open(url, "r+b") as f:
        f.truncate(512 + 10)  # inside the first member's data (its header is one block)
    return out, url


def test_a_damaged_shard_read_for_training_names_the_repair(truncated):
    out, url = truncated
    urls = shards.shard_urls(out, split="train")
    with pytest.raises(DamagedShard) as err:  # storage alone: the facts
        list(data.PairDataset(urls))
    assert (err.value.url, err.value.problem) == (url, "ends in the middle of a tar member (truncated)")
    assert str(err.value) == f"{url}: ends in the middle of a tar member (truncated)"
    with pytest.raises(ValueError) as err, advised():  # where it reaches a user: the facts and the repair
        list(data.PairDataset(urls))
    assert str(err.value) == f"{url}: ends in the middle of a tar member (truncated); {REPAIR_HINT}"


def test_a_damaged_shard_in_a_dataloader_worker_keeps_its_type_and_advice(truncated, one_thread):
    """torch rebuilds a worker's error from its text: the type survives (ValueError still
    catches it), and with it the advice, appended after the worker's traceback."""
    out, url = truncated
    loader = data.make_loader(data.PairDataset(shards.shard_urls(out, split="train")[:1]), batch_size=1,
                              num_workers=1)
    with pytest.raises(DamagedShard) as err, advised():
        list(loader)
    said = str(err.value)
    assert f"{url}: ends in the middle of a tar member (truncated)" in said
    assert said.endswith(f"(truncated); {REPAIR_HINT}")


def test_verify_shards_cli_words_the_repair(truncated, capsys):
    from flows import cli

    out, url = truncated
    assert cli.main(["verify-shards", out]) == 1
    lines = capsys.readouterr().err.splitlines()
    shard = os.path.relpath(url, out)
    assert lines[0] == f"srdiff verify-shards: 1 of 2 shard(s) under {out} failed verification:"
    assert lines[1] == f"  {shard}: unreadable (ends in the middle of a tar member (truncated))"
    assert lines[2].startswith("the damaged shards are marked for rewriting: rerun the shard stage") and len(lines) == 3


def test_a_damaged_shard_met_by_a_stage_of_the_flow_names_the_repair(tmp_path, prefect_harness):
    """flows.pipeline.run_stage, where a stage's error reaches `srdiff run`: the facts and the repair."""
    from flows.pipeline import srdiff

    tiny, overrides = str(ROOT / "tests" / "configs" / "tiny.yaml"), [f"data_root={tmp_path / 'data'}"]
    out = srdiff(config_path=tiny, overrides=overrides, stages=["shard"])["stages"]["shard"]["outputs"]["shards"]
    url = shards.shard_urls(out, split="train")[0]
    with open(url, "r+b") as f:
        f.truncate(512 + 10)
    with pytest.raises(DamagedShard) as err:
        srdiff(config_path=tiny, overrides=overrides, stages=["embed"])
    assert str(err.value) == f"{url}: ends in the middle of a tar member (truncated); {REPAIR_HINT}"
