"""Tests for fedmask.record.ledger: message weights, and a real round through MeasuringGrid."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.common.serde import message_to_proto
from flwr.supercore.task_identity import TaskIdentity

from clients.client_app import app as client_app
from engines.inprocess import InProcessGrid
from fedmask import task
from fedmask.config import resolve
from fedmask.core.masking import get_scores
from fedmask.core.models import build_model
from fedmask.core.sampling import sample_partitions
from fedmask.faults import SLOW_RECORD
from fedmask.methods.fedpm import FedPMAggregator
from fedmask.record.failures import Failure
from fedmask.record.ledger import Ledger, MeasuringGrid, message_bytes, payload_bytes
from server.strategies import MaskStrategy, Start, state_record

HEADER_BYTES = 4 + 1 + 1 + 2 + 8 + 8 + 4  # codec header, from its format spec


def wire_size(message: Message) -> int:
    return len(message_to_proto(message).SerializeToString())


# message_bytes counts the ids at full width: at most 5 uint64 ids of 1 + 10 bytes and
# 2 message ids of 2 + 64 bytes more than the message as serialized (see ledger).
ID_SLACK = 5 * 11 + 2 * 66


def weighs_about(measured: int, message: Message) -> bool:
    """``measured`` is the message's size with ids at full width: >= the real size, by at most the ids."""
    return wire_size(message) <= measured <= wire_size(message) + ID_SLACK


@pytest.fixture
def identity(monkeypatch):
    """Flower's Message() needs the sending task's identity."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


# ---------------------------------------------------------------- weighing one message


def test_payload_and_message_bytes_of_a_hand_built_message(identity):
    """payload = sum of the arrays' nbytes; message = serialized size (ids at full width),
    larger than payload."""
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
    assert weighs_about(message_bytes(message), message)
    assert message_bytes(message) > payload_bytes(message) + 100  # config string is not payload


def _varied_messages() -> list[Message]:
    """Instructions and replies of every shape a run sends: arrays of every size class (a
    length varint of 1 to 4 bytes), empty arrays, empty keys and records, several records,
    config and metric records only, an error reply, a reply with ids of its own."""
    rng = np.random.default_rng(0)
    records = [
        {"arrays": ArrayRecord({"w": Array(rng.random((300, 784), dtype=np.float32)),
                                "b": Array(np.zeros(0, np.float32))}),
         "config": ConfigRecord({"r": 3, "s": "x" * 300})},
        {"a": ArrayRecord({"": Array(np.arange(5, dtype=np.int64))}), "": ArrayRecord({}),
         "m": MetricRecord({"loss": 0.25, "acc": [0.5, 0.75]})},
        {"big": ArrayRecord({"x": Array(np.zeros(3_000_000, np.uint8)), "y": Array(np.ones((2, 3, 4), np.float64))}),
         "lossless": ArrayRecord({"lossless": Array(rng.integers(0, 256, 140_000).astype(np.uint8))})},
        {"c": ConfigRecord({"only": b"bytes" * 40, "list": [b"a", b"bc"]})},
        {},
    ]
    messages = [Message(RecordDict(r), dst_node_id=5 + i, message_type=MessageType.TRAIN, group_id=str(i))
                for i, r in enumerate(records)]
    instruction = messages[0]
    instruction.metadata.__dict__["_message_id"] = "m" * 80
    messages.append(Message(RecordDict(records[1]), reply_to=instruction))
    messages.append(Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "boom " * 30), reply_to=instruction))
    return messages


def test_message_bytes_without_serializing_the_arrays_equal_flowers_serialized_size(identity):
    """message_bytes adds the arrays' fields up instead of copying them into a protobuf:
    for every kind of message it gives the size Flower's serializer gives (ids widened)."""
    from fedmask.record.ledger import serialized_bytes

    for message in _varied_messages():
        assert message_bytes(message) == serialized_bytes(message), message.content if message.has_content() else ""
        assert weighs_about(message_bytes(message), message)


def test_message_without_arrays_has_zero_payload(identity):
    """Config and metric records are not payload."""
    message = Message(RecordDict({"config": ConfigRecord({"a": 1}), "metrics": MetricRecord({"b": 2.0})}),
                      dst_node_id=5, message_type=MessageType.TRAIN, group_id="1")
    assert payload_bytes(message) == 0
    assert weighs_about(message_bytes(message), message) and wire_size(message) > 0


