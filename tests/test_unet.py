"""ConditionalUNet: shapes at any size, context handling, null conditioning, dtypes, reference size."""

from __future__ import annotations

import pytest
import torch

from srdiff_core.config import UNetConfig
from srdiff_core.unet import ConditionalUNet

CONTEXT_DIM = 16


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def tiny_unet(conditioning: str = "semantic", seed: int = 0) -> ConditionalUNet:
    """nf=8, two levels, with the zero-initialised layers (final conv, transformer output
    projections) re-drawn so that every path, the context's included, reaches the output."""
    torch.manual_seed(seed)
    model = ConditionalUNet(nf=8, ch_mult=(1, 2), num_res_blocks=1, context_dim=CONTEXT_DIM, attn_heads=2,
                            conditioning=conditioning)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim > 0 and not param.any():
                param.copy_(0.2 * torch.randn(param.shape, generator=gen))
    return model.eval()


def inputs(batch: int, height: int, width: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    xt = torch.rand(batch, 3, height, width, generator=gen)
    mu = torch.rand(batch, 3, height, width, generator=gen)
    t = torch.randint(1, 101, (batch,), generator=gen)
    return xt, mu, t


def context(batch: int, tokens: int | None = None, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 + seed)
    shape = (batch, CONTEXT_DIM) if tokens is None else (batch, tokens, CONTEXT_DIM)
    return torch.randn(shape, generator=gen)


@pytest.mark.parametrize("size", [(17, 23), (32, 48), (5, 3), (16, 16)])
def test_output_shape_and_dtype_at_any_size(size):
    model = tiny_unet()
    xt, mu, t = inputs(3, *size)
    with torch.no_grad():
        out = model(xt, mu, t, context(3))
    assert out.shape == xt.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.abs().sum() > 0


def test_padding_is_cropped_back_in_place():
    """The pad goes bottom/right and the crop keeps the top-left, so output pixel (i, j) still belongs
    to input pixel (i, j): a 32x32 image and its 31x29 crop agree on the top-left interior up to the
    global attention's small dependence on the rest (5% of the output scale here; a one-pixel shift
    of the alignment gives 95%)."""
    model = tiny_unet()
    xt, mu, t = inputs(1, 32, 32)
    with torch.no_grad():
        full = model(xt, mu, t, context(1))
        crop = model(xt[..., :31, :29], mu[..., :31, :29], t, context(1))
    assert crop.shape == (1, 3, 31, 29)
    assert (full[..., :8, :8] - crop[..., :8, :8]).abs().max() < 0.15 * full.abs().max()


def test_token_sequence_and_single_token_context():
    model = tiny_unet()
    xt, mu, t = inputs(2, 16, 16)
    one = context(2)
    with torch.no_grad():
        as_vector = model(xt, mu, t, one)
        as_sequence = model(xt, mu, t, one[:, None, :])
        three_tokens = model(xt, mu, t, context(2, tokens=3))
    # [B, D] is one token: identical to [B, 1, D].
    torch.testing.assert_close(as_vector, as_sequence, rtol=0, atol=0)
    assert three_tokens.shape == xt.shape and not torch.allclose(three_tokens, as_vector)


def test_semantic_mode_depends_on_context_per_sample():
    model = tiny_unet()
    xt, mu, t = inputs(2, 16, 16)
    c1, c2 = context(2, seed=1), context(2, seed=2)
    c_mixed = torch.stack([c1[0], c2[1]])
    with torch.no_grad():
        out1, out2, mixed = model(xt, mu, t, c1), model(xt, mu, t, c2), model(xt, mu, t, c_mixed)
    assert (out1 - out2).abs().max() > 1e-3
    # Sample 0 sees only its own context: batch elements do not leak into each other.
    torch.testing.assert_close(mixed[0], out1[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed[1], out2[1], rtol=1e-5, atol=1e-6)


def test_semantic_mode_requires_context():
    model = tiny_unet()
    xt, mu, t = inputs(1, 8, 8)
    with pytest.raises(ValueError, match="needs a context"):
        model(xt, mu, t, None)
    with pytest.raises(ValueError, match="context_dim"):
        model(xt, mu, t, torch.zeros(1, CONTEXT_DIM + 1))


def test_null_mode_ignores_context():
    model = tiny_unet("null")
    xt, mu, t = inputs(2, 12, 20)
    with torch.no_grad():
        outs = [model(xt, mu, t, c) for c in (None, context(2, seed=1), context(2, tokens=4, seed=2))]
    assert outs[0].abs().sum() > 0
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=0)
    assert model.null_context.shape == (1, 1, CONTEXT_DIM) and model.null_context.requires_grad


def test_depends_on_timestep_and_accepts_int_t():
    model = tiny_unet()
    xt, mu, _ = inputs(2, 8, 8)
    with torch.no_grad():
        early = model(xt, mu, 3, context(2))
        late = model(xt, mu, torch.tensor([90, 90]), context(2))
    assert (early - late).abs().max() > 1e-3


def test_fresh_model_predicts_zero_noise():
    """The zero-initialised final conv (see ConditionalUNet.__init__) makes eps = 0 at step 0."""
    torch.manual_seed(0)
    model = ConditionalUNet(nf=8, ch_mult=(1, 2), context_dim=CONTEXT_DIM, attn_heads=2)
    xt, mu, t = inputs(2, 9, 9)
    out = model(xt, mu, t, context(2))
    assert torch.equal(out, torch.zeros_like(out))
    out.square().add(out).sum().backward()
    assert model.final_conv.weight.grad.abs().sum() > 0  # it still learns


def test_bf16_autocast_returns_input_dtype_and_stays_close():
    model = tiny_unet()
    xt, mu, t = inputs(2, 17, 23)
    with torch.no_grad():
        ref = model(xt, mu, t, context(2))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(xt, mu, t, context(2))
    assert low.dtype == torch.float32
    # bf16 keeps ~3 significant digits; through a dozen layers the error stays a few percent.
    assert (low - ref).abs().max() < 0.05 * ref.abs().max()
    with torch.no_grad():
        native = model.to(torch.bfloat16)(xt.bfloat16(), mu.bfloat16(), t, context(2).bfloat16())
    assert native.dtype == torch.bfloat16


def test_channels_last_matches_contiguous():
    model = tiny_unet()
    xt, mu, t = inputs(2, 16, 24)
    with torch.no_grad():
        ref = model(xt, mu, t, context(2))
        model = model.to(memory_format=torch.channels_last)
        out = model(xt.to(memory_format=torch.channels_last), mu.to(memory_format=torch.channels_last), t,
                    context(2))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("conditioning", ["semantic", "null"])
def test_backward_reaches_every_parameter(conditioning):
    """Every parameter of either mode is in the graph (DDP refuses parameters that are not), and in
    semantic mode the context gets a gradient too."""
    model = tiny_unet(conditioning).train()
    xt, mu, t = inputs(2, 16, 16)
    ctx = context(2).requires_grad_()
    model(xt, mu, t, ctx).square().mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    if conditioning == "semantic":
        assert ctx.grad is not None and ctx.grad.abs().sum() > 0
        assert model.null_context is None
    else:
        assert ctx.grad is None and model.context_norm is None


def test_single_token_cross_attention_ignores_its_query():
    """With one context token the softmax weight is 1 whatever the query, so the cross-attention
    query path (norm2, to_q) and to_k get exactly zero gradient; with several tokens every weight
    learns. This documents the single-token case, it is not a defect of the block."""
    xt, mu, t = inputs(2, 16, 16)
    dead = {}
    for tokens in (None, 3):
        model = tiny_unet().train()
        model(xt, mu, t, context(2, tokens=tokens)).square().mean().backward()
        # Names inside the block ("norm2.weight"), whichever level it sits at. "Zero" is rounding
        # level: exact zeros on some CPUs' kernels, 1e-11 on others, against >= 1e-5 for live weights.
        # A ResBlock's conv1 bias is left out: a one-channel-per-group GroupNorm follows it, which
        # removes any per-channel constant, so it is dead in both cases.
        dead[tokens] = {n.split("transformer.")[-1] for n, p in model.named_parameters()
                        if p.grad.abs().max() < 1e-7 and not n.endswith("conv1.bias")}
    assert dead[3] == set()
    assert dead[None] and dead[None] <= {"norm2.weight", "norm2.bias", "cross_attn.to_q.weight",
                                         "cross_attn.to_k.weight"}


def test_reference_config_parameter_count():
    """nf 64, ch_mult [1,2,4,8], 2 ResBlocks per level, context 512, 4 heads (DESIGN.md defaults),
    built on the meta device (no memory). Pinned so an architecture change is a conscious one."""
    with torch.device("meta"):
        model = ConditionalUNet.from_config(UNetConfig())
    n_params = sum(p.numel() for p in model.parameters())
    print(f"ConditionalUNet reference config: {n_params:,} parameters")
    assert n_params == 47_409_411
    assert model.size_multiple == 8
    assert [lvl.transformer is not None for lvl in model.downs] == [False, False, True, True]
    assert [lvl.transformer is not None for lvl in model.ups] == [True, True, False, False]


def test_from_config_and_rejects_bad_settings():
    cfg = UNetConfig(nf=8, ch_mult=[1, 2], num_res_blocks=1, context_dim=CONTEXT_DIM, attn_heads=2,
                     conditioning="null")
    model = ConditionalUNet.from_config(cfg)
    assert model.conditioning == "null" and model.size_multiple == 2
    with pytest.raises(ValueError, match="attn_heads"):
        ConditionalUNet(nf=8, ch_mult=(1, 2), attn_heads=3, context_dim=CONTEXT_DIM)
    with pytest.raises(ValueError, match="conditioning"):
        ConditionalUNet(nf=8, ch_mult=(1, 2), context_dim=CONTEXT_DIM, conditioning="text")  # type: ignore[arg-type]


def test_input_scaling_divides_the_residual_by_its_marginal_std():
    from srdiff_core.config import SDEConfig, UNetConfig
    from srdiff_core.sde import IRSDE
    from srdiff_core.unet import build_unet

    torch.manual_seed(0)
    sde = IRSDE.from_config(SDEConfig(eps=0.005))
    scales = sde.input_scales(0.25)
    # t = 0: the clean residual alone, std 0.25; t = T: lambda^2 (1 - eps^2) + (eps 0.25)^2.
    assert scales[0].item() == pytest.approx(4.0, rel=1e-6)
    lam = 10 / 255
    assert scales[-1].item() == pytest.approx((lam ** 2 * (1 - 0.005 ** 2) + (0.005 * 0.25) ** 2) ** -0.5, rel=1e-5)
    cfg = UNetConfig(nf=8, ch_mult=[1, 2], num_res_blocks=1, input_scaling_std=0.25)
    with pytest.raises(ValueError, match="needs the SDE"):
        build_unet(cfg)
    scaled, plain = build_unet(cfg, sde), build_unet(cfg.model_copy(update={"input_scaling_std": 0.0}))
    torch.nn.init.normal_(scaled.final_conv.weight)  # zero-initialised: every output would be 0
    plain.load_state_dict(scaled.state_dict())  # the factors are not weights: same state dict
    assert "input_scales" not in scaled.state_dict()
    torch.manual_seed(0)
    xt, mu, ctx = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16), torch.randn(2, 512)
    t = torch.tensor([1, 100])
    # The scaled network on x_t equals the plain one on the residual pre-multiplied by the factor.
    pre = mu + (xt - mu) * scales[t].view(-1, 1, 1, 1)
    out = scaled(xt, mu, t, ctx)
    torch.testing.assert_close(out, plain(pre, mu, t, ctx), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out, plain(xt, mu, t, ctx))


