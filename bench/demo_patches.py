"""Exploratory changes that are not config options, applied in-process around bench/demo_recipe.py:
the rows marked "patched" in bench/results/demo-recipe.md (fifth to seventh sweeps).

    python bench/demo_patches.py --patch exposure=0.3 --patch exposure-skip=low-light -- \\
        --recipes demo --holdout-seeds 1,2 --root bench/out/expo --out bench/out/expo.json

Everything after ``--`` goes to bench/demo_recipe.py, or to the script ``--run`` names (the blur
patch with ``--run bench/blur_linear.py`` gives the linear-filter figures of a patched blur). Patches (each wraps one function for the
length of the run; none is a method change we ship, they test a hypothesis):

  clean=F            replace the LQ of a share F of the training pairs by their GT (clean -> clean),
                     drawn by a coin seeded 1234; the context stays the LQ's
  exposure=LO        multiply both images of a training pair by g ~ U[LO, 1] (the loader's own RNG),
                     a darker exposure of the same scene
  exposure-skip=D,.. degradations exposure leaves alone (e.g. low-light, whose pairs are the darkening)
  oracle             the true degradation, one-hot, as the only context (train and evaluate): a
                     diagnosis, the method's context is the SRM-refined embedding
  self-ensemble      evaluate each image in its 8 flips / 90-degree turns and average (EDSR's "+")
  context-time       the context also enters the time embedding (a scale and shift of every ResBlock)
                     through a zero-initialised MLP, as DA-CLIP feeds its degradation embedding
                     (unet.layout srdiff only: the daclip layout has that path already); with
                     oracle, the one-hot takes that path too
  lqcls-time         with context-time: LQCLS (the raw LQ embedding, which carries the degradation)
                     takes the time path, RestoreCLS stays the cross-attention context
  blur=JSON          keyword arguments for srdiff_core.degradations.add_motion_blur, e.g.
                     '{"angle_range": [-15, 15]}': the demo set is generated with them

A train or evaluate stage that already ran for the same config is reused by the pipeline, patch or
not: give each patched run its own ``--root``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import runpy
import sys
from pathlib import Path
from typing import Callable, Iterator
from unittest import mock

import numpy as np
import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from srdiff_core import data, degradations  # noqa: E402
from srdiff_core.config import DEGRADATIONS  # noqa: E402
from srdiff_core.restorer import Restorer  # noqa: E402
from srdiff_core.unet import ConditionalUNet  # noqa: E402

PATCHES = ("clean", "exposure", "exposure-skip", "oracle", "self-ensemble", "context-time", "lqcls-time", "blur")


def with_clean_pairs(prepare: Callable, share: float, seed: int = 1234) -> Callable:
    """``PairDataset.prepare`` that makes a share of the training samples clean -> clean."""
    coin = np.random.default_rng(seed)

    def patched(self, raw, rng):
        out = prepare(self, raw, rng)
        if self.augment and coin.random() < share:  # training pairs only
            out["lq"] = out["gt"].clone()
        return out

    return patched


def with_exposure(prepare: Callable, low: float, skip: frozenset[str] = frozenset()) -> Callable:
    """``PairDataset.prepare`` that darkens both images of a training pair by one random gain."""
    if not 0.0 < low <= 1.0:
        raise SystemExit(f"exposure={low}: the lowest gain must lie in (0, 1]")

    def patched(self, raw, rng):
        out = prepare(self, raw, rng)
        if self.augment and out["degradation"] not in skip:
            gain = float(rng.uniform(low, 1.0))
            out["lq"], out["gt"] = out["lq"] * gain, out["gt"] * gain
        return out

    return patched


def with_oracle_context(context: Callable) -> Callable:
    """``PairDataset.context`` that answers the sample's degradation, one-hot (ids start with it)."""

    def patched(self, sample_id):
        vector = torch.zeros_like(context(self, sample_id))
        names = [i for i, name in enumerate(DEGRADATIONS) if sample_id.startswith(f"{name}-")]
        if len(names) != 1:
            raise ValueError(f"sample id {sample_id!r} does not start with one degradation name")
        vector[names[0]] = 1.0
        return vector

    return patched


def with_self_ensemble(restore: Callable) -> Callable:
    """``Restorer.restore`` averaged over the 8 symmetries of the square (flip, then turn back)."""

    def patched(self, lq, context, **kwargs):
        outs = []
        for turns in range(4):
            for flip in (False, True):
                x = torch.rot90(lq, turns, (-2, -1))
                x = x.flip(-1) if flip else x
                y = restore(self, x, context, **kwargs)
                y = y.flip(-1) if flip else y
                outs.append(torch.rot90(y, -turns, (-2, -1)))
        return torch.stack(outs).mean(0)

    return patched