def _message_pair(identity_ids: tuple[int, str, int, str]) -> tuple[Message, Message]:
    """An instruction and its reply, with the given dst node, message id, reply src node
    and reply message id; everything else fixed."""
    dst, msg_id, src, reply_id = identity_ids
    content = RecordDict({"arrays": ArrayRecord({"w": Array(np.arange(10, dtype=np.float32))}),
                          "config": ConfigRecord({"server-round": 1, "partition-id": 0})})
    instruction = Message(content, dst_node_id=dst, message_type=MessageType.TRAIN, group_id="1")
    instruction.metadata.__dict__["_message_id"] = msg_id
    instruction.metadata.__dict__["_created_at"] = 1.5
    reply = Message(RecordDict({"metrics": MetricRecord({"num-examples": 3})}), reply_to=instruction)
    reply.metadata.__dict__["_src_node_id"] = src
    reply.metadata.__dict__["_message_id"] = reply_id
    reply.metadata.__dict__["_created_at"] = 2.5
    return instruction, reply


def test_message_bytes_do_not_depend_on_node_or_message_ids(identity):
    """Messages identical but for node ids and message ids (any width, 0 included) weigh
    the same, although their serialized sizes differ."""
    small = _message_pair((0, "b", 1, "a"))
    large = _message_pair((2**63 + 12345, "e" * 64, 2**62, "d" * 64))
    uuid = _message_pair((1001, "0f8a4a4c-9a1b-4bde-8f8c-3f2f3f4e5a6b", 1001, "7" * 36))
    for one, two, three in zip(small, large, uuid):
        assert wire_size(one) != wire_size(two)
        assert message_bytes(one) == message_bytes(two) == message_bytes(three)


def test_message_bytes_are_an_upper_bound_on_the_serialized_size(identity):
    """The id-independent figure is never below the real size, and above it only by the
    ids' widths (at most 5 uint64 ids of 11 bytes and 2 string ids of 66)."""
    for ids in ((0, "", 1, "a"), (5, "x" * 36, 7, "y" * 36), (2**64 - 1, "e" * 64, 2**64 - 1, "d" * 64)):
        for message in _message_pair(ids):
            assert wire_size(message) <= message_bytes(message) <= wire_size(message) + 5 * 11 + 2 * 66


# ---------------------------------------------------------------- a real round


@pytest.fixture(scope="module")
def fedpm_round():
    """One FedPM round for 2 of 3 clients through MeasuringGrid(InProcessGrid(client app))."""
    config = resolve({"num-clients": 3, "clients-per-round": 2, "num-rounds": 1, "uplink-codec": "packbits",
                      "downlink-codec": "float32"})  # a broadcast of known size
    splits = task.splits_of(config)
    aggregator = FedPMAggregator.from_config(config)
    mode = task.mode_of(config, aggregator.mask_mode)
    model = task.make_model(config, splits, mode)
    initial = aggregator.initial_state(get_scores(model))
    ledger = Ledger()
    grid = MeasuringGrid(InProcessGrid(client_app, config.num_clients), ledger, pull_interval=0.0)
    strategy = MaskStrategy(config, ledger, Start(initial), aggregator, mode, task.ModelSpec.of(config, model, mode))
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
    assert set(ledger.downlink) == set(ledger.uplink) == {1}  # simulation: no placement query round
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


def test_recorded_message_bytes_are_the_sizes_of_the_messages_sent_and_replies_got(fedpm_round):
    """Recorded message bytes are message_bytes of the messages sent and replies got: their
    serialized sizes with ids at full width."""
    ledger = fedpm_round["ledger"]
    by_partition = {t.partition_id: t for t in ledger.uplink[1]}
    for reply in fedpm_round["replies"]:
        recorded = by_partition[ledger.partition_of(reply)].message_bytes
        assert recorded == message_bytes(reply) and weighs_about(recorded, reply)
        assert wire_size(reply) > by_partition[ledger.partition_of(reply)].payload_bytes
    sent = {int(m.content["config"]["partition-id"]): message_bytes(m) for m in fedpm_round["messages"]}
    assert {t.partition_id: t.message_bytes for t in ledger.downlink[1]} == sent
    assert all(weighs_about(message_bytes(m), m) for m in fedpm_round["messages"])
    totals = ledger.round_totals(1)
    assert totals["uplink_message_bytes"] == sum(message_bytes(r) for r in fedpm_round["replies"])
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
    assert up.message_bytes == message_bytes(replies[0]) and weighs_about(up.message_bytes, replies[0])


