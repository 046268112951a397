"""fedmask's apps beside plain Flower: seconds per round on Ray, and what each app costs a client.

    python -m bench.flower_apps                       # Ray, 12 rounds x 2 repeats, then the per-client attribution
    python -m bench.flower_apps --rounds 6 --repeats 1 --skip-attribution --out /tmp/apps

The workload is issue 31's: LeNet-300-100 on Fashion-MNIST (70k, 60k/10k re-split), 1000
clients of 60 images, 100 a round, one local epoch, seed 5, the global model evaluated on
the 10k test images after every round, 2 workers of one CPU each.

**On Ray** (side by side, the order alternating over ``--repeats``), seconds per round over
rounds 2..N:

- ``flower``: plain Flower, a minimal ClientApp (:data:`plain_client`: load the arrays, train
  with fedmask's ``task.train``, reply with the arrays) and Flower's own ``FedAvg``
  strategy (:func:`plain_server`), Flower's message injector;
- ``flower+injector``: the same with fedmask's injector (:mod:`engines.ray`);
- ``fedmask-fedavg``: ``fedmask run configs/mnist-fedavg.toml`` (fedmask's injector);
- ``fedmask-fedpm``: ``fedmask run configs/mnist-fedpm.toml`` (lossless downlink, FedPM's default
  uploads: relative-entropy coded, relayed by the downlink);
- ``fedmask-fedpm-entropy``: the same with ``uplink-codec = "entropy"`` (the uploads issue 31
  measured: the sample itself, entropy-coded against the broadcast).

**Per client, in one process** (``--attribute``, each app on :class:`engines.inprocess.InProcessGrid`
for ``--rounds`` rounds, one torch thread): each round's CPU seconds split into training
(``task.train``), the engine's serde (``_over_the_wire``), the server's evaluation
(``task.evaluate``), for FedPM the method's own work (coding the masks and the broadcasts,
folding the votes), and the rest: the app's own cost, per client. fedmask's minus Flower's
is what fedmask adds per client beyond its method. Writes ``flower-apps.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from bench.common import ROOT, fmt, git_head, machine_info, md_machine, md_table, prepare_dirs, source_digest
from bench.rounds import DATA_DIR, DATA_NAME, run_once
from engines.inprocess import InProcessGrid
from fedmask import task
from fedmask.config import RunConfig, load
from fedmask.core.weights import derive_seed

FEDAVG, FEDPM = "configs/mnist-fedavg.toml", "configs/mnist-fedpm.toml"
VARIANTS = ("flower", "flower+injector", "fedmask-fedavg", "fedmask-fedpm", "fedmask-fedpm-entropy")
ATTRIBUTED = ("flower", "fedmask-fedavg", "fedmask-fedpm", "fedmask-fedpm-entropy")
EXTRA_SETS = {"fedmask-fedpm-entropy": ['uplink-codec="entropy"']}
_SETS_ENV = "FEDMASK_PLAIN_SETS"  # the plain apps' config overrides (JSON), read in every Ray worker


def workload(clients: int, per_round: int, rounds: int) -> list[str]:
    return [f'data-dir="{DATA_DIR}"', 'dataset="idx"', f"num-clients={clients}", f"clients-per-round={per_round}",
            "per-client=false", "seed=5", f"num-rounds={rounds}"]


# ---------------------------------------------------------------- plain Flower


@functools.lru_cache(maxsize=1)
def plain_config() -> RunConfig:
    """The plain apps' config: ``configs/mnist-fedavg.toml`` with the bench's overrides."""
    return load(FEDAVG, json.loads(os.environ.get(_SETS_ENV, "[]")))


@functools.lru_cache(maxsize=1)
def _plain_model(config: RunConfig) -> torch.nn.Module:
    return task.make_model(config, task.splits_of(config), None)


plain_client = ClientApp()


@plain_client.train()
def plain_train(msg: Message, context: Context) -> Message:
    """A minimal Flower client: the arrays in, fedmask's training, the arrays out."""
    config = plain_config()
    torch.set_num_threads(config.num_cpus)
    model = _plain_model(config)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    pid, server_round = int(context.node_config["partition-id"]), int(msg.content["config"]["server-round"])
    x, y = task.client_data(config, pid)
    metrics = task.train(model, x, y, config, torch.device("cpu"), derive_seed(config.seed, "train", server_round, pid))
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()),
                               "metrics": MetricRecord({"num-examples": len(x), **metrics})}), reply_to=msg)


