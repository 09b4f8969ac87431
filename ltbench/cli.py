"""``ltbench`` command line: ``train`` (a Hydra app), ``report`` and ``strategies`` (plain argparse).

Hydra has no subcommands, so ``main`` takes the first word, rewrites ``sys.argv`` and hands the rest to the
``@hydra.main`` function: ``ltbench train a=b`` behaves like a Hydra app called with ``a=b``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from rich.console import Console

USAGE = """usage: ltbench <command> [args]

commands:
  train [overrides]   train and evaluate one config (Hydra app: --multirun, --help, --cfg job, -sc install=bash)
  report [DIR]        comparison tables and plots of every run under DIR (default: results)
  strategies          list the strategy presets with their one-line description and reference
  reproduce TABLE     re-run a published table with its recipe and compare (--list: the tables; --help)

examples:
  ltbench train dataset=cifar10lt strategy=focal
  ltbench train --multirun strategy=ce,focal,ldam_drw seed=0,1,2
  ltbench report results
  ltbench reproduce cifar10lt_ldam --jobs 4
"""

err_console = Console(stderr=True)


def _error(msg: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    sys.exit(code)


def _train_app() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import DictConfig

    import ltbench.conf  # noqa: F401  (registers every component, its schema and the resolvers)
    from ltbench.errors import ConfigError, LtbenchError
    from ltbench.runner import Terminated, run

    @hydra.main(config_path="pkg://ltbench.conf", config_name="train", version_base="1.3")
    def train(cfg: DictConfig) -> float | None:
        hc = HydraConfig.get()
        overrides = list(hc.overrides.task)
        multirun = hc.mode == RunMode.MULTIRUN
        out_dir = Path(hc.runtime.output_dir)
        try:
            _check_launch(cfg, hc, multirun)
            metrics = run(cfg, out_dir, overrides=overrides)
        except LtbenchError as e:
            if isinstance(e, ConfigError):
                discard_unused_output_dir(out_dir, Path(str(cfg.get("results_dir", "results"))))
            if multirun:
                # Hydra marks the job failed, runs the others, and the sweep exits non-zero at the end.
                logging.getLogger("ltbench").error("%s", e)
                raise
            _error(str(e), e.exit_code)
        except Terminated:
            sys.exit(143)
        except KeyboardInterrupt:
            sys.exit(130)
        return metrics.get("top1")

    train()


def _check_launch(cfg, hc, multirun: bool) -> None:
    from ltbench.errors import LtbenchError

    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        if multirun:
            raise LtbenchError("do not combine --multirun with torchrun: launch one torchrun per run")
        if not cfg.get("resume") and not any(o.startswith("hydra.run.dir=") for o in hc.overrides.hydra):
            raise LtbenchError(
                "under torchrun every rank runs ltbench: give the run directory explicitly, "
                "e.g. hydra.run.dir=results/runs/imagenetlt_r50"
            )


HYDRA_FILES = {".hydra", "train.log"}


def discard_unused_output_dir(out: Path, results_dir: Path) -> None:
    """A run refused for its config leaves nothing: remove the directory Hydra made for it when it holds only
    Hydra's own files, and the parents that become empty (up to the results directory)."""
    import shutil

    if not out.is_dir() or not {p.name for p in out.iterdir()} <= HYDRA_FILES:
        return
    shutil.rmtree(out, ignore_errors=True)
    stop = results_dir.resolve()
    parent = out.resolve().parent
    while parent != stop and stop in parent.parents and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent


