"""Evaluate stage: restore the val sets, score them against GT and the untouched LQ, report."""

from __future__ import annotations

import html
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from prefect import task

from srdiff_core import fid as fid_metric
from srdiff_core import images, metrics
from srdiff_core.config import Config, random_clip_weights
from srdiff_core.metrics import MetricAvailability
from srdiff_core.restorer import (
    Restorer,
    RestoreClock,
    Tiling,
    calls_per_jump,
    cpu_tiling,
    duration_text,
    large_on_cpu,
    network_pixels,
    tiling_for,
)
from storage import fs, shards, tables
from tasks import artifacts, tracking
from tasks.common import (
    RANDOM_WEIGHTS_NOTE,
    RateLogger,
    StageResult,
    pick_device,
    stage_dir,
    stage_logger,
)
from tasks.embed_tables import EmbeddedPairDataset, quarantine_rows, read_embeddings, skipped_by_degradation

METRICS = ("psnr", "ssim", "psnr_y", "ssim_y", "lpips")
PROGRESS_EVERY_S = 5.0  # progress lines inside a batch at most this far apart (plus one network call)
HOURS = 3600.0  # an evaluation expected to take longer than this on the CPU is announced as a warning


def protocol(cfg: Config, lpips_reason: str | None, fid_reason: str | None = None,
             max_sigma: float | None = None, device: torch.device | None = None) -> dict[str, str]:
    """The evaluation protocol (metric definitions + sampling), logged with every evaluation run.

    ``max_sigma``: the SDE the model file was trained with, which is what sampling uses (default:
    the config's, which the train stage wrote into that file). ``device``: where it runs (on the
    CPU large images are tiled, see :func:`resolution`)."""
    e = cfg.evaluate
    return {**metrics.protocol_description(e.crop_border, lpips_reason is None, lpips_reason or ""),
            "eval.protocol.fid": (f"pytorch-fid Inception-v3 ({fid_metric.FID_WEIGHTS}), 2048-d pool features, "
                                  f"restored vs GT over each degradation's val images (few images: a noisy figure)"
                                  if fid_reason is None else f"unavailable: {fid_reason}"),
            "eval.seed": str(e.seed), "eval.steps": str(e.steps),
            "eval.sampler": ("posterior (IR-SDE)" if e.eta == 1.0 else "deterministic (DDIM-style, eta 0)" if e.eta == 0.0
                             else f"posterior with DDIM eta {e.eta}"),
            "eval.eta": str(e.eta), "eval.clip_x0": str(e.clip_x0).lower(),
            "eval.protocol.clip_x0": ("x0 estimate clamped to [0, 1] at every jump" if e.clip_x0
                                      else "x0 estimate not clamped (as the released IR-SDE/DA-CLIP samplers)"),
            "eval.samples_per_image": str(e.samples_per_image),
            "eval.max_sigma": str(cfg.sde.max_sigma if max_sigma is None else max_sigma),
            "eval.headline_sample": f"the first sample (seed {e.seed}); " + (
                f"psnr_best_of_{e.samples_per_image} picks the best of {e.samples_per_image} by PSNR against GT "
                f"(an oracle figure, labelled as such)" if e.samples_per_image > 1 else "no best-of-N figure"),
            "eval.resolution": resolution(e, device),
            "eval.clip_weights": (RANDOM_WEIGHTS_NOTE if random_clip_weights(cfg.embed.pretrained)
                                  else f"{cfg.embed.arch} {cfg.embed.pretrained}")}


def resolution(e, device: torch.device | None) -> str:
    """How val images go through the network: whole or in tiles (size/overlap)."""
    if e.tile_size:
        return f"full, tiles {e.tile_size}/{e.tile_overlap}"
    if device is None or device.type != "cpu" or not (e.cpu_tile_size and e.cpu_large_pixels):
        return "full"
    tiles = cpu_tiling(e)
    return f"full; on the CPU, images over {e.cpu_large_pixels} pixels in tiles {tiles.size}/{tiles.overlap}"


