"""Scale: s/round and peak memory of every engine against the plain loop, side by side.

``python -m bench.scale [--rounds 3] [--out bench/results]`` runs, in one go and with the
same config and seeds (configs/mnist-fedpm.toml on Fashion-MNIST (70k, 60k/10k re-split),
LeNet-300-100, ``per-client = false``), for each (num-clients, clients-per-round) in
(100, 10), (1000, 100), (10000, 10): ``fedmask run`` on Ray, in-process and batched, and
``bench/plain_loop.py`` on one thread; then a ResNet-18 FedPM mask round (synthetic 32x32
data, 100 clients a round, in-process) for memory. Memory is the peak of the summed RSS of
the whole process tree (Ray workers included), sampled from /proc every 0.2 s.
Results: ``scale.md`` and ``scale.json``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import ROOT, fmt, machine_info, md_machine, md_table, prepare_dirs, process_tree_stats, source_digest

DATA = ['dataset="idx"', 'data-dir="../shared/data/fashion-mnist"']
DATA_NAME = "Fashion-MNIST (70k, 60k/10k re-split)"
SETTINGS = ((100, 10), (1000, 100), (10000, 10))
ENGINES = ("ray", "inprocess", "batched")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _tree_rss(root: int) -> int:
    """Summed resident memory (bytes) of ``root`` and all its descendants, from /proc."""
    return sum(int(fields[21]) for fields in process_tree_stats(root)) * _PAGE


def measured(cmd: list[str], rounds_path: Path | None, log: Path) -> dict[str, Any]:
    """Run ``cmd``; wall time, peak tree memory, and when rounds.jsonl got its first line."""
    start = time.perf_counter()
    peak, first_round = 0, None
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            peak = max(peak, _tree_rss(proc.pid))
            if first_round is None and rounds_path is not None and rounds_path.exists() and rounds_path.stat().st_size:
                first_round = time.perf_counter() - start
            time.sleep(0.2)
    return {"rc": proc.returncode, "wall_s": time.perf_counter() - start, "peak_mb": peak / 2**20,
            "to_round1_s": first_round}


def fedmask_row(engine: str, sets: list[str], rounds: int, run_dir: Path, config: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "fedmask.cli", "run", config, "--set", f"num-rounds={rounds}",
           *[a for s in sets for a in ("--set", s)], "--out", str(run_dir), "--overwrite", "--engine", engine]
    got = measured(cmd, run_dir / "rounds.jsonl", run_dir.with_suffix(".log"))
    rows = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()] \
        if (run_dir / "rounds.jsonl").exists() else []
    got["rounds"] = len(rows)
    got["accuracy"] = [r["accuracy"] for r in rows]
    got["uplink_bytes"] = [r["uplink_payload_bytes"] for r in rows]
    # rounds 2..N: round 1 carries start-up (Ray, actors, first model build)
    got["s_per_round"] = (rows[-1]["elapsed_s"] - rows[0]["elapsed_s"]) / (len(rows) - 1) if len(rows) > 1 else None
    if got["rc"] != 0:
        got["error"] = "\n".join(run_dir.with_suffix(".log").read_text().splitlines()[-15:])
    return got


_PLAIN = """
import json, sys, time, torch
torch.set_num_threads(1)
from fedmask.config import load
from fedmask import task
from bench.plain_loop import run_plain
config = load(sys.argv[1], sys.argv[2:])
task.splits_of(config)
print(json.dumps(run_plain(config)))
"""


def plain_row(sets: list[str], rounds: int, log: Path, config: str) -> dict[str, Any]:
    cmd = [sys.executable, "-c", _PLAIN, config, f"num-rounds={rounds}", *sets]
    got = measured(cmd, None, log)
    lines = [line for line in log.read_text().splitlines() if line.startswith("{")]
    if got["rc"] == 0 and lines:
        result = json.loads(lines[-1])
        elapsed = result["elapsed_s"]  # rounds 2..N, as for the engines (round 1 carries first-use imports)
        got["s_per_round"] = (elapsed[-1] - elapsed[0]) / (len(elapsed) - 1) if len(elapsed) > 1 else result["wall_s"]
        got["accuracy"] = result["accuracy"]
    else:
        got["error"] = "\n".join(log.read_text().splitlines()[-15:])
    return got


def synthetic_idx(folder: Path, train: int, test: int, size: int = 32, seed: int = 0) -> None:
    """Random 1x32x32 images with 10 labels as IDX files (for a memory measurement only)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, count in (("train", train), ("t10k", test)):
        images = rng.integers(0, 256, size=(count, size, size), dtype=np.uint8)
        labels = rng.integers(0, 10, size=count, dtype=np.uint8)
        with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">IIII", 0x803, count, size, size) + images.tobytes())
        with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 0x801, count) + labels.tobytes())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per run (s/round is over rounds 2..N)")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--settings", default=",".join(f"{n}x{k}" for n, k in SETTINGS),
                        help="comma-separated NUMxPER-ROUND, e.g. 1000x100")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--skip-resnet", action="store_true")
    parser.add_argument("--resnet-engine", default="inprocess")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run each setting's engines this many times, alternating the order; "
                             "the table keeps each engine's fastest run (the machine is shared and noisy)")
    args = parser.parse_args(argv)
    out_dir, runs_dir = prepare_dirs(args.out, "fedmask-scale-")
    started, digest = time.perf_counter(), source_digest()
    results: dict[str, Any] = {"rows": [], "resnet": None, "source": digest}
    config = "configs/mnist-fedpm.toml"
    for setting in args.settings.split(","):
        clients, per_round = map(int, setting.split("x"))
        sets = [*DATA, f"num-clients={clients}", f"clients-per-round={per_round}", "per-client=false",
                'downlink-codec="float32"']  # the batched engine needs a stateless downlink
        engines = [*args.engines.split(","), "plain"]
        for repeat in range(args.repeats):
            for engine in engines if repeat % 2 == 0 else engines[::-1]:
                run = "" if repeat == 0 else f"-{repeat + 1}"
                print(f"{clients} x {per_round}: {engine}{run}", flush=True)
                run_dir = runs_dir / f"{engine}-{clients}-{per_round}{run}"
                if engine == "plain":
                    row = plain_row(sets, args.rounds, run_dir.with_suffix(".log"), config)
                else:
                    row = fedmask_row(engine, sets, args.rounds, run_dir, config)
                row |= {"engine": engine, "num_clients": clients, "clients_per_round": per_round, "repeat": repeat}
                print(f"   {fmt(row.get('s_per_round'), '.2f')} s/round, peak {row['peak_mb']:.0f} MB", flush=True)
                results["rows"].append(row)
                write(out_dir, results, started, args)
    if not args.skip_resnet:
        data_dir = runs_dir / "synthetic32"
        synthetic_idx(data_dir, train=800, test=200)
        sets = ['dataset="idx"', f'data-dir="{data_dir}"', "model=\"resnet18\"", "num-clients=100",
                "clients-per-round=100", "batch-size=8", "uplink-codec=\"packbits\"", "per-client=false",
                "eval-batch-size=100"]
        print("resnet18 x 100 clients", flush=True)
        row = fedmask_row(args.resnet_engine, sets, 1, runs_dir / "resnet18", config)
        row |= {"engine": args.resnet_engine, "num_clients": 100, "clients_per_round": 100}
        print(f"   peak {row['peak_mb']:.0f} MB, wall {row['wall_s']:.0f} s", flush=True)
        results["resnet"] = row
    write(out_dir, results, started, args, final=True)
    return 0


