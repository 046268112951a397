"""The relative-entropy uplink against the entropy codec: bits, accuracy, bytes both ways, CPU.

``python -m bench.uplink [--rounds 30] [--seeds 0,1,2] [--tasks mnist,fmnist] [--cpu-only]``
runs FedPM on MNIST-10k (``configs/mnist-fedpm.toml``: 10 IID clients, all sampled) and
on Fashion-MNIST (``configs/fmnist-fedpm.toml``: 100 IID clients, 10 a round) with
``uplink-codec`` = ``entropy`` (the sample coded against theta), ``relative-entropy``
(debiased: the default C = 8, t = 0) and ``relative-entropy`` without debiasing, each
with every seed, in-process, and writes ``bench/results/uplink.md`` and ``.json``: the mean
uplink bits per parameter over the rounds, the final and last-5 accuracy (mean ± sample
sd over seeds), up + down bytes per client and round and how many times fewer than a
FedAvg round of the same model (measured by serializing one), and the downlink's kinds.
It also times, on one core, encoding and decoding one LeNet-300-100 upload (266,610
weights) with each codec, on a (q, theta) pair from round 10 of a FedPM run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, machine_info, md_machine, md_table, prepare_dirs, run_fedmask

TASKS = {
    "mnist": ("configs/mnist-fedpm.toml", "MNIST-10k (8k train / 2k test), 10 IID clients, all sampled",
              ['data-dir="../shared/data/mnist-t10k"']),
    "fmnist": ("configs/fmnist-fedpm.toml", "Fashion-MNIST (60k/10k), 100 IID clients, 10 a round",
               ['data-dir="../shared/data/fashion-mnist"']),
}
CODECS = {
    "entropy": ['uplink-codec="entropy"'],
    "relative-entropy": ['uplink-codec="relative-entropy"'],
    "relative-entropy, no debias": ['uplink-codec="relative-entropy"', "rec-debias=false"],
}


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(runs: list[Any]) -> dict[str, Any]:
    """A setting's figures over its seeds (runs that failed are named, not averaged)."""
    rows = [run.rows for run in runs if not run.error]
    if len(rows) != len(runs):
        return {"error": next(run.error for run in runs if run.error)}
    finals = [r[-1]["accuracy"] for r in rows]
    last5 = [statistics.fmean(x["accuracy"] for x in r[-5:]) for r in rows]
    up_bpp = [statistics.fmean(x["uplink_bpp"] for x in r) for r in rows]
    per_client = [statistics.fmean(x["total_payload_bytes_per_client"] for x in r) for r in rows]
    ratio = [run.summary["fedavg_ratio"] for run in runs]
    kinds: dict[str, int] = {}
    for r in rows:
        for x in r:
            for kind, count in (x.get("downlink_kinds") or {}).items():
                kinds[kind] = kinds.get(kind, 0) + count
    return {"final": finals, "last5": last5, "up_bpp": up_bpp, "bytes_per_client_round": per_client,
            "fedavg_ratio": ratio, "downlink_kinds": kinds}