def load_lpips(cfg: Config, device: torch.device):
    """(metric, None) when the AlexNet backbone is present, else (None, reason)."""
    if not cfg.evaluate.lpips:
        return None, "disabled in config (evaluate.lpips: false)"
    loaded = metrics.LPIPSMetric.load(device=device)
    if isinstance(loaded, MetricAvailability):
        return None, loaded.reason
    return loaded, None


def load_fid(cfg: Config, device: torch.device):
    """(metric, None) when pytorch-fid's Inception weights are present, else (None, reason)."""
    if not cfg.evaluate.fid:
        return None, "disabled in config (evaluate.fid: false)"
    loaded = fid_metric.FIDMetric.load(device=device)
    if isinstance(loaded, MetricAvailability):
        return None, loaded.reason.removeprefix("FID unavailable: ")
    return loaded, None


def fid_by_degradation(features: dict[str, dict[str, list]], fid) -> dict[str, float]:
    """eval/<degradation>/fid (restored vs GT) and .../lq_fid (the input vs GT), and over all images."""
    out = {}
    pooled = defaultdict(list)
    for deg, sets in features.items():
        for name, feats in sets.items():
            pooled[name] += feats
    for deg, sets in {**features, "all": pooled}.items():
        gt = np.concatenate(sets["gt"])
        if len(gt) < 2:
            continue  # a covariance needs two images
        out[f"eval/{deg}/fid"] = fid(np.concatenate(sets["restored"]), gt)
        out[f"eval/{deg}/lq_fid"] = fid(np.concatenate(sets["lq"]), gt)
    return out


def score(pred: torch.Tensor, target: torch.Tensor, border: int, lpips) -> dict[str, float]:
    values = metrics.image_metrics(pred, target, border=border, lpips=lpips)
    return {k: float(v[0]) for k, v in values.items()}


def selected(dataset, max_images: int):
    """The val examples to score: all, or the first ``max_images`` of each degradation."""
    taken: dict[str, int] = defaultdict(int)
    for ex in dataset:
        if max_images and taken[ex["degradation"]] >= max_images:
            continue
        taken[ex["degradation"]] += 1
        yield ex


def same_size_batches(examples, batch_size: int):
    """Consecutive examples of one image size, at most ``batch_size`` at a time."""
    batch: list[dict] = []
    for ex in examples:
        if batch and (len(batch) == batch_size or batch[0]["lq"].shape != ex["lq"].shape):
            yield batch
            batch = []
        batch.append(ex)
    if batch:
        yield batch


