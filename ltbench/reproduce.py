"""``ltbench reproduce <table>``: re-run a published table with its recipe and put ltbench's numbers beside the papers'.

A table (``ltbench/published/<name>.yaml``) lists rows (a strategy preset, optional overrides) with the published
value of each at each imbalance ratio, its source and how that source was checked. ``reproduce`` runs every row at
every ratio it has a published number for, once per seed, as ordinary ``ltbench train`` processes (one crashed job
does not stop the others), then writes ``reproduce.md`` / ``reproduce.csv``: mean ± std over seeds, the published
value, the difference and the source.

Invariants:

- every job has a fixed run directory, ``<out>/runs/<data>/<strategy>/<config hash>_seed<seed>``, so a second
  invocation with ``--resume`` skips finished runs and continues interrupted ones from their checkpoints (ltbench's
  own resume); without ``--resume`` an output directory that already holds a reproduction is refused;
- decoupled rows (cRT, LWS, tau-norm, ...) share their stage 1 through the stage cache in ``<out>/stage_cache``: the
  first job of a stage-1 group trains it, the others of the group start only once it has finished;
- the comparison uses only the records of the planned jobs (never other runs in the directory) and never crashes
  on a bad record: a missing or broken one is listed as such.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ltbench.errors import ConfigError, LtbenchError
from ltbench.rundir import atomic_write_json, atomic_write_text

CONFIDENCE = ("checked", "secondary", "unchecked")
MANIFEST = "reproduce.json"


# ---------------------------------------------------------------------------------------------- the tables


@dataclass(frozen=True)
class Published:
    """One published number: top-1 accuracy (%) and how the source wrote it."""

    top1: float
    as_published: str  # "error 29.64" | "accuracy 77.32"
    source: str
    confidence: str


@dataclass(frozen=True)
class Row:
    label: str
    strategy: str
    overrides: tuple[str, ...]
    published: dict[float, Published]
    note: str = ""


@dataclass(frozen=True)
class Table:
    name: str
    title: str
    dataset: str
    seeds: tuple[int, ...]
    overrides: tuple[str, ...]
    rows: tuple[Row, ...]

    @property
    def ratios(self) -> list[float]:
        return sorted({r for row in self.rows for r in row.published}, reverse=True)


def list_tables() -> list[str]:
    files = resources.files("ltbench.published").iterdir()
    return sorted(f.name[: -len(".yaml")] for f in files if f.name.endswith(".yaml"))


def _published(entry: Any, where: str) -> tuple[float, Published]:
    if not isinstance(entry, dict) or "ratio" not in entry or ("error" in entry) == ("accuracy" in entry):
        raise ConfigError(f"{where}: each published entry needs a ratio and exactly one of error / accuracy")
    if entry.get("confidence") not in CONFIDENCE or not entry.get("source"):
        raise ConfigError(f"{where}: each published entry needs a source and a confidence ({', '.join(CONFIDENCE)})")
    kind = "error" if "error" in entry else "accuracy"
    value = float(entry[kind])
    if not 0 <= value <= 100:
        raise ConfigError(f"{where}: {kind} {value} is not a percentage")
    top1 = 100.0 - value if kind == "error" else value
    return float(entry["ratio"]), Published(round(top1, 4), f"{kind} {value:g}", entry["source"], entry["confidence"])


def _row(d: Any, where: str) -> Row:
    if not isinstance(d, dict) or not d.get("strategy") or not d.get("published"):
        raise ConfigError(f"{where}: each row needs a strategy and published values")
    pub = dict(_published(e, f"{where} ({d['strategy']})") for e in d["published"])
    return Row(str(d.get("label", d["strategy"])), str(d["strategy"]), tuple(d.get("overrides") or ()), pub,
               " ".join(str(d.get("note", "")).split()))  # fmt: skip


def load_table(name: str) -> Table:
    """The table ``name`` from the package's published data, checked (one clear error line if it is not valid)."""
    if name not in list_tables():
        raise ConfigError(f"no published table {name!r}; choose one of: {', '.join(list_tables())}")
    text = (resources.files("ltbench.published") / f"{name}.yaml").read_text()
    d = yaml.safe_load(text)
    where = f"ltbench/published/{name}.yaml"
    if not isinstance(d, dict) or d.get("name") != name or not d.get("rows") or not d.get("dataset"):
        raise ConfigError(f"{where}: needs name: {name}, a dataset and rows")
    rows = tuple(_row(r, where) for r in d["rows"])
    return Table(name, str(d.get("title", name)), str(d["dataset"]), tuple(int(s) for s in d.get("seeds", [0])),
                 tuple(d.get("overrides") or ()), rows)  # fmt: skip


