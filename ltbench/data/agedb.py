"""AgeDB-DIR and IMDB-WIKI-DIR: age estimation from face images as imbalanced regression (Yang et al. 2021,
"Delving into Deep Imbalanced Regression", YyzHarry/imbalanced-regression).

Split files. Each benchmark is one CSV with the header ``age,path,split`` (``split`` is train / val / test, ``path``
is relative to the image root, ``age`` a number of years): ``agedb.csv`` (AgeDB-DIR: 12,208 / 2,140 / 2,140 rows)
and ``imdb_wiki.csv`` (IMDB-WIKI-DIR: 191,509 / 11,022 / 11,022 rows, as one secondary source gives them, a
third-party README that records the official file's SHA-256; unverified here, where the file is absent, so
``check_counts`` is off by default for it). ``dataset.csv`` null: ``<root>/<file name>``, or
``<root>/dir/<file name>`` when only that exists. The images are not distributed with the split files: download
AgeDB (by request from its authors) or IMDB-WIKI (download_imdb_wiki.py in the DIR repository) yourself and point
``dataset.root`` at the folder the CSV's paths are relative to.

Validation and test are balanced over ages: per age, ``min(n // 3, cap)`` images each (cap 30 for AgeDB, 150 for
IMDB-WIKI, seed 666 in the DIR preprocessing scripts); the training set keeps the natural skew. The row order of
the CSV is the split's identity: ``train_indices`` / ``val_indices`` are row positions (0 = the first data row).

Bins: 121 one-year bins from 0 (``int(age)``, as DIR's ``_prepare_weights`` with ``max_target=121``); ages >= 120
go to the last bin. Many / medium / few shot: > 100 / 20..100 / < 20 training images in the age's bin.

Pipeline (DIR train.py): training Resize((s, s)) -> RandomCrop(s, padding=16) -> RandomHorizontalFlip -> ToTensor
-> Normalize(0.5, 0.5); evaluation Resize((s, s)) -> ToTensor -> Normalize, so inputs lie in [-1, 1].
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ltbench.config import default_data_root, runtime
from ltbench.data import DATASETS, LTData
from ltbench.data.cache import ImageCacheOptions
from ltbench.data.imagelist import SplitList, check_files
from ltbench.data.lt import array_fingerprint, split_hash
from ltbench.data.regression import RegressionDatasetConfig, bin_names, bins_of
from ltbench.errors import ConfigError, DataError

SPLITS = ("train", "val", "test")
COLUMNS = ("age", "path", "split")
DIR_MEAN = (0.5, 0.5, 0.5)
DIR_STD = (0.5, 0.5, 0.5)


@dataclass
class AgeDIRConfig(RegressionDatasetConfig, ImageCacheOptions):
    """An age-estimation DIR benchmark: one CSV split file over a folder of face images.

    Class attributes (not settings): ``csv_name``, the split file's default name; ``published``, its (train, val,
    test) row counts, checked when ``check_counts`` is true (None: nothing to check against).
    """

    inputs = "images"
    csv_name = "agedb.csv"
    published: ClassVar[tuple[int, int, int] | None] = None

    csv: str | None = runtime(None)  # the split file; null: <root>/<csv_name>, else <root>/dir/<csv_name>
    image_size: int = 224
    num_workers: int = runtime(4)  # augmentation draws do not depend on it (seeded per image)
    check_files: bool = runtime(True)  # every listed image must exist
    check_counts: bool = runtime(True)  # the split file must have the published sizes
    bin_start: float = 0.0
    bin_width: float = 1.0
    num_bins: int = 121  # DIR's max_target: ages >= 120 share the last bin

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.image_size < 1:
            raise ConfigError(f"dataset.image_size must be >= 1, got {self.image_size}")
        if self.num_workers < 0:
            raise ConfigError("dataset.num_workers must be >= 0")
        self.check_cache()


@dataclass
class AgeDBDIRConfig(AgeDIRConfig):
    """AgeDB-DIR: 12,208 / 2,140 / 2,140 images (agedb.csv, DIR commit a6fdc45; sizes checked on the file)."""

    csv_name = "agedb.csv"
    published: ClassVar[tuple[int, int, int] | None] = (12_208, 2_140, 2_140)

    name: str = "agedb_dir"


@dataclass
class IMDBWikiDIRConfig(AgeDIRConfig):
    """IMDB-WIKI-DIR: imdb_wiki.csv. The published sizes (191,509 / 11,022 / 11,022) come from a secondary source
    and were not checked on the file here, so ``check_counts`` is off by default."""

    csv_name = "imdb_wiki.csv"
    published: ClassVar[tuple[int, int, int] | None] = (191_509, 11_022, 11_022)

    name: str = "imdbwiki_dir"
    check_counts: bool = runtime(False)


@dataclass
class AgeRows:
    """The rows of a split file, in file order: ``paths`` relative to the image root, ``ages`` (float64, finite,
    >= 0) and ``splits`` (each one of train / val / test). No path belongs to two splits."""

    paths: list[str]
    ages: np.ndarray
    splits: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)

    def rows_of(self, which: str) -> np.ndarray:
        """Row positions (int64, increasing) of one split."""
        return np.nonzero(self.splits == which)[0].astype(np.int64)


def _parse_row(path: Path, line: int, row: list[str], pos: list[int], width: int) -> tuple[float, str, str]:
    """(age, image path, split) of one data row; a DataError naming the file and line otherwise."""
    where = f"{path}:{line}"
    if len(row) != width:
        raise DataError(f"{where}: expected {width} comma-separated fields, got {len(row)}: {','.join(row)!r}")
    text, rel, split = (row[i].strip() for i in pos)
    try:
        age = float(text)
    except ValueError:
        raise DataError(f"{where}: age {text!r} is not a number") from None
    if not math.isfinite(age) or age < 0:
        raise DataError(f"{where}: age {text!r} must be a finite number >= 0")
    if not rel:
        raise DataError(f"{where}: the image path is empty")
    if split not in SPLITS:
        raise DataError(f"{where}: split {split!r} must be one of {', '.join(SPLITS)}")
    return age, rel, split


def read_age_csv(path: str | Path) -> AgeRows:
    """A DIR split file (header naming age, path and split, in any order; blank lines skipped). Every problem is a
    one-line DataError naming the file and its line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"split file {path} not found")
    paths: list[str] = []
    ages: list[float] = []
    splits: list[str] = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        if not all(c in header for c in COLUMNS):
            raise DataError(f"{path}:1: the header must name the columns {','.join(COLUMNS)}, got {','.join(header)!r}")
        pos = [header.index(c) for c in COLUMNS]
        seen: dict[str, str] = {}
        for row in reader:
            if not any(c.strip() for c in row):
                continue
            age, rel, split = _parse_row(path, reader.line_num, row, pos, len(header))
            if seen.setdefault(rel, split) != split:
                raise DataError(f"{path}:{reader.line_num}: {rel} is in both the {seen[rel]} and the {split} split")
            paths.append(rel)
            ages.append(age)
            splits.append(split)
    rows = AgeRows(paths, np.asarray(ages, dtype=np.float64), np.asarray(splits, dtype=object))
    for which in SPLITS:
        if not len(rows.rows_of(which)):
            raise DataError(f"{path} has no {which} rows")
    return rows