def evaluate_samples(restorer: Restorer, cfg: Config, val_urls: list[str], context: dict[str, np.ndarray],
                     lpips, log, fid=None, skip_ids: frozenset[str] = frozenset(), total: int | None = None
                     ) -> tuple[list[dict], dict[str, list], dict[str, dict[str, list]]]:
    """Per-image rows (restored and LQ metrics), per degradation images for the grids and (with
    ``fid``) Inception features of the restored, LQ and GT images. Samples in ``skip_ids`` (the
    embed stage quarantined them: no embedding) are not scored."""
    e = cfg.evaluate
    dataset = EmbeddedPairDataset(val_urls, skip_ids=skip_ids, embeddings=context)
    rows, examples = [], defaultdict(list)
    features: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    autocast = torch.bfloat16 if (e.precision == "bf16" and restorer.device.type == "cuda") else None
    progress = RateLogger(log, "evaluate", total, "images")
    eta = artifacts.Progress(cfg, "evaluate", total, "images") if total else None  # ETA, Prefect progress
    if eta is not None:
        eta.update(0)  # the rate counts from here: otherwise from the end of the first batch, and one batch has no ETA
    steps_log = EvalLines(cfg, restorer.device, total, log)  # inside batches; time on the CPU
    for batch in same_size_batches(selected(dataset, e.max_images), e.batch_size):
        lq = torch.stack([ex["lq"] for ex in batch])
        gt = torch.stack([ex["gt"] for ex in batch])
        ctx = torch.stack([ex["context"] for ex in batch])
        tiling = tiling_for(lq.shape[-2], lq.shape[-1], restorer.device, e)
        steps_log.begin_batch(len(rows), len(batch), lq.shape[-2], lq.shape[-1], tiling)

        def sample(k: int) -> torch.Tensor:
            steps_log.begin_sample(k)
            try:
                return restorer.restore(lq, ctx, steps=e.steps, seed=e.seed + k, tile_size=tiling.size,
                                        tile_overlap=tiling.overlap, autocast_dtype=autocast, clip_x0=e.clip_x0,
                                        eta=e.eta, on_network_call=steps_log.on_call).float().cpu()
            finally:
                steps_log.end()

        outs = [sample(k) for k in range(e.samples_per_image)]  # outs[0]: the headline sample
        for i, ex in enumerate(batch):
            restored = score(metrics.quantize_uint8(outs[0][i:i + 1]), gt[i:i + 1], e.crop_border, lpips)
            baseline = score(lq[i:i + 1], gt[i:i + 1], e.crop_border, lpips)
            row = {"id": ex["id"], "degradation": ex["degradation"], **restored,
                   **{f"lq_{k}": v for k, v in baseline.items()}}
            if e.samples_per_image > 1:
                row |= best_of_n([out[i:i + 1] for out in outs], gt[i:i + 1], e.crop_border)
            rows.append(row)
            examples[ex["degradation"]].append(GridExample(ex["id"], restored["psnr"], baseline["psnr"],
                                                            images.to_uint8(ex["lq"]), images.to_uint8(outs[0][i]),
                                                            images.to_uint8(ex["gt"])))
        if fid is not None:
            degs = [ex["degradation"] for ex in batch]
            for name, imgs in (("restored", metrics.quantize_uint8(outs[0])), ("lq", lq), ("gt", gt)):
                for deg, feat in zip(degs, fid.features_of(imgs)):
                    features[deg][name].append(feat[None])
        progress.update(len(batch), extra=eta.update(len(rows), rate=False) if eta else "")
    if not rows:
        raise ValueError("the val split has no samples: check download.demo.val_per_degradation or the val "
                         "folders of your datasets, then rerun from the shard stage")
    return rows, examples, features