def test_x0_prediction_turns_the_output_into_the_noise_it_implies():
    from srdiff_core.config import SDEConfig, UNetConfig
    from srdiff_core.samplers import posterior_sample
    from srdiff_core.sde import IRSDE
    from srdiff_core.unet import build_unet

    torch.manual_seed(0)
    sde = IRSDE.from_config(SDEConfig(max_sigma=2, eps=0.05))
    decay, std, skip, out = sde.x0_coefficients().double()
    assert skip.eq(0).all() and out.eq(1).all()
    assert decay[0].item() == 1.0 and decay[-1].item() == pytest.approx(0.05, rel=1e-6)
    assert std[0].item() == 1.0  # v_0 = 0: never used, kept finite
    assert std[-1].item() == pytest.approx(2 / 255 * (1 - 0.05 ** 2) ** 0.5, rel=1e-6)
    cfg = UNetConfig(nf=8, ch_mult=[1, 2], num_res_blocks=1, prediction="x0")
    with pytest.raises(ValueError, match="needs the SDE"):
        build_unet(cfg)
    daclip = build_unet(cfg.model_copy(update={"layout": "daclip"}), sde)  # the same reading of the output
    assert daclip.x0_coefficients is not None and "x0_coefficients" not in daclip.state_dict()
    x0_model, raw = build_unet(cfg, sde), build_unet(cfg.model_copy(update={"prediction": "noise"}))
    ctx = torch.randn(2, 512)
    lq = torch.rand(2, 3, 16, 16)
    # Zero-initialised output: x0 - mu = 0 at every step, so the untrained model returns its input.
    out = posterior_sample(x0_model.eval(), lq, sde, ctx, steps=5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, lq, rtol=0, atol=1e-5)  # rounding of the noise round trip
    torch.nn.init.normal_(x0_model.final_conv.weight, std=0.01)
    raw.load_state_dict(x0_model.state_dict())  # the coefficients are not weights
    xt = torch.rand(2, 3, 16, 16)
    t = torch.tensor([1, 100])
    # The noise it returns gives back x0 = mu + raw output through the sampler's own inversion.
    noise = x0_model(xt, lq, t, ctx)
    torch.testing.assert_close(sde.predict_x0(xt, lq, t, noise), lq + raw(xt, lq, t, ctx), rtol=0, atol=2e-5)


