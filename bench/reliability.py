"""Reliability table: accuracy under drops, corrupt uploads and Byzantine clients.

``python -m bench.reliability [--rounds 30] [--engine ray|inprocess]`` runs FedPM on
MNIST-10k (configs/mnist-fedpm.toml: 10 IID clients, all sampled) with each fault or
attack, and writes bench/results/reliability.md and .json. For every run it counts the
uploads the server rejected (failure records of kind ``rejected``) and the results lost:
rounds missing from rounds.jsonl, or a rejected or missing upload that the failure records
do not explain (must be zero).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, machine_info, md_machine, md_table, prepare_dirs, run_fedmask

CONFIG = "configs/mnist-fedpm.toml"
ROBUST = ['robust-aggregation="trimmed"', "trim-fraction=0.3"]
SCENARIOS: list[tuple[str, list[str]]] = [
    ("no faults", []),
    ("10% dropped", ["fault-drop-rate=0.1"]),
    ("30% dropped", ["fault-drop-rate=0.3"]),
    ("10% corrupt uploads", ["fault-corrupt-rate=0.1"]),
    *[(f"{p}% attackers (invert), plain", ['attack="invert"', f"attack-fraction={p / 100}"]) for p in (10, 20, 30)],
    *[(f"{p}% attackers (invert), trimmed", ['attack="invert"', f"attack-fraction={p / 100}", *ROBUST])
      for p in (10, 20, 30)],
]


def rejected_uploads(rows: list[dict[str, Any]]) -> int:
    """Failure records of kind "rejected" (one of fedmask.failures.FAILURE_KINDS): uploads or
    replies the server refused.
    """
    return sum(1 for r in rows for f in r["failure_details"] if f["kind"] == "rejected")


def lost_results(rows: list[dict[str, Any]], rounds: int, clients: int) -> int:
    """Rounds missing, plus clients neither aggregated nor explained by a failure record."""
    missing_rounds = rounds - len(rows)
    unexplained = sum(clients - r["clients"] - r["failures"] for r in rows if not r["skipped"])
    return missing_rounds + abs(unexplained)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--engine", choices=("ray", "inprocess"), default="ray")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    out_dir, work = prepare_dirs(args.out, "fedmask-reliability-")
    start, results = time.perf_counter(), []
    for i, (name, sets) in enumerate(SCENARIOS):
        print(f"[{i + 1}/{len(SCENARIOS)}] {name}", flush=True)
        run = run_fedmask(CONFIG, sets, work / f"run{i}", args.rounds, args.engine)
        rows = run.rows
        results.append({
            "scenario": name,
            "settings": sets,
            "final_accuracy": rows[-1]["accuracy"] if rows else None,
            "rejected_uploads": rejected_uploads(rows),
            "failures": sum(r["failures"] for r in rows),
            "skipped_rounds": sum(1 for r in rows if r["skipped"]),
            "lost_results": lost_results(rows, args.rounds, 10),
            "wall_s": round(run.wall_s, 1),
            "error": run.error,
        })
        print(f"    accuracy {results[-1]['final_accuracy']}, failures {results[-1]['failures']}, "
              f"lost {results[-1]['lost_results']}", flush=True)
        write(out_dir, results, argv, start, args.rounds)  # after each run: partial tables count
    print((out_dir / "reliability.md").read_text())
    return 1 if any(r["error"] or r["lost_results"] for r in results) else 0


def write(out: Path, results: list[dict[str, Any]], argv: list[str] | None, start: float, rounds: int) -> None:
    machine = machine_info("python -m bench.reliability", sys.argv[1:] if argv is None else argv,
                           time.perf_counter() - start)
    done = f"{len(results)} of {len(SCENARIOS)} scenarios"
    (out / "reliability.json").write_text(json.dumps({"results": results, "machine": machine, "done": done},
                                                     indent=2) + "\n")
    (out / "reliability.md").write_text(markdown(results, machine, rounds) + f"\n({done} run.)\n")


TABLE = ("scenario", "final accuracy %", "rejected uploads", "failures recorded", "skipped rounds", "lost results")


def cells(r: dict[str, Any]) -> list[Any]:
    acc = "error" if r["final_accuracy"] is None else f"{100 * r['final_accuracy']:.2f}"
    return [r["scenario"], acc, r["rejected_uploads"], r["failures"], r["skipped_rounds"], r["lost_results"]]


def markdown(results: list[dict[str, Any]], machine: dict[str, Any], rounds: int) -> str:
    lines = [
        "# Reliability: FedPM on MNIST-10k (8k train / 2k test), 10 IID clients, "
        f"{rounds} rounds",
        "",
        md_table(TABLE, map(cells, results)),
        "",
        "*rejected uploads*: failure records of kind `rejected`, uploads or replies the server refused "
        "(bad mask, CRC, fingerprint). *failures recorded*: every failure record: rejected, dropped by "
        "the simulator, no reply before the round timeout, or a client error. "
        "*lost results*: rounds missing from rounds.jsonl plus clients neither aggregated nor "
        "recorded as failed; must be 0. Attackers upload the inverse of their mask every round "
        "they are sampled; *trimmed* cuts 30% of the votes at each end per weight.",
        *md_machine(machine),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
