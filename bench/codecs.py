"""Uplink and downlink codecs for FedPM, measured on real Flower runs, plus coder speed.

Run from the project root: ``python -m bench.codecs [--rounds 30] [--only digits|mnist]
[--skip-speed]``.

Each (uplink, downlink) pair is ``fedmask run`` in a subprocess through Flower's Ray engine,
so the bytes are the ledger's measurements of the messages really sent, and the ideal and
FedPM-formula code lengths are the ones the server computed on the masks it decoded. The
uplink codecs are lossless, so packbits and entropy under the same downlink must give the
same accuracy curve: that is checked, not assumed. The coder speed test runs after the
training runs (the machine is small and shared; its timings are noisy, so best of 3).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    ROOT,
    SOURCES,
    figure,
    fmt,
    git_head,
    machine_info,
    md_checks,
    md_failures,
    md_machine,
    md_table,
    per_client_mean,
    prepare_dirs,
    run_fedmask,
    shared_sets,
    source_digest,
)

TASKS = {"digits": "configs/quickstart.toml", "mnist": "configs/mnist-fedpm.toml"}
TASK_NAMES = {"digits": "digits (sklearn 8x8, MLP)", "mnist": "MNIST-10k (8k train / 2k test, LeNet-300-100)"}
# (uplink codec, downlink codec, downlink bits); bits matter only for "quantized".
PAIRS: tuple[tuple[str, str, int], ...] = (
    ("packbits", "float32", 8), ("entropy", "float32", 8), ("entropy", "float16", 8),
    ("entropy", "quantized", 8), ("entropy", "quantized", 4),
)
REFERENCE = ("entropy", "float32")  # accuracy deltas are against this run (same uplink coder)

# Targets
IDEAL_SLACK = 0.01  # coded <= ideal * 1.01 + fixed headers
SECTION_ALLOWANCE_BYTES, UPLOAD_HEADER_BYTES = 64, 28  # per layer, per upload
FORMULA_MAX_RATIO = 0.8
DOWNLINK_MAX_BPP, DOWNLINK_MAX_DROP = 8.0, 0.5  # bits per parameter; accuracy points
SPEED_ENTRIES, SPEED_MAX_S = 10_000_000, 3.0


def downlink_name(codec: str, bits: int) -> str:
    return f"quantized-{bits}" if codec == "quantized" else codec


@dataclass
class Run:
    """One (task, uplink, downlink) run as read back from its run directory."""

    task: str
    uplink: str
    downlink: str  # e.g. "quantized-8"
    rounds: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float | None = None
    error: str | None = None
    code_changed: bool = False  # library sources or configs changed while this run ran
    note: str | None = None

    @property
    def final(self) -> dict[str, Any]:
        return self.rows[-1] if self.rows else {}

    def final_acc(self) -> float | None:
        return 100 * self.final["accuracy"] if self.rows else None

    def up_bytes_per_client(self) -> float | None:
        """Mean over rounds of the round's uplink payload / the clients that uploaded."""
        return per_client_mean(self.rows, "uplink_payload_bytes", "uplink")

    def mean(self, key: str) -> float | None:
        values = [r[key] for r in self.rows if key in r]
        return sum(values) / len(values) if values else None


def run_flower(task: str, uplink: str, downlink: str, bits: int, rounds: int, run_dir: Path) -> Run:
    """``fedmask run`` in a subprocess, with a heartbeat, then its rounds.jsonl."""
    run = Run(task, uplink, downlink_name(downlink, bits), rounds)
    sets = [f'uplink-codec="{uplink}"', f'downlink-codec="{downlink}"', f"downlink-bits={bits}"]
    done = run_fedmask(TASKS[task], sets, run_dir, rounds)
    run.wall_s, run.rows, run.error = done.wall_s, done.rows, done.error
    if not run.error and any(r["failures"] for r in run.rows):
        run.error = f"{sum(r['failures'] for r in run.rows)} client failures: " + json.dumps(
            [f for r in run.rows for f in r["failure_details"]][:3])
    return run


