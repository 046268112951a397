"""The run directory: resolved config, one JSON line per round, a summary, plots.

Each round's line is appended and flushed as soon as the round ends, so a run that dies
keeps every finished round; summary.json and the plots are written through a temporary
file and a rename, so they are never seen half-written.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomli_w
from rich.console import Console
from rich.markup import escape

from fedmask.console import current
from fedmask.record.diagnostics import DIAGNOSTIC_KEYS
from fedmask.record.failures import FAILURE_KINDS, Failure
from fedmask.record.files import read_rounds
from fedmask.record.ledger import Ledger
from fedmask.record.totals import round_total_fields
from fedmask.record.tracking import make_tracker

if TYPE_CHECKING:
    from fedmask.config import RunConfig

__all__ = ["FAILURE_KINDS", "RUN_FILES", "RoundOutcome", "RunRecorder", "RunStopped", "atomic_write",
           "clear_run_files"]


class RunStopped(RuntimeError):
    """A run that cannot go on (a file it cannot write, a plug-in rule that fails): it stops
    after its last finished round, which is kept with its checkpoint; the message says why.
    The command line adds how to resume."""

# 80 columns. "up"/"down B": payload bytes of the round (all clients); "bpp": per client and
# parameter; "xFedAvg": how many times fewer bytes, up + down, a client moved than in a FedAvg round.
_COLUMNS = (("round", 5), ("acc", 6), ("loss", 6), ("cl", 3), ("fail", 4), ("up B", 10), ("down B", 10),
            ("up bpp", 6), ("dn bpp", 6), ("xFedAvg", 7), ("time s", 6))


def _times(ratio: float | None) -> str:
    """FedAvg's round trip over this round's, per client: ``27.3x`` fewer bytes."""
    return "–" if ratio is None else f"{ratio:.1f}x"


def _per_client(summary: dict[str, Any]) -> str:
    mean = summary.get("mean_total_message_bytes_per_client_round")
    if mean is None:
        return ""
    ratio = summary.get("fedavg_ratio")
    versus = "" if ratio is None else f" ({ratio:.1f}x below FedAvg)"
    return f"up+down {mean:,.0f} B per client-round{versus} · "


# What a run writes in its directory: a fresh run removes them first, so that nothing of
# an older run (a checkpoint, a summary) is ever read as this run's.
RUN_FILES = ("config.toml", "rounds.jsonl", "summary.json", "curves.png", "checkpoint.npz", "final_state.npz")


def clear_run_files(run_dir: Path) -> None:
    """Remove what a fedmask run writes in ``run_dir`` (and temporary files of it); keep the rest."""
    for name in RUN_FILES:
        for path in (run_dir / name, run_dir / (name + ".tmp"), run_dir / name.replace(".", ".tmp.", 1)):
            path.unlink(missing_ok=True)


def atomic_write(path: Path, text: str) -> None:
    """``path`` holds ``text`` or what it held before, never half of it (nor a temporary file beside it)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