class EvalLines:
    """Log lines while a batch is restored (a batch of full-size images takes minutes on the CPU,
    and the per-batch lines come only when it is done). On the CPU: a warning for each image size
    over evaluate.cpu_large_pixels, and, once a network call after the first is timed, the expected
    time of the stage (a warning when it is hours). Everywhere: at most every PROGRESS_EVERY_S
    seconds, the batch's steps with rate, and the stage's ETA. ``total``: the images to score
    (None: unknown, then ETAs are the batch's)."""

    def __init__(self, cfg: Config, device: torch.device, total: int | None, log):
        self.e, self.device, self.total, self.log = cfg.evaluate, torch.device(device), total, log
        self.clock = RestoreClock(0, every_s=PROGRESS_EVERY_S)
        self.warned: set[tuple[int, int]] = set()
        self.expected_said = False
        self.done_images = self.batch = self.height = self.width = self.sample = 0
        self.tiling = Tiling(0, self.e.tile_overlap)

    def begin_batch(self, done_images: int, batch: int, height: int, width: int, tiling: Tiling) -> None:
        self.done_images, self.batch, self.height, self.width, self.tiling = done_images, batch, height, width, tiling
        # Re-planned at every batch: the images left are assumed to be of this batch's size.
        left = max((self.total or 0) - done_images, batch)
        self.clock.total = self.clock.done + left * self.image_pixels()
        if (height, width) not in self.warned and large_on_cpu(height, width, self.device, self.e):
            self.warned.add((height, width))
            self.warn_large(left)

    def image_pixels(self) -> int:
        """Network pixels of one image: all its samples' jumps."""
        return network_pixels(self.height, self.width, self.tiling) * self.e.steps * self.e.samples_per_image

    def begin_sample(self, k: int) -> None:
        self.sample = k
        self.clock.begin(network_pixels(self.height, self.width, self.tiling, self.batch) * self.e.steps,
                         calls_per_jump(self.height, self.width, self.tiling, self.batch))

    def end(self) -> None:
        self.clock.end()

    def on_call(self, pixels: int) -> None:
        due = self.clock.add(pixels)
        if self.device.type == "cpu" and not self.expected_said and self.clock.seconds_for(1) is not None:
            self.say_expected()
        elif due:
            self.say_progress()

    def warn_large(self, left: int) -> None:
        size = f"{self.width}x{self.height}"
        how = (f"restoring them in {self.tiling.size}-px tiles (evaluate.cpu_tile_size; evaluate.tile_size sets "
               f"the size)" if self.tiling.cpu_default else f"restoring them in {self.tiling.size}-px tiles"
               if self.tiling.size else "restoring them whole (evaluate.cpu_tile_size: 0)")
        expected = self.clock.seconds_for(left * self.image_pixels())
        when = f", expected about {duration_text(expected)} for the {left} left" if expected is not None else ""
        self.log.warning(f"evaluate: val images of {size} are large for the CPU: {how}{when}")

    def say_expected(self) -> None:
        self.expected_said = True
        images = self.total if self.total is not None else self.batch
        seconds = self.clock.seconds_for(images * self.image_pixels()) or 0.0
        samples = f" x {self.e.samples_per_image} samples" if self.e.samples_per_image > 1 else ""
        what = f"{images} val image(s) of {self.width}x{self.height} like the first, {self.e.steps} steps{samples}"
        if seconds >= HOURS:
            self.log.warning(f"evaluate: this will take about {duration_text(seconds)} on the CPU ({what}): a GPU, "
                             f"fewer evaluate.steps or evaluate.max_images (per degradation) make it shorter")
        else:
            self.log.info(f"evaluate: expected about {duration_text(seconds)} on the CPU ({what}; timed on the "
                          f"first network calls)")

    def say_progress(self) -> None:
        clock = self.clock
        rate, eta = clock.jump_rate(), clock.eta()
        of = f"/{self.total}" if self.total is not None else ""
        sample = f", sample {self.sample + 1}/{self.e.samples_per_image}" if self.e.samples_per_image > 1 else ""
        facts = ([f"{rate:.3g} steps/s"] if rate else []) + ([f"ETA {duration_text(eta)}"] if eta is not None else [])
        self.log.info(f"evaluate: {self.done_images}{of} images done; batch of {self.batch} ({self.width}x"
                      f"{self.height}){sample}: step {clock.jumps_done}/{self.e.steps}"
                      + (f" ({', '.join(facts)})" if facts else ""))


def best_of_n(samples: list[torch.Tensor], gt: torch.Tensor, border: int) -> dict[str, float]:
    """PSNR of the best of the samples (seeds seed..seed+n-1), chosen against the ground truth.

    An oracle choice, not a restoration a user could get: it is reported only when asked for
    (evaluate.samples_per_image > 1) and only under its own name, never as `psnr`. (The released
    SR-Diff code reported the best of 10 as its headline number.)"""
    psnrs = [float(metrics.psnr(metrics.quantize_uint8(out), gt, border=border)[0]) for out in samples]
    return {f"psnr_best_of_{len(samples)}": max(psnrs)}


def aggregate(rows: list[dict]) -> dict[str, float]:
    """Means per degradation and over all images: eval/<degradation>/<metric> and .../lq_<metric>."""
    out: dict[str, float] = {}
    groups = defaultdict(list)
    for r in rows:
        groups[r["degradation"]].append(r)
        groups["all"].append(r)
    best_of = sorted({k for r in rows for k in r if k.startswith("psnr_best_of_")})
    keys = [*METRICS, *(f"lq_{m}" for m in METRICS), *best_of]
    for deg, items in groups.items():
        for key in keys:
            values = [r[key] for r in items if key in r]
            if values:
                out[f"eval/{deg}/{key}"] = float(np.mean(values))
        out[f"eval/{deg}/images"] = float(len(items))
    return out


@dataclass(frozen=True)
class GridExample:
    """One scored val image as the grids show it."""

    id: str
    psnr: float
    lq_psnr: float
    lq: np.ndarray
    restored: np.ndarray
    gt: np.ndarray