def _row(rows: list[dict[str, Any]], engine: str, clients: int, per_round: int) -> dict[str, Any] | None:
    """The engine's fastest run of the setting (one per --repeats), peak memory the largest seen."""
    runs = [r for r in rows if (r["engine"], r["num_clients"], r["clients_per_round"]) == (engine, clients, per_round)]
    if not runs:
        return None
    timed = [r for r in runs if r.get("s_per_round")]
    best = dict(min(timed, key=lambda r: r["s_per_round"]) if timed else runs[0])
    best["peak_mb"] = max(r["peak_mb"] for r in runs)
    best["all_s_per_round"] = [r.get("s_per_round") for r in runs]
    return best


def _table(rows: list[dict[str, Any]]) -> list[list[str]]:
    """One line per (engine, clients, clients a round): its fastest run against the plain loop's."""
    table = []
    settings = list(dict.fromkeys((r["engine"], r["num_clients"], r["clients_per_round"]) for r in rows))
    for engine, clients, per_round in settings:
        r = _row(rows, engine, clients, per_round)
        assert r is not None
        plain = _row(rows, "plain", r["num_clients"], r["clients_per_round"])
        ratio = (r["s_per_round"] / plain["s_per_round"]) if plain and plain.get("s_per_round") and \
            r.get("s_per_round") else None
        runs = ", ".join(fmt(v, ".2f") for v in r["all_s_per_round"])
        table.append([f"{r['num_clients']} x {r['clients_per_round']}", r["engine"],
                      fmt(r.get("s_per_round"), ".2f"), runs,
                      fmt(ratio, ".2f"), f"{r['peak_mb']:.0f}", fmt(r.get("to_round1_s"), ".1f"),
                      fmt(r["wall_s"], ".0f"), fmt(r["accuracy"][-1] if r.get("accuracy") else None, ".4f"),
                      "ok" if r["rc"] == 0 else "FAILED"])
    return table


