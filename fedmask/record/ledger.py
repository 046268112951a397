"""The bytes ledger: what every message that crossed the grid weighed.

:class:`MeasuringGrid` wraps the Grid a ServerApp is given. Every message it pushes
(downlink) and every reply it pulls (uplink) is weighed twice:

- ``payload``: the bytes of the arrays the message carries (dtype size x element count
  for every Array in every ArrayRecord): for a mask upload, the packed mask and its header.
  It is counted from the bytes that arrived, never from the shape a client declares.
- ``message``: the size of the whole message serialized with Flower's own protobuf
  serde (``message_to_proto(...).ByteSize()``): payload plus the npy framing of each
  array, the config and metric records, and the metadata, with the metadata's ids at
  their widest (see :func:`message_bytes`), so that the figure does not change with the
  random node and message ids of a run.

Nothing is computed from a formula: a message that was not sent is not counted.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.common.serde import message_to_proto, recorddict_to_proto
from flwr.common.serde_utils import error_to_proto, metadata_to_proto
from flwr.proto.recorddict_pb2 import Array as ProtoArray
from flwr.serverapp import Grid

from fedmask.faults import SLOW_RECORD
from fedmask.protocol.replies import arrived_bytes
from fedmask.record.failures import Failure


def payload_bytes(message: Message) -> int:
    """Bytes of the arrays in a message (0 for an error reply).

    Arrays travel in ArrayRecords, except under SecAgg+, whose masked vectors are
    serialized arrays inside ConfigRecords: those bytes count as payload too.
    """
    if not message.has_content():
        return 0
    total = 0
    for record in message.content.config_records.values():
        for value in record.values():
            if isinstance(value, bytes):
                total += len(value)
            elif isinstance(value, list) and value and isinstance(value[0], bytes):
                total += sum(len(v) for v in value)
    for array_record in message.content.array_records.values():
        total += sum(_array_bytes(array) for array in array_record.values())
    return total


def _array_bytes(array: Array) -> int:
    """The bytes that arrived (see :func:`fedmask.protocol.replies.arrived_bytes`): element count x
    dtype size for a well-formed array, every data byte of a malformed one or of legacy
    Parameters (the SecAgg+ path); never a size computed from a declared shape."""
    return arrived_bytes(array)


def record_payload_bytes(message: Message, record_name: str) -> int:
    """Bytes of the arrays of one named ArrayRecord (0 when the message has none)."""
    if not message.has_content() or record_name not in message.content.array_records:
        return 0
    return sum(_array_bytes(array) for array in message.content.array_records[record_name].values())


# Placeholders for the metadata's ids, as wide as the ids can be: a uint64 id as a varint
# takes 1 to 10 bytes (and none at all when 0), depending on its value; a message id is
# Flower's 64-hex-character SHA-256 digest (the in-process grid's uuid4 ids are shorter).
_UINT64_ID_FIELDS = ("run_id", "src_node_id", "dst_node_id")
_OPTIONAL_UINT64_ID_FIELDS = ("src_task_id", "dst_task_id")
_STRING_ID_FIELDS = ("message_id", "reply_to_message_id")
_WIDEST_UINT64 = 2**64 - 1
_MESSAGE_ID_CHARS = 64


def message_bytes(message: Message) -> int:
    """Size of the message as Flower serializes it for the wire, with every id at full width.

    Node, run and task ids are serialized as varints, so the real size varies with their
    (random) values, and so would two runs with one seed. Here the message is weighed
    with each id replaced by a placeholder of the maximum width: uint64 ids by 2**64 - 1
    (10 bytes; a 0 id, which protobuf leaves out, is counted too), message ids (and a
    reply's reply-to id) by 64 characters, or the id's own length if longer. Everything
    else is the message as sent. The figure is thus an upper bound on the serialized size
    that does not depend on the ids, and exceeds it by at most a few tens of bytes.

    The arrays' bytes are not copied into a protobuf to be counted (Flower's serializer
    copies each array several times: about 1.5 ms a megabyte): every other part is
    serialized, and each array's data adds its length-delimited field to the sizes of the
    messages that nest it (:func:`_record_dict_bytes`), exactly as protobuf sizes them.
    """
    try:
        total = _field_bytes(_widened(metadata_to_proto(message.metadata)).ByteSize())
        if message.has_content():
            total += _field_bytes(_record_dict_bytes(message.content))
        if message.has_error():
            total += _field_bytes(error_to_proto(message.error).ByteSize())
        return total
    except Exception:  # a hostile reply that cannot be serialized again
        return payload_bytes(message)


def serialized_bytes(message: Message) -> int:
    """:func:`message_bytes` the slow way: the whole message through Flower's serializer."""
    try:
        proto = message_to_proto(message)
    except Exception:
        return payload_bytes(message)
    _widened(proto.metadata)
    return proto.ByteSize()


