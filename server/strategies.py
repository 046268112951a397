"""Flower strategies around the aggregators: sampling, reply checks, failures.

Both strategies extend Flower's ``FedAvg`` from the Message API. They pick the round's
clients with a seeded RNG (Flower's sampler uses unseeded ``random`` and random node ids)
and send each its partition id, so a run is reproducible. ``MaskStrategy`` decodes and
checks every upload before an aggregator sees it; a bad upload is rejected, logged and
recorded, and the round goes on with the others. ``DenseFedAvg`` is Flower's own FedAvg
aggregation, the float32 baseline.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedmask.aggregators import MaskAggregator, Replayable, State
from fedmask.broadcast import CONFIRM, LosslessDownlink
from fedmask.broadcast import RECORD as LOSSLESS_RECORD
from fedmask.codec import MaskCodecError, Prior, code_lengths, decode_masks, mask_prior, planes_to_choices
from fedmask.config import RunConfig
from fedmask.downlink import decode_state, encode_state
from fedmask.failures import Failure
from fedmask.instruction import TrainInstruction
from fedmask.ledger import Ledger
from fedmask.masking import TOPK_MODES
from fedmask.recycling import RECORD, RecycleLog, is_recycle_round, recycle_plan
from fedmask.results import RoundOutcome
from fedmask.sampling import sample_partitions
from fedmask.task import ModelSpec

log = logging.getLogger("fedmask")


class RejectedReply(ValueError):
    """A reply that cannot be used; the message says why."""


def state_record(state: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in state.items()})


def record_state(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def _num_examples(reply: Message) -> float:
    metrics = reply.content.metric_records.get("metrics")
    if metrics is None or "num-examples" not in metrics:
        raise RejectedReply("num-examples: expected a MetricRecord 'metrics' with it, got none")
    value = metrics["num-examples"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise RejectedReply(f"num-examples: expected a positive number, got {value!r}")
    return float(value)


def _check_metrics(reply: Message) -> None:
    for name, record in reply.content.metric_records.items():
        for key, value in record.items():
            values = value if isinstance(value, list) else [value]
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                raise RejectedReply(f"metrics '{name}.{key}': expected finite numbers, got {value!r}")


class SeededFedAvg(FedAvg):
    """FedAvg with reproducible client sampling and a record of every round's outcome."""

    def __init__(self, run_config: RunConfig, ledger: Ledger, mask_mode: str | None):
        super().__init__(fraction_evaluate=0.0, min_available_nodes=1, min_train_nodes=1)
        self.run_config, self.ledger, self.mask_mode = run_config, ledger, mask_mode
        self.outcomes: dict[int, RoundOutcome] = {}
        self.round_offset = 0  # rounds already done before a resume
        self.state: dict[str, np.ndarray] = {}
        self._nodes: list[int] | None = None

    def outcome(self, server_round: int) -> RoundOutcome:
        return self.outcomes.setdefault(server_round, RoundOutcome())

    def records(self) -> dict[str, Any]:
        """What a checkpoint keeps of the strategy (JSON-able)."""
        return {"outcomes": {r: o.to_dict() for r, o in self.outcomes.items()}}

    def load_records(self, records: dict[str, Any]) -> None:
        self.outcomes = {int(r): RoundOutcome(**o) for r, o in records.get("outcomes", {}).items()}

    def _node_ids(self, grid: Grid) -> list[int]:
        """All nodes, sorted; waits (once) until every simulated client has joined."""
        if self._nodes is None:
            deadline = time.monotonic() + 60.0
            while True:
                nodes = sorted(grid.get_node_ids())
                if len(nodes) >= self.run_config.num_clients or (nodes and time.monotonic() > deadline):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError("no client node connected within 60 s")
                time.sleep(0.1)
            self._nodes = nodes
        return self._nodes

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        nodes = self._node_ids(grid)
        messages = []
        cfg = self.run_config
        for pid in sample_partitions(cfg.seed, cfg.num_clients, cfg.clients_per_round, server_round):
            instruction = ConfigRecord(TrainInstruction(cfg, server_round, pid, self.mask_mode).to_flat())
            messages.append(
                Message(
                    RecordDict({"arrays": arrays, "config": instruction}),
                    dst_node_id=nodes[pid % len(nodes)],
                    message_type=MessageType.TRAIN,
                    group_id=str(server_round),
                )
            )
        return messages

    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:  # noqa: ANN001
        return []  # the server evaluates the global model itself

    def record_failure(self, server_round: int, failure: Failure) -> None:
        log.warning("round %d: client %d %s: %s", server_round, failure.partition_id, failure.kind, failure.reason)
        self.outcome(server_round).add_failure(failure)

    def reject(self, server_round: int, reply: Message, reason: str) -> None:
        """Record a reply that arrived but cannot be used."""
        self.record_failure(server_round, Failure("rejected", self.ledger.partition_of(reply),
                                                  reply.metadata.src_node_id, reason))

    def usable_replies(self, server_round: int, replies: Iterable[Message]) -> list[tuple[Message, float]]:
        """Replies with content and a valid weight; every other one is recorded."""
        replies = list(replies)
        for failure in self.ledger.unanswered(server_round, replies):
            self.record_failure(server_round, failure)
        usable = []
        # Replies arrive in whatever order clients finish; sorting by partition makes the
        # floating-point sums of aggregation, and so the run, independent of timing.
        for reply in sorted(replies, key=self.ledger.partition_of):
            pid, node = self.ledger.partition_of(reply), reply.metadata.src_node_id
            if reply.has_error():
                self.record_failure(server_round, Failure("client-error", pid, node, reply.error.reason or ""))
                continue
            try:
                _check_metrics(reply)
                usable.append((reply, _num_examples(reply)))
            except RejectedReply as err:
                self.reject(server_round, reply, str(err))
        return usable

    def too_few(self, server_round: int, usable: int) -> bool:
        """Below min-clients the round is skipped and the global state kept; says why."""
        needed = self.run_config.min_clients
        if usable >= needed:
            return False
        reason = f"{usable} usable upload(s), min-clients is {needed}: round skipped, global state unchanged"
        log.warning("round %d: %s", server_round, reason)
        self.outcome(server_round).skipped = reason
        return True

    def finish_round(self, server_round: int, usable: list[tuple[Message, float]]) -> MetricRecord:
        """Record how many uploads went in and their train metrics; returns the metrics."""
        metrics = self.train_metrics(usable)
        outcome = self.outcome(server_round)
        outcome.aggregated = len(usable)
        outcome.train = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        return metrics

    def train_metrics(self, usable: list[tuple[Message, float]]) -> MetricRecord:
        """Example-weighted mean of the clients' finite train metrics."""
        total = sum(w for _, w in usable)
        sums: dict[str, float] = {}
        for reply, weight in usable:
            for key, value in reply.content.metric_records["metrics"].items():
                if key != "num-examples" and isinstance(value, (int, float)) and math.isfinite(value):
                    sums[key] = sums.get(key, 0.0) + weight * float(value)
        return MetricRecord({k: v / total for k, v in sums.items()})


