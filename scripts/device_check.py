"""One command that measures ltbench on one GPU inside a hard deadline (issue 22), and its CPU dry run.

    bash scripts/device_check.sh --out /tmp/dc --minutes 9 --bundle $OUT/device_check.tgz   # on the GPU machine
    python scripts/device_check.py --out /tmp/dc_dry --dry-run                                # on a CPU, ~1 minute

Steps, in this order, each time-boxed (steps 1 and 2: 15 % of ``--minutes`` each, 90 s of 10 minutes; step 3: the
rest), everything written under ``--out``:

0. ``data``: CIFAR-10-LT (ratio 100, Cao et al. 2019's subset) for the steps below: ``--data-root`` if given, else
   the losslessly packed subset ``--pack`` (``scripts/pack_cifar_lt.py pack``, carried as ``.device_data/pack``)
   unpacked into ``OUT/data`` (its data fingerprint is verified), else ``$LTBENCH_DATA``. Dry run: a tiny random
   CIFAR-10 in the original format.
1. ``throughput``: ``scripts/bench_throughput.py`` (ResNet-32 batch 128: bare step, ltbench's loop eager and
   ``compile=reduce-overhead`` in bf16 and fp32, the peer loop) -> ``OUT/bench/throughput.{md,json}``.
2. ``packing``: ``scripts/bench_packing.py`` N = 1, 2, 4, 8 -> ``OUT/bench/packing.{md,json}``.
2b. ``foundation``: ``scripts/bench_foundation.py`` (CLIP ViT-B/16 at batch 128 in bf16, AdaptFormer and full
   fine-tuning, gradient checkpointing off / on: images/s and peak memory against a 20 GB budget; 8 % of
   ``--minutes``) -> ``OUT/bench/foundation.{md,json}``.
2c. ``loading``: ``scripts/bench_loading.py`` (2,048 generated JPEGs: GPU decoding into the decoded cache, then the
   cached pipeline feeding a ResNet-50 and a ViT-B/16 step, data wait vs step; 15 % of ``--minutes``) ->
   ``OUT/bench/loading_{resnet50,vit_b_16}/loading.{md,json}``.
3. ``reproduce``: 200-epoch CIFAR-10-LT ratio-100 runs of ``ltbench reproduce cifar10lt_ldam --seeds 0``, packed
   (``--jobs N``: the best N of step 2, else 8; ``compile=reduce-overhead``), most informative rows first
   (:data:`PRIORITY`), in waves of N rows. At the deadline the runs get SIGTERM and stop at their last epoch's
   checkpoint; ``--report-only`` then writes ``OUT/reproduce/reproduce.{md,csv}`` of what finished.
4. ``environment``: ``nvidia-smi``, Python / torch / CUDA / Triton versions -> ``OUT/environment.txt``.

Invariants: steps 0-3 end by the deadline (start + ``--minutes`` - the environment step's reserve): a step is
killed (its process group) when its box runs out ("timeout"), and a step with too little time left is "skipped,
deadline"; step 4 always runs, bounded by its reserve, so the whole command ends within ``--minutes`` (plus the
seconds a killed process takes to die). Each step's tables are written as they are measured, so a timeout keeps
the rows so far. A second invocation with the same ``--out`` resumes: steps that were "ok" are not repeated
(``--redo`` repeats them) and the runs of step 3 continue from their checkpoints (ltbench's resume). Whatever
happens, ``OUT/summary.md`` and ``OUT/summary.json`` name every step with its status, seconds and outputs, and the
reproduction's rows with their status, epochs done and top-1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
TABLE = "cifar10lt_ldam"
# The rows of the table in the order they are worth device time: the baseline, the paper's method, the two
# loss-side corrections, the decoupled classifier; then the rest of the table.
PRIORITY = ["ce", "ldam_drw", "logit_adjust", "balanced_softmax", "crt", "ce_drw", "ldam", "focal", "cb_sigmoid_focal",
            "tau_norm", "lws", "posthoc_la", "mislas", "glmc", "glmc_r10", "balpoe"]  # fmt: skip
STEPS = ("data", "throughput", "packing", "foundation", "loading", "reproduce", "environment")
SKIPPED_DEADLINE = "skipped, deadline"
BENCH_SHARE = 0.15  # of the deadline, the box of each benchmark step (1 and 2); the reproduction has the rest
FOUNDATION_SHARE = 0.08  # of the deadline, the box of the foundation-model step (2b): 43 s of 9 minutes
LOADING_SHARE = 0.15  # of the deadline, the box of the image-pipeline step (2c), both models: 81 s of 9 minutes


@dataclass
class Step:
    """One step's record in the summary. status: ok | failed (exit N) | timeout | skipped, deadline |
    skipped, done before | stopped at deadline (the reproduction: runs interrupted at a checkpoint)."""

    name: str
    status: str = "pending"
    seconds: float = 0.0
    detail: str = ""
    outputs: list[str] = field(default_factory=list)


@dataclass
class Clock:
    """The hard deadline: steps 0-3 must end by ``end``; the environment step has ``reserve`` seconds after it."""

    start: float
    end: float
    reserve: float

    @classmethod
    def of(cls, minutes: float, dry_run: bool) -> Clock:
        total = minutes * 60.0
        reserve = min(5.0 if dry_run else 15.0, 0.1 * total)
        now = time.monotonic()
        return cls(now, now + total - reserve, reserve)

    def left(self) -> float:
        return self.end - time.monotonic()


# ---------------------------------------------------------------------------------------------- processes


def run_boxed(cmd: list[str], log: Path, box: float, env: dict[str, str] | None = None) -> tuple[int | None, float]:
    """Run ``cmd`` in its own process group with its output in ``log``; after ``box`` seconds the whole group gets
    SIGTERM, then SIGKILL 10 s later. Returns (exit code, or None on timeout; seconds)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO,
                                env=env, start_new_session=True)  # fmt: skip
        try:
            rc: int | None = proc.wait(timeout=max(box, 0.1))
        except subprocess.TimeoutExpired:
            rc = None
            _kill_group(proc, 10.0)
    return rc, time.monotonic() - t0