def _widened(meta: Any) -> Any:
    """The metadata proto with every id at its widest (see :func:`message_bytes`)."""
    for name in _UINT64_ID_FIELDS:
        setattr(meta, name, _WIDEST_UINT64)
    for name in _OPTIONAL_UINT64_ID_FIELDS:
        if meta.HasField(name):
            setattr(meta, name, _WIDEST_UINT64)
    for name in _STRING_ID_FIELDS:
        if name == "message_id" or getattr(meta, name):  # an instruction has no reply-to id
            setattr(meta, name, "f" * max(_MESSAGE_ID_CHARS, len(getattr(meta, name))))
    return meta


def _field_bytes(size: int) -> int:
    """A length-delimited protobuf field (field number below 16) holding ``size`` bytes: its
    tag, its length as a varint, the bytes."""
    return 1 + max(1, (size.bit_length() + 6) // 7) + size


def _string_bytes(text: str) -> int:
    return _field_bytes(len(text.encode())) if text else 0  # proto3 leaves an empty string out


def _record_dict_bytes(content: RecordDict) -> int:
    """Serialized bytes of a RecordDict: its config and metric records through Flower's
    serializer, its arrays added up (each Array's data: one ``bytes`` field)."""
    plain = RecordDict({key: record for key, record in content.items() if not isinstance(record, ArrayRecord)})
    total = recorddict_to_proto(plain).ByteSize()
    for key, record in content.items():
        if isinstance(record, ArrayRecord):
            items = 0
            for name, array in record.items():
                if not isinstance(array.data, bytes):
                    raise TypeError(f"array data of {type(array.data).__name__}")
                head = ProtoArray(dtype=array.dtype, shape=array.shape, stype=array.stype).ByteSize()
                size = head + (_field_bytes(len(array.data)) if array.data else 0)
                items += _field_bytes(_string_bytes(name) + _field_bytes(size))
            total += _field_bytes(_string_bytes(key) + _field_bytes(items))
    return total


@dataclass
class Transfer:
    """One message's weight, with the client it went to or came from."""

    round: int
    node_id: int
    partition_id: int
    payload_bytes: int
    message_bytes: int
    recycle_bytes: int = 0  # part of payload_bytes: the weight-recycling log


@dataclass
class Ledger:
    """All transfers of a run, by round; filled by :class:`MeasuringGrid`."""

    downlink: dict[int, list[Transfer]] = field(default_factory=lambda: defaultdict(list))
    uplink: dict[int, list[Transfer]] = field(default_factory=lambda: defaultdict(list))
    # message id of a train instruction -> (round, node, partition), to place replies
    sent_to: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    # instructions whose client the simulator dropped: they never get a reply
    dropped: set[str] = field(default_factory=set)

    def partition_of(self, reply: Message) -> int:
        return self.sent_to.get(reply.metadata.reply_to_message_id, (0, 0, -1))[2]

    def unanswered(self, server_round: int, replies: Iterable[Message]) -> list[Failure]:
        """The instructions of a round that got no reply: dropped by the simulator, or late."""
        answered = {r.metadata.reply_to_message_id for r in replies}
        return [
            Failure("dropped", pid, node, "no reply (client dropped)") if msg_id in self.dropped
            else Failure("no-reply", pid, node, "no reply before round-timeout")
            for msg_id, (rnd, node, pid) in self.sent_to.items()
            if rnd == server_round and msg_id not in answered
        ]

    def round_totals(self, server_round: int) -> dict[str, int]:
        up, down = self.uplink[server_round], self.downlink[server_round]
        return {
            "uplink_payload_bytes": sum(t.payload_bytes for t in up),
            "uplink_message_bytes": sum(t.message_bytes for t in up),
            "downlink_payload_bytes": sum(t.payload_bytes for t in down),
            "downlink_message_bytes": sum(t.message_bytes for t in down),
            "downlink_recycle_bytes": sum(t.recycle_bytes for t in down),
        }

    def per_client(self, server_round: int) -> list[dict[str, int]]:
        """Bytes per client (summed over all its messages of the round), by node."""
        rows: dict[int, dict[str, int]] = {}
        for direction, transfers in (("downlink", self.downlink), ("uplink", self.uplink)):
            for t in transfers[server_round]:
                row = rows.setdefault(t.node_id, {"partition_id": -1, "node_id": t.node_id,
                                                  "downlink_payload_bytes": 0, "downlink_message_bytes": 0,
                                                  "uplink_payload_bytes": 0, "uplink_message_bytes": 0})
                row["partition_id"] = max(row["partition_id"], t.partition_id)
                row[f"{direction}_payload_bytes"] += t.payload_bytes
                row[f"{direction}_message_bytes"] += t.message_bytes
        return sorted(rows.values(), key=lambda r: (r["partition_id"], r["node_id"]))

    def clients_heard(self, server_round: int, direction: str = "uplink") -> int:
        transfers = self.uplink if direction == "uplink" else self.downlink
        return len({t.node_id for t in transfers[server_round]})


def _round_and_partition(message: Message) -> tuple[int, int]:
    """From our ConfigRecord, or (SecAgg+ stages, legacy FitIns) the group id and any config."""
    configs = message.content.config_records.values() if message.has_content() else []
    config: Mapping[str, Any] = next((c for c in configs if "partition-id" in c), {})
    server_round = config.get("server-round") or (message.metadata.group_id or "0")
    return int(server_round), int(config.get("partition-id", -1))


def _slow_delay(value: object) -> float:
    """The simulator's delay of a slow reply; anything but a finite number >= 0 counts as none."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        return 0.0
    return float(value)


POLL_PER_SENT_S, POLL_MAX_S = 0.001, 0.1  # POLL_MAX_S: Flower's own InMemoryGrid interval


def poll_interval(sent: int, minimum: float) -> float:
    """Seconds between two pulls in a round that sent ``sent`` instructions: from ``minimum``
    (a small round's last reply is picked up soon) up to Flower's own 0.1 s as the round grows
    (a round of 100 clients waits at most 0.1 s more for its last reply). At 100 clients a
    round on Ray, polling every 0.02 s took 0.3 CPU s a round more than every 0.1 s."""
    return min(POLL_MAX_S, minimum + POLL_PER_SENT_S * sent)


class MeasuringGrid(Grid):
    """A Grid that forwards to another and weighs every message on the way."""

    def __init__(self, inner: Grid, ledger: Ledger, pull_interval: float = 0.02):
        self.inner, self.ledger, self.pull_interval = inner, ledger, pull_interval
        # replies of simulated slow clients, by instruction id: (arrival time, reply)
        self._held: dict[str, tuple[float, Message]] = {}

    def set_run(self, run) -> None:  # Flower's Run
        self.inner.set_run(run)

    @property
    def run(self):
        return self.inner.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        ids = list(self.inner.push_messages(messages))
        for message in messages:  # ids are assigned by the push, so weigh afterwards
            server_round, pid = _round_and_partition(message)
            node = message.metadata.dst_node_id
            self.ledger.sent_to[message.metadata.message_id] = (server_round, node, pid)
            self.ledger.downlink[server_round].append(
                Transfer(server_round, node, pid, payload_bytes(message), message_bytes(message),
                         record_payload_bytes(message, "recycle"))
            )
        return ids

    def _deliver(self, message_ids: Iterable[str]) -> list[Message]:
        """Replies from the inner grid, with those of slow clients (see
        :data:`fedmask.faults.SLOW_RECORD`) held back until ``delay`` seconds after they
        were pulled, their marker removed; then the held replies whose time has come."""
        message_ids = list(message_ids)
        now = time.monotonic()
        ready = []
        # A held reply was already taken from the inner grid: asking Flower's engine for it
        # again returns a "Message Unavailable" error reply in its place.
        for reply in self.inner.pull_messages([i for i in message_ids if i not in self._held]):
            if reply.has_content() and SLOW_RECORD in reply.content.config_records:
                delay = _slow_delay(reply.content.config_records[SLOW_RECORD].get("delay"))
                del reply.content[SLOW_RECORD]
                self._held[reply.metadata.reply_to_message_id] = (now + delay, reply)
            else:
                ready.append(reply)
        for msg_id in message_ids:
            if msg_id in self._held and self._held[msg_id][0] <= now:
                ready.append(self._held.pop(msg_id)[1])
        return ready

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = []
        for reply in self._deliver(message_ids):
            if not reply.has_error() and (not reply.has_content() or len(reply.content) == 0):
                # An empty reply is how the simulator marks a dropped client: it is lost, as
                # if round-timeout had passed, without making every test wait that long.
                self.ledger.dropped.add(reply.metadata.reply_to_message_id)
                continue
            replies.append(reply)
        for reply in replies:
            server_round, node, pid = self.ledger.sent_to.get(
                reply.metadata.reply_to_message_id, (0, reply.metadata.src_node_id, -1)
            )
            self.ledger.uplink[server_round].append(
                Transfer(server_round, node, pid, payload_bytes(reply), message_bytes(reply))
            )
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        pending = set(self.push_messages(messages))
        interval = poll_interval(len(pending), self.pull_interval)
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending and (deadline is None or time.monotonic() < deadline):
            got = list(self.pull_messages(pending))
            replies.extend(got)
            pending -= {r.metadata.reply_to_message_id for r in got} | self.ledger.dropped
            if pending:
                wait = interval if deadline is None else min(interval, deadline - time.monotonic())
                time.sleep(max(wait, 0.0))
        for msg_id in pending:  # past the deadline: a late reply is lost, as on a real network
            self._held.pop(msg_id, None)
        return replies
