"""Flower strategies around the aggregation rules: sampling, reply checks, failures.

Every strategy extends Flower's ``FedAvg`` from the Message API and runs one template
(:class:`SeededFedAvg`): pick the round's clients with a seeded RNG (Flower's sampler uses
unseeded ``random`` and random node ids) and send each its partition id, so a run is
reproducible; then, for the replies, keep the usable ones -> :meth:`~SeededFedAvg.decode`
each -> :meth:`~SeededFedAvg.fold` it in -> :meth:`~SeededFedAvg.finish` the round. A
reply that cannot be used is rejected, logged and recorded, and the round goes on with the
others. Each variant overrides those hooks and nothing else:

- :class:`DenseFedAvg`: Flower's own FedAvg aggregation of float32 weights (the baseline);
- :class:`CompressedFedAvg`: the compressed dense baselines' coded updates;
- :class:`MaskStrategy`: coded masks folded into a :class:`~fedmask.methods.base.MaskAggregator`,
  and the broadcast of the new state.

With a per-node downlink (:mod:`fedmask.downlink`: the masks' ``lossless``, the dense
baselines' ``ef-qsgd``) the template also sends each node the shortest broadcast it can
use and learns from the replies what each node holds; :meth:`SeededFedAvg.commit` is where
a dense round's update is squeezed before it becomes the state.

A resumed run's rounds are numbered from its checkpoint in one place, :meth:`SeededFedAvg.round_of`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedmask.config import RunConfig
from fedmask.console import FRACTION_EVALUATE_NOTICE, flower_notices_hidden
from fedmask.core.sampling import sample_partitions
from fedmask.downlink import CONFIRM, LosslessDownlink
from fedmask.downlink import RECORD as LOSSLESS_RECORD
from fedmask.methods.base import MaskAggregator, MaskMode, Masks, RoundResult, State
from fedmask.methods.dense import (
    Compressed,
    SqueezedDownlink,
    apply_update,
    dense_aggregate,
    dense_fingerprint,
    state_problem,
)
from fedmask.methods.votes import VoteRule, Voting
from fedmask.protocol.instruction import TrainInstruction
from fedmask.protocol.placement import TRAINED_RECORD
from fedmask.protocol.replies import BadArray, checked_numpy
from fedmask.record.checkpoint import RESIDUAL_PREFIX
from fedmask.record.diagnostics import DriftTally, round_diagnostics
from fedmask.record.failures import Failure
from fedmask.record.ledger import Ledger
from fedmask.record.results import RoundOutcome, RunStopped
from fedmask.recycling import RECORD, RecycleLog, is_recycle_round, recycle_plan
from fedmask.task import ModelSpec
from fedmask.wire.frame import Layout, WireError
from fedmask.wire.masks import Prior
from fedmask.wire.state import decode_state, encode_state
from server.nodes import node_placement

log = logging.getLogger("fedmask")


class RejectedReply(ValueError):
    """A reply that cannot be used; the message says why."""


def state_record(state: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in state.items()})


def reply_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """A reply's arrays, each checked (:func:`fedmask.protocol.replies.checked_numpy`);
    RejectedReply names the first bad one."""
    arrays = {}
    for name, array in record.items():
        try:
            arrays[name] = checked_numpy(array)
        except BadArray as err:
            raise RejectedReply(f"arrays '{str(name)[:40]}': {err}") from None
    return arrays


def single_blob(reply: Message, name: str) -> np.ndarray:
    """The one 1-D uint8 Array ``name`` that a coded upload is, checked."""
    record = reply.content.array_records.get("arrays")
    if record is None or list(record.keys()) != [name] or len(reply.content.array_records) != 1:
        keys = None if record is None else [str(k)[:40] for k in list(record.keys())[:5]]
        raise RejectedReply(f"arrays: expected one ArrayRecord 'arrays' with one Array '{name}', got {keys}")
    blob = reply_arrays(record)[name]
    if blob.dtype != np.uint8 or blob.ndim != 1:
        raise RejectedReply(f"arrays '{name}': expected a 1-D uint8 blob, got {blob.dtype} {blob.shape}")
    return blob


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


@dataclass(frozen=True)
class Start:
    """Where a strategy starts: the state, and for a resumed run the rounds already done and
    the outcomes recorded for them."""

    state: State
    rounds_done: int = 0
    outcomes: dict[int, RoundOutcome] = field(default_factory=dict)


class SeededFedAvg(FedAvg):
    """The round template: reproducible sampling, usable replies -> decode -> fold -> finish,
    and a record of every round's outcome."""

    def __init__(self, run_config: RunConfig, ledger: Ledger, mask_mode: str | None, start: Start,
                 partition_sizes: tuple[int, ...] | None = None, deployment: bool = False,
                 lossless: LosslessDownlink | None = None):
        """``partition_sizes``: each partition's train samples, when the server knows them (a
        client's weight above its partition's size is refused); ``deployment`` (``flwr run``):
        query the nodes for the partitions they hold, instead of placing partitions by index;
        ``lossless``: the per-node downlink's history (None: every node gets :meth:`broadcast`)."""
        with flower_notices_hidden(FRACTION_EVALUATE_NOTICE):  # the server evaluates; clients never do
            super().__init__(fraction_evaluate=0.0, min_available_nodes=1, min_train_nodes=1)
        self.run_config, self.ledger, self.mask_mode = run_config, ledger, mask_mode
        self.lossless = lossless
        self._warned_float32 = False  # the lossless downlink's fall-back to the float32 state was logged
        self.state = start.state
        self.rounds_done = start.rounds_done
        self.outcomes: dict[int, RoundOutcome] = dict(start.outcomes)
        self.partition_sizes, self.deployment = partition_sizes, deployment
        self._nodes: dict[int, int] | None = None  # partition -> node id

    def round_of(self, server_round: int) -> int:
        """The run's round number of Flower's ``server_round`` (which counts from 1 at every start)."""
        return server_round + self.rounds_done

    def outcome(self, server_round: int) -> RoundOutcome:
        return self.outcomes.setdefault(server_round, RoundOutcome())

    def records(self) -> dict[str, Any]:
        """What a checkpoint keeps of the strategy (JSON-able)."""
        return {"outcomes": {r: o.to_dict() for r, o in self.outcomes.items()}}

    def _placement(self, grid: Grid) -> dict[int, int]:
        """partition -> node, found once: nodes that hold a partition (node config) get it."""
        if self._nodes is None:
            self._nodes = node_placement(grid, self.run_config, self.deployment)
        return self._nodes

    # ------------------------------------------------------------ sending

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.train_messages(self.round_of(server_round), grid)

    def train_messages(self, server_round: int, grid: Grid) -> list[Message]:
        """One train message per sampled partition: its instruction and the broadcast state."""
        nodes = self._placement(grid)
        cfg, arrays = self.run_config, self.broadcast()
        messages = []
        for pid in sample_partitions(cfg.seed, cfg.num_clients, cfg.clients_per_round, server_round):
            instruction = ConfigRecord(
                TrainInstruction(cfg, server_round, pid, self.mask_mode, node_data=self.deployment).to_flat())
            messages.append(Message(RecordDict({"arrays": arrays, "config": instruction}), dst_node_id=nodes[pid],
                                    message_type=MessageType.TRAIN, group_id=str(server_round)))
        if self.lossless is not None:
            self._per_node_broadcasts(server_round, messages)
        return messages

    def broadcast(self) -> ArrayRecord:
        """What every train message carries of the current state (the float32 state, by
        default; nothing with a per-node downlink, which replaces it node by node)."""
        return ArrayRecord() if self.lossless is not None else state_record(self.state)

    def _per_node_broadcasts(self, server_round: int, messages: list[Message]) -> None:
        """Each node's broadcast: the shortest one it can turn into the current state."""
        assert self.lossless is not None
        kinds: dict[str, int] = {}
        sent = self.lossless.messages_for([m.metadata.dst_node_id for m in messages], self.state)
        for message, (blob, kind) in zip(messages, sent):
            message.content["arrays"] = ArrayRecord({LOSSLESS_RECORD: Array(blob)})
            kinds[kind] = kinds.get(kind, 0) + 1
        self.lossless.sent([m.metadata.dst_node_id for m in messages])
        self.outcome(server_round).broadcasts = kinds
        if kinds.get("full") and not (self.lossless.can_replay or self.lossless.few_valued or self._warned_float32):
            self._warned_float32 = True
            log.warning("downlink-codec %r: nodes cannot replay method %r's updates and its state takes more than "
                        "256 values in a tensor, so from round %d on nodes that miss a state are sent the float32 "
                        "state, as downlink-codec = 'float32' sends it (rounds.jsonl: downlink_kinds 'full'; "
                        "summary.json: downlink_kinds)", self.run_config.downlink_codec, self.run_config.method,
                        server_round)

    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        return []  # the server evaluates the global model itself

    # ------------------------------------------------------------ receiving

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        """Decode each usable reply, in partition order, and fold it in at once (a round's
        uploads are never held together by the mask rules), then finish the round."""
        server_round = self.round_of(server_round)
        replies = list(replies)
        self.received(replies)
        self.discard()
        folded = []
        for reply, weight in self.usable_replies(server_round, replies):
            try:
                decoded = self.decode(server_round, reply)
            except (WireError, RejectedReply) as err:
                self.reject(server_round, reply, str(err))
                continue
            except Exception as err:  # no reply may stop the server, whatever it holds
                self.reject(server_round, reply, f"cannot decode: {type(err).__name__}: {str(err)[:200]}")
                continue
            self.fold(server_round, decoded, weight)
            folded.append((reply, weight))
        if self.too_few(server_round, len(folded)):
            self.discard()
            return None, None
        new_state = self.finish(server_round)
        refused = self.refused(new_state)
        if refused:
            reason = f"{refused}: round skipped, global state unchanged"
            log.warning("round %d: %s", server_round, reason)
            self.outcome(server_round).skipped = reason
            return None, None
        self.state = self.commit(server_round, new_state)
        return state_record(self.state), self.finish_round(server_round, folded)

    def received(self, replies: list[Message]) -> None:
        """Every reply of the round, before any is decoded: with a per-node downlink, what
        each node that answered now holds; nodes that did not are forgotten."""
        if self.lossless is None:
            return
        for reply in replies:
            node = self.ledger.sent_to.get(reply.metadata.reply_to_message_id, (0, reply.metadata.src_node_id, -1))[1]
            record = reply.content.config_records.get(CONFIRM) if reply.has_content() else None
            if record is not None:
                self.lossless.confirm(node, record.get("version"), record.get("digest"))
        self.lossless.end_round()

    def decode(self, server_round: int, reply: Message) -> Any:
        """A usable reply's upload, checked (RejectedReply or WireError when it is bad)."""
        raise NotImplementedError

    def fold(self, server_round: int, decoded: Any, weight: float) -> None:
        """Take one decoded upload."""
        raise NotImplementedError

    def finish(self, server_round: int) -> State:
        """The next state from everything folded this round."""
        raise NotImplementedError

    def discard(self) -> None:
        """Forget what was folded (a new round, or one skipped for too few uploads)."""

    def refused(self, new_state: State) -> str | None:
        """Why the round's new state must not replace the current one (None: it may)."""
        return None

    def commit(self, server_round: int, new_state: State) -> State:
        """The state the round leaves, from the one it made (accepted): itself, by default."""
        return new_state

    def memory(self) -> dict[str, np.ndarray]:
        """What a checkpoint keeps of the strategy besides the state (nothing, by default)."""
        return {}

    # ------------------------------------------------------------ the shared checks and records

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
    """The dense float32 baseline: Flower's FedAvg aggregation on checked replies.

    With ``squeeze`` (``downlink-codec = "ef-qsgd"``) the round's new weights are not
    broadcast as they are: :meth:`commit` moves the state by the squeezed update, which
    is what the lossless downlink (``lossless``, required then) sends each node."""

    def __init__(self, run_config: RunConfig, ledger: Ledger, start: Start, rule: VoteRule,
                 squeeze: SqueezedDownlink | None = None, **options: Any):
        super().__init__(run_config, ledger, None, start, **options)
        if (squeeze is None) != (self.lossless is None):
            raise ValueError("DenseFedAvg: a squeezed downlink needs the lossless downlink's history, and only it")
        self.rule, self.squeeze = rule, squeeze
        self.reference = {k: (v.shape, v.dtype) for k, v in start.state.items()}
        self.layout = Layout.from_arrays(start.state)
        self.folded: list[tuple[Any, float]] = []

    def decode(self, server_round: int, reply: Message) -> dict[str, np.ndarray]:
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

    def fold(self, server_round: int, decoded: Any, weight: float) -> None:
        self.folded.append((decoded, weight))

    def discard(self) -> None:
        self.folded = []

    def finish(self, server_round: int) -> State:
        return dense_aggregate([s for s, _ in self.folded], [w for _, w in self.folded], self.rule)

    def refused(self, new_state: State) -> str | None:
        """Clients' weights are checked one by one, but a poisoned one can be finite and
        well-formed: the state they make must be finite and not blown up."""
        return state_problem(new_state, self.state)

    def commit(self, server_round: int, new_state: State) -> State:
        """``ef-qsgd``: the state moves by the squeezed update, as every node's will (the
        residual stays here); the downlink records the step it sends."""
        if self.squeeze is None or self.lossless is None:
            return new_state
        sent = self.squeeze.step(server_round, self.state, new_state, self.layout)
        state = apply_update(self.state, sent)
        self.lossless.record(server_round, self.state, state, sent, 0.0, apply_update)
        return state

    def memory(self) -> dict[str, np.ndarray]:
        """The squeezed downlink's residual (a resumed run goes on as the uninterrupted one)."""
        if self.squeeze is None:
            return {}
        return {RESIDUAL_PREFIX + name: value for name, value in self.squeeze.residual.items()}


