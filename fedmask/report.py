"""Compare finished runs: a table of what each setting reached, at what cost, over seeds.

Runs are found under any folder (a run directory, a sweep, a folder of both). Runs whose
configs differ only in ``seed`` are one *setting*; each figure is the mean over its seeds,
with the sample standard deviation when there are several; two runs of one setting with
the same seed (a Ray run and an in-process run, say) are one seed, counted once and named in
:attr:`Setting.duplicates`. ``fedmask compare`` prints the table (terminal, Markdown or CSV)
and draws accuracy against rounds and against cumulative bytes, uplink plus downlink, the
seed spread as a band. Labels say what the downlink sent: a lossless downlink that sent
some nodes the float32 state says how often.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedmask.api import Result, load_run
from fedmask.methods import uplink_codec_named

FORMATS = ("table", "md", "csv")
# Keys that name a setting in labels first; any other key that differs between settings follows.
_LABEL_KEYS = ("method", "uplink-codec", "downlink-codec")
_IGNORED = ("seed",)


def find_runs(paths: Iterable[str | Path]) -> list[Result]:
    """Every run directory at or below ``paths`` (a folder with config.toml and rounds.jsonl)."""
    found: dict[Path, Result] = {}
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such run or folder")
        candidates = [path] if (path / "config.toml").exists() else []
        candidates += sorted(p.parent for p in path.rglob("config.toml") if p.parent != path)
        for run_dir in candidates:
            if (run_dir / "rounds.jsonl").exists() and run_dir.resolve() not in found:
                found[run_dir.resolve()] = load_run(run_dir)
    return list(found.values())


@dataclass
class Setting:
    """Runs that differ only in their seed, one per seed; ``duplicates``: the other runs of a
    seed already counted (each is left out of every figure)."""

    label: str
    runs: list[Result]
    duplicates: list[Result] = field(default_factory=list)

    @property
    def seeds(self) -> list[int]:
        return [run.config.seed for run in self.runs]

    def duplicate_notes(self) -> list[str]:
        """One line per duplicated seed: the runs, and the one counted."""
        notes = []
        for run in self.runs:
            others = [d for d in self.duplicates if d.config.seed == run.config.seed]
            if others:
                notes.append(f"{self.label}: seed {run.config.seed} is in {len(others) + 1} runs "
                             f"({', '.join(str(r.run_dir) for r in [run, *others])}); counted once, from {run.run_dir}")
        return notes


def downlink_sent(config: dict[str, Any], runs: Sequence[Result]) -> str:
    """What the downlink sent: the codec, and for a lossless one that sent some nodes the float32
    state (a plug-in whose state takes many values), how many of its broadcasts that was."""
    codec = config["downlink-codec"]
    kinds: dict[str, int] = {}
    for run in runs:
        for row in run.rounds:
            for kind, count in (row.get("downlink_kinds") or {}).items():
                kinds[kind] = kinds.get(kind, 0) + count
    full, total = kinds.get("full", 0), sum(kinds.values())
    if codec != "lossless" or not full:
        return f"{codec} down"
    return f"lossless down, {100 * full / total:.0f}% of broadcasts float32"


def group_runs(runs: Sequence[Result]) -> list[Setting]:
    """Runs grouped by config (all keys but the seed), labelled by method, codecs and the
    keys that differ between the groups, in first-seen order; a seed's second run in a
    setting is a duplicate, not another seed."""
    groups: dict[tuple, list[Result]] = {}
    for run in runs:
        key = tuple((k, v) for k, v in run.config.to_dict().items() if k not in _IGNORED)
        groups.setdefault(key, []).append(run)
    configs = [dict(key) for key in groups]
    keys = list(dict.fromkeys(k for c in configs for k in c))  # a plug-in's plugin.<field> keys too
    varying = [k for k in keys if k not in _LABEL_KEYS and len({repr(c.get(k)) for c in configs}) > 1]
    settings = []
    for key, members in groups.items():
        config = dict(key)
        by_seed: dict[int, Result] = {}
        duplicates = []
        for run in sorted(members, key=lambda r: (r.config.seed, str(r.run_dir))):
            if run.config.seed in by_seed:
                duplicates.append(run)
            else:
                by_seed[run.config.seed] = run
        kept = list(by_seed.values())
        sent = {run.summary.get("uplink_codec") for run in kept} - {None}  # as the server resolved 'auto'
        up = sent.pop() if len(sent) == 1 else uplink_codec_named(config["method"], config["uplink-codec"])
        label = f"{config['method']} ({up} up, {downlink_sent(config, kept)})"
        extra = ", ".join(f"{k}={config[k]}" for k in varying if k in config)
        settings.append(Setting(f"{label} {extra}".strip(), kept, duplicates))
    return settings


def run_metrics(run: Result, target: float) -> dict[str, float | None]:
    """One run's figures; ``rounds_to_target`` and ``uplink_to_target`` are None if never reached."""
    accuracy = run.accuracy
    cumulative = run.cumulative_uplink_bytes
    reached = next((i for i, a in enumerate(accuracy) if a >= target), None)
    rows = run.rounds
    return {
        "final_accuracy": accuracy[-1] if accuracy else None,
        "best_accuracy": max(accuracy) if accuracy else None,
        "rounds": float(len(rows)),
        "rounds_to_target": None if reached is None else float(reached + 1),
        "uplink_to_target": None if reached is None else float(cumulative[reached]),
        "total_to_target": None if reached is None else float(_cumulative_total(run)[reached]),
        "uplink_bytes": float(sum(r["uplink_payload_bytes"] for r in rows)),
        "downlink_bytes": float(sum(r["downlink_payload_bytes"] for r in rows)),
        "total_bytes": float(sum(r["uplink_payload_bytes"] + r["downlink_payload_bytes"] for r in rows)),
        "mean_uplink_bpp": float(np.mean([r["uplink_bpp"] for r in rows])) if rows else None,
        "wall_s": run.summary.get("wall_s", rows[-1]["elapsed_s"] if rows else None),
    }


