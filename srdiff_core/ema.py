"""Exponential moving average of model weights (Polyak averaging).

The EMA copy is what we sample and evaluate with: diffusion models trained with AdamW at a
constant-ish learning rate produce visibly noisier samples from the raw weights than from
an average over the last ~1/(1-decay) steps (Ho et al. 2020, Sec. 4; IR-SDE uses 0.999,
the SR-Diff defaults use 0.995).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def make_ema(model: nn.Module) -> nn.Module:
    """A frozen deep copy of ``model`` in eval mode, to be updated with :func:`ema_update`."""
    ema = copy.deepcopy(model)
    ema.requires_grad_(False)
    return ema.eval()


def _matching_tensors(ema_named, model_named, kind: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    ema_items, model_items = list(ema_named), list(model_named)
    ema_names = [name for name, _ in ema_items]
    model_names = [name for name, _ in model_items]
    if ema_names != model_names:
        raise ValueError(
            f"EMA and model {kind} differ ({len(ema_names)} vs {len(model_names)} entries; first "
            f"names {ema_names[:3]} vs {model_names[:3]}): pass the unwrapped model (not the DDP "
            f"or torch.compile wrapper) and build the EMA with make_ema(model)")
    return [t for _, t in ema_items], [t for _, t in model_items]


def ema_decay_at(decay: float, step: int) -> float:
    """The EMA decay to use after ``step`` optimiser steps: min(decay, (1 + step) / (10 + step)).

    A warm-up (as in timm's ModelEmaV2 / diffusers' EMAModel) so the average does not keep the
    random initial weights for thousands of steps: with a fixed 0.995, 22% of the EMA is still
    the initial model after 300 steps; with the warm-up it tracks early training closely and
    reaches the configured decay after ~1,800 steps.
    """
    return min(decay, (1.0 + step) / (10.0 + step))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for parameters; buffers are copied verbatim.

    Buffers (e.g. normalisation statistics, step counters) are not averaged: an average of
    integer counters is meaningless and running statistics already are averages.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must lie in [0, 1], got {decay}: set train.ema_decay, e.g. 0.995")
    ema_params, model_params = _matching_tensors(ema.named_parameters(), model.named_parameters(), "parameters")
    if ema_params:
        # lerp(ema, model, 1 - decay) == decay * ema + (1 - decay) * model, one fused kernel per dtype.
        torch._foreach_lerp_(ema_params, model_params, 1.0 - decay)
    ema_buffers, model_buffers = _matching_tensors(ema.named_buffers(), model.named_buffers(), "buffers")
    if ema_buffers:
        torch._foreach_copy_(ema_buffers, model_buffers)