def plain_strategy(grid: Grid, config: RunConfig, rounds_path: Path) -> None:
    """Flower's FedAvg for ``config.num_rounds`` rounds, the global model evaluated after each
    (as fedmask's server does); a line per round in ``rounds_path``."""
    splits = task.splits_of(config)
    model = task.make_model(config, splits, None)
    strategy = FedAvg(fraction_train=config.clients_per_round / config.num_clients, fraction_evaluate=0.0,
                      min_train_nodes=config.clients_per_round, min_available_nodes=config.num_clients)
    start = time.perf_counter()

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = task.evaluate(model, splits.x_test, splits.y_test, config.eval_batch_size,
                                       torch.device("cpu"), seed=derive_seed(config.seed, "eval", server_round))
        if server_round:
            with rounds_path.open("a") as f:
                f.write(json.dumps({"round": server_round, "accuracy": accuracy, "loss": loss,
                                    "elapsed_s": time.perf_counter() - start}) + "\n")
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=config.num_rounds,
                   evaluate_fn=evaluate)


def plain_server(config: RunConfig, rounds_path: Path) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        plain_strategy(grid, config, rounds_path)

    return app


def run_plain(out: Path, injector: bool) -> None:
    """The plain apps on Flower's Ray engine (this process is the bench's subprocess)."""
    from flwr.simulation import run_simulation

    from engines import ray

    config = plain_config()
    out.mkdir(parents=True, exist_ok=True)
    if injector:
        ray.install()
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    run_simulation(server_app=plain_server(config, out / "rounds.jsonl"), client_app=plain_client,
                   num_supernodes=config.num_clients,
                   backend_config={"client_resources": {"num_cpus": config.num_cpus, "num_gpus": 0.0},
                                   "init_args": {"logging_level": "ERROR", "log_to_driver": True}})


# ---------------------------------------------------------------- on Ray, side by side


def learned(accuracy: list[float]) -> bool:
    """Whether a run trained: its last round's accuracy above its first's. A run whose every
    client fails keeps the initial model, and its rounds time Flower's error path instead."""
    return len(accuracy) >= 2 and accuracy[-1] > accuracy[0]


def ray_row(variant: str, sets: list[str], run_dir: Path) -> dict[str, Any]:
    if variant.startswith("flower"):
        cmd = [sys.executable, "-m", "bench.flower_apps", "--plain-run", str(run_dir)]
        cmd += ["--injector"] if variant == "flower+injector" else []
        env = {**os.environ, _SETS_ENV: json.dumps(sets)}
    else:
        config = FEDAVG if variant == "fedmask-fedavg" else FEDPM
        cmd = [sys.executable, "-m", "fedmask.cli", "run", config,
               *[a for s in sets + EXTRA_SETS.get(variant, []) for a in ("--set", s)],
               "--out", str(run_dir), "--overwrite", "--engine", "ray"]
        env = None
    row = run_once(cmd, run_dir, ROOT, env)
    if not learned(row["accuracy"]):
        raise SystemExit(f"bench.flower_apps: {variant} did not learn (accuracy {row['accuracy'][:1]} to "
                         f"{row['accuracy'][-1:]}): its clients failed; see {run_dir.with_suffix('.log')}")
    s = row["s"][1:]  # rounds 2..N: round 1 carries start-up
    row |= {"variant": variant, "s_per_round": statistics.fmean(s) if s else None,
            "cpu_per_round": statistics.fmean(row["cpu_s"][1:]) if row["cpu_s"][1:] else None}
    return row