class TimeWithContext(nn.Module):
    """The UNet's time MLP plus an MLP of a context vector (``context``, set before each forward).
    DA-CLIP weighs a learned prompt by softmax(MLP(context)); a plain MLP is the simplest form of the
    same path. Its last layer starts at zero, so the patched UNet starts as the unpatched one."""

    def __init__(self, time_mlp: nn.Module, context_dim: int, time_dim: int):
        super().__init__()
        self.time_mlp = time_mlp
        self.context_mlp = nn.Sequential(nn.Linear(context_dim, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        nn.init.zeros_(self.context_mlp[-1].weight)
        nn.init.zeros_(self.context_mlp[-1].bias)
        self.context: torch.Tensor | None = None

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.time_mlp(emb) + self.context_mlp(self.context)


def with_context_time(init: Callable) -> Callable:
    """``ConditionalUNet.__init__`` that wraps the time MLP in a :class:`TimeWithContext`."""

    def patched(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.time_mlp = TimeWithContext(self.time_mlp, self.context_dim, self.time_mlp[-1].out_features)

    return patched


def with_time_context(context_tokens: Callable, split: bool) -> Callable:
    """``ConditionalUNet.context_tokens`` that also hands the time path its context: the mean of the
    (LayerNorm'd) tokens, or with ``split`` the second half of a [B, 2D] context (LQCLS), the first
    half (RestoreCLS) staying the cross-attention's."""

    def patched(self, context, batch):
        time_context = None
        if split and context is not None:
            context, time_context = context[..., :self.context_dim], context[..., self.context_dim:]
        tokens = context_tokens(self, context, batch)
        time_tokens = tokens if time_context is None else context_tokens(self, time_context, batch)
        self.time_mlp.context = time_tokens.mean(dim=1)
        return tokens

    return patched


def with_lqcls(read: Callable) -> Callable:
    """``read_embeddings`` that answers each RestoreCLS vector followed by the LQCLS vector of the same
    sample, from the lqcls table the embed stage writes beside it."""

    def patched(url: str):
        if not url.endswith("restorecls.parquet"):
            raise ValueError(f"lqcls-time reads contexts from a restorecls.parquet table, got {url}")
        restore, lq = read(url), read(url[: -len("restorecls.parquet")] + "lqcls.parquet")
        return {i: np.concatenate([vector, lq[i]]) for i, vector in restore.items()}

    return patched


def parse(specs: list[str]) -> dict[str, str]:
    """``name`` or ``name=value`` strings -> {name: value}; unknown names are an error."""
    patches = {}
    for spec in specs:
        name, _, value = spec.partition("=")
        if name not in PATCHES:
            raise SystemExit(f"unknown patch {name!r}; valid patches: {', '.join(PATCHES)}")
        patches[name] = value
    return patches


@contextlib.contextmanager
def applied(patches: dict[str, str]) -> Iterator[None]:
    """The patches in place for the length of the block (clean pairs before exposure), then undone."""
    if "exposure-skip" in patches and "exposure" not in patches:
        raise SystemExit("exposure-skip needs exposure=LO")
    if "lqcls-time" in patches and ("context-time" not in patches or "oracle" in patches):
        raise SystemExit("lqcls-time needs context-time, and replaces the context the oracle would set")
    with contextlib.ExitStack() as stack:
        def wrap(owner, attr: str, wrapper: Callable, *args) -> None:
            stack.enter_context(mock.patch.object(owner, attr, wrapper(getattr(owner, attr), *args)))

        if "clean" in patches:
            wrap(data.PairDataset, "prepare", with_clean_pairs, float(patches["clean"]))
        if "exposure" in patches:
            skip = frozenset(d for d in patches.get("exposure-skip", "").split(",") if d)
            wrap(data.PairDataset, "prepare", with_exposure, float(patches["exposure"]), skip)
        if "oracle" in patches:
            wrap(data.PairDataset, "context", with_oracle_context)
        if "self-ensemble" in patches:
            wrap(Restorer, "restore", with_self_ensemble)
        if "context-time" in patches:
            wrap(ConditionalUNet, "__init__", with_context_time)
            wrap(ConditionalUNet, "context_tokens", with_time_context, "lqcls-time" in patches)
        if "lqcls-time" in patches:
            import tasks.evaluate
            import tasks.train  # late: the pipeline's tasks import Prefect

            for module in (tasks.train, tasks.evaluate):
                wrap(module, "read_embeddings", with_lqcls)
        if "blur" in patches:
            kwargs = {k: tuple(v) for k, v in json.loads(patches["blur"]).items()}
            blur = functools.partial(degradations.add_motion_blur, **kwargs)
            stack.enter_context(mock.patch.dict(degradations.DEGRADATIONS, {"motion-blurry": blur}))
        yield


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patch", action="append", default=[], help="name or name=value (see the module doc)")
    parser.add_argument("--run", default=str(REPO / "bench" / "demo_recipe.py"),
                        help="the script to run patched (default bench/demo_recipe.py; e.g. bench/blur_linear.py)")
    args = parser.parse_args(argv[:split])
    with applied(parse(args.patch)):
        sys.argv = [args.run, *argv[split + 1:]]
        runpy.run_path(args.run, run_name="__main__")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
