"""Every non-IID result in one page: each dataset and partition, its best mask variant
against FedAvg and the compressed baselines, and issue 14's targets.

``python -m bench.noniid_overview`` reads the committed ``noniid.json`` files listed in
``SOURCES`` (each written by ``bench/noniid.py`` from runs of one library version) and
writes ``bench/results/noniid-overview.md``. It runs nothing. A (dataset, partition,
method) cell comes from the first source that holds it, and the page names the sources
and library commits behind each partition: each cell is one version, but a partition's
cells can come from several. The earlier tables that ``noniid-val/`` reruns with a validation
split (``noniid.md``, ``noniid-epochs/``, ``noniid-fedpm-reset/``, ``noniid-rec/``,
``noniid-mnist/``, ``noniid-mnist-partitions/``) are left out.

A budget is a win or a loss only where the two accuracies differ by more than the larger
of their standard deviations over seeds; otherwise it is a tie.

Nothing on the page is chosen on the test split (issue 28):

- A partition a validated source holds (``bench.noniid --validation-fraction``) is read from
  validated rows alone. Its "best" variant of a family is the one with the highest
  validation accuracy (mean of the last 5 rounds, mean over seeds); its budget columns are
  validation accuracy at the last round within the budget, and the best mask method and
  the best baseline of a budget are the highest on those.
- The other partitions (earlier runs without a validation split) take each family's
  variant from the validated choice of the same dataset (:func:`transferred`), and show no
  budget columns: their tables recorded the best test accuracy of any round within a
  budget, a round chosen on the test split.
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


# First source holding a cell wins (a validated row over any other); the newest and widest first.
# noniid-val/ reruns MNIST-10k and Fashion-MNIST, IID and Dirichlet 0.3, with a validation split
# (Fashion-MNIST IID 80 rounds, so that budgets of 4 bits and more are spent); its partitions read
# nothing else, and mnist-more/ does the same for MNIST-10k's other three. The tables they replaced
# (noniid.md, noniid-epochs/, noniid-fedpm-reset/, noniid-rec/, noniid-mnist/, noniid-mnist-partitions/)
# are no longer read.
SOURCES = (
    Source("noniid-val/fmnist-iid", "c8c9da6"),
    Source("noniid-val/fmnist-dir0.3", "c8c9da6"),
    Source("noniid-val/mnist", "c8c9da6"),
    Source("noniid-val/mnist-more", "6828822"),  # MNIST-10k's other three partitions, the same fedmask/
    Source("noniid-partitions", "53afc6d"),
)

Row = dict[str, Any]


def table_path(source: Source) -> str:
    return "bench/results/" + ("noniid.md" if source.folder == "." else f"{source.folder}/noniid.md")


Cells = dict[tuple[str, str, str], tuple[Row, Source]]


def validated(row: Row) -> bool:
    return row.get("evaluated_on") == "validation"


def load_cells(results: Path, sources: tuple[Source, ...] = SOURCES) -> Cells:
    """(task, partition, method) -> its row and source: the first source holding it wins (a
    validated row wins over an earlier one in any order), and a partition any validated row
    covers keeps its validated rows alone (choices on one split)."""
    cells: Cells = {}
    for source in sources:
        path = results / source.folder / "noniid.json"
        for row in json.loads(path.read_text())["rows"]:
            key = (row["task"], row["partition"], row["method"])
            if key not in cells or (validated(row) and not validated(cells[key][0])):
                cells[key] = (row, source)
    held_out = {key[:2] for key, (row, _) in cells.items() if validated(row)}
    return {key: value for key, value in cells.items() if key[:2] not in held_out or validated(value[0])}


def is_validated(cells: Cells, task: str, partition: str) -> bool:
    return any(validated(row) for (t, p, _), (row, _) in cells.items() if (t, p) == (task, partition))


def mean(values: list[float | None]) -> float:
    """Mean over the seeds that have a value; 0.0 when none has (a budget nobody reached)."""
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else 0.0


def std(values: list[float | None]) -> float:
    present = [v for v in values if v is not None]
    return float(np.std(present, ddof=1)) if len(present) > 1 else 0.0


def rows_of(cells: Cells, task: str, partition: str,
            methods: tuple[str, ...]) -> list[Row]:
    return [cells[(task, partition, m)][0] for m in methods if (task, partition, m) in cells]


def ranked(cells: Cells, task: str, partition: str, methods: tuple[str, ...]) -> list[Row]:
    """A validated partition's rows of ``methods``, highest validation accuracy first."""
    return sorted(rows_of(cells, task, partition, methods), key=lambda r: mean(r["validation"]), reverse=True)


def best(cells: Cells, task: str, partition: str, methods: tuple[str, ...]) -> Row | None:
    """The family's variant chosen on validation; in a partition without one, the variant its
    dataset's validated partitions chose (:func:`transferred`)."""
    if not is_validated(cells, task, partition):
        return transferred(cells, task, partition, methods)
    return next(iter(ranked(cells, task, partition, methods)), None)


# The validated partition whose choice an unvalidated one of the same dataset takes, in order.
REFERENCE_PARTITIONS = ("dir0.3", "iid")


