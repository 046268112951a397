"""Tests for fedmask.ledger: message weights, and a real round through MeasuringGrid."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.serde import message_to_proto
from flwr.supercore.task_identity import TaskIdentity

from clients.client_app import app as client_app
from fedmask import task
from fedmask.aggregators import FedPMAggregator
from fedmask.config import resolve
from fedmask.ledger import Ledger, MeasuringGrid, message_bytes, payload_bytes
from fedmask.masking import get_scores
from fedmask.models import build_model
from fedmask.sampling import sample_partitions
from server.inprocess_grid import InProcessGrid
from server.strategies import MaskStrategy, state_record

HEADER_BYTES = 4 + 1 + 1 + 2 + 8 + 8 + 4  # codec header, from its format spec


def wire_size(message: Message) -> int:
    return len(message_to_proto(message).SerializeToString())


@pytest.fixture
def identity(monkeypatch):
    """Flower's Message() needs the sending task's identity."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


# ---------------------------------------------------------------- weighing one message


def test_payload_and_message_bytes_of_a_hand_built_message(identity):
    """payload = sum of the arrays' nbytes; message = serialized size, larger than payload."""
    arrays = {
        "w": np.arange(12, dtype=np.float32).reshape(3, 4),
        "i": np.arange(5, dtype=np.int64),
        "m": np.arange(7, dtype=np.uint8),
        "d": np.ones((2, 2, 2), dtype=np.float64),
    }
    content = RecordDict({
        "one": ArrayRecord({k: Array(arrays[k]) for k in ("w", "i")}),
        "two": ArrayRecord({k: Array(arrays[k]) for k in ("m", "d")}),
        "config": ConfigRecord({"server-round": 1, "name": "x" * 100}),
        "metrics": MetricRecord({"loss": 0.5}),
    })
    message = Message(content, dst_node_id=5, message_type=MessageType.TRAIN, group_id="1")
    expected_payload = sum(a.nbytes for a in arrays.values())
    assert expected_payload == 48 + 40 + 7 + 64
    assert payload_bytes(message) == expected_payload
    assert message_bytes(message) == wire_size(message)
    assert message_bytes(message) > payload_bytes(message) + 100  # config string is not payload


def test_message_without_arrays_has_zero_payload(identity):
    """Config and metric records are not payload."""
    message = Message(RecordDict({"config": ConfigRecord({"a": 1}), "metrics": MetricRecord({"b": 2.0})}),
                      dst_node_id=5, message_type=MessageType.TRAIN, group_id="1")
    assert payload_bytes(message) == 0
    assert message_bytes(message) == wire_size(message) > 0


# ---------------------------------------------------------------- a real round


@pytest.fixture(scope="module")
def fedpm_round():
    """One FedPM round for 2 of 3 clients through MeasuringGrid(InProcessGrid(client app))."""
    config = resolve({"num-clients": 3, "clients-per-round": 2, "num-rounds": 1, "uplink-codec": "packbits"})
    splits = task.splits_of(config)
    aggregator = FedPMAggregator(config)
    model = task.make_model(config, splits, aggregator.mask_mode)
    initial = aggregator.initial_state(get_scores(model))
    ledger = Ledger()
    grid = MeasuringGrid(InProcessGrid(client_app, config.num_clients), ledger, pull_interval=0.0)
    strategy = MaskStrategy(config, ledger, aggregator, task.ModelSpec.of(config, model, aggregator.mask_mode),
                            initial)
    messages = list(strategy.configure_train(1, state_record(initial), ConfigRecord(), grid))
    replies = list(grid.send_and_receive(messages, timeout=120))
    num_params = sum(p.numel() for p in build_model(config.model, splits.input_shape, splits.num_classes)
                     .parameters())
    return {"config": config, "ledger": ledger, "strategy": strategy, "messages": messages,
            "replies": replies, "num_params": num_params}