def ray_side_by_side(args: argparse.Namespace, runs_dir: Path, results: dict[str, Any],
                     write: Callable[[], None]) -> None:
    sets = workload(args.clients, args.per_round, args.rounds)
    variants = args.variants.split(",")
    for repeat in range(args.repeats):
        for variant in variants if repeat % 2 == 0 else variants[::-1]:
            print(f"ray {variant} (repeat {repeat + 1})", flush=True)
            row = ray_row(variant, sets, runs_dir / f"ray-{variant}-{repeat}")
            row["repeat"] = repeat
            print(f"   {fmt(row['s_per_round'], '.3f')} s/round, {fmt(row['cpu_per_round'], '.2f')} CPU s/round, "
                  f"rc {row['rc']}", flush=True)
            results["ray"].append(row)
            write()


# ---------------------------------------------------------------- per client, in one process


class _Timers:
    """CPU seconds inside the wrapped functions, per round window (a round ends when its
    evaluation returns); a wrapped call inside another is taken out of the outer one's part."""

    def __init__(self) -> None:
        self.rounds: list[dict[str, float]] = []
        self.current: dict[str, float] = defaultdict(float)
        self.inner: list[float] = []  # per open wrapped call: CPU seconds of wrapped calls inside it
        self.mark = time.process_time()

    def wrap(self, owner: Any, name: str, part: str, round_end: bool = False) -> None:
        wrapped = getattr(owner, name)

        @functools.wraps(wrapped)
        def timed(*a: Any, **k: Any) -> Any:
            self.inner.append(0.0)
            start = time.process_time()
            try:
                return wrapped(*a, **k)
            finally:
                spent = time.process_time() - start
                self.current[part] += spent - self.inner.pop()
                if self.inner:
                    self.inner[-1] += spent
                if round_end and not self.inner:
                    self.end_round()

        setattr(owner, name, timed)

    def end_round(self) -> None:
        now = time.process_time()
        self.current["total"] = now - self.mark
        self.rounds.append(dict(self.current))
        self.current, self.mark = defaultdict(float), now


def attribute(app: str, rounds: int, clients: int, per_round: int) -> dict[str, Any]:
    """Run ``app`` (one of :data:`ATTRIBUTED`) in this process; its per-round CPU split."""
    import tempfile

    import clients.client_app as client_module
    import engines.inprocess as inprocess
    import server.strategies as strategies
    from clients import local_round
    from fedmask import downlink
    from server.server_app import run_server

    torch.set_num_threads(1)
    timers = _Timers()
    timers.wrap(task, "train", "train")
    timers.wrap(task, "evaluate", "evaluate", round_end=True)
    timers.wrap(inprocess, "_over_the_wire", "serde")
    if app.startswith("fedmask-fedpm"):  # the method's own work: coding masks and broadcasts, folding votes
        timers.wrap(local_round, "_mask_upload", "masks: sample and code (client)")
        timers.wrap(strategies.MaskStrategy, "decode", "masks: decode (server)")
        timers.wrap(strategies.MaskStrategy, "fold", "votes: fold and finish (server)")
        timers.wrap(strategies.MaskStrategy, "finish", "votes: fold and finish (server)")
        timers.wrap(downlink.LosslessDownlink, "messages_for", "broadcasts: code (server)")
        timers.wrap(downlink.LosslessDownlink, "record", "broadcasts: code (server)")
        timers.wrap(client_module, "receive_lossless", "broadcasts: decode and keep (client)")
    sets = workload(clients, per_round, rounds)
    if app == "flower":
        os.environ[_SETS_ENV] = json.dumps(sets)
        grid = PlainGrid(plain_client, clients)
        plain_strategy(grid, plain_config(), Path(tempfile.mkdtemp()) / "rounds.jsonl")
    else:
        config = load(FEDAVG if app == "fedmask-fedavg" else FEDPM, sets + EXTRA_SETS.get(app, []))
        run_server(inprocess.InProcessGrid(client_module.app, clients), config, Path(tempfile.mkdtemp()) / "run")
    return {"app": app, "rounds": timers.rounds[1:]}  # the initial evaluation's window is start-up


class PlainGrid(InProcessGrid):
    """The in-process grid without fedmask's ledger in ``send_and_receive`` (plain Flower's
    strategy calls it; fedmask's server wraps the grid in its own MeasuringGrid instead)."""

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> Any:
        return self.pull_messages(list(self.push_messages(messages)))


