"""The ``ray`` engine: Flower's simulation engine, with a faster message injector.

:func:`run` runs a ServerApp and the ClientApp on Flower's Ray simulation engine (a private
Ray on this machine, or a running Ray cluster). Before it starts, :func:`install` replaces
the engine's message injector:

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


def run(server_app: Any, client_app: Any, num_supernodes: int, num_cpus: int, num_gpus: float,
        ray_address: str | None = None) -> None:
    """Flower's ``run_simulation`` on Ray, with this module's injector (Flower's asks every node every 0.1 s)."""
    import os

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    from flwr.simulation import run_simulation

    from fedmask.console import RUN_SIMULATION_NOTICE, current, flower_notices_hidden, hide_ray_accelerator_tip

    install()
    hide_ray_accelerator_tip()
    current().stage("starting Ray" if not ray_address else f"joining Ray at {ray_address}")
    init_args: dict[str, Any] = {"logging_level": "ERROR", "log_to_driver": True}
    if ray_address:
        init_args["address"] = ray_address
    # run_simulation is deprecated for `flwr run`, kept on purpose (measured: fedmask.console)
    with flower_notices_hidden(RUN_SIMULATION_NOTICE):
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=num_supernodes,
            backend_config={"client_resources": {"num_cpus": num_cpus, "num_gpus": num_gpus}, "init_args": init_args},
        )

