"""unet.layout: daclip, DA-CLIP's released ConditionalUNet: its size, layout, shapes at any size,
conditioning modes, the factory and model files, the preset, and a CPU train + sample smoke run."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from srdiff_core import samplers, training
from srdiff_core.config import TrainConfig, UNetConfig, load_config
from srdiff_core.ema import make_ema
from srdiff_core.sde import IRSDE
from srdiff_core.unet import ConditionalUNet, build_unet
from srdiff_core.unet_daclip import (
    GEGLU,
    ChannelLayerNorm,
    DAClipUNet,
    LinearAttention,
    ResBlock,
    SpatialTransformer,
    daclip_sinusoid,
)

CONTEXT_DIM = 16
DACLIP_PRESET = Path(__file__).resolve().parents[1] / "configs" / "daclip.yaml"
DACLIP_PARAMETERS = 48_975_747   # DA-CLIP's 48.98 M (train.yml network settings)
SRDIFF_PARAMETERS = 47_409_411   # ours at the same widths (tests/test_unet.py pins it too)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def tiny_daclip(conditioning: str = "semantic", seed: int = 0, ch_mult=(1, 2)) -> DAClipUNet:
    """nf 8, with the zero-initialised SpatialTransformer outputs re-drawn so every path counts."""
    torch.manual_seed(seed)
    model = DAClipUNet(nf=8, ch_mult=ch_mult, num_res_blocks=1, context_dim=CONTEXT_DIM, conditioning=conditioning)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim > 0 and not param.any():
                param.copy_(0.2 * torch.randn(param.shape, generator=gen))
    return model.eval()


def inputs(batch: int, height: int, width: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, 3, height, width, generator=gen), torch.rand(batch, 3, height, width, generator=gen),
            torch.randint(1, 101, (batch,), generator=gen))


def context(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, CONTEXT_DIM, generator=torch.Generator().manual_seed(100 + seed))


# ------------------------------------------------------------------------------ size and layout

def test_reference_config_has_daclips_parameter_count():
    """nf 64, ch_mult [1,2,4,8], 2 ResBlocks, context 512 (DA-CLIP's train.yml): 48.98 M within 0.1%."""
    with torch.device("meta"):
        daclip = build_unet(UNetConfig(layout="daclip"))
        ours = build_unet(UNetConfig())
    n_daclip = sum(p.numel() for p in daclip.parameters())
    n_ours = sum(p.numel() for p in ours.parameters())
    print(f"daclip layout: {n_daclip:,} parameters; srdiff layout: {n_ours:,}")
    assert abs(n_daclip - 48.98e6) / 48.98e6 < 1e-3
    assert n_daclip == DACLIP_PARAMETERS and n_ours == SRDIFF_PARAMETERS
    assert isinstance(daclip, DAClipUNet) and isinstance(ours, ConditionalUNet)


def test_reference_config_is_laid_out_as_released():
    with torch.device("meta"):
        model = DAClipUNet()
    assert model.size_multiple == 16  # reflect padding to 2**levels
    # LinearAttention at levels 0-2, a SpatialTransformer at level 3 and in the middle.
    assert [type(level.attn.fn) for level in model.downs] == [LinearAttention] * 3 + [SpatialTransformer]
    assert [type(level.attn.fn) for level in model.ups] == [SpatialTransformer] + [LinearAttention] * 3
    assert isinstance(model.mid_attn.fn, SpatialTransformer)
    assert all(isinstance(level.attn.norm, ChannelLayerNorm) for level in (*model.downs, *model.ups))
    # 4x4 stride-2 downsampling convs, a bias-free 3x3 conv at the last level.
    downs = [level.resample for level in model.downs]
    assert [(d.kernel_size, d.stride) for d in downs[:3]] == [((4, 4), (2, 2))] * 3
    assert downs[3].kernel_size == (3, 3) and downs[3].stride == (1, 1) and downs[3].bias is None
    assert model.init_conv.kernel_size == (7, 7) and model.init_conv.bias is None
    # Norm-free, bias-free ResBlocks (only the time projection has a bias).
    blocks = [m for m in model.modules() if isinstance(m, ResBlock)]
    assert len(blocks) == 4 * 2 * 2 + 3
    for block in blocks:
        assert not any(isinstance(m, (nn.GroupNorm, nn.LayerNorm, ChannelLayerNorm)) for m in block.modules())
        assert all(c.bias is None for c in block.modules() if isinstance(c, nn.Conv2d))
    # Heads of 32 channels, a GEGLU feed-forward of 4x width.
    for st in (m for m in model.modules() if isinstance(m, SpatialTransformer)):
        width = st.proj_in.out_channels
        assert st.block.self_attn.heads == width // 32 and st.block.cross_attn.to_k.in_features == 512
        assert isinstance(st.block.ff[0], GEGLU) and st.block.ff[0].proj.out_features == 8 * width
    assert {m.heads for m in model.modules() if isinstance(m, LinearAttention)} == {4}


def test_sinusoid_is_daclips():
    """Frequencies exp(-log(10000) k / (half - 1)): the last is exactly 1/10000; sin half, then cos."""
    emb = daclip_sinusoid(torch.tensor([0.0, 2.0]), 8)
    freqs = [10000.0 ** (-k / 3) for k in range(4)]
    expected = [math.sin(2 * f) for f in freqs] + [math.cos(2 * f) for f in freqs]
    assert emb.shape == (2, 8)
    torch.testing.assert_close(emb[1], torch.tensor(expected), rtol=0, atol=1e-6)
    assert torch.equal(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))