# ------------------------------------------------------------------------------------------------ the plan


@dataclass
class Job:
    row: Row
    ratio: float
    seed: int
    overrides: list[str]  # the ltbench train overrides, without the run directory
    config_hash: str
    run_dir: Path
    stage1_epochs: int
    stage2_epochs: int  # 0: no classifier stage, or a post-hoc one
    group: str | None  # the stage-1 cache a decoupled job shares with the others of its group
    status: str = "pending"  # pending | done | running | failed
    wall_s: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.row.label} @ {self.ratio:g}, seed {self.seed}"

    def cost(self, stage1_cached: bool) -> int:
        """Epochs this job will train (the unit of the ETA); a post-hoc stage counts as one."""
        return (0 if stage1_cached else self.stage1_epochs) + max(self.stage2_epochs, 1 if self.group else 0)


def _quote(value: str) -> str:
    """A value Hydra's override grammar reads back verbatim."""
    if all(c.isalnum() or c in "._/-+~:" for c in value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def plan(
    table: Table, out: Path, extras: list[str], seeds: list[int] | None = None, ratios: list[float] | None = None,
    rows: list[str] | None = None,
) -> list[Job]:  # fmt: skip
    """Every (row, ratio, seed) job, in an order that lets decoupled rows reuse a stage 1 trained once."""
    from hydra import compose, initialize_config_module

    from ltbench.config import to_schema
    from ltbench.identity import config_hash, data_tag

    unknown = sorted(set(rows or []) - {r.strategy for r in table.rows})
    if unknown:
        raise ConfigError(f"table {table.name} has no row {', '.join(unknown)}; rows: "
                          + ", ".join(r.strategy for r in table.rows))  # fmt: skip
    jobs = []
    with initialize_config_module("ltbench.conf", version_base="1.3"):
        for ratio in table.ratios if ratios is None else ratios:
            for row in table.rows:
                if ratio not in row.published or (rows and row.strategy not in rows):
                    continue
                for seed in table.seeds if seeds is None else seeds:
                    ov = [*table.overrides, f"dataset={table.dataset}", f"dataset.imbalance_ratio={ratio:g}",
                          f"strategy={row.strategy}", *row.overrides, f"seed={seed}", *extras,
                          f"results_dir={_quote(str(out))}"]  # fmt: skip
                    try:
                        cfg = to_schema(compose("train", overrides=ov))
                    except LtbenchError:
                        raise
                    except Exception as e:  # Hydra's composition errors: one line
                        raise ConfigError(f"{row.strategy} at ratio {ratio:g}: {str(e).splitlines()[0]}") from e
                    h = config_hash(cfg)
                    run_dir = out / "runs" / data_tag(cfg) / cfg.strategy / f"{h[:8]}_seed{seed}"
                    s2 = getattr(getattr(cfg.classifier, "schedule", None), "epochs", 0)
                    group = _stage1_group(cfg) if cfg.classifier is not None else None
                    jobs.append(Job(row, ratio, seed, ov, h, run_dir, cfg.schedule.epochs, s2, group))
    return jobs


def _stage1_group(cfg: Any) -> str:
    """The identity of a run's stage 1 (what the stage cache is keyed on, short of the data split's hash, which
    depends only on the settings below and whether the run moves validation images out of the subset)."""
    from ltbench.identity import stage_key
    from ltbench.runner import validation_holdout
    from ltbench.stages import TrainStage

    return stage_key(cfg, TrainStage.sections, None, f"holdout={validation_holdout(cfg)}", "train")


# --------------------------------------------------------------------------------------------- the records


def read_record(run_dir: Path) -> tuple[dict | None, str | None]:
    """(the run's record, why it cannot be used): never raises."""
    import json

    from ltbench.records import problem

    path = run_dir / "metrics.json"
    if not path.exists():
        return None, "not run"
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return None, f"unreadable record: {type(e).__name__}"
    if not isinstance(d, dict):
        return None, "the record is not a JSON object"
    reason = problem(d)
    if reason is None and d.get("status") != "completed":
        reason = str(d.get("status", "unknown status"))
    return d, reason


def is_done(job: Job) -> bool:
    d, reason = read_record(job.run_dir)
    return d is not None and reason is None and d.get("config_hash") == job.config_hash


# --------------------------------------------------------------------------------------------- running jobs


@dataclass
class _Running:
    job: Job
    proc: subprocess.Popen
    started: float
    cost: int
    cached: bool
    task: Any
    log: Any


def _rows(path: Path) -> int:
    try:
        return max(len(path.read_text().strip().splitlines()) - 1, 0)
    except OSError:
        return 0


@dataclass
class Executor:
    """Runs the jobs as ``ltbench train`` processes, ``n_jobs`` at a time, with progress and an ETA (in epochs)."""

    jobs: list[Job]
    out: Path
    n_jobs: int = 1
    console: Console = field(default_factory=lambda: Console(stderr=True))
    extra: list[str] = field(default_factory=list)  # runtime settings for every job (num_threads, progress)
    poll_s: float = 1.0

    def __post_init__(self) -> None:
        self.produced = {j.group for j in self.jobs if j.group and j.status == "done"}
        self.pending = [j for j in self.jobs if j.status != "done"]
        self.running: list[_Running] = []

    def _next(self) -> Job | None:
        busy = {r.job.group for r in self.running}
        for job in self.pending:
            if job.group is None or job.group in self.produced or job.group not in busy:
                return job
        return None

    def _estimate(self) -> int:
        seen, total = set(self.produced), 0
        for job in self.pending:
            total += job.cost(job.group in seen)
            if job.group:
                seen.add(job.group)
        return total

    def _start(self, job: Job, progress: Progress) -> None:
        cached = job.group is not None and job.group in self.produced
        cmd = [sys.executable, "-m", "ltbench", "train", *job.overrides,
               f"hydra.run.dir={_quote(str(job.run_dir))}", *self.extra]  # fmt: skip
        logs = self.out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log = open(logs / f"{job.run_dir.parent.name}_{job.run_dir.name}.log", "a")  # noqa: SIM115
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        task = progress.add_task(f"  {job.name}", total=job.cost(cached))
        self.pending.remove(job)
        job.status = "running"
        self.running.append(_Running(job, proc, time.monotonic(), job.cost(cached), cached, task, log))

    def _done_units(self, r: _Running) -> int:
        n = _rows(r.job.run_dir / "classifier_epochs.csv")
        if not r.cached:
            n += _rows(r.job.run_dir / "epochs.csv")
        return min(n, r.cost)

    def _finish(self, r: _Running, progress: Progress, overall: Any) -> None:
        r.log.close()
        job = r.job
        job.wall_s = time.monotonic() - r.started
        progress.remove_task(r.task)
        self.running.remove(r)
        d, reason = read_record(job.run_dir)
        if r.proc.returncode == 0 and reason is None:
            job.status = "done"
            if job.group:
                self.produced.add(job.group)
            top1 = (d or {}).get("top1")
            msg = (
                f"[green]done[/] {job.name}: top-1 {top1:.2f}" if isinstance(top1, (int, float)) else f"done {job.name}"
            )
            self.console.print(f"{msg} ({_duration(job.wall_s)})", soft_wrap=True)
        else:
            job.status = "failed"
            log = self.out / "logs" / f"{job.run_dir.parent.name}_{job.run_dir.name}.log"
            self.console.print(f"[red]failed[/] {job.name} (exit {r.proc.returncode}; {reason}); log: {log}",
                               soft_wrap=True)  # fmt: skip
        progress.update(overall, total=progress.tasks[overall].completed + self._estimate() + self._running_left())

    def _running_left(self) -> int:
        return sum(r.cost - self._done_units(r) for r in self.running)

    def run(self) -> None:
        """Run every pending job; Ctrl-C / SIGTERM stop the running ones at a checkpoint (resumable)."""
        from ltbench.runner import Terminated, sigterm_interrupts

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("epochs"),
                   TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())  # fmt: skip
        with Progress(*columns, console=self.console, transient=False) as progress:
            overall = progress.add_task(f"{len(self.pending)} runs", total=self._estimate())
            base = 0
            try:
                with sigterm_interrupts():
                    while self.pending or self.running:
                        while len(self.running) < self.n_jobs and (job := self._next()) is not None:
                            self._start(job, progress)
                        time.sleep(self.poll_s)
                        for r in list(self.running):
                            progress.update(r.task, completed=self._done_units(r))
                            if r.proc.poll() is not None:
                                base += r.cost if r.proc.returncode == 0 else self._done_units(r)
                                self._finish(r, progress, overall)
                        live = sum(self._done_units(r) for r in self.running)
                        progress.update(overall, completed=base + live)
            except KeyboardInterrupt as e:
                self._stop(isinstance(e, Terminated))
                raise

    def _stop(self, term: bool) -> None:
        """Let the running jobs write their checkpoint and stop (they saw the terminal's Ctrl-C themselves)."""
        for r in self.running:
            if term:
                r.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        for r in self.running:
            try:
                r.proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                r.proc.send_signal(signal.SIGINT)
        for r in self.running:
            try:
                r.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                r.proc.kill()
            r.log.close()