class CompressedFedAvg(DenseFedAvg):
    """The compressed dense baselines (SignSGD, EF-SignSGD, QSGD, top-k): clients upload a
    coded update in one Array 'update'; the server decodes each, checks it like a mask, and
    applies the method's update rule (:class:`fedmask.methods.dense.Compressed`)."""

    def __init__(self, run_config: RunConfig, ledger: Ledger, start: Start, rule: VoteRule, coding: Compressed,
                 **options: Any):
        super().__init__(run_config, ledger, start, rule, **options)
        self.coding = coding
        self.fingerprint = dense_fingerprint(self.layout, run_config.seed, run_config.model)

    def decode(self, server_round: int, reply: Message) -> dict[str, np.ndarray]:
        return self.coding.decode(single_blob(reply, "update"), self.layout, self.fingerprint,
                                  (server_round, self.ledger.partition_of(reply)))

    def finish(self, server_round: int) -> State:
        return self.coding.aggregate(self.state, [u for u, _ in self.folded], [w for _, w in self.folded], self.rule)


class MaskStrategy(SeededFedAvg):
    """Masks up, global state down; the maths lives in a :class:`MaskAggregator` and the
    mask mode (:class:`MaskMode`)."""

    def __init__(self, run_config: RunConfig, ledger: Ledger, start: Start, aggregator: MaskAggregator,
                 mode: MaskMode, spec: ModelSpec, lossless: LosslessDownlink | None = None,
                 recycle_log: RecycleLog | None = None, **options: Any):
        """``lossless``: the lossless downlink's history (None: the stateless ``downlink-codec``);
        ``recycle_log``: the weight-recycling events so far."""
        super().__init__(run_config, ledger, aggregator.mask_mode, start, lossless=lossless, **options)
        self.aggregator, self.mode, self.spec = aggregator, mode, spec
        if run_config.recycle_every and not mode.recyclable:
            raise ValueError(f"recycle-every: weight recycling needs a top-k mask method (edge-popup, "
                             f"biprop); {run_config['method']!r} trains {mode.name!r} masks")
        self.recycle_log = recycle_log or RecycleLog()
        self.prior: Prior | None = None  # what this round's uploads are coded against
        self._reference: Masks | None = None  # the global mask of the broadcast this round's clients trained from
        self._drift = DriftTally(None)
        # relative-entropy uploads are small: the lossless downlink may relay them instead of the votes
        self.codec = mode.uplink_codec(run_config.uplink_codec)
        self._relaying = lossless is not None and self.codec == "relative-entropy"
        self._uploads: list[tuple[int, float, bytes]] = []  # this round's folded uploads, to relay
        self._coded: tuple[State, dict[str, np.ndarray], State] | None = None
        self._global: tuple[State, Masks | None] | None = None  # (state, its global mask), the last one asked

    def global_mask(self, state: State) -> Masks | None:
        """The global mask ``state`` implies, kept for the last state asked: a round's new
        state is the next round's previous one."""
        if self._global is None or self._global[0] is not state:
            self._global = (state, self.mode.global_mask(state))
        return self._global[1]

    # ------------------------------------------------------------ the broadcast

    def _coded_state(self) -> tuple[dict[str, np.ndarray], State]:
        """The coded broadcast of the current state and what clients decode from it.

        Evaluation after a round and the next round's broadcast need the same pair, so it
        is computed once per state.
        """
        if self._coded is None or self._coded[0] is not self.state:
            if self.lossless is not None:  # per node (see train_messages); clients end with the exact state
                exact = {name: np.asarray(value, dtype=np.float32) for name, value in self.state.items()}
                self._coded = (self.state, {}, exact)
            else:
                encoded = encode_state(self.state, self.spec.layout, self.run_config.downlink_codec,
                                       self.run_config.downlink_bits)
                self._coded = (self.state, encoded, decode_state(encoded, self.spec.layout))
        return self._coded[1], self._coded[2]

    def deployed(self) -> State:
        """The current state as clients hold it after the downlink codec (what they train from)."""
        return self._coded_state()[1]

    def broadcast(self) -> ArrayRecord:
        return state_record(self._coded_state()[0])

    def train_messages(self, server_round: int, grid: Grid) -> list[Message]:
        deployed = self.deployed()
        self.prior = self.mode.prior(deployed)
        self._reference = self.mode.global_mask(deployed)
        messages = super().train_messages(server_round, grid)
        if self.run_config.recycle_every:
            record = self.recycle_log.to_record()
            for message in messages:
                message.content[RECORD] = record
        return messages

    # ------------------------------------------------------------ the round

    def decode(self, server_round: int, reply: Message) -> tuple[Masks, int, np.ndarray]:
        """The upload's votes for the aggregation rule, checked, with its partition and bytes;
        the code lengths and the client's drift are measured on the way."""
        lengths: dict[str, float] = {}
        pid, blob = self.ledger.partition_of(reply), single_blob(reply, "mask")
        upload = self.mode.decode_upload(blob, self.spec.upload, self.spec.fingerprint, self.prior,
                                         self.codec, lengths, (server_round, pid))
        votes = self.mode.votes(upload, self.spec.layout)
        totals = self.outcome(server_round).code_lengths
        if totals is None:
            totals = self.outcome(server_round).code_lengths = {"ideal_bits": 0.0, "formula_bits": 0.0}
        for key, value in lengths.items():
            totals[key] += value
        self._drift.add(votes)
        return votes, pid, blob

    def fold(self, server_round: int, decoded: Any, weight: float) -> None:
        votes, pid, blob = decoded
        self.aggregator.fold(server_round, self.state, votes, weight)
        if self._relaying:
            self._uploads.append((pid, weight, blob.tobytes()))

    def discard(self) -> None:
        self.aggregator.discard()
        self._uploads = []
        # client drift: each upload against the global mask of the broadcast it trained from
        self._drift = DriftTally(self._reference)

    def finish(self, server_round: int) -> State:
        try:
            result = self.aggregator.finish(server_round, self.state)
            if not isinstance(result, RoundResult):  # a plug-in's finish may return the state itself
                result = RoundResult(result)
            new_state = result.state
            self._check_state(new_state)
        except Exception as err:  # a rule (a plug-in) that fails stops the run, every finished round kept
            name = type(self.aggregator).__name__
            why = str(err) if str(err).startswith(name) else f"{name}.aggregate raised {type(err).__name__}: {err}"
            raise RunStopped(f"round {server_round}: {why}") from err
        figures = self.mode.state_diagnostics(new_state) | self.aggregator.state_diagnostics(new_state)
        self.outcome(server_round).diagnostics = round_diagnostics(
            self.global_mask(self.state), self.global_mask(new_state), self._drift, figures)
        if self.lossless is not None:
            replay = self.aggregator.replay if isinstance(self.aggregator, Voting) else None
            self.lossless.record(server_round, self.state, new_state, result.votes, result.clients, replay,
                                 self._uploads if self._relaying else None)
        if is_recycle_round(self.run_config, server_round):
            # from the state as clients decode it, so that any of them could derive it too
            self.state = new_state
            plan = recycle_plan(self.deployed(), self.run_config.recycle_fraction)
            self.recycle_log.add(server_round, plan, self.spec.layout, self.spec.fingerprint)
        return new_state

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
