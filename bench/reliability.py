"""Reliability table: accuracy under drops, corrupt uploads and Byzantine clients.

``python -m bench.reliability [--config configs/quickstart.toml] [--rounds 20] [--seeds 0,1,2]
[--engine inprocess|ray] [--only TEXT] [--table masks|poison]`` runs FedPM (by default on scikit-learn's digits,
configs/quickstart.toml: 10 IID clients, all sampled, the setting issue 15 measured; pass
``--config configs/mnist-fedpm.toml`` for MNIST-10k) with each fault, and with 10/20/30%
attackers (``invert``, and ``colluding``: all attackers send the complement of the global
mask) under plain, trimmed (trim-fraction 0.1, 0.2, 0.3) and median votes, each scenario with every seed, and writes
bench/results/reliability.md and .json (mean and sample std of the final accuracy over the
seeds). ``--only`` keeps the scenarios whose name holds TEXT. For every run it counts the
uploads the server rejected (failure records of kind ``rejected``) and the results lost:
rounds missing from rounds.jsonl, or a rejected or missing upload that the failure records
do not explain (must be zero).

``--table poison`` runs the dense baselines instead (FedAvg and the compressed ones, SGD at
lr 0.05) with 10% and 30% of the clients sending a poisoned update (``attack = "poison"``:
one coordinate per tensor at 3e38, a valid upload), under the plain mean, the trimmed mean
(0.3) and the median, and writes bench/results/reliability-poison.md and .json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, machine_info, md_machine, md_table, prepare_dirs, run_fedmask

# config -> the data's name as its README (or scikit-learn) says
DATA_NAMES = {
    "configs/quickstart.toml": "scikit-learn digits (8x8)",
    "configs/mnist-fedpm.toml": "MNIST-10k (8k train / 2k test)",
}
ATTACK_SHARES = (10, 20, 30)
RULES: list[tuple[str, list[str]]] = [
    ("plain", []),
    *[(f"trimmed {t}", ['robust-aggregation="trimmed"', f"trim-fraction={t}"]) for t in (0.1, 0.2, 0.3)],
    ("median", ['robust-aggregation="median"']),
]
SCENARIOS: list[tuple[str, list[str]]] = [
    ("no faults", []),
    ("10% dropped", ["fault-drop-rate=0.1"]),
    ("30% dropped", ["fault-drop-rate=0.3"]),
    ("10% corrupt uploads", ["fault-corrupt-rate=0.1"]),
    # what a robust rule costs when nobody attacks
    *[(f"no attackers, {rule}", sets) for rule, sets in RULES if sets],
    *[(f"{p}% attackers ({attack}), {rule}", [f'attack="{attack}"', f"attack-fraction={p / 100}", *sets])
      for attack in ("invert", "colluding") for p in ATTACK_SHARES for rule, sets in RULES],
]


DENSE = ("fedavg", "qsgd", "ef-signsgd", "topk-ef", "signsgd")
POISON_RULES = [rule for rule in RULES if rule[0] in ("plain", "trimmed 0.3", "median")]
POISON_SCENARIOS: list[tuple[str, list[str]]] = [
    *[(f"{method}, no attackers", [f'method="{method}"', 'optimizer="sgd"', "lr=0.05"]) for method in DENSE],
    *[(f"{method}, {p}% poisoning, {rule}", [f'method="{method}"', 'optimizer="sgd"', "lr=0.05", 'attack="poison"',
                                           f"attack-fraction={p / 100}", *sets])
      for method in DENSE for p in (10, 30) for rule, sets in POISON_RULES],
]
# what each robust rule costs the dense baselines when nobody attacks
POISON_RULE_SCENARIOS: list[tuple[str, list[str]]] = [
    (f"{method}, no attackers, {rule}", [f'method="{method}"', 'optimizer="sgd"', "lr=0.05", *sets])
    for method in DENSE for rule, sets in POISON_RULES if rule != "plain"
]
TABLES = {"masks": (SCENARIOS, "reliability"), "poison": (POISON_SCENARIOS, "reliability-poison"),
          "poison-rules": (POISON_RULE_SCENARIOS, "reliability-poison-rules")}


def rejected_uploads(rows: list[dict[str, Any]]) -> int:
    """Failure records of kind "rejected" (one of fedmask.record.failures.FAILURE_KINDS): uploads or
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
    parser.add_argument("--config", default="configs/quickstart.toml", choices=sorted(DATA_NAMES))
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--engine", choices=("ray", "inprocess"), default="inprocess",
                        help="the faults and attacks act the same on both engines; in-process starts faster")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds; every scenario runs with each")
    parser.add_argument("--only", default="", help="run only the scenarios whose name holds this text")
    parser.add_argument("--table", choices=sorted(TABLES), default="masks",
                        help="masks: FedPM's faults and attacks; poison: the dense baselines under poisoned updates; "
                             "poison-rules: the same baselines under each robust rule with no attacker")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    table, stem = TABLES[args.table]
    scenarios = [(name, sets) for name, sets in table if args.only in name]
    out_dir, work = prepare_dirs(args.out, "fedmask-reliability-")
    start, results = time.perf_counter(), []
    for i, (name, sets) in enumerate(scenarios):
        print(f"[{i + 1}/{len(scenarios)}] {name}", flush=True)
        runs = [run_fedmask(args.config, [*sets, f"seed={seed}"], work / f"run{i}-seed{seed}", args.rounds, args.engine)
                for seed in seeds]
        accuracies = [run.rows[-1]["accuracy"] for run in runs if run.rows and not run.error]
        results.append({
            "scenario": name,
            "settings": sets,
            "seeds": seeds,
            "final_accuracy": statistics.fmean(accuracies) if len(accuracies) == len(runs) else None,
            "final_accuracy_sd": (statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0)
                                 if len(accuracies) == len(runs) else None,
            "final_accuracies": accuracies,
            "rejected_uploads": sum(rejected_uploads(run.rows) for run in runs),
            "failures": sum(r["failures"] for run in runs for r in run.rows),
            "skipped_rounds": sum(1 for run in runs for r in run.rows if r["skipped"]),
            "lost_results": sum(lost_results(run.rows, args.rounds, 10) for run in runs),
            "wall_s": round(sum(run.wall_s for run in runs), 1),
            "error": next((run.error for run in runs if run.error), None),
        })
        print(f"    accuracy {results[-1]['final_accuracy']}, failures {results[-1]['failures']}, "
              f"lost {results[-1]['lost_results']}", flush=True)
        # after each scenario, so a partial table counts
        write(out_dir, results, argv, start, args.rounds, len(scenarios), DATA_NAMES[args.config], stem)
    print((out_dir / f"{stem}.md").read_text())
    return 1 if any(r["error"] or r["lost_results"] for r in results) else 0


