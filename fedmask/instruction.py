"""What the server tells one client for one round, and how it travels.

The instruction is the run config plus three fields of its own: the round, the
partition the client trains on, and the mask mode (so a client never has to import a
plug-in aggregator to know which mask to train). It travels as one flat ConfigRecord
(a legacy ``FitIns`` config under SecAgg+): the config's kebab-case keys and
:data:`INSTRUCTION_KEYS`, which no config key shares.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedmask.config import SCHEMA, ConfigError, RunConfig
from fedmask.masking import MASK_MODES

INSTRUCTION_KEYS = ("server-round", "partition-id", "mask-mode", "node-data")


@dataclass(frozen=True)
class TrainInstruction:
    config: RunConfig
    server_round: int
    partition_id: int
    mask_mode: str | None  # None: the dense baseline
    # A deployment: a node that holds a partition of its own (node config) trains on it
    # (fedmask.placement); in simulation every node trains the partition named here.
    node_data: bool = False

    def to_flat(self) -> dict[str, Any]:
        """The config's keys and the instruction's, as a ConfigRecord (or FitIns config) holds them."""
        return {**self.config.to_dict(), "server-round": self.server_round,
                "partition-id": self.partition_id, "mask-mode": self.mask_mode or "", "node-data": self.node_data}

    @classmethod
    def from_flat(cls, values: Mapping[str, Any]) -> TrainInstruction:
        """Read and check an instruction; a bad one raises ConfigError naming the field."""
        items = tuple((key, values.get(key)) for key in SCHEMA)
        try:
            hash(items)
        except TypeError:  # a value of the wrong kind: the uncached check names it
            config = RunConfig.from_record(values)
        else:
            config = _config_from(items, tuple(k for k in SCHEMA if k not in values))
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
def _config_from(items: tuple[tuple[str, Any], ...], missing: tuple[str, ...]) -> RunConfig:
    """The checked config of an instruction, resolved once per process and config: every
    client of a run carries the same keys, and checking them is not the client's work
    each round. A bad config raises every time (exceptions are not cached)."""
    if missing:
        raise ConfigError(f"config record: expected every config key, missing {', '.join(missing)}")
    return RunConfig.from_record(dict(items))