def _kill_group(proc: subprocess.Popen, grace: float) -> None:
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def status_of(rc: int | None) -> str:
    return "timeout" if rc is None else ("ok" if rc == 0 else f"failed (exit {rc})")


def child_env(out: Path) -> dict[str, str]:
    """The steps' environment: one inductor cache under OUT, so steps 2 and 3 reuse the kernels step 1 compiled."""
    env = dict(os.environ)
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(out / "inductor_cache"))
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


# ---------------------------------------------------------------------------------------------- the steps


def step_data(args: argparse.Namespace, out: Path) -> tuple[str, str, Path | None]:
    """(status, detail, the CIFAR root every later step reads)."""
    if args.dry_run:
        return "ok", "tiny random CIFAR-10 (dry run)", write_tiny_cifar(out / "data")
    if args.data_root:
        return "ok", f"--data-root {args.data_root}", Path(args.data_root)
    pack = Path(args.pack)
    if (pack / "meta.json").exists():
        target = out / "data"
        if not (target / "cifar-10-batches-py" / "test_batch").exists():
            sys.path.insert(0, str(SCRIPTS))
            import pack_cifar_lt

            pack_cifar_lt.unpack(pack, target)
        return "ok", f"unpacked {pack} (fingerprint verified)", target
    env_root = os.environ.get("LTBENCH_DATA")
    if env_root and (Path(env_root) / "cifar-10-batches-py").exists():
        return "ok", f"$LTBENCH_DATA={env_root}", Path(env_root)
    return "failed (no data)", f"no {pack}/meta.json, no --data-root, no $LTBENCH_DATA", None


