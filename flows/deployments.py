"""Deployments of the `srdiff` flow: `full-pipeline` and one per stage, served from one process."""

from __future__ import annotations

from prefect import serve

from flows.pipeline import srdiff
from flows.stages import STAGE_NAMES


def deployments(config_path: str, overrides: list[str] | None = None) -> list:
    """`srdiff/full-pipeline` runs everything; `srdiff/<stage>` recomputes that stage (its
    upstream stages come from the cache, and are computed only if never run)."""
    base = {"config_path": config_path, "overrides": overrides or []}
    out = [srdiff.to_deployment(name="full-pipeline", parameters=base,
                                description=" -> ".join(STAGE_NAMES))]
    for stage in STAGE_NAMES:
        out.append(srdiff.to_deployment(name=stage, parameters={**base, "stages": [stage], "refresh": [stage]},
                                        description=f"rerun the {stage} stage (upstream from cache)"))
    return out


def serve_all(config_path: str, overrides: list[str] | None = None) -> None:
    serve(*deployments(config_path, overrides))
