"""A run directory's files read back, checked: what a person may have edited is never trusted.

``rounds.jsonl``, ``summary.json`` and a sweep's ``sweep.json`` are read by ``--resume``,
``fedmask compare``, ``fedmask sweep`` and :func:`fedmask.load_run`; a file that is not
what fedmask wrote (truncated, hand-edited, another program's) is a :class:`RunFileError`
naming the file, the line and what was expected, never a traceback from deep inside.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class RunFileError(ValueError):
    """A run directory's file that cannot be read back as fedmask wrote it; the message names it."""


def read_json(path: Path) -> Any:
    """A JSON file's value, or :class:`RunFileError` naming the file."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise RunFileError(f"{path}: cannot be read ({type(err).__name__}: {err})") from None
    except ValueError as err:
        raise RunFileError(f"{path}: expected JSON as fedmask writes it, got a corrupt file ({err})") from None


# What every round line holds, and of which type: what --resume, compare and the summary read.
ROUND_COUNTS = ("round", "clients", "failures", "num_params", "uplink_payload_bytes", "uplink_message_bytes",
                "downlink_payload_bytes", "downlink_message_bytes")
ROUND_NUMBERS = ("accuracy", "loss", "uplink_bpp", "downlink_bpp", "elapsed_s")
MAY_BE_NAN = ("loss",)  # a broken model's test loss is NaN or inf, and the line says so


def _number(value: Any, integer: bool, finite: bool = True) -> bool:
    if isinstance(value, bool):
        return False
    if integer:
        return isinstance(value, int)
    return isinstance(value, (int, float)) and (math.isfinite(value) or not finite)


def check_round(row: Any, where: str) -> dict[str, Any]:
    """One round line, checked: a JSON object with every field of :data:`ROUND_COUNTS` (integers)
    and :data:`ROUND_NUMBERS` (finite numbers), and a list of failure records."""
    if not isinstance(row, dict):
        raise RunFileError(f"{where}: expected a JSON object (one round), got {type(row).__name__}")
    for key in (*ROUND_COUNTS, *ROUND_NUMBERS):
        integer = key in ROUND_COUNTS
        if key not in row:
            raise RunFileError(f"{where}: field '{key}' is missing")
        if not _number(row[key], integer, key not in MAY_BE_NAN):
            raise RunFileError(f"{where}: field '{key}': expected {'an integer' if integer else 'a finite number'}, "
                               f"got {row[key]!r}")
    details = row.get("failure_details", [])
    if not isinstance(details, list) or not all(isinstance(d, dict) and isinstance(d.get("kind"), str)
                                                for d in details):
        raise RunFileError(f"{where}: field 'failure_details': expected a list of failure records")
    return row


def read_rounds(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """The round lines of a ``rounds.jsonl`` (the first ``limit`` of them), each checked."""
    try:
        lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise RunFileError(f"{path}: cannot be read ({type(err).__name__}: {err})") from None
    rows = []
    for number, line in enumerate(lines[:limit], 1):
        try:
            row = json.loads(line)
        except ValueError:
            raise RunFileError(f"{path}, line {number}: expected one JSON object per line, got {line[:60]!r}") from None
        rows.append(check_round(row, f"{path}, line {number}"))
    return rows