def _duration(seconds: float) -> str:
    s = round(seconds)
    h, m = divmod(s // 60, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s % 60:02d}s"


# ---------------------------------------------------------------------------------------------- the report


def _stats(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n if n else math.nan
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return mean, std


def compare(table: Table, jobs: list[Job]) -> list[dict[str, Any]]:
    """One line per (ratio, row): ltbench's mean ± std over the completed seeds beside the published number."""
    out = []
    for ratio in sorted({j.ratio for j in jobs}, reverse=True):
        for row in table.rows:
            mine = [j for j in jobs if j.ratio == ratio and j.row is row]
            if not mine:
                continue
            recs = [d for j in mine for d, reason in [read_record(j.run_dir)] if reason is None and d]
            line: dict[str, Any] = {"ratio": ratio, "label": row.label, "strategy": row.strategy,
                                    "seeds": len(recs), "planned": len(mine)}  # fmt: skip
            for key in ("top1", "many", "medium", "few"):
                vals = [float(d[key]) for d in recs if isinstance(d.get(key), (int, float))]
                line[f"{key}_mean"], line[f"{key}_std"] = _stats(vals)
            pub = row.published[ratio]
            line.update(published=pub.top1, as_published=pub.as_published, source=pub.source,
                        confidence=pub.confidence, note=row.note)  # fmt: skip
            line["delta"] = line["top1_mean"] - pub.top1 if recs else math.nan
            line["epochs"] = sorted({int(d.get("epochs_completed", 0)) for d in recs})
            line["wall_s"] = sum(float(d.get("wall_time_s") or 0) for d in recs)
            line["missing"] = [f"seed {j.seed}: {read_record(j.run_dir)[1]}" for j in mine if j.status != "done"
                               and read_record(j.run_dir)[1] is not None]  # fmt: skip
            out.append(line)
    return out


def _pm(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "—"
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def to_markdown(table: Table, lines: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    md = [f"# {table.title}", "",
          f"`ltbench reproduce {table.name}`: test top-1 accuracy (%) at the final epoch, mean ± std over seeds "
          "(sample std), beside the published number (converted to accuracy where the paper gives the error). "
          "Δ = ltbench − published; ✓ within 1 point. Confidence: checked (the authors' repository), secondary "
          "(quoted by another source), unchecked (the paper's table, not readable here).", "",
          f"Epochs run: {meta['epochs']}; device: {meta['device']}; runs: {meta['runs']}; "
          f"training time (sum over runs): {_duration(meta['wall_s'])}; ltbench {meta['version']} ({meta['git']}).",
          "", "| ratio | method | ltbench top-1 (seeds) | many | medium | few | published | Δ | confidence | source |",
          "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for x in lines:
        ok = "" if math.isnan(x["delta"]) else (" ✓" if abs(x["delta"]) <= 1 else " ✗")
        delta = "—" if math.isnan(x["delta"]) else f"{x['delta']:+.2f}{ok}"
        md.append(f"| {x['ratio']:g} | {x['label']} | {_pm(x['top1_mean'], x['top1_std'])} ({x['seeds']}/"
                  f"{x['planned']}) | {_pm(x['many_mean'], x['many_std'])} | {_pm(x['medium_mean'], x['medium_std'])}"
                  f" | {_pm(x['few_mean'], x['few_std'])} | {x['published']:.2f} ({x['as_published']}) | {delta} | "
                  f"{x['confidence']} | {x['source']} |")  # fmt: skip
    notes = [f"- **{x['label']}** (ratio {x['ratio']:g}): {x['note']}" for x in lines if x["note"]]
    missing = [f"- {x['label']} (ratio {x['ratio']:g}): {'; '.join(x['missing'])}" for x in lines if x["missing"]]
    if notes:
        md += ["", "Why a row may differ from its published number:", "", *dict.fromkeys(notes)]
    if missing:
        md += ["", "Runs missing from the table:", "", *missing]
    return "\n".join(md) + "\n"


def to_csv(lines: list[dict[str, Any]]) -> str:
    import csv
    import io

    keys = ["ratio", "strategy", "label", "seeds", "planned", "top1_mean", "top1_std", "many_mean", "medium_mean",
            "few_mean", "published", "as_published", "delta", "confidence", "source"]  # fmt: skip
    buf = io.StringIO()
    w = csv.DictWriter(buf, keys, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for x in lines:
        w.writerow({k: (round(v, 4) if isinstance(v, float) and not math.isnan(v) else v) for k, v in x.items()})
    return buf.getvalue()


def _meta(jobs: list[Job]) -> dict[str, Any]:
    import ltbench
    from ltbench.results import git_revision

    recs = [d for j in jobs for d, reason in [read_record(j.run_dir)] if reason is None and d]
    epochs = sorted({int(d.get("epochs_completed", 0)) for d in recs}) or ["—"]
    devices = sorted({str(d.get("device", "?")) for d in recs}) or ["—"]
    return {"epochs": ", ".join(map(str, epochs)), "device": ", ".join(devices), "runs": f"{len(recs)}/{len(jobs)}",
            "wall_s": sum(float(d.get("wall_time_s") or 0) for d in recs), "version": ltbench.__version__,
            "git": _revision(git_revision())}  # fmt: skip


def _revision(g: dict[str, Any]) -> str:
    if not g.get("commit"):
        return "no git revision"
    return f"{g['commit'][:12]}{' + local changes' if g.get('dirty') else ''}"


def write_report(table: Table, jobs: list[Job], out: Path, console: Console) -> list[dict[str, Any]]:
    """reproduce.md / reproduce.csv in ``out`` and the table on the console."""
    from rich.table import Table as RichTable

    lines = compare(table, jobs)
    atomic_write_text(out / "reproduce.md", to_markdown(table, lines, _meta(jobs)))
    atomic_write_text(out / "reproduce.csv", to_csv(lines))
    t = RichTable(title=f"{table.title}: top-1 %, mean ± std over seeds")
    for col in ("ratio", "method", "ltbench", "published", "Δ", "confidence"):
        t.add_column(col)
    for x in lines:
        delta = "—" if math.isnan(x["delta"]) else f"{x['delta']:+.2f}"
        style = "" if math.isnan(x["delta"]) else ("green" if abs(x["delta"]) <= 1 else "yellow")
        t.add_row(f"{x['ratio']:g}", x["label"], f"{_pm(x['top1_mean'], x['top1_std'])} ({x['seeds']})",
                  f"{x['published']:.2f}", f"[{style}]{delta}[/]" if style else delta, x["confidence"])  # fmt: skip
    Console().print(t)
    console.print(f"wrote {out / 'reproduce.md'} and {out / 'reproduce.csv'}", soft_wrap=True)
    return lines


# --------------------------------------------------------------------------------------------- the command


@dataclass
class Request:
    """What the user asked for (``ltbench reproduce`` arguments)."""

    table: str
    out: Path | None = None
    resume: bool = False
    seeds: list[int] | None = None
    ratios: list[float] | None = None
    rows: list[str] | None = None
    jobs: int = 1
    dry_run: bool = False
    report_only: bool = False
    extras: list[str] = field(default_factory=list)


def _manifest(req: Request, out: Path) -> dict[str, Any]:
    """Check ``out`` against the request: a new reproduction needs an empty place, a resumed one the same table and
    overrides; the selection (seeds, ratios, rows) of a resumed one defaults to the saved one."""
    import json

    path = out / MANIFEST
    saved = json.loads(path.read_text()) if path.exists() else None
    continuing = req.resume or req.report_only
    if saved is None and continuing and not req.dry_run:
        raise ConfigError(f"{out} holds no reproduction to {'resume' if req.resume else 'report'}")
    if saved is not None and not continuing and not req.dry_run:
        raise ConfigError(f"{out} already holds a reproduction of {saved.get('table')} (started {saved.get('started')})"
                          ": pass --resume to continue it, or --out for a new one")  # fmt: skip
    if saved is not None and continuing:
        if saved.get("table") != req.table:
            raise ConfigError(f"{out} holds a reproduction of {saved.get('table')}, not {req.table}")
        if req.extras and saved.get("extras") != req.extras:
            raise ConfigError(f"{out} was started with the overrides {saved.get('extras')}; resume it with those")
        req.extras = list(saved.get("extras") or [])
        req.seeds = req.seeds if req.seeds is not None else saved.get("seeds")
        req.ratios = req.ratios if req.ratios is not None else saved.get("ratios")
        req.rows = req.rows if req.rows is not None else saved.get("rows")
        return saved
    return {"table": req.table, "extras": req.extras, "seeds": req.seeds, "ratios": req.ratios, "rows": req.rows,
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip


def _show_plan(jobs: list[Job], console: Console) -> None:
    from rich.table import Table as RichTable

    t = RichTable(title=f"{len(jobs)} runs")
    for col in ("run", "status", "epochs to train", "stage 1", "run directory"):
        t.add_column(col)
    seen = {j.group for j in jobs if j.group and j.status == "done"}
    total = 0
    for j in jobs:
        shared = j.group is not None and j.group in seen
        if j.group:
            seen.add(j.group)
        cost = 0 if j.status == "done" else j.cost(shared)
        total += cost
        t.add_row(j.name, j.status, str(cost), "shared" if shared else "trained", str(j.run_dir))
    console.print(t)
    console.print(f"{sum(j.status == 'done' for j in jobs)} of {len(jobs)} runs complete; {total} epochs to train")


def reproduce(req: Request, console: Console | None = None) -> int:
    """Run (or continue) a reproduction and write its comparison; returns the exit code (1 if a job failed)."""
    console = console or Console(stderr=True)
    table = load_table(req.table)
    if req.jobs < 1:
        raise ConfigError("--jobs must be >= 1")
    out = (req.out or Path("results") / "reproduce" / table.name).resolve()
    manifest = _manifest(req, out)
    jobs = plan(table, out, req.extras, req.seeds, req.ratios, req.rows)
    if not jobs:
        raise ConfigError(f"nothing to run: no row of {table.name} has a published number at the ratios asked for")
    for j in jobs:
        j.status = "done" if is_done(j) else ("partial" if j.run_dir.exists() else "pending")
    if req.dry_run:
        _show_plan(jobs, console)
        return 0
    if not req.report_only:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / MANIFEST, manifest)
        done = sum(j.status == "done" for j in jobs)
        console.print(f"{table.title}: {len(jobs)} runs ({done} already complete) in {out}", soft_wrap=True)
        threads = [] if any(e.startswith("num_threads=") for e in req.extras) or req.jobs == 1 else \
            [f"num_threads={max(1, (os.cpu_count() or 1) // req.jobs)}"]  # fmt: skip
        try:
            Executor(jobs, out, req.jobs, console, [*threads, "progress=false"]).run()
        except KeyboardInterrupt:
            console.print(f"[yellow]interrupted[/]; continue with: ltbench reproduce {table.name} --resume "
                          f"--out {out}", soft_wrap=True)  # fmt: skip
            raise
    write_report(table, jobs, out, console)
    failed = [j for j in jobs if j.status == "failed"]
    if failed:
        console.print(f"[red]{len(failed)} run(s) failed[/]; fix the cause and run again with --resume", soft_wrap=True)
    return 1 if failed else 0
