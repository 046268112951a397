"""Downlink codecs compared over seeds: accuracy (mean ± std) and bytes both ways, per task.

For every task (dataset x partition) it runs ``fedmask sweep`` (resumable: finished runs
are kept) for float32 and float16, quantized with 2, 4 and 8 bits, and the lossless
broadcast, then reads every run's rounds.jsonl and summary.json back. Bytes are the
ledger's, measured from the real Flower messages; "x FedAvg" is FedAvg's round trip of the
same architecture (weighed by fedmask.record.totals) over the run's mean up + down message bytes
per client and round. The recommended default is the cheapest setting whose mean final
accuracy is within one seed std of float32's on every task.

    python -m bench.downlink                       # the full benchmark (hours on 2 cores)
    python -m bench.downlink --tasks digits-iid,digits-dir --rounds-mnist 10   # a reduced one
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, figure, machine_info, md_table, shared_sets

DIR = "partitioner=dirichlet", "dirichlet-alpha=0.3"
# task -> (config, extra --set args, data name as the data's README says)
TASKS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "digits-iid": ("configs/quickstart.toml", (), "digits (scikit-learn 8x8), IID"),
    "digits-dir": ("configs/quickstart.toml", DIR, "digits (scikit-learn 8x8), Dirichlet 0.3"),
    "mnist10k-iid": ("configs/mnist-fedpm.toml", (), "MNIST-10k (8k train / 2k test), IID"),
    "mnist10k-dir": ("configs/mnist-fedpm.toml", DIR, "MNIST-10k (8k train / 2k test), Dirichlet 0.3"),
    # Fashion-MNIST as its configs run it: 100 clients of 600 images, 10 sampled a round
    "fmnist-iid": ("configs/fmnist-fedpm.toml", (), "Fashion-MNIST (70k, 60k/10k re-split), IID, 10 of 100 clients"),
    "fmnist-dir": ("configs/fmnist-fedpm.toml", DIR,
                   "Fashion-MNIST (70k, 60k/10k re-split), Dirichlet 0.3, 10 of 100 clients"),
    "digits-iid-edge-popup": ("configs/digits-edge-popup.toml", (), "digits (scikit-learn 8x8), IID, edge-popup"),
}
# family folder -> sweep arguments; each family is one resumable sweep
FAMILIES = {
    "dense": ("--grid", "downlink-codec=float32,float16"),
    "quantized": ("--grid", "downlink-bits=2,4,8", "--set", "downlink-codec=quantized"),
    "lossless": ("--grid", "downlink-codec=lossless"),
}


def label(config: dict[str, Any]) -> str:
    codec = config["downlink-codec"]
    return f"quantized-{config['downlink-bits']}" if codec == "quantized" else codec


def sweep(task: str, family: str, seeds: str, runs: Path, rounds: int | None) -> Path:
    config, sets, _ = TASKS[task]
    out = runs / task / family
    command = [sys.executable, "-m", "fedmask.cli", "sweep", config, "--seeds", seeds, *FAMILIES[family],
               *[arg for s in [*shared_sets(config), *sets] for arg in ("--set", s)],
               "--engine", "inprocess", "--out", str(out)]
    if rounds:
        command += ["--set", f"num-rounds={rounds}"]
    print(" ".join(command), flush=True)
    subprocess.call(command, cwd=ROOT)
    return out


def read_runs(folder: Path) -> list[dict[str, Any]]:
    import tomllib

    found = []
    for summary_path in sorted(folder.glob("*/*/seed-*/summary.json")):  # family / setting / seed
        run_dir = summary_path.parent
        config = tomllib.loads((run_dir / "config.toml").read_text())
        rows = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines() if line.strip()]
        found.append({"config": config, "rows": rows, "summary": json.loads(summary_path.read_text())})
    return found


def per_client_round(rows: list[dict[str, Any]], direction: str) -> float:
    """Mean over rounds of the direction's message bytes per client the server sent to."""
    values = [r[f"{direction}_message_bytes"] / max(len(r["per_client"]), 1) for r in rows]
    return sum(values) / len(values)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(task: str, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from fedmask import task as fm_task
    from fedmask.config import resolve
    from fedmask.record.totals import fedavg_round_bytes

    out = []
    by_setting: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_setting.setdefault(label(run["config"]), []).append(run)
    fedavg = None
    for name, group in sorted(by_setting.items()):
        if fedavg is None:
            config = resolve(group[0]["config"])
            dense = fm_task.dense_state(fm_task.make_model(config, fm_task.splits_of(config), None))
            fedavg = fedavg_round_bytes(config, dense)["fedavg_message_bytes"]
        acc = mean_std([r["summary"]["final_accuracy"] for r in group])
        up = mean_std([per_client_round(r["rows"], "uplink") for r in group])
        down = mean_std([per_client_round(r["rows"], "downlink") for r in group])
        total = [per_client_round(r["rows"], "uplink") + per_client_round(r["rows"], "downlink") for r in group]
        dn_bpp = [statistics.fmean(row["downlink_bpp"] for row in r["rows"]) for r in group]
        late = [statistics.fmean(row["downlink_bpp"] for row in r["rows"][5:]) for r in group if len(r["rows"]) > 5]
        out.append({"task": task, "setting": name, "seeds": len(group), "rounds": len(group[0]["rows"]),
                    "final_accuracy": acc, "uplink_bytes_per_client_round": up,
                    "downlink_bytes_per_client_round": down, "total_bytes_per_client_round": mean_std(total),
                    "downlink_bpp": mean_std(dn_bpp), "downlink_bpp_after_round_5": mean_std(late) if late else None,
                    "max_downlink_bpp_after_round_5": max((row["downlink_bpp"] for r in group for row in r["rows"][5:]),
                                                          default=None),
                    "fedavg_bytes_per_client_round": fedavg, "fedavg_ratio": fedavg / statistics.fmean(total)})
    return out


def recommend(rows: list[dict[str, Any]]) -> tuple[str | None, list[str]]:
    """The cheapest setting within float32's seed spread on every FedPM task that has float32 runs."""
    tasks = sorted({r["task"] for r in rows if r["setting"] == "float32" and "edge-popup" not in r["task"]})
    notes, candidates = [], None
    for task in tasks:
        here = {r["setting"]: r for r in rows if r["task"] == task}
        mean, std = here["float32"]["final_accuracy"]
        ok = {s for s, r in here.items() if r["final_accuracy"][0] >= mean - std}
        notes.append(f"{task}: float32 {mean:.4f} ± {std:.4f}; within the spread: {', '.join(sorted(ok))}")
        candidates = ok if candidates is None else candidates & ok
    if not candidates:
        return None, notes
    cost = {s: statistics.fmean(r["total_bytes_per_client_round"][0] for r in rows
                                if r["setting"] == s and r["task"] in tasks) for s in candidates}
    return min(cost, key=cost.__getitem__), notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {', '.join(TASKS)}")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds-mnist", type=int, default=None, help="num-rounds for MNIST-10k/Fashion-MNIST")
    parser.add_argument("--runs", default="/tmp/fedmask-downlink", help="sweep folders (kept, resumable)")
    parser.add_argument("--no-run", action="store_true", help="only read the runs already in --runs")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--note", default="", help="a paragraph for the report (e.g. what a reduced run left out)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    runs_dir, out = Path(args.runs), Path(args.out)
    rows: list[dict[str, Any]] = []
    for task in args.tasks.split(","):
        rounds = None if task.startswith("digits") else args.rounds_mnist
        for family in args.families.split(","):
            if not args.no_run:
                sweep(task, family, args.seeds, runs_dir, rounds)
        rows += summarise(task, read_runs(runs_dir / task))
    best, notes = recommend(rows)
    machine = machine_info("python -m bench.downlink", sys.argv[1:], time.perf_counter() - start)
    write(rows, best, notes, args.note, out, machine)
    return 0


