"""Comparisons a reviewer would accept (issue 28): every method tuned on a validation split
with the same budget of trials, compared at equal local epochs, in bytes both ways.

``python -m bench.fair [--tasks mnist,fmnist] [--partitions iid,dir0.3] [--epochs 5]
[--methods fedavg,qsgd,topk-ef,fedpm,edge-popup] [--tune-seed 0] [--seeds 0,1,2] [--rounds 60]
[--widths 2,4] [--out bench/results/fair] [--name fair] [--choices EARLIER.json] [--replot]`` runs, for
each (task, partition, local epochs):

1. **tuning**: every candidate of every method's grid (:func:`grids`: the same number of
   trials for each method, learning rates and, for the mask methods, the server-side variant)
   on the tuning seed, with ``validation-fraction = 0.1``: the server holds out 10% of the
   train split, which no client trains on, scores every round on it and reads the test split
   once, after the last round. The candidate with the highest validation accuracy averaged
   over the last 5 rounds wins; the test split plays no part in the choice;
2. **final**: the winner of each method with every seed (the tuning seed's run is reused,
   it is the same run); reported: test accuracy (read once per run), mean ± sample sd;
3. **capacity**: the mask methods' winners at ``width`` x2 and x4 (hidden layers that many
   times wider; the learning rate and variant chosen at width 1, not tuned again).

Bytes are the payload bytes of the messages sent, both ways (``total_payload_bytes_per_client``
of each round), against FedAvg's round trip of the same width-1 model measured by
serializing it; the frontier figure puts validation accuracy against cumulative total bits per
parameter per client. Every run is a normal ``fedmask run`` in a subprocess (in-process
engine); finished runs are kept, so a stopped bench continues where it was. Writes
``fair.md``, ``fair.json`` and one ``fair_<task>_<partition>_<E>ep.png`` per cell into --out
(run folders under ``--out/runs``, not committed); ``--name NAME`` writes ``NAME.md`` and so on
instead, so that another selection of cells (the wider networks of one cell, say) reuses the
runs of the same folder without overwriting the main table.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import ROOT, figure, git_head, machine_info, md_machine, md_table, run_fedmask, source_digest

TASKS = {
    "mnist": ("MNIST-10k (official MNIST test split, 8k train / 2k test), LeNet-300-100", "configs/mnist-{}.toml",
              ['data-dir="../shared/data/mnist-t10k"']),
    "fmnist": ("Fashion-MNIST (70k, 60k/10k re-split), LeNet-300-100", "configs/fmnist-{}.toml",
               ['data-dir="../shared/data/fashion-mnist"']),
}
PARTITIONS = {
    "iid": ['partitioner="iid"'],
    "dir0.3": ['partitioner="dirichlet"', "dirichlet-alpha=0.3"],
}
COMMON = ["num-clients=100", "clients-per-round=10", "validation-fraction=0.1"]
VALIDATION = "validation accuracy, mean of the last 5 rounds"


def _dense(method: str, lrs: tuple[float, ...], *extra: str) -> tuple[str, list[tuple[str, list[str]]]]:
    """A dense method trained as FedAvg trains (SGD, momentum 0.9), one candidate per learning rate."""
    return "fedavg", [(f"lr {lr:g}", [f'method="{method}"', f"lr={lr}", *extra]) for lr in lrs]


# Six trials each; a first run (MNIST-10k IID, 1 local epoch) chose the top of 0.01-0.4 for top-k EF and
# of 0.05-0.2 for both mask methods, so both grids were moved up one step (the same number of trials).
# On Fashion-MNIST (IID, 1 local epoch) both mask methods then chose the bottom of 0.2-0.8, edge-popup
# falling 12 points from 0.2 to 0.4: their grid there is one step lower. The dense grid spans 40x and chose
# inside it on both datasets.
DENSE_LRS = (0.02, 0.05, 0.1, 0.2, 0.4, 0.8)
MASK_LRS = {"mnist": (0.2, 0.4, 0.8), "fmnist": (0.1, 0.2, 0.4)}
Grid = dict[str, tuple[str, list[tuple[str, list[str]]]]]


def grids(task: str) -> Grid:
    """method -> (the config it starts from, its candidates: name and --set items). Six trials each."""
    mask_lrs = MASK_LRS[task]
    return {
        "fedavg": _dense("fedavg", DENSE_LRS),
        "qsgd": _dense("qsgd", DENSE_LRS),
        "topk-ef": _dense("topk-ef", DENSE_LRS),
        # the dense baselines with a compressed downlink too (DoubleSqueeze's error-compensated QSGD)
        "fedavg+ef-qsgd-down": _dense("fedavg", DENSE_LRS, 'downlink-codec="ef-qsgd"'),
        "qsgd+ef-qsgd-down": _dense("qsgd", DENSE_LRS, 'downlink-codec="ef-qsgd"'),
        # FedPM coded at its information floor; the Beta prior reset every round (the paper) or every 3
        "fedpm": ("fedpm", [(f"lr {lr:g}, prior reset {reset}",
                             ['uplink-codec="relative-entropy"', f"lr={lr}", f"fedpm-prior-reset={reset}"])
                            for reset in (1, 3) for lr in mask_lrs]),
        # edge-popup with the level-voting server rule, votes weighted 0.3 or 0.1
        "edge-popup": ("edge-popup", [(f"lr {lr:g}, vote weight {w:g}",
                                       ['edge-popup-server-rule="vote-levels"', "edge-popup-levels=64",
                                        f"edge-popup-vote-weight={w}", f"lr={lr}"])
                                      for w in (0.3, 0.1) for lr in mask_lrs]),
    }


GRIDS = grids("mnist")  # the methods (the same in every task) and MNIST-10k's candidates
MASKS = ("fedpm", "edge-popup")


def run_path(out: Path, *parts: str) -> Path:
    return out.joinpath("runs", *parts)


def finished(path: Path, rounds: int) -> bool:
    summary = path / "summary.json"
    try:
        return json.loads(summary.read_text()).get("rounds") == rounds
    except (OSError, ValueError):
        return False


def ensure(path: Path, config: str, sets: list[str], rounds: int, label: str) -> dict[str, Any] | None:
    """The run at ``path``: kept when finished, else run now. None when it failed."""
    if not finished(path, rounds):
        print(f"  {label}", flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        run = run_fedmask(config, sets, path, rounds, "inprocess")
        if run.error and not finished(path, rounds):  # a run whose every round was skipped (diverged) exits 1
            print(f"    FAILED: {run.error.splitlines()[0]}", flush=True)
            return None
    return read_run(path)


def read_run(path: Path) -> dict[str, Any]:
    rows = [json.loads(line) for line in (path / "rounds.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((path / "summary.json").read_text())
    total_bits = np.cumsum([8 * r.get("total_payload_bytes_per_client", 0.0) / r["num_params"] for r in rows])
    return {
        "validation": [r["accuracy"] for r in rows],
        "skipped": sum(1 for r in rows if r.get("skipped")),  # rounds whose new state was refused (diverged)
        "score": float(np.mean([r["accuracy"] for r in rows[-5:]])),
        "test": summary["test_accuracy"],
        "evaluated_on": summary.get("evaluated_on"),
        "num_params": summary["num_params"],
        "total_bits_per_param": total_bits.tolist(),  # cumulative, per client, both ways
        "up_bytes": statistics.fmean(r["uplink_payload_bytes"] / max(r["clients"], 1) for r in rows),
        "total_bytes": summary.get("mean_total_payload_bytes_per_client_round"),
        "fedavg_bytes": summary.get("fedavg_payload_bytes_per_client_round"),
    }


def cell_sets(task: str, partition: str, epochs: int, seed: int) -> list[str]:
    return [*TASKS[task][2], *COMMON, *PARTITIONS[partition], f"local-epochs={epochs}", f"seed={seed}"]


def tune(out: Path, task: str, partition: str, epochs: int, method: str, seed: int,
         rounds: int) -> tuple[str, list[str], list[dict[str, Any]]]:
    """Every candidate of ``method`` on the tuning seed; the winner by validation accuracy."""
    base, candidates = grids(task)[method]
    config = TASKS[task][1].format(base)
    trials = []
    for name, sets in candidates:
        path = run_path(out, task, partition, f"{epochs}ep", method, "tune", slug(name), f"seed-{seed}")
        result = ensure(path, config, [*cell_sets(task, partition, epochs, seed), *sets], rounds,
                        f"{task} {partition} {epochs}ep {method} [{name}] seed {seed}")
        if result is not None:
            trials.append({"candidate": name, "sets": sets, "score": result["score"], "skipped": result["skipped"]})
    if not trials:
        raise RuntimeError(f"every candidate of {method} failed on {task} {partition}")
    best = max(trials, key=lambda t: t["score"])
    return best["candidate"], best["sets"], trials


def chosen(earlier: dict[str, Any], task: str, partition: str, epochs: int,
           method: str) -> tuple[str, list[str], list[dict[str, Any]]]:
    """The choice an earlier report (``--choices``, its JSON) made on validation for this cell and
    method, with that report's trials: a rerun of the finals that tunes nothing again."""
    for result in earlier["results"]:
        if (result["task"], result["partition"], result["epochs"]) == (task, partition, epochs):
            tuning = result["tuning"].get(method)
            if tuning is None:
                break
            _, candidates = grids(task)[method]
            sets = next((s for n, s in candidates if n == tuning["chosen"]), None)
            if sets is None:
                raise SystemExit(f"bench.fair: --choices chose {tuning['chosen']!r} for {method} on {task} "
                                 f"{partition}, which is not in today's grid")
            return tuning["chosen"], sets, tuning["trials"]
    raise SystemExit(f"bench.fair: --choices has no choice for {method} on {task} {partition} {epochs}ep")