def test_pads_by_reflection_to_a_multiple_of_2_to_the_levels():
    model = tiny_daclip(ch_mult=(1, 2, 2, 2))  # four levels: multiple of 16
    x = torch.arange(37 * 53, dtype=torch.float32).reshape(1, 1, 37, 53)
    padded = model._pad(x)
    assert padded.shape[-2:] == (48, 64)
    torch.testing.assert_close(padded, torch.nn.functional.pad(x, (0, 11, 0, 11), mode="reflect"))
    small = model._pad(torch.rand(1, 1, 5, 3))  # too small to reflect (the release fails): replicate
    assert small.shape[-2:] == (16, 16)


# ------------------------------------------------------------------------------ forward

@pytest.mark.parametrize("size", [(37, 53), (17, 23), (5, 3), (16, 16)])
def test_output_shape_and_dtype_at_any_size(size):
    model = tiny_daclip(ch_mult=(1, 2, 2, 2))
    xt, mu, t = inputs(2, *size)
    with torch.no_grad():
        out = model(xt, mu, t, context(2))
    assert out.shape == xt.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.abs().sum() > 0


def test_reference_width_forward_at_an_odd_size():
    torch.manual_seed(0)
    model = DAClipUNet(context_dim=CONTEXT_DIM).eval()
    xt, mu, t = inputs(1, 37, 53)
    with torch.no_grad():
        out = model(xt, mu, t, context(1))
    assert out.shape == (1, 3, 37, 53) and torch.isfinite(out).all()


def test_semantic_context_changes_the_output_and_is_required():
    model = tiny_daclip()
    xt, mu, t = inputs(2, 12, 20)
    with torch.no_grad():
        a, b = model(xt, mu, t, context(2, seed=0)), model(xt, mu, t, context(2, seed=1))
        tokens = model(xt, mu, t, context(2, seed=0)[:, None, :])  # [B, 1, D] == [B, D]
    assert not torch.allclose(a, b)
    torch.testing.assert_close(a, tokens)
    with pytest.raises(ValueError, match="needs a context"):
        model(xt, mu, t, None)
    with pytest.raises(ValueError, match="unet.context_dim"):
        model(xt, mu, t, torch.zeros(2, CONTEXT_DIM + 1))


def test_null_conditioning_uses_a_learned_token_and_ignores_any_context():
    model = tiny_daclip("null")
    xt, mu, t = inputs(2, 12, 20)
    with torch.no_grad():
        none = model(xt, mu, t, None)
        given = model(xt, mu, t, context(2))
    assert torch.equal(none, given)
    assert model.null_context is not None and model.null_context.requires_grad
    assert tiny_daclip("semantic").null_context is None  # only the parameters a mode uses exist (DDP)
    # Every parameter gets a gradient in either mode (DDP refuses unused ones).
    for mode in ("semantic", "null"):
        m = tiny_daclip(mode).train()
        m(*inputs(2, 12, 20), None if mode == "null" else context(2)).square().mean().backward()
        assert all(p.grad is not None for p in m.parameters()), mode