def run_flower_retry(task: str, uplink: str, downlink: str, bits: int, rounds: int, run_dir: Path) -> Run:
    """One run; if library sources changed while it ran and it failed, run it once more.

    Both facts are kept on the result (``code_changed``, ``note``) and listed in codecs.md.
    """
    before = source_digest()
    run = run_flower(task, uplink, downlink, bits, rounds, run_dir)
    run.code_changed = source_digest() != before
    if run.error and run.code_changed:
        first_error = run.error.splitlines()[0]
        run = run_flower(task, uplink, downlink, bits, rounds, run_dir)
        run.code_changed = source_digest() != before
        run.note = f"re-run after a failure during library edits ({first_error})"
    return run


def num_layers(task: str) -> int:
    """Masked tensors of the task's model: each gets an entropy section header."""
    from fedmask import task as fm_task
    from fedmask.config import load

    config = load(ROOT / TASKS[task], shared_sets(TASKS[task]))
    mode = config.method_entry.make_mode(config)
    model = fm_task.make_model(config, fm_task.splits_of(config), mode)
    return len(fm_task.ModelSpec.of(config, model, mode).layout.shapes)


# ---------------------------------------------------------------- checks


def checks(runs: list[Run], layers: dict[str, int], speed: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Every target with its numbers; a missing number is a FAIL, never a skip."""
    out: list[dict[str, Any]] = []

    def add(task: str, name: str, ok: bool, detail: str) -> None:
        out.append({"task": task, "check": name, "pass": bool(ok), "detail": detail})

    for task in dict.fromkeys(r.task for r in runs):
        by = {(r.uplink, r.downlink): r for r in runs if r.task == task}
        pb, ent = by.get(("packbits", "float32")), by.get(REFERENCE)
        name = "packbits and entropy uplink (float32 downlink) give identical accuracy curves"
        if pb and ent and pb.rows and ent.rows and not pb.error and not ent.error:
            a, b = [r["accuracy"] for r in pb.rows], [r["accuracy"] for r in ent.rows]
            la, lb = [r["loss"] for r in pb.rows], [r["loss"] for r in ent.rows]
            diff = max(abs(x - y) for x, y in zip(a, b))
            add(task, name, a == b and la == lb,
                f"{len(a)} rounds, max |accuracy diff| {diff:.6f}, losses {'equal' if la == lb else 'differ'}; "
                f"final {100 * a[-1]:.2f}% vs {100 * b[-1]:.2f}%")
        else:
            add(task, name, False, "missing result")

        for r in (r for r in runs if r.task == task and r.uplink == "entropy"):
            f = r.final
            label = f"[{r.downlink}]"
            name = (f"{label} final-round coded uplink <= ideal x {1 + IDEAL_SLACK:g} + "
                    f"{SECTION_ALLOWANCE_BYTES} B/layer + {UPLOAD_HEADER_BYTES} B/upload")
            if f.get("uplink_ideal_bpp") is not None and not r.error:
                clients = f["clients"]
                measured = 8 * f["uplink_payload_bytes"]
                ideal = f["uplink_ideal_bpp"] * f["num_params"] * clients
                allowance = IDEAL_SLACK * ideal + clients * 8 * (SECTION_ALLOWANCE_BYTES * layers[task]
                                                                  + UPLOAD_HEADER_BYTES)
                over = measured - ideal
                add(task, name, over <= allowance,
                    f"{measured / 8 / clients:,.1f} B/client coded vs {ideal / 8 / clients:,.1f} B ideal: "
                    f"+{over / 8 / clients:,.1f} B (+{100 * over / ideal:.2f}%), allowance "
                    f"{allowance / 8 / clients:,.1f} B ({layers[task]} layers)")
            else:
                add(task, name, False, "missing result" + (f" ({r.error.splitlines()[0]})" if r.error else ""))

            name = f"{label} last-round coded uplink <= {FORMULA_MAX_RATIO:g} x FedPM formula"
            if f.get("uplink_formula_bpp") and not r.error:
                ratio = f["uplink_bpp"] / f["uplink_formula_bpp"]
                add(task, name, ratio <= FORMULA_MAX_RATIO,
                    f"round {f['round']}: {f['uplink_bpp']:.4f} bpp coded vs {f['uplink_formula_bpp']:.4f} formula "
                    f"= {ratio:.3f}x (ideal {f['uplink_ideal_bpp']:.4f})")
            else:
                add(task, name, False, "missing result")

        name = (f"a downlink codec with <= {DOWNLINK_MAX_BPP:g} bits/param within {DOWNLINK_MAX_DROP:g} points "
                "of float32 final accuracy")
        if ent and ent.final_acc() is not None and not ent.error:
            base = ent.final_acc()
            cands = [r for r in runs if r.task == task and r.uplink == "entropy" and r.downlink != "float32"
                     and not r.error and r.rows]
            parts, winners = [], []
            for r in cands:
                bpp, acc = r.mean("downlink_bpp"), r.final_acc()
                ok = bpp <= DOWNLINK_MAX_BPP and acc >= base - DOWNLINK_MAX_DROP
                winners += [r.downlink] if ok else []
                parts.append(f"{r.downlink} {bpp:.2f} bpp, {acc:.2f}% ({acc - base:+.2f})")
            add(task, name, bool(winners),
                f"{'passing: ' + ', '.join(winners) if winners else 'none passes'}; float32 {base:.2f}%; "
                + "; ".join(parts))
        else:
            add(task, name, False, "missing float32 reference")

    if speed is not None:
        name = f"{SPEED_ENTRIES / 1e6:g}M-entry entropy encode + decode < {SPEED_MAX_S:g} s"
        ent = speed.get("entropy")
        if ent and ent.get("total_s") is not None:
            add("speed", name, ent["total_s"] < SPEED_MAX_S and ent["roundtrip_ok"],
                f"{ent['encode_s']:.3f} + {ent['decode_s']:.3f} = {ent['total_s']:.3f} s "
                f"(best of 3), roundtrip {'exact' if ent['roundtrip_ok'] else 'WRONG'}")
        else:
            add("speed", name, False, f"missing result: {speed.get('error')}")
    return out


# ---------------------------------------------------------------- coder speed


def best_of(fn: Callable[[], Any], repeats: int = 3) -> tuple[float, Any]:
    """Shortest of ``repeats`` timings: the least disturbed by other work on the machine."""
    best, value = math.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - start)
    return best, value


def coder_speed(entries: int = SPEED_ENTRIES, seed: int = 0) -> dict[str, Any]:
    """Encode + decode one FedPM-like mask: theta ~ Beta(0.2, 0.2) clipped to [0.01, 0.99].

    Beta(0.2, 0.2) piles theta near 0 and 1, as FedPM's theta does after a few rounds, so
    the side model has something to gain and the coder runs at a realistic rate.
    """
    import numpy as np

    from fedmask.methods.fedpm import Bernoulli
    from fedmask.wire.frame import Layout
    from fedmask.wire.masks import code_lengths, decode_masks, encode_masks

    rng = np.random.default_rng(seed)
    theta = np.clip(rng.beta(0.2, 0.2, entries), 0.01, 0.99).astype(np.float32)
    masks = {"w": rng.random(entries) < theta}
    layout = Layout.from_arrays(masks)
    fp = layout.fingerprint(seed, "bench", "bench")
    prior = Bernoulli().prior({"w": theta})  # both ends compute it from the broadcast
    mbytes = entries / 8 / 1e6
    out: dict[str, Any] = {"entries": entries, "theta": "Beta(0.2, 0.2) clipped to [0.01, 0.99]",
                           "mask_ones_fraction": float(masks["w"].mean())}

    def record(name: str, enc: Callable[[], Any], dec: Callable[[Any], Any], ok: Callable[[Any], bool]) -> None:
        enc_s, blob = best_of(enc)
        dec_s, back = best_of(lambda: dec(blob))
        total = enc_s + dec_s
        out[name] = {"encode_s": enc_s, "decode_s": dec_s, "total_s": total, "coded_bytes": int(blob.size),
                     "encode_mb_s": mbytes / enc_s, "decode_mb_s": mbytes / dec_s, "total_mb_s": mbytes / total,
                     "roundtrip_ok": bool(ok(back))}
        print(f"    {name}: encode {enc_s:.3f} s, decode {dec_s:.3f} s, {blob.size:,} B", flush=True)

    record("entropy", lambda: encode_masks(masks, layout, fp, codec="entropy", prior=prior),
           lambda b: decode_masks(b, layout, fp, prior), lambda back: np.array_equal(back["w"], masks["w"]))
    record("packbits", lambda: encode_masks(masks, layout, fp, codec="packbits"),
           lambda b: decode_masks(b, layout, fp), lambda back: np.array_equal(back["w"], masks["w"]))
    record("np.packbits", lambda: np.packbits(masks["w"]),
           lambda b: np.unpackbits(b, count=entries).astype(bool), lambda back: np.array_equal(back, masks["w"]))
    lengths = code_lengths(masks, layout, "entropy", prior)
    out["ideal_bits"], out["formula_bits"] = lengths["ideal_bits"], lengths["formula_bits"]
    coded_bits = 8 * out["entropy"]["coded_bytes"]
    out["entropy"]["coded_over_ideal"] = coded_bits / lengths["ideal_bits"]
    out["entropy"]["coded_bpp"] = coded_bits / entries
    return out


# ---------------------------------------------------------------- outputs


def write_csv(runs: list[Run], path: Path) -> None:
    keys = ("accuracy", "uplink_bpp", "uplink_ideal_bpp", "uplink_formula_bpp", "downlink_bpp")
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("task", "uplink_codec", "downlink_codec", "round", *keys, "uplink_payload_bytes",
                         "downlink_payload_bytes", "clients"))
        for r in runs:
            for row in r.rows:
                writer.writerow((r.task, r.uplink, r.downlink, row["round"], *(row.get(k, "") for k in keys),
                                 row["uplink_payload_bytes"], row["downlink_payload_bytes"], row["clients"]))


def plot(runs: list[Run], path: Path) -> None:
    """Per task: uplink bpp (coded vs ideal vs formula) and downlink bpp per codec, by round."""
    tasks = list(dict.fromkeys(r.task for r in runs))
    colors = {downlink_name(d, b): f"C{i}" for i, (_, d, b) in enumerate(PAIRS[1:])}  # the default cycle
    with figure(path, len(tasks), 2, (12, 4 * len(tasks))) as axes:
        for (up_ax, down_ax), task in zip(axes, tasks):
            for r in (r for r in runs if r.task == task and r.rows):
                x = [row["round"] for row in r.rows]
                if r.uplink == "packbits":
                    up_ax.plot(x, [row["uplink_bpp"] for row in r.rows], color="gray", label="packbits coded")
                    continue
                c = colors[r.downlink]
                main = r.downlink == "float32"
                up_ax.plot(x, [row["uplink_bpp"] for row in r.rows], color=c, lw=2 if main else 1,
                           marker="." if main else None, label=f"entropy coded ({r.downlink} down)")
                if main:
                    up_ax.plot(x, [row.get("uplink_ideal_bpp") for row in r.rows], color="k", ls=":",
                               label="ideal (float32 down)")
                    up_ax.plot(x, [row.get("uplink_formula_bpp") for row in r.rows], color="k", ls="--",
                               label="FedPM formula H(f)+log2(N)/N (float32 down)")
                down_ax.plot(x, [row["downlink_bpp"] for row in r.rows], color=c, marker=".", label=r.downlink)
            up_ax.set(title=f"{TASK_NAMES[task]}: uplink", xlabel="round", ylabel="bits per parameter per client")
            down_ax.set(title=f"{TASK_NAMES[task]}: downlink", xlabel="round", ylabel="bits per parameter",
                        yscale="log")
            up_ax.legend(fontsize=7)
            down_ax.legend(fontsize=7)


SPEED_TABLE = ("coder", "encode s", "decode s", "encode + decode s", "enc MB/s", "dec MB/s", "total MB/s",
               "coded bytes", "roundtrip")
SPEED_CELLS = (("encode_s", ".3f"), ("decode_s", ".3f"), ("total_s", ".3f"), ("encode_mb_s", ".1f"),
               ("decode_mb_s", ".1f"), ("total_mb_s", ".1f"), ("coded_bytes", ","))


def speed_cells(name: str, s: dict[str, Any]) -> list[str]:
    return [name, *(fmt(s[k], spec) for k, spec in SPEED_CELLS), "exact" if s["roundtrip_ok"] else "WRONG"]


TABLE = ("uplink", "downlink", "final acc %", "Δ vs float32 (pts)", "up bpp coded", "up bpp ideal",
         "up bpp formula", "coded / formula", "up B/client/round (mean)", "down bpp (mean)", "wall s")


def table_rows(runs: list[Run], task: str) -> list[list[str]]:
    mine = [r for r in runs if r.task == task]
    ref = next((r for r in mine if (r.uplink, r.downlink) == REFERENCE), None)
    base = ref.final_acc() if ref else None
    rows = []
    for r in mine:
        fin, acc = r.final, r.final_acc()
        delta = acc - base if acc is not None and base is not None else None
        ratio = fin["uplink_bpp"] / fin["uplink_formula_bpp"] if fin.get("uplink_formula_bpp") else None
        rows.append([r.uplink, r.downlink + (" FAILED" if r.error else ""), fmt(acc, ".2f"), fmt(delta, "+.2f"),
                     fmt(fin.get("uplink_bpp"), ".4f"), fmt(fin.get("uplink_ideal_bpp"), ".4f"),
                     fmt(fin.get("uplink_formula_bpp"), ".4f"), fmt(ratio, ".3f"),
                     fmt(r.up_bytes_per_client(), ",.0f"), fmt(r.mean("downlink_bpp"), ".3f"), fmt(r.wall_s, ".1f")])
    return rows


def markdown(runs: list[Run], checked: list[dict[str, Any]], speed: dict[str, Any] | None,
             machine: dict[str, Any]) -> str:
    rounds = runs[0].rounds if runs else 0
    lines = ["# fedmask benchmark: uplink and downlink codecs (FedPM)", ""]
    for task in dict.fromkeys(r.task for r in runs):
        lines += [f"## {TASK_NAMES[task]}: `{TASKS[task]}`, {rounds} rounds", "",
                  md_table(TABLE, table_rows(runs, task))]
        n = next((r.final.get("num_params") for r in runs if r.task == task and r.rows), None)
        lines += ["", f"{n:,} masked parameters." if n else "", ""]
    lines += [
        "10 IID clients, all 10 train every round, Flower's Ray engine. *up bpp coded / ideal / "
        "formula*: final round, per client, bits per parameter: *coded* = measured uplink payload "
        "(the 28-byte upload header and 9-byte section headers included); *ideal* = sum of -log2 p(bit) "
        "under the model the encoder chose per tensor; *formula* = FedPM's H(f) + log2(N)/N for the same "
        "masks. *up B/client/round*: uplink payload bytes per client, mean over rounds. *down bpp*: "
        "downlink payload bits per parameter, mean over rounds. *Δ vs float32*: final accuracy minus "
        f"that of ({REFERENCE[0]}, {REFERENCE[1]}). *wall s*: the whole `fedmask run` subprocess, Ray "
        "start-up included.", ""]
    if speed is not None:
        lines += ["## Coder speed", ""]
        if speed.get("error"):
            lines += ["```", speed["error"], "```", ""]
        else:
            lines += [f"One tensor of {speed['entries']:,} mask entries, theta ~ {speed['theta']}, mask ~ "
                      f"Bernoulli(theta) ({100 * speed['mask_ones_fraction']:.1f}% ones); best of 3 each. "
                      "MB/s = mask megabytes per second = 10M bits / 8 / 1e6 / seconds "
                      f"({speed['entries'] / 8 / 1e6:g} MB).", "",
                      md_table(SPEED_TABLE, [speed_cells(name, speed[name])
                                             for name in ("entropy", "packbits", "np.packbits")])]
            e = speed["entropy"]
            lines += ["", f"Entropy-coded size: {8 * e['coded_bytes']:,} bits = {e['coded_bpp']:.4f} bpp vs ideal "
                      f"{speed['ideal_bits']:,.0f} bits ({speed['ideal_bits'] / speed['entries']:.4f} bpp): "
                      f"{e['coded_over_ideal']:.5f}x ideal; FedPM formula {speed['formula_bits']:,.0f} bits "
                      f"({speed['formula_bits'] / speed['entries']:.4f} bpp). `mask_prior` (float64 copy of "
                      "theta, done once per round at each end) is outside the timing.", ""]
    lines += ["## Target checks", ""]
    lines += md_checks(checked)
    notes = [r for r in runs if r.note or r.code_changed]
    if notes:
        lines += ["", "## Runs during library edits", ""]
        lines += [f"- {r.task} / {r.uplink} / {r.downlink}: "
                  + "; ".join(filter(None, [r.note, "library sources changed during the run" if r.code_changed
                                            else None])) for r in notes]
    lines += md_failures((f"{r.task} / {r.uplink} / {r.downlink}", r.error) for r in runs if r.error)
    lines += md_machine(machine)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench.codecs", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30, help="rounds for every run (default 30)")
    parser.add_argument("--only", choices=tuple(TASKS), help="run one task only")
    parser.add_argument("--skip-speed", action="store_true", help="skip the 10M-entry coder timing")
    parser.add_argument("--out", default="bench/results", help="where codecs.md/json/csv/png go")
    args = parser.parse_args(argv)
    out_dir, runs_dir = prepare_dirs(args.out, "fedmask-codecs-")
    start, runs, layers = time.perf_counter(), [], {}
    code_start, digest_start = git_head(SOURCES), source_digest()
    for task in [args.only] if args.only else list(TASKS):
        layers[task] = num_layers(task)
        for uplink, downlink, bits in PAIRS:
            name = downlink_name(downlink, bits)
            print(f"[{time.perf_counter() - start:6.0f} s] {task}: uplink {uplink}, downlink {name}", flush=True)
            r = run_flower_retry(task, uplink, downlink, bits, args.rounds, runs_dir / f"{task}-{uplink}-{name}")
            runs.append(r)
            fin = r.final
            print("    " + (f"FAILED: {r.error}" if r.error else
                            f"final acc {r.final_acc():.2f}% · up {fin['uplink_bpp']:.4f} bpp "
                            f"(ideal {fin.get('uplink_ideal_bpp', float('nan')):.4f}, formula "
                            f"{fin.get('uplink_formula_bpp', float('nan')):.4f}) · down "
                            f"{fin['downlink_bpp']:.3f} bpp · {r.wall_s:.1f} s"), flush=True)

    speed = None
    if not args.skip_speed:
        print(f"[{time.perf_counter() - start:6.0f} s] coder speed, {SPEED_ENTRIES:,} entries", flush=True)
        try:
            speed = coder_speed()
        except Exception as err:  # report it with the rest
            import traceback

            speed = {"error": traceback.format_exc()}
            print(f"    FAILED: {err}", flush=True)

    checked = checks(runs, layers, speed)
    edited = source_digest() != digest_start
    if edited:
        print("warning: library sources changed during the bench; runs may mix code versions", flush=True)
    machine = machine_info("python -m bench.codecs", argv, time.perf_counter() - start, {
        "code at start": code_start,
        "code at end": git_head(SOURCES),
        "library edited during the bench": "YES: runs may mix code versions" if edited else "no",
    })
    md = markdown(runs, checked, speed, machine)
    (out_dir / "codecs.md").write_text(md)
    (out_dir / "codecs.json").write_text(json.dumps(
        {"runs": [{k: v for k, v in asdict(r).items() if k != "rows"}
                  | {"final": {k: v for k, v in r.final.items() if k not in ("per_client", "failure_details")},
                     "accuracy": [row["accuracy"] for row in r.rows],
                     "mean_uplink_bytes_per_client": r.up_bytes_per_client()} for r in runs],
         "layers": layers, "speed": speed, "checks": checked, "machine": machine, "runs_dir": f"<tmp>/{runs_dir.name}"},
        indent=2) + "\n")
    write_csv(runs, out_dir / "codecs_rounds.csv")
    plot(runs, out_dir / "codecs_bpp.png")
    print("\n" + md, flush=True)
    print(f"wrote {out_dir}/codecs.md, codecs.json, codecs_rounds.csv, codecs_bpp.png", flush=True)
    return 1 if any(r.error for r in runs) or (speed or {}).get("error") else 0


if __name__ == "__main__":
    sys.exit(main())
