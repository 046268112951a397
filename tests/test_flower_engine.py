"""fedmask's message injector for Flower's simulation engine (engines/ray.py)."""

from __future__ import annotations

import threading
from queue import Queue
from types import SimpleNamespace

from engines import ray as flower_engine


class _State:
    """An in-memory LinkState's surface: a message store, its lock, and get_message_ins,
    which records which nodes it was asked for."""

    def __init__(self, destinations: list[int], delivered: set[int] = frozenset()):
        self.lock = threading.RLock()
        self.message_ins_store = {
            f"m{i}": SimpleNamespace(metadata=SimpleNamespace(dst_node_id=node,
                                                              delivered_at="then" if i in delivered else ""))
            for i, node in enumerate(destinations)}
        self.asked: list[int] = []

    def get_message_ins(self, node_id: int, limit: int | None) -> list:
        self.asked.append(node_id)
        found = [m for m in self.message_ins_store.values()
                 if m.metadata.dst_node_id == node_id and m.metadata.delivered_at == ""][:limit]
        for message in found:
            message.metadata.delivered_at = "now"
        return found


def _one_cycle(state, nodes) -> tuple[list, list[int]]:
    """One injector cycle: what it queued, and whom it asked."""
    queue: Queue = Queue()
    flower_engine.inject_once(state, queue, nodes)
    return [queue.get_nowait() for _ in range(queue.qsize())], list(getattr(state, "asked", []))


def test_the_loop_stops_when_flower_says_so():
    """Flower stops its injector by setting the event: the loop ends within its 0.1 s wait."""
    stop = threading.Event()
    thread = threading.Thread(target=flower_engine.add_messages_to_queue, args=(_State([1]), Queue(), {1: None}, stop))
    thread.start()
    stop.set()
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_only_nodes_with_an_undelivered_message_are_asked_in_id_order():
    """10,000 nodes, three messages waiting (one for a node outside the mapping, one already
    delivered): the injector asks nodes 7 and 42 only, in that order, and queues their messages."""
    state = _State([42, 7, 99_999, 5], delivered={3})
    nodes = {node: None for node in range(10_000)}
    queued, asked = _one_cycle(state, nodes)
    assert asked == [7, 42]
    assert sorted(m.metadata.dst_node_id for m in queued) == [7, 42]


def test_a_linkstate_without_an_in_memory_store_is_asked_node_by_node():
    """Any other LinkState gets Flower's behaviour: every node, once per cycle."""
    class Other:
        def __init__(self):
            self.asked = []

        def get_message_ins(self, node_id, limit):
            self.asked.append(node_id)
            return []

    _, asked = _one_cycle(Other(), {3: None, 1: None, 2: None})
    assert asked == [1, 2, 3]


def test_install_replaces_flowers_injector_on_this_flower():
    """The installed Flower has the injector signature this was written for, so the
    replacement is active (a Flower upgrade that changes it makes this fail)."""
    from flwr.server.superlink.fleet.vce import vce_api

    original = vce_api.add_messages_to_queue
    try:
        assert flower_engine.install() is True
        assert vce_api.add_messages_to_queue is flower_engine.add_messages_to_queue
    finally:
        vce_api.add_messages_to_queue = original
