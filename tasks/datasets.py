"""The four benchmark datasets: where to get them (``configs/datasets.yaml``, typed here) and how
their files pair up (one layout rule per dataset).

A layout rule reads a file's path *from the end* (split folder, side folder, name), so wrapper
folders of any depth (``GOPRO_Large/``, ``lol_dataset/``) are found, not assumed. Pairs are
joined by an explicit id parsed from the path, never by sorted order.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from srdiff_core.config import DEGRADATIONS, ConfigError, read_yaml_mapping

Side = Literal["LQ", "GT"]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# Where a user reads how to use a catalog of their own (messages point here, never at the
# repository's configs/datasets.yaml, which an installed copy should not need edited).
OWN_COPIES_DOC = "docs/datasets.md, 'Your own copies and mirrors'"
# Dataset names key MLflow metrics (dataset/<name>/train), sample ids and file names.
DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def sha256_text(value: object) -> object:
    """A catalog sha256 as the 64-digit string it was written as. Unquoted in YAML, one made of
    digits only is read as an integer (in octal when it starts with 0 and has no 8 or 9)."""
    if isinstance(value, bool) or not isinstance(value, int):
        return value.strip().lower() if isinstance(value, str) else value
    decimal = str(value)
    # A decimal YAML integer never starts with 0, so its 64 digits come back whole; an octal one
    # lost its leading zeros, which zfill restores.
    return decimal if len(decimal) == 64 else format(value, "o").zfill(64)


class Source(BaseModel):
    """One place a dataset file can come from. ``endpoint`` points a Drive/Hub source at a
    compatible server (a proxy or mirror); ``sha256`` is the digest of what this source serves."""
    model_config = ConfigDict(extra="forbid")
    kind: Literal["http", "gdrive", "gdrive-folder", "hf-file", "hf-dataset"]
    url: str | None = None
    id: str | None = None
    repo: str | None = None
    filename: str | None = None
    revision: str | None = None
    endpoint: str | None = None
    sha256: str | None = None

    @field_validator("sha256", mode="before")
    @classmethod
    def _sha256_string(cls, value: object) -> object:
        value = sha256_text(value)
        if isinstance(value, str) and not _SHA256.fullmatch(value):
            raise ValueError(f"sha256 {value!r} is not 64 hexadecimal digits (the output of sha256sum)")
        return value

    @model_validator(mode="after")
    def _needs(self) -> Source:
        need = {"http": ("url",), "gdrive": ("id",), "gdrive-folder": ("id",),
                "hf-file": ("repo", "filename"), "hf-dataset": ("repo",)}[self.kind]
        missing = [f for f in need if getattr(self, f) is None]
        if missing:
            raise ValueError(f"a {self.kind} source needs {', '.join(missing)}")
        return self

    def describe(self) -> str:
        what = {"http": self.url, "gdrive": f"Google Drive file {self.id}",
                "gdrive-folder": f"Google Drive folder {self.id}",
                "hf-file": f"Hugging Face {self.repo}/{self.filename}", "hf-dataset": f"Hugging Face {self.repo}"}
        return what[self.kind]


class DatasetFile(BaseModel):
    """One archive (or folder) of a dataset, with the sources to try in order."""
    model_config = ConfigDict(extra="forbid")
    name: str
    sources: list[Source] = []


class DatasetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    degradation: str
    layout: Literal["gopro", "reside6k", "rain100h", "lol"]
    expected: dict[Literal["train", "val"], int]
    files: list[DatasetFile]

    @model_validator(mode="after")
    def _known_degradation(self) -> DatasetSpec:
        if self.degradation not in DEGRADATIONS:
            raise ValueError(f"degradation {self.degradation!r} is not one of {DEGRADATIONS}")
        return self


class CatalogError(ConfigError):
    """The dataset catalog (download.datasets_file) is missing or invalid: a config error."""


def resolve_catalog(path: str) -> str:
    """A relative catalog path is looked up in the working directory, then in the project. A
    leading ~ is expanded (a shell leaves it in `--set download.datasets_file=~/...`)."""
    path = str(Path(path).expanduser())
    if Path(path).is_absolute() or Path(path).exists():
        return path
    packaged = Path(__file__).resolve().parents[1] / path
    return str(packaged) if packaged.exists() else path


def load_catalog(path: str | Path) -> dict[str, DatasetSpec]:
    raw = read_yaml_mapping(Path(path), what="dataset catalog", error=CatalogError,
                            missing=f"set download.datasets_file to a catalog file (written like "
                                    f"configs/datasets.yaml; see {OWN_COPIES_DOC})")
    bad = [name for name in raw if not (isinstance(name, str) and DATASET_NAME.fullmatch(name))]
    if bad:
        raise CatalogError(f"dataset catalog {path}: dataset name(s) {bad} must be letters, digits, '_' and '-' "
                           "(they name MLflow metrics, sample ids and files)")
    try:
        return {name: DatasetSpec.model_validate(spec) for name, spec in raw.items()}
    except ValueError as e:
        raise CatalogError(f"{path}: {e}") from e


# --- layout rules: path parts (relative, any depth) -> (split, native id, side) -------------------

@dataclass(frozen=True)
class Member:
    split: str
    native_id: str
    side: Side


def _image(parts: tuple[str, ...]) -> bool:
    return bool(parts) and PurePath(parts[-1]).suffix.lower() in IMAGE_SUFFIXES


def _stem(name: str) -> str:
    return PurePath(name).stem


def parse_gopro(parts: tuple[str, ...], lq_folder: str = "blur") -> Member | None:
    """``{train,test}/GOPRxxxx_xx_xx/{blur,blur_gamma,sharp}/NNNNNN.png``; id ``<scene>_<frame>``."""
    if len(parts) < 4 or not _image(parts):
        return None
    split, scene, folder, name = parts[-4:]
    if split not in ("train", "test") or folder not in (lq_folder, "sharp"):
        return None
    return Member("train" if split == "train" else "val", f"{scene}_{_stem(name)}",
                  "GT" if folder == "sharp" else "LQ")


def _split_side_name(parts: tuple[str, ...], splits: dict[str, str], sides: dict[str, str]) -> Member | None:
    """``<split>/<side>/<name>`` with the same name (stem) on both sides; ``splits`` and ``sides``
    map the dataset's folder names to ours (train/val, LQ/GT)."""
    if len(parts) < 3 or not _image(parts):
        return None
    split, side, name = parts[-3:]
    if split not in splits or side not in sides:
        return None
    return Member(splits[split], _stem(name), sides[side])


