"""Semantic Refinement Module (SRM): maps the CLIP embedding of a degraded image toward the
embedding of its clean counterpart, LQ -> GT, so the diffusion model is guided by the
semantics of the image it should produce rather than of the one it was given.

Loss as in SR-Diff: 0.7 * L1 + 0.3 * (1 - cosine). Training is plain supervised regression on
precomputed embedding pairs: AdamW, linear warm-up then cosine decay, early stopping on a
held-out split, best weights kept.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from srdiff_core.config import SRMConfig

L1_WEIGHT = 0.7
COSINE_WEIGHT = 0.3


class ResidualMLPBlock(nn.Module):
    """x + MLP(LayerNorm(x)), pre-norm as in a transformer's feed-forward sub-block."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc_in = nn.Linear(dim, hidden)
        self.fc_out = nn.Linear(hidden, dim)
        # Zero-init the last layer so each block starts as the identity: an untrained SRM
        # returns its input, and training only has to learn the LQ -> GT correction.
        nn.init.zeros_(self.fc_out.weight)
        nn.init.zeros_(self.fc_out.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc_out(F.gelu(self.fc_in(self.norm(x))))


class SemanticRefinementModule(nn.Module):
    """Residual MLP on one embedding vector, output L2-normalised like CLIP's own embeddings.

    The released SR-Diff SRM stacks self-attention blocks over a single token. With one key,
    softmax(q k^T) is exactly 1, so attention returns its value projection: each block is a
    linear map plus a feed-forward MLP. A stack of residual MLP blocks computes the same
    family of functions with fewer parameters and no attention kernels.
    """

    def __init__(self, dim: int, hidden: int = 1024, depth: int = 2):
        super().__init__()
        if dim < 1 or hidden < 1 or depth < 0:
            raise ValueError(f"SemanticRefinementModule needs dim >= 1, hidden >= 1, depth >= 0; "
                             f"got dim={dim}, hidden={hidden}, depth={depth}")
        self.dim = dim
        self.blocks = nn.ModuleList(ResidualMLPBlock(dim, hidden) for _ in range(depth))
        # A full linear map at the end lets a global rotation/scale of the embedding space
        # (the bulk of the LQ -> GT shift) be learned directly; identity-initialised so the
        # untrained module is x -> x / |x|.
        self.proj_out = nn.Linear(dim, dim)
        with torch.no_grad():
            self.proj_out.weight.copy_(torch.eye(dim))
            self.proj_out.bias.zero_()

    @classmethod
    def from_config(cls, dim: int, cfg: SRMConfig) -> "SemanticRefinementModule":
        return cls(dim, hidden=cfg.hidden, depth=cfg.depth)

    def forward(self, x: Tensor) -> Tensor:
        h = x
        for block in self.blocks:
            h = block(h)
        return F.normalize(self.proj_out(h), dim=-1)


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Per-row cosine similarity of two [N, D] tensors -> [N]."""
    return F.cosine_similarity(a, b, dim=-1)


def srm_loss(pred: Tensor, target: Tensor) -> Tensor:
    """SR-Diff's SRM objective: 0.7 * mean |pred - target| + 0.3 * mean (1 - cos(pred, target))."""
    l1 = (pred - target).abs().mean()
    return L1_WEIGHT * l1 + COSINE_WEIGHT * (1.0 - cosine(pred, target)).mean()


@dataclass
class SRMTrainResult:
    model: SemanticRefinementModule  # with the best (lowest monitored loss) weights, eval mode
    history: list[dict] = field(default_factory=list)  # one dict per epoch
    best_epoch: int = 0  # 1-based epoch whose weights `model` holds
    val_cos_before: float = float("nan")  # mean cos(LQ, GT) on the validation rows
    val_cos_after: float = float("nan")  # mean cos(SRM(LQ), GT) on the same rows


def split_holdout(n_rows: int, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded random (train_idx, val_idx) split; at least one row on each side when val_fraction > 0."""
    if val_fraction <= 0.0:
        return torch.arange(n_rows), torch.arange(0)
    if n_rows < 2:
        raise ValueError(f"cannot hold out a validation split from {n_rows} row(s); pass val_lq/val_gt "
                         f"or set embed.srm.val_fraction: 0")
    n_val = min(n_rows - 1, max(1, round(n_rows * val_fraction)))
    perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def group_seed(seed: int, group: str) -> int:
    """A seed of its own for each group, derived from (seed, group name): a group's hold-out does
    not change when other groups are added or removed."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{group}".encode()).digest()[:8], "big") >> 1


