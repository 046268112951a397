"""How far FedPM's lossless broadcast is from the best its kind of code can do (issue 16).

With the prior reset every round, FedPM's theta is a function of the round's counts of
ones (0..n per weight), so the lossless downlink sends the counts, coded weight by weight
with a histogram per context, the context being the weight's value in a state the node
holds (``jump``; the seed's state for a node that holds nothing). However good its tables,
such a code cannot send the counts in fewer bits on average than their conditional
entropy given that context. This bench runs FedPM in-process with the lossless downlink,
records each round's counts and, for every broadcast, the version the server knew the
node to hold, and compares per broadcast:

- the bits per parameter actually sent (the message's ``lossless`` array, as weighed);
- the *floor*: the empirical entropy of the counts given the counts of the state the node
  holds, or, for a node that holds nothing (or the seed's state), given the seed's theta in
  the coder's 32 bins; per tensor, with a table per context value as the coder has,
  without the cost of sending those tables. A plug-in estimate over 10^5 symbols and at
  most 32 x 11 cells: it errs low by well under 0.01 bit;
- a fresh node's floor (it holds the previous round's state), and the order-0 entropy.

The floor bounds codes that see each weight's count through the node's value of that
weight only. A code that used dependence between weights, or more rounds of history,
could in principle go below it; the richer contexts measured on these counts (the README
of bench/ lists them) gained less than 0.005 bits.

    python -m bench.downlink_floor                    # Fashion-MNIST and MNIST-10k, IID and Dirichlet 0.3
    python -m bench.downlink_floor --tasks mnist-10 --partitions iid --rounds 10   # a quick one

The run's counts are not written by ``fedmask run``, so this bench runs the server in its
own process (``--engine inprocess``) and wraps two methods of
:class:`fedmask.downlink.LosslessDownlink` for the run's duration to read them; the
messages, their bytes and the run directory are those of a normal run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import ROOT, machine_info, md_machine, md_table, shared_data

AFTER_ROUND = 5  # issue 16's target counts broadcasts after round 5
# task -> (config, overrides, the data's name as its README gives it)
TASKS: dict[str, tuple[str, dict[str, Any], str]] = {
    "fmnist": ("configs/fmnist-fedpm.toml", {},
               "Fashion-MNIST (70k, 60k/10k re-split), 100 clients, 10 a round"),
    "mnist-10": ("configs/mnist-fedpm.toml", {},
                 "MNIST-10k (8k train / 2k test), 10 clients, all every round"),
    "mnist-100": ("configs/mnist-fedpm.toml", {"num-clients": 100, "clients-per-round": 10},
                  "MNIST-10k (8k train / 2k test), 100 clients, 10 a round"),
}
PARTITIONS: dict[str, dict[str, Any]] = {
    "iid": {"partitioner": "iid"},
    "dir0.3": {"partitioner": "dirichlet", "dirichlet-alpha": 0.3},
}
STALENESS_BINS = ((1, 1), (2, 3), (4, 7), (8, 15), (16, 10**9))


def conditional_entropy(symbols: np.ndarray, contexts: np.ndarray | None) -> float:
    """Empirical H(symbols | contexts) in bits per symbol (order-0 without contexts)."""
    symbols = symbols.ravel().astype(np.int64)
    if contexts is None:
        contexts = np.zeros_like(symbols)
    contexts = np.unique(contexts.ravel(), return_inverse=True)[1].astype(np.int64)
    width = int(symbols.max()) + 1
    joint = np.bincount(contexts * width + symbols).astype(np.float64)
    margin = np.bincount(contexts).astype(np.float64)
    joint, margin, total = joint[joint > 0], margin[margin > 0], symbols.size
    return float((-(joint * np.log2(joint / total)).sum() + (margin * np.log2(margin / total)).sum()) / total)


def floor_bits(counts: dict[str, np.ndarray], context: dict[str, np.ndarray] | None) -> float:
    """Bits per parameter: the per-tensor conditional entropies, weighted by tensor size."""
    total = sum(c.size for c in counts.values())
    return sum(conditional_entropy(c, None if context is None else context[name]) * c.size
               for name, c in counts.items()) / total


@contextmanager
def recording() -> Iterator[dict[str, Any]]:
    """Record each version's counts and each broadcast's (version, node, held, kind, bytes)."""
    from fedmask.downlink import LosslessDownlink
    from fedmask.methods.fedpm import Bernoulli

    log: dict[str, Any] = {"counts": {}, "broadcasts": [], "seed_bins": None}
    record, messages_for = LosslessDownlink.record, LosslessDownlink.messages_for

    def recording_record(self: LosslessDownlink, version: int, previous: Any, new_state: Any,
                         votes: Any = None, *more: Any, **named: Any) -> None:
        if votes is not None:
            log["counts"][version] = {name: np.rint(np.asarray(v)).astype(np.uint8) for name, v in votes.items()}
        if log["seed_bins"] is None:  # the first round's previous state is the seed's
            log["seed_bins"] = {name: c for name, (c, _) in Bernoulli().vote_contexts(previous).items()}
        record(self, version, previous, new_state, votes, *more, **named)

    def recording_messages_for(self: LosslessDownlink, nodes: list[int], state: Any) -> list[tuple[np.ndarray, str]]:
        sent = messages_for(self, nodes, state)
        for node, (blob, kind) in zip(nodes, sent):
            log["broadcasts"].append((self.current, node, self.held.get(node), kind, int(blob.size)))
        return sent

    LosslessDownlink.record = recording_record  # type: ignore[method-assign]
    LosslessDownlink.messages_for = recording_messages_for  # type: ignore[method-assign]
    try:
        yield log
    finally:
        LosslessDownlink.record = record  # type: ignore[method-assign]
        LosslessDownlink.messages_for = messages_for  # type: ignore[method-assign]


def measure(task: str, partition: str, seed: int, rounds: int, run_dir: Path) -> dict[str, Any]:
    """One FedPM run with the lossless downlink, and the floor of each broadcast after round 5."""
    from fedmask.api import config_from, execute

    config_path, overrides, _ = TASKS[task]
    config = config_from(ROOT / config_path, **{**shared_data(config_path), **overrides, **PARTITIONS[partition],
                                                "seed": seed, "num-rounds": rounds, "downlink-codec": "lossless",
                                                # entropy-coded uploads: the floor is of codes that do
                                                # not see the uploads (relative-entropy ones are relayed)
                                                "uplink-codec": "entropy"})
    start = time.perf_counter()
    with recording() as log:
        execute(config, run_dir, engine="inprocess")
    wall_s = time.perf_counter() - start
    counts: dict[int, dict[str, np.ndarray]] = log["counts"]
    params = sum(c.size for c in counts[min(counts)].values())
    sent, floor, stale = [], [], []
    for version, _node, held, _kind, size in log["broadcasts"]:
        if version < AFTER_ROUND or version not in counts:  # version v goes out in round v + 1
            continue
        held_counts = counts.get(held) if held is not None and held >= 1 else None
        context = held_counts if held_counts is not None else log["seed_bins"]  # nothing, or the seed's state
        sent.append(size * 8 / params)
        floor.append(floor_bits(counts[version], context))
        stale.append(None if held_counts is None else version - held)
    versions = sorted({v for v, *_ in log["broadcasts"] if v >= AFTER_ROUND and v in counts})
    fresh = [floor_bits(counts[v], counts[v - 1]) for v in versions if v - 1 in counts]
    order0 = [floor_bits(counts[v], None) for v in versions]
    by_staleness: dict[str, dict[str, Any]] = {}
    for lo, hi in STALENESS_BINS:
        picked = [(s, f) for s, f, st in zip(sent, floor, stale, strict=True) if st is not None and lo <= st <= hi]
        if picked:
            by_staleness[f"{lo}-{hi}" if hi < 10**9 else f"{lo}+"] = {
                "broadcasts": len(picked), "sent_bpp": float(np.mean([p[0] for p in picked])),
                "floor_bpp": float(np.mean([p[1] for p in picked]))}
    nothing = [(s, f) for s, f, st in zip(sent, floor, stale, strict=True) if st is None]
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "task": task, "partition": partition, "seed": seed, "rounds": rounds, "wall_s": round(wall_s, 1),
        "final_accuracy": summary.get("final_accuracy"),
        "broadcasts": len(sent), "held_nothing": len(nothing),
        "mean_staleness": float(np.mean([s for s in stale if s is not None])) if any(s is not None for s in stale)
        else None,
        "sent_bpp": float(np.mean(sent)), "floor_bpp": float(np.mean(floor)),
        "fresh_floor_bpp": float(np.mean(fresh)), "order0_bpp": float(np.mean(order0)),
        "nothing_sent_bpp": float(np.mean([n[0] for n in nothing])) if nothing else None,
        "nothing_floor_bpp": float(np.mean([n[1] for n in nothing])) if nothing else None,
        "held_floor_bpp": float(np.mean([f for f, st in zip(floor, stale, strict=True) if st is not None]))
        if any(st is not None for st in stale) else None,
        "by_staleness": by_staleness,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--partitions", default=",".join(PARTITIONS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--runs", default=str(ROOT / "runs" / "downlink-floor"),
                        help="where the run directories go (not committed)")
    args = parser.parse_args(argv)
    tasks, partitions = args.tasks.split(","), args.partitions.split(",")
    unknown = [t for t in tasks if t not in TASKS] + [p for p in partitions if p not in PARTITIONS]
    if unknown:
        print(f"bench.downlink_floor: unknown task or partition: {unknown}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    rows = []
    for task in tasks:
        for partition in partitions:
            print(f"{task} {partition} seed {args.seed}", flush=True)
            run_dir = Path(args.runs) / f"{task}-{partition}-seed{args.seed}"
            if (run_dir / "rounds.jsonl").exists():
                for name in ("rounds.jsonl", "summary.json"):
                    (run_dir / name).unlink(missing_ok=True)
            rows.append(measure(task, partition, args.seed, args.rounds, run_dir))
    machine = machine_info("python -m bench.downlink_floor", sys.argv[1:] if argv is None else argv,
                           time.perf_counter() - start)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "downlink-floor.json").write_text(json.dumps({"rows": rows, "machine": machine}, indent=2))
    (out / "downlink-floor.md").write_text("\n".join(report(rows, machine)) + "\n")
    print(f"→ {out / 'downlink-floor.md'}")
    return 0


def report(rows: list[dict[str, Any]], machine: dict[str, Any]) -> list[str]:
    """The markdown: one line per run, then sent and floor by how stale the node's state was."""
    def f(value: float | None) -> str:
        return "–" if value is None else f"{value:.2f}"

    lines = ["# FedPM's lossless broadcast against its floor", "",
             f"Every broadcast after round {AFTER_ROUND} (rounds {AFTER_ROUND + 1} on), "
             "FedPM with the prior reset every round (the shipped configs), "
             "one seed. *sent*: bits per parameter of the broadcast as weighed; *floor*: the empirical entropy of the "
             "round's counts given the counts of the state the server knew the node to hold (no context for a node "
             "that holds nothing), per tensor, tables free; no lossless code of the counts does better on average. "
             "*fresh*: the floor for a node that holds the previous round's state; *order 0*: no context.", "",
             md_table(["data", "partition", "rounds", "accuracy", "broadcasts (holding nothing)", "mean staleness",
                       "sent bpp", "floor bpp", "floor, nodes holding a state", "fresh floor", "order 0",
                       "nodes holding nothing: sent / floor"],
                      [[TASKS[r["task"]][2], r["partition"], r["rounds"], f(r["final_accuracy"]),
                        f"{r['broadcasts']} ({r['held_nothing']})", f(r["mean_staleness"]), f(r["sent_bpp"]),
                        f(r["floor_bpp"]), f(r["held_floor_bpp"]), f(r["fresh_floor_bpp"]), f(r["order0_bpp"]),
                        f"{f(r['nothing_sent_bpp'])} / {f(r['nothing_floor_bpp'])}"]
                       for r in rows]),
             "", "## By staleness (rounds between the node's state and the broadcast)", ""]
    def cell(group: dict[str, Any] | None) -> str:
        return "–" if group is None else f"{group['broadcasts']} / {group['sent_bpp']:.2f} / {group['floor_bpp']:.2f}"

    bins = [f"{lo}-{hi}" if hi < 10**9 else f"{lo}+" for lo, hi in STALENESS_BINS]
    lines.append(md_table(["data", "partition", *[f"{b}: n / sent / floor" for b in bins]],
                          [[TASKS[r["task"]][2], r["partition"], *[cell(r["by_staleness"].get(b)) for b in bins]]
                           for r in rows]))
    return [*lines, *md_machine(machine)]


if __name__ == "__main__":
    sys.exit(main())
