"""FedAvg vs FedPM vs edge-popup, side by side, on digits and MNIST-10k.

Run from the project root: ``python -m bench.compare [--rounds 30] [--only digits|mnist]``.

Every (task, method) is the real thing: ``fedmask run`` in a subprocess, through Flower's
Ray simulation engine, so the bytes are the ledger's measurements of real messages and the
time includes what a user waits for (Ray start-up too). FedPM is also run in the plain
PyTorch loop (bench/plain_loop.py) in this process, to price what Flower adds. The machine
is shared and small, so absolute times are noisy; the runs of one task are done back to
back and judged by ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    ROOT,
    figure,
    fmt,
    machine_info,
    md_checks,
    md_failures,
    md_machine,
    md_table,
    mixed_code_warning,
    per_client_mean,
    prepare_dirs,
    run_fedmask,
    shared_sets,
    source_digest,
)

TASKS: dict[str, dict[str, str]] = {
    "digits": {
        "fedavg": "configs/digits-fedavg.toml",
        "fedpm": "configs/quickstart.toml",
        "edge-popup": "configs/digits-edge-popup.toml",
    },
    "mnist": {
        "fedavg": "configs/mnist-fedavg.toml",
        "fedpm": "configs/mnist-fedpm.toml",
        "edge-popup": "configs/mnist-edge-popup.toml",
    },
}
TASK_NAMES = {"digits": "digits (sklearn, 8x8)", "mnist": "MNIST-10k, 8k train / 2k test"}
PLAIN = "fedpm (plain loop)"

# Targets (accuracy in points, i.e. percent)
FEDPM_MAX_DROP, EDGE_POPUP_MAX_DROP = 1.0, 3.0
MASK_UPLINK_MAX_FRACTION = 1 / 30
FLOWER_MAX_SLOWDOWN = 1.5


@dataclass
class Result:
    """One row of the table; None where the number does not apply (plain loop) or the run failed."""

    task: str
    method: str
    config: str
    rounds: int
    local_epochs: int
    final_acc: float | None = None
    best_acc: float | None = None
    up_payload: float | None = None  # bytes per client per round
    up_message: float | None = None
    down_payload: float | None = None
    up_bpp: float | None = None
    wall_s: float | None = None
    rounds_s: float | None = None  # first to last round, from rounds.jsonl elapsed_s
    rounds_timed: int = 0  # how many rounds rounds_s covers (N - 1)
    accuracy: list[float] = field(default_factory=list)
    error: str | None = None
    source: str = ""  # source_digest() when the run started


def run_flower(task: str, method: str, config_path: str, rounds: int, epochs: int, run_dir: Path) -> Result:
    """``fedmask run`` in a subprocess; times it and reads what it wrote."""
    result = Result(task, method, config_path, rounds, epochs)
    run = run_fedmask(config_path, [], run_dir, rounds)
    result.wall_s, rows = run.wall_s, run.rows
    if run.error and not run.summary:
        result.error = run.error
        return result
    summary = run.summary
    result.accuracy = [100 * r["accuracy"] for r in rows]
    result.final_acc, result.best_acc = 100 * summary["final_accuracy"], 100 * summary["best_accuracy"]
    result.up_payload = per_client_mean(rows, "uplink_payload_bytes", "uplink")
    result.up_message = per_client_mean(rows, "uplink_message_bytes", "uplink")
    result.down_payload = per_client_mean(rows, "downlink_payload_bytes", "downlink")
    result.up_bpp = summary["mean_uplink_bpp"]
    # Round 1's elapsed_s includes Ray and actor start-up; first-to-last is rounds 2..N.
    result.rounds_s = rows[-1]["elapsed_s"] - rows[0]["elapsed_s"]
    result.rounds_timed = len(rows) - 1
    result.error = run.error
    return result


def run_plain_loop(task: str, config_path: str, rounds: int, epochs: int) -> Result:
    """FedPM in the plain PyTorch loop, in this process, one thread like one Ray client."""
    import torch

    from bench.plain_loop import run_plain
    from fedmask.config import load

    torch.set_num_threads(1)
    result = Result(task, PLAIN, config_path, rounds, epochs)
    start = time.perf_counter()
    try:
        out = run_plain(load(ROOT / config_path, [*shared_sets(config_path), f"num-rounds={rounds}"]))
    except Exception as err:  # report it in the table, go on with the rest
        result.error = f"{type(err).__name__}: {err}"
        return result
    result.wall_s = time.perf_counter() - start  # includes loading the data, as the Flower total does
    elapsed = out["elapsed_s"]  # the loop's own timer; rounds 2..N, as for Flower (round 1 carries first-use imports)
    result.rounds_s, result.rounds_timed = (elapsed[-1] - elapsed[0], rounds - 1) if rounds > 1 else (out["wall_s"], 1)
    result.accuracy = [100 * a for a in out["accuracy"]]
    result.final_acc, result.best_acc = result.accuracy[-1], max(result.accuracy)
    return result


def per_round(r: Result) -> float | None:
    """Seconds per round over the rounds that rounds_s covers."""
    return r.rounds_s / r.rounds_timed if r.rounds_s is not None and r.rounds_timed else None


def checks(results: list[Result]) -> list[dict[str, Any]]:
    """Every target, per task, with its numbers; a missing number is a FAIL, never a skip."""
    out = []

    def add(task: str, name: str, ok: bool, detail: str) -> None:
        out.append({"task": task, "check": name, "pass": bool(ok), "detail": detail})

    for task in dict.fromkeys(r.task for r in results):
        by = {r.method: r for r in results if r.task == task}
        avg, pm, plain = by.get("fedavg"), by.get("fedpm"), by.get(PLAIN)

        for method, drop in (("fedpm", FEDPM_MAX_DROP), ("edge-popup", EDGE_POPUP_MAX_DROP)):
            r = by.get(method)
            unit = "point" if drop == 1 else "points"
            name = f"{method} final accuracy >= FedAvg - {drop:g} {unit}"
            if r and avg and r.final_acc is not None and avg.final_acc is not None:
                add(task, name, r.final_acc >= avg.final_acc - drop,
                    f"{r.final_acc:.2f}% vs FedAvg {avg.final_acc:.2f}% ({r.final_acc - avg.final_acc:+.2f})")
            else:
                add(task, name, False, "missing result")

        for method in ("fedpm", "edge-popup"):
            r = by.get(method)
            name = f"{method} uplink <= 1/30 of FedAvg's (payload per client per round)"
            if r and avg and r.up_payload and avg.up_payload:
                frac = r.up_payload / avg.up_payload
                msg = (f"; message bytes 1/{avg.up_message / r.up_message:.1f}"
                       if r.up_message and avg.up_message else "")
                add(task, name, frac <= MASK_UPLINK_MAX_FRACTION,
                    f"{r.up_payload:,.0f} B vs {avg.up_payload:,.0f} B = 1/{1 / frac:.1f}{msg}")
            else:
                add(task, name, False, "missing result")

        name = f"FedPM Flower time <= {FLOWER_MAX_SLOWDOWN:g}x plain loop (judged on rounds-only s/round)"
        if pm and plain and per_round(pm) and per_round(plain) and pm.wall_s and plain.wall_s:
            rounds_ratio = per_round(pm) / per_round(plain)
            total_ratio = pm.wall_s / plain.wall_s
            add(task, name, rounds_ratio <= FLOWER_MAX_SLOWDOWN,
                f"rounds-only {per_round(pm):.3f} vs {per_round(plain):.3f} s/round = {rounds_ratio:.2f}x; "
                f"total incl. Ray start-up {pm.wall_s:.1f} vs {plain.wall_s:.1f} s = {total_ratio:.2f}x")
        else:
            add(task, name, False, "missing result")
    return out


HEADER = ("task", "method", "rounds", "epochs", "final acc %", "best acc %", "up B/client/round",
          "up msg B/client/round", "down B/client/round", "up bpp", "wall s", "rounds s")


def cells(r: Result) -> list[str]:
    rounds_s = fmt(r.rounds_s, ".1f") + ("" if r.rounds_s is None else f" ({r.rounds_timed} rds)")
    return [r.task, r.method + (" FAILED" if r.error else ""), str(r.rounds), str(r.local_epochs),
            fmt(r.final_acc, ".2f"), fmt(r.best_acc, ".2f"), fmt(r.up_payload, ",.0f"), fmt(r.up_message, ",.0f"),
            fmt(r.down_payload, ",.0f"), fmt(r.up_bpp, ".3f"), fmt(r.wall_s, ".1f"), rounds_s]


def markdown(results: list[Result], checked: list[dict[str, Any]], machine: dict[str, Any]) -> str:
    lines = ["# fedmask benchmark: FedAvg vs FedPM vs edge-popup", "", md_table(HEADER, map(cells, results))]
    lines += ["", "Tasks: " + "; ".join(f"**{k}** = {v}" for k, v in TASK_NAMES.items()) + ". "
              "10 IID clients, all 10 train every round. Bytes are means over rounds of the round's "
              "total divided by the clients in it: *payload* = bytes of the arrays, *msg* = Flower's "
              "serialized protobuf size. *wall s* = the whole `fedmask run` subprocess including Ray "
              "start-up (for the plain loop: data loading + rounds). *rounds s* = `elapsed_s` of the "
              "last round minus the first (Ray start-up lands in round 1, so it covers rounds 2..N); "
              "for the plain loop, its own timer over all N rounds.",
              "", "The plain loop runs in the bench process with `torch.set_num_threads(1)`, "
              "like one Ray client (num-cpus = 1); Flower runs up to as many clients at once as "
              "there are cores.", "", "## Target checks", ""]
    lines += md_checks(checked)
    lines += mixed_code_warning(((f"{r.task}/{r.method}", r.source) for r in results), machine["source_digest_end"])
    lines += md_failures((f"{r.task} / {r.method}", r.error) for r in results if r.error)
    lines += md_machine(machine)
    return "\n".join(lines) + "\n"


def plot(results: list[Result], path: Path) -> None:
    tasks = list(dict.fromkeys(r.task for r in results))
    with figure(path, 1, len(tasks), (6 * len(tasks), 4)) as axes:
        for ax, task in zip(axes[0], tasks):
            for r in (r for r in results if r.task == task and r.accuracy):
                ax.plot(range(1, len(r.accuracy) + 1), r.accuracy, label=r.method,
                        linestyle="--" if r.method == PLAIN else "-", marker="." if r.method != PLAIN else None)
            ax.set(title=TASK_NAMES[task], xlabel="round", ylabel="test accuracy (%)")
            ax.legend()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30, help="rounds for every run (default 30)")
    parser.add_argument("--only", choices=tuple(TASKS), help="run one task only")
    parser.add_argument("--out", default="bench/results", help="where compare.md/json/png go")
    args = parser.parse_args(argv)
    out_dir, runs_dir = prepare_dirs(args.out, "fedmask-bench-")

    from fedmask.config import load
    start, results = time.perf_counter(), []
    for task in [args.only] if args.only else list(TASKS):
        epochs = {m: load(p, [*shared_sets(p), f"num-rounds={args.rounds}"])["local-epochs"]
                  for m, p in TASKS[task].items()}
        if len(set(epochs.values())) != 1:  # a fair comparison needs the same work per round
            print(f"warning: local epochs differ in {task}: {epochs}", flush=True)
        for method, config_path in TASKS[task].items():
            print(f"[{time.perf_counter() - start:6.0f} s] {task} / {method}: fedmask run {config_path} "
                  f"({args.rounds} rounds, {epochs[method]} local epoch(s))", flush=True)
            run_dir = runs_dir / f"{task}-{method}"
            source = source_digest()
            r = run_flower(task, method, config_path, args.rounds, epochs[method], run_dir)
            r.source = source
            results.append(r)
            print("    " + (f"FAILED: {r.error}" if r.error else " · ".join(
                f"{h} {c}" for h, c in zip(HEADER[4:], cells(r)[4:]))), flush=True)
        print(f"[{time.perf_counter() - start:6.0f} s] {task} / {PLAIN} (in this process, 1 torch thread)",
              flush=True)
        source = source_digest()
        r = run_plain_loop(task, TASKS[task]["fedpm"], args.rounds, epochs["fedpm"])
        r.source = source
        results.append(r)
        print("    " + (f"FAILED: {r.error}" if r.error else f"final acc {r.final_acc:.2f} · "
                        f"wall {r.wall_s:.1f} s · rounds {r.rounds_s:.1f} s"), flush=True)

    checked = checks(results)
    machine = machine_info("python -m bench.compare", argv, time.perf_counter() - start)
    md = markdown(results, checked, machine)
    (out_dir / "compare.md").write_text(md)
    (out_dir / "compare.json").write_text(json.dumps(
        {"results": [asdict(r) for r in results], "checks": checked, "machine": machine,
         "runs_dir": f"<tmp>/{runs_dir.name}"}, indent=2) + "\n")
    plot(results, out_dir / "compare_accuracy.png")
    print("\n" + md, flush=True)
    print(f"wrote {out_dir}/compare.md, compare.json, compare_accuracy.png", flush=True)
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
