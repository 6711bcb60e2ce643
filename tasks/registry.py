"""The MLflow model registry: each train run's model as a logged pyfunc model and a registered version.

The train stage's run gets an MLflow model (the ``pyfunc`` flavour of tasks/pyfunc_model.py, with a
signature and an input example; model.pt stays a plain run artifact too) and a new version of the
registered model ``tracking.registered_model`` (default ``srdiff``), tagged with what tells two
versions apart: conditioning, UNet layout, CLIP weights, the stage's cache key. A train stage
reused from cache registers nothing: its version is the one its first run registered. The
evaluate stage writes its headline metrics onto that version (tags and description).
``srdiff restore --checkpoint models:/srdiff/<version>`` (or ``models:/srdiff@<alias>``) restores
with a registered version; ``srdiff promote <version> --alias champion`` sets an alias.

Everything goes through an explicit ``MlflowClient`` (tasks/tracking.py), never the fluent active
run or a global tracking URI, as the rest of the tracking code does.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import mlflow
import mlflow.pyfunc
import numpy as np
from mlflow.entities import LoggedModelOutput, LoggedModelStatus
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

from srdiff_core.config import Config
from tasks import tracking
from tasks.common import StageResult
from tasks.pyfunc_model import MODEL_ARTIFACT, RestorerModel

MODEL_VERSION_TAG = "srdiff.model_version"  # on the train run: "<registered model>/<version>"
MODEL_URI_TAG = "srdiff.model_uri"  # on the train run: models:/<registered model>/<version>
# The logged model's name: not "model", the run artifact folder of model.pt (MLflow resolves a run
# artifact path whose first part names a logged model of the run as that model's artifacts).
LOGGED_MODEL_NAME = "srdiff-restorer"
MODEL_TYPE = "srdiff-restorer"
# What the pyfunc needs beyond the Python standard library (the srdiff package brings the rest).
REQUIREMENTS = ("srdiff", "mlflow", "torch", "torchvision", "open_clip_torch", "numpy")
HEADLINE = ("psnr", "ssim", "psnr_y", "lpips", "lq_psnr", "lq_ssim")


class RegistryError(ValueError):
    """A models:/ URI or version the registry does not hold; the message names what it does."""


def signature(cfg: Config) -> ModelSignature:
    """One RGB uint8 image HxWx3 in, the restored one out; sampling settings as params."""
    image = Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, 3))])
    e = cfg.evaluate
    params = ParamSchema([ParamSpec("steps", "long", e.steps), ParamSpec("seed", "long", e.seed),
                          ParamSpec("clip_x0", "boolean", e.clip_x0), ParamSpec("tile_size", "long", e.tile_size)])
    return ModelSignature(inputs=image, outputs=image, params=params)


def input_example(size: int = 32) -> np.ndarray:
    """A small RGB uint8 image (a colour ramp): what predict takes."""
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    return np.stack([ramp[None, :].repeat(size, 0), ramp[:, None].repeat(size, 1),
                     np.full((size, size), 128, np.float32)], axis=-1).astype(np.uint8)


def pip_requirements() -> list[str]:
    out = []
    for pkg in REQUIREMENTS:
        try:
            out.append(f"{pkg}=={metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            out.append(pkg)
    return out


def python_model(cfg: Config) -> RestorerModel:
    e = cfg.evaluate
    return RestorerModel(steps=e.steps, seed=e.seed, clip_x0=e.clip_x0, tile_size=e.tile_size,
                         tile_overlap=e.tile_overlap)


def version_tags(cfg: Config, run_id: str, key: str) -> dict[str, str]:
    """What tells two versions apart: conditioning, layout, CLIP weights, the train stage's key."""
    return {**tracking.unet_tags(cfg), **tracking.clip_weights_tags(cfg), "clip.arch": cfg.embed.arch,
            "sde.max_sigma": str(cfg.sde.max_sigma), "train.steps": str(cfg.train.steps),
            "srdiff.config": cfg.name, "srdiff.cache_key": key, "srdiff.train_run": run_id}


