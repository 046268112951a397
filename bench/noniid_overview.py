"""Every non-IID result in one page: each dataset and partition, its best mask variant
against FedAvg and the compressed baselines, and issue 14's targets.

``python -m bench.noniid_overview`` reads the committed ``noniid.json`` files listed in
``SOURCES`` (each written by ``bench/noniid.py`` from runs of one library version) and
writes ``bench/results/noniid-overview.md``. It runs nothing. A (dataset, partition,
method) cell comes from the first source that holds it, and the page names the sources
and library commits behind each partition: each cell is one version, but a partition's
cells can come from several (Fashion-MNIST IID and Dirichlet 0.3 do). Left out:
``noniid-mnist/`` and ``noniid-fedpm-reset/`` (MNIST-10k IID and Dirichlet 0.3), whose
settings ``noniid-mnist-partitions/`` reruns in one version with the other partitions.

A budget is a win or a loss only where the two accuracies differ by more than the larger
of their standard deviations over seeds; otherwise it is a tie.

The "best" FedPM and edge-popup variant of a partition is the one with the highest mean
final accuracy over the same seeds it is reported on: a mild selection bias, in the mask
methods' favour, stated on the page.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from bench.common import ROOT, md_table
from bench.noniid import BASELINES, BUDGETS, MASK_VARIANTS, TASKS, local_epochs, mean_std

PARTITION_ORDER = ("iid", "dir1.0", "dir0.3", "dir0.1", "classes2")
PARTITION_NAMES = {"iid": "IID", "dir1.0": "Dirichlet 1.0", "dir0.3": "Dirichlet 0.3",
                   "dir0.1": "Dirichlet 0.1", "classes2": "2 classes per client"}


class Source(NamedTuple):
    folder: str  # under bench/results
    library: str  # the library commit every run of the folder used (its header says so)


# First source holding a cell wins; the newest and widest first. The noniid-rec/ tables rerun
# the best FedPM variant of MNIST-10k and Fashion-MNIST with the relative-entropy uplink (the
# default since 261533e); every other cell's FedPM uploads were entropy-coded.
SOURCES = (
    Source("noniid-rec/mnist", "261533e"),
    Source("noniid-rec/fmnist", "261533e"),
    Source("noniid-mnist-partitions", "4f0971f"),
    Source("noniid-partitions", "53afc6d"),
    Source("noniid-epochs", "03381d2"),
    Source("noniid-fedpm-reset/fmnist", "685255d"),
    Source(".", "0433eef"),
)

Row = dict[str, Any]


def table_path(source: Source) -> str:
    return "bench/results/" + ("noniid.md" if source.folder == "." else f"{source.folder}/noniid.md")


def load_cells(results: Path, sources: tuple[Source, ...] = SOURCES) -> dict[tuple[str, str, str], tuple[Row, Source]]:
    cells: dict[tuple[str, str, str], tuple[Row, Source]] = {}
    for source in sources:
        path = results / source.folder / "noniid.json"
        for row in json.loads(path.read_text())["rows"]:
            cells.setdefault((row["task"], row["partition"], row["method"]), (row, source))
    return cells


def mean(values: list[float | None]) -> float:
    """Mean over the seeds that have a value; 0.0 when none has (a budget nobody reached)."""
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else 0.0


def std(values: list[float | None]) -> float:
    present = [v for v in values if v is not None]
    return float(np.std(present, ddof=1)) if len(present) > 1 else 0.0


def rows_of(cells: dict[tuple[str, str, str], tuple[Row, Source]], task: str, partition: str,
            methods: tuple[str, ...]) -> list[Row]:
    return [cells[(task, partition, m)][0] for m in methods if (task, partition, m) in cells]


def best(cells: dict[tuple[str, str, str], tuple[Row, Source]], task: str, partition: str,
         methods: tuple[str, ...]) -> Row | None:
    rows = rows_of(cells, task, partition, methods)
    return max(rows, key=lambda r: mean(r["final"])) if rows else None


def cell(row: Row | None, fedavg: Row | None = None) -> str:
    if row is None:
        return "not run"
    text = f"{mean_std(row['final'])} `{row['method']}`, {row['up_bpp']:.2f} bpp"
    if fedavg is not None and row is not fedavg:
        text += f", {fedavg['up_bytes_per_client'] / max(row['up_bytes_per_client'], 1):.0f}x"
    return text


def best_at(rows: list[Row], budget: int) -> tuple[float, float, str] | None:
    """(mean, std, method) of the best accuracy within the budget; None if no run reached it."""
    scored = [(mean(r["budgets"][str(budget)]), std(r["budgets"][str(budget)]), r["method"]) for r in rows
              if any(v is not None for v in r["budgets"][str(budget)])]
    return max(scored) if scored else None


def verdict(mask: tuple[float, float, str] | None, base: tuple[float, float, str] | None) -> str:
    if mask is None or base is None:
        return "–" if mask is base else ("**win**" if base is None else "lose") + " (only one reached it)"
    gap = mask[0] - base[0]
    word = "tie" if abs(gap) <= max(mask[1], base[1]) else ("**win**" if gap > 0 else "lose")
    return f"{word} {100 * mask[0]:.2f} `{mask[2]}` vs {100 * base[0]:.2f} `{base[2]}`"


def task_lines(cells: dict[tuple[str, str, str], tuple[Row, Source]], task: str) -> list[str]:
    partitions = [p for p in PARTITION_ORDER if (task, p, "fedavg") in cells]
    accuracy, frontier, sources = [], [], []
    for partition in partitions:
        fedavg = cells[(task, partition, "fedavg")][0]
        fedpm = best(cells, task, partition, MASK_VARIANTS["fedpm"])
        edge_popup = best(cells, task, partition, MASK_VARIANTS["edge-popup"])
        baseline = best(cells, task, partition, BASELINES)
        accuracy.append([PARTITION_NAMES[partition], cell(fedavg), cell(fedpm, fedavg),
                         cell(edge_popup, fedavg), cell(baseline, fedavg)])
        masks = rows_of(cells, task, partition, tuple(m for family in MASK_VARIANTS.values() for m in family))
        bases = rows_of(cells, task, partition, BASELINES)
        frontier.append([PARTITION_NAMES[partition],
                         *[verdict(best_at(masks, b), best_at(bases, b)) for b in BUDGETS]])
        used = sorted({cells[key][1] for key in cells if key[:2] == (task, partition)})
        sources.append(f"- {PARTITION_NAMES[partition]}: " + "; ".join(
            f"`{table_path(source)}` (library {source.library})" for source in used))
    seeds = sorted({row["seeds"] for (t, _, _), (row, _) in cells.items() if t == task})
    return [f"## {TASKS[task][0]}", "",
            f"Final accuracy %, mean ± std over {'/'.join(map(str, seeds))} seeds; the variant; "
            "uplink bits per parameter a round; how many times fewer uplink bytes than FedAvg.", "",
            md_table(["partition", "FedAvg", "best FedPM", "best edge-popup", "best compressed baseline"],
                     accuracy), "",
            "Best accuracy within a cumulative uplink budget of B bits per parameter per client "
            "(any round up to it): best mask variant against best baseline, a tie where they differ by "
            "no more than the larger standard deviation over seeds.", "",
            md_table(["partition", *[f"{b} b/param" for b in BUDGETS]], frontier), "",
            "Sources (folder, library commit of its runs):", "", *sources, ""]


def targets(cells: dict[tuple[str, str, str], tuple[Row, Source]]) -> list[str]:
    """Issue 14's first target: within 2 points of FedAvg at >= 30x fewer uplink bytes."""
    table = []
    for task in TASKS:
        for partition in ("iid", "dir0.3"):
            if (task, partition, "fedavg") not in cells:
                continue
            fedavg = cells[(task, partition, "fedavg")][0]
            for family, variants in MASK_VARIANTS.items():
                row = best(cells, task, partition, variants)
                if row is None:
                    continue
                gap = 100 * (mean(fedavg["final"]) - mean(row["final"]))
                ratio = fedavg["up_bytes_per_client"] / max(row["up_bytes_per_client"], 1)
                epochs = local_epochs(row["method"])
                same = cells.get((task, partition, f"fedavg-{epochs}ep"), (None,))[0] if epochs else None
                same_text = "–" if same is None else \
                    f"{100 * (mean(same['final']) - mean(row['final'])):+.2f} (`{same['method']}`)"
                table.append([TASKS[task][1], PARTITION_NAMES[partition], family, f"`{row['method']}`",
                              f"{gap:+.2f}", same_text, f"{ratio:.0f}x",
                              "PASS" if gap <= 2 and ratio >= 30 else "FAIL"])
    return [md_table(["dataset", "partition", "family", "best variant", "points below FedAvg",
                      "points below FedAvg at the same local epochs", "fewer uplink bytes", "target"], table)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    results = Path(args.results)
    cells = load_cells(results)
    text = ["# Non-IID: every dataset and partition on one page", "",
            "Written by `python -m bench.noniid_overview` from the committed tables (it runs nothing). "
            "100 clients, 10 a round, LeNet-300-100; Fashion-MNIST 40 rounds, MNIST-10k 60. "
            "Each partition names the folders its rows come from and their library commits; "
            "the per-folder pages hold every variant, the last-5-rounds means (the steadier figure "
            "under 2 classes per client, where curves swing) and the frontier plots. "
            "\"Best\" variant: highest mean final accuracy over the same seeds, a mild selection "
            "bias in the mask methods' favour. FedPM rows from `noniid-rec/` (library 261533e on) "
            "code the uploads with relative-entropy coding, FedPM's default since; the other FedPM "
            "rows with the entropy codec, the default before.", ""]
    for task in ("fmnist", "mnist"):
        text += task_lines(cells, task)
    text += ["## Target: within 2 points of FedAvg at 30x or more fewer uplink bytes", "",
             *targets(cells), ""]
    out = results / "noniid-overview.md"
    out.write_text("\n".join(text) + "\n")
    print(f"→ {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