def split_file(cfg: AgeDIRConfig, root: Path) -> Path:
    """The split file a config names: dataset.csv, else <root>/<csv_name>, else <root>/dir/<csv_name>."""
    if cfg.csv:
        return Path(cfg.csv).expanduser()
    direct, nested = root / cfg.csv_name, root / "dir" / cfg.csv_name
    if not direct.is_file() and nested.is_file():
        return nested
    if not direct.is_file():
        raise DataError(f"{cfg.name}: split file {cfg.csv_name} not found in {root} or {root / 'dir'} (dataset.csv)")
    return direct


def count_problems(cfg: AgeDIRConfig, rows: AgeRows) -> list[str]:
    """Differences between a split file's sizes and the published ones (empty when they match or none are known)."""
    if cfg.published is None:
        return []
    problems = []
    for which, expected in zip(SPLITS, cfg.published):
        n = len(rows.rows_of(which))
        if n != expected:
            problems.append(f"{which}: {n:,} rows, the published split has {expected:,}")
    return problems


def dir_transforms(size: int) -> tuple[Any, Any, Any]:
    """(train, eval, raw) pipelines on PIL images. train/eval are DIR's train.py: float32 [3, size, size] tensors in
    [-1, 1]; raw is the uint8 resized image, the input of methods that make their own views."""
    from torchvision.transforms import v2

    tail = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(DIR_MEAN, DIR_STD)]
    resize = v2.Resize((size, size), antialias=True)
    train = v2.Compose([resize, v2.RandomCrop(size, padding=16), v2.RandomHorizontalFlip(), *tail])
    return train, v2.Compose([resize, *tail]), v2.Compose([resize, v2.ToImage()])


