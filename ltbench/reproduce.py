"""``ltbench reproduce <table>``: re-run a published table with its recipe and put ltbench's numbers beside the papers'.

A table (``ltbench/published/<name>.yaml``) lists rows (a strategy preset, optional overrides) with the published
value of each at each imbalance ratio (classification) or named setting (``settings:``, each a list of overrides;
regression tables), its source and how that source was checked. A table names its ``metric`` (``top1``, the
default, higher is better; ``mae`` / ``mse``, lower is better), and an entry may give the per-shot-group values
(``many`` / ``medium`` / ``few``) beside the overall one, the ``protocol`` its source selected on, and ``overrides``
that its run alone needs (a per-setting budget). ``reproduce`` runs every row at
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

# checked: read in the authors' repository; secondary: quoted by a second public source; unchecked: the paper's
# table as recalled; measured: the reference code itself (or a transcription of it) run here, no paper number.
CONFIDENCE = ("checked", "secondary", "unchecked", "measured")
# How the source chose the number it reports: the best test epoch (most long-tail code), the epoch chosen on a
# validation split (the DIR papers), the last epoch, or not known. ltbench runs each row with the matching ``select=``.
PROTOCOLS = {"best_test": "test_oracle", "val": "val", "last": "last", "unknown": "last"}
METRICS = {"top1": True, "mae": False, "mse": False}  # the metrics a table may compare: higher is better?
GROUP_KEYS = ("many", "medium", "few")
MANIFEST = "reproduce.json"


# ---------------------------------------------------------------------------------------------- the tables


@dataclass(frozen=True)
class Published:
    """One published number in the table's metric (top-1 accuracy in %, or an error such as MAE), how the source
    wrote it, and the per-shot-group values where the source gives them."""

    value: float
    as_published: str  # "error 29.64" | "accuracy 77.32" | "mae 7.77"
    source: str
    confidence: str
    groups: tuple[tuple[str, float], ...] = ()
    protocol: str = "unknown"  # one of PROTOCOLS: how the source selected the epoch it reports
    overrides: tuple[str, ...] = ()  # what this number's run needs beyond its row's (a per-setting budget)

    @property
    def select(self) -> str:
        """ltbench's ``select=`` that compares like with like."""
        return PROTOCOLS[self.protocol]

    @property
    def top1(self) -> float:  # the classification tables' name for the value
        return self.value


@dataclass(frozen=True)
class Row:
    """A method of the table: a strategy preset or an experiment preset (or both), with overrides; ``name`` (its
    ``--rows`` name, unique in the table) defaults to the strategy, else the experiment."""

    label: str
    strategy: str | None
    overrides: tuple[str, ...]
    published: dict[Any, Published]  # by imbalance ratio (float) or setting name (str)
    note: str = ""
    experiment: str | None = None
    name: str = ""

    @property
    def presets(self) -> list[str]:
        return [f"{k}={v}" for k, v in (("experiment", self.experiment), ("strategy", self.strategy)) if v]


@dataclass(frozen=True)
class Table:
    name: str
    title: str
    dataset: str
    seeds: tuple[int, ...]
    overrides: tuple[str, ...]
    rows: tuple[Row, ...]
    metric: str = "top1"
    settings: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (name, overrides); empty: keyed by imbalance ratio
    tolerance: float = 1.0  # |ltbench - published| within it is marked as reproduced (in the metric's units)

    @property
    def ratios(self) -> list[Any]:
        """The ratios (largest first) or, for a table of settings, the settings in the table's order."""
        keys = {r for row in self.rows for r in row.published}
        if self.settings:
            return [name for name, _ in self.settings if name in keys]
        return sorted(keys, reverse=True)

    @property
    def higher_is_better(self) -> bool:
        return METRICS[self.metric]

    def key_overrides(self, key: Any) -> list[str]:
        """The overrides that select a ratio or a setting."""
        if self.settings:
            return list(dict(self.settings)[key])
        return [f"dataset.imbalance_ratio={key:g}"]