class DenseFedAvg(SeededFedAvg):
    """The dense float32 baseline: Flower's FedAvg aggregation on checked replies."""

    def __init__(self, run_config: RunConfig, ledger: Ledger, reference: dict[str, np.ndarray]):
        super().__init__(run_config, ledger, mask_mode=None)
        self.reference = {k: (v.shape, v.dtype) for k, v in reference.items()}
        self.state = reference

    def _check_weights(self, reply: Message) -> None:
        record = reply.content.array_records.get("arrays")
        if record is None:
            raise RejectedReply("arrays: expected an ArrayRecord 'arrays', got none")
        got = {k: (tuple(a.shape), np.dtype(a.dtype)) for k, a in record.items()}
        if got != self.reference:
            raise RejectedReply("arrays: expected the model's tensors and shapes, got others")
        if not all(np.isfinite(a.numpy()).all() for a in record.values()):
            raise RejectedReply("arrays: expected finite values, got NaN or inf")

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):  # noqa: ANN201
        server_round += self.round_offset
        good = []
        for reply, weight in self.usable_replies(server_round, replies):
            try:
                self._check_weights(reply)
                good.append((reply, weight))
            except RejectedReply as err:
                self.reject(server_round, reply, str(err))
        if self.too_few(server_round, len(good)):
            return None, None
        arrays, _ = super().aggregate_train(server_round, [reply for reply, _ in good])
        if arrays is None:
            return None, None
        self.state = record_state(arrays)
        return arrays, self.finish_round(server_round, good)