def log_model(cfg: Config, run_id: str, model_path: str | Path, *, tags: dict[str, str]):
    """Log ``model_path`` (a model.pt) to run ``run_id`` as an MLflow pyfunc model; returns the
    LoggedModel. What ``mlflow.pyfunc.log_model`` does, through the explicit client."""
    client = tracking.client_for(cfg)
    run = client.get_run(run_id)
    model = client.create_logged_model(run.info.experiment_id, name=LOGGED_MODEL_NAME, source_run_id=run_id,
                                       tags=tags, params={k: v[:6000] for k, v in run.data.params.items()},
                                       model_type=MODEL_TYPE)
    try:
        with tempfile.TemporaryDirectory(prefix="srdiff-pyfunc-") as tmp:
            local = Path(tmp) / "model"
            description = Model(artifact_path=model.artifact_location, run_id=run_id, model_id=model.model_id,
                                model_uuid=model.model_id)
            with _quiet_save():
                mlflow.pyfunc.save_model(str(local), mlflow_model=description, python_model=python_model(cfg),
                                         artifacts={MODEL_ARTIFACT: str(model_path)}, signature=signature(cfg),
                                         input_example=input_example(), pip_requirements=pip_requirements())
            client.log_model_artifacts(model.model_id, str(local))
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
    except BaseException:
        client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        raise
    return client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)


@contextmanager
def _quiet_save():
    """Without MLflow's advice for other kinds of model, printed on every save: type hints on predict
    (our signature is explicit) and models-from-code (the pickled object is an instance of an
    importable class of the installed srdiff package, pickled by reference)."""
    pyfunc_log = logging.getLogger("mlflow.pyfunc")
    level = pyfunc_log.level
    pyfunc_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*type hints.*")
            yield
    finally:
        pyfunc_log.setLevel(level)


def _create_registered_model(client, name: str) -> None:
    try:
        client.create_registered_model(name, description="SR-Diff restoration models (semantic-guided IR-SDE): one "
                                                          "version per train run of the srdiff pipeline")
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise


def register(cfg: Config, run_id: str, model, *, tags: dict[str, str]) -> ModelVersion:
    """A new version of ``tracking.registered_model`` for the logged model of train run ``run_id``;
    the run records it (tags srdiff.model_version and srdiff.model_uri)."""
    client = tracking.client_for(cfg)
    name = cfg.tracking.registered_model
    _create_registered_model(client, name)
    # source: the logged model's artifact location, not models:/<model_id>: MLflow's SQL registry
    # store resolves the latter through the global tracking URI, not this client's.
    version = client.create_model_version(
        name, source=model.artifact_location, run_id=run_id, model_id=model.model_id, tags=tags,
        description=f"Trained by MLflow run {run_id} ({cfg.name}, conditioning {cfg.unet.conditioning}, "
                    f"layout {cfg.unet.layout}, CLIP {cfg.embed.arch} {cfg.embed.pretrained}); the evaluate "
                    f"stage adds its metrics here.")
    tracking.set_tags(cfg, run_id, {MODEL_VERSION_TAG: f"{name}/{version.version}",
                                    MODEL_URI_TAG: f"models:/{name}/{version.version}"})
    return version


def log_and_register(cfg: Config, run_id: str, result: StageResult) -> ModelVersion | None:
    """The train stage's hook: its model.pt as a logged pyfunc model and, with
    tracking.register_model, a new registered version."""
    tags = version_tags(cfg, run_id, result.key)
    model = log_model(cfg, run_id, result.outputs["model"], tags=tags)
    return register(cfg, run_id, model, tags=tags) if cfg.tracking.register_model else None


# ---------------------------------------------------------------- evaluate: metrics on the version


def version_of_run(cfg: Config, train_run_id: str | None) -> tuple[str, str] | None:
    """(registered model, version) a train run registered, or None (registration off, or older)."""
    if not train_run_id:
        return None
    ref = tracking.client_for(cfg).get_run(train_run_id).data.tags.get(MODEL_VERSION_TAG)
    if not ref or "/" not in ref:
        return None
    name, version = ref.rsplit("/", 1)
    return name, version


def evaluation_description(metrics: dict[str, float], eval_run_id: str, url: str) -> str:
    """Markdown for the version's description: PSNR/SSIM per degradation against the LQ input."""
    degs = sorted({k.split("/")[1] for k in metrics if k.startswith("eval/") and k.count("/") == 2} - {"all"})
    lines = [f"Evaluated by MLflow run [{eval_run_id}]({url}) (one seeded sample per image).", "",
             "| degradation | images | LQ PSNR | PSNR | LQ SSIM | SSIM |", "|---|---|---|---|---|---|"]
    for deg in [*degs, "all"]:
        g = lambda m, p=2: "n/a" if f"eval/{deg}/{m}" not in metrics else f"{metrics[f'eval/{deg}/{m}']:.{p}f}"  # noqa: E731
        lines.append(f"| {deg} | {g('images', 0)} | {g('lq_psnr')} | {g('psnr')} | {g('lq_ssim', 4)} | {g('ssim', 4)} |")
    return "\n".join(lines)


