"""What every benchmark shares: running ``fedmask run`` for real, the results folder, the
machine and code it measured, and the markdown tables and plots it writes.

Benchmarks run the CLI in a subprocess, through Flower's Ray engine, exactly as a user
would; they read back what the run wrote instead of trusting in-process numbers.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# What a run's numbers depend on: the library, the apps, the configs, and the plain loop
# that bench.compare times against Flower.
SOURCES = ("fedmask", "server", "clients", "configs", "bench/plain_loop.py")
MISSING = "–"  # a table cell with no number
# The shipped MNIST and Fashion-MNIST configs download torchvision's files (a user's machine);
# these benchmarks measured the copies in this workspace's shared folder, named explicitly
# here for every run of those configs: MNIST-10k (the official 10k test split, seeded 8k/2k)
# and Fashion-MNIST's 70k images re-split 60k/10k. Paths are relative to the project root.
SHARED_DATA: dict[str, dict[str, Any]] = {
    "mnist": {"dataset": "idx", "data-dir": "../shared/data/mnist-t10k", "test-fraction": 0.2},
    "fmnist": {"dataset": "idx", "data-dir": "../shared/data/fashion-mnist"},
}


def shared_data(config: str | Path) -> dict[str, Any]:
    """The data keys a shipped config is benchmarked with here ({} for the embedded digits)."""
    return dict(SHARED_DATA.get(Path(config).name.split("-")[0], {}))


def shared_sets(config: str | Path) -> list[str]:
    """:func:`shared_data` as ``--set`` arguments, to go before a benchmark's own."""
    return [f"{key}={json.dumps(value)}" for key, value in shared_data(config).items()]


@dataclass
class FedmaskRun:
    """One finished (or failed) ``fedmask run``: its rounds, summary and wall time."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0
    error: str | None = None


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def run_fedmask(config: str, sets: list[str], run_dir: Path, rounds: int, engine: str = "ray") -> FedmaskRun:
    """``fedmask run CONFIG --set ...`` in a subprocess, with a heartbeat every 30 s; a shipped
    MNIST or Fashion-MNIST config reads this workspace's copy (:func:`shared_sets`)."""
    cmd = [sys.executable, "-m", "fedmask.cli", "run", config, "--set", f"num-rounds={rounds}",
           *[arg for item in [*shared_sets(config), *sets] for arg in ("--set", item)], "--out", str(run_dir),
           "--overwrite",
           "--engine", engine]
    log_path = run_dir.with_suffix(".log")
    start = last = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            time.sleep(1)
            if time.perf_counter() - last >= 30:
                last = time.perf_counter()
                print(f"    … {last - start:5.0f} s, {_lines(run_dir / 'rounds.jsonl')}/{rounds} rounds", flush=True)
    run = FedmaskRun(wall_s=time.perf_counter() - start)
    rounds_path, summary_path = run_dir / "rounds.jsonl", run_dir / "summary.json"
    if rounds_path.exists():
        run.rows = [json.loads(line) for line in rounds_path.read_text().splitlines() if line.strip()]
    if proc.returncode != 0 or not summary_path.exists():
        tail = log_path.read_text().splitlines()[-30:]
        run.error = f"exit code {proc.returncode}; log {log_path}:\n" + "\n".join(tail)
    else:
        run.summary = json.loads(summary_path.read_text())
        if len(run.rows) != rounds:
            run.error = f"only {len(run.rows)} of {rounds} rounds finished"
    return run


