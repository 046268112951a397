"""bench/noniid_overview.py: which table a cell comes from, and how it judges the targets."""

from __future__ import annotations

import json
from pathlib import Path

from bench.noniid_overview import Source, load_cells, targets, task_lines


def row(method: str, final: float, up_bytes: float, budgets: dict[int, float | None],
        partition: str = "iid") -> dict:
    return {"task": "mnist", "partition": partition, "method": method, "seeds": 2,
            "final": [final, final], "up_bpp": 8 * up_bytes / 266_610, "up_bytes_per_client": up_bytes,
            "budgets": {str(b): [v, v] for b, v in budgets.items()}}


def write(folder: Path, rows: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "noniid.json").write_text(json.dumps({"rows": rows, "machine": {}}))


def test_the_first_source_holding_a_cell_wins(tmp_path: Path):
    """A method in two tables is read from the first source listed, not the last."""
    write(tmp_path / "new", [row("fedavg", 0.90, 1_000_000, {1: None, 4: None, 16: None, 64: 0.5})])
    write(tmp_path / "old", [row("fedavg", 0.80, 1_000_000, {1: None, 4: None, 16: None, 64: 0.4}),
                             row("qsgd", 0.85, 2_000, {1: 0.7, 4: 0.8, 16: 0.85, 64: 0.85})])
    cells = load_cells(tmp_path, (Source("new", "aaaaaaa"), Source("old", "bbbbbbb")))
    assert cells[("mnist", "iid", "fedavg")][0]["final"] == [0.90, 0.90]
    assert cells[("mnist", "iid", "fedavg")][1].library == "aaaaaaa"
    assert cells[("mnist", "iid", "qsgd")][1].library == "bbbbbbb"


def test_frontier_and_gap_verdicts_follow_the_numbers(tmp_path: Path):
    """The best mask variant wins a budget only where its accuracy is at least the best
    baseline's; the 2-point target needs both the gap and the 30x uplink saving."""
    write(tmp_path / "t", [
        row("fedavg", 0.92, 1_000_000, {1: None, 4: None, 16: None, 64: 0.5}),
        row("fedpm", 0.85, 10_000, {1: 0.2, 4: 0.5, 16: 0.85, 64: 0.85}),
        row("fedpm-5ep", 0.91, 13_000, {1: 0.3, 4: 0.9, 16: 0.91, 64: 0.91}),  # the best FedPM
        row("fedavg-5ep", 0.95, 1_000_000, {1: None, 4: None, 16: None, 64: 0.6}),
        row("edge-popup", 0.91, 50_000, {1: 0.6, 4: 0.8, 16: 0.8, 64: 0.8}),  # close, but 20x only
        row("qsgd", 0.90, 2_000, {1: 0.8, 4: 0.88, 16: 0.9, 64: 0.9}),
    ])
    cells = load_cells(tmp_path, (Source("t", "ccccccc"),))
    text = "\n".join(task_lines(cells, "mnist"))
    frontier = next(line for line in text.splitlines() if line.startswith("| IID | lose"))
    cells_of = [c.strip() for c in frontier.strip("|").split("|")][1:]
    assert cells_of[0].startswith("lose 60.0 `edge-popup` vs 80.0 `qsgd`")
    assert cells_of[1].startswith("**win** 90.0 `fedpm-5ep` vs 88.0 `qsgd`")
    assert cells_of[2].startswith("**win** 91.0")
    verdicts = {line.split("|")[3].strip(): line for line in targets(cells)[0].splitlines()[2:]}
    assert "`fedpm-5ep`" in verdicts["fedpm"] and "+1.00" in verdicts["fedpm"]
    assert "+4.00 (`fedavg-5ep`)" in verdicts["fedpm"] and verdicts["fedpm"].rstrip(" |").endswith("PASS")
    assert "20x" in verdicts["edge-popup"] and verdicts["edge-popup"].rstrip(" |").endswith("FAIL")
