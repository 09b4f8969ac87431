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

examples:
  ltbench train dataset=cifar10lt strategy=focal
  ltbench train --multirun strategy=ce,focal,ldam_drw seed=0,1,2
  ltbench report results
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

    import ltbench.config  # noqa: F401  (registers schemas and resolvers)
    from ltbench.errors import LtbenchError
    from ltbench.runner import run

    @hydra.main(config_path="pkg://ltbench.conf", config_name="train", version_base="1.3")
    def train(cfg: DictConfig) -> float | None:
        hc = HydraConfig.get()
        overrides = list(hc.overrides.task)
        multirun = hc.mode == RunMode.MULTIRUN
        try:
            if int(os.environ.get("WORLD_SIZE", 1)) > 1:
                if multirun:
                    raise LtbenchError("do not combine --multirun with torchrun: launch one torchrun per run")
                if not cfg.get("resume") and not any(o.startswith("hydra.run.dir=") for o in hc.overrides.hydra):
                    raise LtbenchError(
                        "under torchrun every rank runs ltbench: give the run directory explicitly, "
                        "e.g. hydra.run.dir=results/runs/imagenetlt_r50"
                    )
            if cfg.get("resume"):
                extra = [o for o in overrides if o.split("=", 1)[0] not in ("resume", "device", "progress")]
                if extra:
                    raise LtbenchError(
                        f"resume continues a run with its saved config; drop the other overrides ({' '.join(extra)})"
                    )
            metrics = run(cfg, hc.runtime.output_dir, overrides=overrides)
        except LtbenchError as e:
            if multirun:
                # Hydra marks the job failed, runs the others, and the sweep exits non-zero at the end.
                logging.getLogger("ltbench").error("%s", e)
                raise
            _error(str(e), e.exit_code)
        except KeyboardInterrupt:
            sys.exit(130)
        return metrics.get("top1")

    train()


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
    t.add_column("what it does")
    t.add_column("reference", style="dim")
    for s in list_strategies():
        t.add_row(s.name, s.summary, s.reference)
    Console().print(t)


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
        _train_app()
    elif cmd == "report":
        _report(rest)
    elif cmd == "strategies":
        _strategies(rest)
    else:
        _error(f"unknown command {cmd!r}; see `ltbench --help`")


if __name__ == "__main__":
    main()