def write_tiny_cifar(root: Path, per_class: int = 200, test_per_class: int = 10) -> Path:
    """A CIFAR-10 folder in the original format with random images (the dry run's data): 200 a class, enough
    for ratio 100 (the rarest class keeps 2) and its validation split."""
    import numpy as np

    from ltbench.data.cifar import write_cifar

    if (root / "cifar-10-batches-py" / "test_batch").exists():
        return root
    rng = np.random.default_rng(0)
    ty, vy = np.repeat(np.arange(10), per_class), np.repeat(np.arange(10), test_per_class)
    tx = rng.integers(0, 256, (len(ty), 3, 32, 32), dtype=np.uint8)
    vx = rng.integers(0, 256, (len(vy), 3, 32, 32), dtype=np.uint8)
    write_cifar(root, 10, tx, ty, vx, vy)
    return root


def throughput_cmd(args: argparse.Namespace, out: Path, data: Path) -> list[str]:
    cmd = [sys.executable, str(SCRIPTS / "bench_throughput.py"), "--out", str(out / "bench"), "--data", str(data),
           "--no-eval"]  # fmt: skip
    if args.dry_run:
        return [*cmd, "--quick", "--device", "cpu", "--modes", "none", "--windows", "1", "--epoch-images", "256",
                "--workers", "0"]  # fmt: skip
    return [*cmd, "--device", "cuda", "--modes", "reduce-overhead", "none", "--dtypes", "bf16", "fp32",
            "--windows", "3", "--warmup", "2"]  # fmt: skip


def packing_cmd(args: argparse.Namespace, out: Path, data: Path) -> list[str]:
    cmd = [sys.executable, str(SCRIPTS / "bench_packing.py"), "--out", str(out / "bench"), "--data", str(data)]
    if args.dry_run:
        return [*cmd, "--quick", "--device", "cpu", "--jobs", "1", "2", "--seconds", "1.5"]
    return [*cmd, "--device", "cuda", "--jobs", "1", "2", "4", "8", "--seconds", "6", "--warmup", "2"]


def foundation_cmd(args: argparse.Namespace, out: Path, data: Path | None) -> list[str]:
    cmd = [sys.executable, str(SCRIPTS / "bench_foundation.py"), "--out", str(out / "bench")]
    if args.dry_run:
        return [*cmd, "--quick", "--device", "cpu"]
    return [*cmd, "--device", "cuda", "--kinds", "adaptformer,full", "--batch-size", "128", "--steps", "3",
            "--windows", "2", "--warmup", "1"]  # fmt: skip


def loading_cmd(args: argparse.Namespace, out: Path, data: Path | None) -> list[str]:
    """Issue 19's GPU figures: the cached pipeline feeding a ResNet-50 and a ViT-B/16 step (data wait vs step)."""
    base = [sys.executable, str(SCRIPTS / "bench_loading.py"), "--cached", "--no-loader"]
    if args.dry_run:
        return [*base, "--images", "16", "--batch-size", "4", "--workers", "0", "--device", "cpu", "--steps", "2",
                "--repeats", "1", "--out", str(out / "bench" / "loading")]  # fmt: skip
    cmds = [shlex.join([*base, "--images", "2048", "--batch-size", "256", "--workers", "8", "--device", "cuda",
                        "--decoder", "cuda", "--model", m, "--steps", "10", "--repeats", "2",
                        "--out", str(out / "bench" / f"loading_{m}")]) for m in ("resnet50", "vit_b_16")]  # fmt: skip
    return ["bash", "-c", " ; ".join(cmds)]


def best_jobs(out: Path, dry_run: bool) -> tuple[int, str]:
    """How many runs to pack in step 3: the N of step 2 with the highest aggregate (>= 5 % above the next smaller
    N's), else 8 (ltbench's pack rule for ResNet-32), at most one run per 2 cores; 2 in a dry run."""
    if dry_run:
        return 2, "dry run"
    cap = max(1, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2) // 2)
    try:
        rows = json.loads((out / "bench" / "packing.json").read_text())["rows"]
        rates = {int(r["jobs"]): float(r.get("aggregate_images_per_s") or 0) for r in rows}
    except (OSError, ValueError, KeyError, TypeError):
        return min(8, cap), "pack rule (no packing table)"
    best = 1
    for n in sorted(rates):
        if rates[n] > 1.05 * rates.get(best, 0.0):
            best = n
    return min(best, cap), f"best aggregate of the packing table ({rates.get(best, 0):,.0f} images/s)"