def process_tree_stats(root: int) -> list[list[str]]:
    """The fields of ``/proc/PID/stat`` after the command name (field 3 on, so index 0 is the
    state) of ``root`` and every process under it; processes that end while being read are
    left out. Index 11/12: user/system clock ticks; 21: resident pages."""
    parents: dict[int, int] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            parents[int(entry)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
        stats[int(entry)] = fields
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        children = [child for child, parent in parents.items() if parent == pid and child not in tree]
        tree.update(children)
        frontier += children
    return [stats[pid] for pid in tree if pid in stats]


def prepare_dirs(out: str, prefix: str) -> tuple[Path, Path]:
    """The results folder (created) and a fresh temporary folder for run directories and logs.

    Also moves to the project root: :data:`SHARED_DATA`'s ``data-dir`` is relative to it.
    """
    out_dir = Path(out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    os.chdir(ROOT)
    runs_dir = Path(tempfile.mkdtemp(prefix=prefix))
    print(f"run directories and logs: {runs_dir}", flush=True)
    return out_dir, runs_dir


def source_digest(sources: Sequence[str] = SOURCES) -> str:
    """Hash of the library code and configs: others edit them while the bench runs, and a
    table whose rows saw different code must say so (``mixed_code_warning``)."""
    digest = hashlib.sha256()
    for name in sources:
        top = ROOT / name
        for path in sorted(top.rglob("*") if top.is_dir() else [top]):
            if path.suffix in (".py", ".toml"):
                digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def git_head(dirty_paths: Sequence[str] = ()) -> str:
    """Short HEAD; with ``dirty_paths``, also whether files under them differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip() or "unknown"
        if not dirty_paths:
            return head
        status = subprocess.run(["git", "status", "--porcelain", "--", *dirty_paths], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.split("\n")
        dirty = [line[3:] for line in status if line.strip()]
        return head + (f" + uncommitted changes in {', '.join(dirty)}" if dirty else " (library clean)")
    except (OSError, subprocess.CalledProcessError) as err:
        return f"unknown ({err})"


def machine_info(command: str, argv: Sequence[str], total_s: float,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Where, with what and on which code the numbers were measured; call it at the end.

    ``extra`` (a bench's own fields) goes before ``source_digest_end``, the digest of the
    sources now, which ``mixed_code_warning`` compares the rows' digests with.
    """
    versions = {name: importlib.metadata.version(name) for name in ("torch", "flwr", "numpy", "constriction")}
    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        **versions,
        "git_head": git_head(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join([command, *map(shlex.quote, argv)]),
        "bench_total_s": round(total_s, 1),
        **(extra or {}),
        "source_digest_end": source_digest(),
    }


def per_client_mean(rows: list[dict[str, Any]], key: str, direction: str) -> float | None:
    """Mean over rounds of (round's total bytes / clients that sent or got a message); None
    without rounds."""
    values = []
    for row in rows:
        clients = sum(1 for c in row["per_client"] if f"{direction}_payload_bytes" in c)
        values.append(row[key] / max(clients, 1))
    return sum(values) / len(values) if values else None


# ---------------------------------------------------------------- markdown


def fmt(value: float | None, spec: str) -> str:
    """A number for a table cell; ``MISSING`` for None (the run failed or it does not apply)."""
    return MISSING if value is None else format(value, spec)


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A markdown table, no trailing newline: ``| a | b |``, ``|---|---|``, then a line per row."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def md_checks(checked: Iterable[dict[str, Any]]) -> list[str]:
    """``- **PASS** [task] check: detail`` lines; ``[task]`` where the check has one."""
    return [f"- **{'PASS' if c['pass'] else 'FAIL'}** " + (f"[{c['task']}] " if "task" in c else "")
            + f"{c['check']}: {c['detail']}" for c in checked]


def md_failures(failed: Iterable[tuple[str, str]]) -> list[str]:
    """A ``## Failed runs`` section from (title, error) pairs; nothing when there are none."""
    lines: list[str] = []
    for title, error in failed:
        lines += [f"### {title}", "", "```", error, "```", ""]
    return ["", "## Failed runs", "", *lines] if lines else []


def md_machine(machine: dict[str, Any]) -> list[str]:
    """The ``## Machine`` section: a ``- key: value`` line per field."""
    return ["", "## Machine", "", *[f"- {k}: {v}" for k, v in machine.items()]]


def mixed_code_warning(rows: Iterable[tuple[str, str]], end: str) -> list[str]:
    """A bold warning when a row's source digest is not ``end`` (the digest when the bench
    finished), naming those rows; nothing when every row measured the same code.

    ``rows`` are (label, digest) pairs, e.g. ("mnist/fedpm", row.source).
    """
    differ = [f"{label} {digest}" for label, digest in rows if digest != end]
    if not differ:
        return []
    return ["", f"**WARNING: not every row measured the code at the end ({end})**: the library or "
            "configs changed while the bench ran, or rows were kept from an earlier run. "
            "Rows measured with other code: " + ", ".join(differ) + "."]


# ---------------------------------------------------------------- plots


@contextmanager
def figure(path: Path, nrows: int, ncols: int, figsize: tuple[float, float], dpi: int = 110) -> Iterator[Any]:
    """``with figure(path, 1, 2, (12, 4)) as axes:`` draw on ``axes[i][j]`` (always 2-D).

    Agg backend; on leaving the block every panel gets a light grid, and the figure is laid
    out, saved through a temporary file and a rename (never seen half-written), and closed.
    The figure is closed, and nothing saved, when the block raises.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, axes = plt.subplots(nrows, ncols, figsize=figsize, squeeze=False)
    try:
        yield axes
        for ax in axes.flat:
            ax.grid(alpha=0.3)
        fig.tight_layout()
        tmp = path.with_name(path.name + ".tmp")
        fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
