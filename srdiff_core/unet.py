"""Conditional UNet noise predictor of the IR-SDE: our layout (``unet.layout: srdiff``, the default).

Input is concat(x_t - mu, mu) (the residual to remove and the degraded image itself); output is the
predicted noise eps of x_t = m_t + sqrt(v_t) eps. Levels of ResBlocks (GroupNorm + time scale-shift,
as in Dhariwal & Nichol 2021) with a skip after every block; the two lowest-resolution levels and
the middle block also carry a transformer block (self-attention, cross-attention to the semantic
context tokens, feed-forward; a SpatialTransformer after Rombach et al. 2022).

It keeps the skeleton of DA-CLIP's ConditionalUNet (daclip-uir DenoisingUNet_arch.py: the same
input, widths nf * [1, 1, 2, 4, 8], two ResBlocks and one attention site per level, skips, nearest
x2 + 3x3 conv up, 7x7 stem, Linear-GELU-Linear time MLP) but is not laid out like it. DA-CLIP's
exact layout is ``unet.layout: daclip`` (srdiff_core/unet_daclip.py), for parity runs. Differences:

- Attention placement and kind. Here: a softmax transformer at the two lowest-resolution levels
  (2, 3) and the middle, no attention at levels 0-1. DA-CLIP: LinearAttention at levels 0-2,
  including full resolution, a SpatialTransformer only at level 3 and the middle. Why: speed and
  memory; attention at levels 0-1 are extra passes (and stored activations) over the largest
  feature maps. Not FLOPs: softmax attention at level 2 costs more arithmetic than DA-CLIP's linear
  attention there (model FLOPs per image, torch.utils.flop_counter: training at 256 px 837 G here vs
  796 G, a 1280x720 forward 9.65 T vs 4.73 T), spent in compute-bound kernels. bench/gpu.py reports
  both layouts' img/s, FLOPs, TFLOP/s and peak memory.
- Attention kernel. Here F.scaled_dot_product_attention (flash / memory-efficient kernels that
  never store the N x N scores). DA-CLIP materialises the scores (einsum + softmax) and recomputes
  its transformer blocks in the backward pass (gradient checkpointing). Why: memory and speed; at
  1280x720 each of DA-CLIP's level-3 and middle self-attentions (160x90 = 14,400 tokens) holds a
  14,400 x 14,400 score matrix per head (0.8 GB in fp32, 8 or 16 heads), which is how its restore
  reaches ~130 GiB on one H200 (bench/gpu.py measures both layouts).
- ResBlocks. Here GroupNorm-SiLU-conv twice with biases, the time embedding as a scale-shift of the
  second GroupNorm (adaptive GroupNorm). DA-CLIP: no normalisation, bias-free convs, the
  scale-shift right after the first conv. Why: normalisation makes training less sensitive to the
  learning rate and to bf16 autocast (the demo trains at lr 3e-3); a design choice, bought with
  some speed (GroupNorm is a memory-bound pass), not measured against DA-CLIP's training here.
- Transformer details. Here ``attn_heads`` (4) heads per block, a GELU feed-forward (4x), the
  context LayerNorm'd; DA-CLIP: heads of 32 channels (width / 32 heads), a GEGLU feed-forward
  (an extra 4x-wide gate projection), the raw context. Why: fewer parameters and FLOPs per block.
- Conditioning. Here the semantic vector is a cross-attention context only; DA-CLIP also feeds its
  degradation embedding through an MLP and a softmax-weighted learned prompt into the time
  embedding (0.26 M parameters at nf 64).
- Resampling and padding. Here a 3x3 stride-2 conv down (DA-CLIP: 4x4), replicate padding to a
  multiple of 2**(levels - 1) = 8 (DA-CLIP: reflect to 2**levels = 16, which fails on images
  smaller than the pad). Why: fewer FLOPs, no wasted padded rows, any image size works.
- Time sinusoid: the usual frequencies 10000^(-k/half) (DA-CLIP spaces them by log(10000)/(half-1)).
- Initialisation: the final conv is zero-initialised, so the untrained model predicts eps = 0
  (DA-CLIP: PyTorch's default initialisation).

At nf 64, ch_mult [1, 2, 4, 8], context_dim 512 this layout has 47.41 M parameters, DA-CLIP's
48.98 M (tests/test_unet_daclip.py pins both). :func:`build_unet` builds either from a UNetConfig.

The semantic context is a CLIP-space vector [B, D] (one token) or a token sequence [B, L, D]. With a
single token every query attends to it with weight 1, so cross-attention adds W_o W_v c at every
position: a learned, semantics-dependent feature bias. That is still conditioning, just not spatial.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from srdiff_core.config import UNetConfig

Conditioning = Literal["semantic", "null"]


def group_norm(channels: int, max_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= ``max_groups`` that divides ``channels`` (32 for
    nf=64 at the default, as DDPM; 1 normalises all channels together, GroupNorm(1, C))."""
    groups = next(g for g in range(min(max_groups, channels), 0, -1) if channels % g == 0)
    return nn.GroupNorm(groups, channels, eps=1e-6)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (float) timesteps [B] -> [B, dim] (Vaswani et al. 2017, as in DDPM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the time embedding entering as a scale and shift of the second
    norm (Dhariwal & Nichol 2021, "adaptive group normalisation"), plus a (1x1) skip."""

    def __init__(self, dim_in: int, dim_out: int, time_dim: int, norm_groups: int = 32):
        super().__init__()
        self.norm1 = group_norm(dim_in, norm_groups)
        self.conv1 = nn.Conv2d(dim_in, dim_out, 3, padding=1)
        self.time_proj = nn.Linear(time_dim, 2 * dim_out)
        self.norm2 = group_norm(dim_out, norm_groups)
        self.conv2 = nn.Conv2d(dim_out, dim_out, 3, padding=1)
        self.skip = nn.Conv2d(dim_in, dim_out, 1) if dim_in != dim_out else nn.Identity()

    def forward(self, x: Tensor, time_emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.time_proj(F.silu(time_emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return h + self.skip(x)


class Attention(nn.Module):
    """Multi-head attention of image tokens [B, N, C] over ``context`` tokens [B, L, context_dim]
    (itself when no context_dim is given), through F.scaled_dot_product_attention."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by attn_heads={heads}; "
                             f"pick attn_heads dividing nf * ch_mult")
        self.heads = heads
        kv_dim = dim if context_dim is None else context_dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(kv_dim, dim, bias=False)
        self.to_v = nn.Linear(kv_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        b, n, c = q.shape
        q, k, v = (z.reshape(b, -1, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, c))


class SpatialTransformer(nn.Module):
    """Pre-norm transformer block on the feature map: self-attention, cross-attention to the
    context, GELU feed-forward, each residual. Its output projection is zero-initialised so the block
    starts as the identity and the pretrained-free UNet trains like a plain ResNet-UNet at first."""

    def __init__(self, dim: int, heads: int, context_dim: int, norm_groups: int = 32):
        super().__init__()
        self.norm_in = group_norm(dim, norm_groups)
        self.proj_in = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, heads, context_dim=context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.proj_out = nn.Linear(dim, dim)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.proj_in(self.norm_in(x).flatten(2).transpose(1, 2))  # [B, HW, C]
        tokens = tokens + self.self_attn(self.norm1(tokens))
        tokens = tokens + self.cross_attn(self.norm2(tokens), context)
        tokens = tokens + self.ff(self.norm3(tokens))
        out = self.proj_out(tokens).transpose(1, 2).reshape(b, c, h, w)
        return x + out


class Downsample(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.conv = nn.Conv2d(dim_in, dim_out, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv (avoids the checkerboard of transposed convs)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.conv = nn.Conv2d(dim_in, dim_out, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution of the encoder or decoder: ResBlocks, an optional transformer, a resampler."""

    def __init__(self, blocks: Sequence[ResBlock], transformer: SpatialTransformer | None, resample: nn.Module):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.transformer = transformer
        self.resample = resample


class ConditionalUNet(nn.Module):
    """Noise predictor eps(x_t, mu, t, context) of the IR-SDE (our layout, semantic cross-attention).

    ``conditioning="null"`` replaces any context with one learned token (the no-semantics ablation);
    ``"semantic"`` requires a context. Any image size works: the input is padded (replicate) to a
    multiple of 2**(len(ch_mult)-1) and the output cropped back.
    """

    def __init__(self, *, in_channels: int = 3, out_channels: int = 3, nf: int = 64,
                 ch_mult: Sequence[int] = (1, 2, 4, 8), num_res_blocks: int = 2, context_dim: int = 512,
                 attn_heads: int = 4, conditioning: Conditioning = "semantic", norm_groups: int = 32):
        super().__init__()
        if conditioning not in ("semantic", "null"):
            raise ValueError(f"conditioning must be 'semantic' or 'null', got '{conditioning}'")
        if norm_groups < 1:
            raise ValueError(f"norm_groups must be >= 1, got {norm_groups}")
        if len(ch_mult) < 1 or num_res_blocks < 1:
            raise ValueError("ConditionalUNet needs at least one level (ch_mult) and one ResBlock per level")
        self.conditioning = conditioning
        self.context_dim = context_dim
        self.size_multiple = 2 ** (len(ch_mult) - 1)
        time_dim = 4 * nf
        # Level i maps nf*mult[i] -> nf*mult[i+1] channels, as DA-CLIP does with ch_mult = [1] + ch_mult.
        widths = [nf * m for m in (1, *ch_mult)]
        depth = len(ch_mult)
        # Cross-attention where the feature map is small: the two lowest-resolution levels.
        attn_levels = set(range(max(depth - 2, 0), depth))

        self.nf = nf
        self.init_conv = nn.Conv2d(2 * in_channels, nf, 7, padding=3)
        self.time_mlp = nn.Sequential(nn.Linear(nf, time_dim), nn.GELU(), nn.Linear(time_dim, time_dim))
        # Only the parameters a mode uses exist in it: DDP rejects parameters that never get a gradient.
        # Semantic: normalising the context makes the model indifferent to the raw scale of CLIP embeddings.
        self.context_norm = nn.LayerNorm(context_dim) if conditioning == "semantic" else None
        # Null: one learned token, unit-scale like a LayerNorm'd context token.
        self.null_context = nn.Parameter(torch.randn(1, 1, context_dim)) if conditioning == "null" else None

        def transformer(dim: int) -> SpatialTransformer:
            return SpatialTransformer(dim, attn_heads, context_dim, norm_groups)

        def res_block(dim_in: int, dim_out: int) -> ResBlock:
            return ResBlock(dim_in, dim_out, time_dim, norm_groups)

        self.downs = nn.ModuleList()
        self.ups = nn.ModuleList()
        for i in range(depth):
            dim_in, dim_out = widths[i], widths[i + 1]
            last = i == depth - 1
            self.downs.append(Level(
                [res_block(dim_in, dim_in) for _ in range(num_res_blocks)],
                transformer(dim_in) if i in attn_levels else None,
                nn.Conv2d(dim_in, dim_out, 3, padding=1) if last else Downsample(dim_in, dim_out)))
            # The decoder level i mirrors encoder level i: each block eats one skip of width dim_in.
            self.ups.insert(0, Level(
                [res_block(dim_out + dim_in, dim_out) for _ in range(num_res_blocks)],
                transformer(dim_out) if i in attn_levels else None,
                nn.Conv2d(dim_out, dim_in, 3, padding=1) if i == 0 else Upsample(dim_out, dim_in)))

        mid = widths[-1]
        self.mid_block1 = res_block(mid, mid)
        self.mid_transformer = transformer(mid)
        self.mid_block2 = res_block(mid, mid)
        self.final_block = res_block(2 * nf, nf)
        self.final_conv = nn.Conv2d(nf, out_channels, 3, padding=1)
        # Zero-init the output (Dhariwal & Nichol 2021): the untrained model predicts eps = 0, i.e. the
        # reverse step is the pure mean-reverting drift, instead of random noise of arbitrary scale that
        # the first updates would have to undo. Gradients still reach it since its input is non-zero.
        nn.init.zeros_(self.final_conv.weight)
        nn.init.zeros_(self.final_conv.bias)
        # Per-step factors for the residual input (unet.input_scaling_std); derived from the SDE, so
        # not saved with the weights (build_unet sets them again from the model file's sde settings).
        self.register_buffer("input_scales", None, persistent=False)
        # unet.prediction x0: per-step e^{-thetabar_t} and sqrt(v_t) that turn the output into noise;
        # also derived from the SDE and not saved.
        self.register_buffer("x0_coefficients", None, persistent=False)

    def set_input_scales(self, scales: Tensor) -> None:
        """Multiply the residual input x_t - mu by ``scales[t]`` (one float per step 0..T)."""
        self.input_scales = scales.to(torch.float32)

    def set_x0_prediction(self, coefficients: Tensor) -> None:
        """Read the output F as x0 - mu = skip[t] (x_t - mu) + out[t] F and return the noise that
        implies (unet.prediction x0); ``coefficients``: IRSDE.x0_coefficients' (decay, std, skip, out)."""
        self.x0_coefficients = coefficients.to(torch.float32)

    @classmethod
    def from_config(cls, cfg: "UNetConfig") -> "ConditionalUNet":
        return cls(nf=cfg.nf, ch_mult=tuple(cfg.ch_mult), num_res_blocks=cfg.num_res_blocks,
                   context_dim=cfg.context_dim, attn_heads=cfg.attn_heads, conditioning=cfg.conditioning,
                   norm_groups=cfg.norm_groups)

    def context_tokens(self, context: Tensor | None, batch: int) -> Tensor:
        """[B, L, context_dim] tokens the cross-attention reads (the learned null token in null mode)."""
        if self.null_context is not None:
            return self.null_context.expand(batch, -1, -1)
        if context is None:
            raise ValueError("ConditionalUNet(conditioning='semantic') needs a context [B, D] or [B, L, D]; "
                             "pass the RestoreCLS embedding, or build the model with conditioning='null'")
        if context.ndim == 2:
            context = context[:, None, :]
        if context.ndim != 3 or context.shape[-1] != self.context_dim or context.shape[0] != batch:
            raise ValueError(f"context must be [B={batch}, D={self.context_dim}] or [B, L, D], got "
                             f"{tuple(context.shape)}; check unet.context_dim against the embedding width")
        return self.context_norm(context)

    def forward(self, xt: Tensor, mu: Tensor, t: Tensor | int, context: Tensor | None) -> Tensor:
        """Predicted noise for x_t, same shape and dtype as ``xt``."""
        if xt.shape != mu.shape or xt.ndim != 4:
            raise ValueError(f"xt {tuple(xt.shape)} and mu {tuple(mu.shape)} must be equal NCHW shapes")
        batch, _, height, width = xt.shape
        t = torch.as_tensor(t, device=xt.device).reshape(-1).expand(batch)
        context = self.context_tokens(context, batch)

        residual = xt - mu
        if self.input_scales is not None:
            residual = residual * self.input_scales.to(xt.device)[t.long()].to(xt.dtype)[:, None, None, None]
        x = torch.cat([residual, mu], dim=1)
        x = self._pad(x)
        x = self.init_conv(x)
        first = x
        # The sinusoids are computed in float32 and handed over in the weights' dtype (bf16 models).
        time_emb = self.time_mlp(timestep_embedding(t, self.nf).to(self.init_conv.weight.dtype))

        skips = []
        for level in self.downs:
            for block in level.blocks:
                x = block(x, time_emb)
                if level.transformer is not None and block is level.blocks[-1]:
                    x = level.transformer(x, context)
                skips.append(x)
            x = level.resample(x)

        x = self.mid_block1(x, time_emb)
        x = self.mid_transformer(x, context)
        x = self.mid_block2(x, time_emb)

        for level in self.ups:
            for block in level.blocks:
                x = block(torch.cat([x, skips.pop()], dim=1), time_emb)
            if level.transformer is not None:
                x = level.transformer(x, context)
            x = level.resample(x)

        x = self.final_block(torch.cat([x, first], dim=1), time_emb)
        x = self.final_conv(x)[:, :, :height, :width]
        if self.x0_coefficients is not None:
            x = noise_from_x0_output(x, xt, mu, t, self.x0_coefficients)
        return x.to(xt.dtype)

    def _pad(self, x: Tensor) -> Tensor:
        """Replicate-pad the bottom/right to a multiple of the total downsampling (always valid,
        unlike reflect padding, even when the image is smaller than the pad)."""
        m = self.size_multiple
        pad_h, pad_w = (-x.shape[-2]) % m, (-x.shape[-1]) % m
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        return x


def noise_from_x0_output(output: Tensor, xt: Tensor, mu: Tensor, t: Tensor, coefficients: Tensor) -> Tensor:
    """The noise an x0-predicting network's ``output`` F implies (unet.prediction x0):
    x0 - mu = skip (x_t - mu) + out F, eps = (x_t - mu - decay (x0 - mu)) / std, with the rows
    (decay, std, skip, out) of IRSDE.x0_coefficients at each sample's step ``t`` (float32)."""
    decay, std, skip, out = coefficients.to(xt.device)[:, t.long()][:, :, None, None, None]
    x0_residual = skip * (xt - mu) + out * output.float()
    return (xt - mu - decay * x0_residual) / std


def build_unet(cfg: "UNetConfig", sde: "IRSDE | None" = None) -> nn.Module:
    """The UNet ``cfg`` describes, in its ``layout``: every place that builds one from settings
    (the train stage, model.pt loading, benchmarks) goes through here. ``sde``: the schedule the
    network runs under, needed when ``cfg.input_scaling_std`` > 0 or ``cfg.prediction`` is x0."""
    if cfg.layout == "daclip":
        if cfg.input_scaling_std:
            raise ValueError("unet.input_scaling_std is for unet.layout: srdiff; set it to 0 for the daclip layout")
        from srdiff_core.unet_daclip import DAClipUNet  # imports this module: a late import

        unet = DAClipUNet.from_config(cfg)
        if cfg.prediction == "x0":
            if sde is None:
                raise ValueError("unet.prediction x0 needs the SDE: pass build_unet(cfg, sde)")
            unet.set_x0_prediction(sde.x0_coefficients(cfg.input_scaling_std))
        return unet
    if cfg.layout == "srdiff":
        unet = ConditionalUNet.from_config(cfg)
        if cfg.input_scaling_std:
            if sde is None:
                raise ValueError("unet.input_scaling_std > 0 needs the SDE: pass build_unet(cfg, sde)")
            unet.set_input_scales(sde.input_scales(cfg.input_scaling_std))
        if cfg.prediction == "x0":
            if sde is None:
                raise ValueError("unet.prediction x0 needs the SDE: pass build_unet(cfg, sde)")
            unet.set_x0_prediction(sde.x0_coefficients(cfg.input_scaling_std))
        return unet
    raise ValueError(f"unknown unet.layout {cfg.layout!r}: use 'srdiff' or 'daclip'")