@dataclass
class RoundOutcome:
    """What the server's strategy knows of one round, beside the bytes and the evaluation."""

    aggregated: int = 0  # uploads that went into the new global state
    failures: list[dict[str, Any]] = field(default_factory=list)  # Failure.to_dict() rows
    train: dict[str, float] = field(default_factory=dict)  # example-weighted client train metrics
    code_lengths: dict[str, float] | None = None  # ideal and formula bits of the round's uploads
    skipped: str | None = None  # why the round left the global state unchanged
    broadcasts: dict[str, int] | None = None  # lossless downlink: nodes sent each kind (full, replay, standalone)
    # mask diagnostics (fedmask.record.diagnostics.DIAGNOSTIC_KEYS); None: not computed (dense, SecAgg+, skipped)
    diagnostics: dict[str, float | None] | None = None

    def add_failure(self, failure: Failure) -> None:
        self.failures.append(failure.to_dict())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def downlink_kinds(rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """What the lossless downlink actually sent over the rounds: broadcasts of each kind
    (``full``: the float32 state), as ``{"downlink_kinds": {...}}``; {} for another codec."""
    totals: dict[str, int] = {}
    for row in rows:
        for kind, count in (row.get("downlink_kinds") or {}).items():
            totals[kind] = totals.get(kind, 0) + count
    return {"downlink_kinds": totals} if totals else {}


class RunRecorder:
    """Writes a run's results as rounds end, and shows them as a live table."""

    def __init__(self, run_dir: Path, config: RunConfig, num_params: int, console: Console | None = None,
                 resume_after: int | None = None, fedavg: dict[str, int] | None = None,
                 uplink_codec: str | None = None):
        """A fresh run directory, or with ``resume_after`` the rounds up to that one kept.

        ``fedavg``: one FedAvg round trip of the same architecture, weighed
        (:func:`fedmask.record.totals.fedavg_round_bytes`); the rounds' totals are compared with it.
        """
        self.run_dir, self.config, self.num_params = Path(run_dir), config, num_params
        self.uplink_codec = uplink_codec or config.uplink_codec  # what uploads were coded with ('auto' resolved)
        self.fedavg = fedavg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.rounds_path = self.run_dir / "rounds.jsonl"
        self.rows: list[dict[str, Any]] = []
        self.display = current()  # the live line on a terminal (fedmask.console)
        self.console = console or self.display.console
        self.start = time.perf_counter()
        self.initial: dict[str, float] = {}
        self.tracker = make_tracker(config.tracker, self.run_dir, config.to_dict())
        if resume_after is None:
            clear_run_files(self.run_dir)
            atomic_write(self.run_dir / "config.toml", tomli_w.dumps(config.to_dict()))
            self.rounds_path.write_text("")
            return
        # A kill between a round's line and its checkpoint leaves one line too many; that
        # round runs again and writes the same line.
        self.rows = read_rounds(self.rounds_path, resume_after)
        self.tracker.resume(self.rows)
        atomic_write(self.rounds_path, "".join(json.dumps(row) + "\n" for row in self.rows))
        if self.rows:
            self.start -= self.rows[-1]["elapsed_s"]

    def header(self) -> None:
        self.console.print(
            f"[bold]fedmask[/bold] {self.config.method} · {self.config.model} on "
            f"{self.config.dataset} · {self.num_params:,} params · "
            f"{self.config.clients_per_round}/{self.config.num_clients} clients x "
            f"{self.config.num_rounds} rounds → {escape(str(self.run_dir))}"
        )
        self.console.print(" ".join(f"{name:>{width}}" for name, width in _COLUMNS), style="bold")

    def end_round(
        self,
        server_round: int,
        accuracy: float,
        loss: float,
        ledger: Ledger,
        outcome: RoundOutcome,
        test: dict[str, float] | None = None,
    ) -> dict[str, Any]:
        """Append the round's line and show it. ``accuracy`` and ``loss`` are on the validation
        split when the run holds one out; then the last round's line also has ``test``
        (``test_accuracy``, ``test_loss``), the only read of the test split."""
        totals = ledger.round_totals(server_round)
        replied = max(ledger.clients_heard(server_round), 1)
        clients = 0 if outcome.skipped else outcome.aggregated
        row = {
            "round": server_round,
            "accuracy": accuracy,
            "loss": loss,
            "clients": clients,
            "failures": len(outcome.failures),
            "skipped": outcome.skipped,
            "num_params": self.num_params,
            **totals,
            "uplink_bpp": 8 * totals["uplink_payload_bytes"] / (self.num_params * replied),
            "uplink_message_bpp": 8 * totals["uplink_message_bytes"] / (self.num_params * replied),
            "downlink_bpp": 8 * totals["downlink_payload_bytes"]
            / (self.num_params * max(ledger.clients_heard(server_round, "downlink"), 1)),
            **self._code_fields(outcome.code_lengths, clients),
            **{key: (outcome.diagnostics or {}).get(key) for key in DIAGNOSTIC_KEYS},
            **round_total_fields(totals, ledger.clients_heard(server_round, "downlink"), self.fedavg),
            "elapsed_s": time.perf_counter() - self.start,
            "train": outcome.train,
            "failure_details": outcome.failures,
            "per_client": ledger.per_client(server_round) if self.config.per_client else [],
            **(test or {}),
        }
        if outcome.broadcasts is not None:
            row["downlink_kinds"] = outcome.broadcasts
        with self.rounds_path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.rows.append(row)
        self.tracker.log_round(server_round, row)
        self._print_row(row)
        self.display.round_done(server_round)
        return row

    def _code_fields(self, code_lengths: dict[str, float] | None, clients: int) -> dict[str, float]:
        """Per-client bits per parameter: ideal under the coder's model, FedPM's formula."""
        if not code_lengths or clients <= 0:
            return {}
        per_param = self.num_params * clients
        return {
            "uplink_ideal_bpp": code_lengths["ideal_bits"] / per_param,
            "uplink_formula_bpp": code_lengths["formula_bits"] / per_param,
        }

    def _print_row(self, row: dict[str, Any]) -> None:
        cells = (row["round"], f"{row['accuracy']:.4f}", f"{row['loss']:.4f}", row["clients"],
                 row["failures"], f"{row['uplink_payload_bytes']:,}", f"{row['downlink_payload_bytes']:,}",
                 f"{row['uplink_bpp']:.3f}", f"{row['downlink_bpp']:.2f}", _times(row.get("fedavg_ratio")),
                 f"{row['elapsed_s']:.1f}")
        style = "red" if row["failures"] else None
        self.console.print(" ".join(f"{c!s:>{w}}" for c, (_, w) in zip(cells, _COLUMNS)), style=style)

    def _totals(self) -> dict[str, Any]:
        """Both directions per client and round, over the run, and FedAvg's round trip beside it."""
        per_client = [r["total_message_bytes_per_client"] for r in self.rows if "total_message_bytes_per_client" in r]
        payload = [r["total_payload_bytes_per_client"] for r in self.rows if "total_payload_bytes_per_client" in r]
        mean = sum(per_client) / len(per_client) if per_client else None
        out: dict[str, Any] = {
            "total_payload_bytes": sum(r["uplink_payload_bytes"] + r["downlink_payload_bytes"] for r in self.rows),
            "total_message_bytes": sum(r["uplink_message_bytes"] + r["downlink_message_bytes"] for r in self.rows),
            "mean_downlink_bpp": sum(r["downlink_bpp"] for r in self.rows) / max(len(self.rows), 1),
            "mean_total_payload_bytes_per_client_round": sum(payload) / len(payload) if payload else None,
            "mean_total_message_bytes_per_client_round": mean,
        }
        if self.fedavg:
            out["fedavg_message_bytes_per_client_round"] = self.fedavg["fedavg_message_bytes"]
            out["fedavg_payload_bytes_per_client_round"] = self.fedavg["fedavg_payload_bytes"]
            out["fedavg_ratio"] = self.fedavg["fedavg_message_bytes"] / mean if mean else None
        return out

    def finish(self) -> dict[str, Any]:
        last = self.rows[-1] if self.rows else {}
        summary = {
            "method": self.config.method,
            "uplink_codec": self.uplink_codec,
            "model": self.config.model,
            "dataset": self.config.dataset,
            "num_params": self.num_params,
            "rounds": len(self.rows),
            "initial_accuracy": self.initial.get("accuracy"),
            "final_accuracy": last.get("accuracy"),
            "best_accuracy": max((r["accuracy"] for r in self.rows), default=None),
            "evaluated_on": "validation" if self.config.validation_fraction > 0 else "test",
            "test_accuracy": last.get("test_accuracy") if self.config.validation_fraction > 0
            else last.get("accuracy"),
            "total_failures": sum(r["failures"] for r in self.rows),
            "rounds_skipped": sum(1 for r in self.rows if r.get("skipped")),
            "failures_by_kind": {kind: sum(1 for r in self.rows for f in r["failure_details"] if f["kind"] == kind)
                                 for kind in FAILURE_KINDS},
            "uplink_payload_bytes": sum(r["uplink_payload_bytes"] for r in self.rows),
            "uplink_message_bytes": sum(r["uplink_message_bytes"] for r in self.rows),
            "downlink_payload_bytes": sum(r["downlink_payload_bytes"] for r in self.rows),
            "downlink_message_bytes": sum(r["downlink_message_bytes"] for r in self.rows),
            "downlink_recycle_bytes": sum(r.get("downlink_recycle_bytes", 0) for r in self.rows),
            "mean_uplink_bpp": sum(r["uplink_bpp"] for r in self.rows) / max(len(self.rows), 1),
            **self._totals(),
            **downlink_kinds(self.rows),
            "wall_s": time.perf_counter() - self.start,
        }
        atomic_write(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        self._plot()
        self.tracker.finish(summary, self.run_dir)
        self.tracker.close()
        held_out = (f" (validation; test {summary['test_accuracy']:.4f})"
                    if self.config.validation_fraction > 0 and summary["test_accuracy"] is not None else "")
        self.console.print(
            f"final accuracy {summary['final_accuracy']:.4f}{held_out} · uplink "
            f"{summary['uplink_payload_bytes']:,} B · downlink {summary['downlink_payload_bytes']:,} B · "
            f"{_per_client(summary)}{summary['wall_s']:.1f} s → {escape(str(self.run_dir))}"
            if self.rows else f"no round finished → {escape(str(self.run_dir))}"
        )
        return summary

    def _plot(self) -> None:
        if not self.rows:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rounds = [r["round"] for r in self.rows]
        fig, (acc_ax, bytes_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
        acc_ax.plot(rounds, [r["accuracy"] for r in self.rows], marker="o", ms=3)
        split = "validation" if self.config.validation_fraction > 0 else "test"
        acc_ax.set(xlabel="round", ylabel=f"{split} accuracy", title=f"{self.config.method} · {self.config.model}")
        acc_ax.grid(alpha=0.3)
        for key, label in (("uplink_payload_bytes", "uplink"), ("downlink_payload_bytes", "downlink")):
            bytes_ax.plot(rounds, [r[key] for r in self.rows], marker="o", ms=3, label=label)
        bytes_ax.set(xlabel="round", ylabel="payload bytes (all clients)", yscale="log", title="bytes per round")
        bytes_ax.legend()
        bytes_ax.grid(alpha=0.3)
        fig.tight_layout()
        tmp = self.run_dir / "curves.tmp.png"
        try:
            fig.savefig(tmp, dpi=110)
            os.replace(tmp, self.run_dir / "curves.png")
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            plt.close(fig)
