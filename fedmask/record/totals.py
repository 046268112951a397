"""What a round costs both ways, per client, and how that compares with FedAvg.

FedAvg's cost is measured, not computed from ``2 x 4 x params``: :func:`fedavg_round_bytes`
builds one FedAvg round trip of the same architecture (the dense float32 weights of the
run's model in a train instruction with the run's config record, and the same weights in
the reply with its metrics), and weighs both with the ledger's own
:func:`~fedmask.record.ledger.payload_bytes` and :func:`~fedmask.record.ledger.message_bytes`, exactly as
``method = "fedavg"`` messages are weighed when they are really sent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MessageType, Metadata, MetricRecord, RecordDict
from flwr.app.message import make_message

from fedmask.protocol.instruction import TrainInstruction
from fedmask.record.ledger import message_bytes, payload_bytes

if TYPE_CHECKING:
    from fedmask.config import RunConfig


def fedavg_round_bytes(config: RunConfig, dense: dict[str, np.ndarray]) -> dict[str, int]:
    """Bytes of one FedAvg instruction and its reply for the dense weights ``dense``."""
    arrays = ArrayRecord({name: Array(np.ascontiguousarray(v, dtype=np.float32)) for name, v in dense.items()})
    # the run's own config record (a FedAvg run's differs in a few characters of its values)
    instruction = ConfigRecord(TrainInstruction(config, 1, 0, None).to_flat())
    # Built with explicit metadata (no run context needed); the ledger widens every id anyway.
    meta: dict[str, Any] = {"run_id": 1, "message_id": "", "group_id": "1", "created_at": 0.0, "ttl": 3600.0,
            "message_type": MessageType.TRAIN}
    down = make_message(Metadata(src_node_id=0, dst_node_id=1, reply_to_message_id="", src_task_id=1, **meta),
                        RecordDict({"arrays": arrays, "config": instruction}))
    metrics = MetricRecord({"num-examples": 1000, "train-loss": 0.5, "train-accuracy": 0.5})
    up = make_message(Metadata(src_node_id=1, dst_node_id=0, reply_to_message_id="f" * 64, dst_task_id=1, **meta),
                      RecordDict({"arrays": arrays, "metrics": metrics}))
    return {"fedavg_payload_bytes": payload_bytes(down) + payload_bytes(up),
            "fedavg_message_bytes": message_bytes(down) + message_bytes(up)}


def round_total_fields(totals: dict[str, int], clients: int, fedavg: dict[str, int] | None) -> dict[str, Any]:
    """Per client of the round (those the server sent to): up + down bytes, and FedAvg's over them."""
    clients = max(clients, 1)
    payload = (totals["uplink_payload_bytes"] + totals["downlink_payload_bytes"]) / clients
    message = (totals["uplink_message_bytes"] + totals["downlink_message_bytes"]) / clients
    out: dict[str, Any] = {"total_payload_bytes_per_client": payload, "total_message_bytes_per_client": message}
    if fedavg:
        out["fedavg_message_bytes_per_client"] = fedavg["fedavg_message_bytes"]
        out["fedavg_ratio"] = fedavg["fedavg_message_bytes"] / message if message else None
    return out
