"""`srdiff compare`: the per-degradation evaluation metrics of two or more MLflow runs side by
side, with each run's difference against the first, as plain text (terminals, CI logs) or
Markdown (PR comments).

Three steps, each a small function: fetch (MLflow runs -> :class:`RunMetrics`), rows (lists of
cells) and formatting (cells -> text). Only the fetch step talks to MLflow. It reads the stable
names the evaluate stage logs (`tasks.evaluate.aggregate`): ``eval/<degradation>/<metric>``,
``eval/<degradation>/lq_<metric>`` (the untouched LQ input against GT) and
``eval/<degradation>/images``, found both on the evaluate stage's nested run and on the
pipeline's parent run.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from srdiff_core.config import DEGRADATIONS, Config
from tasks.evaluate import METRICS
from tasks.tracking import PARENT_TAG, STAGE_TAG, client_for, tracking_uri

DEFAULT_METRICS = ("psnr", "ssim", "psnr_y", "lpips")
# Always in the header, found or not: the ablation switch, the CLIP weights, the sampler steps and clamp.
KEY_FACTS = ("unet.conditioning", "clip.weights", "eval.steps", "eval.clip_x0")
LOWER_IS_BETTER = frozenset({"lpips"})
FORMATS = ("text", "markdown")
SHORT_ID = 8


class CompareError(ValueError):
    """A run cannot be compared; the message names the run and what to do."""


@dataclass(frozen=True)
class RunMetrics:
    """One compared run: its own id and name, its eval metrics, and the settings it was made with
    (the pipeline's config params merged with its stage runs' params)."""

    run_id: str
    name: str
    metrics: dict[str, float]
    facts: dict[str, str]


# ---------------------------------------------------------------- fetch (the only MLflow part)

def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, else None."""
    parsed = urlparse(uri)
    return Path(unquote(parsed.path)) if parsed.scheme == "sqlite" else None


def open_store(cfg: Config) -> MlflowClient:
    """The client `srdiff ui` uses, refusing to create an empty SQLite store where none exists
    (MLflow would silently make one, and every run id would then be "unknown")."""
    uri = tracking_uri(cfg)
    db = sqlite_path(uri)
    if db is not None and not db.exists():
        raise CompareError(f"no MLflow store at {db}: pass the --config (and --set data_root=...) "
                           f"of the pipeline runs you want to compare")
    return client_for(cfg)


def get_run(client: MlflowClient, run_id: str) -> Run:
    """The run ``run_id`` names: a full id, or a unique prefix of one (the 8 characters this
    command prints in its header)."""
    if len(run_id) < 32 and re.fullmatch(r"[0-9a-f]{4,31}", run_id):
        return run_by_prefix(client, run_id)
    try:
        return client.get_run(run_id)
    except MlflowException as e:
        raise CompareError(f"no MLflow run '{run_id}' in {client.tracking_uri} ({e.message}): copy the "
                           f"full run id from `srdiff run`'s output or the MLflow UI (`srdiff ui`), and pass "
                           f"the --config/--set data_root=... of the pipeline that made it") from None


def run_by_prefix(client: MlflowClient, prefix: str) -> Run:
    experiments = [e.experiment_id for e in client.search_experiments()]
    found = [r for r in client.search_runs(experiments, max_results=50_000) if r.info.run_id.startswith(prefix)]
    if len(found) == 1:
        return found[0]
    if not found:
        raise CompareError(f"no MLflow run id starts with '{prefix}' in {client.tracking_uri}: copy the run id "
                           f"from `srdiff run`'s output or the MLflow UI (`srdiff ui`), and pass the "
                           f"--config/--set data_root=... of the pipeline that made it")
    raise CompareError(f"'{prefix}' starts {len(found)} run ids ({', '.join(r.info.run_id for r in found[:5])}"
                       f"{', ...' if len(found) > 5 else ''}): give more characters")


def child_runs(client: MlflowClient, parent: Run) -> dict[str, Run]:
    """A pipeline run's nested stage runs by stage (the latest one where a stage has several)."""
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'",
                                  order_by=["attributes.start_time ASC"])
    return {r.data.tags[STAGE_TAG]: r for r in children if STAGE_TAG in r.data.tags}


def eval_metrics(run: Run) -> dict[str, float]:
    return {k: v for k, v in run.data.metrics.items() if k.startswith("eval/") and k.count("/") == 2}


def run_facts(parent: Run | None, stages: dict[str, Run], own: Run) -> dict[str, str]:
    """The settings a run was made with: the parent's flattened config, then the params of its
    train, embed and evaluate runs (`clip.weights` is a param there, also when the stage was
    reused from cache), then the compared run's own params."""
    facts: dict[str, str] = dict(parent.data.params) if parent is not None else {}
    for stage in ("train", "embed", "evaluate"):
        if stage in stages:
            facts.update(stages[stage].data.params)
    facts.update(own.data.params)
    return facts


