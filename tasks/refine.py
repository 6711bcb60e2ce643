"""The embed stage's Semantic Refinement Module: which train rows choose its epoch, its fit, the
cosines it is judged by, and the files it leaves (srm.pt, srm_selection.json)."""

from __future__ import annotations

import io
import json
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from srdiff_core import srm
from srdiff_core.config import Config
from storage import fs
from tasks import tracking

if TYPE_CHECKING:
    from tasks.embed import Embeddings

SELECTION_NAME = "srm_selection.json"  # the held-out train rows that chose the SRM's epoch


def cosine_by_degradation(emb: Embeddings, pred: torch.Tensor, split: str) -> dict[str, float]:
    rows = [i for i, s in enumerate(emb.splits) if s == split]
    out = {}
    for deg in sorted({emb.degradations[i] for i in rows}):
        idx = torch.tensor([i for i in rows if emb.degradations[i] == deg])
        out[deg] = float(srm.cosine(pred[idx], emb.gt[idx]).mean())
    return out


def split_cosines(emb: Embeddings, pred: torch.Tensor, split: str) -> dict[str, float]:
    """srm/<split>_cos_before and _after over every row of ``split`` (no rows: none)."""
    rows = torch.tensor([i for i, s in enumerate(emb.splits) if s == split], dtype=torch.long)
    if not len(rows):
        return {}
    return {f"srm/{split}_cos_before": float(srm.cosine(emb.lq[rows], emb.gt[rows]).mean()),
            f"srm/{split}_cos_after": float(srm.cosine(pred[rows], emb.gt[rows]).mean())}


@dataclass
class SRMSelection:
    """Which rows chose the SRM's epoch (early stopping and the best weights kept): a seeded
    hold-out of the train split, stratified by degradation (srm.stratified_holdout). The val
    split never takes part: its rows are only refined and scored."""

    split: str  # "train-holdout", or "train-loss" when no row could be held out (then the training loss)
    fraction: float
    seed: int
    holdout_ids: list[str]  # sorted
    training_ids: list[str]  # the train rows the SRM is fitted on, sorted
    holdout_by_degradation: dict[str, int]

    def record(self) -> dict:
        """The selection as SELECTION_NAME holds it (and the embed run logs as an artifact)."""
        return {"selection_split": self.split, "val_fraction": self.fraction, "seed": self.seed,
                "stratified_by": "degradation", "holdout_rows": len(self.holdout_ids),
                "training_rows": len(self.training_ids), "holdout_by_degradation": self.holdout_by_degradation,
                "holdout_ids": self.holdout_ids}

    def params(self) -> dict[str, str]:
        return {"srm.selection_split": self.split, "srm.selection_rows": str(len(self.holdout_ids)),
                "srm.selection_fraction": str(self.fraction), "srm.selection_seed": str(self.seed),
                "srm.selection_stratified_by": "degradation", "srm.training_rows": str(len(self.training_ids))}


def srm_selection(emb: Embeddings, cfg: Config) -> tuple[list[int], list[int], SRMSelection]:
    """(training row indices, held-out row indices, the selection) among ``emb``'s train rows:
    ``embed.srm.val_fraction`` of each degradation's train rows (in id order), seeded by
    ``embed.srm.seed``. Rows of any other split are in neither list."""
    train_rows = [i for i, s in enumerate(emb.splits) if s == "train"]
    keep, held = srm.stratified_holdout([emb.degradations[i] for i in train_rows], cfg.embed.srm.val_fraction,
                                        cfg.embed.srm.seed)
    fit_rows, held_rows = [train_rows[i] for i in keep.tolist()], [train_rows[i] for i in held.tolist()]
    selection = SRMSelection(split="train-holdout" if held_rows else "train-loss", fraction=cfg.embed.srm.val_fraction,
                             seed=cfg.embed.srm.seed, holdout_ids=sorted(emb.ids[i] for i in held_rows),
                             training_ids=sorted(emb.ids[i] for i in fit_rows),
                             holdout_by_degradation=dict(sorted(Counter(emb.degradations[i] for i in held_rows).items())))
    return fit_rows, held_rows, selection


def train_refinement(emb: Embeddings, cfg: Config, device: torch.device,
                     log) -> tuple[srm.SRMTrainResult, SRMSelection]:
    """Fit the SRM on the train split less a held-out slice of it (:func:`srm_selection`), which
    alone chooses the epoch; val rows (the benchmarks' test sets) are never read here."""
    fit_rows, held_rows, selection = srm_selection(emb, cfg)
    fit, held = torch.tensor(fit_rows, dtype=torch.long), torch.tensor(held_rows, dtype=torch.long)
    result = srm.train_srm(emb.lq[fit], emb.gt[fit], cfg.embed.srm, val_lq=emb.lq[held], val_gt=emb.gt[held],
                           device=device, log_fn=lambda epoch, m: log.debug(f"srm epoch {epoch}: {m}"))
    if held_rows:
        log.info(f"SRM: best epoch {result.best_epoch} of {len(result.history)}, chosen on {len(held_rows)} held-out "
                 f"train rows ({selection.holdout_by_degradation}); their cosine LQ-vs-GT "
                 f"{result.val_cos_before:.4f} -> {result.val_cos_after:.4f}; fitted on {len(fit_rows)} train rows")
    else:
        log.warning(f"SRM: no train row held out (embed.srm.val_fraction {cfg.embed.srm.val_fraction}, or one train "
                    f"row per degradation): best epoch {result.best_epoch} chosen on the training loss")
    return result, selection


def write_selection(cfg: Config, out_url: str, selection: SRMSelection, run_id: str | None) -> str:
    """SELECTION_NAME under ``out_url`` (the rows that chose the SRM epoch), logged to ``run_id``."""
    url = fs.join(out_url, SELECTION_NAME)
    data = json.dumps(selection.record(), indent=1).encode()
    fs.atomic_write_bytes(url, data)
    if run_id:
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / SELECTION_NAME
            local.write_bytes(data)
            tracking.log_artifact(cfg, run_id, local, "srm")
    return url


def save_srm(url: str, model: torch.nn.Module, cfg: Config, dim: int) -> None:
    buf = io.BytesIO()
    torch.save({"state_dict": model.state_dict(), "dim": dim, "srm": cfg.embed.srm.model_dump(mode="json"),
                "arch": cfg.embed.arch, "pretrained": cfg.embed.pretrained}, buf)
    fs.atomic_write_bytes(url, buf.getvalue())
