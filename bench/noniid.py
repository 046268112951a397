"""Non-IID data: mask methods against FedAvg and the compressed dense baselines, over seeds.

``python -m bench.noniid [--tasks fmnist,mnist] [--partitions iid,dir0.1,dir0.3,dir1.0,classes2]
[--methods ...] [--seeds 0,1,2] [--rounds 40] [--engine inprocess|ray] [--validation-fraction 0.1]`` runs every
(task, partition, method, seed) as a normal ``fedmask run`` (100 clients, 10 a round), keeps
finished runs when started again (so a stopped bench continues; two processes may run
different partitions into one --out, and a last call with all of them writes the tables),
and writes
bench/results/noniid.md, .json and one accuracy-vs-uplink plot per (task, partition):

- final accuracy, mean ± std over seeds, the mean over the last 5 rounds (the steadier
  figure where a curve swings from round to round), and whether the curve is flat (the mean
  over the last 5 rounds within 1 point of the 5 before);
- accuracy reached within cumulative uplink budgets of B bits per parameter per client
  (B = 1, 4, 16, 64: a mask method spends about 0.3-1 per round, FedAvg 32);
- uplink bits per parameter per round, bytes per client per round both ways, and how many
  times fewer bytes up + down than FedAvg's (issue 16's total);
- methods: fedavg, fedpm, edge-popup, the baselines, and variants of the shipped configs
  (``VARIANTS``: fedpm-2ep/-3ep/-5ep and fedavg-2ep/-3ep/-5ep with two, three or five local epochs,
  fedpm-5ep-r3/-r10 and fedpm-3ep-r3 with the Beta prior reset every 3 or 10 rounds,
  edge-popup-va with ``edge-popup-server-rule = "vote-average"``, edge-popup-vl with
  ``"vote-levels"``, edge-popup-vl-2ep and -5ep the same with two and five local epochs, edge-popup-vl-2ep-w0.1
  and -5ep-w0.1 with votes weighted 0.1 instead of 0.3);
- with ``--validation-fraction F`` every run holds out F of the train split (no client trains
  on it): curves, last-5 means and budget columns are validation accuracy, a budget's figure
  is the last round within it, and the final column is the test split's one reading, after
  the last round; ``noniid_overview`` then chooses variants on validation (issue 28);
- the targets of issue 14: FedPM and edge-popup within 2 points of FedAvg at 30x or more
  fewer uplink bytes (Fashion-MNIST and MNIST-10k, IID and Dirichlet 0.3); the best mask
  method above SignSGD, QSGD and top-k at every budget below 1 bit per parameter per round.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import ROOT, figure, machine_info, md_machine, md_table, run_fedmask

TASKS = {
    "fmnist": ("Fashion-MNIST (70k, 60k/10k re-split), LeNet-300-100", "fmnist"),
    "mnist": ("MNIST-10k (8k train / 2k test), LeNet-300-100", "mnist"),
}
MNIST_100 = ["num-clients=100", "clients-per-round=10"]  # the mnist-* configs have 10 clients
PARTITIONS = {
    "iid": ['partitioner="iid"'],
    "dir0.1": ['partitioner="dirichlet"', "dirichlet-alpha=0.1"],
    "dir0.3": ['partitioner="dirichlet"', "dirichlet-alpha=0.3"],
    "dir1.0": ['partitioner="dirichlet"', "dirichlet-alpha=1.0"],
    "classes2": ['partitioner="classes"', "classes-per-client=2"],
}
MASK_METHODS = ("fedpm", "edge-popup")
BASELINES = ("signsgd", "ef-signsgd", "qsgd", "topk-ef")


def vote_levels(weight: float, epochs: int | None = None) -> tuple[str, list[str]]:
    """edge-popup with ``vote-levels`` (64 levels), votes weighted ``weight``, and ``epochs``
    local epochs (the shipped config's when None)."""
    sets = ['edge-popup-server-rule="vote-levels"', f"edge-popup-vote-weight={weight}", "edge-popup-levels=64"]
    return "edge-popup", sets + ([f"local-epochs={epochs}"] if epochs else [])


# A method's shipped config with settings changed (`--methods` takes these names too):
# the settings issue 14's tuning found for non-IID data, and FedAvg at the same local work.
VARIANTS = {
    "fedavg-2ep": ("fedavg", ["local-epochs=2"]),
    "fedpm-2ep": ("fedpm", ["local-epochs=2"]),
    "fedavg-3ep": ("fedavg", ["local-epochs=3"]),
    "fedpm-3ep": ("fedpm", ["local-epochs=3"]),
    "fedavg-5ep": ("fedavg", ["local-epochs=5"]),
    "fedpm-5ep": ("fedpm", ["local-epochs=5"]),
    # the Beta prior kept over 3 or 10 rounds: theta from 30 or 100 clients' masks, not 10
    "fedpm-5ep-r3": ("fedpm", ["local-epochs=5", "fedpm-prior-reset=3"]),
    "fedpm-5ep-r10": ("fedpm", ["local-epochs=5", "fedpm-prior-reset=10"]),
    "fedpm-3ep-r3": ("fedpm", ["local-epochs=3", "fedpm-prior-reset=3"]),
    "edge-popup-va": ("edge-popup", ['edge-popup-server-rule="vote-average"', "edge-popup-vote-weight=0.3"]),
    "edge-popup-vl": vote_levels(0.3),
    "edge-popup-vl-2ep": vote_levels(0.3, epochs=2),
    # a smaller server step (votes weighted 0.1, not 0.3), for the 2-class partition's swings
    "edge-popup-vl-2ep-w0.1": vote_levels(0.1, epochs=2),
    # MNIST-10k's 100 clients hold 80 images each: a round of 1-2 epochs is 3-6 steps
    "edge-popup-vl-5ep": vote_levels(0.3, epochs=5),
    # MNIST-10k's 5-epoch setting with the smaller server step
    "edge-popup-vl-5ep-w0.1": vote_levels(0.1, epochs=5),
}
MASK_VARIANTS = {"fedpm": ("fedpm", "fedpm-2ep", "fedpm-3ep", "fedpm-5ep", "fedpm-5ep-r3", "fedpm-5ep-r10",
                           "fedpm-3ep-r3"),
                 "edge-popup": ("edge-popup", "edge-popup-va", "edge-popup-vl", "edge-popup-vl-2ep",
                                "edge-popup-vl-2ep-w0.1", "edge-popup-vl-5ep", "edge-popup-vl-5ep-w0.1")}
METHODS = ("fedavg", *MASK_METHODS, *BASELINES, *VARIANTS)
BUDGETS = (1, 4, 16, 64)  # cumulative uplink bits per parameter per client


def config_of(task: str, method: str) -> tuple[str, list[str]]:
    """The config file and the extra --set items of one (task, method)."""
    prefix = TASKS[task][1]
    extra = MNIST_100 if task == "mnist" else []
    if method in VARIANTS:
        base, changed = VARIANTS[method]
        config, sets = config_of(task, base)
        return config, [*sets, *changed]
    if method in BASELINES:  # the dense model trained as FedAvg's, the update compressed
        return f"configs/{prefix}-fedavg.toml", [*extra, f'method="{method}"']
    return f"configs/{prefix}-{method}.toml", extra


def run_dir(out: Path, task: str, partition: str, method: str, seed: int) -> Path:
    return out / "runs" / task / partition / method / f"seed-{seed}"


def finished(path: Path, rounds: int) -> bool:
    summary = path / "summary.json"
    return summary.exists() and json.loads(summary.read_text()).get("rounds") == rounds


def curves(path: Path) -> dict[str, Any]:
    """One run's curves. With a validation split (``--validation-fraction``), ``accuracy`` is the
    validation accuracy of every round and ``test`` the test accuracy, read once after the last."""
    rows = [json.loads(line) for line in (path / "rounds.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((path / "summary.json").read_text())
    validated = summary.get("evaluated_on") == "validation"
    clients = max(rows[0]["clients"], 1) if rows else 1
    params = rows[0]["num_params"] if rows else 1
    cumulative_bits = np.cumsum([8 * r["uplink_payload_bytes"] / (params * max(r["clients"], 1)) for r in rows])
    return {
        "accuracy": [r["accuracy"] for r in rows],
        "bits_per_param": cumulative_bits.tolist(),  # cumulative uplink bits per parameter per client
        "up_bytes_per_client": float(np.mean([r["uplink_payload_bytes"] / max(r["clients"], 1) for r in rows])),
        "down_bytes_per_client": float(np.mean([r["downlink_payload_bytes"] / clients for r in rows])),
        "up_bpp": float(np.mean([r["uplink_bpp"] for r in rows])),
        "validated": validated,
        "test": summary.get("test_accuracy") if validated else None,
    }


def at_budget(curve: dict[str, Any], budget: float, last: bool = False) -> float | None:
    """The accuracy within a cumulative uplink budget: the best of any round up to it, or with
    ``last`` the last round's (the rule of a validated run: no round is chosen after the fact)."""
    reached = [a for a, b in zip(curve["accuracy"], curve["bits_per_param"]) if b <= budget]
    if not reached:
        return None
    return reached[-1] if last else max(reached)


def mean_std(values: list[float | None]) -> str:
    present = [v for v in values if v is not None]
    if not present:
        return "–"
    text = f"{100 * np.mean(present):.2f}"
    if len(present) > 1:
        text += f" ± {100 * np.std(present, ddof=1):.2f}"
    return text + ("" if len(present) == len(values) else f" ({len(present)}/{len(values)})")


def summarise(out: Path, tasks: list[str], partitions: list[str], methods: list[str], seeds: list[int],
              rounds: int) -> tuple[list[dict[str, Any]], list[str]]:
    rows, lines = [], []
    for task in tasks:
        for partition in partitions:
            group = {}
            for method in methods:
                paths = [run_dir(out, task, partition, method, s) for s in seeds]
                done = [curves(p) for p in paths if finished(p, rounds)]
                if done:
                    group[method] = done
            if not group:
                continue
            lines += [f"### {TASKS[task][0]} · {partition} · 100 clients, 10 a round, {rounds} rounds", ""]
            table = []
            fedavg_total = None
            if "fedavg" in group:
                fedavg_total = float(np.mean([c["up_bytes_per_client"] + c["down_bytes_per_client"]
                                              for c in group["fedavg"]]))
            held = {c["validated"] for runs in group.values() for c in runs}
            if len(held) > 1:  # finals and budgets would mean different splits in one table
                raise SystemExit(f"bench.noniid: {out} holds {task} {partition} runs with and without a "
                                 "validation split; keep them in different --out folders")
            validated = held == {True}
            for method, runs in group.items():
                # validated: the test split's one reading; else the last round's test accuracy
                finals = [c["test"] if validated else c["accuracy"][-1] for c in runs]
                # a curve that swings from round to round (2 classes a client) is better read
                # from its last rounds' mean than from its last round
                last5 = [float(np.mean(c["accuracy"][-5:])) for c in runs]
                flat = all(len(c["accuracy"]) >= 10 and
                           abs(np.mean(c["accuracy"][-5:]) - np.mean(c["accuracy"][-10:-5])) < 0.01 for c in runs)
                row = {"task": task, "partition": partition, "method": method, "seeds": len(runs),
                       "final": finals, "last5": last5, "flat": flat,
                       "budgets": {b: [at_budget(c, b, last=validated) for c in runs] for b in BUDGETS},
                       "up_bpp": float(np.mean([c["up_bpp"] for c in runs])),
                       "up_bytes_per_client": float(np.mean([c["up_bytes_per_client"] for c in runs])),
                       "down_bytes_per_client": float(np.mean([c["down_bytes_per_client"] for c in runs]))}
                if validated:  # what a choice is made on: validation, last 5 rounds, per seed
                    row.update(evaluated_on="validation", validation=last5)
                total = row["up_bytes_per_client"] + row["down_bytes_per_client"]
                row["total_below_fedavg"] = None if fedavg_total is None else fedavg_total / max(total, 1.0)
                rows.append(row)
                table.append([method, len(runs), mean_std(finals), mean_std(last5), "yes" if flat else "no",
                              *[mean_std(row["budgets"][b]) for b in BUDGETS], f"{row['up_bpp']:.3f}",
                              f"{row['up_bytes_per_client']:,.0f}", f"{row['down_bytes_per_client']:,.0f}",
                              "–" if row["total_below_fedavg"] is None else f"{row['total_below_fedavg']:.1f}x"])
            split = "val " if validated else ""
            lines += [md_table(["method", "seeds", "final test acc %" if validated else "final acc %",
                                f"last 5 rounds {split}acc %", "flat",
                                *[f"{split}acc % at {b} b/param" for b in BUDGETS],
                                "up bpp/round", "up B/client/round", "down B/client/round",
                                "up+down below FedAvg"], table), ""]
            plot_frontier(out, task, partition, group, "validation" if validated else "test")
            lines += [f"![frontier](noniid_{task}_{partition}.png)", ""]
    return rows, lines


def plot_frontier(out: Path, task: str, partition: str, group: dict[str, list[dict[str, Any]]],
                  split: str = "test") -> None:
    with figure(out / f"noniid_{task}_{partition}.png", 1, 1, (7, 4.5)) as axes:
        ax = axes[0][0]
        for method, runs in group.items():
            length = min(len(c["accuracy"]) for c in runs)
            acc = np.mean([c["accuracy"][:length] for c in runs], axis=0)
            bits = np.mean([c["bits_per_param"][:length] for c in runs], axis=0)
            ax.plot(bits, acc, label=method, linestyle="--" if method in BASELINES else "-")
        ax.set(xscale="log", xlabel="cumulative uplink bits per parameter per client", ylabel=f"{split} accuracy",
               title=f"{TASKS[task][0]} · {partition} (mean over seeds)")
        ax.legend(fontsize=7)


def local_epochs(method: str) -> int | None:
    """The local epochs a variant's name sets (``fedpm-5ep-r3`` -> 5), None for the shipped ones."""
    found = re.search(r"-(\d+)ep(?:-|$)", method)
    return int(found.group(1)) if found else None


def checks(rows: list[dict[str, Any]]) -> list[str]:
    """Issue 14's targets, each with its numbers."""
    by = {(r["task"], r["partition"], r["method"]): r for r in rows}
    return _gap_lines(by) + _frontier_lines(by)


def _gap_lines(by: dict[tuple[str, str, str], dict[str, Any]]) -> list[str]:
    """Each mask variant within 2 points of FedAvg (and of FedAvg at its own local epochs) at >= 30x fewer bytes."""
    lines = []
    for task in TASKS:
        for partition in ("iid", "dir0.3"):
            fedavg = by.get((task, partition, "fedavg"))
            if fedavg is None:
                continue
            for family in MASK_METHODS:
                for method in MASK_VARIANTS[family]:
                    row = by.get((task, partition, method))
                    if row is None:
                        continue
                    references = [("FedAvg", fedavg)]
                    epochs = local_epochs(method)
                    same_work = by.get((task, partition, f"fedavg-{epochs}ep"))
                    if epochs and same_work is not None:  # also at the same local epochs
                        references.append((f"FedAvg with {epochs} local epochs", same_work))
                    for label, reference in references:
                        gap = 100 * (np.mean(reference["final"]) - np.mean(row["final"]))
                        ratio = reference["up_bytes_per_client"] / max(row["up_bytes_per_client"], 1)
                        ok = gap <= 2 and ratio >= 30
                        lines.append(f"- {'PASS' if ok else 'FAIL'} {task} {partition} {method}: {gap:+.2f} points "
                                     f"below {label} (target <= 2), {ratio:.0f}x fewer uplink bytes (target >= 30)")
    return lines


def _frontier_lines(by: dict[tuple[str, str, str], dict[str, Any]]) -> list[str]:
    """The best mask method against the best compressed baseline at every uplink budget."""
    lines = []
    for task, partition, method in list(by):
        if method != "fedavg":
            continue
        masks = [by[(task, partition, m)] for family in MASK_METHODS for m in MASK_VARIANTS[family]
                 if (task, partition, m) in by]
        bases = [by[(task, partition, m)] for m in BASELINES if (task, partition, m) in by]
        if not masks or not bases:
            continue
        for budget in BUDGETS:
            best_mask = max(np.mean([v for v in m["budgets"][budget] if v is not None] or [0]) for m in masks)
            best_base = max(np.mean([v for v in b["budgets"][budget] if v is not None] or [0]) for b in bases)
            lines.append(f"- {'PASS' if best_mask >= best_base else 'FAIL'} {task} {partition} at {budget} bits/param: "
                         f"best mask method {100 * best_mask:.2f}% vs best compressed baseline {100 * best_base:.2f}%")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="fmnist,mnist")
    parser.add_argument("--partitions", default=",".join(PARTITIONS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--engine", choices=("ray", "inprocess"), default="inprocess")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--validation-fraction", type=float, default=0.0,
                        help="hold out this share of the train split: curves, budgets and choices on it, "
                             "the test split read once per run")
    args = parser.parse_args(argv)
    tasks, partitions = args.tasks.split(","), args.partitions.split(",")
    methods, seeds = args.methods.split(","), [int(s) for s in args.seeds.split(",")]
    unknown = [t for t in tasks if t not in TASKS] + [p for p in partitions if p not in PARTITIONS] + \
        [m for m in methods if m not in METHODS]
    if unknown:
        print(f"bench.noniid: unknown task, partition or method: {unknown}", file=sys.stderr)
        return 2
    if not 0 <= args.validation_fraction < 1:
        print(f"bench.noniid: --validation-fraction takes a share in [0, 1), not {args.validation_fraction}",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    plan = [(t, p, m, s) for t in tasks for p in partitions for m in methods for s in seeds]
    held_out = [f"validation-fraction={args.validation_fraction}"] if args.validation_fraction else []
    for i, (task, partition, method, seed) in enumerate(plan, 1):
        path = run_dir(out, task, partition, method, seed)
        if finished(path, args.rounds):
            continue
        config, sets = config_of(task, method)
        print(f"[{i}/{len(plan)}] {task} {partition} {method} seed {seed}", flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        run = run_fedmask(config, [*sets, *PARTITIONS[partition], f"seed={seed}", *held_out], path, args.rounds,
                          args.engine)
        if run.error:
            print(f"    FAILED: {run.error.splitlines()[0]}", flush=True)
    rows, lines = summarise(out, tasks, partitions, methods, seeds, args.rounds)
    machine = machine_info("python -m bench.noniid", sys.argv[1:] if argv is None else argv,
                           time.perf_counter() - start)
    text = ["# Non-IID: mask methods, FedAvg and compressed baselines", "",
            "Accuracy in %, mean ± std over seeds; budgets are cumulative uplink bits per parameter per client.",
            *([f"Every run holds out {args.validation_fraction:g} of the train split as a validation split "
               "(no client trains on it): the curves, the last-5 means and the budget columns are validation "
               "accuracy, a budget's figure is the last round within it (no round chosen after the fact), and the "
               "test split is read once per run, after its last round (the final column)."]
              if args.validation_fraction else []),
            "Run directories: `bench/results/runs/` (not committed).", "", *lines, "## Targets", "",
            *checks(rows), "", *md_machine(machine)]
    (out / "noniid.md").write_text("\n".join(text) + "\n")
    (out / "noniid.json").write_text(json.dumps({"rows": rows, "machine": machine}, indent=2, default=str))
    print(f"→ {out / 'noniid.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
