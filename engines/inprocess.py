"""A Grid that runs the ClientApp in this process: the same messages, no Ray.

Each instruction and each reply goes through Flower's protobuf serde and back before it
is delivered, as it would over the wire, so a client never shares an object with the
server. A ClientApp that raises becomes an error reply, as in Flower's engines. Use it for
fast tests and debugging (``fedmask run --engine inprocess``); it runs one client at a time,
when the instructions are pushed. ``send_and_receive`` honours its timeout as
:class:`fedmask.record.ledger.MeasuringGrid` does: a simulated slow client's reply arrives its
delay after the others, and is lost if that is past the deadline.
"""

from __future__ import annotations

from collections.abc import Iterable
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedmask.record.ledger import Ledger, MeasuringGrid

_RUN_ID = 1


def _over_the_wire(message: Message) -> Message:
    return message_from_proto(message_to_proto(message))


class InProcessGrid(Grid):
    """``num_nodes`` simulated nodes, each with its own persistent Context; their node ids
    are ``first_node_id``, ``first_node_id + 1``, ..."""

    def __init__(self, client_app: ClientApp, num_nodes: int, first_node_id: int = 1001):
        self.client_app = client_app
        self.contexts = {
            node_id: Context(
                run_id=_RUN_ID,
                node_id=node_id,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for i, node_id in enumerate(range(first_node_id, first_node_id + num_nodes))
        }
        self._replies: dict[str, Message] = {}
        # Message() takes the sender's identity from here; the ServerApp is node 0.
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = _RUN_ID, 0, 1

    def set_run(self, run: Run) -> None:
        pass

    @property
    def run(self) -> Run:
        return Run.create_empty(_RUN_ID)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            delivered = self.deliver(message)
            try:
                reply: Message | Exception = self.client_app(delivered, self.contexts[message.metadata.dst_node_id])
            except Exception as err:  # an engine turns any client failure into a reply
                reply = err
            ids.append(self.answer(message, delivered, reply))
        return ids

    @staticmethod
    def deliver(message: Message) -> Message:
        """The message as a client receives it: given its id, through Flower's serde and back."""
        message.metadata.__dict__["_message_id"] = str(uuid4())
        return _over_the_wire(message)

    def answer(self, message: Message, delivered: Message, reply: Message | Exception) -> str:
        """Keep a client's reply (an exception becomes an error reply, as in Flower's engines)
        for the server to pull, through Flower's serde and back; the message's id."""
        if isinstance(reply, Exception):
            reason = f"{type(reply).__name__}: {reply}"
            reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=delivered)
        reply.metadata.__dict__["_message_id"] = str(uuid4())
        self._replies[message.metadata.message_id] = _over_the_wire(reply)
        return message.metadata.message_id

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return MeasuringGrid(self, Ledger()).send_and_receive(messages, timeout=timeout)