def no_metrics_error(run: Run) -> CompareError:
    stage = run.data.tags.get(STAGE_TAG, "unknown")
    hint = "" if stage in ("pipeline", "evaluate") else " (or pass its pipeline run or evaluate run id)"
    return CompareError(f"run {run.info.run_id} ({run.info.run_name}, stage {stage}) has no evaluation metrics "
                        f"(eval/<degradation>/<metric>): run the evaluate stage first, e.g. "
                        f"`srdiff run --config <its config> --stages evaluate`, and compare that pipeline run"
                        f"{hint}")


def resolve_run(client: MlflowClient, run_id: str) -> RunMetrics:
    """A pipeline parent run or an evaluate run -> its eval metrics and the settings behind them."""
    run = get_run(client, run_id)
    metrics = eval_metrics(run)
    if not metrics:
        raise no_metrics_error(run)
    parent_id = run.data.tags.get(PARENT_TAG)
    parent = run if run.data.tags.get(STAGE_TAG) == "pipeline" else (get_run(client, parent_id) if parent_id else None)
    stages = child_runs(client, parent) if parent is not None else {}
    name = run.info.run_name if parent is None or parent is run else f"{parent.info.run_name}/{run.info.run_name}"
    return RunMetrics(run_id=run.info.run_id, name=name or "", metrics=metrics,
                      facts=run_facts(parent, stages, run))


def fetch_runs(client: MlflowClient, run_ids: list[str]) -> list[RunMetrics]:
    if len(run_ids) < 2:
        raise CompareError("give two or more run ids: the first is the reference the others are compared to")
    return [resolve_run(client, rid) for rid in run_ids]


# ---------------------------------------------------------------- rows (pure)

def run_labels(n: int) -> list[str]:
    """A, B, C, ... (the first run is A, the reference of every difference)."""
    if n > len(string.ascii_uppercase):
        raise CompareError(f"at most {len(string.ascii_uppercase)} runs per table, got {n}")
    return list(string.ascii_uppercase[:n])


def degradations_in(runs: list[RunMetrics]) -> list[str]:
    """The degradations any run has, in the pipeline's order, unknown ones sorted, "all" last."""
    found = {k.split("/")[1] for r in runs for k in r.metrics}
    known = [d for d in DEGRADATIONS if d in found]
    others = sorted(found - set(DEGRADATIONS) - {"all"})
    return known + others + (["all"] if "all" in found else [])


def parse_metrics(text: str | None) -> list[str] | None:
    """`--metrics psnr,ssim` -> ["psnr", "ssim"]; None when not given."""
    if text is None:
        return None
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise CompareError(f"unknown metric(s) {unknown or [text]}: choose from {','.join(METRICS)}")
    return names


def metrics_to_show(runs: list[RunMetrics], requested: list[str] | None) -> list[str]:
    """The requested metrics as asked; by default psnr, ssim, psnr_y and lpips where any run has it
    (LPIPS is unavailable without its AlexNet weights, see docs/protocol.md)."""
    if requested is not None:
        return list(requested)
    present = {k.split("/")[2] for r in runs for k in r.metrics}
    return [m for m in DEFAULT_METRICS if m in present]


def distinguishing_keys(runs: list[RunMetrics]) -> list[str]:
    """The key facts, then every other setting whose value is not the same in all runs."""
    keys = sorted({k for r in runs for k in r.facts} - set(KEY_FACTS))
    differing = [k for k in keys if len({r.facts.get(k) for r in runs}) > 1]
    return list(KEY_FACTS) + differing


def header_rows(runs: list[RunMetrics]) -> list[list[str]]:
    """Who is who: label, short run id, run name and the settings that tell the runs apart."""
    rows = [["", *run_labels(len(runs))],
            ["run", *(r.run_id[:SHORT_ID] for r in runs)],
            ["name", *(r.name for r in runs)]]
    rows += [[key, *(r.facts.get(key, "-") for r in runs)] for key in distinguishing_keys(runs)]
    return rows


def decimals(metric: str) -> int:
    """PSNR in dB to 0.01, the [0, 1] similarity scores to 1e-4 (as in the evaluate report)."""
    return 2 if metric.startswith("psnr") else 4


def format_value(value: float | None, metric: str) -> str:
    return "n/a" if value is None else f"{value:.{decimals(metric)}f}"


def format_difference(value: float | None, reference: float | None, metric: str) -> str:
    """Signed, rounded first so a difference that rounds to zero reads +0.00, never -0.00."""
    if value is None or reference is None:
        return "n/a"
    p = decimals(metric)
    return f"{round(value - reference, p) + 0.0:+.{p}f}"