def _path_bytes(paths: list[str]) -> np.ndarray:
    return np.frombuffer("\0".join(paths).encode("utf-8"), dtype=np.uint8)


def _age_dir(cfg: AgeDIRConfig, workdir: Path, holdout: bool = False) -> LTData:
    """AgeDB-DIR / IMDB-WIKI-DIR from the published split file (``holdout`` is ignored: validation is published).

    Targets are float32 ages; ``class_counts`` are training images per 1-year bin; the row positions of the CSV are
    the train / val indices; split_hash and data_fingerprint cover the listed paths and ages (not image bytes).
    """
    root = Path(cfg.root or default_data_root()).expanduser()
    csv_path = split_file(cfg, root)
    rows = read_age_csv(csv_path)
    problems = count_problems(cfg, rows)
    if problems and cfg.check_counts:
        raise DataError(
            f"{cfg.name} split file {csv_path} differs from the published one: "
            + "; ".join(problems)
            + " (dataset.check_counts=false accepts it)"
        )
    idx = {w: rows.rows_of(w) for w in SPLITS}
    files = {w: [rows.paths[i] for i in idx[w]] for w in SPLITS}
    ages = {w: rows.ages[idx[w]] for w in SPLITS}
    if cfg.check_files:
        for w in SPLITS:
            check_files(root, SplitList(files[w], ages[w]), w)
    y = {w: torch.as_tensor(ages[w].astype(np.float32)) for w in SPLITS}
    counts = np.bincount(bins_of(cfg, ages["train"]), minlength=cfg.num_bins)
    return LTData(
        name=cfg.name,
        kind="files",
        train_y=y["train"],
        val_y=y["val"],
        test_y=y["test"],
        train_indices=idx["train"],
        val_indices=idx["val"],
        class_counts=[int(c) for c in counts],
        class_names=bin_names(cfg),
        mean=DIR_MEAN,
        std=DIR_STD,
        split_hash=split_hash(idx["train"], np.round(ages["train"] * 1e4).astype(np.int64)),
        data_fingerprint=array_fingerprint(*(_path_bytes(files[w]) for w in SPLITS), *(y[w].numpy() for w in SPLITS)),
        root=str(root.resolve()),
        train_files=files["train"],
        val_files=files["val"],
        test_files=files["test"],
        split_files={"csv": str(csv_path)},
        bin_start=cfg.bin_start,
        bin_width=cfg.bin_width,
        transforms=dir_transforms(cfg.image_size),
        image_recipe="dir",
    )


DATASETS.register("agedb_dir", AgeDBDIRConfig)(_age_dir)
DATASETS.register("imdbwiki_dir", IMDBWikiDIRConfig)(_age_dir)
