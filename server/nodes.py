"""The connected nodes and the partition each one trains (see :mod:`fedmask.protocol.placement`).

:func:`partition_nodes` waits until ``num-clients`` nodes have joined (or a minute has
passed with at least one), asks each node for its node config with one QUERY message, and
returns the map partition -> node id. The query and its replies go through the grid the
strategy is given, so the ledger weighs them too (as round 0, before any training round).
"""

from __future__ import annotations

import os
import time
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedmask.config import RunConfig
from fedmask.protocol.placement import NODE_RECORD, QUERY_RECORD, place

JOIN_TIMEOUT_S = 60.0  # how long the first round waits for every client node to connect
WARM_UP_TIMEOUT_S = 300.0  # how long a simulation's workers may take to start, before round 1


def wait_for_nodes(grid: Grid, wanted: int, timeout: float = JOIN_TIMEOUT_S) -> list[int]:
    """All connected node ids, sorted, once ``wanted`` have joined or ``timeout`` passed with some."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= wanted or (nodes and time.monotonic() > deadline):
            return nodes
        if time.monotonic() > deadline:
            raise RuntimeError(f"no client node connected within {timeout:.0f} s")
        time.sleep(0.1)


def query_nodes(grid: Grid, nodes: list[int], timeout: float) -> dict[int, dict[str, Any] | None]:
    """What each node reports of its node config (None: no usable answer in time)."""
    messages = [Message(RecordDict({QUERY_RECORD: ConfigRecord({"ask": "partition"})}), dst_node_id=node,
                        message_type=MessageType.QUERY, group_id="0") for node in nodes]
    infos: dict[int, dict[str, Any] | None] = dict.fromkeys(nodes)
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error() or not reply.has_content() or NODE_RECORD not in reply.content.config_records:
            continue
        infos[reply.metadata.src_node_id] = dict(reply.content.config_records[NODE_RECORD])
    return infos


def partition_nodes(grid: Grid, num_clients: int, timeout: float) -> dict[int, int]:
    """partition -> node id for this run (raises PlacementError when the nodes cannot serve every partition)."""
    nodes = wait_for_nodes(grid, num_clients)
    return place(query_nodes(grid, nodes, timeout), num_clients)


def node_placement(grid: Grid, config: RunConfig, deployment: bool) -> dict[int, int]:
    """partition -> node. In a deployment (``flwr run``), from what the nodes report
    (:func:`partition_nodes`); in simulation, by index over the sorted node ids, with no
    query round (10,000 simulated nodes would each cost a message before round 1)."""
    if deployment:
        return partition_nodes(grid, config.num_clients, min(config.round_timeout, 120.0))
    nodes = wait_for_nodes(grid, config.num_clients)
    return {pid: nodes[pid % len(nodes)] for pid in range(config.num_clients)}


def warm_up(grid: Grid, config: RunConfig) -> None:
    """Before round 1 of a simulation on Ray: one query message to each of the first nodes a
    worker serves, answered once the workers have started (Ray's start and every worker's
    imports take 20-40 s on a loaded 2-core machine). Round 1's ``round-timeout`` then counts
    training, as every other round's does, not the engine's start."""
    nodes = wait_for_nodes(grid, config.num_clients)
    workers = max(1, (os.cpu_count() or 1) // max(config.num_cpus, 1))
    query_nodes(grid, nodes[: min(len(nodes), workers)], max(config.round_timeout, WARM_UP_TIMEOUT_S))

