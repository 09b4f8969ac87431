"""Class names by label id, for text-prompted heads (zero-shot CLIP, LIFT's text-initialised classifier).

Invariant: ``class_names(cfg, data)[i]`` names label ``i`` of the dataset as ltbench loads it, and the list has
``num_classes`` entries. Sources (see also ``SOURCES`` in this folder):

- CIFAR-10: ``label_names`` of ``batches.meta`` (cifar-10-batches-py), inline below.
- CIFAR-100: ``fine_label_names`` of ``meta`` (cifar-100-python), ``cifar100.txt``; LIFT (shijxcs/LIFT
  ``datasets/cifar100.py``) takes torchvision's ``CIFAR100.classes``, the same list.
- ImageNet-LT: the 1000 ImageNet classes in the standard synset order (the ImageNet-LT label ids), CLIP's curated
  names, read at run time from ``open_clip.zero_shot_metadata.IMAGENET_CLASSNAMES``; identical, name by name, to
  LIFT's ``datasets/ImageNet_LT/classnames.txt`` (checked at commit 661ead9b).
- Places-LT: ``places365.txt``, the folder names of Places_LT_train.txt by label id. LIFT's
  ``datasets/Places_LT/classnames.txt`` holds the same 365 names but sorts ``-`` after ``_``, so 5 labels (116-118
  desert_road / desert-sand / desert-vegetation, 141-142 field_road / field-wild) get a neighbour's name there.
- iNaturalist 2018: the official ``categories.json`` beside the lists (``ltbench.data.inat`` reads it into
  ``data.class_names``, label = category id); without it the names are label numbers and this is an error. LIFT
  (``datasets/inat2018.py``) relabels the classes by sorted species name; ltbench keeps the official ids.

Prompts format a name with ``_`` replaced by a space (LIFT ``trainer.py`` ``get_tokenized_prompts``).
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from ltbench.errors import ConfigError

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# dataset config name -> the shipped list it uses
DATASET_LISTS = {"cifar10lt": "cifar10", "cifar10lt_ssl": "cifar10", "cifar100lt": "cifar100",
                 "cifar100lt_ssl": "cifar100", "imagenetlt": "imagenet", "placeslt": "places365"}  # fmt: skip


def read_list(name: str) -> list[str]:
    """A shipped list (``cifar10``, ``cifar100``, ``imagenet``, ``places365``) in label order."""
    if name == "cifar10":
        return list(CIFAR10)
    if name == "imagenet":
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        return list(IMAGENET_CLASSNAMES)
    text = resources.files(__name__).joinpath(f"{name}.txt").read_text(encoding="utf-8")
    return [s.strip() for s in text.splitlines() if s.strip() and not s.startswith("#")]


def _numbers(names: list[str]) -> bool:
    return all(n.strip().isdigit() for n in names)


def class_names(dataset_cfg: Any, data: Any) -> list[str]:
    """The class names of ``data`` by label id: the shipped list of its dataset, else the names the data carries
    (iNaturalist's categories.json, an image folder's class folders); label numbers only are a ``ConfigError``."""
    name = str(getattr(dataset_cfg, "name", None) or getattr(data, "name", ""))
    n = int(getattr(dataset_cfg, "num_classes", 0) or len(getattr(data, "class_counts", []) or []) or 0)
    if name in DATASET_LISTS:
        names = read_list(DATASET_LISTS[name])
    else:
        names = list(getattr(data, "class_names", None) or [])
        if not names or _numbers(names):
            hint = " (put the official categories.json beside the lists)" if name.startswith("inat") else ""
            raise ConfigError(f"dataset={name} has no class names, only label numbers: a text head needs them{hint}")
    if n and len(names) != n:
        raise ConfigError(f"dataset={name} has {n} classes but {len(names)} class names")
    return names
