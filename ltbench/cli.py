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
  data inat18-lists TRAIN_JSON [VAL_JSON] --out DIR
                      the iNaturalist 2018 lists (classifier-balancing's gen_lists.py) from the official json

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
    from ltbench.cluster import Terminated, sweep_result
    from ltbench.errors import ConfigError, LtbenchError
    from ltbench.runner import run

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
                # up to the sweep's directory (which may lie outside results_dir) or the results directory
                root = Path(str(hc.sweep.dir)) if multirun else Path(str(cfg.get("results_dir", "results")))
                discard_unused_output_dir(out_dir, root)
            if multirun:
                # Hydra marks the job failed, runs the others, and the sweep exits non-zero at the end.
                logging.getLogger("ltbench").error("%s", e)
                raise
            _error(str(e), e.exit_code)
        except Terminated:
            sys.exit(143)
        except KeyboardInterrupt:
            sys.exit(130)
        return sweep_result(metrics)  # the sweep objective (Optuna): a validation metric, never test

    _run_hydra_app(train)


# Set beside HYDRA_FULL_ERROR when ltbench sets it, so a child ltbench process (a reproduction's runs) can tell it
# from a user's own HYDRA_FULL_ERROR=1 (which keeps Hydra's full tracebacks).
_FULL_ERROR_BY_LTBENCH = "LTBENCH_HYDRA_FULL_ERROR"


def _run_hydra_app(app) -> None:
    """Run a Hydra app with its errors raised to ltbench (Hydra's own ``HYDRA_FULL_ERROR`` switch), which prints a
    config or file-system error as one ``error:`` line with exit 2, and anything else (a bug) as a traceback from the
    job on, as Hydra does. A user's own ``HYDRA_FULL_ERROR=1`` is left alone: every error then comes in full."""
    from ltbench.errors import ConfigError, LtbenchError

    if os.environ.get("HYDRA_FULL_ERROR") == "1" and os.environ.get(_FULL_ERROR_BY_LTBENCH) != "1":
        app()
        return
    saved = {k: os.environ.get(k) for k in ("HYDRA_FULL_ERROR", _FULL_ERROR_BY_LTBENCH)}
    os.environ.update({"HYDRA_FULL_ERROR": "1", _FULL_ERROR_BY_LTBENCH: "1"})
    try:
        app()
    except LtbenchError as e:  # a job of a sweep (the others have run)
        _error(str(e), e.exit_code)
    except Exception as e:
        line = hydra_error_line(e) or off_group_line(e, sys.argv[1:])
        if line is not None:
            _error(line, ConfigError.exit_code)
        if isinstance(e, OSError):
            _error(os_error_line(e), ConfigError.exit_code)
        if _raised_by_hydra(e):  # Hydra's own check of its command line (``-m`` with ``--cfg``), before any job
            _error(" ".join(str(e).split()), ConfigError.exit_code)
        _print_job_traceback(e)
        sys.exit(1)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _raised_by_hydra(e: BaseException) -> bool:
    """Raised in Hydra's own code, outside any job (no ``run_job`` frame on the way)."""
    frames = []
    tb = e.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    in_job = any(f.f_code.co_name == "run_job" for f in frames)
    return bool(frames) and not in_job and f"{os.sep}hydra{os.sep}" in frames[-1].f_code.co_filename


def _print_job_traceback(e: BaseException) -> None:
    """The traceback of an unexpected error from the job's frames on (Hydra's frames above it left out)."""
    import traceback

    tb = e.__traceback__
    walk = tb
    while walk is not None and walk.tb_frame.f_code.co_name != "run_job":
        walk = walk.tb_next
    frames = traceback.extract_tb(walk.tb_next if walk is not None and walk.tb_next is not None else tb)
    text = "".join(traceback.format_list(frames)) + "".join(traceback.format_exception_only(type(e), e))
    sys.stderr.write("Traceback (most recent call last):\n" + text)


def _close(word: str, options: list[str], prefix: str = "", hint: str = "") -> str:
    """`` (did you mean a, b?)`` from difflib's close matches; the options themselves when there are few."""
    import difflib

    matches = difflib.get_close_matches(word, options, n=3, cutoff=0.6)
    if matches:
        return f" (did you mean {', '.join(prefix + m for m in matches)}?)"
    if options and len(options) <= 12:
        return f" (options: {', '.join(prefix + o for o in options)})"
    return f"; {hint}" if hint else ""


def hydra_error_line(e: BaseException) -> str | None:
    """ltbench's one line for an error Hydra or OmegaConf raised composing a config (None for any other error):
    an unknown option of a group, a misspelt key (both with the close matches), a wrong type, a parse error."""
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    if isinstance(e, MissingConfigException) and "/" in str(e.missing_cfg_file or ""):
        group, name = str(e.missing_cfg_file).rsplit("/", 1)
        lister = "`ltbench strategies`" if group == "strategy" else "`ltbench train --help`"
        options = [o for o in e.options or [] if not o.endswith("_schema")]  # the schemas are not options
        return f"unknown {group} {name!r}" + _close(name, options, hint=f"{lister} lists them")
    if not isinstance(e, (HydraException, OmegaConfBaseException)):
        return None
    cause = e.__cause__ if isinstance(e.__cause__, OmegaConfBaseException) else e
    parent, key, full = (getattr(cause, a, None) for a in ("parent_node", "key", "full_key"))
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and parent is not None and key is not None and full:
        prefix = str(full)[: -len(str(key))]
        where = f" in {prefix.rstrip('.')}" if prefix else ""
        return f"unknown key {full!r}{where}" + _key_matches(str(key), parent, prefix)
    text = " ".join(ln.strip() for ln in str(e).splitlines() if ln.strip()) or type(e).__name__
    if cause is not e:
        text += ": " + str(getattr(cause, "msg", cause)).splitlines()[0]
    return text


OFF_ROOT = "Unexpected type for root: NoneType"  # OmegaConf.update's bare assertion under a null node


def off_group_line(e: BaseException, argv: list[str]) -> str | None:
    """The one line for ``semi.threshold=0.1`` when no ``semi=`` is chosen: OmegaConf meets the group's null (an
    optional stage that is off) and fails a bare assertion, naming no key. None for any other error."""
    if not (isinstance(e, AssertionError) and OFF_ROOT in str(e)):
        return None
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides([a for a in argv if "=" in a and not a.startswith("-")])
        off = _off_groups([o for o in parsed if not o.is_hydra_override()])
    except Exception:  # the line is a courtesy: never a second error
        off = {}
    if not off:
        return "an override sets a key under an optional group that is off (null): choose the group's option first"
    group, keys = next(iter(off.items()))
    return (f"{', '.join(keys)}: no {group}= is chosen (it is off), so it has no such key; "
            f"choose one first, e.g. {group}=<option> (`ltbench train --help` lists them)")


def _off_groups(plain: list) -> dict[str, list[str]]:
    """The optional groups (``semi``, ``method``, ...) that are null in the config composed without the
    ``group.key=value`` overrides, each with those of its keys that the overrides set."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.types import OverrideType

    groups = set(_group_names())
    keyed = [o for o in plain if o.type == OverrideType.CHANGE and o.key_or_group.split(".")[0] in groups
             and "." in o.key_or_group]  # fmt: skip
    if not keyed:
        return {}
    GlobalHydra.instance().clear()  # the failed app leaves it initialised
    with initialize_config_module("ltbench.conf", version_base="1.3"):
        cfg = compose("train", overrides=[o.input_line for o in plain if o not in keyed and not o.is_sweep_override()])
    off: dict[str, list[str]] = {}
    for o in keyed:
        root = o.key_or_group.split(".")[0]
        if cfg.get(root) is None:
            off.setdefault(root, []).append(o.input_line)
    return off


def _key_matches(key: str, node, prefix: str) -> str:
    """Close matches of a misspelt key among the keys of its node, else among the keys one level down
    (``lr`` -> ``schedule.lr``)."""
    import difflib

    from omegaconf import DictConfig

    keys = [str(k) for k in node if str(k) != "hydra"]
    found = _close(key, keys, prefix)
    if "did you mean" in found:
        return found
    paths: dict[str, list[str]] = {}
    for k in keys:
        child = node._get_node(k)
        if isinstance(child, DictConfig) and not child._is_none():
            for c in child:
                paths.setdefault(str(c), []).append(f"{prefix}{k!s}.{c!s}")
    leaves = difflib.get_close_matches(key, list(paths), n=3, cutoff=0.6)
    if leaves:
        return f" (did you mean {', '.join(p for leaf in leaves for p in paths[leaf][:3])}?)"
    return found


def os_error_line(e: OSError) -> str:
    """A file-system error as one line: what could not be made or written, and why."""
    what = f"cannot write {e.filename}" if e.filename else "cannot write the results"
    why = e.strerror or str(e)
    return f"{what}: {why}; choose a writable place with results_dir=<dir> (or hydra.run.dir / hydra.sweep.dir)"


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
    except OSError as e:  # a read-only results directory: write the report elsewhere
        _error(f"cannot write {e.filename or 'the report'}: {e.strerror or e}; write it elsewhere with --out <dir>")


def _strategies(argv: list[str]) -> None:
    from rich.table import Table

    from ltbench.presets import list_methods, list_strategies

    argparse.ArgumentParser(
        prog="ltbench strategies", description="List the strategy presets, the semi-supervised methods and the "
        "feature regularisers, each with its paper."
    ).parse_args(argv)  # fmt: skip
    titles = {
        "strategy": "strategies (ltbench train strategy=<name>)",
        "semi": "semi-supervised methods (semi=<name>, on a strategy's supervised loss; dataset=*_ssl)",
        "method": "feature regularisers (method=<name>, on a strategy's loss and re-weighting)",
    }
    for group, title in titles.items():
        t = Table(title=title)
        for col, style in (("name", "bold"), ("task", None), ("what it does", None), ("reference", "dim")):
            t.add_column(col, style=style)
        for s in list_strategies() if group == "strategy" else [m for m in list_methods() if m.group == group]:
            t.add_row(s.name, ", ".join(s.tasks), s.summary, s.reference)
        Console().print(t)


def _data(argv: list[str]) -> None:
    """``ltbench data <what>``: dataset preparation; argparse's usage errors exit 2 as ours do."""
    p = argparse.ArgumentParser(prog="ltbench data", description="Prepare a dataset's files.")
    sub = p.add_subparsers(dest="what", required=True, metavar="{inat18-lists}")
    q = sub.add_parser(
        "inat18-lists",
        help="the iNaturalist 2018 lists from the official json files",
        description="Write iNaturalist18_train.txt and iNaturalist18_val.txt (`file_name category_id` per image, in "
        "the json's image order: facebookresearch/classifier-balancing's data/iNaturalist18/gen_lists.py) and "
        "iNaturalist18_categories.json (the official category names) into --out; then `ltbench train "
        "dataset=inat18 dataset.root=<folder holding train_val2018/> dataset.split_dir=<out>`.",
    )
    q.add_argument("train_json", type=Path, help="the official train2018.json")
    q.add_argument("val_json", type=Path, nargs="?", help="the official val2018.json (the benchmark's test list)")
    q.add_argument("--out", type=Path, required=True, help="folder for the lists")
    args = p.parse_args(argv)
    for name, n in _inat18_lists(args.train_json, args.val_json, args.out).items():
        print(f"{name}: {n:,} images")


def _inat18_lists(train_json: Path, val_json: Path | None, out: Path) -> dict[str, int]:
    """``write_lists`` with every failure as one line, exit 2: a missing file, a file that is not an official
    iNaturalist json (named), an image without exactly one annotation, an unwritable ``out``."""
    from ltbench.data.inat import json_to_list, write_lists
    from ltbench.errors import DataError

    files = [f for f in (train_json, val_json) if f is not None]
    for f in files:
        if not f.is_file():
            _error(f"{f}: no such file")
    malformed = (KeyError, TypeError, AttributeError, ValueError, IndexError)
    try:
        return write_lists(train_json, val_json, out)
    except DataError as e:
        _error(str(e))
    except malformed as e:
        bad = []
        for f in files:  # which file: parse each again (the error path only)
            try:
                json_to_list(f)
            except (DataError, *malformed):
                bad.append(str(f))
        _error(f"{' / '.join(bad) or train_json}: not an iNaturalist json in the official format "
               f"({type(e).__name__}: {e})")  # fmt: skip
    except OSError as e:
        _error(f"cannot write the lists into {out}: {e}")
    raise AssertionError("unreachable")


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
                print(f"{name}: {t.title}\n  rows: {', '.join(r.name for r in t.rows)}")
            return
        req = Request(args.table, args.out, args.resume, args.seeds, args.ratios, args.rows, args.jobs,
                      args.dry_run, args.report_only, list(args.overrides))  # fmt: skip
        code = reproduce(req, err_console)
    except LtbenchError as e:
        _error(str(e), e.exit_code)
    except OSError as e:
        _error(f"cannot write {e.filename or 'the reproduction'}: {e.strerror or e}; choose another --out <dir>")
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(code)


SWEEPER_NAME = "ltbench_job_overrides"
EXCLUDE_KEYS = "hydra.job.config.override_dirname.exclude_keys"


def prepare_sweep(args: list[str]) -> list[str]:
    """The ``ltbench train`` arguments with what a ``--multirun`` sweep needs added (no change without one):

    - the keys that every job of the sweep sets alike (not swept) go to ``hydra.job.config.override_dirname.
      exclude_keys``, Hydra's list of overrides that do not name a job's directory; ``ltbench.identity`` leaves the
      execution settings among them (``progress=false``, ``results_dir=...``) out of the sweep's directory names,
      while a swept one (``device=cpu,cuda``) still names its jobs apart;
    - overrides that only the swept options accept are routed to the jobs (:func:`_route_refused`).
    """
    if not {"-m", "--multirun"} & set(args):
        return args
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parsed = OverridesParser.create().parse_overrides([a for a in args if "=" in a and not a.startswith("-")])
    except Exception:  # Hydra reports a malformed override itself
        return args
    out = _route_refused(args, parsed)
    fixed = sorted({o.key_or_group for o in parsed if not o.is_sweep_override() and not o.is_hydra_override()})
    if fixed and not any(a.lstrip("+").startswith(EXCLUDE_KEYS) for a in args):
        out = _with_overrides(out, [f"{EXCLUDE_KEYS}=[{','.join(repr(k) for k in fixed)}]"])
    return out


def _with_overrides(args: list[str], extra: list[str]) -> list[str]:
    """``extra`` right after the last override: Hydra's parser takes the overrides as one run of words, so they
    cannot follow a flag such as ``--cfg job``."""
    at = max((i + 1 for i, a in enumerate(args) if "=" in a and not a.startswith("-")), default=len(args))
    return [*args[:at], *extra, *args[at:]]


def _route_refused(args: list[str], parsed: list) -> list[str]:
    """``--multirun`` with a swept config group (``strategy=bmse_gai,bmse_bmc``) and a key that only the swept
    options have (``loss.learn_noise=false``): Hydra composes the sweep's own config without the swept values and
    refuses the key there, although every job has it (hydra issue #2888). Such overrides go to every job through the
    basic sweeper's ``params`` instead, so each job's config is composed, and checked, with them as before.

    Only the overrides that the sweep's config refuses are moved; a sweep with its own sweeper is left alone.
    """
    groups = set(_group_names())
    if any(a.startswith("hydra/sweeper=") for a in args):
        return list(args)
    if not any(o.is_sweep_override() and o.key_or_group in groups for o in parsed):
        return list(args)
    plain = [o for o in parsed if not o.is_sweep_override() and not o.is_hydra_override()]
    moved = _refused_by_sweep_config(plain, groups)
    if not moved:
        return list(args)
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeperConf
    from hydra.core.config_store import ConfigStore

    params = {o.key_or_group: o.input_line.split("=", 1)[1] for o in moved}
    ConfigStore.instance().store(group="hydra/sweeper", name=SWEEPER_NAME, node=BasicSweeperConf(params=params))
    lines = {o.input_line for o in moved}
    return _with_overrides([a for a in args if a not in lines], [f"hydra/sweeper={SWEEPER_NAME}"])


def _same_branch(a: str, b: str) -> bool:
    """``loss.x`` and ``loss.x.y`` are on one branch of the config; ``loss.x`` and ``loss.xy`` are not."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def _group_names() -> list[str]:
    from ltbench.presets import group_options

    return list(group_options())


def _refused_by_sweep_config(plain: list, groups: set[str]) -> list:
    """The plain ``group.key=value`` overrides that the config without the swept values refuses (one compose per
    refused override, at most)."""
    from hydra import compose, initialize_config_module
    from hydra.core.override_parser.types import OverrideType
    from hydra.errors import HydraException

    candidates = [
        o for o in plain if o.type == OverrideType.CHANGE and "." in o.key_or_group
        and o.key_or_group.split(".")[0] in groups and "${" not in o.input_line
    ]  # fmt: skip
    moved: list = []
    with initialize_config_module("ltbench.conf", version_base="1.3"):
        for _ in range(len(candidates)):
            try:
                compose("train", overrides=[o.input_line for o in plain if o not in moved])
                break
            except HydraException as e:
                key = str(getattr(e.__cause__, "full_key", "") or "")
                hit = [o for o in candidates if o not in moved and key and _same_branch(o.key_or_group, key)]
                if not hit:
                    break
                moved.append(hit[-1])
            except AssertionError as e:  # semi.threshold=... with semi swept: null in the sweep's config
                if OFF_ROOT not in str(e):
                    raise
                base = compose("train", overrides=[o.input_line for o in plain if o not in candidates])
                hit = [o for o in candidates if o not in moved and base.get(o.key_or_group.split(".")[0]) is None]
                if not hit:
                    break
                moved.extend(hit)
    return moved


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
        _load_components()
        sys.argv = [prog, *prepare_sweep(rest)]
        _train_app()
    elif cmd == "report":
        _report(rest)
    elif cmd == "strategies":
        _strategies(rest)
    elif cmd == "reproduce":
        _load_components()
        _reproduce(rest)
    elif cmd == "data":
        _data(rest)
    else:
        _error(f"unknown command {cmd!r}; see `ltbench --help`")


if __name__ == "__main__":
    main()
