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


@pytest.mark.parametrize("key", ["hidden", "epochs", "batch_size", "patience"])
def test_srm_counts_must_be_positive(key):
    # batch_size 0 used to pass here and divide by zero in train_srm.
    with pytest.raises(ConfigError, match=rf"'embed\.srm\.{key}': Input should be greater than or equal to 1 \(got 0\)"):
        load_config(None, [f"embed.srm.{key}=0"])
    assert getattr(load_config(None, [f"embed.srm.{key}=1"]).embed.srm, key) == 1


def test_srm_depth_and_warmup_may_be_zero_not_negative():
    srm = load_config(None, ["embed.srm.depth=0", "embed.srm.warmup_epochs=0"]).embed.srm
    assert srm.depth == 0 and srm.warmup_epochs == 0
    for key in ("depth", "warmup_epochs"):
        with pytest.raises(ConfigError, match=rf"'embed\.srm\.{key}': Input should be greater than or equal to 0"):
            load_config(None, [f"embed.srm.{key}=-1"])


def test_evaluate_steps_must_not_exceed_sde_T():
    assert load_config(None, ["evaluate.steps=100"]).evaluate.steps == 100  # K = T: every step
    with pytest.raises(ConfigError) as info:
        load_config(None, ["evaluate.steps=101"])
    assert str(info.value).splitlines()[1:] == [
        "  evaluate.steps (101) exceeds sde.T (100), the number of SDE steps: set evaluate.steps <= sde.T (100)"]
    # The bound follows sde.T, not the default.
    assert load_config(None, ["sde.T=200", "evaluate.steps=200"]).evaluate.steps == 200
    with pytest.raises(ConfigError, match=r"set evaluate\.steps <= sde\.T \(20\)"):
        load_config(None, ["sde.T=20"])


def test_tile_overlap_must_be_below_tile_size():
    assert load_config(None, ["evaluate.tile_size=33"]).evaluate.tile_overlap == 32
    assert load_config(None, ["evaluate.tile_size=0", "evaluate.tile_overlap=500"]).evaluate.tile_size == 0
    with pytest.raises(ConfigError) as info:
        load_config(None, ["evaluate.tile_size=32"])
    assert str(info.value).splitlines()[1:] == [
        "  evaluate.tile_overlap (32) must be smaller than evaluate.tile_size (32): "
        "set evaluate.tile_overlap < 32, or evaluate.tile_size: 0 to never tile"]


def test_train_timesteps_must_hold_every_step_the_sampler_queries():
    # Default: every step (None). The demo's one-jump sampler queries t = T alone.
    assert load_config(None).train.timesteps is None
    assert load_config(None, ["evaluate.steps=1", "train.timesteps=[100]"]).train.timesteps == [100]
    assert load_config(None, ["evaluate.steps=2", "train.timesteps=[100, 50, 20]"]).train.timesteps == [100, 50, 20]
    with pytest.raises(ConfigError) as info:
        load_config(None, ["evaluate.steps=3", "train.timesteps=[100]"])
    assert str(info.value).splitlines()[1:] == [
        "  evaluate.steps 3 queries the network at t = [100, 67, 33], but train.timesteps [100] leaves out "
        "[67, 33]: set train.timesteps: [100, 67, 33], or null to train every step"]
    for bad in ("[]", "[0]", "[101]"):
        with pytest.raises(ConfigError, match=r"must be a non-empty list of steps in 1\.\.sde\.T \(100\), or null"):
            load_config(None, ["evaluate.steps=1", f"train.timesteps={bad}"])


def test_cross_key_problems_are_reported_together():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["evaluate.steps=101", "evaluate.tile_size=16"])
    lines = str(info.value).splitlines()
    assert len(lines) == 3
    assert lines[1].startswith("  evaluate.steps (101)") and lines[2].startswith("  evaluate.tile_overlap (32)")


@pytest.mark.parametrize(("value", "bound"), [("0", "greater than 0"), ("-0.1", "greater than 0"),
                                              ("1", "less than 1"), ("2.0", "less than 1")])
def test_sde_eps_must_lie_strictly_between_0_and_1(value, bound):
    # IRSDE takes log(eps) for the step length: eps 0 or >= 1 has no schedule.
    with pytest.raises(ConfigError, match=rf"'sde\.eps': Input should be {bound}"):
        load_config(None, [f"sde.eps={value}"])
    assert load_config(None, ["sde.eps=0.999"]).sde.eps == 0.999