def slug(text: str) -> str:
    return "".join(c if c.isalnum() or c == "." else "-" for c in text).strip("-")


def finals(out: Path, task: str, partition: str, epochs: int, method: str, sets: list[str], seeds: list[int],
           tune_seed: int, rounds: int, width: float = 1.0) -> list[dict[str, Any]]:
    """The chosen configuration with every seed (at ``width``)."""
    base, candidates = grids(task)[method]
    config = TASKS[task][1].format(base)
    results = []
    name = next(n for n, s in candidates if s == sets)
    for seed in seeds:
        if width == 1 and seed == tune_seed:
            path = run_path(out, task, partition, f"{epochs}ep", method, "tune", slug(name), f"seed-{seed}")
        else:  # named by the candidate: a kept run of an earlier winner is never taken for this one's
            path = run_path(out, task, partition, f"{epochs}ep", method, f"final-w{width:g}", slug(name),
                            f"seed-{seed}")
        result = ensure(path, config, [*cell_sets(task, partition, epochs, seed), *sets, f"width={width}"], rounds,
                        f"{task} {partition} {epochs}ep {method} width {width:g} seed {seed}")
        if result is not None:
            results.append(result)
    return results


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def row_of(method: str, width: float, candidate: str, runs: list[dict[str, Any]],
           fedavg_total: float | None) -> dict[str, Any]:
    test = [100 * r["test"] for r in runs]
    total = statistics.fmean(r["total_bytes"] for r in runs)
    return {"method": method, "width": width, "candidate": candidate, "seeds": len(runs),
            "test": mean_sd(test), "validation": mean_sd([100 * r["score"] for r in runs]),
            "up_bytes": statistics.fmean(r["up_bytes"] for r in runs), "total_bytes": total,
            "fedavg_bytes": runs[0]["fedavg_bytes"], "num_params": runs[0]["num_params"],
            "below_fedavg": None if not fedavg_total else fedavg_total / total,
            "curves": [{"validation": r["validation"], "bits": r["total_bits_per_param"]} for r in runs]}