def timing(repeats: int = 3) -> dict[str, Any]:
    """Encode + decode of one LeNet-300-100 upload on one core, for each codec."""
    import numpy as np
    import torch

    torch.set_num_threads(1)
    from fedmask.wire.frame import Layout
    from fedmask.wire.masks import decode_masks, encode_masks, encode_relative

    shapes = (("1.bias", (300,)), ("1.weight", (300, 784)), ("3.bias", (100,)), ("3.weight", (100, 300)),
              ("5.bias", (10,)), ("5.weight", (10, 100)))
    layout = Layout(shapes)
    rng = np.random.default_rng(0)
    # theta on the vote levels of 10 clients (as FedPM's after a reset), q a client's move from it:
    # about 0.03 bits of KL per weight, as round 10 of configs/mnist-fedpm.toml
    theta = {n: np.clip(rng.integers(0, 11, s) / 10, 0.01, 0.99) for n, s in shapes}
    q = {n: 1 / (1 + np.exp(-(np.log(t / (1 - t)) + rng.normal(0, 0.45, t.shape)))) for n, t in theta.items()}
    sample = {n: rng.random(v.shape) < v for n, v in q.items()}
    out: dict[str, Any] = {}
    cases = {
        "entropy": (lambda: encode_masks(sample, layout, b"fingerpr", "entropy", theta, (1, 0)),
                    lambda blob: decode_masks(blob, layout, b"fingerpr", theta, bind=(1, 0))),
        "relative-entropy": (lambda: encode_relative(q, layout, b"fingerpr", theta, (1, 0)),
                             lambda blob: decode_masks(blob, layout, b"fingerpr", theta, bind=(1, 0))),
    }
    for name, (encode, decode) in cases.items():
        encode_s, decode_s, size = [], [], 0
        for _ in range(repeats):
            start = time.perf_counter()
            blob = encode()
            encode_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            decode(blob)
            decode_s.append(time.perf_counter() - start)
            size = int(blob.size)
        out[name] = {"encode_s": min(encode_s), "decode_s": min(decode_s), "bytes": size,
                     "bpp": 8 * size / layout.num_params}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--tasks", default="mnist,fmnist")
    parser.add_argument("--cpu-only", action="store_true", help="only the coding times")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    out_dir, work = prepare_dirs(args.out, "fedmask-uplink-")
    start = time.perf_counter()
    results: dict[str, Any] = {"timing": timing(), "runs": {}}
    print(json.dumps(results["timing"], indent=1), flush=True)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    for task in ([] if args.cpu_only else args.tasks.split(",")):
        config, _, data = TASKS[task]
        for codec, sets in CODECS.items():
            print(f"{task}, {codec}", flush=True)
            runs = [run_fedmask(config, [*data, *sets, f"seed={seed}"], work / f"{task}-{codec[:20]}-{seed}".replace(
                " ", "").replace(",", ""), args.rounds, "inprocess") for seed in seeds]
            results["runs"][f"{task} / {codec}"] = summarise(runs)
            write(out_dir, results, argv, start, args.rounds, seeds)
    write(out_dir, results, argv, start, args.rounds, seeds)
    print((out_dir / "uplink.md").read_text())
    return 0


def _pm(values: list[float], scale: float = 1.0, spec: str = ".2f") -> str:
    mean, sd = mean_sd(values)
    return f"{scale * mean:{spec}} ± {scale * sd:{spec}}"


def write(out: Path, results: dict[str, Any], argv: list[str] | None, start: float, rounds: int,
          seeds: list[int]) -> None:
    machine = machine_info("python -m bench.uplink", sys.argv[1:] if argv is None else argv,
                           time.perf_counter() - start)
    (out / "uplink.json").write_text(json.dumps({**results, "machine": machine}, indent=2) + "\n")
    rows = []
    for name, r in results["runs"].items():
        if "error" in r:
            rows.append([name, "error", "", "", "", "", ""])
            continue
        rows.append([name, _pm(r["up_bpp"], spec=".4f"), _pm(r["final"], 100), _pm(r["last5"], 100),
                     _pm(r["bytes_per_client_round"], spec=",.0f"), _pm(r["fedavg_ratio"], spec=".1f"),
                     ", ".join(f"{k} {v}" for k, v in sorted(r["downlink_kinds"].items()))])
    timings = [[name, f"{1000 * t['encode_s']:.0f}", f"{1000 * t['decode_s']:.0f}", f"{t['bytes']:,}",
                f"{t['bpp']:.3f}"] for name, t in results["timing"].items()]
    lines = [f"# The relative-entropy uplink: FedPM, {rounds} rounds, seeds {', '.join(map(str, seeds))}", "",
             *[f"- {task}: {TASKS[task][1]} (`{TASKS[task][0]}`)" for task in TASKS], "",
             md_table(["task / uplink codec", "uplink bits/param (mean over rounds)", "final acc %",
                       "last-5 acc %", "up + down B per client-round", "x below FedAvg", "downlink kinds"], rows),
             "", "Mean ± sample sd over the seeds. *up + down B*: payload bytes both ways per client and round; "
             "*x below FedAvg*: one FedAvg round trip of the same model, serialized and weighed, over the run's mean "
             "up + down message bytes per client and round (summary.json's fedavg_ratio). *downlink kinds*: how many "
             "node-rounds got each kind of lossless broadcast (relay: the round's uploads, which a node holding the "
             "state before decodes and aggregates itself).", "",
             "## Coding one LeNet-300-100 upload on one core", "",
             md_table(["codec", "encode ms", "decode ms", "bytes", "bits/param"], timings), "",
             "theta on 10 clients' vote levels, q a client's move from it (about 0.03 bits of KL per weight, as "
             "round 10 of configs/mnist-fedpm.toml); the fastest of 3. The relative-entropy encoder draws "
             "2**(C + t) candidate bits per weight (C = 8, t = 0 here) whatever the KL; its decoder one.",
             *md_machine(machine), ""]
    (out / "uplink.md").write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