class MaskStrategy(SeededFedAvg):
    """Masks up, global state down; the maths lives in a :class:`MaskAggregator`."""

    def __init__(
        self,
        run_config: RunConfig,
        ledger: Ledger,
        aggregator: MaskAggregator,
        spec: ModelSpec,
        initial_state: State,
    ):
        super().__init__(run_config, ledger, aggregator.mask_mode)
        self.aggregator, self.spec, self.state = aggregator, spec, initial_state
        if run_config.recycle_every and aggregator.mask_mode not in TOPK_MODES:
            raise ValueError(f"recycle-every: weight recycling needs a top-k mask method (edge-popup, "
                             f"biprop); {run_config['method']!r} trains {aggregator.mask_mode!r} masks")
        self.recycle_log = RecycleLog()
        self.prior: Prior | None = None
        self._coded: tuple[State, dict[str, np.ndarray], State] | None = None
        self.lossless: LosslessDownlink | None = None
        if run_config.downlink_codec == "lossless":
            self.resumed(0)

    def resumed(self, version: int) -> None:
        """(Re)start the lossless downlink's history at the current state, made by round ``version``
        (0: the seed's initial state, which clients can regenerate)."""
        if self.run_config.downlink_codec == "lossless":
            self.lossless = LosslessDownlink.create(self.aggregator, self.spec.layout, self.spec.fingerprint,
                                                    self.aggregator.mask_mode, self.run_config.density,
                                                    self.state, version)

    def _broadcast(self) -> tuple[dict[str, np.ndarray], State]:
        """The coded broadcast of the current state and what clients decode from it.

        Evaluation after a round and the next round's broadcast need the same pair, so it
        is computed once per state.
        """
        if self._coded is None or self._coded[0] is not self.state:
            if self.lossless is not None:  # per node (see configure_train); clients end with the exact state
                exact = {name: np.asarray(value, dtype=np.float32) for name, value in self.state.items()}
                self._coded = (self.state, {}, exact)
                return {}, exact
            encoded = encode_state(self.state, self.spec.layout, self.run_config.downlink_codec,
                                   self.run_config.downlink_bits)
            self._coded = (self.state, encoded, decode_state(encoded, self.spec.layout))
        return self._coded[1], self._coded[2]

    def deployed(self) -> State:
        """The current state as clients hold it after the downlink codec (what they train from)."""
        return self._broadcast()[1]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        encoded, broadcast = self._broadcast()
        self.prior = mask_prior(broadcast, self.aggregator.mask_mode, self.run_config.density)
        messages = list(super().configure_train(server_round, state_record(encoded), config, grid))
        if self.lossless is not None:
            self._lossless_messages(server_round + self.round_offset, messages)
        if self.run_config.recycle_every:
            record = self.recycle_log.to_record()
            for message in messages:
                message.content[RECORD] = record
        return messages

    def _lossless_messages(self, server_round: int, messages: list[Message]) -> None:
        """Each node's broadcast: the shortest one it can turn into the current state."""
        assert self.lossless is not None
        kinds: dict[str, int] = {}
        for message in messages:
            blob, kind = self.lossless.message_for(message.metadata.dst_node_id, self.state)
            message.content["arrays"] = ArrayRecord({LOSSLESS_RECORD: Array(blob)})
            kinds[kind] = kinds.get(kind, 0) + 1
        self.lossless.sent([m.metadata.dst_node_id for m in messages])
        self.outcome(server_round).broadcasts = kinds

    def _confirmations(self, replies: list[Message]) -> None:
        """What each node that answered now holds (lossless downlink); nodes that did not are forgotten."""
        assert self.lossless is not None
        for reply in replies:
            node = self.ledger.sent_to.get(reply.metadata.reply_to_message_id, (0, reply.metadata.src_node_id, -1))[1]
            record = reply.content.config_records.get(CONFIRM) if reply.has_content() else None
            if record is not None:
                self.lossless.confirm(node, record.get("version"), record.get("digest"))
        self.lossless.end_round()

    def decode(self, reply: Message) -> dict[str, np.ndarray]:
        """The upload's binary tensors (masks, or Slot Machines' bit-planes), checked."""
        record = reply.content.array_records.get("arrays")
        if record is None or list(record.keys()) != ["mask"]:
            keys = None if record is None else list(record.keys())
            raise RejectedReply(f"arrays: expected one Array 'mask', got {keys}")
        return decode_masks(record["mask"].numpy(), self.spec.upload, self.spec.fingerprint, self.prior)

    def votes_of(self, bits: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """What the aggregator gets: the masks, or the slot indices the planes spell."""
        if self.aggregator.mask_mode == "slots":
            return planes_to_choices(bits, self.spec.layout)
        return bits

    def _measure_code(self, server_round: int, masks: dict[str, np.ndarray]) -> None:
        """Ideal code length under the uplink model, and FedPM's formula, for this mask."""
        lengths = code_lengths(masks, self.spec.upload, self.run_config.uplink_codec, self.prior)
        outcome = self.outcome(server_round)
        if outcome.code_lengths is None:
            outcome.code_lengths = {"ideal_bits": 0.0, "formula_bits": 0.0}
        totals = outcome.code_lengths
        for key, value in lengths.items():
            totals[key] += value

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):  # noqa: ANN201
        server_round += self.round_offset
        replies = list(replies)
        if self.lossless is not None:
            self._confirmations(replies)
        masks, weights, usable = [], [], []
        for reply, weight in self.usable_replies(server_round, replies):
            try:
                bits = self.decode(reply)
                masks.append(self.votes_of(bits))
                self._measure_code(server_round, bits)
            except (MaskCodecError, RejectedReply) as err:
                self.reject(server_round, reply, str(err))
                continue
            weights.append(weight)
            usable.append((reply, weight))
        if self.too_few(server_round, len(masks)):
            return None, None
        if self.lossless is not None and isinstance(self.aggregator, Replayable) and self.lossless.can_replay:
            votes, clients = self.aggregator.round_votes(server_round, self.state, masks, weights)
            new_state = self.aggregator.apply(server_round, self.state, votes, clients)
            self._check_state(new_state)
            self.lossless.record(server_round, self.state, new_state, votes, clients, self.aggregator.replay)
        else:
            new_state = self.aggregator.aggregate(server_round, self.state, masks, weights)
            self._check_state(new_state)
            if self.lossless is not None:  # a plug-in: full states only
                self.lossless.record(server_round, self.state, new_state)
        self.state = new_state
        if is_recycle_round(self.run_config, server_round):
            # from the state as clients decode it, so that any of them could derive it too
            plan = recycle_plan(self.deployed(), self.run_config.recycle_fraction)
            self.recycle_log.add(server_round, plan, self.spec.layout, self.spec.fingerprint)
        return state_record(new_state), self.finish_round(server_round, usable)

    def _check_state(self, new_state: State) -> None:
        """An aggregator (maybe a plug-in) must keep the state's names and shapes."""
        for name, value in self.state.items():
            got = new_state.get(name)
            if got is None or got.shape != value.shape:
                raise ValueError(
                    f"{type(self.aggregator).__name__}.aggregate returned a state without "
                    f"'{name}' of shape {value.shape}"
                )
            if not np.isfinite(got).all():
                raise ValueError(f"{type(self.aggregator).__name__}.aggregate returned NaN/inf in '{name}'")