def grid_rows(examples: list[GridExample], n: int) -> list[list[tuple[np.ndarray, str]]]:
    """The n worst and n best restorations by PSNR (all of them when there are few), each row
    LQ | restored | GT with the per-image PSNR under the LQ and restored tiles."""
    ranked = sorted(examples, key=lambda e: e.psnr)
    chosen = ranked if len(ranked) <= 2 * n else ranked[:n] + ranked[-n:]
    return [[(e.lq, f"input {e.lq_psnr:.2f} dB"), (e.restored, f"restored {e.psnr:.2f} dB"),
             (e.gt, "ground truth")] for e in chosen]


def grid_image(degradation: str, examples: list[GridExample], n: int) -> np.ndarray:
    """The grid of one degradation: a header naming it, then :func:`grid_rows`."""
    shown = min(len(examples), 2 * n)
    title = f"{degradation}: {shown} of {len(examples)} val images, worst and best by PSNR"
    return images.labelled_grid(title, grid_rows(examples, n))


def skipped_summary(restorecls_url: str, log) -> tuple[frozenset[str], dict[str, int], dict[str, str]]:
    """What the embed stage quarantined (no embedding, so not scored): the ids to skip, the val
    images skipped per degradation, and the protocol entry eval.skipped (in the report and the
    run's params). A warning names the val ones."""
    rows = quarantine_rows(restorecls_url)
    by_deg = skipped_by_degradation(rows, "val")
    total = sum(by_deg.values())
    if total:
        log.warning(f"evaluate: {total} val image(s) not scored: the embed stage quarantined them (a PNG that does "
                    f"not decode, so no embedding): {', '.join(f'{d} {n}' for d, n in by_deg.items())}; e.g. "
                    f"{sorted(r['id'] for r in rows if r['split'] == 'val')[:3]}. Repair those files and rerun "
                    f"from the download stage to score them")
    text = (f"{total} val image(s) quarantined by the embed stage (undecodable PNG, no embedding) are not scored "
            f"({', '.join(f'{d}: {n}' for d, n in by_deg.items())})" if total else "none")
    return frozenset(r["id"] for r in rows), by_deg, {"eval.skipped": text}


def skipped_metrics(by_deg: dict[str, int], means: dict[str, float]) -> dict[str, float]:
    """eval/<degradation>/skipped for every degradation of ``means`` or ``by_deg`` (zero when none
    was skipped, so runs compare in the UI) and eval/all/skipped."""
    degs = {k.split("/")[1] for k in means if k.startswith("eval/")} | set(by_deg) | {"all"}
    return {f"eval/{d}/skipped": float(sum(by_deg.values()) if d == "all" else by_deg.get(d, 0)) for d in sorted(degs)}


def write_report(folder: Path, means: dict[str, float], proto: dict[str, str], grids: dict[str, str]) -> None:
    """report.md and report.html: the metrics table, the protocol, and the grids."""
    degs = sorted({k.split("/")[1] for k in means if k.startswith("eval/")})
    header = "| degradation | images | LQ PSNR | PSNR | LQ SSIM | SSIM | LQ PSNR-Y | PSNR-Y | LPIPS |"
    lines = ["# SR-Diff evaluation", "", header, "|" + "---|" * 9]
    cells = {}
    for deg in degs:
        g = lambda k: means.get(f"eval/{deg}/{k}")  # noqa: E731
        fmt = lambda v, p=2: "n/a" if v is None else f"{v:.{p}f}"  # noqa: E731
        cells[deg] = [deg, fmt(g("images"), 0), fmt(g("lq_psnr")), fmt(g("psnr")), fmt(g("lq_ssim"), 4),
                      fmt(g("ssim"), 4), fmt(g("lq_psnr_y")), fmt(g("psnr_y")), fmt(g("lpips"), 4)]
        lines.append("| " + " | ".join(cells[deg]) + " |")
    lines += ["", "## Protocol", ""] + [f"- {k}: {v}" for k, v in proto.items()]
    lines += ["", "## Grids (LQ | restored | GT; worst then best by PSNR)", ""]
    lines += [f"### {deg}\n\n![{deg}]({name})\n" for deg, name in grids.items()]
    (folder / "report.md").write_text("\n".join(lines) + "\n")
    head = "".join(f"<th>{h.strip()}</th>" for h in header.strip("|").split("|"))
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in cells.values())
    figs = "".join(f"<h3>{html.escape(d)}</h3><img src='{html.escape(n)}'>" for d, n in grids.items())
    proto_html = "".join(f"<li>{html.escape(k)}: {html.escape(v)}</li>" for k, v in proto.items())
    (folder / "report.html").write_text(
        f"<!doctype html><meta charset='utf-8'><title>SR-Diff evaluation</title><h1>SR-Diff evaluation</h1>"
        f"<table border='1' cellpadding='4'><tr>{head}</tr>{body}</table><h2>Protocol</h2><ul>{proto_html}</ul>"
        f"<h2>Grids (LQ | restored | GT)</h2>{figs}")


