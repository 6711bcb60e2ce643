"""DA-CLIP's ConditionalUNet as released (``unet.layout: daclip``), for parity runs against DA-CLIP.

Re-implemented from the released daclip-uir code (universal-image-restoration/config/daclip-sde/
models/modules/DenoisingUNet_arch.py, module_util.py and attention.py, with the network settings of
options/train.yml: nf 64, ch_mult [1, 2, 4, 8], context_dim 512, use_degra_context and
use_image_context true). At those settings it has DA-CLIP's 48.98 M parameters. What it reproduces:

- Input concat(x_t - mu, mu), reflect-padded at the bottom/right to a multiple of 2**len(ch_mult)
  (16 for four levels, one factor of 2 more than the downsampling needs), output cropped back.
- A 7x7 bias-free input conv; the time embedding is their sinusoid (frequencies
  exp(-log(10000) * k / (half - 1)), sin then cos) of width nf, then Linear-GELU-Linear to 4 nf.
- Norm-free ResBlocks: bias-free 3x3 conv, time scale-shift, SiLU, bias-free 3x3 conv, SiLU, plus
  a bias-free 1x1 skip when the width changes (no GroupNorm anywhere in the ResBlocks).
- Per level: ResBlocks (two in the release), each output kept as a skip, an attention block after
  the last one (before its skip is kept); a 4x4 stride-2 conv down (a bias-free 3x3 conv at the
  last level). Decoder levels mirror it with nearest x2 + 3x3 conv up (bias-free 3x3 conv at the
  top). Every attention block is x + block(channel-LayerNorm(x)) (their Residual(PreNorm(...))).
- Attention types: LinearAttention (4 heads of 32, softmax-normalised q and k, a LayerNorm'd 1x1
  output) at levels 0-2; SpatialTransformer (GroupNorm(32), 1x1 in, one transformer block of
  self-attention, cross-attention to the context and a GEGLU feed-forward of 4x width, zero-init
  1x1 out; heads of dim 32) at level 3 and in the middle. The transformer block is recomputed in
  the backward pass (their gradient checkpointing), and its attention is computed explicitly
  (scores materialised, as their einsum code does), so speed and memory match the release.
- The degradation prompt (use_degra_context): softmax(MLP(c)) * a learned prompt, through a
  linear layer, added to the time embedding. PyTorch's default initialisation elsewhere (the
  release zero-initialises only the SpatialTransformer's output conv).

How our single semantic vector maps onto DA-CLIP's two contexts: DA-CLIP cross-attends to its
content embedding (image_context) and feeds its degradation embedding (text_context) to the
prompt. Here the one RestoreCLS vector plays both parts, unnormalised as DA-CLIP feeds its
features (a [B, L, D] context: cross-attention reads the L tokens, the prompt their mean).
``conditioning="null"`` replaces it with one learned token on both paths.

Not in the release, for our pipeline: ``num_res_blocks`` other than 2 and widths below 32 (heads
= max(1, width // 32), GroupNorm with the largest group count <= 32 dividing the width) so tiny
test configs build, and replicate padding where reflect padding is impossible (an image side
smaller than its pad; the release fails there).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from srdiff_core.unet import Conditioning, group_norm, noise_from_x0_output

if TYPE_CHECKING:
    from srdiff_core.config import UNetConfig

HEAD_DIM = 32  # DA-CLIP's num_head_channels: every attention head is 32 wide
# Levels below this index carry LinearAttention, the rest a SpatialTransformer (DA-CLIP: ``i < 3``).
LINEAR_ATTENTION_LEVELS = 3


def daclip_sinusoid(t: Tensor, dim: int) -> Tensor:
    """DA-CLIP's SinusoidalPosEmb in float32: [B] -> [B, 2 * (dim // 2)], the frequencies spaced
    by log(10000) / (half - 1) (so the last one is exactly 1/10000), sin half then cos half."""
    half = dim // 2
    step = math.log(10000.0) / (half - 1)
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * -step)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=-1)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of an NCHW map with a gain and no bias (DA-CLIP's LayerNorm);
    eps 1e-3 in half precision (bf16/fp16, as under autocast), else 1e-5. (The release tests for
    float32, so it would also use 1e-3 in float64; here float64 agrees with float32.)"""

    def __init__(self, dim: int):
        super().__init__()
        self.g = nn.Parameter(torch.ones(1, dim, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        eps = 1e-3 if x.dtype in (torch.float16, torch.bfloat16) else 1e-5
        var, mean = torch.var_mean(x, dim=1, unbiased=False, keepdim=True)
        return (x - mean) * (var + eps).rsqrt() * self.g


def _conv(dim_in: int, dim_out: int, kernel: int) -> nn.Conv2d:
    """DA-CLIP's default_conv: 'same' padding, no bias."""
    return nn.Conv2d(dim_in, dim_out, kernel, padding=kernel // 2, bias=False)


class ResBlock(nn.Module):
    """Norm-free, bias-free ResBlock: SiLU(conv(x) * (1 + scale) + shift), SiLU(conv(.)), + skip."""

    def __init__(self, dim_in: int, dim_out: int, time_dim: int):
        super().__init__()
        self.time_proj = nn.Linear(time_dim, 2 * dim_out)
        self.conv1 = _conv(dim_in, dim_out, 3)
        self.conv2 = _conv(dim_out, dim_out, 3)
        self.skip = _conv(dim_in, dim_out, 1) if dim_in != dim_out else nn.Identity()

    def forward(self, x: Tensor, time_emb: Tensor) -> Tensor:
        scale, shift = self.time_proj(F.silu(time_emb))[:, :, None, None].chunk(2, dim=1)
        h = F.silu(self.conv1(x) * (1 + scale) + shift)
        h = F.silu(self.conv2(h))
        return h + self.skip(x)


class LinearAttention(nn.Module):
    """Efficient ("linear") attention over the pixels: per head, q softmax-normalised over its
    channels, k over the pixels; out = (k v^T)^T q / (H W); a 1x1 conv and a channel LayerNorm."""

    def __init__(self, dim: int, heads: int = 4, dim_head: int = HEAD_DIM):
        super().__init__()
        self.heads, self.scale = heads, dim_head ** -0.5
        hidden = heads * dim_head
        self.to_qkv = nn.Conv2d(dim, 3 * hidden, 1, bias=False)
        self.to_out = nn.Sequential(nn.Conv2d(hidden, dim, 1), ChannelLayerNorm(dim))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        b, _, h, w = x.shape
        q, k, v = (z.reshape(b, self.heads, -1, h * w) for z in self.to_qkv(x).chunk(3, dim=1))
        q = q.softmax(dim=-2) * self.scale
        k = k.softmax(dim=-1)
        v = v / (h * w)
        summary = torch.einsum("bhdn,bhen->bhde", k, v)
        out = torch.einsum("bhde,bhdn->bhen", summary, q)
        return self.to_out(out.reshape(b, -1, h, w))


class Attention(nn.Module):
    """Multi-head attention of tokens [B, N, C] over ``context`` [B, L, context_dim] (itself if
    None), bias-free q/k/v, biased output; softmax(q k^T / sqrt(d)) v computed explicitly."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None = None):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.scale = heads, dim_head ** -0.5
        kv_dim = dim if context_dim is None else context_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(kv_dim, inner, bias=False)
        self.to_v = nn.Linear(kv_dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        b, n, _ = x.shape
        q, k, v = (z.reshape(b, z.shape[1], self.heads, -1).transpose(1, 2)
                   for z in (self.to_q(x), self.to_k(context), self.to_v(context)))
        weights = (torch.matmul(q, k.transpose(-1, -2)) * self.scale).softmax(dim=-1)
        out = torch.matmul(weights, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class GEGLU(nn.Module):
    """a * GELU(g) with [a, g] = Linear(x): the gated feed-forward input of Shazeer (2020)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: Tensor) -> Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention and GEGLU feed-forward, each residual;
    recomputed in the backward pass while training (activation checkpointing, as released)."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads, dim_head)
        self.cross_attn = Attention(dim, heads, dim_head, context_dim=context_dim)
        self.ff = nn.Sequential(GEGLU(dim, 4 * dim), nn.Linear(4 * dim, dim))

    def _forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.self_attn(self.norm1(x))
        x = x + self.cross_attn(self.norm2(x), context)
        return x + self.ff(self.norm3(x))

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        if self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, context, use_reentrant=False)
        return self._forward(x, context)


class SpatialTransformer(nn.Module):
    """GroupNorm, 1x1 conv to heads * 32 channels, one TransformerBlock on the pixels as tokens,
    zero-initialised 1x1 conv back, plus the input."""

    def __init__(self, dim: int, context_dim: int):
        super().__init__()
        heads = max(1, dim // HEAD_DIM)
        inner = heads * HEAD_DIM
        self.norm = group_norm(dim)
        self.proj_in = nn.Conv2d(dim, inner, 1)
        self.block = TransformerBlock(inner, heads, HEAD_DIM, context_dim)
        self.proj_out = nn.Conv2d(inner, dim, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        b, _, h, w = x.shape
        tokens = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)
        tokens = self.block(tokens, context)
        return self.proj_out(tokens.transpose(1, 2).reshape(b, -1, h, w)) + x


class PreNormResidual(nn.Module):
    """x + fn(channel-LayerNorm(x), context): DA-CLIP's Residual(PreNorm(dim, fn))."""

    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm = ChannelLayerNorm(dim)
        self.fn = fn

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        return self.fn(self.norm(x), context) + x


class Upsample(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.conv = nn.Conv2d(dim_in, dim_out, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    def __init__(self, blocks: Sequence[ResBlock], attn: PreNormResidual, resample: nn.Module):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attn = attn
        self.resample = resample


class DAClipUNet(nn.Module):
    """Noise predictor eps(x_t, mu, t, context) laid out as DA-CLIP's released ConditionalUNet
    (see the module docstring). Same interface as :class:`srdiff_core.unet.ConditionalUNet`."""

    def __init__(self, *, in_channels: int = 3, out_channels: int = 3, nf: int = 64,
                 ch_mult: Sequence[int] = (1, 2, 4, 8), num_res_blocks: int = 2, context_dim: int = 512,
                 conditioning: Conditioning = "semantic"):
        super().__init__()
        if conditioning not in ("semantic", "null"):
            raise ValueError(f"conditioning must be 'semantic' or 'null', got '{conditioning}'")
        if len(ch_mult) < 1 or num_res_blocks < 1:
            raise ValueError("DAClipUNet needs at least one level (ch_mult) and one ResBlock per level")
        if nf < 4:
            raise ValueError(f"unet.nf must be at least 4 for the daclip layout (its sinusoid has nf // 2 - 1 "
                             f"frequency steps), got {nf}")
        self.conditioning = conditioning
        self.context_dim = context_dim
        self.nf = nf
        # DA-CLIP pads to 2**depth, one factor of 2 more than the depth - 1 downsamplings need.
        self.size_multiple = 2 ** len(ch_mult)
        time_dim = 4 * nf
        widths = [nf * m for m in (1, *ch_mult)]
        depth = len(ch_mult)

        self.init_conv = _conv(2 * in_channels, nf, 7)
        self.time_mlp = nn.Sequential(nn.Linear(nf, time_dim), nn.GELU(), nn.Linear(time_dim, time_dim))
        # The degradation prompt (DA-CLIP's use_degra_context): softmax(MLP(c)) weighs a learned prompt.
        self.prompt = nn.Parameter(torch.rand(1, time_dim))
        self.prompt_context_mlp = nn.Sequential(nn.Linear(context_dim, time_dim), nn.SiLU(),
                                                nn.Linear(time_dim, time_dim))
        self.prompt_mlp = nn.Linear(time_dim, time_dim)
        self.null_context = nn.Parameter(torch.randn(1, 1, context_dim)) if conditioning == "null" else None

        def attention(level: int, dim: int) -> PreNormResidual:
            inner = LinearAttention(dim) if level < LINEAR_ATTENTION_LEVELS else SpatialTransformer(dim, context_dim)
            return PreNormResidual(dim, inner)

        self.downs = nn.ModuleList()
        self.ups = nn.ModuleList()
        for i in range(depth):
            dim_in, dim_out = widths[i], widths[i + 1]
            last = i == depth - 1
            self.downs.append(Level(
                [ResBlock(dim_in, dim_in, time_dim) for _ in range(num_res_blocks)],
                attention(i, dim_in),
                _conv(dim_in, dim_out, 3) if last else nn.Conv2d(dim_in, dim_out, 4, stride=2, padding=1)))
            self.ups.insert(0, Level(
                [ResBlock(dim_out + dim_in, dim_out, time_dim) for _ in range(num_res_blocks)],
                attention(i, dim_out),
                _conv(dim_out, dim_in, 3) if i == 0 else Upsample(dim_out, dim_in)))

        mid = widths[-1]
        self.mid_block1 = ResBlock(mid, mid, time_dim)
        self.mid_attn = PreNormResidual(mid, SpatialTransformer(mid, context_dim))
        self.mid_block2 = ResBlock(mid, mid, time_dim)
        self.final_block = ResBlock(2 * nf, nf, time_dim)
        self.final_conv = nn.Conv2d(nf, out_channels, 3, padding=1)
        # unet.prediction x0 (not DA-CLIP's): derived from the SDE, not saved (build_unet sets it).
        self.register_buffer("x0_coefficients", None, persistent=False)

    def set_x0_prediction(self, coefficients: Tensor) -> None:
        """Read the output as the clean residual (see unet.noise_from_x0_output)."""
        self.x0_coefficients = coefficients.to(torch.float32)

    @classmethod
    def from_config(cls, cfg: "UNetConfig") -> "DAClipUNet":
        """``unet.attn_heads`` does not apply: DA-CLIP's heads are 32 channels wide at every level."""
        return cls(nf=cfg.nf, ch_mult=tuple(cfg.ch_mult), num_res_blocks=cfg.num_res_blocks,
                   context_dim=cfg.context_dim, conditioning=cfg.conditioning)

    def context_tokens(self, context: Tensor | None, batch: int) -> Tensor:
        """[B, L, context_dim] tokens (the learned null token in null mode), not normalised."""
        if self.null_context is not None:
            return self.null_context.expand(batch, -1, -1)
        if context is None:
            raise ValueError("DAClipUNet(conditioning='semantic') needs a context [B, D] or [B, L, D]; "
                             "pass the RestoreCLS embedding, or build the model with conditioning='null'")
        if context.ndim == 2:
            context = context[:, None, :]
        if context.ndim != 3 or context.shape[-1] != self.context_dim or context.shape[0] != batch:
            raise ValueError(f"context must be [B={batch}, D={self.context_dim}] or [B, L, D], got "
                             f"{tuple(context.shape)}; check unet.context_dim against the embedding width")
        return context

    def forward(self, xt: Tensor, mu: Tensor, t: Tensor | int, context: Tensor | None) -> Tensor:
        """Predicted noise for x_t, same shape and dtype as ``xt``."""
        if xt.shape != mu.shape or xt.ndim != 4:
            raise ValueError(f"xt {tuple(xt.shape)} and mu {tuple(mu.shape)} must be equal NCHW shapes")
        batch, _, height, width = xt.shape
        t = torch.as_tensor(t, device=xt.device).reshape(-1).expand(batch)
        dtype = self.init_conv.weight.dtype
        context = self.context_tokens(context, batch).to(dtype)

        x = self._pad(torch.cat([xt - mu, mu], dim=1))
        x = self.init_conv(x)
        first = x
        time_emb = self.time_mlp(daclip_sinusoid(t, self.nf).to(dtype))
        prompt = torch.softmax(self.prompt_context_mlp(context.mean(dim=1)), dim=1) * self.prompt
        time_emb = time_emb + self.prompt_mlp(prompt)

        skips = []
        for level in self.downs:
            for block in level.blocks:
                x = block(x, time_emb)
                if block is level.blocks[-1]:
                    x = level.attn(x, context)
                skips.append(x)
            x = level.resample(x)

        x = self.mid_block1(x, time_emb)
        x = self.mid_attn(x, context)
        x = self.mid_block2(x, time_emb)

        for level in self.ups:
            for block in level.blocks:
                x = block(torch.cat([x, skips.pop()], dim=1), time_emb)
            x = level.attn(x, context)
            x = level.resample(x)

        x = self.final_block(torch.cat([x, first], dim=1), time_emb)
        x = self.final_conv(x)[:, :, :height, :width]
        if self.x0_coefficients is not None:
            x = noise_from_x0_output(x, xt, mu, t, self.x0_coefficients)
        return x.to(xt.dtype)

    def _pad(self, x: Tensor) -> Tensor:
        """Reflect-pad the bottom/right to a multiple of ``size_multiple`` (replicate where a side is
        too short to reflect)."""
        m = self.size_multiple
        pad_h, pad_w = (-x.shape[-2]) % m, (-x.shape[-1]) % m
        if not (pad_h or pad_w):
            return x
        mode = "reflect" if pad_h < x.shape[-2] and pad_w < x.shape[-1] else "replicate"
        return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
