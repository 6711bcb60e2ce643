"""The stage registry: each stage of the pipeline declared once.

A :class:`Stage` names its Prefect task, the config sections its outputs depend on, the upstream
outputs it reads (as typed :class:`Output` references, bound to the task's keyword arguments),
the outputs it writes, its work pool and, for a stage that can run in several processes, its
torchrun entry point. Everything else derives from this list: the order of the `srdiff` flow,
its per-stage subflows (flows/pipeline.py), `--stages`/`--refresh` validation, the deployments
(flows/deployments.py, and the prefect.yaml consistency test) and the cache key, whose code part
is the import closure of the task module and entry point (tasks/closure.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import tasks.datasets
import tasks.download
import tasks.embed
import tasks.evaluate
import tasks.shard
import tasks.train
from tasks import closure
from flows import embed_ddp, train_ddp
from srdiff_core.config import Config
from storage import fs
from tasks.common import StageResult, stage_key


@dataclass(frozen=True)
class Output:
    """One named output of a stage: a key of its :class:`StageResult` ``outputs``."""

    stage: str
    name: str


@dataclass(frozen=True)
class Stage:
    """One pipeline stage, declared once (see the module docstring)."""

    name: str
    task: Any  # a prefect Task: task(cfg, key=..., run_id=..., **inputs[, ddp_entry=...]) -> StageResult
    sections: tuple[str, ...]  # config sections its outputs depend on (its own: upstream's enter by digest)
    outputs: tuple[str, ...]  # the keys of StageResult.outputs it writes
    pool: Literal["cpu", "gpu"]  # the work pool it belongs on (prefect.yaml)
    inputs: Mapping[str, Output] = field(default_factory=dict)  # task keyword -> the upstream output it reads
    ddp_entry: ModuleType | None = None  # torchrun entry point (-m) for <stage>.nproc > 1
    # Inputs from outside the pipeline that enter the cache key (download: the dataset catalog).
    extra_digests: Callable[[Config], dict[str, str]] | None = None

    def output(self, name: str) -> Output:
        """A reference to one of this stage's outputs, for a downstream stage's ``inputs``."""
        if name not in self.outputs:
            raise ValueError(f"stage {self.name} has no output {name!r}; it writes {', '.join(self.outputs)}")
        return Output(self.name, name)

    @property
    def upstream(self) -> tuple[str, ...]:
        """The stages whose outputs it reads, in the order of its inputs."""
        return tuple(dict.fromkeys(o.stage for o in self.inputs.values()))

    @property
    def code_roots(self) -> tuple[str, ...]:
        """The modules the stage runs from: its task's module and its torchrun entry point."""
        roots = [self.task.fn.__module__]
        if self.ddp_entry is not None:
            roots.append(self.ddp_entry.__name__)
        return tuple(roots)

    def code_digest(self) -> str:
        """Digest of every project module the stage can run (its import closure)."""
        return closure.cached_code_digest(self.code_roots)

    def upstream_digests(self, cfg: Config, results: Mapping[str, StageResult]) -> dict[str, str]:
        """The content digests its outputs depend on: each upstream stage's, and any outside input's."""
        digests = {s: results[s].digest for s in self.upstream}
        if self.extra_digests is not None:
            digests |= self.extra_digests(cfg)
        return digests

    def cache_key(self, cfg: Config, results: Mapping[str, StageResult]) -> str:
        """Upstream output digests + its config sections + its code (tasks.common.stage_key)."""
        return stage_key(self.name, cfg, self.sections, self.upstream_digests(cfg, results), self.code_digest())

    def task_inputs(self, results: Mapping[str, StageResult]) -> dict[str, Any]:
        """The task's keyword arguments beyond cfg/key/run_id: upstream output URLs and the entry point."""
        kwargs: dict[str, Any] = {param: results[o.stage].outputs[o.name] for param, o in self.inputs.items()}
        if self.ddp_entry is not None:
            kwargs["ddp_entry"] = self.ddp_entry
        return kwargs

    def check_outputs(self, result: StageResult) -> None:
        missing = [name for name in self.outputs if name not in result.outputs]
        if missing:
            raise RuntimeError(f"stage {self.name} returned no {', '.join(missing)} output(s) (it returned "
                               f"{', '.join(result.outputs) or 'none'}); flows/stages.py declares them")


def catalog_digest(cfg: Config) -> dict[str, str]:
    """The dataset catalog is a file of its own: editing a source or an expected count reruns download."""
    if cfg.download.source != "real":
        return {}
    catalog = Path(tasks.datasets.resolve_catalog(cfg.download.datasets_file))
    return {"catalog": fs.sha256_file(catalog) if catalog.exists() else "missing"}


DOWNLOAD = Stage("download", tasks.download.download, sections=("download",), outputs=("manifest", "quarantine"),
                 pool="cpu", extra_digests=catalog_digest)
SHARD = Stage("shard", tasks.shard.shard, sections=("shard",), outputs=("shards", "index"), pool="cpu",
              inputs={"manifest_url": DOWNLOAD.output("manifest")})
EMBED = Stage("embed", tasks.embed.embed, sections=("embed",),
              outputs=("embeddings", "lqcls", "gtcls", "restorecls", "srm", "srm_selection", "quarantine"), pool="gpu",
              inputs={"shards_url": SHARD.output("shards")}, ddp_entry=embed_ddp)
TRAIN = Stage("train", tasks.train.train, sections=("sde", "unet", "train"), outputs=("model", "checkpoints"),
              pool="gpu", ddp_entry=train_ddp,
              inputs={"shards_url": SHARD.output("shards"), "restorecls_url": EMBED.output("restorecls"),
                      "srm_url": EMBED.output("srm")})
EVALUATE = Stage("evaluate", tasks.evaluate.evaluate, sections=("sde", "evaluate"),
                 outputs=("report", "html", "per_image"), pool="gpu",
                 inputs={"shards_url": SHARD.output("shards"), "restorecls_url": EMBED.output("restorecls"),
                         "model_url": TRAIN.output("model")})

STAGES: tuple[Stage, ...] = (DOWNLOAD, SHARD, EMBED, TRAIN, EVALUATE)  # in pipeline order
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}


def _check_order() -> None:
    """Every stage reads only outputs of stages before it, so the list order is a run order."""
    for i, stage in enumerate(STAGES):
        late = [s for s in stage.upstream if s not in STAGE_NAMES[:i]]
        if late:
            raise RuntimeError(f"stage {stage.name} reads outputs of {late}, which do not run before it")


_check_order()


def unknown(names: list[str] | tuple[str, ...], what: str = "stage(s)") -> ValueError | None:
    bad = [s for s in names if s not in BY_NAME]
    return ValueError(f"unknown {what} {bad}; choose from {', '.join(STAGE_NAMES)}") if bad else None


def stages_to_run(names: list[str] | None) -> list[str]:
    """The selected stages and every stage before the last one (upstream comes from cache)."""
    if not names:
        return list(STAGE_NAMES)
    if (error := unknown(names)) is not None:
        raise error
    last = max(STAGE_NAMES.index(s) for s in names)
    return list(STAGE_NAMES[:last + 1])
