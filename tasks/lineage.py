"""Dataset lineage: what each stage run read, as MLflow dataset inputs (the run list's Dataset column).

* download and shard: the pairs manifest, one dataset per source dataset (``demo``, ``gopro``,
  ``lol``, ...; ``local`` for a seed-layout folder) and split, named by the source dataset;
* embed, train and evaluate: the shard index, per split, named ``<datasets>-shards``.

The split gives MLflow's context: ``training`` for train rows, ``evaluation`` for val rows (embed
reads both, train the train split, evaluate the val split). Each dataset records its digest (our
content digest of its rows, so equal data show equal digests across runs), its source (the
table's URL), its row count (``num_rows``; shard datasets add ``num_samples``) and its schema.
Logged through ``MlflowClient.log_inputs`` on the stage's run id, which is what
``mlflow.log_input`` does for the fluent active run.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import pyarrow as pa
import pyarrow.compute as pc
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.pandas_dataset import PandasDataset
from mlflow.entities import DatasetInput, InputTag
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from srdiff_core.config import Config
from storage import tables
from tasks import tracking
from tasks.common import StageResult

CONTEXT = {"train": "training", "val": "evaluation"}  # split -> MLflow dataset context
SPLIT_TAG = "srdiff.split"
DIGEST_CHARS = 16  # MLflow stores dataset digests of up to 36 characters
# Which splits of the shard index each stage reads.
SHARD_SPLITS = {"embed": ("train", "val"), "train": ("train",), "evaluate": ("val",)}


class _Dataset(PandasDataset):
    """A PandasDataset whose profile may carry extra counts (num_samples of a shard index)."""

    def __init__(self, *args, extra_profile: dict | None = None, **kwargs):
        self._extra_profile = dict(extra_profile or {})
        super().__init__(*args, **kwargs)

    @property
    def profile(self):
        return {**(super().profile or {}), **self._extra_profile}


def _source(url: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "can be interpreted in multiple ways" for local paths
        try:
            return resolve_dataset_source(url)
        except Exception:  # a scheme MLflow has no source type for (e.g. memory://)
            return CodeDatasetSource(tags={"uri": url})


def dataset_input(table: pa.Table, *, name: str, source: str, split: str,
                  extra_profile: dict | None = None) -> DatasetInput:
    """One MLflow dataset input: ``table``'s rows (schema, row count), digest, source, context."""
    dataset = _Dataset(table.to_pandas(), source=_source(source), name=name,
                       digest=tables.table_digest(table)[:DIGEST_CHARS], extra_profile=extra_profile)
    tags = [InputTag(MLFLOW_DATASET_CONTEXT, CONTEXT.get(split, split)), InputTag(SPLIT_TAG, split)]
    with warnings.catch_warnings():
        # MLflow's hint for model inputs (integer columns cannot hold missing values) is not about
        # a table recorded as a dataset: its schema is what was read.
        warnings.filterwarnings("ignore", message=".*integer column")
        entity = dataset._to_mlflow_entity()
    return DatasetInput(dataset=entity, tags=tags)


def _rows(table: pa.Table, column: str, value: str) -> pa.Table:
    return table.filter(pc.equal(table[column], value))


def manifest_inputs(manifest_url: str) -> list[DatasetInput]:
    """The pairs manifest as one dataset per source dataset and split."""
    manifest = tables.read_table(manifest_url, hint="the download stage (`srdiff run --stages download`)")
    out = []
    for name in sorted(set(manifest["dataset"].to_pylist())):
        rows = _rows(manifest, "dataset", name)
        for split in sorted(set(rows["split"].to_pylist())):
            out.append(dataset_input(_rows(rows, "split", split), name=name, source=manifest_url, split=split))
    return out


def dataset_names(cfg: Config) -> list[str]:
    """The source datasets the pipeline's data come from, as the manifest names them."""
    if cfg.download.source == "demo":
        return ["demo"]
    if cfg.download.source == "seed":
        return ["local"]
    return sorted(cfg.download.datasets)


def shard_inputs(cfg: Config, index_url: str, splits: tuple[str, ...]) -> list[DatasetInput]:
    """The shard index's rows of each split in ``splits`` (one row per shard; num_samples in the profile)."""
    index = tables.read_table(index_url, hint="the shard stage (`srdiff run --stages shard`)")
    name = "+".join(dataset_names(cfg)) + "-shards"
    out = []
    for split in splits:
        rows = _rows(index, "split", split)
        if rows.num_rows:
            out.append(dataset_input(rows, name=name, source=index_url, split=split,
                                     extra_profile={"num_samples": int(pc.sum(rows["count"]).as_py() or 0)}))
    return out


def stage_inputs(cfg: Config, stage: str, result: StageResult | None,
                 upstream: Mapping[str, StageResult]) -> list[DatasetInput]:
    """What stage ``stage`` read (download: the manifest it wrote, once ``result`` is known)."""
    if stage == "download":
        return manifest_inputs(result.outputs["manifest"]) if result is not None else []
    if stage == "shard" and "download" in upstream:
        return manifest_inputs(upstream["download"].outputs["manifest"])
    if stage in SHARD_SPLITS and "shard" in upstream:
        outputs = upstream["shard"].outputs
        index = outputs.get("index") or f"{outputs['shards'].rstrip('/')}/index.parquet"
        return shard_inputs(cfg, index, SHARD_SPLITS[stage])
    return []


def log_inputs(cfg: Config, run_id: str, inputs: list[DatasetInput]) -> None:
    if inputs:
        tracking.client_for(cfg).log_inputs(run_id, datasets=inputs)