# ---------------------------------------------------------------- a late client


def _late_app(delay: float) -> ClientApp:
    """A ClientApp that answers at once, marked as delivered ``delay`` seconds late."""
    app = ClientApp()

    @app.train()
    def _late(msg: Message, context) -> Message:
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1}),
                                   SLOW_RECORD: ConfigRecord({"delay": delay})}), reply_to=msg)

    return app


def _instruction(grid) -> Message:
    return Message(RecordDict({"config": ConfigRecord({"server-round": 1, "partition-id": 0})}),
                   dst_node_id=sorted(grid.get_node_ids())[0], message_type=MessageType.TRAIN, group_id="1")


@pytest.mark.parametrize("measured", [False, True])
def test_reply_held_past_the_timeout_is_lost_at_the_deadline(measured):
    """A reply due 30 s late against a 0.3 s timeout: send_and_receive (in-process, and
    through MeasuringGrid) returns without it after ~0.3 s; the ledger calls it no reply."""
    ledger = Ledger()
    grid = InProcessGrid(_late_app(30.0), 1)
    grid = MeasuringGrid(grid, ledger) if measured else grid
    start = time.monotonic()
    assert list(grid.send_and_receive([_instruction(grid)], timeout=0.3)) == []
    assert 0.3 <= time.monotonic() - start < 5
    if measured:
        assert ledger.unanswered(1, []) == [Failure("no-reply", 0, 1001, "no reply before round-timeout")]
        assert not ledger.uplink[1]


def test_reply_late_within_the_timeout_arrives_without_its_marker_and_is_weighed_so():
    """A reply due 0.2 s late against a 5 s timeout arrives after ~0.2 s, without the
    slow-client marker, and the ledger weighs it as delivered."""
    ledger = Ledger()
    grid = MeasuringGrid(InProcessGrid(_late_app(0.2), 1), ledger)
    start = time.monotonic()
    [reply] = grid.send_and_receive([_instruction(grid)], timeout=5.0)
    assert 0.2 <= time.monotonic() - start < 4
    assert SLOW_RECORD not in reply.content.config_records
    assert ledger.uplink[1][0].message_bytes == message_bytes(reply)


class _FlowerLikeGrid(InProcessGrid):
    """An in-process grid that, like Flower's simulation engine, answers a second pull of a
    reply already taken with an error reply ("Message Unavailable")."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.taken: dict[str, Message] = {}

    def pull_messages(self, message_ids):
        ids = list(message_ids)
        out = []
        for msg_id in ids:
            if msg_id in self.taken:
                error = Message(Error(ErrorCode.MESSAGE_UNAVAILABLE, "Message Unavailable"),
                                reply_to=self.taken[msg_id])
                error.metadata.__dict__["_reply_to_message_id"] = msg_id  # a reply to the instruction
                out.append(error)
        for reply in super().pull_messages(ids):
            self.taken[reply.metadata.reply_to_message_id] = reply
            out.append(reply)
        return out


def test_held_reply_is_not_pulled_again_from_the_engine():
    """A slow reply held by MeasuringGrid is not asked for again: the engine's error reply
    for a taken message never reaches the strategy; the reply arrives after its delay."""
    ledger = Ledger()
    grid = MeasuringGrid(_FlowerLikeGrid(_late_app(0.3), 1), ledger)
    replies = list(grid.send_and_receive([_instruction(grid)], timeout=5.0))
    assert len(replies) == 1 and not replies[0].has_error()


def test_polling_slows_with_the_round_size_up_to_flowers_interval():
    """A round of 100 clients is not polled 50 times a second; a small round still gets its
    last reply soon; no round waits longer between pulls than Flower's own 0.1 s."""
    from fedmask.record.ledger import POLL_MAX_S, poll_interval

    waits = [poll_interval(n, 0.02) for n in (1, 10, 50, 100, 1000)]
    assert waits == sorted(waits) and waits[0] == pytest.approx(0.021) and waits[-1] == POLL_MAX_S == 0.1
    assert poll_interval(100, 0.02) >= 5 * 0.02 > poll_interval(2, 0.02)
