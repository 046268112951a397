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
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedmask import laperm
from fedmask.aggregators import FedPMAggregator, MaskAggregator, Replayable, State, dense_aggregate
from fedmask.broadcast import CONFIRM, LosslessDownlink
from fedmask.broadcast import RECORD as LOSSLESS_RECORD
from fedmask.codec import MaskCodecError, MaskLayout, Prior, code_lengths, decode_masks, mask_prior, planes_to_choices
from fedmask.compression import CompressionError, aggregate_updates, decompress
from fedmask.config import RunConfig
from fedmask.diagnostics import DriftTally, Masks, global_mask, mask_of_prior, round_diagnostics
from fedmask.downlink import decode_state, encode_state
from fedmask.failures import Failure
from fedmask.instruction import TrainInstruction
from fedmask.ledger import Ledger
from fedmask.masking import TOPK_MODES
from fedmask.placement import TRAINED_RECORD
from fedmask.recycling import RECORD, RecycleLog, is_recycle_round, recycle_plan
from fedmask.replies import BadArray, checked_numpy
from fedmask.results import RoundOutcome
from fedmask.sampling import sample_partitions
from fedmask.task import ModelSpec
from server.nodes import node_placement

log = logging.getLogger("fedmask")


class RejectedReply(ValueError):
    """A reply that cannot be used; the message says why."""


def state_record(state: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in state.items()})


