"""The ``batched`` engine: the in-process grid, with a round's clients trained together.

Messages cross the grid exactly as in :class:`engines.inprocess.InProcessGrid` (each
through Flower's protobuf serde both ways, each reply weighed by the server's ledger),
but the train instructions pushed together are handed to
:func:`clients.batched_client.train_many`, which trains the clients that share a config
and broadcast in one batched computation and replies to each on its own. Each node keeps
its own Context, as on the in-process grid, so the lossless downlink works here too.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message, MessageType

from clients.batched_client import train_many
from engines.inprocess import InProcessGrid


class BatchedGrid(InProcessGrid):
    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        train = [m for m in messages if m.metadata.message_type == MessageType.TRAIN]
        others = [m for m in messages if m.metadata.message_type != MessageType.TRAIN]
        ids = list(super().push_messages(others)) if others else []
        delivered = [self.deliver(message) for message in train]
        contexts = [self.contexts[m.metadata.dst_node_id] for m in train]
        for message, got, reply in zip(train, delivered, train_many(delivered, contexts)):
            ids.append(self.answer(message, got, reply))
        return ids