def test_checkpointed_training_forward_gives_the_same_gradients():
    """The transformer blocks are recomputed in backward while training (as released): same numbers."""
    grads = {}
    for mode in ("train", "eval"):
        model = tiny_daclip()
        model.train(mode == "train")
        model(*inputs(2, 12, 20), context(2)).square().mean().backward()
        grads[mode] = [p.grad.clone() for p in model.parameters()]
    for a, b in zip(grads["train"], grads["eval"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_bf16_autocast_forward_is_finite_and_keeps_the_input_dtype():
    model = tiny_daclip()
    xt, mu, t = inputs(2, 12, 20)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(xt, mu, t, context(2))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


# ------------------------------------------------------------------------------ config, factory, model file

def test_build_unet_follows_the_layout():
    cfg = UNetConfig(nf=8, ch_mult=[1, 2], num_res_blocks=1, context_dim=CONTEXT_DIM, attn_heads=2)
    assert type(build_unet(cfg)) is ConditionalUNet
    model = build_unet(cfg.model_copy(update={"layout": "daclip", "conditioning": "null"}))
    assert type(model) is DAClipUNet and model.conditioning == "null" and model.size_multiple == 4
    assert UNetConfig().layout == "srdiff"  # ours stays the default
    with pytest.raises(ValueError, match="layout"):
        UNetConfig(layout="ddpm")


def test_a_model_file_restores_in_the_layout_it_was_trained_in(tmp_path):
    """model.pt records unet.layout; a file from before the key existed is our layout."""
    from srdiff_core import srm
    from srdiff_core.config import Config
    from srdiff_core.restorer import Restorer
    from tasks.refine import save_srm
    from tasks.train import model_file_state

    cfg = Config.model_validate({"data_root": str(tmp_path), "embed": {"pretrained": "none", "srm": {"hidden": 8}},
                                 "unet": {"layout": "daclip", "nf": 8, "ch_mult": [1, 2], "num_res_blocks": 1,
                                          "context_dim": CONTEXT_DIM}})
    srm_url = str(tmp_path / "srm.pt")
    save_srm(srm_url, srm.SemanticRefinementModule.from_config(CONTEXT_DIM, cfg.embed.srm), cfg, CONTEXT_DIM)
    torch.manual_seed(0)
    unet = build_unet(cfg.unet)
    state = model_file_state(make_ema(unet), cfg, srm_url)
    assert state["unet"]["layout"] == "daclip"
    torch.save(state, tmp_path / "model.pt")
    restorer = Restorer.from_file(tmp_path / "model.pt")
    assert type(restorer.unet) is DAClipUNet
    for key, value in unet.state_dict().items():
        assert torch.equal(restorer.unet.state_dict()[key], value), key
    lq = torch.rand(1, 3, 21, 19, generator=torch.Generator().manual_seed(0))
    out = restorer.restore(lq, context(1), steps=3, seed=0)
    assert out.shape == lq.shape and torch.isfinite(out).all()

    old = dict(state, unet={k: v for k, v in state["unet"].items() if k != "layout"})  # no layout key
    torch.save(old, tmp_path / "old.pt")
    from srdiff_core.restorer import ModelFileMismatch
    with pytest.raises(ModelFileMismatch, match="do not fit"):  # daclip weights, read as our layout
        Restorer.from_file(tmp_path / "old.pt")


def test_daclip_preset_validates_with_daclips_settings():
    cfg = load_config(DACLIP_PRESET)
    assert cfg.unet.layout == "daclip"
    assert (cfg.unet.nf, cfg.unet.ch_mult, cfg.unet.num_res_blocks, cfg.unet.context_dim) == (64, [1, 2, 4, 8], 2, 512)
    assert (cfg.sde.max_sigma, cfg.sde.T, cfg.sde.eps, cfg.sde.schedule) == (50.0, 100, 0.005, "cosine")
    t = cfg.train
    assert (t.steps, t.batch_size, t.patch_size, t.lr, t.betas) == (700_000, 16, 256, 2e-4, (0.9, 0.99))
    assert (t.ema_decay, t.ema_every, t.warmup_steps, t.grad_clip, t.precision) == (0.995, 10, 0, 0, "fp32")
    assert t.lr * t.min_lr_ratio == pytest.approx(1e-6)  # eta_min of the cosine schedule
    assert cfg.evaluate.steps == cfg.sde.T == 100
    assert cfg.download.source == "real"  # default.yaml's datasets
    # Every value in the preset names the released file it comes from.
    for line in DACLIP_PRESET.read_text().splitlines():
        if ":" in line and not line.lstrip().startswith("#") and not line.rstrip().endswith(":") \
                and not line.startswith(("base:", "name:")):
            assert "#" in line and any(src in line for src in ("train.yml", "test.yml", "model", "arch", ".py")), line


# ------------------------------------------------------------------------------ CPU smoke: train and sample

def test_tiny_daclip_trains_a_few_steps_and_samples(tmp_path):
    cfg = TrainConfig(steps=4, batch_size=2, patch_size=16, lr=1e-3, precision="fp32", checkpoint_every=2,
                      log_every=1, sample_every=100, ema_every=2, num_workers=0)
    model = build_unet(UNetConfig(layout="daclip", nf=8, ch_mult=[1, 2], num_res_blocks=1, context_dim=CONTEXT_DIM))
    initial = {k: v.clone() for k, v in model.state_dict().items()}

    def batches(start: int):
        for step in itertools.count(start):
            g = torch.Generator().manual_seed(step)
            gt = torch.rand(2, 3, 16, 16, generator=g)
            yield {"lq": 0.5 * gt, "gt": gt, "context": torch.randn(2, CONTEXT_DIM, generator=g)}

    logged = []
    state = training.train(model, IRSDE(50.0), batches, cfg, checkpoint_dir=tmp_path / "ckpt",
                           config_dict={"unet": {"layout": "daclip"}}, log_fn=lambda s, m: logged.append(m["loss"]))
    assert state.step == 4 and len(logged) == 4 and all(math.isfinite(v) for v in logged)
    assert any(not torch.equal(initial[k], v) for k, v in state.ema.state_dict().items())
    lq = torch.rand(1, 3, 19, 23, generator=torch.Generator().manual_seed(9))
    out = samplers.restore(state.ema, lq, IRSDE(50.0), torch.randn(1, CONTEXT_DIM), steps=5,
                           generator=torch.Generator().manual_seed(0))
    assert out.shape == lq.shape and torch.isfinite(out).all()
