"""iNaturalist 2018 (ltbench.data.inat): the official json -> list conversion of facebookresearch/classifier-balancing
(data/iNaturalist18/gen_lists.py), the dataset from the published lists, the seeded balanced holdout, a tiny run."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from ltbench.config import GroupsConfig
from ltbench.data import build_dataset
from ltbench.data.imagelist import read_split_list
from ltbench.data.inat import CATEGORIES, TEST_LIST, TRAIN_LIST, Inat18Config, json_to_list, write_lists
from ltbench.errors import DataError

COUNTS = [30, 12, 5, 3, 2]  # training images per class
SUPER = ["Plantae", "Insecta", "Aves", "Plantae", "Fungi"]


def official_json(images: list[tuple[str, int]], path: Path, shuffle_annotations: bool = False) -> None:
    """The official format: images (id, file_name, ...), annotations (id, image_id, category_id), categories."""
    imgs = [{"id": 1000 + i, "file_name": f, "width": 24, "height": 20} for i, (f, _) in enumerate(images)]
    anns = [{"id": 1000 + i, "image_id": 1000 + i, "category_id": c} for i, (_, c) in enumerate(images)]
    if shuffle_annotations:
        anns = anns[::-1]
    cats = [{"id": c, "name": f"Species {c}", "supercategory": SUPER[c], "kingdom": SUPER[c]} for c in (4, 2, 0, 1, 3)]
    path.write_text(json.dumps({"images": imgs, "annotations": anns, "categories": cats, "info": {"year": 2018}}))


@pytest.fixture(scope="module")
def inat_tree(tmp_path_factory) -> Path:
    """root/train_val2018/<super>/<class>/<hash>.jpg tiny JPEGs, train2018.json / val2018.json, and the lists."""
    from PIL import Image

    root = tmp_path_factory.mktemp("inat")
    rng = np.random.default_rng(0)
    train, val = [], []
    for c, n in enumerate(COUNTS):
        for i in range(n + 3):
            f = f"train_val2018/{SUPER[c]}/{c}/{c:02d}{i:04d}abcdef.jpg"
            (root / f).parent.mkdir(parents=True, exist_ok=True)
            px = np.clip(rng.normal(40 * c + 30, 25, size=(20 + c, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(px).save(root / f, quality=90)
            (train if i < n else val).append((f, c))
    order = rng.permutation(len(train))  # the official files are not sorted by class
    official_json([train[i] for i in order], root / "train2018.json")
    official_json(val, root / "val2018.json", shuffle_annotations=True)
    write_lists(root / "train2018.json", root / "val2018.json", root)
    return root


def cfg(root: Path, **kw) -> Inat18Config:
    base = {"root": str(root), "num_classes": 5, "check_counts": False, "groups": GroupsConfig(many_above=10,
            few_below=4)}  # fmt: skip
    return Inat18Config(**{**base, **kw})


def test_json_to_list_is_gen_lists_format_in_image_order(inat_tree):
    data = json.loads((inat_tree / "train2018.json").read_text())
    lines = (inat_tree / TRAIN_LIST).read_text().splitlines()
    # gen_lists.py: one line per images[i], "file_name category_id", in the json's order
    assert lines == [f"{im['file_name']} {a['category_id']}" for im, a in zip(data["images"], data["annotations"])]
    val, cats = json_to_list(inat_tree / "val2018.json")  # annotations in reverse order: paired by image_id
    assert val.paths[0].endswith("0030abcdef.jpg") and val.labels.tolist() == np.repeat(range(5), 3).tolist()
    assert [c["id"] for c in cats] == [0, 1, 2, 3, 4] and cats[2] == {"id": 2, "name": "Species 2",
                                                                       "supercategory": "Aves"}  # fmt: skip


def test_image_without_annotation_is_refused(inat_tree, tmp_path):
    data = json.loads((inat_tree / "train2018.json").read_text())
    data["annotations"] = data["annotations"][1:]
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match="has 0 annotations"):
        json_to_list(tmp_path / "bad.json")


def test_script_writes_the_lists(inat_tree, tmp_path, capsys):
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "scripts" / "inat18_lists.py"
    spec = importlib.util.spec_from_file_location("inat18_lists", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--train", str(inat_tree / "train2018.json"), "--out", str(tmp_path)])
    assert f"{TRAIN_LIST}: 52 images" in capsys.readouterr().out
    assert (tmp_path / TRAIN_LIST).read_text() == (inat_tree / TRAIN_LIST).read_text()
    assert json.loads((tmp_path / CATEGORIES).read_text())[0]["name"] == "Species 0"


def test_data_subcommand_writes_the_lists(inat_tree, tmp_path, capsys):
    from ltbench.cli import main

    main(["data", "inat18-lists", str(inat_tree / "train2018.json"), str(inat_tree / "val2018.json"), "--out",
          str(tmp_path / "lists")])  # fmt: skip
    out = capsys.readouterr().out
    assert f"{TRAIN_LIST}: 52 images" in out and f"{TEST_LIST}: 15 images" in out
    for name in (TRAIN_LIST, TEST_LIST, CATEGORIES):
        assert (tmp_path / "lists" / name).read_text() == (inat_tree / name).read_text()


def _malformed(tmp_path: Path, inat_tree: Path) -> dict[str, Path]:
    data = json.loads((inat_tree / "train2018.json").read_text())
    cases = {"not json": "{images: [", "no images": json.dumps({"annotations": []}), "a list": "[1, 2]",
             "image without id": json.dumps({**data, "images": [{"file_name": "a.jpg"}]}),
             "annotation without image_id": json.dumps({**data, "annotations": [{"category_id": 1}]}),
             "category without name": json.dumps({**data, "categories": [{"id": 3}]})}  # fmt: skip
    files = {}
    for i, (name, text) in enumerate(cases.items()):
        files[name] = tmp_path / f"bad{i}.json"
        files[name].write_text(text)
    return files


@pytest.mark.parametrize("case", ["missing", "not json", "no images", "a list", "image without id",
                                  "annotation without image_id", "category without name", "two annotations",
                                  "out is a file"])  # fmt: skip
def test_data_subcommand_errors_are_one_line_exit_2(case, inat_tree, tmp_path, capsys):
    from ltbench.cli import main

    train, val, out = inat_tree / "train2018.json", inat_tree / "val2018.json", tmp_path / "out"
    if case == "missing":
        val = tmp_path / "nowhere.json"
    elif case == "two annotations":
        data = json.loads(train.read_text())
        data["annotations"].append(dict(data["annotations"][0], id=1))
        train = tmp_path / "twice.json"
        train.write_text(json.dumps(data))
    elif case == "out is a file":
        out.write_text("")
    else:
        val = _malformed(tmp_path, inat_tree)[case]
    with pytest.raises(SystemExit) as e:
        main(["data", "inat18-lists", str(train), str(val), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    named = {"missing": str(val), "two annotations": "has 2 annotations", "out is a file": "cannot write"}
    assert named.get(case, str(val)) in err.replace("\n", "")


def test_data_subcommand_usage_errors_exit_2(capsys):
    from ltbench.cli import main

    for argv in (["data"], ["data", "inat18-lists", "train2018.json"], ["data", "imagenet-lists", "x", "--out", "o"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2


def test_dataset_from_the_lists_trains_on_every_listed_image(inat_tree):
    d = build_dataset(cfg(inat_tree))
    assert d.kind == "files" and d.class_counts == COUNTS and len(d.test_y) == 15 and len(d.val_y) == 0
    assert d.class_names == [f"Species {c}" for c in range(5)]
    assert d.split_files == {"train": str(inat_tree / TRAIN_LIST), "test": str(inat_tree / TEST_LIST)}


def test_holdout_is_seeded_balanced_recorded_and_disjoint_from_test(inat_tree):
    full = read_split_list(inat_tree / TRAIN_LIST)
    d = build_dataset(cfg(inat_tree, val_per_class=2), holdout=True)
    assert np.bincount(d.val_y.numpy()).tolist() == [2, 2, 2, 2, 1]  # a class keeps at least one image
    assert d.val_moved == [2, 2, 2, 2, 1] and d.class_counts == [28, 10, 3, 1, 1]
    assert sorted(d.train_indices.tolist() + d.val_indices.tolist()) == list(range(len(full)))
    assert [full.paths[i] for i in d.val_indices] == d.val_files
    assert not set(d.val_files) & set(d.train_files) and not set(d.val_files) & set(d.test_files)
    one = build_dataset(cfg(inat_tree), holdout=True)  # the default: 1 per class, balanced
    assert np.bincount(one.val_y.numpy()).tolist() == [1] * 5
    again = build_dataset(cfg(inat_tree, val_per_class=2), holdout=True)
    other = build_dataset(cfg(inat_tree, val_per_class=2, split_seed=1), holdout=True)
    assert again.val_files == d.val_files and again.split_hash == d.split_hash
    assert other.val_files != d.val_files and other.split_hash != d.split_hash


def test_published_sizes_are_checked(inat_tree):
    with pytest.raises(DataError, match=r"differ from the published ones.*437,513"):
        build_dataset(cfg(inat_tree, check_counts=True))


def test_tiny_inat18_run_with_holdout_and_groups(inat_tree, tmp_path):
    from hydra import compose, initialize_config_module

    from ltbench.runner import run

    over = ["progress=false", "device=cpu", "schedule=short", "schedule.epochs=1", "schedule.warmup=0",
            "schedule.milestones=[0.5]", "model=resnet10", "dataset=inat18", f"dataset.root={inat_tree}",
            "dataset.num_classes=5", "dataset.check_counts=false", "dataset.image_size=16", "dataset.resize=20",
            "dataset.num_workers=0", "dataset.val_holdout=true", "dataset.groups.many_above=10",
            "dataset.groups.few_below=4", "dataset.cache=disk", f"dataset.cache_dir={tmp_path / 'cache'}",
            "schedule.batch_size=16", "schedule.eval_batch_size=32", f"results_dir={tmp_path}"]  # fmt: skip
    with initialize_config_module("ltbench.conf", version_base="1.3"):
        m = run(compose("train", overrides=over), tmp_path / "run")
    assert m["status"] == "completed" and m["num_train"] == 47 and m["num_test"] == 15
    assert m["group_sizes"] == {"many": 2, "medium": 1, "few": 2}  # counts 29, 11 / 4 / 2, 1 after the holdout
    assert m["val_moved"] == [1] * 5


needs_inat_list = pytest.mark.skipif(
    not (Path(os.environ.get("LTBENCH_DATA", "/nonexistent")) / "inat18" / TEST_LIST).exists(),
    reason="LTBENCH_DATA does not hold the published iNaturalist 2018 val list",
)


@needs_inat_list
@pytest.mark.realdata
def test_real_inat18_val_list_sizes():
    from ltbench.data.imagelist import check_counts
    from ltbench.data.inat import EXPECTED_INAT18

    test = read_split_list(Path(os.environ["LTBENCH_DATA"]) / "inat18" / TEST_LIST)
    assert len(test) == 24_426 and len(np.unique(test.labels)) == 8142
    assert check_counts("inat18", "test", test, EXPECTED_INAT18) == []
    assert all(p.startswith("train_val2018/") for p in test.paths)