def cell(out: Path, task: str, partition: str, epochs: int, args: argparse.Namespace) -> dict[str, Any]:
    """Tune, run the finals and the wider masks of one (task, partition, local epochs)."""
    rows, tuning = [], {}
    for method in args.methods:
        if args.choices is not None:
            candidate, sets, trials = chosen(args.choices, task, partition, epochs, method)
        else:
            candidate, sets, trials = tune(out, task, partition, epochs, method, args.tune_seed, args.rounds)
        tuning[method] = {"chosen": candidate, "trials": trials}
        runs = finals(out, task, partition, epochs, method, sets, args.seeds, args.tune_seed, args.rounds)
        widths = [1.0] + (args.widths if method in MASKS else [])
        for width in widths:
            if width != 1.0:
                runs = finals(out, task, partition, epochs, method, sets, args.seeds, args.tune_seed, args.rounds,
                              width)
            if runs:
                rows.append(row_of(method, width, candidate, runs, None))
    fedavg = next((r for r in rows if r["method"] == "fedavg"), None)
    for row in rows:  # FedAvg's measured round trip of the width-1 model, the same for every row
        row["below_fedavg"] = fedavg["total_bytes"] / row["total_bytes"] if fedavg else None
    return {"task": task, "partition": partition, "epochs": epochs, "rows": rows, "tuning": tuning}


