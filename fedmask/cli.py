"""``fedmask run CONFIG``: check the config, then simulate the rounds with Flower.

Everything that can be wrong with a config (unknown key, wrong type, impossible value,
missing data files, a client without data, a plug-in that does not load, a GPU share
without a GPU) is found here, before Ray starts, and ends the command with exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

EXIT_BAD_CONFIG = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C
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
        print(f"\nfedmask: interrupted; resume with: fedmask run --resume {run_dir}", file=sys.stderr, flush=True)

        def shutdown() -> None:
            try:
                import ray

                ray.shutdown()
            except Exception:  # noqa: BLE001, S110 - leaving anyway
                pass

        stopper = threading.Thread(target=shutdown, daemon=True)
        stopper.start()
        stopper.join(RAY_SHUTDOWN_S)
        os._exit(EXIT_INTERRUPTED)

    signal.signal(signal.SIGINT, leave)


def _quiet_logs() -> None:
    """Flower logs every step at INFO; the live table says it better. Warnings stay."""
    logging.getLogger("flwr").setLevel(logging.WARNING)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger("fedmask").addHandler(handler)


def _check_out(run_dir: Path, overwrite: bool) -> None:
    """A run directory that is a folder, empty or new, unless --overwrite (which replaces
    a fedmask run's files and keeps any others)."""
    from fedmask.config import ConfigError
    from fedmask.results import RUN_FILES

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


def _run(args: argparse.Namespace) -> int:
    from fedmask.checkpoint import check_resumable
    from fedmask.config import ConfigError, load
    from fedmask.data import DataError
    from fedmask.preflight import check_before_start

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
            check_resumable(run_dir, config)
        else:
            config = load(args.config, args.set)
            _check_out(run_dir, args.overwrite)
        check_before_start(config)
    except (ConfigError, DataError, ValueError) as err:
        print(f"fedmask: error: {err}", file=sys.stderr)
        return EXIT_BAD_CONFIG

    if config.secure_aggregation:
        from clients.secure_client_app import app as client_app
    else:
        from clients.client_app import app as client_app
    from server.server_app import make_server_app, run_server

    _quiet_logs()

    if args.engine == "inprocess":
        from server.inprocess_grid import InProcessGrid

        try:
            run_server(InProcessGrid(client_app, config.num_clients), config, run_dir, resume=bool(args.resume))
        except KeyboardInterrupt:
            print(f"\nfedmask: interrupted; resume with: fedmask run --resume {run_dir}", file=sys.stderr)
            return EXIT_INTERRUPTED
    else:
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        from flwr.simulation import run_simulation

        _stop_on_interrupt(run_dir)
        run_simulation(
            server_app=make_server_app(config, run_dir, resume=bool(args.resume)),
            client_app=client_app,
            num_supernodes=config.num_clients,
            backend_config={
                "client_resources": {"num_cpus": config.num_cpus, "num_gpus": config.num_gpus},
                "init_args": {"logging_level": "ERROR", "log_to_driver": True},
            },
        )
    if not (run_dir / "summary.json").exists():
        print(f"fedmask: error: the run did not finish; see the log above and {run_dir}", file=sys.stderr)
        return 1
    return 0


def _print_keys() -> int:
    from fedmask.config import SCHEMA
    from fedmask.methods import BUILTIN

    for key, setting in SCHEMA.items():
        accepted = ", ".join(setting.choices) if setting.choices else setting.rule
        readers = [name for name, method in BUILTIN.items() if key in method.keys]
        only = f" (only {', '.join(readers)})" if readers else ""
        print(f"{key:<22} default {setting.default!r:<28} {accepted}")
        print(f"{'':<22} {setting.help}{only}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedmask", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run one experiment from a TOML config")
    run.add_argument("config", nargs="?", help="TOML file, e.g. configs/quickstart.toml")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its last checkpoint")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key (repeatable), e.g. --set num-rounds=5")
    run.add_argument("--out", help="run directory (default: runs/<config>-<time>)")
    run.add_argument("--engine", choices=("ray", "inprocess"), default="ray",
                     help="ray: Flower's simulation engine (default); inprocess: no Ray, one client at a time")
    run.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    commands.add_parser("keys", help="list every config key with its default and rule")
    args = parser.parse_args(argv)
    if args.command == "keys":
        return _print_keys()
    return _run(args)


if __name__ == "__main__":
    sys.exit(main())