METHOD_PARTS = ("masks: sample and code (client)", "masks: decode (server)", "votes: fold and finish (server)",
                "broadcasts: code (server)", "broadcasts: decode and keep (client)")


def attribution_rows(result: dict[str, Any], per_round: int) -> dict[str, float]:
    """Per-client milliseconds of each part over rounds 2..N (the first round warms caches);
    ``method``: the sum of :data:`METHOD_PARTS`, ``own``: what is left."""
    rounds = result["rounds"][1:]
    parts: dict[str, float] = defaultdict(float)
    for r in rounds:
        for key, value in r.items():
            parts[key] += value
    n = max(len(rounds), 1) * per_round
    out = {key: 1000 * value / n for key, value in parts.items()}
    out["method"] = sum(out.get(key, 0.0) for key in METHOD_PARTS)
    out["own"] = out["total"] - sum(out.get(key, 0.0) for key in ("train", "serde", "evaluate", "method"))
    return out


# ---------------------------------------------------------------- the report


def write(out_dir: Path, results: dict[str, Any], args: argparse.Namespace, started: float,
          final: bool = False) -> None:
    lines = [f"# fedmask's apps beside plain Flower ({DATA_NAME}, LeNet-300-100)", "",
             f"{args.clients} clients, {args.per_round} a round, one local epoch, seed 5, central evaluation every "
             "round, 2 Ray workers of one CPU. Made by `python -m bench.flower_apps` (module doc: what runs).", ""]
    lines += _ray_section(results["ray"])
    lines += _attribution_section(results["attribution"], args.per_round)
    if final:
        machine = machine_info("python -m bench.flower_apps", sys.argv[1:], time.perf_counter() - started,
                               {"load_average_end": os.getloadavg()})
        results["machine"] = machine
        lines += md_machine(machine)
        if machine.get("source_digest_end") != results["source"]:
            lines += ["", "**The sources changed while this bench ran: rerun it.**"]
    elif "machine" in results:  # --render: the report of a finished run, written again from its JSON
        lines += [*md_machine(results["machine"]), "",
                  f"(This page was written again from `flower-apps.json` by the bench's code at {git_head()}.)"]
    (out_dir / "flower-apps.md").write_text("\n".join(lines) + "\n")
    (out_dir / "flower-apps.json").write_text(json.dumps(results, indent=1, default=str))


def _best(rows: list[dict[str, Any]], variant: str, key: str) -> float | None:
    values = [r[key] for r in rows if r["variant"] == variant and r.get(key)]
    return min(values) if values else None