# ------------------------------------------------------------------------------------- step 3: reproduction


def reproduce_extras(args: argparse.Namespace, data: Path) -> list[str]:
    """The overrides of every run (the same on every invocation: ``--resume`` requires it)."""
    common = [f"dataset.root={data}", "dataset.download=false"]
    if args.dry_run:
        return ["experiment=smoke", "device=cpu", *common]
    return ["device=cuda", "compile=reduce-overhead", *common]


def reproduce_cmd(out: Path, rows: list[str], jobs: int, extras: list[str], *, report_only: bool = False) -> list[str]:
    rdir = out / "reproduce"
    cmd = [sys.executable, "-m", "ltbench", "reproduce", TABLE, "--seeds", "0", "--ratios", "100", "--out",
           str(rdir), "--rows", ",".join(rows)]  # fmt: skip
    if (rdir / "reproduce.json").exists():
        cmd.append("--resume")
    if report_only:
        return [*cmd, "--report-only"]
    return [*cmd, "--jobs", str(jobs), "--", *extras]


def run_records(out: Path) -> dict[str, dict[str, Any]]:
    """strategy -> {status, epochs, top1} of the seed-0 runs under OUT/reproduce/runs."""
    found: dict[str, dict[str, Any]] = {}
    for run_dir in sorted((out / "reproduce" / "runs").glob("*/*/*_seed0")):
        rec: dict[str, Any] = {"status": "partial", "epochs": 0, "top1": None, "dir": str(run_dir)}
        epochs = run_dir / "epochs.csv"
        if epochs.exists():
            rec["epochs"] = max(len(epochs.read_text().strip().splitlines()) - 1, 0)
        try:
            m = json.loads((run_dir / "metrics.json").read_text())
            rec["status"], rec["top1"] = str(m.get("status", "partial")), m.get("top1")
        except (OSError, ValueError):
            pass
        found[run_dir.parent.name] = rec
    return found


def step_reproduce(args: argparse.Namespace, out: Path, data: Path, clock: Clock, log: Path) -> tuple[str, str]:
    """Waves of ``jobs`` rows in priority order until every row is done or the deadline; then the report."""
    jobs, why = best_jobs(out, args.dry_run)
    rows = args.rows or (PRIORITY[:3] if args.dry_run else PRIORITY)
    extras, report_box = reproduce_extras(args, data), (15.0 if args.dry_run else 40.0)
    grace = 10.0 if args.dry_run else 45.0  # the runs' stop at a checkpoint after SIGTERM
    tried: list[str] = []
    stopped = False
    while not stopped:
        done = {s for s, r in run_records(out).items() if r["status"] == "completed"}
        wave = [r for r in rows if r not in done and r not in tried][:jobs]
        box = clock.left() - report_box - grace
        if not wave or box < (2.0 if args.dry_run else 30.0):
            stopped = bool(wave)
            break
        tried += wave
        rc, _ = run_boxed(reproduce_cmd(out, wave, jobs, extras), log, box, child_env(out))
        stopped = rc is None
    attempted = [r for r in rows if r in tried or r in run_records(out)]
    if attempted:
        run_boxed(reproduce_cmd(out, attempted, jobs, extras, report_only=True), log,
                  max(clock.left(), 5.0), child_env(out))  # fmt: skip
    recs = run_records(out)
    finished = [r for r in rows if recs.get(r, {}).get("status") == "completed"]
    detail = f"--jobs {jobs} ({why}); {len(finished)}/{len(rows)} rows finished: {', '.join(finished) or 'none'}"
    if stopped:
        return "stopped at deadline", detail
    return ("ok" if len(finished) == len(rows) else "failed (runs failed)"), detail


# ------------------------------------------------------------------------------------------ step 4: versions