@task(name="evaluate", persist_result=True)
def evaluate(cfg: Config, key: str, shards_url: str, restorecls_url: str, model_url: str,
             run_id: str | None = None) -> StageResult:
    """Restore the val sets (one seeded sample per image), score, write tables, grids and report."""
    log = stage_logger()
    start = time.perf_counter()
    device = pick_device(cfg)
    restorer = Restorer.from_file(fs.local_path(model_url), device=device, clip_pretrained=cfg.embed.pretrained)
    lpips, lpips_reason = load_lpips(cfg, device)
    if lpips_reason:
        log.warning(lpips_reason if lpips_reason.startswith("LPIPS") else f"LPIPS unavailable: {lpips_reason}")
    fid, fid_reason = load_fid(cfg, device)
    if fid_reason:
        log.warning(f"FID unavailable: {fid_reason}")
    skip_ids, skipped, skipped_param = skipped_summary(restorecls_url, log)
    proto = protocol(cfg, lpips_reason, fid_reason, restorer.sde.max_sigma, device) | skipped_param
    total = artifacts.images_to_score(f"{shards_url}/index.parquet", "val", cfg.evaluate.max_images,
                                      sum(skipped.values()))
    rows, examples, features = evaluate_samples(restorer, cfg, shards.shard_urls(shards_url, split="val"),
                                                read_embeddings(restorecls_url), lpips, log, fid, skip_ids, total)
    means = aggregate(rows) | (fid_by_degradation(features, fid) if fid is not None else {})
    means |= skipped_metrics(skipped, means)

    out_dir = stage_dir(cfg, "runs/evaluate", key)
    tables.write_table(f"{out_dir}/per_image.parquet", pa.Table.from_pylist(rows))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        grids = {}
        for deg, exs in sorted(examples.items()):
            name = f"grid_{deg}.png"
            Image.fromarray(grid_image(deg, exs, cfg.evaluate.grid_images)).save(folder / name)
            grids[deg] = name
        write_report(folder, means, proto, grids)
        for f in sorted(folder.iterdir()):
            fs.atomic_write_bytes(f"{out_dir}/{f.name}", f.read_bytes())
        if run_id:
            tracking.log_artifact(cfg, run_id, folder, "report")
            tracking.log_params(cfg, run_id, proto)
            unavailable = {"eval.lpips": lpips_reason and proto["eval.protocol.lpips"],
                           "eval.fid": fid_reason and proto["eval.protocol.fid"]}
            tracking.set_tags(cfg, run_id, {k: v for k, v in unavailable.items() if v})
    seconds = time.perf_counter() - start
    log.info(f"evaluate: {len(rows)} images in {seconds:.1f} s -> {out_dir}")
    return StageResult(stage="evaluate", key=key, digest=tables.table_digest(pa.Table.from_pylist(rows)),
                       outputs={"report": f"{out_dir}/report.md", "html": f"{out_dir}/report.html",
                                "per_image": f"{out_dir}/per_image.parquet"},
                       metrics={**means, "eval/seconds": seconds}, params=proto, run_id=run_id, seconds=seconds)
