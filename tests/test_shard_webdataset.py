"""Our shards are WebDataset shards: the `webdataset` library itself reads every sample back
with its bytes, keyed as our reader keys them (ids with "/", "." and a PAX-length id included)."""

from __future__ import annotations

import json

import webdataset as wds

from storage import shards
from test_shards import make_pairs


def test_webdataset_library_reads_our_shards(tmp_path):
    manifest = make_pairs(str(tmp_path / "pairs"))
    out = str(tmp_path / "shards")
    shards.write_shards(manifest, out, maxcount=3, workers=2)
    urls = [u for split in ("train", "val") for u in shards.shard_urls(out, split=split)]

    theirs = {}
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        meta = json.loads(sample["json"])
        assert sample["__key__"] == shards.sample_key(meta["id"])
        assert {k for k in sample if not k.startswith("__")} == {"lq.png", "gt.png", "json"}
        theirs[meta["id"]] = (sample["lq.png"], sample["gt.png"])

    assert sorted(theirs) == sorted(manifest.column("id").to_pylist())
    ours = {s["id"]: (s["lq_png"], s["gt_png"]) for s in shards.iter_samples(urls)}
    assert theirs == ours
    for row in manifest.to_pylist():  # verbatim copies of the source PNGs
        with open(row["lq_path"], "rb") as lq, open(row["gt_path"], "rb") as gt:
            assert theirs[row["id"]] == (lq.read(), gt.read())