def target(result: dict[str, Any]) -> str:
    """Issue 28's check: the best mask configuration (any width) within 1 point of tuned FedAvg
    at 30x or more fewer total bytes; "best" is the highest validation score of those at 30x,
    never the test score."""
    fedavg = next((r for r in result["rows"] if r["method"] == "fedavg"), None)
    every_mask = [r for r in result["rows"] if r["method"] in MASKS]
    masks = [r for r in every_mask if (r["below_fedavg"] or 0) >= 30]
    if fedavg is None or not every_mask:
        return "no FedAvg row or no mask row: not judged"
    if not masks:  # a miss: the chosen mask configurations all send more than a 30th of FedAvg's bytes
        most = max(every_mask, key=lambda r: r["below_fedavg"] or 0)
        return (f"**MISS** no chosen mask configuration reaches 30x fewer bytes up + down; the most is "
                f"{most['method']} width {most['width']:g} ({most['candidate']}) at {most['below_fedavg']:.1f}x, "
                f"{most['test'][0]:.2f} ± {most['test'][1]:.2f} vs FedAvg {fedavg['test'][0]:.2f} ± "
                f"{fedavg['test'][1]:.2f}")
    best = max(masks, key=lambda r: r["validation"][0])
    gap = fedavg["test"][0] - best["test"][0]
    verdict = "PASS" if gap <= 1 else "MISS"
    return (f"**{verdict}** best mask configuration at >= 30x fewer bytes: {best['method']} width {best['width']:g} "
            f"({best['candidate']}) {best['test'][0]:.2f} ± {best['test'][1]:.2f} vs FedAvg "
            f"{fedavg['test'][0]:.2f} ± {fedavg['test'][1]:.2f}: {gap:+.2f} points behind at "
            f"{best['below_fedavg']:.1f}x fewer bytes up + down")


PARTITION_NAMES = {"iid": "IID", "dir0.3": "Dirichlet 0.3"}


def headline(results: list[dict[str, Any]]) -> str:
    """The README's table: per cell, tuned FedAvg, QSGD with the ef-qsgd downlink (the dense
    baseline compressed both ways), the mask configuration (any width) with the best validation
    score over seeds (never the test score), and the target's verdict."""
    def cell_of(row: dict[str, Any] | None) -> str:
        if row is None:
            return "–"
        name = row["method"] + (f" x{row['width']:g}" if row["width"] != 1 else "")
        return f"{name}: {row['test'][0]:.2f} ± {row['test'][1]:.2f}, {row['below_fedavg']:.1f}x"

    def best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
        return max(rows, key=lambda r: r["validation"][0], default=None)

    table = []
    for result in results:
        rows = result["rows"]
        fedavg = next((r for r in rows if r["method"] == "fedavg"), None)
        dense = next((r for r in rows if r["method"] == "qsgd+ef-qsgd-down"), None)
        judged = target(result)
        verdict = judged.split("**")[1] if judged.startswith("**") else "not judged"
        name = f"{TASKS[result['task']][0].split(' (')[0]} · {PARTITION_NAMES.get(result['partition'], '?')}"
        table.append([f"{name} · {result['epochs']} ep", cell_of(fedavg), cell_of(dense),
                      cell_of(best([r for r in rows if r["method"] in MASKS])), verdict])
    return md_table(["cell", "FedAvg (tuned)", "QSGD, compressed both ways", "best mask", "within 1 point at 30x"],
                    table)


