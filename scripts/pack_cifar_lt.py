"""Pack a CIFAR-LT training subset and the test set losslessly (PNG), to move them to a machine without the data.

    python scripts/pack_cifar_lt.py pack   --root $LTBENCH_DATA --ratio 100 --out .device_data/pack
    python scripts/pack_cifar_lt.py unpack --pack .device_data/pack --out /tmp/cifar     # then dataset.root=/tmp/cifar

`unpack` writes a CIFAR folder in the original format in which every image of the long-tailed subset sits at its
original index, and so does every image of its validation split (the others are zero images; all 50,000 labels
are exact). The subset construction depends only on
the labels, so the same split (same split_hash) and the same pixels (same data_fingerprint) come out: runs on the
unpacked folder are the runs on the original files. Only the subset packed (ratio, profile, split seed) is usable.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from ltbench.data.cifar import load_cifar, write_cifar
from ltbench.data.lt import array_fingerprint, lt_counts, lt_split


def _to_png(x: np.ndarray, path: Path) -> None:
    # N x 3 x 32 x 32 -> (N*32) x 32 x 3, one tall lossless image
    Image.fromarray(x.transpose(0, 2, 3, 1).reshape(-1, x.shape[3], 3)).save(path, optimize=True)


def _from_png(path: Path) -> np.ndarray:
    a = np.asarray(Image.open(path).convert("RGB"))
    return a.reshape(-1, 32, 32, 3).transpose(0, 3, 1, 2).copy()


def pack(root: str, num_classes: int, ratio: float, profile: str, split_seed: int, val_per_class: int, out: Path):
    tx, ty, vx, vy, _ = load_cifar(root, num_classes, download=False)
    counts = lt_counts(int(np.bincount(ty).min()), num_classes, ratio, profile)
    idx, val_idx = lt_split(ty, counts, split_seed, val_per_class)
    used = np.concatenate([idx, val_idx])  # the subset and its validation split
    out.mkdir(parents=True, exist_ok=True)
    _to_png(tx[used], out / "train_lt.png")
    _to_png(vx, out / "test.png")
    meta = {
        "num_classes": num_classes,
        "ratio": ratio,
        "profile": profile,
        "split_seed": split_seed,
        "train_labels": ty.tolist(),
        "kept": used.tolist(),
        "test_labels": vy.tolist(),
        "n_train": len(idx),
        "data_fingerprint": array_fingerprint(tx[idx], ty[idx], tx[val_idx], ty[val_idx], vx, vy),
    }
    (out / "meta.json").write_text(json.dumps(meta))
    size = sum(p.stat().st_size for p in out.iterdir()) / 2**20
    print(f"packed {len(idx)} training + {len(val_idx)} validation + {len(vx)} test images into {out} ({size:.1f} MiB)")


def unpack(pack_dir: Path, out: Path) -> None:
    meta = json.loads((pack_dir / "meta.json").read_text())
    ty = np.asarray(meta["train_labels"], dtype=np.int64)
    kept = np.asarray(meta["kept"], dtype=np.int64)
    tx = np.zeros((len(ty), 3, 32, 32), dtype=np.uint8)
    tx[kept] = _from_png(pack_dir / "train_lt.png")
    vx, vy = _from_png(pack_dir / "test.png"), np.asarray(meta["test_labels"], dtype=np.int64)
    tr, va = kept[: meta["n_train"]], kept[meta["n_train"] :]
    got = array_fingerprint(tx[tr], ty[tr], tx[va], ty[va], vx, vy)
    if got != meta["data_fingerprint"]:
        raise SystemExit(f"unpacked data differ from the packed data ({got} != {meta['data_fingerprint']})")
    write_cifar(out, meta["num_classes"], tx, ty, vx, vy)
    print(f"unpacked into {out} (data_fingerprint {got} verified)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack")
    a.add_argument("--root", required=True)
    a.add_argument("--num-classes", type=int, default=10)
    a.add_argument("--ratio", type=float, default=100)
    a.add_argument("--profile", default="exp")
    a.add_argument("--split-seed", type=int, default=0)
    a.add_argument("--val-per-class", type=int, default=20)
    a.add_argument("--out", type=Path, required=True)
    b = sub.add_parser("unpack")
    b.add_argument("--pack", type=Path, required=True)
    b.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    if args.cmd == "pack":
        pack(args.root, args.num_classes, args.ratio, args.profile, args.split_seed, args.val_per_class, args.out)
    else:
        unpack(args.pack, args.out)


if __name__ == "__main__":
    main()