def _targets(rows: list[dict[str, Any]]) -> list[str]:
    """The scale targets, each with its number, PASS or FAIL."""
    checks = []

    def check(name: str, value: float | None, target: float, lower_is_better: bool = True) -> None:
        if value is None:
            checks.append(f"- {name}: no result (FAIL)")
            return
        ok = value <= target if lower_is_better else value >= target
        checks.append(f"- {name}: {value:.2f} (target {'<=' if lower_is_better else '>='} {target}) "
                      f"{'PASS' if ok else 'FAIL'}")

    plain = _row(rows, "plain", 1000, 100)

    def ratio(engine: str) -> float | None:
        r = _row(rows, engine, 1000, 100)
        if not (r and plain and r.get("s_per_round") and plain.get("s_per_round")):
            return None
        return r["s_per_round"] / plain["s_per_round"]

    check("Ray s/round / plain s/round at (1000, 100)", ratio("ray"), 0.65)
    check("in-process s/round / plain at (1000, 100)", ratio("inprocess"), 1.2)
    speedup = ratio("batched")
    check("plain s/round / batched s/round at (1000, 100)", 1 / speedup if speedup else None, 2.0, False)
    for engine in ("inprocess", "ray", "batched"):
        small, big = _row(rows, engine, 100, 10), _row(rows, engine, 1000, 100)
        if small and big:
            check(f"{engine}: peak memory (1000, 100) / (100, 10) (whole process tree)",
                  big["peak_mb"] / small["peak_mb"], 1.2)
    for engine in ("ray", "inprocess", "batched"):
        r = _row(rows, engine, 10000, 10)
        if r:
            check(f"{engine}: start-up to the end of round 1 at 10,000 clients, s", r.get("to_round1_s"), 15.0)
    return checks


def write(out_dir: Path, results: dict[str, Any], started: float, args: argparse.Namespace,
          final: bool = False) -> None:
    rows = results["rows"]
    table, checks = _table(rows), _targets(rows)
    lines = [f"# Scale: engines against the plain loop ({DATA_NAME}, LeNet-300-100, FedPM)", "",
             f"Config: `configs/mnist-fedpm.toml` with {' '.join('--set ' + s for s in DATA)}, "
             f"`per-client = false`, {args.rounds} rounds per run. s/round: rounds 2..N of `rounds.jsonl` "
             "(round 1 carries start-up); plain loop (one torch thread): the same rounds 2..N of its own clock. "
             "Peak MB: summed RSS of the whole process tree (Ray workers included), sampled every 0.2 s. "
             "`to round 1 s`: from process start until round 1's line is written (start-up + round 1). "
             f"Each setting's engines ran {args.repeats} time(s), the order alternating; a row is the engine's "
             "fastest run, with every run's s/round beside it.", "",
             md_table(["clients", "engine", "s/round", "runs' s/round", "x plain", "peak MB", "to round 1 s", "wall s",
                       "final acc", "status"], table), "", "## Targets", "", *checks]
    if results["resnet"]:
        r = results["resnet"]
        lines += ["", "## ResNet-18 masks, 100 clients a round (synthetic 32x32 data, 1 round, "
                  f"{r['engine']})", "",
                  f"- peak memory of the process tree: {r['peak_mb']:.0f} MB (machine: 24 GB): "
                  f"{'PASS' if r['peak_mb'] < 24 * 1024 and r['rc'] == 0 else 'FAIL'}; wall {r['wall_s']:.0f} s, "
                  f"status {'ok' if r['rc'] == 0 else 'FAILED'}"]
    failures = [r for r in rows + ([results["resnet"]] if results["resnet"] else []) if r.get("error")]
    if failures:
        lines += ["", "## Failed runs", ""]
        for r in failures:
            lines += [f"{r['engine']} {r['num_clients']} x {r['clients_per_round']}:", "```", r["error"], "```"]
    if final:
        machine = machine_info("python -m bench.scale", sys.argv[1:], time.perf_counter() - started,
                               {"load_average_end": os.getloadavg()})
        results["machine"] = machine
        lines += ["", *md_machine(machine)]
        if machine.get("source_digest_end") != results["source"]:
            lines += ["", "**The sources changed while this bench ran: rerun it.**"]
    (out_dir / "scale.md").write_text("\n".join(lines) + "\n")
    (out_dir / "scale.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    raise SystemExit(main())