def test_round_records_one_down_and_one_up_transfer_per_sampled_client(fedpm_round):
    """Each sampled client has exactly one downlink and one uplink transfer, by partition id."""
    ledger, config = fedpm_round["ledger"], fedpm_round["config"]
    sampled = sample_partitions(config.seed, config.num_clients, config.clients_per_round, 1)
    assert len(fedpm_round["replies"]) == len(sampled) == 2
    assert sorted(t.partition_id for t in ledger.downlink[1]) == sampled
    assert sorted(t.partition_id for t in ledger.uplink[1]) == sampled
    assert all(t.round == 1 for t in ledger.downlink[1] + ledger.uplink[1])
    assert set(ledger.downlink) == set(ledger.uplink) == {1}
    assert ledger.unanswered(1, fedpm_round["replies"]) == []
    assert sorted(ledger.partition_of(r) for r in fedpm_round["replies"]) == sampled


def test_uplink_payload_is_the_packed_mask(fedpm_round):
    """Uplink payload per client == 28-byte header + ceil(num_params / 8)."""
    expected = HEADER_BYTES + math.ceil(fedpm_round["num_params"] / 8)
    assert fedpm_round["num_params"] == 85_002
    assert [t.payload_bytes for t in fedpm_round["ledger"].uplink[1]] == [expected, expected]
    for reply in fedpm_round["replies"]:
        assert reply.content["arrays"]["mask"].numpy().nbytes == expected


def test_downlink_payload_is_float32_state(fedpm_round):
    """Downlink payload per client == 4 bytes per parameter (float32 theta)."""
    expected = 4 * fedpm_round["num_params"]
    assert [t.payload_bytes for t in fedpm_round["ledger"].downlink[1]] == [expected, expected]


def test_recorded_message_bytes_equal_serialized_sizes(fedpm_round):
    """Recorded message bytes equal the serialized size of the messages sent and replies got."""
    ledger = fedpm_round["ledger"]
    by_partition = {t.partition_id: t for t in ledger.uplink[1]}
    for reply in fedpm_round["replies"]:
        assert by_partition[ledger.partition_of(reply)].message_bytes == wire_size(reply)
        assert wire_size(reply) > by_partition[ledger.partition_of(reply)].payload_bytes
    sent = {int(m.content["config"]["partition-id"]): wire_size(m) for m in fedpm_round["messages"]}
    assert {t.partition_id: t.message_bytes for t in ledger.downlink[1]} == sent
    totals = ledger.round_totals(1)
    assert totals["uplink_message_bytes"] == sum(wire_size(r) for r in fedpm_round["replies"])
    assert totals["downlink_payload_bytes"] == 2 * 4 * fedpm_round["num_params"]


def test_client_uploads_decode_and_aggregate(fedpm_round):
    """The server's strategy accepts both uploads: no failure, new theta of the right shapes."""
    strategy = fedpm_round["strategy"]
    before = {k: v.copy() for k, v in strategy.state.items()}
    arrays, metrics = strategy.aggregate_train(1, fedpm_round["replies"])
    assert strategy.outcome(1).failures == [] and strategy.outcome(1).aggregated == 2
    assert arrays is not None and "train-loss" in metrics
    for name, value in before.items():
        assert strategy.state[name].shape == value.shape
    assert any(not np.array_equal(strategy.state[k], before[k]) for k in before)


# ---------------------------------------------------------------- a failing client


failing_app = ClientApp()


@failing_app.train()
def _explode(msg: Message, context) -> Message:
    raise RuntimeError("boom-from-test-client")


def test_raising_client_becomes_error_reply_with_zero_payload():
    """A ClientApp that raises yields an error reply, recorded with 0 payload bytes."""
    ledger = Ledger()
    grid = MeasuringGrid(InProcessGrid(failing_app, 2), ledger, pull_interval=0.0)
    state = np.ones(10, dtype=np.float32)
    nodes = sorted(grid.get_node_ids())
    message = Message(
        RecordDict({"arrays": ArrayRecord({"theta": Array(state)}),
                    "config": ConfigRecord({"server-round": 3, "partition-id": 1})}),
        dst_node_id=nodes[1], message_type=MessageType.TRAIN, group_id="3",
    )
    replies = list(grid.send_and_receive([message], timeout=10))
    assert len(replies) == 1 and replies[0].has_error()
    assert "boom-from-test-client" in replies[0].error.reason
    [down], [up] = ledger.downlink[3], ledger.uplink[3]
    assert down.payload_bytes == state.nbytes and down.partition_id == 1
    assert up.payload_bytes == 0 and up.partition_id == 1 and up.node_id == nodes[1]
    assert up.message_bytes == wire_size(replies[0]) > 0
