"""scripts/device_check.py (issue 22): the one command of a device session, checked by its CPU dry run.

The dry run is the same sequence of steps with tiny sizes: the tables of each step are written, the summary names
every step with its status, a second invocation resumes (finished steps are not repeated), and the deadline is
hard: with almost no time, the later steps are "skipped, deadline" and the command still ends with its summary.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "device_check.py"
sys.path.insert(0, str(REPO / "scripts"))
import device_check  # noqa: E402


def _run(out: Path, *args: str, timeout: float = 900) -> tuple[dict, float]:
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--dry-run", *args], capture_output=True,
                       text=True, timeout=timeout, cwd=REPO)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((out / "summary.json").read_text()), time.monotonic() - t0


@pytest.mark.slow
def test_dry_run_writes_every_table_and_a_summary_of_every_step_then_resumes(tmp_path):
    out = tmp_path / "dc"
    summary, _ = _run(out, "--minutes", "10")  # about a minute on a free CPU; the boxes leave room for a busy one
    status = {s["name"]: s["status"] for s in summary["steps"]}
    assert list(status) == list(device_check.STEPS)
    assert status == dict.fromkeys(device_check.STEPS, "ok"), status
    assert "| ltbench | none | fp32 |" in (out / "bench" / "throughput.md").read_text()
    assert "| bare eager step |" in (out / "bench" / "throughput.md").read_text()
    assert [r["jobs"] for r in json.loads((out / "bench" / "packing.json").read_text())["rows"]] == [1, 2]
    assert "| adaptformer | True | 1 |" in (out / "bench" / "foundation.md").read_text()  # the ViT step, tiny here
    assert (out / "bench" / "loading" / "loading.md").exists()  # the image pipeline, tiny here
    repro = (out / "reproduce" / "reproduce.md").read_text()
    assert "| 100 | CE (ERM) |" in repro and "| 100 | LDAM-DRW |" in repro
    rows = summary["reproduce_rows"]
    assert list(rows) == device_check.PRIORITY[:3] and all(r["status"] == "completed" for r in rows.values())
    assert all(r["epochs"] == 2 for r in rows.values())  # experiment=smoke: 2 epochs each
    md = (out / "summary.md").read_text()
    assert all(f"| {name} | ok |" in md for name in device_check.STEPS) and "## bench/packing.md" in md
    assert "torch" in (out / "environment.txt").read_text() and summary["deadline_honoured"]
    # a second invocation resumes: measured steps are not repeated, finished runs are not retrained
    before = {p: p.stat().st_mtime for p in out.rglob("metrics.json")}
    again, _ = _run(out, "--minutes", "10", "--bundle", str(tmp_path / "b.tgz"))
    status = {s["name"]: s["status"] for s in again["steps"]}
    assert status["throughput"] == status["packing"] == "skipped, done before" and status["reproduce"] == "ok"
    assert all(p.stat().st_mtime == t for p, t in before.items())
    import tarfile

    with tarfile.open(tmp_path / "b.tgz") as tar:
        names = tar.getnames()
    assert "dc/summary.md" in names and not any(n.endswith(".pt") or "/data/" in n for n in names)


@pytest.mark.slow
def test_a_tiny_deadline_skips_the_later_steps_and_still_writes_the_summary(tmp_path):
    out = tmp_path / "dc"
    summary, seconds = _run(out, "--minutes", "0.1")  # 6 s in all: no step has its minimum time left
    status = {s["name"]: s["status"] for s in summary["steps"]}
    assert status["data"] == "ok"
    assert status["throughput"] == status["packing"] == status["reproduce"] == device_check.SKIPPED_DEADLINE
    assert status["environment"] == "ok"
    assert seconds < 6 + 15  # the deadline, plus the interpreter's start
    assert "| packing | skipped, deadline |" in (out / "summary.md").read_text()


def test_the_reproduction_runs_the_most_informative_rows_first_and_every_row_of_the_table():
    from ltbench.reproduce import load_table

    rows = [r.name for r in load_table(device_check.TABLE).rows]
    assert sorted(device_check.PRIORITY) == sorted(rows)
    assert device_check.PRIORITY[:5] == ["ce", "ldam_drw", "logit_adjust", "balanced_softmax", "crt"]


def test_packing_choice_reads_the_packing_table(tmp_path):
    bench = tmp_path / "bench"
    bench.mkdir()
    rates = {1: 9000.0, 2: 17000.0, 4: 30000.0, 8: 30500.0}  # 8 is not 5 % better than 4: 4 runs
    (bench / "packing.json").write_text(json.dumps({"rows": [{"jobs": n, "aggregate_images_per_s": r}
                                                            for n, r in rates.items()]}))  # fmt: skip
    n, why = device_check.best_jobs(tmp_path, dry_run=False)
    assert n == min(4, max(1, device_check.os.cpu_count() // 2)) and "packing table" in why
    assert device_check.best_jobs(tmp_path / "none", dry_run=False)[1].startswith("pack rule")


def test_a_step_past_its_box_is_killed_with_its_whole_process_group(tmp_path):
    """The time box of every step: the step's process and its children (bench_packing's workers, the runs of
    ltbench reproduce) get SIGTERM when the box ends, so nothing outlives the deadline."""
    child = tmp_path / "child.pid"
    cmd = [sys.executable, "-c", "import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', "
           f"'import time; time.sleep(60)']); open({str(child)!r}, 'w').write(str(p.pid)); time.sleep(60)"]  # fmt: skip
    t0 = time.monotonic()
    rc, seconds = device_check.run_boxed(cmd, tmp_path / "log", 3.0)
    assert rc is None and seconds < 15 and time.monotonic() - t0 < 15
    time.sleep(0.5)
    assert not _alive(int(child.read_text()))  # the grandchild is gone too
    assert device_check.status_of(rc) == "timeout" and device_check.status_of(0) == "ok"


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for a parent that does not reap it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (
        status.exists() and "\tZ" in next(ln for ln in status.read_text().splitlines() if ln.startswith("State"))
    )