def record_state(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def reply_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """A reply's arrays, each checked (:func:`fedmask.replies.checked_numpy`); RejectedReply
    names the first bad one."""
    arrays = {}
    for name, array in record.items():
        try:
            arrays[name] = checked_numpy(array)
        except BadArray as err:
            raise RejectedReply(f"arrays '{str(name)[:40]}': {err}") from None
    return arrays


# A client's weight when the server does not know its partition's size: beyond 2**53 a
# float no longer holds every integer, and no partition is that large.
MAX_CLIENT_WEIGHT = float(2**53)


def _num_examples(reply: Message, most: int | None = None) -> float:
    """The reply's ``num-examples``: a positive number, at most ``most`` (the partition's
    size, when the server knows it) or :data:`MAX_CLIENT_WEIGHT`."""
    metrics = reply.content.metric_records.get("metrics")
    if metrics is None or "num-examples" not in metrics:
        raise RejectedReply("num-examples: expected a MetricRecord 'metrics' with it, got none")
    value = metrics["num-examples"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise RejectedReply(f"num-examples: expected a positive number, got {value!r}")
    if most is not None and value > most:
        raise RejectedReply(f"num-examples: expected at most {most} (the partition's size), got {value!r}")
    if value > MAX_CLIENT_WEIGHT:
        raise RejectedReply(f"num-examples: expected at most 2**53, got {value!r}")
    return float(value)


def _check_partition(reply: Message, sent: int) -> None:
    """A client that holds its own partition trains on it: it must be the one it was sent."""
    record = reply.content.config_records.get(TRAINED_RECORD)
    trained = sent if record is None else record.get("partition-id", sent)
    if trained != sent:
        raise RejectedReply(f"partition-id: sent partition {sent}, the client trained on {trained!r}")


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
        self._nodes: dict[int, int] | None = None  # partition -> node id
        self.deployment = False  # query the nodes for the partitions they hold (flwr run); else by index
        # train samples of each partition, when the server knows them: a client's weight
        # (num-examples) above its partition's size is refused
        self.partition_sizes: tuple[int, ...] | None = None

    def outcome(self, server_round: int) -> RoundOutcome:
        return self.outcomes.setdefault(server_round, RoundOutcome())

    def records(self) -> dict[str, Any]:
        """What a checkpoint keeps of the strategy (JSON-able)."""
        return {"outcomes": {r: o.to_dict() for r, o in self.outcomes.items()}}

    def load_records(self, records: dict[str, Any]) -> None:
        self.outcomes = {int(r): RoundOutcome(**o) for r, o in records.get("outcomes", {}).items()}

    def _placement(self, grid: Grid) -> dict[int, int]:
        """partition -> node, found once: nodes that hold a partition (node config) get it."""
        if self._nodes is None:
            self._nodes = node_placement(grid, self.run_config, self.deployment)
        return self._nodes

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        nodes = self._placement(grid)
        messages = []
        cfg = self.run_config
        for pid in sample_partitions(cfg.seed, cfg.num_clients, cfg.clients_per_round, server_round):
            instruction = ConfigRecord(
                TrainInstruction(cfg, server_round, pid, self.mask_mode, node_data=self.deployment).to_flat())
            messages.append(
                Message(
                    RecordDict({"arrays": arrays, "config": instruction}),
                    dst_node_id=nodes[pid],
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
            sizes = self.partition_sizes
            most = sizes[pid] if sizes is not None and 0 <= pid < len(sizes) else None
            try:
                _check_partition(reply, pid)
                _check_metrics(reply)
                usable.append((reply, _num_examples(reply, most)))
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
        scale = max((w for _, w in usable), default=1.0)  # weights relative to the largest: no overflow
        total = sum(w / scale for _, w in usable)
        sums: dict[str, float] = {}
        for reply, weight in usable:
            weight /= scale
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

    def _checked_weights(self, reply: Message) -> dict[str, np.ndarray]:
        """The reply's weights: the model's tensors, shapes and dtypes, finite."""
        record = reply.content.array_records.get("arrays")
        if record is None or len(reply.content.array_records) != 1:
            raise RejectedReply("arrays: expected one ArrayRecord 'arrays', got "
                                f"{[str(k)[:40] for k in reply.content.array_records.keys()][:5]}")
        weights = reply_arrays(record)
        got = {k: (v.shape, v.dtype) for k, v in weights.items()}
        if got != self.reference:
            raise RejectedReply("arrays: expected the model's tensors and shapes, got others")
        if not all(np.isfinite(v).all() for v in weights.values()):
            raise RejectedReply("arrays: expected finite values, got NaN or inf")
        return weights

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):  # noqa: ANN201
        server_round += self.round_offset
        good, states = [], []
        for reply, weight in self.usable_replies(server_round, replies):
            try:
                states.append(self._checked_weights(reply))
                good.append((reply, weight))
            except RejectedReply as err:
                self.reject(server_round, reply, str(err))
        if self.too_few(server_round, len(good)):
            return None, None
        self.state = dense_aggregate(states, [w for _, w in good], self.run_config)
        return state_record(self.state), self.finish_round(server_round, good)


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
        self._global: tuple[State, Masks | None] | None = None  # (state, its global mask), the last one asked

    def global_mask(self, state: State) -> Masks | None:
        """The global mask ``state`` implies (:func:`fedmask.diagnostics.global_mask`), kept for
        the last state asked: a round's new state is the next round's previous one."""
        if self._global is None or self._global[0] is not state:
            self._global = (state, global_mask(state, self.aggregator.mask_mode, self.run_config.density,
                                               self.spec.layout))
        return self._global[1]

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

    def decode(self, reply: Message, lengths: dict[str, float] | None = None) -> dict[str, np.ndarray]:
        """The upload's binary tensors (masks, or Slot Machines' bit-planes), checked.

        With ``lengths``, the upload's ideal and formula bits are measured in the same pass.
        """
        record = reply.content.array_records.get("arrays")
        if record is None or list(record.keys()) != ["mask"] or len(reply.content.array_records) != 1:
            keys = None if record is None else [str(k)[:40] for k in list(record.keys())[:5]]
            raise RejectedReply(f"arrays: expected one ArrayRecord 'arrays' with one Array 'mask', got {keys}")
        blob = reply_arrays(record)["mask"]
        if blob.dtype != np.uint8 or blob.ndim != 1:
            raise RejectedReply(f"arrays 'mask': expected a 1-D uint8 blob, got {blob.dtype} {blob.shape}")
        if self.aggregator.mask_mode == "laperm":  # ranks, coded against the broadcast ranks
            return laperm.decode_ranks(blob, self.spec.upload, self.spec.fingerprint, self.prior,
                                       self.run_config.laperm_rank_step)
        return decode_masks(blob, self.spec.upload, self.spec.fingerprint, self.prior, lengths)

    def votes_of(self, bits: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """What the aggregator gets: the masks, or the slot indices the planes spell."""
        if self.aggregator.mask_mode == "slots":
            return planes_to_choices(bits, self.spec.layout)
        return bits

    def _measure_code(self, server_round: int, masks: dict[str, np.ndarray],
                      lengths: dict[str, float] | None = None) -> None:
        """Ideal code length under the uplink model, and FedPM's formula, for this mask
        (``lengths`` when the decoder measured them already)."""
        if self.aggregator.mask_mode == "laperm":
            lengths = laperm.code_lengths(masks, self.spec.upload, self.run_config.uplink_codec, self.prior,
                                          self.run_config.laperm_rank_step)
        elif not lengths:
            lengths = code_lengths(masks, self.spec.upload, self.run_config.uplink_codec, self.prior)
        outcome = self.outcome(server_round)
        if outcome.code_lengths is None:
            outcome.code_lengths = {"ideal_bits": 0.0, "formula_bits": 0.0}
        totals = outcome.code_lengths
        for key, value in lengths.items():
            totals[key] += value

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):  # noqa: ANN201
        """Decode each usable upload, in partition order, and fold it into the aggregator
        at once: the round's masks are never held together (streaming aggregation)."""
        server_round += self.round_offset
        replies = list(replies)
        if self.lossless is not None:
            self._confirmations(replies)
        usable = []
        self.aggregator.discard()
        # client drift: each upload against the global mask of the broadcast it trained from
        # (the prior the uplink decoder uses), folded in as counts (fedmask.diagnostics)
        mode = self.aggregator.mask_mode
        drift = DriftTally(None if self.prior is None else mask_of_prior(self.prior, mode, self.spec.layout))
        for reply, weight in self.usable_replies(server_round, replies):
            try:
                lengths: dict[str, float] = {}
                votes = self.votes_of(self.decode(reply, lengths))
                self._measure_code(server_round, votes, lengths)
            except (MaskCodecError, RejectedReply) as err:
                self.reject(server_round, reply, str(err))
                continue
            except Exception as err:  # noqa: BLE001 - no reply may stop the server, whatever it holds
                self.reject(server_round, reply, f"cannot decode: {type(err).__name__}: {str(err)[:200]}")
                continue
            self.aggregator.fold(server_round, self.state, votes, weight)
            drift.add(votes)
            usable.append((reply, weight))
        if self.too_few(server_round, len(usable)):
            self.aggregator.discard()
            return None, None
        new_state = self.aggregator.finish(server_round, self.state)
        self._check_state(new_state)
        bernoulli = mode == "bernoulli"
        self.outcome(server_round).diagnostics = round_diagnostics(
            self.global_mask(self.state), self.global_mask(new_state), drift,
            theta=new_state if bernoulli else None,
            eps=self.run_config.fedpm_eps if bernoulli and isinstance(self.aggregator, FedPMAggregator) else None)
        if self.lossless is not None:
            recorded = getattr(self.aggregator, "last_round_votes", None)
            if isinstance(self.aggregator, Replayable) and self.lossless.can_replay and recorded is not None:
                votes, clients = recorded
                self.lossless.record(server_round, self.state, new_state, votes, clients, self.aggregator.replay)
            else:  # a plug-in (or a rule that replaced aggregate): full states only
                self.lossless.record(server_round, self.state, new_state)
        self.state = new_state
        if is_recycle_round(self.run_config, server_round):
            # from the state as clients decode it, so that any of them could derive it too
            plan = recycle_plan(self.deployed(), self.run_config.recycle_fraction)
            self.recycle_log.add(server_round, plan, self.spec.layout, self.spec.fingerprint)
        return state_record(new_state), self.finish_round(server_round, usable)

    def _check_state(self, new_state: State) -> None:
        """An aggregator (maybe a plug-in) must keep the state's names and shapes, as floats."""
        for name, value in self.state.items():
            got = new_state.get(name) if isinstance(new_state, dict) else None
            if not isinstance(got, np.ndarray) or got.shape != value.shape:
                raise ValueError(
                    f"{type(self.aggregator).__name__}.aggregate returned a state without "
                    f"'{name}' of shape {value.shape}"
                )
            if got.dtype.kind != "f":
                raise ValueError(f"{type(self.aggregator).__name__}.aggregate returned {got.dtype} values in "
                                 f"'{name}'; expected floats")
            if not np.isfinite(got).all():
                raise ValueError(f"{type(self.aggregator).__name__}.aggregate returned NaN/inf in '{name}'")


class CompressedFedAvg(DenseFedAvg):
    """The compressed dense baselines (SignSGD, EF-SignSGD, QSGD, top-k): clients upload a
    coded update in one Array 'update'; the server decodes each, checks it like a mask, and
    applies :func:`fedmask.compression.aggregate_updates`."""

    def __init__(self, run_config: RunConfig, ledger: Ledger, reference: dict[str, np.ndarray], compressor: str):
        super().__init__(run_config, ledger, reference)
        self.compressor = compressor
        self.layout = MaskLayout.from_arrays(reference)
        self.fingerprint = self.layout.fingerprint(run_config.seed, run_config.model, "dense")

    def decode_update(self, reply: Message) -> dict[str, np.ndarray]:
        record = reply.content.array_records.get("arrays")
        if record is None or list(record.keys()) != ["update"]:
            keys = None if record is None else list(record.keys())
            raise RejectedReply(f"arrays: expected one Array 'update', got {keys}")
        try:
            blob = checked_numpy(record["update"])
        except BadArray as err:
            raise RejectedReply(f"arrays 'update': {err}") from None
        if blob.dtype != np.uint8 or blob.ndim != 1:
            raise RejectedReply(f"arrays 'update': expected a 1-D uint8 array, got {blob.dtype} {blob.shape}")
        return decompress(blob, self.layout, self.fingerprint, self.compressor, self.run_config.qsgd_levels)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):  # noqa: ANN201
        server_round += self.round_offset
        updates, good = [], []
        for reply, weight in self.usable_replies(server_round, replies):
            try:
                updates.append(self.decode_update(reply))
                good.append((reply, weight))
            except (CompressionError, RejectedReply, ValueError, TypeError) as err:
                self.reject(server_round, reply, str(err))
        if self.too_few(server_round, len(good)):
            return None, None
        self.state = aggregate_updates(self.compressor, self.state, updates, [w for _, w in good],
                                       self.run_config.signsgd_server_lr)
        return state_record(self.state), self.finish_round(server_round, good)