def metric_columns(n_runs: int) -> list[str]:
    labels = run_labels(n_runs)
    return ["degradation", "metric", "LQ", *labels, *(f"{b} - {labels[0]}" for b in labels[1:])]


def metric_row(runs: list[RunMetrics], degradation: str, metric: str) -> list[str]:
    """One degradation x metric: the LQ baseline (of the reference run), each run, each B - A."""
    values = [r.metrics.get(f"eval/{degradation}/{metric}") for r in runs]
    baseline = runs[0].metrics.get(f"eval/{degradation}/lq_{metric}")
    return [degradation, metric, format_value(baseline, metric), *(format_value(v, metric) for v in values),
            *(format_difference(v, values[0], metric) for v in values[1:])]


def metric_rows(runs: list[RunMetrics], degradations: list[str], metrics: list[str]) -> list[list[str]]:
    return [metric_row(runs, d, m) for d in degradations for m in metrics]


def different_data(runs: list[RunMetrics], degradations: list[str], metrics: list[str]) -> list[str]:
    """Degradations where a run's image count or LQ baseline differs from the reference's: its
    numbers come from other images, so a difference there is not the model's alone. A value one
    of the two runs lacks (e.g. LPIPS unavailable) is no evidence either way."""
    def differs(r: RunMetrics, key: str, metric: str) -> bool:
        mine, reference = r.metrics.get(key), runs[0].metrics.get(key)
        return None not in (mine, reference) and format_value(mine, metric) != format_value(reference, metric)

    def keys(d: str) -> list[tuple[str, str]]:
        return [(f"eval/{d}/images", "images")] + [(f"eval/{d}/lq_{m}", m) for m in metrics]

    return [d for d in degradations if any(differs(r, k, m) for r in runs[1:] for k, m in keys(d))]


def notes(runs: list[RunMetrics], degradations: list[str], metrics: list[str]) -> list[str]:
    first = run_labels(len(runs))[0]
    higher = [m for m in metrics if m not in LOWER_IS_BETTER]
    lower = [m for m in metrics if m in LOWER_IS_BETTER]
    lines = [f"LQ: the degraded input scored against GT (run {first}'s val set); "
             f"X - {first}: positive is better for {', '.join(higher) or '-'}"
             + (f", negative is better for {', '.join(lower)}" if lower else "")]
    mismatched = different_data(runs, degradations, metrics)
    if mismatched:
        lines.append(f"warning: the runs were scored on different images for {', '.join(mismatched)} "
                     f"(image count or LQ baseline differs): those differences are not the model's alone")
    return lines


# ---------------------------------------------------------------- formatting (pure)

def text_table(rows: list[list[str]], numeric_from: int) -> str:
    """Columns padded to their widest cell; columns from ``numeric_from`` on are right-aligned
    (numbers line up on the decimal point: every value of a metric has the same decimals)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    pad = lambda i, c: c.rjust(widths[i]) if i >= numeric_from else c.ljust(widths[i])  # noqa: E731
    return "\n".join("  ".join(pad(i, c) for i, c in enumerate(row)).rstrip() for row in rows)


def markdown_cell(cell: str) -> str:
    return cell.replace("|", "\\|") or " "


def markdown_table(rows: list[list[str]], numeric_from: int) -> str:
    """GitHub-flavoured Markdown; columns from ``numeric_from`` on are right-aligned."""
    align = ["---" if i < numeric_from else "---:" for i in range(len(rows[0]))]
    lines = [rows[0], align, *rows[1:]]
    return "\n".join("| " + " | ".join(markdown_cell(c) for c in line) + " |" for line in lines)


def render(runs: list[RunMetrics], metrics: list[str] | None = None, fmt: str = "text") -> str:
    """The header table, the metric table and the notes, in one of FORMATS."""
    if fmt not in FORMATS:
        raise CompareError(f"unknown format '{fmt}': choose from {', '.join(FORMATS)}")
    degradations = degradations_in(runs)
    shown = metrics_to_show(runs, metrics)
    header = header_rows(runs)
    table = [metric_columns(len(runs)), *metric_rows(runs, degradations, shown)]
    lines = notes(runs, degradations, shown)
    if fmt == "markdown":
        return "\n\n".join([markdown_table(header, len(header[0])), markdown_table(table, 2), *lines])
    return "\n\n".join([text_table(header, len(header[0])), text_table(table, 2), "\n".join(lines)])


def compare(client: MlflowClient, run_ids: list[str], metrics: list[str] | None = None, fmt: str = "text") -> str:
    """Fetch the runs, then render them (what `srdiff compare` prints)."""
    return render(fetch_runs(client, run_ids), metrics, fmt)
