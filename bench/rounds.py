"""Round after round: seconds and bytes per round against the round number, per downlink
codec and engine (issue 31).

    python -m bench.rounds                      # 50 rounds, (1000, 100), (10000, 10), every codec, 2 engines
    python -m bench.rounds --baseline ca8b554   # and the lossless runs of another commit, side by side
    python -m bench.rounds --rounds 8 --settings 1000x100 --codecs lossless --engines inprocess --out /tmp/r

FedPM, LeNet-300-100 on Fashion-MNIST (70k, 60k/10k re-split), ``configs/mnist-fedpm.toml``
with ``per-client = false`` and seed 5, for each (num-clients, clients-per-round), engine,
``downlink-codec`` and ``uplink-codec`` (``--uplinks``; default ``entropy``, the uploads issue
31 measured, and ``auto``, FedPM's default since issue 27: relative-entropy uploads, which
the lossless downlink relays): one ``fedmask run`` in a subprocess. Each round's seconds come from
``rounds.jsonl`` (``elapsed_s``); each round's CPU seconds from the summed user + system
time of the run's whole process tree (Ray's processes included), read from /proc every
0.1 s and cut where ``rounds.jsonl`` gets its next line: on a machine others use, CPU time
moves far less with their load than wall time does. The headline is the ratio of rounds
45-50 to rounds 2-7 (round 1 carries start-up), in seconds and in CPU seconds.

With ``--baseline REF`` the lossless runs with entropy-coded uploads are repeated, right after each, with the library
of commit REF (``git archive`` into a temporary folder, run with the same Python): their
seconds per round beside this version's, and this version's downlink bytes per round
against REF's (training is the same bit for bit, so the rounds' states are too).

Writes ``rounds.md``, ``rounds.json`` and ``rounds.png`` (seconds and downlink bytes per
round, one panel per setting) into ``--out`` (default ``bench/results``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    ROOT,
    figure,
    fmt,
    machine_info,
    md_machine,
    md_table,
    prepare_dirs,
    process_tree_stats,
    source_digest,
)

DATA_DIR = (ROOT.parent / "shared" / "data" / "fashion-mnist").resolve()
DATA_NAME = "Fashion-MNIST (70k, 60k/10k re-split)"
SETTINGS = ((1000, 100), (10000, 10))
CODECS = ("lossless", "float32", "float16", "quantized")
ENGINES = ("inprocess", "ray")
UPLINKS = ("entropy", "auto")
EARLY, LATE = (2, 7), (45, 50)  # the windows compared (rounds, inclusive); LATE moves with --rounds
TARGET_RATIO, BYTES_WITHIN = 1.2, 0.05
_TICKS = os.sysconf("SC_CLK_TCK")


def _tree_cpu(root: int) -> float:
    """User + system CPU seconds of ``root`` and every process under it, from /proc."""
    return sum(int(fields[11]) + int(fields[12]) for fields in process_tree_stats(root)) / _TICKS


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except OSError:
        return 0


def run_once(cmd: list[str], run_dir: Path, cwd: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd``; its rounds and, per round, the process tree's CPU seconds."""
    rounds_path, log = run_dir / "rounds.jsonl", run_dir.with_suffix(".log")
    start = time.perf_counter()
    cpu_at: list[float] = []  # the tree's CPU seconds when each round's line appeared
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env)
        last = 0.0
        while proc.poll() is None:
            last = _tree_cpu(proc.pid) or last
            while _lines(rounds_path) > len(cpu_at):
                cpu_at.append(last)
            time.sleep(0.1)
    rows = [json.loads(line) for line in rounds_path.read_text().splitlines()] if rounds_path.exists() else []
    got: dict[str, Any] = {"rc": proc.returncode, "wall_s": time.perf_counter() - start, "rounds": len(rows)}
    elapsed = [r["elapsed_s"] for r in rows]
    got["s"] = [b - a for a, b in zip([0.0, *elapsed], elapsed)]
    got["cpu_s"] = [b - a for a, b in zip([0.0, *cpu_at], cpu_at)][: len(rows)]
    got["down_bytes"] = [r.get("downlink_payload_bytes", 0) for r in rows]
    got["up_bytes"] = [r.get("uplink_payload_bytes", 0) for r in rows]
    got["accuracy"] = [r["accuracy"] for r in rows]
    got["kinds"] = [r.get("downlink_kinds") for r in rows]
    if proc.returncode != 0:
        got["error"] = "\n".join(log.read_text().splitlines()[-15:])
    return got


