"""Check that a code change leaves results bit-identical: short CPU runs at two git revisions, compared exactly.

    python scripts/check_identical.py --base 29b94f9            # base revision vs the working tree
    python scripts/check_identical.py --base main~3 --head HEAD  # two revisions
    python scripts/check_identical.py --base 29b94f9 --strategies ce ldam_drw mixup crt

Each side runs in its own process from its own source tree (a `git worktree` for a revision, the checkout itself for
the working tree), on the same tiny dataset written in the real CIFAR on-disk format, with the same thread count.
The runs use `experiment=smoke` (ResNet-8 of width 4, 2 epochs) on CIFAR-10-LT at ratio 10. Compared exactly: top-1,
per-class accuracy, the training split hash, the per-epoch training loss and a hash of the final weights
(for two-stage runs, the stage-1 weights: checkpoint.pt). Exit status 0 when every strategy
matches, 1 otherwise. This is the check behind "behaviour is preserved" in refactoring notes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_STRATEGIES = ("ce", "ldam_drw", "mixup", "crt")

# Runs inside the source tree under test: compose from its conf/ and call its runner.run (a stable entry point).
CHILD = r"""
import json, sys
from pathlib import Path
src, data, out, strategies = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4].split(",")
extra = [o for o in sys.argv[6].split(" ") if o]
base = [o.replace("{data}", data) for o in sys.argv[7].split(" ") if o]
sys.path.insert(0, str(src))
import torch
torch.set_num_threads(int(sys.argv[5]))
from hydra import compose, initialize_config_dir
try:  # components register their schemas (and resolvers) when loaded
    from ltbench.registry import load_components
    load_components()
    import ltbench.identity, ltbench.presets
except ImportError:  # revisions before the registries: importing the config registers the schemas
    import ltbench.config
from ltbench.runner import run
result = {}
with initialize_config_dir(str(src / "conf"), version_base="1.3"):
    for s in strategies:
        cfg = compose("train", overrides=[
            *base, f"strategy={s}", "device=cpu", "progress=false", f"results_dir={out / 'results'}", *extra,
        ])
        m = run(cfg, out / s)
        rows = (out / s / "epochs.csv").read_text().splitlines()
        head = rows[0].split(",")
        losses = [r.split(",")[head.index("train_loss")] for r in rows[1:]] if len(rows) > 1 else []
        import hashlib
        state = torch.load(out / s / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
        h = hashlib.sha256()
        for k in sorted(state):
            h.update(k.encode() + state[k].contiguous().numpy().tobytes())
        per_group = m.get("per_class_acc", m.get("per_bin_mae"))  # classification, or regression (MAE per bin)
        result[s] = {"top1": m.get("top1", m.get("mae")), "per_class_acc": per_group, "split_hash": m["split_hash"],
                     "train_loss": losses, "weights_sha256": h.hexdigest()[:16]}
print("RESULT " + json.dumps(result))
"""


def write_fixture(root: Path) -> None:
    """The conftest fixture dataset (class-dependent noise images), written with numpy and pickle only."""
    import pickle

    import numpy as np

    rng = np.random.default_rng(0)
    centres = rng.integers(30, 225, size=(10, 3, 1, 1))

    def images(per_class: int):
        y = np.repeat(np.arange(10), per_class)
        rng.shuffle(y)
        x = np.clip(centres[y] + rng.normal(0, 40, size=(len(y), 3, 32, 32)), 0, 255).astype(np.uint8)
        return x, y

    (tx, ty), (vx, vy) = images(40), images(10)
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True, exist_ok=True)
    chunks = np.array_split(np.arange(len(tx)), 5)
    for i, idx in enumerate(chunks, 1):
        with open(base / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": tx[idx].reshape(len(idx), -1), b"labels": list(map(int, ty[idx]))}, f)
    with open(base / "test_batch", "wb") as f:
        pickle.dump({b"data": vx.reshape(len(vx), -1), b"labels": list(map(int, vy))}, f)


CIFAR_BASE = "experiment=smoke dataset.root={data} dataset.download=false dataset.imbalance_ratio=10"


def run_side(src: Path, data: Path, out: Path, strategies: list[str], threads: int, extra: list[str],
             base: str = CIFAR_BASE) -> dict:  # fmt: skip
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            str(src),
            str(data),
            str(out),
            ",".join(strategies),
            str(threads),
            " ".join(extra),
            base,
        ],
        cwd=src,
        capture_output=True,
        text=True,
        env=env,
    )
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        sys.exit(f"runs in {src} failed:\n{r.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def source_tree(rev: str | None, tmp: Path, name: str) -> Path:
    if rev is None:
        return REPO
    path = tmp / name
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), rev], check=True, capture_output=True
    )
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the revision whose results are the reference")
    p.add_argument("--head", default=None, help="the revision to check (default: the working tree)")
    p.add_argument("--strategies", nargs="+", default=list(DEFAULT_STRATEGIES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--overrides", nargs="*", default=[], help="more overrides for both sides, e.g. model.width=16")
    p.add_argument("--base-overrides", default=CIFAR_BASE,
                   help="the runs' base overrides ({data}: the fixture), e.g. 'experiment=diamonds_dir "
                   "schedule.epochs=2' for a regression preset")  # fmt: skip
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        write_fixture(tmp / "data")
        trees = {"base": source_tree(args.base, tmp, "base"), "head": source_tree(args.head, tmp, "head")}
        try:
            res = {
                k: run_side(src, tmp / "data", tmp / f"out_{k}", args.strategies, args.threads, args.overrides,
                            args.base_overrides)
                for k, src in trees.items()
            }
        finally:
            for src in trees.values():
                if src != REPO:
                    subprocess.run(
                        ["git", "-C", str(REPO), "worktree", "remove", "--force", str(src)], capture_output=True
                    )
    ok = True
    for s in args.strategies:
        a, b = res["base"][s], res["head"][s]
        same = a == b
        ok &= same
        print(
            f"{s:12s} {'identical' if same else 'DIFFERENT'}  top-1/MAE {a['top1']:.4f} vs {b['top1']:.4f}  "
            f"train loss {a['train_loss']} vs {b['train_loss']}"
        )
    print("bit-identical" if ok else "results differ")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