def reference_of(cells: Cells, task: str, partition: str) -> str | None:
    """The first validated reference partition of the dataset other than ``partition``."""
    return next((r for r in REFERENCE_PARTITIONS if r != partition and is_validated(cells, task, r)), None)


def transferred(cells: Cells, task: str, partition: str, methods: tuple[str, ...]) -> Row | None:
    """The row of the variant ranked highest on validation in the reference partition of the
    same dataset (:func:`reference_of`), of those this partition ran; None when no partition of
    the dataset is validated or none of its variants ran here: never a choice on the test split."""
    reference = reference_of(cells, task, partition)
    if reference is None:
        return None
    here = [cells[(task, partition, r["method"])][0] for r in ranked(cells, task, reference, methods)
            if (task, partition, r["method"]) in cells]
    return next(iter(here), None)


def cell(row: Row | None, fedavg: Row | None = None) -> str:
    if row is None:
        return "– (no validated choice)" if fedavg is not None else "not run"
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


def chosen_on(cells: Cells, task: str, partition: str) -> str:
    if is_validated(cells, task, partition):
        return "validation"
    reference = reference_of(cells, task, partition)
    return f"{PARTITION_NAMES[reference]}'s validation" if reference else "nothing (no validated partition)"


def task_lines(cells: Cells, task: str) -> list[str]:
    partitions = [p for p in PARTITION_ORDER if (task, p, "fedavg") in cells]
    accuracy, frontier, sources = [], [], []
    for partition in partitions:
        fedavg = cells[(task, partition, "fedavg")][0]
        fedpm = best(cells, task, partition, MASK_VARIANTS["fedpm"])
        edge_popup = best(cells, task, partition, MASK_VARIANTS["edge-popup"])
        baseline = best(cells, task, partition, BASELINES)
        accuracy.append([PARTITION_NAMES[partition], cell(fedavg), cell(fedpm, fedavg),
                         cell(edge_popup, fedavg), cell(baseline, fedavg), chosen_on(cells, task, partition)])
        if is_validated(cells, task, partition):
            masks = rows_of(cells, task, partition, tuple(m for family in MASK_VARIANTS.values() for m in family))
            bases = rows_of(cells, task, partition, BASELINES)
            frontier.append([PARTITION_NAMES[partition],
                             *[verdict(best_at(masks, b), best_at(bases, b)) for b in BUDGETS]])
        used = sorted({cells[key][1] for key in cells if key[:2] == (task, partition)})
        sources.append(f"- {PARTITION_NAMES[partition]}: " + "; ".join(
            f"`{table_path(source)}` (library {source.library})" for source in used))
    seeds = sorted({row["seeds"] for (t, _, _), (row, _) in cells.items() if t == task})
    return [f"## {TASKS[task][0]}", "",
            f"Final test accuracy %, mean ± std over {'/'.join(map(str, seeds))} seeds; the variant; "
            "uplink bits per parameter a round; how many times fewer uplink bytes than FedAvg; what the "
            "variants were chosen on (a validated partition's test split is read once per run, after its "
            "last round).", "",
            md_table(["partition", "FedAvg", "best FedPM", "best edge-popup", "best compressed baseline",
                      "chosen on"], accuracy), "",
            *(["Validation accuracy at the last round within a cumulative uplink budget of B bits per "
               "parameter per client: the best mask variant against the best baseline (both on validation), "
               "a tie where they differ by no more than the larger standard deviation over seeds.", "",
               md_table(["partition", *[f"{b} b/param" for b in BUDGETS]], frontier), ""] if frontier else []),
            *(["Not shown at budgets: " + ", ".join(PARTITION_NAMES[p] for p in partitions
                                                    if not is_validated(cells, task, p)) +
               ". Their runs had no validation split and their tables hold the best test accuracy of any "
               "round within a budget (a round chosen on the test split); the per-folder pages keep them.", ""]
              if not all(is_validated(cells, task, p) for p in partitions) else []),
            "Sources (folder, library commit of its runs):", "", *sources, ""]


def targets(cells: Cells) -> list[str]:
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
            "100 clients, 10 a round, LeNet-300-100; Fashion-MNIST 40 rounds (IID: 80 in the validated "
            "rerun, so that the uplink budgets of 4 bits and more are spent), MNIST-10k 60. "
            "Each partition names the folders its rows come from and their library commits; "
            "the per-folder pages hold every variant, the last-5-rounds means (the steadier figure "
            "under 2 classes per client, where curves swing) and the frontier plots.", "",
            "Nothing here is chosen on the test split. A partition rerun with a validation split "
            "(`bench.noniid --validation-fraction 0.1`: 10% of the train split held out, no client "
            "trains on it) takes every \"best\" on validation: a family's variant by its validation "
            "accuracy (last 5 rounds, mean over seeds), and at each budget the best mask method and "
            "baseline by validation accuracy at the last round within the budget. A partition of "
            "earlier runs without a validation split takes each family's variant from its dataset's "
            "validated choice, and shows no budget columns. FedPM uploads of the validated reruns are "
            "relative-entropy coded, FedPM's default since 261533e; the other partitions' FedPM rows "
            "use the entropy codec, the default before.", ""]
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
