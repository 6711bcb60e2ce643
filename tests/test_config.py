from pathlib import Path

import pytest

from srdiff_core.config import Config, ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def test_defaults_in_one_place():
    cfg = Config()
    assert cfg.sde.max_sigma == 10.0 and cfg.sde.T == 100 and cfg.sde.eps == 0.005
    assert cfg.train.batch_size == 16 and cfg.train.patch_size == 256 and cfg.train.lr == 2e-4
    assert cfg.train.betas == (0.9, 0.99) and cfg.train.ema_decay == 0.995
    assert cfg.unet.nf == 64 and cfg.unet.ch_mult == [1, 2, 4, 8]
    assert cfg.evaluate.crop_border == 4 and cfg.embed.arch == "ViT-B-32"


def test_shipped_configs_parse():
    default = load_config(REPO / "configs/default.yaml")
    demo = load_config(REPO / "configs/demo.yaml")
    tiny = load_config(REPO / "tests/configs/tiny.yaml")
    assert default.download.source == "real"
    assert demo.download.source == "demo" and demo.embed.pretrained == "none"
    # tiny inherits demo (base:) and changes only what it names
    assert tiny.embed.pretrained == "none" and tiny.unet.nf == 8 and tiny.shard.maxcount == 2
    assert tiny.train.lr == demo.train.lr


def test_overrides_take_yaml_types():
    cfg = load_config(REPO / "configs/demo.yaml",
                      ["train.steps=7", "unet.ch_mult=[1,2]", "evaluate.lpips=false", "tracking.mlflow_uri=null"])
    assert cfg.train.steps == 7 and cfg.unet.ch_mult == [1, 2] and cfg.evaluate.lpips is False
    assert cfg.tracking.mlflow_uri is None


def test_unknown_key_names_the_key(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  stepz: 10\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train.stepz'"):
        load_config(f)
    with pytest.raises(ConfigError, match=r"unknown key 'unet.width'"):
        load_config(None, ["unet.width=3"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"'train.steps'"):
        load_config(None, ["train.steps=many"])
    with pytest.raises(ConfigError, match=r"'unet.conditioning'"):
        load_config(None, ["unet.conditioning=sometimes"])


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.steps"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")


def test_section_digest_tracks_only_named_sections():
    a, b = Config(), load_config(None, ["train.steps=5"])
    assert a.section_digest("shard") == b.section_digest("shard")
    assert a.section_digest("train") != b.section_digest("train")


def test_null_conditioning_from_yaml_and_overrides(tmp_path):
    assert load_config(None, ["unet.conditioning=null"]).unet.conditioning == "null"
    assert load_config(None, ["unet.conditioning='null'"]).unet.conditioning == "null"
    (tmp_path / "ablation.yaml").write_text("unet:\n  conditioning: null\n")
    assert load_config(tmp_path / "ablation.yaml").unet.conditioning == "null"