def _cumulative_total(run: Result) -> list[float]:
    """Payload bytes both ways, all clients, summed up to each round."""
    return np.cumsum([r["uplink_payload_bytes"] + r["downlink_payload_bytes"] for r in run.rounds]).tolist()


COLUMNS = ("final_accuracy", "best_accuracy", "rounds", "rounds_to_target", "uplink_to_target", "total_to_target",
           "uplink_bytes", "downlink_bytes", "total_bytes", "mean_uplink_bpp", "wall_s")


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """Mean and sample standard deviation of the values that exist, and their count.

    A figure some seeds never reached (None) is left out of the mean; the count says how
    many went in."""
    present = [v for v in values if v is not None]
    if not present:
        return None, None, 0
    std = float(np.std(present, ddof=1)) if len(present) > 1 else None
    return float(np.mean(present)), std, len(present)


def summarise(settings: Sequence[Setting], target: float) -> list[dict[str, Any]]:
    """One row per setting: for every column, mean, std and the number of seeds behind it."""
    rows = []
    for setting in settings:
        per_run = [run_metrics(run, target) for run in setting.runs]
        row: dict[str, Any] = {"setting": setting.label, "seeds": setting.seeds,
                               "duplicate_runs": [str(run.run_dir) for run in setting.duplicates]}
        for column in COLUMNS:
            mean, std, count = mean_std([m[column] for m in per_run])
            row[column] = {"mean": mean, "std": std, "n": count}
        rows.append(row)
    return rows


_HEADERS = {"final_accuracy": "final acc", "best_accuracy": "best acc", "rounds": "rounds",
            "rounds_to_target": "rounds to {t}", "uplink_to_target": "uplink B to {t}",
            "total_to_target": "up+down B to {t}", "uplink_bytes": "uplink B", "downlink_bytes": "downlink B",
            "total_bytes": "up+down B", "mean_uplink_bpp": "up bpp",
            "wall_s": "wall s"}


def _cell(column: str, value: dict[str, Any], runs: int) -> str:
    mean, std, count = value["mean"], value["std"], value["n"]
    if mean is None:
        return "–"
    if column.endswith("accuracy"):
        text, spread = f"{100 * mean:.2f}", None if std is None else f"{100 * std:.2f}"
    elif column in ("rounds", "rounds_to_target", "mean_uplink_bpp", "wall_s"):
        digits = 3 if column == "mean_uplink_bpp" else 1
        text, spread = f"{mean:.{digits}f}", None if std is None else f"{std:.{digits}f}"
    else:
        text, spread = f"{mean:,.0f}", None if std is None else f"{std:,.0f}"
    text += "" if spread is None else f" ± {spread}"
    return text + ("" if count == runs else f" ({count}/{runs})")


def _seeds_cell(row: dict[str, Any]) -> str:
    duplicates = len(row.get("duplicate_runs", []))
    return str(len(row["seeds"])) + (f" (+{duplicates} duplicate run{'s' * (duplicates > 1)})" if duplicates else "")