def fedmask_cmd(engine: str, codec: str, uplink: str, clients: int, per_round: int, rounds: int,
                run_dir: Path) -> list[str]:
    sets = [f'data-dir="{DATA_DIR}"', 'dataset="idx"', f"num-clients={clients}", f"clients-per-round={per_round}",
            "per-client=false", "seed=5", f"num-rounds={rounds}", f'downlink-codec="{codec}"',
            f'uplink-codec="{uplink}"']
    return [sys.executable, "-m", "fedmask.cli", "run", "configs/mnist-fedpm.toml",
            *[a for s in sets for a in ("--set", s)], "--out", str(run_dir), "--overwrite", "--engine", engine]


def checkout(ref: str, into: Path) -> Path:
    """The tree of commit ``ref`` (``git archive``), unpacked under ``into``."""
    tree = into / f"baseline-{ref}"
    archive = subprocess.run(["git", "archive", "--format=tar", ref], cwd=ROOT, capture_output=True, check=True)
    tree.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile() as tmp:
        tmp.write(archive.stdout)
        tmp.seek(0)
        with tarfile.open(fileobj=tmp) as tar:
            tar.extractall(tree, filter="data")
    return tree


def window(values: list[float], rounds: tuple[int, int]) -> float | None:
    """Mean of rounds ``rounds[0]..rounds[1]`` (1-based, inclusive); None when a run is short."""
    first, last = rounds
    part = values[first - 1 : last]
    return sum(part) / len(part) if len(part) == last - first + 1 else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summary(row: dict[str, Any], late: tuple[int, int]) -> dict[str, Any]:
    """The windows' means and their ratios."""
    out = {}
    for key in ("s", "cpu_s", "down_bytes"):
        early_mean, late_mean = window(row.get(key, []), EARLY), window(row.get(key, []), late)
        out[key] = (early_mean, late_mean, ratio(late_mean, early_mean))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rounds", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--settings", default=",".join(f"{n}x{k}" for n, k in SETTINGS))
    parser.add_argument("--codecs", default=",".join(CODECS))
    parser.add_argument("--engines", default=",".join(ENGINES), help="inprocess, ray, batched (not lossless)")
    parser.add_argument("--uplinks", default=",".join(UPLINKS), help="FedPM's uplink-codec values to run")
    parser.add_argument("--baseline", help="a commit whose lossless runs (entropy uploads) go beside this version's")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    out_dir, runs_dir = prepare_dirs(args.out, "fedmask-rounds-")
    started, digest = time.perf_counter(), source_digest()
    baseline = checkout(args.baseline, runs_dir) if args.baseline else None
    results: dict[str, Any] = {"rows": [], "source": digest, "baseline": args.baseline, "rounds": args.rounds}
    for setting in args.settings.split(","):
        clients, per_round = map(int, setting.split("x"))
        for engine in args.engines.split(","):
            for codec, uplink in itertools.product(args.codecs.split(","), args.uplinks.split(",")):
                if engine == "batched" and codec == "lossless":
                    continue  # the batched engine needs a stateless downlink
                versions = [("this", ROOT)]
                if baseline and codec == "lossless" and uplink == "entropy":
                    versions.append((args.baseline, baseline))
                for version, tree in versions:
                    results["rows"].append(one_run(version, tree, engine, (codec, uplink), (clients, per_round),
                                                   args, runs_dir))
                    write(out_dir, results, started, args)
    write(out_dir, results, started, args, final=True)
    return 0 if all(r["rc"] == 0 for r in results["rows"]) else 1


