"""Which node trains which partition: the node's own data first, the message's otherwise.

In a deployment each SuperNode holds its own data and says which partition it is with
``flower-supernode --node-config "partition-id=K num-partitions=N"``. A node whose
``num-partitions`` equals the run's ``num-clients`` *holds* partition K: it trains on K
whatever the message says. Any other node (no node config, or a node config made for
another number of clients, e.g. a simulation with more SuperNodes than clients) trains on
the partition its instruction names.

The ServerApp cannot read SuperNodes' node configs, so before the first round it asks
every node (a QUERY message, answered by :func:`node_info`) and builds the map
partition -> node with :func:`place`: a held partition goes to its holder, every other
partition to the free nodes in turn (sorted by node id, as before node configs). Each
reply names the partition it trained on (:data:`TRAINED_RECORD`); the server refuses a
reply whose partition is not the one it sent, so what the ledger records is what was
trained.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

log = logging.getLogger("fedmask")

NODE_RECORD = "fedmask-node"  # ConfigRecord of a query reply: the node's partition-id / num-partitions
TRAINED_RECORD = "fedmask-trained"  # ConfigRecord of a train reply: {"partition-id": the partition trained on}
QUERY_RECORD = "fedmask-query"  # ConfigRecord of the server's query


class PlacementError(RuntimeError):
    """The connected nodes cannot serve every partition; the message says which are missing."""


def node_info(node_config: Mapping[str, Any]) -> dict[str, Any]:
    """What a node reports of its node config: ``partition-id`` and ``num-partitions`` when set as integers."""
    return {key: int(node_config[key]) for key in ("partition-id", "num-partitions")
            if isinstance(node_config.get(key), int) and not isinstance(node_config.get(key), bool)}


def held_partition(info: Mapping[str, Any], num_clients: int) -> int | None:
    """The partition a node holds in a run of ``num_clients`` partitions, or None (it trains what it is sent)."""
    pid, parts = info.get("partition-id"), info.get("num-partitions")
    if not isinstance(pid, int) or isinstance(pid, bool) or parts != num_clients:
        return None
    return pid if 0 <= pid < num_clients else None


def place(infos: Mapping[int, Mapping[str, Any] | None], num_clients: int) -> dict[int, int]:
    """partition -> node id for partitions 0..num_clients-1.

    ``infos`` maps every connected node to what it reported (None: no answer). A node that
    holds a partition gets that partition; a second holder of the same partition gets
    nothing (warned); every partition nobody holds goes to the free nodes round-robin.
    Raises :class:`PlacementError` when partitions are left and no node is free.
    """
    holders: dict[int, int] = {}
    free: list[int] = []
    for node in sorted(infos):
        info = infos[node] or {}
        pid = held_partition(info, num_clients)
        if pid is None:
            if "partition-id" in info:
                log.warning("node %d has partition-id=%s num-partitions=%s, but num-clients is %d: it trains "
                            "the partitions it is sent", node, info.get("partition-id"),
                            info.get("num-partitions"), num_clients)
            free.append(node)
        elif pid in holders:
            log.warning("node %d and node %d both hold partition %d; node %d gets no work",
                        holders[pid], node, pid, node)
        else:
            holders[pid] = node
    missing = [pid for pid in range(num_clients) if pid not in holders]
    if missing and not free:
        shown = ", ".join(str(p) for p in missing[:20]) + (" ..." if len(missing) > 20 else "")
        raise PlacementError(
            f"partition(s) {shown} of num-clients={num_clients} are held by no connected node, and every "
            f"node holds its own partition: start a SuperNode with --node-config 'partition-id=K "
            f"num-partitions={num_clients}' for each, or lower num-clients")
    placement = dict(holders)
    for i, pid in enumerate(missing):
        placement[pid] = free[i % len(free)]
    return placement