def stratified_holdout(groups: Sequence[str], val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded (train_idx, val_idx) split of rows labelled by ``groups`` (e.g. their degradation),
    each group split on its own by :func:`split_holdout` with :func:`group_seed`, so every group
    with two or more rows has at least one row on each side; a group of one row stays in training.
    The rows of a group are taken in the order given (sort them, e.g. by id, for a split that
    does not depend on how they were read). Both index tensors come back sorted."""
    by_group: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    train_idx, val_idx = [], []
    for g, rows in by_group.items():
        if val_fraction <= 0.0 or len(rows) < 2:
            train_idx += rows
            continue
        keep, held = split_holdout(len(rows), val_fraction, group_seed(seed, g))
        train_idx += [rows[i] for i in keep.tolist()]
        val_idx += [rows[i] for i in held.tolist()]
    return torch.tensor(sorted(train_idx), dtype=torch.long), torch.tensor(sorted(val_idx), dtype=torch.long)


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier: linear warm-up from 1/warmup to 1, then cosine decay to 0 at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _check_pairs(lq: Tensor, gt: Tensor, what: str) -> None:
    if lq.ndim != 2 or lq.shape != gt.shape:
        raise ValueError(f"{what}: LQ and GT embeddings must both be [N, D] with equal shapes; "
                         f"got {tuple(lq.shape)} and {tuple(gt.shape)}")


@torch.no_grad()
def _evaluate(model: nn.Module, lq: Tensor, gt: Tensor, batch_size: int) -> tuple[float, float]:
    """(mean loss, mean cosine) of the model on (lq, gt), weighted by batch size."""
    model.eval()
    loss_sum, cos_sum = 0.0, 0.0
    for start in range(0, lq.shape[0], batch_size):
        pred = model(lq[start:start + batch_size])
        target = gt[start:start + batch_size]
        n = pred.shape[0]
        loss_sum += srm_loss(pred, target).item() * n
        cos_sum += cosine(pred, target).sum().item()
    return loss_sum / lq.shape[0], cos_sum / lq.shape[0]


def _build_model(dim: int, cfg: SRMConfig, device: str | torch.device) -> SemanticRefinementModule:
    # Seed the initialisation without touching the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = SemanticRefinementModule.from_config(dim, cfg)
    return model.to(device)


def train_srm(lq: Tensor, gt: Tensor, cfg: SRMConfig, *, val_lq: Tensor | None = None,
              val_gt: Tensor | None = None, device: str | torch.device = "cpu",
              log_fn: Callable[[int, dict], None] | None = None) -> SRMTrainResult:
    """Train an SRM on embedding pairs (row i of ``lq`` is the LQ embedding of row i of ``gt``).

    Validation rows are ``val_lq``/``val_gt`` when given, otherwise a seeded ``cfg.val_fraction``
    hold-out of the training rows. Early stopping watches the validation loss (the training loss
    when there are no validation rows) and stops after ``cfg.patience`` epochs without a new
    best; the returned model holds the best epoch's weights. Deterministic for ``cfg.seed`` on CPU.
    ``log_fn(epoch, metrics)`` is called once per epoch with the same dict appended to history.
    """
    _check_pairs(lq, gt, "training pairs")
    if (val_lq is None) != (val_gt is None):
        raise ValueError("pass both val_lq and val_gt, or neither (then cfg.val_fraction rows are held out)")
    lq, gt = lq.float(), gt.float()
    if val_lq is None:
        train_idx, val_idx = split_holdout(lq.shape[0], cfg.val_fraction, cfg.seed)
        val_lq, val_gt = lq[val_idx], gt[val_idx]
        lq, gt = lq[train_idx], gt[train_idx]
    else:
        _check_pairs(val_lq, val_gt, "validation pairs")
        val_lq, val_gt = val_lq.float(), val_gt.float()
    if lq.shape[0] == 0:
        raise ValueError("train_srm got no training rows; embed at least one LQ/GT pair first")

    lq, gt, val_lq, val_gt = (t.to(device) for t in (lq, gt, val_lq, val_gt))
    has_val = val_lq.shape[0] > 0
    model = _build_model(lq.shape[1], cfg, device)

    steps_per_epoch = math.ceil(lq.shape[0] / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = min(cfg.warmup_epochs * steps_per_epoch, total_steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine_factor(step, warmup_steps, total_steps))
    shuffle_rng = torch.Generator().manual_seed(cfg.seed)

    val_cos_before = cosine(val_lq, val_gt).mean().item() if has_val else float("nan")
    best_loss, best_epoch, best_state = math.inf, 0, copy.deepcopy(model.state_dict())
    history: list[dict] = []
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        order = torch.randperm(lq.shape[0], generator=shuffle_rng).to(device)
        train_loss_sum = 0.0
        for start in range(0, lq.shape[0], cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            loss = srm_loss(model(lq[idx]), gt[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            train_loss_sum += loss.item() * idx.shape[0]

        metrics = {"epoch": epoch, "train_loss": train_loss_sum / lq.shape[0],
                   "lr": optimizer.param_groups[0]["lr"]}
        if has_val:
            metrics["val_loss"], metrics["val_cos"] = _evaluate(model, val_lq, val_gt, cfg.batch_size)
        history.append(metrics)
        if log_fn is not None:
            log_fn(epoch, metrics)

        monitored = metrics["val_loss"] if has_val else metrics["train_loss"]
        if monitored < best_loss:
            best_loss, best_epoch = monitored, epoch
            best_state = copy.deepcopy(model.state_dict())
        elif epoch - best_epoch >= cfg.patience:
            break

    model.load_state_dict(best_state)
    model.eval()
    val_cos_after = _evaluate(model, val_lq, val_gt, cfg.batch_size)[1] if has_val else float("nan")
    return SRMTrainResult(model=model, history=history, best_epoch=best_epoch,
                          val_cos_before=val_cos_before, val_cos_after=val_cos_after)


@torch.no_grad()
def refine(model: nn.Module, emb: Tensor, batch_size: int = 4096) -> Tensor:
    """SRM(emb) in batches: float32 [N, D] on ``emb``'s device (the model may live elsewhere)."""
    if emb.ndim != 2:
        raise ValueError(f"refine expects [N, D] embeddings, got shape {tuple(emb.shape)}")
    model.eval()
    model_device = next(model.parameters()).device
    out = [model(emb[start:start + batch_size].to(model_device, torch.float32)).to(emb.device)
           for start in range(0, emb.shape[0], batch_size)]
    return torch.cat(out) if out else emb.new_zeros((0, emb.shape[1]), dtype=torch.float32)
