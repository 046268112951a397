"""The ``batched`` engine: the in-process grid, with a round's clients trained together.

Messages cross the grid exactly as in :class:`engines.inprocess.InProcessGrid` (each
through Flower's protobuf serde both ways, each reply weighed by the server's ledger),
but the train instructions pushed together are handed to
:func:`clients.batched_client.train_many`, which trains the clients that share a config
and broadcast in one batched computation and replies to each on its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from uuid import uuid4

from flwr.app import Error, Message, MessageType
from flwr.common.constant import ErrorCode

from clients.batched_client import train_many
from engines.inprocess import InProcessGrid, _over_the_wire


class BatchedGrid(InProcessGrid):
    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        train = [m for m in messages if m.metadata.message_type == MessageType.TRAIN]
        others = [m for m in messages if m.metadata.message_type != MessageType.TRAIN]
        ids = list(super().push_messages(others)) if others else []
        delivered = []
        for message in train:
            message.metadata.__dict__["_message_id"] = str(uuid4())
            delivered.append(_over_the_wire(message))
        for message, got, reply in zip(train, delivered, train_many(delivered)):
            if isinstance(reply, Exception):
                reason = f"{type(reply).__name__}: {reply}"
                reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=got)
            reply.metadata.__dict__["_message_id"] = str(uuid4())
            self._replies[message.metadata.message_id] = _over_the_wire(reply)
            ids.append(message.metadata.message_id)
        return ids