def _pm(value: tuple[float, float] | None, spec: str) -> str:
    return "–" if value is None else f"{value[0]:{spec}} ± {value[1]:{spec}}"


def write(rows: list[dict[str, Any]], best: str | None, notes: list[str], note: str, out: Path,
          machine: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    table = md_table(
        ("task", "downlink", "seeds x rounds", "final accuracy", "down B/client-round", "up B/client-round",
         "up+down B/client-round", "x FedAvg", "down bpp", "down bpp after r5 (max)"),
        [(TASKS[r["task"]][2], r["setting"], f"{r['seeds']} x {r['rounds']}", _pm(r["final_accuracy"], ".4f"),
          _pm(r["downlink_bytes_per_client_round"], ",.0f"), _pm(r["uplink_bytes_per_client_round"], ",.0f"),
          _pm(r["total_bytes_per_client_round"], ",.0f"), f"{r['fedavg_ratio']:.1f}x", _pm(r["downlink_bpp"], ".2f"),
          "–" if r["downlink_bpp_after_round_5"] is None else
          f"{r['downlink_bpp_after_round_5'][0]:.2f} ({r['max_downlink_bpp_after_round_5']:.2f})")
         for r in rows])
    text = "\n".join([
        "# Downlink codecs: accuracy and bytes both ways", "",
        "Bytes are message bytes measured by the ledger on the real Flower messages, per client the server",
        "sent to, averaged over rounds; 'x FedAvg' is one FedAvg round trip of the same architecture",
        "(fedmask.record.totals, weighed as sent) over the up + down bytes. Accuracy: final test accuracy, mean ±",
        "sample std over seeds. 'bpp': bits per parameter per client. FedPM unless the task says otherwise.", "",
        *([note, ""] if note else []), table, "",
        f"**Recommended default (cheapest within float32's seed spread on every task): {best}**", "",
        *[f"- {n}" for n in notes], "",
        "## Machine", "", *[f"- {k}: {v}" for k, v in machine.items()], ""])
    (out / "downlink.md").write_text(text)
    (out / "downlink.json").write_text(json.dumps({"rows": rows, "recommended": best, "notes": notes,
                                                   "machine": machine}, indent=2) + "\n")
    with figure(out / "downlink.png", 1, 1, (8, 4.5)) as axes:
        ax = axes[0][0]
        for task in sorted({r["task"] for r in rows}):
            here = [r for r in rows if r["task"] == task]
            ax.errorbar([r["total_bytes_per_client_round"][0] for r in here], [r["final_accuracy"][0] for r in here],
                        yerr=[r["final_accuracy"][1] for r in here], fmt="o", label=TASKS[task][2], capsize=3)
            for r in here:
                ax.annotate(r["setting"], (r["total_bytes_per_client_round"][0], r["final_accuracy"][0]), fontsize=7)
        ax.set(xscale="log", xlabel="up + down message bytes per client and round (log)",
               ylabel="final test accuracy (mean ± std over seeds)", title="FedPM: downlink codecs")
        ax.legend(fontsize=7)


if __name__ == "__main__":
    sys.exit(main())