def step_environment(out: Path, box: float) -> tuple[str, str]:
    """nvidia-smi and versions into OUT/environment.txt (and environment.json)."""
    lines: list[str] = []
    probe = ("import json, platform, torch, ltbench; t = None\ntry:\n import triton; t = triton.__version__\nexcept "
             "Exception: pass\nprint(json.dumps({'python': platform.python_version(), 'torch': torch.__version__, "
             "'cuda': torch.version.cuda, 'cudnn': torch.backends.cudnn.version(), 'triton': t, 'ltbench': "
             "ltbench.__version__, 'gpu': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}))"
             )  # fmt: skip
    info: dict[str, Any] = {"platform": platform.platform(), "cores": os.cpu_count()}
    end = time.monotonic() + box
    for name, cmd in (("nvidia-smi", ["nvidia-smi"]), ("versions", [sys.executable, "-c", probe])):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=max(end - time.monotonic(), 1.0), cwd=REPO)
            text = (r.stdout + r.stderr).strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            text = f"({type(e).__name__}: {e})"
        lines += [f"## {name}", text, ""]
        if name == "versions" and text.startswith("{"):
            info.update(json.loads(text.splitlines()[0]))
    (out / "environment.txt").write_text("\n".join(lines))
    (out / "environment.json").write_text(json.dumps(info, indent=1) + "\n")
    return "ok", ", ".join(f"{k} {info[k]}" for k in ("torch", "cuda", "gpu") if info.get(k))


# ------------------------------------------------------------------------------------------------ summary


def write_summary(out: Path, args: argparse.Namespace, steps: list[Step], clock: Clock, t_wall: float) -> dict:
    """OUT/summary.json and OUT/summary.md: every step, its status and outputs, the reproduction's rows."""
    elapsed = time.monotonic() - clock.start
    recs = run_records(out)
    rows = args.rows or (PRIORITY[:3] if args.dry_run else PRIORITY)
    summary = {
        "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t_wall)), "minutes": args.minutes,
        "dry_run": args.dry_run, "elapsed_s": round(elapsed, 1),
        "deadline_honoured": elapsed <= args.minutes * 60.0 + 5.0,
        "steps": [asdict(s) for s in steps],
        "reproduce_rows": {r: recs.get(r, {"status": "not run", "epochs": 0, "top1": None}) for r in rows},
    }  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    md = [f"# Device check ({'dry run, CPU' if args.dry_run else 'GPU'}), {summary['started_utc']} UTC", "",
          f"Deadline {args.minutes:g} min; elapsed {elapsed:.0f} s.", "",
          "| step | status | seconds | detail | outputs |", "|---|---|---:|---|---|"]  # fmt: skip
    md += [f"| {s.name} | {s.status} | {s.seconds:.0f} | {s.detail} | {' '.join(s.outputs)} |" for s in steps]
    md += ["", f"Reproduction rows ({TABLE}, ratio 100, seed 0; 200 epochs unless a dry run):", "",
           "| row | status | epochs done | top-1 |", "|---|---|---:|---:|"]  # fmt: skip
    for r, rec in summary["reproduce_rows"].items():
        top1 = rec.get("top1")
        md.append(f"| {r} | {rec['status']} | {rec['epochs']} | {'' if top1 is None else f'{top1:.2f}'} |")
    for name in ("bench/throughput.md", "bench/packing.md", "reproduce/reproduce.md"):
        if (out / name).exists():
            md += ["", f"## {name}", "", (out / name).read_text().strip()]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    return summary


def write_bundle(out: Path, bundle: Path) -> None:
    """A tar.gz of the small outputs (tables, summaries, logs, epoch logs, run records): no data, checkpoints or
    compiled kernels."""
    bundle.parent.mkdir(parents=True, exist_ok=True)
    keep = (".md", ".json", ".csv", ".txt", ".log")
    with tarfile.open(bundle, "w:gz") as tar:
        for p in sorted(out.rglob("*")):
            rel = p.relative_to(out)
            if p.is_file() and p.suffix in keep and rel.parts[0] not in ("data", "inductor_cache"):
                tar.add(p, arcname=str(Path(out.name) / rel))


# --------------------------------------------------------------------------------------------------- main


