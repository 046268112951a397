"""What the server tells one client for one round, and how it travels.

The instruction is the run config plus three fields of its own: the round, the
partition the client trains on, and the mask mode (so a client never has to import a
plug-in aggregator to know which mask to train). It travels as one ConfigRecord (a legacy
``FitIns`` config under SecAgg+) of the keys :data:`INSTRUCTION_KEYS`: the run config as
one canonical JSON string under ``run-config``, the others as plain values.

Why one string and not the config's 69 keys: a ConfigRecord entry is a typed protobuf
value, built, checked, serialized and parsed one by one. With every key flat, building an
instruction (0.35 ms) and taking the message through Flower's serde and back (1.6 ms, with
a small array) was most of a client's message handling on the 2-core machine; with the
string, 0.04 and 0.2 ms. The client resolves each distinct string once per process.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedmask.config import ConfigError, RunConfig
from fedmask.names import MASK_MODES

CONFIG_KEY = "run-config"
INSTRUCTION_KEYS = (CONFIG_KEY, "server-round", "partition-id", "mask-mode", "node-data")


@dataclass(frozen=True)
class TrainInstruction:
    config: RunConfig
    server_round: int
    partition_id: int
    mask_mode: str | None  # None: the dense baseline
    # A deployment: a node that holds a partition of its own (node config) trains on it
    # (fedmask.protocol.placement); in simulation every node trains the partition named here.
    node_data: bool = False

    def to_flat(self) -> dict[str, Any]:
        """The instruction as a ConfigRecord (or FitIns config) holds it: :data:`INSTRUCTION_KEYS`."""
        return {CONFIG_KEY: config_json(self.config), "server-round": self.server_round,
                "partition-id": self.partition_id, "mask-mode": self.mask_mode or "", "node-data": self.node_data}

    @classmethod
    def from_flat(cls, values: Mapping[str, Any]) -> TrainInstruction:
        """Read and check an instruction; a bad one raises ConfigError naming the field."""
        text = values.get(CONFIG_KEY)
        if not isinstance(text, str):
            raise ConfigError(f"instruction '{CONFIG_KEY}': expected the run config as a JSON string, "
                              f"got {type(text).__name__} (are the server and this client the same fedmask version?)")
        config = _config_from(text)
        fields = {}
        for key in ("server-round", "partition-id"):
            value = values.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"instruction '{key}': expected an integer >= 0, got {value!r}")
            fields[key] = value
        if fields["partition-id"] >= config.num_clients:
            raise ConfigError(f"instruction 'partition-id': expected < num-clients ({config.num_clients}), "
                              f"got {fields['partition-id']}")
        mode = values.get("mask-mode")
        if mode not in ("", *MASK_MODES):
            raise ConfigError(f"instruction 'mask-mode': expected '' or one of {', '.join(MASK_MODES)}, got {mode!r}")
        node_data = values.get("node-data", False)
        if not isinstance(node_data, bool):
            raise ConfigError(f"instruction 'node-data': expected true or false, got {node_data!r}")
        return cls(config, fields["server-round"], fields["partition-id"], mode or None, node_data)



@functools.lru_cache(maxsize=8)
def config_json(config: RunConfig) -> str:
    """The config as the instruction carries it: every key, as JSON with sorted keys (floats
    are written with ``repr``, so they read back to the same value)."""
    return json.dumps(config.to_dict(), sort_keys=True, allow_nan=False)


@functools.lru_cache(maxsize=8)
def _config_from(text: str) -> RunConfig:
    """The checked config of an instruction, resolved once per process and config: every
    client of a run carries the same string, and checking it is not the client's work
    each round. A bad config raises every time (exceptions are not cached)."""
    try:
        values = json.loads(text, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as err:  # RecursionError: nesting deeper than the parser goes
        raise ConfigError(f"instruction '{CONFIG_KEY}': expected a JSON object of config keys, "
                          f"got text that is not JSON or nests too deep ({str(err)[:120]})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"instruction '{CONFIG_KEY}': expected a JSON object of config keys, "
                          f"got a JSON {type(values).__name__}")
    for key, value in values.items():
        if isinstance(value, str) and not _encodable(value):
            raise ConfigError(f"instruction '{CONFIG_KEY}': key '{key}' holds a string that is not "
                              "valid Unicode (a lone surrogate escape)")
    return RunConfig.from_record(values)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's pairs as a dict, refusing a key given twice (the canonical text never does)."""
    values: dict[str, Any] = {}
    for key, value in pairs:
        if key in values:
            raise ValueError(f"key {key!r} given twice")
        values[key] = value
    return values


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