def test_x0_prediction_with_a_residual_std_skips_the_input_as_edm_does():
    from srdiff_core.config import SDEConfig, UNetConfig
    from srdiff_core.sde import IRSDE
    from srdiff_core.unet import build_unet

    torch.manual_seed(0)
    sde = IRSDE.from_config(SDEConfig(max_sigma=2, eps=0.05))
    s = 0.25
    decay, std, skip, out = sde.x0_coefficients(s).double()
    lam = 2 / 255
    # t = T: decay 0.05, v = lambda^2 (1 - 0.05^2): the linear estimate of the residual from x_T - mu.
    v_T = lam ** 2 * (1 - 0.05 ** 2)
    assert skip[-1].item() == pytest.approx(0.05 * s ** 2 / (0.05 ** 2 * s ** 2 + v_T), rel=1e-5)
    assert out[-1].item() == pytest.approx(s * v_T ** 0.5 / (0.05 ** 2 * s ** 2 + v_T) ** 0.5, rel=1e-5)
    assert skip[0].item() == pytest.approx(1.0) and out[0].item() == 0.0  # x_0 is x0 itself
    model = build_unet(UNetConfig(nf=8, ch_mult=[1, 2], num_res_blocks=1, prediction="x0", input_scaling_std=s), sde)
    # Untrained (output F = 0): x0_hat - mu = skip (x_t - mu), the skip alone.
    xt, mu, ctx, t = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16), torch.randn(2, 512), torch.tensor([3, 100])
    expected = mu + skip.float()[t].view(-1, 1, 1, 1) * (xt - mu)
    torch.testing.assert_close(sde.predict_x0(xt, mu, t, model(xt, mu, t, ctx)), expected, rtol=0, atol=2e-5)