def write(out: Path, results: list[dict[str, Any]], argv: list[str] | None, start: float, rounds: int,
          planned: int, data: str, stem: str = "reliability") -> None:
    machine = machine_info("python -m bench.reliability", sys.argv[1:] if argv is None else argv,
                           time.perf_counter() - start)
    done = f"{len(results)} of {planned} scenarios"
    (out / f"{stem}.json").write_text(json.dumps({"results": results, "machine": machine, "done": done},
                                                 indent=2) + "\n")
    text = markdown(results, machine, rounds, data) if stem == "reliability" else \
        poison_markdown(results, machine, rounds, data, rules_only=stem == "reliability-poison-rules")
    (out / f"{stem}.md").write_text(text + f"\n({done} run.)\n")


TABLE = ("scenario", "final accuracy % (mean ± sd over seeds)", "rejected uploads", "failures recorded",
         "skipped rounds", "lost results")


def cells(r: dict[str, Any]) -> list[Any]:
    acc = ("error" if r["final_accuracy"] is None
           else f"{100 * r['final_accuracy']:.2f} ± {100 * (r.get('final_accuracy_sd') or 0):.2f}")
    return [r["scenario"], acc, r["rejected_uploads"], r["failures"], r["skipped_rounds"], r["lost_results"]]


def markdown(results: list[dict[str, Any]], machine: dict[str, Any], rounds: int, data: str) -> str:
    lines = [
        f"# Reliability: FedPM on {data}, 10 IID clients, {rounds} rounds",
        "",
        md_table(TABLE, map(cells, results)),
        "",
        "*rejected uploads*: failure records of kind `rejected`, uploads or replies the server refused "
        "(bad mask, CRC, fingerprint). *failures recorded*: every failure record: rejected, dropped by "
        "the simulator, no reply before the round timeout, or a client error. "
        "*lost results*: rounds missing from rounds.jsonl plus clients neither aggregated nor "
        "recorded as failed; must be 0. Attackers are a seeded fixed subset of the clients: *invert* "
        "attackers upload the inverse of their own mask, *colluding* attackers all upload one crafted "
        "mask, the complement of the global mask (theta < 0.5). *trimmed t* cuts the share t of the "
        "votes at each end per weight; *median* is the per-weight majority. Counts are summed over "
        "the seeds.",
        *md_machine(machine),
        "",
    ]
    return "\n".join(lines)


def poison_markdown(results: list[dict[str, Any]], machine: dict[str, Any], rounds: int, data: str,
                    rules_only: bool = False) -> str:
    title = "The robust rules with no attacker" if rules_only else "Poisoned updates"
    lines = [
        f"# {title}: the dense baselines on {data}, 10 IID clients, {rounds} rounds",
        "",
        md_table(TABLE, map(cells, results)),
        "",
        "Attackers are a seeded fixed subset of the clients; each sends, instead of its update (FedAvg: "
        "its weights), zero everywhere but the largest coordinate of each tensor, set to 3e38 with that "
        "coordinate's sign: finite and well-formed, so no reply check refuses it. *skipped rounds*: rounds "
        "whose new global state the server refused (not finite, or its largest |weight| grew more than "
        "1000x): the state stays as it was. *trimmed 0.3* cuts 30% of the values at each end per "
        "coordinate; *median* is the coordinate-wise median. Counts are summed over the seeds.",
        *md_machine(machine),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
