"""``fedmask run CONFIG``: check the config, then simulate the rounds with Flower.

Everything that can be wrong with a config (unknown key, wrong type, impossible value,
missing data files, a client without data, a plug-in that does not load, a GPU share
without a GPU) is found here, before Ray starts, and ends the command with exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

EXIT_BAD_CONFIG = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C
EXIT_STOPPED = 1  # a run that stopped mid-way (a disk it cannot write, a failing plug-in): it can resume
RAY_SHUTDOWN_S = 8.0  # how long a Ctrl-C waits for Ray to stop before leaving anyway


def _stop_on_interrupt(run_dir: Path) -> None:
    """Under Ray, a Ctrl-C stops the command within seconds with exit 130.

    Flower's simulation keeps waiting for its threads after a KeyboardInterrupt (over a
    minute). Every finished round is already in rounds.jsonl and in the checkpoint (written
    to a temporary file and renamed), so nothing is lost by leaving at once: Ray is given
    a few seconds to shut down, then the process exits; ``--resume`` continues the run.
    """
    import signal
    import threading

    def leave(signum: int, frame: object) -> None:
        from fedmask.console import stop_display

        stop_display()  # the live line goes, and the terminal gets its cursor back
        print(f"\nfedmask: interrupted; resume with: fedmask run --resume {run_dir}", file=sys.stderr, flush=True)

        def shutdown() -> None:
            try:
                import ray

                ray.shutdown()
            except Exception:  # leaving anyway
                pass

        stopper = threading.Thread(target=shutdown, daemon=True)
        stopper.start()
        stopper.join(RAY_SHUTDOWN_S)
        os._exit(EXIT_INTERRUPTED)

    signal.signal(signal.SIGINT, leave)


def _check_out(run_dir: Path, overwrite: bool) -> None:
    """A run directory that is a folder, empty or new, unless --overwrite (which replaces
    a fedmask run's files and keeps any others)."""
    from fedmask.config import ConfigError
    from fedmask.record.results import RUN_FILES

    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir}: expected a folder, got a file")
    if overwrite or not run_dir.exists():
        return
    held = sorted(p.name for p in run_dir.iterdir())
    if any(name in RUN_FILES for name in held):
        raise ConfigError(f"--out {run_dir} already holds a run; pass --overwrite or another --out")
    if held:
        raise ConfigError(f"--out {run_dir} is not empty and not a fedmask run (it holds {', '.join(held[:3])}"
                          f"{', ...' if len(held) > 3 else ''}); pass --overwrite or another --out")


def _check_writable(run_dir: Path, flag: str) -> None:
    """The run directory can be created and written (a read-only or full disk fails here, not after round 1)."""
    from fedmask.config import ConfigError

    probe = run_dir / ".fedmask-write-check"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with probe.open("wb") as handle:
            handle.write(b"\0" * 4096)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as err:
        raise ConfigError(f"{flag} {run_dir}: cannot write there ({err.strerror or err})") from None
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass


def _run(args: argparse.Namespace) -> int:
    from fedmask.config import ConfigError, load
    from fedmask.core.data import DataError
    from fedmask.preflight import check_before_start
    from fedmask.record.checkpoint import check_resumable

    if bool(args.config) == bool(args.resume):
        print("fedmask: error: give a CONFIG or --resume RUN_DIR (one of them)", file=sys.stderr)
        return EXIT_BAD_CONFIG
    if args.resume:
        run_dir = Path(args.resume)
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path(args.out) if args.out else Path("runs") / f"{Path(args.config).stem}-{stamp}"
    try:
        if args.resume:
            if args.set or args.out or args.overwrite:
                raise ConfigError("--resume continues a run as it was configured, where it is; "
                                  "--set, --out and --overwrite are not allowed with it")
            if not run_dir.is_dir():
                raise ConfigError(f"--resume {run_dir}: expected a run directory, got none")
            config = load(run_dir / "config.toml")
            _check_writable(run_dir, "--resume")
            check_resumable(run_dir, config, check_before_start(config))
        else:
            config = load(args.config, args.set)
            _check_out(run_dir, args.overwrite)
            check_before_start(config)
            _check_writable(run_dir, "--out")
        from fedmask.api import check_engine

        check_engine(config, args.engine)
    except (ConfigError, DataError, ValueError) as err:
        print(f"fedmask: error: {err}", file=sys.stderr)
        return EXIT_BAD_CONFIG

    from fedmask.api import execute

    if args.engine == "ray":
        import flwr.simulation  # noqa: F401 - first: importing it installs signal handlers that would replace ours

        _stop_on_interrupt(run_dir)
    from fedmask.record.results import RunStopped

    try:
        execute(config, run_dir, args.engine, resume=bool(args.resume), ray_address=args.ray_address)
    except KeyboardInterrupt:
        print(f"\nfedmask: interrupted; resume with: fedmask run --resume {run_dir}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except RunStopped as err:
        print(f"fedmask: stopped at {err}; every finished round is kept; after fixing it, resume with: "
              f"fedmask run --resume {run_dir}", file=sys.stderr)
        return EXIT_STOPPED
    if not (run_dir / "summary.json").exists():
        print(f"fedmask: error: the run did not finish; see the log above and {run_dir}", file=sys.stderr)
        return 1
    from fedmask.record.files import read_json

    summary = read_json(run_dir / "summary.json")
    if summary.get("rounds") and summary.get("rounds_skipped") == summary["rounds"]:
        print(f"fedmask: error: every round was skipped, the global state never moved (why: 'skipped' in "
              f"{run_dir / 'rounds.jsonl'})", file=sys.stderr)
        return 1
    return 0


def _print_keys() -> int:
    from fedmask.config import READ_ONLY_WITH, SCHEMA
    from fedmask.methods import BUILTIN

    for key, setting in SCHEMA.items():
        accepted = ", ".join(setting.choices) if setting.choices else setting.rule
        readers = [name for name, method in BUILTIN.items() if key in method.keys]
        only = f" (only {', '.join(readers)})" if readers else ""
        only += f" (read only with {READ_ONLY_WITH[key][0]})" if key in READ_ONLY_WITH else ""
        print(f"{key:<22} default {setting.default!r:<28} {accepted}")
        print(f"{'':<22} {setting.help}{only}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser: every subcommand and flag (the docs' examples are checked against it)."""
    parser = argparse.ArgumentParser(prog="fedmask", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run one experiment from a TOML config")
    run.add_argument("config", nargs="?", help="TOML file, e.g. configs/quickstart.toml")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its last checkpoint")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key (repeatable), e.g. --set num-rounds=5")
    run.add_argument("--out", help="run directory (default: runs/<config>-<time>)")
    run.add_argument("--engine", choices=("ray", "inprocess", "batched"), default="ray",
                     help="ray: Flower's simulation engine (default); inprocess: no Ray, one client at a time; "
                          "batched: no Ray, a round's clients trained together (mask methods, mlp/lenet-300-100)")
    run.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    run.add_argument("--ray-address", metavar="ADDRESS",
                     help="join a running Ray cluster ('auto', or the head's HOST:PORT) instead of starting a "
                          "private Ray (Ray's RAY_ADDRESS variable does the same)")
    commands.add_parser("keys", help="list every config key with its default and rule")
    commands.add_parser("list", help="methods, models, datasets, partitioners, codecs and attacks, one line each")
    sweep = commands.add_parser("sweep", help="run a grid of settings over seeds, resumably, and summarise it")
    sweep.add_argument("config", help="TOML file, the base of every run")
    sweep.add_argument("--seeds", default="0", help="comma-separated seeds (default 0), e.g. 0,1,2")
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=A,B,C",
                       help="a config key and its values (repeatable: the product is run)")
    sweep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key in every run")
    sweep.add_argument("--out", help="sweep folder (default runs/sweep-<config>-<time>); the same --out continues")
    sweep.add_argument("--engine", choices=("ray", "inprocess"), default="ray")
    sweep.add_argument("--target", type=float, default=0.9, help="accuracy target for rounds/bytes-to-target")
    compare = commands.add_parser("compare", help="compare finished runs and sweeps: table and plots")
    compare.add_argument("paths", nargs="+", metavar="RUN_OR_SWEEP_DIR")
    compare.add_argument("--format", choices=("table", "md", "csv"), default="table")
    compare.add_argument("--target", type=float, default=0.9, help="accuracy target for rounds/bytes-to-target")
    compare.add_argument("--plot", metavar="FILE.png", help="accuracy vs round and vs cumulative bytes (up + down)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "keys":
        return _print_keys()
    if args.command == "list":
        from fedmask.catalog import format_catalog

        print(format_catalog())
        return 0
    if args.command == "sweep":
        return _sweep(args)
    if args.command == "compare":
        return _compare(args)
    return _run(args)


def _sweep(args: argparse.Namespace) -> int:
    from fedmask.config import ConfigError
    from fedmask.record.files import RunFileError
    from fedmask.sweep import run_sweep

    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        print(f"fedmask: error: --seeds expects comma-separated integers, got {args.seeds!r}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else Path("runs") / f"sweep-{Path(args.config).stem}-{stamp}"
    try:
        failed = run_sweep(args.config, seeds, args.grid, args.set, out, args.engine, args.target)
    except (ConfigError, RunFileError) as err:
        print(f"fedmask: error: {err}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    return 1 if failed else 0


def _compare(args: argparse.Namespace) -> int:
    from fedmask import report
    from fedmask.config import ConfigError
    from fedmask.record.files import RunFileError

    try:
        runs = report.find_runs(args.paths)
    except (FileNotFoundError, RunFileError, ConfigError) as err:
        print(f"fedmask: error: {err}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    if not runs:
        print(f"fedmask: error: no run directories under {' '.join(args.paths)}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    settings = report.group_runs(runs)
    for setting in settings:
        for note in setting.duplicate_notes():
            print(f"fedmask: warning: {note}", file=sys.stderr)
    print(report.format_rows(report.summarise(settings, args.target), args.format, args.target), end="")
    if args.plot:
        report.plot(settings, args.plot)
        print(f"plot → {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