def one_run(version: str, tree: Path, engine: str, codecs: tuple[str, str], setting: tuple[int, int],
            args: argparse.Namespace, runs_dir: Path) -> dict[str, Any]:
    (codec, uplink), (clients, per_round) = codecs, setting
    label = f"{clients}x{per_round}-{engine}-{codec}-{uplink}-{version}"
    print(f"{label}: {args.rounds} rounds", flush=True)
    run_dir = runs_dir / label
    env = None if tree == ROOT else {**os.environ, "PYTHONPATH": str(tree)}
    row = run_once(fedmask_cmd(engine, codec, uplink, clients, per_round, args.rounds, run_dir), run_dir, tree, env)
    row |= {"version": version, "engine": engine, "codec": codec, "uplink": uplink, "num_clients": clients,
            "clients_per_round": per_round}
    s = summary(row, late_window(args.rounds))
    print(f"   s/round {fmt(s['s'][0], '.2f')} -> {fmt(s['s'][1], '.2f')} (x{fmt(s['s'][2], '.2f')}), "
          f"CPU s/round {fmt(s['cpu_s'][0], '.2f')} -> {fmt(s['cpu_s'][1], '.2f')}, rc {row['rc']}", flush=True)
    return row


def late_window(rounds: int) -> tuple[int, int]:
    return LATE if rounds >= LATE[1] else (max(rounds - 5, EARLY[0]), rounds)


def _table(rows: list[dict[str, Any]], late: tuple[int, int]) -> list[list[str]]:
    table = []
    for r in rows:
        s = summary(r, late)
        table.append([f"{r['num_clients']} x {r['clients_per_round']}", r["engine"], r["codec"],
                      r["uplink"], r["version"],
                      fmt(s["s"][0], ".2f"), fmt(s["s"][1], ".2f"), fmt(s["s"][2], ".2f"),
                      fmt(s["cpu_s"][0], ".2f"), fmt(s["cpu_s"][1], ".2f"), fmt(s["cpu_s"][2], ".2f"),
                      fmt(s["down_bytes"][0] and s["down_bytes"][0] / 1e6, ".2f"),
                      fmt(s["down_bytes"][1] and s["down_bytes"][1] / 1e6, ".2f"),
                      fmt(r["accuracy"][-1] if r["accuracy"] else None, ".4f"), "ok" if r["rc"] == 0 else "FAILED"])
    return table


def _baseline_of(rows: list[dict[str, Any]], r: dict[str, Any]) -> dict[str, Any] | None:
    def key(row: dict[str, Any]) -> tuple[Any, ...]:
        return row["num_clients"], row["clients_per_round"], row["engine"], row["codec"], row["uplink"]

    return next((b for b in rows if b["version"] != "this" and key(b) == key(r)), None)


def _targets(rows: list[dict[str, Any]], late: tuple[int, int]) -> list[str]:
    """Issue 31's targets at (1000, 100), lossless, each engine: PASS/FAIL with the numbers."""
    lines = []
    for r in rows:
        if (r["version"], r["codec"], r["num_clients"], r["clients_per_round"]) != ("this", "lossless", 1000, 100):
            continue
        s, who = summary(r, late), f"{r['engine']}, {r['uplink']} uploads"
        for key, what in (("s", "s/round"), ("cpu_s", "CPU s/round")):
            value = s[key][2]
            verdict = "no result (FAIL)" if value is None else \
                f"{value:.2f} (target <= {TARGET_RATIO}) {'PASS' if value <= TARGET_RATIO else 'FAIL'}"
            lines.append(f"- {who}: {what}, rounds {late[0]}-{late[1]} / rounds {EARLY[0]}-{EARLY[1]}: {verdict}")
        base = _baseline_of(rows, r)
        if base and base["down_bytes"] and len(base["down_bytes"]) == len(r["down_bytes"]):
            worst = max(abs(a / b - 1) for a, b in zip(r["down_bytes"], base["down_bytes"]) if b)
            total = sum(r["down_bytes"]) / sum(base["down_bytes"]) - 1
            lines.append(f"- {who}: downlink bytes per round against {base['version']}: {total:+.2%} over the "
                         f"run, at worst {worst:.2%} in a round (target within {BYTES_WITHIN:.0%}) "
                         f"{'PASS' if worst <= BYTES_WITHIN else 'FAIL'}")
    return lines