def width1_bits(row: dict[str, Any], rows: list[dict[str, Any]]) -> list[list[float]]:
    """Each run's cumulative bits per client, up + down, per parameter of the width-1 model:
    a run's own curve is per parameter of its own model, and a network twice as wide has
    about twice the parameters, so on its own scale it would look as cheap as width 1."""
    base = min((r["num_params"] for r in rows if r["width"] == 1), default=row["num_params"])
    return [[b * row["num_params"] / base for b in c["bits"]] for c in row["curves"]]


def plot(out: Path, result: dict[str, Any], prefix: str = "fair") -> str:
    name = f"{prefix}_{result['task']}_{result['partition']}_{result['epochs']}ep.png"
    with figure(out / name, 1, 1, (7.5, 4.8)) as axes:
        ax = axes[0][0]
        for row in result["rows"]:
            length = min(len(c["validation"]) for c in row["curves"])
            bits = np.mean([b[:length] for b in width1_bits(row, result["rows"])], axis=0)
            acc = 100 * np.mean([c["validation"][:length] for c in row["curves"]], axis=0)
            label = row["method"] + (f" x{row['width']:g}" if row["width"] != 1 else "")
            ax.plot(bits, acc, label=label, linestyle="-" if row["method"] in MASKS else "--")
        ax.set(xscale="log", xlabel="cumulative bits per client, up + down, per parameter of the width-1 model",
               ylabel="validation accuracy %",
               title=f"{TASKS[result['task']][0].split(' (')[0]} · {result['partition']} · "
                     f"{result['epochs']} local epochs (mean over seeds)")
        ax.legend(fontsize=7)
    return name


def edge(method: str, candidate: str, task: str) -> bool:
    """Whether a chosen candidate's learning rate is the smallest or largest its grid tried."""
    lrs = DENSE_LRS if method not in MASKS else MASK_LRS[task]
    return candidate.split(",")[0] in (f"lr {lrs[0]:g}", f"lr {lrs[-1]:g}")


def markdown(results: list[dict[str, Any]], args: argparse.Namespace, machine: dict[str, Any]) -> str:
    lines = ["# Equal effort: every method tuned on validation, bytes both ways", "",
             f"100 clients, 10 a round, {args.rounds} rounds; test accuracy in % (read once per run, after the last "
             f"round), mean ± sample sd over seeds {', '.join(map(str, args.seeds))}. Every choice (learning rate, "
             f"variant) was made on the tuning seed {args.tune_seed} by {VALIDATION} (10% of the train split, "
             "held out by the server); each method had the same number of trials (6). Bytes: payload per client "
             "and round, up + down, as sent; 'x fewer' against tuned FedAvg's measured bytes (float32 both ways). "
             "Wider mask networks reuse the width-1 choice." + (
                 f" The choices (and the tuning trials shown) are those of `{args.choices_from}`, made on "
                 "validation there; only the finals were run for this report." if args.choices is not None else ""),
             "",
             "## Headline" + (" (the README's table)" if args.name == "fair" else ""), "",
             "Accuracy: test %, mean ± sd over seeds; then how many times fewer bytes than FedAvg, up + down. 'Best' "
             "is the highest validation score of its group, never the test score.", "",
             headline(results), ""]
    for result in results:
        lines += [f"## {TASKS[result['task']][0]} · {result['partition']} · {result['epochs']} local epochs", ""]
        table = [[r["method"] + (f" x{r['width']:g}" if r["width"] != 1 else ""), r["candidate"], r["seeds"],
                  f"{r['test'][0]:.2f} ± {r['test'][1]:.2f}", f"{r['validation'][0]:.2f}",
                  f"{r['up_bytes']:,.0f}", f"{r['total_bytes']:,.0f}",
                  "–" if r["below_fedavg"] is None else f"{r['below_fedavg']:.1f}x"] for r in result["rows"]]
        lines += [md_table(["method", "chosen on validation", "seeds", "test acc %", "val acc % (last 5)",
                            "up B/client/round", "up+down B/client/round", "x fewer than FedAvg"], table), ""]
        lines += [f"- {target(result)}", ""]
        trials = [[m, t["candidate"], f"{100 * t['score']:.2f}", t["skipped"] or "",
                   ("chosen" + (", at the grid's edge" if edge(m, t["candidate"], result["task"]) else ""))
                   if t["candidate"] == v["chosen"] else ""]
                  for m, v in result["tuning"].items() for t in v["trials"]]
        lines += ["<details><summary>tuning trials (validation)</summary>", "",
                  md_table(["method", "candidate", VALIDATION, "rounds skipped (diverged)", ""], trials), "",
                  "</details>", "",
                  f"![frontier]({plot(Path(args.out), result, args.name)})", ""]
    return "\n".join([*lines, *md_machine(machine)]) + "\n"


