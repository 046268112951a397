"""A faster message injector for Flower's simulation engine (Ray), installed by `fedmask run`.

Flower 1.41's engine (``flwr.server.superlink.fleet.vce.vce_api.add_messages_to_queue``)
asks the LinkState for a waiting message once per simulated node every 0.1 s, and the
in-memory LinkState answers each question by scanning every stored message with a
validity check. That is nodes x messages checks per cycle: at 1,000 nodes and 100
messages a round, about 100,000 checks every 0.1 s, in the thread that shares the
server's process (and its GIL) with the ServerApp. The replacement asks only the nodes
that have an undelivered message (found in one pass over the store) and otherwise does
what Flower's does: ``get_message_ins(node_id, limit=1)`` per node and cycle, nodes in
id order. A LinkState without an in-memory store is asked node by node, as before.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Iterable, Mapping
from queue import Queue
from typing import Any

_FLOWER_PARAMETERS = ["state", "queue", "nodes_mapping", "f_stop"]


def nodes_with_messages(state: Any, nodes: Iterable[int]) -> list[int]:
    """The nodes (of ``nodes``) to ask for a message this cycle, in id order: those with an
    undelivered message in an in-memory LinkState, or every node for any other LinkState."""
    store = getattr(state, "message_ins_store", None)
    lock = getattr(state, "lock", None)
    if not isinstance(store, dict) or lock is None:
        return sorted(nodes)
    with lock:
        waiting = {message.metadata.dst_node_id for message in list(store.values())
                   if message.metadata.delivered_at == ""}
    return sorted(waiting.intersection(nodes))


def inject_once(state: Any, queue: Queue, nodes: Iterable[int]) -> None:
    """One cycle: each node with a message waiting hands over one (Flower's ``limit=1``)."""
    for node_id in nodes_with_messages(state, nodes):
        for message in state.get_message_ins(node_id=node_id, limit=1):
            queue.put(message)


def add_messages_to_queue(state: Any, queue: Queue, nodes_mapping: Mapping[int, Any],
                          f_stop: threading.Event) -> None:
    """Flower's injector loop, asking only the nodes that have a message waiting."""
    while not f_stop.is_set():
        inject_once(state, queue, nodes_mapping.keys())
        f_stop.wait(0.1)


def install() -> bool:
    """Replace Flower's injector when its signature is the one this was written for (Flower
    1.41); otherwise leave Flower's in place. Returns whether it was replaced."""
    from flwr.server.superlink.fleet.vce import vce_api

    current = vce_api.add_messages_to_queue
    if current is add_messages_to_queue:
        return True
    if list(inspect.signature(current).parameters) != _FLOWER_PARAMETERS:
        return False
    vce_api.add_messages_to_queue = add_messages_to_queue
    return True