def previous_ok(out: Path) -> set[str]:
    try:
        return {s["name"] for s in json.loads((out / "summary.json").read_text())["steps"] if s["status"] == "ok"}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def run_step(step: Step, clock: Clock | None, box: float, minimum: float, fn) -> None:
    """Run ``fn(box) -> (status, detail)`` if ``box``, capped by the deadline (``clock``; None: no cap), leaves at
    least ``minimum`` seconds; else the step is "skipped, deadline"."""
    box = box if clock is None else min(box, clock.left())
    if box < minimum:
        step.status = SKIPPED_DEADLINE
        return
    t0 = time.monotonic()
    try:
        step.status, step.detail = fn(box)
    except Exception as e:  # one step's failure never stops the others
        step.status, step.detail = "failed (error)", f"{type(e).__name__}: {e}"[:300]
    step.seconds = round(time.monotonic() - t0, 1)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    clock, t_wall = Clock.of(args.minutes, args.dry_run), time.time()
    done_before = set() if args.redo else previous_ok(out)
    steps = {name: Step(name) for name in STEPS}
    logs = out / "logs"
    data_holder: dict[str, Path | None] = {"root": None}

    def data(box: float) -> tuple[str, str]:
        status, detail, data_holder["root"] = step_data(args, out)
        return status, detail

    run_step(steps["data"], clock, 600.0, 0.5, data)
    root = data_holder["root"]
    box = BENCH_SHARE * args.minutes * 60.0  # 90 s each of 10 minutes
    plans = (("throughput", throughput_cmd, box, ["bench/throughput.md", "bench/throughput.json"], True),
             ("packing", packing_cmd, box, ["bench/packing.md", "bench/packing.json"], True),
             ("foundation", foundation_cmd, FOUNDATION_SHARE * args.minutes * 60.0,
              ["bench/foundation.md", "bench/foundation.json"], False),
             ("loading", loading_cmd, LOADING_SHARE * args.minutes * 60.0,
              ["bench/loading_resnet50/loading.md", "bench/loading_vit_b_16/loading.md"], False))  # fmt: skip
    for name, make, box, outputs, needs_data in plans:
        s = steps[name]
        s.outputs = outputs
        if root is None and needs_data:
            s.status = "skipped, no data"
        elif name in done_before:
            s.status = "skipped, done before"
        else:
            cmd = make(args, out, root)
            run_step(s, clock, box, 2.0, lambda b, c=cmd, n=name: (
                status_of(run_boxed(c, logs / f"{n}.log", b, child_env(out))[0]), f"log: logs/{n}.log"))  # fmt: skip
    s = steps["reproduce"]
    s.outputs = ["reproduce/reproduce.md", "reproduce/reproduce.csv"]
    if root is None:
        s.status = "skipped, no data"
    else:
        run_step(s, clock, 1e9, 5.0, lambda b: step_reproduce(args, out, root, clock, logs / "reproduce.log"))
    e = steps["environment"]
    e.outputs = ["environment.txt", "environment.json"]
    run_step(e, None, max(clock.reserve, 1.0), 0.0, lambda b: step_environment(out, b))  # always, in its reserve
    summary = write_summary(out, args, list(steps.values()), clock, t_wall)
    if args.bundle:
        write_bundle(out, args.bundle)
    print((out / "summary.md").read_text())
    return summary


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder (a second run with it resumes)")
    p.add_argument("--minutes", type=float, default=10.0, help="hard deadline for the whole command (default 10)")
    p.add_argument("--dry-run", action="store_true", help="the same steps on the CPU with tiny sizes (~1 minute)")
    p.add_argument("--pack", default=str(REPO / ".device_data" / "pack"), help="packed CIFAR-10-LT (pack_cifar_lt)")
    p.add_argument("--data-root", help="a CIFAR folder to use instead of the pack")
    p.add_argument("--rows", type=lambda s: [r for r in s.split(",") if r], help="reproduction rows, in order "
                   f"(default: {','.join(PRIORITY)})")  # fmt: skip
    p.add_argument("--redo", action="store_true", help="repeat steps that an earlier run with this --out finished")
    p.add_argument("--bundle", type=Path, help="also write the small outputs as this .tar.gz (for $OUT)")
    return p.parse_args(argv)


if __name__ == "__main__":
    main()
