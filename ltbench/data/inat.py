"""iNaturalist 2018 (Van Horn et al. 2018) as the long-tail benchmark of facebookresearch/classifier-balancing.

Lists. The benchmark's lists are ``iNaturalist18_train.txt`` (437,513 images, 8,142 classes, 1000 down to 2 per
class) and ``iNaturalist18_val.txt`` (24,426 images, 3 per class), lines ``train_val2018/<super>/<id>/<f>.jpg
<label>``, made by classifier-balancing's ``data/iNaturalist18/gen_lists.py`` from the official ``train2018.json``
/ ``val2018.json``: one line per entry of ``images`` in file order, its ``file_name`` and the ``category_id`` of
its annotation (the script pairs ``images[i]`` with ``annotations[i]`` and asserts equal ids;
:func:`json_to_list` looks the annotation up by ``image_id`` and refuses an image without exactly one).
:func:`write_lists` also writes ``iNaturalist18_categories.json`` (id, name, supercategory of every official
category, by id): the class names (``LTData.class_names``) that text-prompted models need.

Splits. The val list is the literature's *test* set. Model selection never looks at it: with ``holdout`` (a method
selects on validation, or ``dataset.val_holdout=true``) ltbench holds ``val_per_class`` images of every class out
of the training list (default 1, balanced since every class has at least 2), chosen by a seeded per-class shuffle
(``dataset.split_seed``; ``ltbench.data.lt.lt_split`` then ``hold_out``, which always leaves a class one training
image) and recorded (``val_indices``: rows of the train list; ``val_moved``). Without it every listed training
image trains and the validation split is empty. Groups: > 100 / 20-100 / < 20 training images.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ltbench.config import default_data_root, runtime
from ltbench.data import DATASETS, LTData
from ltbench.data.imagelist import Expected, SplitList, check_counts, read_split_list, write_split_list
from ltbench.data.lists import ImageFilesConfig, files_data
from ltbench.data.lt import hold_out, lt_split
from ltbench.errors import DataError

TRAIN_LIST, TEST_LIST = "iNaturalist18_train.txt", "iNaturalist18_val.txt"
CATEGORIES = "iNaturalist18_categories.json"
EXPECTED_INAT18 = Expected(8142, 437_513, 1000, 2, 3, 3)


@dataclass
class Inat18Config(ImageFilesConfig):
    """iNaturalist 2018 from the published lists (``split_dir``, default root; paths relative to root)."""

    name: str = "inat18"
    num_classes: int = 8142
    imbalance_ratio: float | None = None
    val_per_class: int = 1
    split_dir: str | None = runtime(None)
    check_counts: bool = runtime(True)  # the lists must have the published sizes


def json_to_list(json_path: str | Path) -> tuple[SplitList, list[dict]]:
    """An official iNaturalist json -> (the list of gen_lists.py, the categories sorted by id)."""
    path = Path(json_path)
    try:
        data = json.loads(path.read_text())
        images, annotations = data["images"], data["annotations"]
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{path}: not an iNaturalist json with images and annotations ({e})") from None
    try:
        by_image: dict[int, list[int]] = {}
        for a in annotations:
            by_image.setdefault(a["image_id"], []).append(int(a["category_id"]))
        paths, labels = [], []
        for img in images:
            found = by_image.get(img["id"], [])
            if len(found) != 1:
                raise DataError(f"{path}: image {img['id']} ({img['file_name']}) has {len(found)} annotations, "
                                "expected 1")  # fmt: skip
            paths.append(img["file_name"])
            labels.append(found[0])
        cats = sorted(({"id": int(c["id"]), "name": c["name"], "supercategory": c.get("supercategory", "")}
                       for c in data.get("categories", [])), key=lambda c: c["id"])  # fmt: skip
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise DataError(f"{path}: not an iNaturalist json in the official format ({type(e).__name__}: {e})") from None
    return SplitList(paths, np.asarray(labels, dtype=np.int64)), cats


def write_lists(train_json: str | Path, val_json: str | Path | None, out: str | Path) -> dict[str, int]:
    """Write iNaturalist18_train.txt (and _val.txt) and the categories file into ``out``; returns the line counts."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train, cats = json_to_list(train_json)
    write_split_list(out / TRAIN_LIST, train)
    sizes = {TRAIN_LIST: len(train)}
    if val_json is not None:
        val, _ = json_to_list(val_json)
        write_split_list(out / TEST_LIST, val)
        sizes[TEST_LIST] = len(val)
    if cats:
        (out / CATEGORIES).write_text(json.dumps(cats, indent=0))
    return sizes


def class_names(split_dir: Path, num_classes: int) -> list[str]:
    """Official category names by label (from the categories file), else the label numbers."""
    f = split_dir / CATEGORIES
    if not f.exists():
        return [str(i) for i in range(num_classes)]
    names = {int(c["id"]): c["name"] for c in json.loads(f.read_text())}
    return [names.get(i, str(i)) for i in range(num_classes)]


def _check(cfg: Inat18Config, split_dir: Path, train: SplitList, test: SplitList) -> None:
    problems = check_counts(cfg.name, "train", train, EXPECTED_INAT18) + check_counts(
        cfg.name, "test", test, EXPECTED_INAT18
    )
    if problems and cfg.check_counts:
        raise DataError(
            f"{cfg.name} lists in {split_dir} differ from the published ones: "
            + "; ".join(problems)
            + " (dataset.check_counts=false accepts them)"
        )


def holdout_split(labels: np.ndarray, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(train rows sorted, validation rows grouped by class, moved per class): ``per_class`` seeded images of every
    class held out of a list, at least one kept per class."""
    counts = np.bincount(labels)
    present = [int(c) for c in counts if c > 0]
    order, _ = lt_split(labels, present, seed, 0)  # every row, shuffled within its class (seeded)
    kept, val, moved = hold_out(order, np.empty(0, dtype=np.int64), labels, per_class)
    return np.sort(kept), val, moved


def _inat18(cfg: Inat18Config, workdir: Path, holdout: bool = False) -> LTData:
    root = Path(cfg.root or default_data_root()).expanduser()
    split_dir = Path(cfg.split_dir).expanduser() if cfg.split_dir else root
    train, test = read_split_list(split_dir / TRAIN_LIST), read_split_list(split_dir / TEST_LIST)
    _check(cfg, split_dir, train, test)
    if holdout and cfg.val_per_class > 0:
        kept, val_idx, moved = holdout_split(train.labels, cfg.val_per_class, cfg.split_seed)
    else:
        kept, val_idx, moved = np.arange(len(train)), np.empty(0, dtype=np.int64), None
    p = np.asarray(train.paths, dtype=object)
    tr = SplitList(list(p[kept]), train.labels[kept])
    va = SplitList(list(p[val_idx]), train.labels[val_idx])
    files = {"train": str(split_dir / TRAIN_LIST), "test": str(split_dir / TEST_LIST)}
    names = class_names(split_dir, cfg.num_classes)
    data = files_data(cfg, root, tr, va, test, kept, val_idx, names, files)
    data.val_moved = moved
    return data


DATASETS.register("inat18", Inat18Config)(_inat18)