def test_norm_groups_sets_every_groupnorm_and_keeps_the_parameters():
    """unet.norm_groups caps the group count of every GroupNorm (ResBlocks and transformer inputs);
    the weights have the same shapes whatever the count, so only the config tells them apart."""
    def groups(model: ConditionalUNet) -> set[tuple[int, int]]:
        return {(m.num_groups, m.num_channels) for m in model.modules() if isinstance(m, torch.nn.GroupNorm)}

    kwargs = dict(nf=16, ch_mult=(1, 2), num_res_blocks=1, context_dim=CONTEXT_DIM, attn_heads=2)
    default, one = ConditionalUNet(**kwargs), ConditionalUNet(**kwargs, norm_groups=1)
    assert groups(default) == {(16, 16), (32, 32), (24, 48)}  # one channel per group at 16 and 32 channels
    assert groups(one) == {(1, 16), (1, 32), (1, 48)}
    assert {k: v.shape for k, v in default.state_dict().items()} == {k: v.shape for k, v in one.state_dict().items()}
    cfg = UNetConfig(nf=16, ch_mult=[1, 2], num_res_blocks=1, context_dim=CONTEXT_DIM, attn_heads=2, norm_groups=4)
    assert {g for g, _ in groups(ConditionalUNet.from_config(cfg))} == {4}
    with pytest.raises(ValueError, match="norm_groups"):
        ConditionalUNet(**kwargs, norm_groups=0)
    with pytest.raises(ValueError, match="norm_groups"):
        UNetConfig(norm_groups=0)


def test_one_channel_groups_cannot_see_a_feature_level_one_group_can():
    """Why the demo sets norm_groups 1: with one channel per group a feature's image-wide level (a
    dark image's, say) is normalised away; normalised together, the channels keep their levels
    relative to each other."""
    from srdiff_core.unet import group_norm

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 8, 6, 6, generator=gen)
    offset = torch.linspace(-2.0, 2.0, 8)[None, :, None, None]
    per_channel, together = group_norm(8), group_norm(8, max_groups=1)
    assert per_channel.num_groups == 8 and together.num_groups == 1
    torch.testing.assert_close(per_channel(x + offset), per_channel(x), atol=1e-5, rtol=0)
    assert (together(x + offset) - together(x)).abs().max() > 0.5