def _ray_section(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    table = []
    flower = _best(rows, "flower+injector", "s_per_round")
    for variant in dict.fromkeys(r["variant"] for r in rows):
        runs = [r for r in rows if r["variant"] == variant]
        best = _best(rows, variant, "s_per_round")
        table.append([variant, fmt(best, ".3f"), ", ".join(fmt(r["s_per_round"], ".3f") for r in runs),
                      fmt(_best(rows, variant, "cpu_per_round"), ".2f"),
                      fmt(best / flower if best and flower else None, ".2f"),
                      "ok" if all(r["rc"] == 0 for r in runs) else "FAILED"])
    lines = ["## On Ray: seconds per round (rounds 2..N)", "",
             "Best of the repeats (the machine is shared), every run beside it; CPU s: the run's whole process "
             "tree per round.", "",
             md_table(["variant", "s/round", "runs", "CPU s/round", "x flower+injector", "status"], table), ""]
    pairs = paired_ratios(rows, "fedmask-fedavg", "flower+injector")
    if pairs:
        median = statistics.median(pairs)
        verdict = "PASS" if median <= 1.1 else "FAIL"
        lines += [f"- fedmask's FedAvg / plain Flower with the injector, run beside it in the same repeat: "
                  f"{', '.join(f'{p:.2f}' for p in pairs)}; median {median:.2f} (target <= 1.1) {verdict}", ""]
    return lines


def paired_ratios(rows: list[dict[str, Any]], variant: str, against: str) -> list[float]:
    """``variant``'s seconds per round over ``against``'s, one ratio per repeat that ran both:
    runs of one repeat follow each other, so a change in the machine's load between repeats
    (which a ratio of the best runs would take in) cancels out."""
    ratios = []
    for repeat in sorted({r.get("repeat", 0) for r in rows}):
        got = {r["variant"]: r["s_per_round"] for r in rows if r.get("repeat", 0) == repeat}
        if got.get(variant) and got.get(against):
            ratios.append(got[variant] / got[against])
    return ratios


def _attribution_section(results: list[dict[str, Any]], per_round: int) -> list[str]:
    if not results:
        return []
    rows = {r["app"]: attribution_rows(r, per_round) for r in results}
    table = [[app, *(fmt(parts[k], ".2f") for k in ("total", "train", "serde", "evaluate", "method", "own"))]
             for app, parts in rows.items()]
    lines = ["## Per client, in one process: CPU ms per client per round", "",
             "Each app on the in-process grid (one torch thread), rounds 2..N. own = total - train - serde (the "
             "grid's protobuf round trip of every message) - evaluate (the server's, per round, shared out) - "
             "method (FedPM: coding masks and broadcasts, folding votes).", "",
             md_table(["app", "total", "train", "serde", "evaluate", "method", "own"], table), ""]
    if "flower" in rows:
        for app in ATTRIBUTED[1:]:
            if app in rows:
                added = rows[app]["own"] - rows["flower"]["own"]
                lines.append(f"- {app} adds {added:.2f} ms per client beyond its method over plain Flower's own "
                             f"(target < 1 ms) {'PASS' if added < 1 else 'FAIL'}")
    fedpm = [app for app in ATTRIBUTED if app.startswith("fedmask-fedpm") and app in rows]
    if fedpm:
        lines += ["", "FedPM's method, CPU ms per client per round:", "",
                  md_table(["part", *fedpm], [[key, *(fmt(rows[app].get(key), ".2f") for app in fedpm)]
                                              for key in METHOD_PARTS])]
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.flower_apps", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--attribution-rounds", type=int, default=6)
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--skip-attribution", action="store_true")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--plain-run", help=argparse.SUPPRESS)  # internal: one plain Flower run into this folder
    parser.add_argument("--injector", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--attribute", help=argparse.SUPPRESS)  # internal: one app's attribution, JSON on stdout
    parser.add_argument("--render", metavar="DIR", help="write DIR/flower-apps.md again from DIR/flower-apps.json "
                        "(after a change to the report's code; runs nothing)")
    args = parser.parse_args(argv)
    if args.render:
        folder = Path(args.render)
        write(folder, json.loads((folder / "flower-apps.json").read_text()), args, time.perf_counter())
        return 0
    if args.plain_run:  # from the module by name: Ray's workers unpickle the apps' functions from it, and
        # `python -m` would run them as `__main__`, which a worker cannot import (every client would fail)
        from bench import flower_apps

        flower_apps.run_plain(Path(args.plain_run), args.injector)
        return 0
    if args.attribute:
        print(json.dumps(attribute(args.attribute, args.attribution_rounds, args.clients, args.per_round)))
        return 0
    out_dir, runs_dir = prepare_dirs(args.out, "fedmask-apps-")
    started = time.perf_counter()
    results: dict[str, Any] = {"ray": [], "attribution": [], "source": source_digest()}

    def save() -> None:
        write(out_dir, results, args, started)

    if not args.skip_ray:
        ray_side_by_side(args, runs_dir, results, save)
    if not args.skip_attribution:
        for app in ATTRIBUTED:
            print(f"in one process: {app} ({args.attribution_rounds} rounds)", flush=True)
            cmd = [sys.executable, "-m", "bench.flower_apps", "--attribute", app, "--attribution-rounds",
                   str(args.attribution_rounds), "--clients", str(args.clients), "--per-round", str(args.per_round)]
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stderr[-3000:], flush=True)
                continue
            results["attribution"].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print("   " + ", ".join(f"{k} {v:.2f}" for k, v in attribution_rows(results["attribution"][-1],
                                                                            args.per_round).items()), flush=True)
            save()
    write(out_dir, results, args, started, final=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