def _report(argv: list[str]) -> None:
    from ltbench.errors import LtbenchError
    from ltbench.report import report

    p = argparse.ArgumentParser(prog="ltbench report", description="Aggregate runs into comparison tables.")
    p.add_argument("dir", nargs="?", default="results", help="directory searched for metrics.json (default: results)")
    p.add_argument("--out", default=None, help="where report.md/.csv and plots go (default: DIR)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    args = p.parse_args(argv)
    try:
        report(Path(args.dir), Path(args.out) if args.out else None, plots=not args.no_plots)
    except LtbenchError as e:
        _error(str(e), e.exit_code)


def _strategies(argv: list[str]) -> None:
    from rich.table import Table

    from ltbench.presets import list_strategies

    argparse.ArgumentParser(prog="ltbench strategies", description="List the strategy presets.").parse_args(argv)
    t = Table(title="strategies (ltbench train strategy=<name>)")
    t.add_column("name", style="bold")
    t.add_column("task")
    t.add_column("what it does")
    t.add_column("reference", style="dim")
    for s in list_strategies():
        t.add_row(s.name, ", ".join(s.tasks), s.summary, s.reference)
    Console().print(t)


def _csv(kind):
    def parse(text: str) -> list:
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a comma-separated list of {kind.__name__}: {text!r}") from None

    return parse


def _reproduce(argv: list[str]) -> None:
    from ltbench.errors import LtbenchError
    from ltbench.reproduce import Request, list_tables, load_table, reproduce

    p = argparse.ArgumentParser(
        prog="ltbench reproduce",
        description="Re-run a published table with its recipe (every row, ratio and seed as an ltbench run) and "
        "write reproduce.md/.csv: ltbench's mean ± std beside the published number, the difference and the source.",
        epilog="Overrides after the options (or after --) apply to every run, e.g. dataset.root=/data device=cuda. "
        "Example: ltbench reproduce cifar10lt_ldam --jobs 4 dataset.root=/data",
    )
    p.add_argument("table", nargs="?", help="the published table (see --list)")
    p.add_argument("overrides", nargs="*", help="ltbench train overrides for every run")
    p.add_argument("--list", action="store_true", help="list the tables and their rows")
    p.add_argument("--out", type=Path, help="output directory (default: results/reproduce/TABLE)")
    p.add_argument("--resume", action="store_true", help="continue a reproduction: finished runs are not retrained")
    p.add_argument("--seeds", type=_csv(int), help="comma-separated seeds (default: the table's, 0,1,2)")
    p.add_argument("--ratios", type=_csv(float), help="comma-separated imbalance ratios (default: all published)")
    p.add_argument("--rows", type=_csv(str), help="comma-separated strategies of the table (default: all)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once on this machine (one GPU can hold several)")
    p.add_argument("--dry-run", action="store_true", help="show the runs and what is already done; run nothing")
    p.add_argument("--report-only", action="store_true", help="only write the comparison of the runs so far")
    args = p.parse_intermixed_args(argv)
    try:
        if args.list or not args.table:
            for name in list_tables():
                t = load_table(name)
                print(f"{name}: {t.title}\n  rows: {', '.join(r.strategy for r in t.rows)}")
            return
        req = Request(args.table, args.out, args.resume, args.seeds, args.ratios, args.rows, args.jobs,
                      args.dry_run, args.report_only, list(args.overrides))  # fmt: skip
        code = reproduce(req, err_console)
    except LtbenchError as e:
        _error(str(e), e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(code)


def _load_components() -> None:
    """Built-in components and $LTBENCH_PLUGINS, before any config is composed (commands that compose only)."""
    try:
        from ltbench.registry import load_components

        load_components()
    except Exception as e:  # a broken plugin: one line, not a traceback
        _error(str(e))


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = sys.argv[0]
    # Shell completion: `ltbench -sc install=bash` installs it; the shell then calls `ltbench -sc query=bash`
    # with COMP_LINE holding the whole line ("ltbench train a=..."): drop the subcommand there too.
    if argv and argv[0] in ("-sc", "--shell-completion"):
        line = os.environ.get("COMP_LINE")
        if line is not None:
            words = line.split(" ")
            if len(words) > 1 and words[1] == "train":
                os.environ["COMP_LINE"] = " ".join([words[0], *words[2:]])
                os.environ["COMP_POINT"] = str(max(int(os.environ.get("COMP_POINT", len(line))) - 6, 0))
        sys.argv = [prog, *argv]
        _load_components()
        _train_app()
        return
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    if argv[0] in ("-V", "--version"):
        from ltbench import __version__

        print(f"ltbench {__version__}")
        return
    cmd, rest = argv[0], argv[1:]
    if cmd == "train":
        sys.argv = [prog, *rest]
        _load_components()
        _train_app()
    elif cmd == "report":
        _report(rest)
    elif cmd == "strategies":
        _strategies(rest)
    elif cmd == "reproduce":
        _load_components()
        _reproduce(rest)
    else:
        _error(f"unknown command {cmd!r}; see `ltbench --help`")


if __name__ == "__main__":
    main()