def fmt_key(key: Any) -> str:
    return f"{key:g}" if isinstance(key, (int, float)) else str(key)


def list_tables() -> list[str]:
    files = resources.files("ltbench.published").iterdir()
    return sorted(f.name[: -len(".yaml")] for f in files if f.name.endswith(".yaml"))


def _published(
    entry: Any, where: str, metric: str = "top1", settings: tuple[str, ...] = (), protocol: str = "unknown"
) -> tuple[Any, Published]:
    """One published entry: (its ratio or setting, the number); top-1 is given as ``error`` or ``accuracy`` (%), a
    regression metric under its own name, with optional ``many`` / ``medium`` / ``few`` and the ``protocol`` the
    source selected on (the table's ``protocol`` by default)."""
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: each published entry is a mapping")
    protocol = str(entry.get("protocol", protocol))
    if protocol not in PROTOCOLS:
        raise ConfigError(f"{where}: protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if (not settings and "ratio" not in entry) or (settings and entry.get("setting") not in settings):
        want = f"a setting (one of {', '.join(settings)})" if settings else "a ratio"
        raise ConfigError(f"{where}: each published entry needs {want}")
    if entry.get("confidence") not in CONFIDENCE or not entry.get("source"):
        raise ConfigError(f"{where}: each published entry needs a source and a confidence ({', '.join(CONFIDENCE)})")
    key = entry["setting"] if settings else float(entry["ratio"])
    groups = tuple((g, float(entry[g])) for g in GROUP_KEYS if entry.get(g) is not None)
    if metric != "top1":
        if not isinstance(entry.get(metric), (int, float)) or entry[metric] < 0:
            raise ConfigError(f"{where}: each published entry needs its {metric} (a number >= 0)")
        value = float(entry[metric])
        return key, Published(value, f"{metric} {value:g}", entry["source"], entry["confidence"], groups, protocol,
                              tuple(entry.get("overrides") or ()))  # fmt: skip
    if ("error" in entry) == ("accuracy" in entry):
        raise ConfigError(f"{where}: each published entry needs a ratio and exactly one of error / accuracy")
    kind = "error" if "error" in entry else "accuracy"
    value = float(entry[kind])
    if not 0 <= value <= 100:
        raise ConfigError(f"{where}: {kind} {value} is not a percentage")
    top1 = 100.0 - value if kind == "error" else value
    return key, Published(round(top1, 4), f"{kind} {value:g}", entry["source"], entry["confidence"], groups, protocol,
                          tuple(entry.get("overrides") or ()))  # fmt: skip


def _row(d: Any, where: str, metric: str = "top1", settings: tuple[str, ...] = (), protocol: str = "unknown") -> Row:
    if not isinstance(d, dict) or not (d.get("strategy") or d.get("experiment")) or not d.get("published"):
        raise ConfigError(f"{where}: each row needs a strategy or an experiment, and published values")
    name = str(d.get("name") or d.get("strategy") or d["experiment"])
    pub = dict(_published(e, f"{where} ({name})", metric, settings, protocol) for e in d["published"])
    strategy, experiment = d.get("strategy"), d.get("experiment")
    return Row(str(d.get("label", name)), None if strategy is None else str(strategy), tuple(d.get("overrides") or ()),
               pub, " ".join(str(d.get("note", "")).split()), None if experiment is None else str(experiment),
               name)  # fmt: skip


def load_table(name: str) -> Table:
    """The table ``name`` from the package's published data, checked (one clear error line if it is not valid)."""
    if name not in list_tables():
        raise ConfigError(f"no published table {name!r}; choose one of: {', '.join(list_tables())}")
    text = (resources.files("ltbench.published") / f"{name}.yaml").read_text()
    where = f"ltbench/published/{name}.yaml"
    try:
        d = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({str(e).splitlines()[0]})") from e
    if not isinstance(d, dict) or d.get("name") != name or not d.get("rows") or not d.get("dataset"):
        raise ConfigError(f"{where}: needs name: {name}, a dataset and rows")
    metric = str(d.get("metric", "top1"))
    if metric not in METRICS:
        raise ConfigError(f"{where}: metric must be one of {', '.join(METRICS)}, got {metric!r}")
    settings = tuple((str(k), tuple(v or ())) for k, v in (d.get("settings") or {}).items())
    rows = tuple(_row(r, where, metric, tuple(k for k, _ in settings), str(d.get("protocol", "unknown")))
                 for r in d["rows"])  # fmt: skip
    names = [r.name for r in rows]
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"{where}: two rows are named {twice}: give one of them a name")
    return Table(name, str(d.get("title", name)), str(d["dataset"]), tuple(int(s) for s in d.get("seeds", [0])),
                 tuple(d.get("overrides") or ()), rows, metric, settings,
                 float(d.get("tolerance", 1.0)))  # fmt: skip


