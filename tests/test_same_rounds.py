"""Every shipped method gives the rounds it gave before the code was reorganised, bit for bit.

``same_rounds.json`` holds, for a 3-round digits run of every built-in method (and of the
code paths a plain run does not reach: partial participation, the other downlink and
uplink codecs, the robust rules, faults, recycling, the batched engine), the accuracy,
loss and payload bytes of each round, recorded before issue 26 moved a method into one
module. A refactor must leave every one of them as it was; a change that means to move
them (a new codec, another training loop) re-records them with

    python -m tests.test_same_rounds --record

and says in its commit why the numbers moved.

Floating-point training is exact only for one build of torch and numpy on one kind of
CPU: the file names the versions it was recorded with, and the test is skipped, saying
so, under others.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RECORD = Path(__file__).with_name("same_rounds.json")
ROUNDS = 3
FIELDS = ("accuracy", "loss", "uplink_payload_bytes", "downlink_payload_bytes")

# name -> (config file, engine, overrides); 3 rounds each
RUNS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "fedpm": ("quickstart.toml", "inprocess", {}),
    "fedpm-entropy": ("quickstart.toml", "inprocess", {"uplink-codec": "entropy"}),  # the default before issue 27
    "fedpm-partial": ("quickstart.toml", "inprocess", {"clients-per-round": 4}),
    "fedpm-prior-kept": ("quickstart.toml", "inprocess", {"clients-per-round": 5, "fedpm-prior-reset": 3}),
    "fedpm-float32-packbits": ("quickstart.toml", "inprocess",
                               {"downlink-codec": "float32", "uplink-codec": "packbits"}),
    "fedpm-quantized-sample": ("quickstart.toml", "inprocess",
                               {"downlink-codec": "quantized", "eval-mask": "sample", "fedpm-gradient": "reference"}),
    "fedpm-attacked-trimmed": ("quickstart.toml", "inprocess",
                               {"attack": "invert", "attack-fraction": 0.2, "robust-aggregation": "trimmed",
                                "trim-fraction": 0.2}),
    "fedpm-colluding-median": ("quickstart.toml", "inprocess",
                               {"attack": "colluding", "attack-fraction": 0.2, "robust-aggregation": "median"}),
    "fedpm-faults": ("quickstart.toml", "inprocess",
                     {"fault-drop-rate": 0.1, "fault-crash-rate": 0.1, "fault-corrupt-rate": 0.2}),
    "fedpm-batched": ("quickstart.toml", "batched", {"downlink-codec": "float32"}),
    "edge-popup": ("digits-edge-popup.toml", "inprocess", {}),
    "edge-popup-iwr": ("digits-edge-popup-iwr.toml", "inprocess", {"recycle-every": 1}),
    "edge-popup-vote-levels": ("digits-edge-popup.toml", "inprocess",
                               {"edge-popup-server-rule": "vote-levels", "clients-per-round": 4}),
    "edge-popup-vote-average": ("digits-edge-popup.toml", "inprocess",
                                {"edge-popup-server-rule": "vote-average", "optimizer": "sgd",
                                 "uplink-codec": "packbits"}),
    "edge-popup-batched": ("digits-edge-popup.toml", "batched", {"downlink-codec": "float16"}),
    "biprop": ("digits-biprop.toml", "inprocess", {}),
    "biprop-iwr-reference": ("digits-biprop-iwr.toml", "inprocess",
                             {"recycle-every": 1, "biprop-gradient": "reference", "clients-per-round": 6}),
    "biprop-scale-fan-batched": ("digits-biprop.toml", "batched",
                                 {"biprop-scale-fan": True, "downlink-codec": "float32"}),
    "slot-machines": ("digits-slot-machines.toml", "inprocess", {}),
    "slot-machines-probabilistic": ("digits-slot-machines.toml", "inprocess",
                                    {"slot-selection": "probabilistic", "eval-mask": "sample", "slots": 5,
                                     "slot-score-init": "reference", "init": "kaiming-normal",
                                     "clients-per-round": 4}),
    "laperm": ("digits-laperm.toml", "inprocess", {}),
    "laperm-exact-ranks": ("digits-laperm.toml", "inprocess", {"laperm-rank-step": 1, "clients-per-round": 5}),
    "fedavg": ("digits-fedavg.toml", "inprocess", {}),
    "fedavg-median": ("digits-fedavg.toml", "inprocess", {"robust-aggregation": "median", "optimizer": "adam",
                                                          "lr": 0.01}),
    "qsgd": ("digits-fedavg.toml", "inprocess", {"method": "qsgd"}),
    "topk-ef": ("digits-fedavg.toml", "inprocess", {"method": "topk-ef", "clients-per-round": 5}),
    "signsgd": ("digits-fedavg.toml", "inprocess", {"method": "signsgd"}),
    "ef-signsgd": ("digits-fedavg.toml", "inprocess", {"method": "ef-signsgd"}),
}


def _versions() -> dict[str, str]:
    return {"torch": torch.__version__, "numpy": np.__version__}


def rounds_of(name: str, out: Path) -> list[dict[str, Any]]:
    """The recorded fields of each round of run ``name``, run now into ``out``."""
    import fedmask

    config, engine, overrides = RUNS[name]
    result = fedmask.simulate(ROOT / "configs" / config, engine=engine, out=out / name,
                              **{"num-rounds": ROUNDS, **overrides})
    return [{field: row[field] for field in FIELDS} for row in result.rounds]


def _recorded() -> dict[str, Any]:
    return json.loads(RECORD.read_text())


@pytest.mark.parametrize("name", list(RUNS))
def test_every_method_gives_the_rounds_recorded_before_the_reorganisation(name, tmp_path):
    recorded = _recorded()
    if recorded["versions"] != _versions():
        pytest.skip(f"recorded under {recorded['versions']}, running {_versions()}: "
                    "floating-point training is exact for one build only")
    assert rounds_of(name, tmp_path) == recorded["runs"][name]


def test_the_record_covers_every_builtin_method():
    """Every built-in method has at least one recorded run, and every run is recorded."""
    from fedmask.methods import BUILTIN

    recorded = _recorded()["runs"]
    assert set(recorded) == set(RUNS)
    methods = set()
    for config, _, overrides in RUNS.values():
        text = (ROOT / "configs" / config).read_text()
        methods.add(overrides.get("method") or text.split('method = "', 1)[1].split('"', 1)[0])
    assert methods == set(BUILTIN)


def record(out: Path) -> None:
    runs = {name: rounds_of(name, out) for name in RUNS}
    RECORD.write_text(json.dumps({"versions": _versions(), "runs": runs}, indent=1) + "\n")
    print(f"{RECORD}: {len(runs)} runs recorded")


if __name__ == "__main__":
    import tempfile

    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python -m tests.test_same_rounds --record")
    with tempfile.TemporaryDirectory() as folder:
        record(Path(folder))