def _plot(path: Path, rows: list[dict[str, Any]]) -> None:
    settings = list(dict.fromkeys((r["num_clients"], r["clients_per_round"]) for r in rows))
    with figure(path, len(settings), 3, (18, 4.2 * len(settings))) as axes:
        for i, setting in enumerate(settings):
            for r in rows:
                if (r["num_clients"], r["clients_per_round"]) != setting or not r["s"]:
                    continue
                label = f"{r['engine']} {r['codec']} {r['uplink']}"
                label += "" if r["version"] == "this" else f" ({r['version']})"
                style = "-" if r["version"] == "this" else ":"
                x = range(1, len(r["s"]) + 1)
                axes[i][0].plot(list(x)[1:], r["s"][1:], style, label=label)
                axes[i][1].plot(list(x)[1:], r["cpu_s"][1:len(r["s"])], style, label=label)
                axes[i][2].plot(list(x), [b / 1e6 for b in r["down_bytes"]], style, label=label)
            for ax, what in zip(axes[i], ("s per round", "CPU s per round (process tree)", "downlink MB per round")):
                ax.set_title(f"{setting[0]} clients, {setting[1]} a round: {what}")
                ax.set_xlabel("round")
            axes[i][2].set_yscale("log")
            axes[i][0].legend(fontsize=7)


def write(out_dir: Path, results: dict[str, Any], started: float, args: argparse.Namespace,
          final: bool = False) -> None:
    rows, late = results["rows"], late_window(args.rounds)
    lines = [f"# Seconds and bytes per round against the round number ({DATA_NAME}, LeNet-300-100, FedPM)", "",
             f"`configs/mnist-fedpm.toml`, `per-client = false`, seed 5, {args.rounds} rounds per run, one run at a "
             "time. s: from `rounds.jsonl`; CPU s: user + system seconds of the run's whole process tree (Ray's "
             "processes included) per round, which others' load on the machine moves far less. Early: rounds "
             f"{EARLY[0]}-{EARLY[1]}; late: rounds {late[0]}-{late[1]}; down MB: downlink payload per round.",
             "", md_table(["clients", "engine", "downlink", "uplink", "version", "s early", "s late", "late/early",
                           "CPU s early", "CPU s late", "late/early", "down MB early", "down MB late",
                           "final acc", "status"], _table(rows, late)),
             "", "## Targets (issue 31)", "", *_targets(rows, late), "", "![rounds](rounds.png)"]
    failures = [r for r in rows if r.get("error")]
    for r in failures:
        lines += ["", f"### Failed: {r['num_clients']} x {r['clients_per_round']} {r['engine']} {r['codec']} "
                  f"{r['version']}", "", "```", r["error"], "```"]
    if final:
        machine = machine_info("python -m bench.rounds", sys.argv[1:], time.perf_counter() - started,
                               {"load_average_end": os.getloadavg()})
        results["machine"] = machine
        lines += md_machine(machine)
        if machine.get("source_digest_end") != results["source"]:
            lines += ["", "**The sources changed while this bench ran: rerun it.**"]
    if rows:
        _plot(out_dir / "rounds.png", rows)
    (out_dir / "rounds.md").write_text("\n".join(lines) + "\n")
    (out_dir / "rounds.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    raise SystemExit(main())