def parse_reside6k(parts: tuple[str, ...], **_) -> Member | None:
    """``{train,test}/{hazy,GT}/<name>``."""
    return _split_side_name(parts, {"train": "train", "test": "val"}, {"hazy": "LQ", "GT": "GT"})


_RAIN = re.compile(r"(no)?rain-(\d+)", re.IGNORECASE)


def parse_rain100h(parts: tuple[str, ...], **_) -> Member | None:
    """``rain-N.png`` (LQ) / ``norain-N.png`` (GT), flat or with the LQ side in a ``rainy``
    folder; RainTrainH (or a ``train`` folder) is the train set, Rain100H (or a ``test`` folder)
    the test set: the folder or archive name nearest to the file decides; without one, train."""
    if not _image(parts):
        return None
    m = _RAIN.fullmatch(_stem(parts[-1]))
    if not m:
        return None
    return Member(_rain_split(parts[:-1]), m.group(2), "GT" if m.group(1) else "LQ")


# Folder names that say the split on their own: a renamed copy (myrain/{train,test}/...) keeps them.
_SPLIT_FOLDERS = {"train": "train", "training": "train", "test": "val", "testing": "val", "val": "val"}


def _rain_split(folders: tuple[str, ...]) -> str:
    for folder in map(str.lower, reversed(folders)):
        if "raintrainh" in folder:
            return "train"
        if "rain100h" in folder:
            return "val"
        if folder in _SPLIT_FOLDERS:
            return _SPLIT_FOLDERS[folder]
    return "train"


def parse_lol(parts: tuple[str, ...], **_) -> Member | None:
    """``{our485,eval15}/{low,high}/N.png``."""
    return _split_side_name(parts, {"our485": "train", "eval15": "val"}, {"low": "LQ", "high": "GT"})


LAYOUTS: dict[str, Callable[..., Member | None]] = {
    "gopro": parse_gopro, "reside6k": parse_reside6k, "rain100h": parse_rain100h, "lol": parse_lol}


def sample_id(dataset: str, split: str, native_id: str) -> str:
    """Ids key every table downstream and must be unique over all datasets and splits (LOL's
    ``1.png`` and Rain100H's ``rain-1.png`` would collide), so they carry both."""
    return f"{dataset}-{split}-{native_id}"


@dataclass(frozen=True)
class RawPair:
    split: str
    native_id: str
    lq: Path | None
    gt: Path | None


@dataclass(frozen=True)
class Rejected:
    split: str
    native_id: str
    path: Path
    reason: str


def find_pairs(layout: str, files: Iterable[tuple[Path, tuple[str, ...]]], **options) -> tuple[list[RawPair], list[Rejected]]:
    """Join LQ and GT files by (split, native id). ``files`` yields (path, parts relative to the
    extraction root). Unpartnered files and ids seen twice are rejected with the reason."""
    parse = LAYOUTS[layout]
    sides: dict[tuple[str, str], dict[str, list[Path]]] = defaultdict(lambda: {"LQ": [], "GT": []})
    for path, parts in files:
        member = parse(parts, **options)
        if member is not None:
            sides[(member.split, member.native_id)][member.side].append(path)
    pairs, rejected = [], []
    for (split, native_id), found in sorted(sides.items()):
        lq, gt = found["LQ"], found["GT"]
        if len(lq) > 1 or len(gt) > 1:
            dup = (lq if len(lq) > 1 else gt)
            rejected.append(Rejected(split, native_id, dup[1], f"duplicate id: {len(dup)} files "
                                     f"({', '.join(str(p) for p in dup[:3])})"))
        elif not lq or not gt:
            rejected.append(Rejected(split, native_id, (lq or gt)[0], f"missing {'GT' if not gt else 'LQ'} partner"))
        else:
            pairs.append(RawPair(split, native_id, lq[0], gt[0]))
    return pairs, rejected


def matching_layouts(names: Iterable[str]) -> list[str]:
    """The layouts that recognise at least one file among ``names`` (archive members or
    relative paths): used to tell which dataset a bare ``--from PATH`` holds."""
    hits = {layout: 0 for layout in LAYOUTS}
    for name in names:
        parts = PurePath(name.replace("\\", "/")).parts
        for layout, parse in LAYOUTS.items():
            if parse(parts) is not None:
                hits[layout] += 1
    return [layout for layout, n in sorted(hits.items(), key=lambda kv: -kv[1]) if n]