def record_evaluation(cfg: Config, train_run_id: str | None, eval_run_id: str,
                      metrics: dict[str, float]) -> tuple[str, str] | None:
    """The evaluate stage's hook: its headline metrics (eval/<degradation>/<metric>) as tags of the
    version the evaluated model was registered as, and a per-degradation table as its description."""
    found = version_of_run(cfg, train_run_id)
    if found is None:
        return None
    name, version = found
    client = tracking.client_for(cfg)
    for key, value in sorted(metrics.items()):
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "eval" and parts[2] in HEADLINE:
            client.set_model_version_tag(name, version, key, f"{value:.4f}")
    client.set_model_version_tag(name, version, "srdiff.evaluate_run", eval_run_id)
    client.update_model_version(name, version, description=evaluation_description(
        metrics, eval_run_id, tracking.run_url(cfg, eval_run_id)))
    return name, version


# ---------------------------------------------------------------- models:/ URIs, aliases


def is_model_uri(checkpoint: str) -> bool:
    return checkpoint.startswith("models:/")


def _known_versions(client, name: str) -> str:
    try:
        versions = sorted((str(v.version) for v in client.search_model_versions(f"name = '{name}'")), key=int)
        aliases = client.get_registered_model(name).aliases
    except MlflowException:
        return f"the registry has no model {name!r}"
    alias_text = ", ".join(f"@{a} -> {v}" for a, v in sorted(aliases.items())) or "none"
    return f"registered model {name!r} has versions {', '.join(versions) or 'none'} (aliases: {alias_text})"


def _parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """models:/<name>/<version> or models:/<name>@<alias> -> (name, version, alias)."""
    rest = uri.removeprefix("models:/").strip("/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return name, None, alias
    name, _, version = rest.partition("/")
    return name, version or None, None


def download_model_file(cfg: Config, uri: str, dst: str | Path) -> Path:
    """The model.pt of registered model version ``uri`` (models:/<name>/<version> or
    models:/<name>@<alias>), downloaded into ``dst``. A RegistryError names the versions there are.
    Resolved through this config's client (MLflow's own models:/ resolution reads the global
    registry URI), then downloaded from the version's artifact location."""
    from mlflow.artifacts import download_artifacts

    store = tracking.tracking_uri(cfg)
    client = tracking.client_for(cfg)
    name, version, alias = _parse_model_uri(uri)
    if not name or not (version or alias):
        raise RegistryError(f"{uri} is not a registered model URI: pass models:/<name>/<version> or "
                            f"models:/<name>@<alias>, e.g. models:/{cfg.tracking.registered_model}/1")
    try:
        found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
        source = client.get_model_version_download_uri(name, found.version)
    except MlflowException as e:
        raise RegistryError(f"{uri} is not in the model registry of {store}: {_known_versions(client, name)}; "
                            f"pass the --config (and --set) of the pipeline that registered it, e.g. --config "
                            f"configs/demo.yaml for the demo's models") from e
    local = download_artifacts(artifact_uri=source, dst_path=str(dst), tracking_uri=store)
    flavor = Model.load(local).flavors.get("python_function", {})
    relative = flavor.get("artifacts", {}).get(MODEL_ARTIFACT, {}).get("path")
    if relative is None or not (Path(local) / relative).is_file():
        raise RegistryError(f"{uri} is not an srdiff model (no {MODEL_ARTIFACT!r} artifact in its pyfunc flavour): "
                            f"register models with the srdiff train stage")
    return Path(local) / relative


def promote(cfg: Config, version: str, alias: str, name: str | None = None) -> ModelVersion:
    """Point alias ``alias`` (e.g. champion) of the registered model at ``version``."""
    name = name or cfg.tracking.registered_model
    client = tracking.client_for(cfg)
    try:
        found = client.get_model_version(name, str(version))
    except MlflowException as e:
        raise RegistryError(f"no version {version} of {name!r} in {tracking.tracking_uri(cfg)}: "
                            f"{_known_versions(client, name)}") from e
    try:
        client.set_registered_model_alias(name, alias, found.version)
    except MlflowException as e:
        raise RegistryError(f"cannot set alias {alias!r}: {e.message}") from e
    return found