def render(parser: argparse.ArgumentParser, out: Path, name: str) -> int:
    """NAME.md again from NAME.json: the report's options are parsed from the command its
    machine section recorded, so the page reads as the run wrote it, with today's rules."""
    saved = json.loads((out / f"{name}.json").read_text())
    command = shlex.split(saved["machine"]["command"])[3:]  # after "python -m bench.fair"
    args = parser.parse_args([*command, "--out", str(out), "--name", name])
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.choices_from = args.choices
    text = markdown(saved["results"], args, saved["machine"])
    note = (f"Rendered again from `{name}.json` by `python -m bench.fair --render` (library "
            f"{git_head()}): the runs and their numbers are those of the machine section below.")
    title, rest = text.split("\n", 1)
    (out / f"{name}.md").write_text(f"{title}\n\n{note}\n{rest}")
    print(f"→ {out / name}.md")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="mnist,fmnist")
    parser.add_argument("--partitions", default="iid,dir0.3")
    parser.add_argument("--epochs", default="5", help="comma-separated local epochs; each is its own table")
    parser.add_argument("--methods", default=",".join(GRIDS))
    parser.add_argument("--tune-seed", type=int, default=0)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--widths", default="2,4", help="the mask methods' wider networks ('' for none)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "fair"))
    parser.add_argument("--name", default="fair", help="the report's file name, without .md / .json")
    parser.add_argument("--choices", help="an earlier report's JSON: take its choices (made on validation) "
                        "instead of tuning again, and rerun only the finals")
    parser.add_argument("--replot", action="store_true", help="draw the figures of --out/NAME.json again (runs "
                        "nothing)")
    parser.add_argument("--render", action="store_true", help="write --out/NAME.md (and its figures) again from "
                        "NAME.json with the options its command recorded (runs nothing)")
    args = parser.parse_args(argv)
    if args.render:
        return render(parser, Path(args.out), args.name)
    if args.replot:
        out = Path(args.out)
        for result in json.loads((out / f"{args.name}.json").read_text())["results"]:
            print(f"→ {out / plot(out, result, args.name)}")
        return 0
    args.tasks, args.partitions = args.tasks.split(","), args.partitions.split(",")
    args.methods = args.methods.split(",")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.widths = [float(w) for w in args.widths.split(",") if w]
    epochs = [int(e) for e in args.epochs.split(",")]
    unknown = [t for t in args.tasks if t not in TASKS] + [p for p in args.partitions if p not in PARTITIONS] + \
        [m for m in args.methods if m not in GRIDS]
    if unknown:
        print(f"bench.fair: unknown task, partition or method: {unknown}", file=sys.stderr)
        return 2
    args.choices_from = args.choices  # the path, for the report; args.choices becomes its JSON
    if args.choices is not None:
        try:
            args.choices = json.loads(Path(args.choices_from).read_text())
        except (OSError, ValueError) as err:
            print(f"bench.fair: --choices: cannot read {args.choices_from}: {err}", file=sys.stderr)
            return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start, digest = time.perf_counter(), source_digest()
    results = [cell(out, task, partition, e, args) for task in args.tasks for partition in args.partitions
               for e in epochs]
    extra = {"source_digest_start": digest}
    if args.choices is not None:  # where the choices were made (the trials shown are that report's)
        extra |= {"choices_from": args.choices_from,
                  "choices_source": args.choices["machine"].get("source_digest_start")}
    machine = machine_info("python -m bench.fair", sys.argv[1:] if argv is None else argv,
                           time.perf_counter() - start, extra)
    (out / f"{args.name}.md").write_text(markdown(results, args, machine))
    (out / f"{args.name}.json").write_text(json.dumps({"results": results, "machine": machine}, indent=2))
    print(f"→ {out / args.name}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
