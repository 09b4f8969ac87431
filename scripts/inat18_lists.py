"""Make the iNaturalist 2018 split lists of facebookresearch/classifier-balancing from the official json files.

    python scripts/inat18_lists.py --train train2018.json --val val2018.json --out /data/inat18

A thin wrapper of ``ltbench data inat18-lists train2018.json val2018.json --out /data/inat18`` (the same errors:
one line, exit 2).

Writes iNaturalist18_train.txt and iNaturalist18_val.txt (``file_name category_id`` per image, in the json's image
order, as that repository's data/iNaturalist18/gen_lists.py) and iNaturalist18_categories.json (the official
category names) into --out; then ``ltbench train dataset=inat18 dataset.root=<folder holding train_val2018/>
dataset.split_dir=<out>``. See ltbench/data/inat.py.
"""

from __future__ import annotations

import argparse

from ltbench.cli import main as ltbench


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", required=True, help="the official train2018.json")
    p.add_argument("--val", default=None, help="the official val2018.json (the benchmark's test list)")
    p.add_argument("--out", required=True, help="folder for the lists")
    args = p.parse_args(argv)
    ltbench(["data", "inat18-lists", args.train, *([args.val] if args.val else []), "--out", args.out])


if __name__ == "__main__":
    main()
