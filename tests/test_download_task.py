"""Download stage logic through `.fn()`: the demo set and an existing seed-layout folder."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from srdiff_core.config import load_config
from storage import tables
from tasks.download import download

TINY = str(Path(__file__).parent / "configs" / "tiny.yaml")


def test_demo_set_manifest_matches_the_files(tmp_path):
    cfg = load_config(TINY, [f"data_root={tmp_path}"])
    result = download.fn(cfg, key="k")
    manifest = tables.read_table(result.outputs["manifest"]).to_pylist()
    assert len(manifest) == 4 * (3 + 1) and result.metrics["pairs/total"] == 16
    assert len({r["id"] for r in manifest}) == 16  # ids unique over the whole manifest
    for r in manifest:
        assert Path(r["lq_path"]) == tmp_path / "datasets" / r["split"] / r["degradation"] / "LQ" / f"{r['id']}.png"
        assert Path(r["gt_path"]).name == Path(r["lq_path"]).name
        assert (r["width"], r["height"]) == (48, 48)
    # deterministic: a second materialisation gives the same manifest digest
    again = download.fn(load_config(TINY, [f"data_root={tmp_path / 'again'}"]), key="k")
    assert again.metrics == result.metrics
    assert [r["lq_sha256"] for r in tables.read_table(again.outputs["manifest"]).to_pylist()] == \
           [r["lq_sha256"] for r in manifest]


def _png(path: Path, size=(20, 16), mode="RGB", seed=0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)


def test_seed_layout_scan_joins_by_id_and_quarantines_bad_pairs(tmp_path):
    base = tmp_path / "datasets"
    for i in range(3):  # good pairs, named so that sorted order would pair them wrongly if GT were missing one
        _png(base / "train/hazy/LQ" / f"img{i}.png", seed=i)
        _png(base / "train/hazy/GT" / f"img{i}.png", seed=10 + i)
    _png(base / "train/hazy/LQ/orphan.png")                       # missing GT
    _png(base / "train/hazy/LQ/big.png", size=(20, 16))           # size mismatch
    _png(base / "train/hazy/GT/big.png", size=(24, 16))
    (base / "train/hazy/LQ/broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # corrupt
    _png(base / "train/hazy/GT/broken.png")
    _png(base / "val/rainy/LQ/img0.png")                          # same id as a train pair
    _png(base / "val/rainy/GT/img0.png")
    cfg = load_config(None, [f"data_root={tmp_path}", "download.source=seed"])
    result = download.fn(cfg, key="k")
    manifest = tables.read_table(result.outputs["manifest"]).to_pylist()
    assert [r["id"] for r in manifest] == ["img0", "img1", "img2"]
    for r in manifest:
        assert Path(r["gt_path"]).name == Path(r["lq_path"]).name
    reasons = {r["id"]: r["reason"] for r in tables.read_table(result.outputs["quarantine"]).to_pylist()}
    assert reasons["orphan"] == "missing GT partner"
    assert reasons["big"].startswith("size mismatch")
    assert reasons["broken"].startswith("unreadable image")
    assert reasons["img0"].startswith("duplicate id")
    assert result.metrics["quarantined"] == 4.0


def test_empty_real_layout_says_what_to_do(tmp_path):
    cfg = load_config(None, [f"data_root={tmp_path}", "download.source=seed"])
    with pytest.raises(FileNotFoundError, match="srdiff demo"):
        download.fn(cfg, key="k")


def test_normalise_links_only_the_files_under_our_extraction(tmp_path):
    """Hard links are decided per file: a pair whose LQ we extracted and whose GT is the user's
    links the LQ only (a user's file is never linked, so their edits cannot leak in)."""
    from tasks import normalise

    ours, theirs, out = tmp_path / "extracted", tmp_path / "mine", tmp_path / "out"
    _png(ours / "lq.png", seed=1)
    _png(theirs / "gt.png", seed=2)
    target = normalise.Target("x-1", "x", "hazy", "train", str(out / "LQ/x-1.png"), str(out / "GT/x-1.png"))
    normalise.normalise_pair(ours / "lq.png", theirs / "gt.png", target, crop_gt_to_lq=False, link_root=ours)
    assert Path(target.lq_url).samefile(ours / "lq.png")
    assert not Path(target.gt_url).samefile(theirs / "gt.png")
    assert Path(target.gt_url).read_bytes() == (theirs / "gt.png").read_bytes()