# ------------------------------------------------------------------------------------------------ the plan


@dataclass
class Job:
    row: Row
    ratio: Any  # the imbalance ratio, or the setting's name
    seed: int
    overrides: list[str]  # the ltbench train overrides, without the run directory
    config_hash: str
    run_dir: Path
    stage1_epochs: int
    stage2_epochs: int  # 0: no classifier stage, or a post-hoc one
    group: str | None  # the stage-1 cache a decoupled job shares with the others of its group
    select: str = "last"  # the run's select=: the published number's protocol where the run's last stage has epochs
    status: str = "pending"  # pending | done | running | failed
    wall_s: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.row.label} @ {fmt_key(self.ratio)}, seed {self.seed}"

    def cost(self, stage1_cached: bool) -> int:
        """Epochs this job will train (the unit of the ETA); a post-hoc stage counts as one."""
        return (0 if stage1_cached else self.stage1_epochs) + max(self.stage2_epochs, 1 if self.group else 0)


def _quote(value: str) -> str:
    """A value Hydra's override grammar reads back verbatim."""
    if all(c.isalnum() or c in "._/-+~:" for c in value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def plan(
    table: Table, out: Path, extras: list[str], seeds: list[int] | None = None, ratios: list[Any] | None = None,
    rows: list[str] | None = None,
) -> list[Job]:  # fmt: skip
    """Every (row, ratio, seed) job, in an order that lets decoupled rows reuse a stage 1 trained once."""
    from hydra import compose, initialize_config_module

    from ltbench.config import to_schema
    from ltbench.identity import config_hash, data_tag

    unknown = sorted(set(rows or []) - {r.name for r in table.rows})
    if unknown:
        raise ConfigError(f"table {table.name} has no row {', '.join(unknown)}; rows: "
                          + ", ".join(r.name for r in table.rows))  # fmt: skip
    jobs = []
    with initialize_config_module("ltbench.conf", version_base="1.3"):
        for ratio in table.ratios if ratios is None else ratios:
            for row in table.rows:
                if ratio not in row.published or (rows and row.name not in rows):
                    continue
                for seed in table.seeds if seeds is None else seeds:
                    ov = [*table.overrides, f"dataset={table.dataset}", *table.key_overrides(ratio), *row.presets,
                          *row.overrides, *row.published[ratio].overrides, f"seed={seed}", *extras,
                          f"results_dir={_quote(str(out))}"]  # fmt: skip
                    cfg = _compose(compose, to_schema, ov, f"{row.name} at {fmt_key(ratio)}")
                    select = _select(cfg, row.published[ratio].select, extras)
                    if select != cfg.select:
                        ov.insert(-1, f"select={select}")
                        cfg = _compose(compose, to_schema, ov, f"{row.name} at {fmt_key(ratio)}")
                    h = config_hash(cfg)
                    run_dir = out / "runs" / data_tag(cfg) / (row.strategy or row.name) / f"{h[:8]}_seed{seed}"
                    s2_sched = cfg.classifier.training_schedule() if cfg.classifier is not None else None
                    s2 = s2_sched.epochs if s2_sched is not None else 0
                    group = _stage1_group(cfg) if cfg.classifier is not None else None
                    jobs.append(Job(row, ratio, seed, ov, h, run_dir, cfg.schedule.epochs, s2, group, select))
    return jobs


def _compose(compose: Any, to_schema: Any, ov: list[str], what: str) -> Any:
    try:
        return to_schema(compose("train", overrides=ov))
    except LtbenchError:
        raise
    except Exception as e:  # Hydra's composition errors: one line
        raise ConfigError(f"{what}: {str(e).splitlines()[0]}") from e


def _select(cfg: Any, wanted: str, extras: list[str]) -> str:
    """The ``select=`` of a job: the published number's protocol, unless the user set one for every job, or the
    run's last stage is computed from features (no epochs to choose from: its number is the last epoch's)."""
    if any(e.startswith("select=") for e in extras):
        return cfg.select
    if cfg.classifier is not None and cfg.classifier.training_schedule() is None:
        return "last"
    return wanted


def _stage1_group(cfg: Any) -> str:
    """The identity of what a run's last stage follows (the stage cache key, from the run's plan, short of the data
    split's hash, which depends only on the settings below and whether the run moves validation images out of the
    subset)."""
    from ltbench.runner import validation_holdout
    from ltbench.stages import shared_key

    key = shared_key(cfg, f"holdout={validation_holdout(cfg)}")
    assert key is not None  # a run with a classifier stage has a stage before it
    return key


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
    metric: str = "top1"  # what a finished job's line shows

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
            value = (d or {}).get(self.metric)
            name = "top-1" if self.metric == "top1" else self.metric.upper()
            msg = f"[green]done[/] {job.name}: {name} {value:.3g}" if isinstance(value, (int, float)) else \
                f"done {job.name}"  # fmt: skip
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
        from ltbench.cluster import Terminated, sigterm_interrupts

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


def _group_value(d: dict[str, Any], key: str, metric: str) -> Any:
    """A record's value of ``metric`` overall (``key`` = the metric) or in a shot group: a record's top-level
    ``many`` / ``medium`` / ``few`` are top-1 (classification) or MAE (regression); a regression record's other
    group errors are in ``group_errors``."""
    if key == metric or metric in ("top1", "mae"):
        return d.get(key)
    return ((d.get("group_errors") or {}).get(key) or {}).get(metric)


def compare(table: Table, jobs: list[Job]) -> list[dict[str, Any]]:
    """One line per (ratio or setting, row): ltbench's mean ± std over the completed seeds of the table's metric and
    of each shot group, beside the published numbers; ``delta`` = ltbench - published (overall)."""
    out = []
    planned = {j.ratio for j in jobs}
    for ratio in [k for k in table.ratios if k in planned]:
        for row in table.rows:
            mine = [j for j in jobs if j.ratio == ratio and j.row is row]
            if not mine:
                continue
            recs = [d for j in mine for d, reason in [read_record(j.run_dir)] if reason is None and d]
            line: dict[str, Any] = {"ratio": ratio, "label": row.label, "strategy": row.name,
                                    "seeds": len(recs), "planned": len(mine), "select": mine[0].select}  # fmt: skip
            for key in (table.metric, *GROUP_KEYS):
                vals = [v for d in recs if isinstance(v := _group_value(d, key, table.metric), (int, float))]
                line[f"{key}_mean"], line[f"{key}_std"] = _stats([float(v) for v in vals])
            lasts = [v for d in recs if (v := _last_epoch(d, table.metric)) is not None]
            line["last_mean"], line["last_std"] = _stats(lasts) if len(lasts) == len(recs) else (math.nan, math.nan)
            pub = row.published[ratio]
            line.update(published=pub.value, as_published=pub.as_published, source=pub.source, protocol=pub.protocol,
                        confidence=pub.confidence, note=row.note, published_groups=dict(pub.groups))  # fmt: skip
            line["delta"] = line[f"{table.metric}_mean"] - pub.value if recs else math.nan
            line["epochs"] = sorted({int(d.get("epochs_completed", 0)) for d in recs})
            line["wall_s"] = sum(float(d.get("wall_time_s") or 0) for d in recs)
            line.update(_cost(recs))
            line["missing"] = [f"seed {j.seed}: {read_record(j.run_dir)[1]}" for j in mine if j.status != "done"
                               and read_record(j.run_dir)[1] is not None]  # fmt: skip
            out.append(line)
    return out


def _last_epoch(d: dict[str, Any], metric: str) -> float | None:
    """A record's test value at the last epoch of its last stage: its headline number for ``select=last``, the
    selection's ``last`` scores for ``select=test_oracle``; None for ``select=val`` (its last epoch was scored on
    validation only)."""
    sel = d.get("selection") or {}
    if sel.get("protocol", "last") == "last":
        v = d.get(metric)
    elif sel.get("split") == "test":
        v = (sel.get("last") or {}).get(metric)
    else:
        return None
    return float(v) if isinstance(v, (int, float)) else None


def _cost(recs: list[dict[str, Any]]) -> dict[str, Any]:
    """What a line's runs cost (metrics.json ``cost``): image-steps per run (mean), the trainable parameters of the
    stage that trains most, and the sums over the runs of training seconds and GPU-hours."""
    costs: list[dict[str, Any]] = [c if isinstance(c := d.get("cost"), dict) else {} for d in recs]
    steps = [float(c.get("image_steps_total") or 0) for c in costs]
    trainable = [max((v for v in (c.get("trainable_parameters") or {}).values() if isinstance(v, (int, float))),
                     default=0) for c in costs]  # fmt: skip
    return {"image_steps": sum(steps) / len(steps) if steps else math.nan,
            "image_steps_sum": sum(steps), "trainable_parameters": max(trainable, default=0),
            "train_seconds": sum(float(c.get("train_seconds") or 0) for c in costs),
            "gpu_hours": sum(float(c.get("gpu_hours") or 0) for c in costs)}  # fmt: skip


def _count(n: float) -> str:
    """1234567 -> 1.23M: image-steps and parameters in a table cell."""
    if math.isnan(n):
        return "—"
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"


def _pm(mean: float, std: float, digits: int = 2) -> str:
    if math.isnan(mean):
        return "—"
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


SELECTED = {"test_oracle": "best test epoch (TEST-SELECTED)", "val": "epoch chosen on validation", "last": "last epoch"}


def _intro(table: Table) -> str:
    conf = ("Confidence: checked (the authors' repository), secondary (quoted by another source), unchecked (the "
            "paper's table, not readable here), measured (the reference code run here; no paper number).")  # fmt: skip
    like = ("Like with like: each row is run with the selection protocol of its published number (`protocol`: "
            "best_test → `select=test_oracle`, the best test epoch, which most long-tail code reports; val → "
            "`select=val`; last / unknown → the last epoch), shown in the `selected` column; `last epoch` is the same "
            "runs' final-epoch number, ltbench's own protocol. Δ compares the like-with-like column. Cost: "
            "image-steps per run (every stage) and the trainable parameters of the stage that trains most."
            )  # fmt: skip
    if table.metric == "top1":
        return (f"`ltbench reproduce {table.name}`: test top-1 accuracy (%), mean ± std over seeds (sample std), "
                "beside the published number (converted to accuracy where the paper gives the error). "
                f"Δ = ltbench − published; ✓ within {table.tolerance:g} point. {like} {conf}")  # fmt: skip
    return (f"`ltbench reproduce {table.name}`: test {table.metric.upper()} (lower is better), overall and per shot "
            "group of label bins, mean ± std over seeds (sample std); the published value in parentheses where the "
            f"source gives it. Δ = ltbench − published (overall); ✓ within {table.tolerance:g}. {like} {conf}")


def _cell(x: dict[str, Any], key: str, digits: int) -> str:
    pub = x.get("published_groups", {}).get(key)
    return _pm(x[f"{key}_mean"], x[f"{key}_std"], digits) + ("" if pub is None else f" ({pub:.{digits}f})")


def to_markdown(table: Table, lines: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    m, digits = table.metric, 2 if table.metric in ("top1", "mae") else 3
    col, what = ("setting", "setting") if table.settings else ("ratio", "ratio")
    metric = "top-1" if m == "top1" else m.upper()
    md = [f"# {table.title}", "", _intro(table), "",
          f"Epochs run: {meta['epochs']}; device: {meta['device']}; runs: {meta['runs']}; "
          f"training time (sum over runs): {_duration(meta['wall_s'])}; ltbench {meta['version']} ({meta['git']}).",
          f"Compute of the table: {_count(meta.get('image_steps', math.nan))} image-steps, "
          f"{_duration(meta.get('train_seconds', 0.0))} of training, {meta.get('gpu_hours', 0.0):.2f} GPU-hours "
          "(summed over its runs).",
          "", f"| {col} | method | ltbench {metric} (seeds) | selected | last epoch | many | medium | few | published "
          "| protocol | Δ | image-steps / run | trainable | confidence | source |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for x in lines:
        ok = "" if math.isnan(x["delta"]) else (" ✓" if abs(x["delta"]) <= table.tolerance else " ✗")
        delta = "—" if math.isnan(x["delta"]) else f"{x['delta']:+.{digits}f}{ok}"
        md.append(f"| {fmt_key(x['ratio'])} | {x['label']} | {_pm(x[f'{m}_mean'], x[f'{m}_std'], digits)} "
                  f"({x['seeds']}/{x['planned']}) | {SELECTED[x['select']]} | "
                  f"{_pm(x['last_mean'], x['last_std'], digits)} | {_cell(x, 'many', digits)} | "
                  f"{_cell(x, 'medium', digits)} | {_cell(x, 'few', digits)} | "
                  f"{x['published']:.{digits}f} ({x['as_published']}) | {x['protocol']} | {delta} | "
                  f"{_count(x['image_steps'])} | {_count(x['trainable_parameters'])} | {x['confidence']} | "
                  f"{x['source']} |")  # fmt: skip
    notes = [f"- **{x['label']}** ({what} {fmt_key(x['ratio'])}): {x['note']}" for x in lines if x["note"]]
    missing = [f"- {x['label']} ({what} {fmt_key(x['ratio'])}): {'; '.join(x['missing'])}" for x in lines
               if x["missing"]]  # fmt: skip
    if notes:
        md += ["", "Why a row may differ from its published number:", "", *dict.fromkeys(notes)]
    if missing:
        md += ["", "Runs missing from the table:", "", *missing]
    return "\n".join(md) + "\n"


def to_csv(lines: list[dict[str, Any]], metric: str = "top1") -> str:
    import csv
    import io

    keys = ["ratio", "strategy", "label", "seeds", "planned", f"{metric}_mean", f"{metric}_std", "select", "last_mean",
            "last_std", "many_mean", "medium_mean", "few_mean", "published", "as_published", "protocol", "delta",
            "image_steps", "trainable_parameters", "train_seconds", "gpu_hours", "confidence", "source"]  # fmt: skip
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
    epochs: list[int] | list[str] = sorted({int(d.get("epochs_completed", 0)) for d in recs}) or ["—"]
    devices = sorted({str(d.get("device", "?")) for d in recs}) or ["—"]
    cost = _cost(recs)  # the table's sums
    return {"epochs": ", ".join(map(str, epochs)), "device": ", ".join(devices), "runs": f"{len(recs)}/{len(jobs)}",
            "wall_s": sum(float(d.get("wall_time_s") or 0) for d in recs), "version": ltbench.__version__,
            "git": _revision(git_revision()), "image_steps": cost["image_steps_sum"],
            "train_seconds": cost["train_seconds"], "gpu_hours": cost["gpu_hours"]}  # fmt: skip


def _revision(g: dict[str, Any]) -> str:
    if not g.get("commit"):
        return "no git revision"
    return f"{g['commit'][:12]}{' + local changes' if g.get('dirty') else ''}"


def write_report(table: Table, jobs: list[Job], out: Path, console: Console) -> list[dict[str, Any]]:
    """reproduce.md / reproduce.csv in ``out`` and the table on the console."""
    from rich.table import Table as RichTable

    lines = compare(table, jobs)
    atomic_write_text(out / "reproduce.md", to_markdown(table, lines, _meta(jobs)))
    atomic_write_text(out / "reproduce.csv", to_csv(lines, table.metric))
    m, digits = table.metric, 2 if table.metric in ("top1", "mae") else 3
    t = RichTable(title=f"{table.title}: {'top-1 %' if m == 'top1' else m.upper()}, mean ± std over seeds")
    for col in ("setting" if table.settings else "ratio", "method", "ltbench", "last epoch", "published",
                "protocol", "Δ", "confidence"):  # fmt: skip
        t.add_column(col)
    for x in lines:
        delta = "—" if math.isnan(x["delta"]) else f"{x['delta']:+.{digits}f}"
        style = "" if math.isnan(x["delta"]) else ("green" if abs(x["delta"]) <= table.tolerance else "yellow")
        oracle = " oracle" if x["select"] == "test_oracle" else (" val" if x["select"] == "val" else "")
        t.add_row(fmt_key(x["ratio"]), x["label"],
                  f"{_pm(x[f'{m}_mean'], x[f'{m}_std'], digits)} ({x['seeds']}){oracle}",
                  _pm(x["last_mean"], x["last_std"], digits), f"{x['published']:.{digits}f}", x["protocol"],
                  f"[{style}]{delta}[/]" if style else delta, x["confidence"])  # fmt: skip
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


def _show_plan(jobs: list[Job], console: Console, out: Path | None = None) -> None:
    """The runs, their status, the epochs each will train and its run directory. The directory is shown relative to
    ``out`` (named once above the table) on the line under the run's name, in the one wide column, which folds
    rather than cuts: an 80-column terminal still shows every directory whole (issue 23 item 8)."""
    from rich.table import Table as RichTable

    def where(p: Path) -> str:
        try:
            return str(p.relative_to(out)) if out is not None else str(p)
        except ValueError:
            return str(p)

    dirs = [where(j.run_dir) for j in jobs]
    if out is not None:
        console.print(f"run directories under {out}", soft_wrap=True)
    t = RichTable(title=f"{len(jobs)} runs")
    t.add_column("run / run directory", ratio=1, overflow="fold")
    for col in ("status", "epochs", "stage 1", "select"):
        t.add_column(col, no_wrap=True, justify="right" if col == "epochs" else "left")
    seen = {j.group for j in jobs if j.group and j.status == "done"}
    total = 0
    for j, d in zip(jobs, dirs):
        shared = j.group is not None and j.group in seen
        if j.group:
            seen.add(j.group)
        cost = 0 if j.status == "done" else j.cost(shared)
        total += cost
        t.add_row(f"{j.name}\n{d}", j.status, str(cost), "shared" if shared else ("trained" if j.group else "—"),
                  j.select)  # fmt: skip
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
        _show_plan(jobs, console, out)
        return 0
    if not req.report_only:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / MANIFEST, manifest)
        done = sum(j.status == "done" for j in jobs)
        console.print(f"{table.title}: {len(jobs)} runs ({done} already complete) in {out}", soft_wrap=True)
        threads = [] if any(e.startswith("num_threads=") for e in req.extras) or req.jobs == 1 else \
            [f"num_threads={max(1, (os.cpu_count() or 1) // req.jobs)}"]  # fmt: skip
        try:
            Executor(jobs, out, req.jobs, console, [*threads, "progress=false"], metric=table.metric).run()
        except KeyboardInterrupt:
            console.print(f"[yellow]interrupted[/]; continue with: ltbench reproduce {table.name} --resume "
                          f"--out {out}", soft_wrap=True)  # fmt: skip
            raise
    write_report(table, jobs, out, console)
    failed = [j for j in jobs if j.status == "failed"]
    if failed:
        console.print(f"[red]{len(failed)} run(s) failed[/]; fix the cause and run again with --resume", soft_wrap=True)
    return 1 if failed else 0