def format_rows(rows: Sequence[dict[str, Any]], fmt: str, target: float) -> str:
    """The summary as a terminal table, a Markdown table or CSV (mean and std columns)."""
    if fmt not in FORMATS:
        raise ValueError(f"format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    t = f"{target:g}"
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["setting", "seeds", "duplicate_runs",
                         *[f"{c}_{part}" for c in COLUMNS for part in ("mean", "std", "n")]])
        for row in rows:
            writer.writerow([row["setting"], " ".join(map(str, row["seeds"])), len(row["duplicate_runs"]),
                             *[row[c][part] for c in COLUMNS for part in ("mean", "std", "n")]])
        return buffer.getvalue()
    header = ["setting", "seeds", *[_HEADERS[c].format(t=t) for c in COLUMNS]]
    body = [[row["setting"], _seeds_cell(row), *[_cell(c, row[c], len(row["seeds"])) for c in COLUMNS]]
            for row in rows]
    if fmt == "md":
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body]) + "\n"
    from rich.console import Console
    from rich.table import Table

    table = Table(*header, title=f"accuracy in %, mean ± std over seeds; target {t}")
    for cells in body:
        table.add_row(*cells)
    buffer = io.StringIO()
    Console(file=buffer, width=200, highlight=False).print(table)
    return buffer.getvalue()


@dataclass
class Curve:
    """A setting's mean curve and its spread over seeds, as plotted."""

    label: str
    rounds: np.ndarray
    accuracy_mean: np.ndarray
    accuracy_std: np.ndarray
    uplink_mean: np.ndarray  # cumulative uplink payload bytes, mean over seeds
    total_mean: np.ndarray  # cumulative payload bytes both ways, mean over seeds


def curves(settings: Sequence[Setting]) -> list[Curve]:
    """Mean accuracy, cumulative uplink and cumulative total bytes per round over a setting's
    seeds (rounds all seeds finished)."""
    out = []
    for setting in settings:
        length = min(len(run.rounds) for run in setting.runs)
        if length == 0:
            continue
        acc = np.array([run.accuracy[:length] for run in setting.runs])
        up = np.array([run.cumulative_uplink_bytes[:length] for run in setting.runs], dtype=np.float64)
        total = np.array([_cumulative_total(run)[:length] for run in setting.runs], dtype=np.float64)
        std = acc.std(axis=0, ddof=1) if len(acc) > 1 else np.zeros(length)
        out.append(Curve(setting.label, np.arange(1, length + 1), acc.mean(axis=0), std, up.mean(axis=0),
                         total.mean(axis=0)))
    return out


def plot(settings: Sequence[Setting], path: str | Path, title: str = "") -> Any:
    """Accuracy against round and against cumulative bytes, uplink plus downlink (log axis), a
    band of ± one standard deviation over seeds; writes ``path`` and returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # the legend goes under both panels: settings' labels can be long (every differing key)
    count = len(settings)
    legend_inches = 0.25 + 0.18 * count
    fig, (by_round, by_bytes) = plt.subplots(1, 2, figsize=(12, 4.5 + legend_inches))
    for curve in curves(settings):
        low, high = curve.accuracy_mean - curve.accuracy_std, curve.accuracy_mean + curve.accuracy_std
        (line,) = by_round.plot(curve.rounds, curve.accuracy_mean, label=curve.label)
        by_round.fill_between(curve.rounds, low, high, color=line.get_color(), alpha=0.2)
        by_bytes.plot(curve.total_mean, curve.accuracy_mean, label=curve.label, color=line.get_color())
        by_bytes.fill_between(curve.total_mean, low, high, color=line.get_color(), alpha=0.2)
    by_round.set(xlabel="round", ylabel="test accuracy", title=title or "accuracy by round")
    by_bytes.set(xlabel="cumulative payload bytes, uplink + downlink (all clients)", ylabel="test accuracy",
                 xscale="log", title="accuracy by total bytes")
    for ax in (by_round, by_bytes):
        ax.grid(alpha=0.3)
    fig.legend(*by_round.get_legend_handles_labels(), loc="lower center", fontsize=7, ncol=1, frameon=False)
    fig.tight_layout(rect=(0.0, legend_inches / (4.5 + legend_inches), 1.0, 1.0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


def nan_to_none(value: Any) -> Any:
    """JSON-safe: NaN/inf become None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [nan_to_none(v) for v in value]
    return value
