"""Hostile replies (issue 15, items 1-3): any reply is rejected and recorded, never fatal;
client weights are bounded; the ledger counts the bytes that arrived."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clients.client_app import app as real_client_app
from clients.client_app import train as real_train
from engines.inprocess import InProcessGrid
from fedmask import task
from fedmask.config import resolve
from fedmask.core.masking import get_scores
from fedmask.downlink import LosslessDownlink
from fedmask.methods.edge_popup import EdgePopupAggregator
from fedmask.methods.fedpm import FedPMAggregator
from fedmask.methods.votes import VoteRule, weighted_vote
from fedmask.protocol.instruction import TrainInstruction
from fedmask.protocol.placement import TRAINED_RECORD
from fedmask.protocol.replies import BadArray, arrived_bytes, checked_numpy
from fedmask.record.ledger import Ledger, message_bytes, payload_bytes
from fedmask.wire.masks import FRAME
from server.server_app import run_server
from server.strategies import DenseFedAvg, MaskStrategy, Start

SMALL = {"num-clients": 4, "clients-per-round": 4, "num-rounds": 3}


def _rounds(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]


def _npy(value: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, value, allow_pickle=True)
    return buffer.getvalue()


def _npy_declaring(shape: tuple[int, ...], dtype: str, payload: bytes) -> bytes:
    """A .npy header that declares ``shape`` and ``dtype``, followed by ``payload``."""
    buffer = io.BytesIO()
    header = {"descr": dtype, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + payload


# ---------------------------------------------------------------- the Array check


@pytest.mark.parametrize("dtype", ["uint8", "int8", "int64", "float16", "float32", "float64", "bool", ">f4"])
def test_checked_numpy_round_trips_plain_arrays(dtype):
    value = (np.arange(24) % 3).astype(dtype).reshape(2, 3, 4)
    for array in (Array(value), Array(np.asfortranarray(value)), Array(value[:0])):
        got = checked_numpy(array)
        assert got.dtype == array.numpy().dtype and np.array_equal(got, array.numpy())
        assert arrived_bytes(array) == got.nbytes


def test_a_header_read_before_is_looked_up_yet_every_array_is_still_checked():
    """Headers are read once and looked up by their bytes after: a second array with the
    same header gives its own values, and one whose data is cut short, or whose declared
    shape disagrees, is still refused."""
    first, second = np.arange(12, dtype=np.float32), np.arange(12, 24, dtype=np.float32)
    assert np.array_equal(checked_numpy(Array(first)), first)
    assert np.array_equal(checked_numpy(Array(second)), second)
    data = Array(second).data
    with pytest.raises(BadArray, match="arrived"):
        checked_numpy(Array(dtype="float32", shape=(12,), stype="numpy.ndarray", data=data[:-4]))
    with pytest.raises(BadArray, match="disagrees"):
        checked_numpy(Array(dtype="float32", shape=(3, 4), stype="numpy.ndarray", data=data))
    assert arrived_bytes(Array(dtype="float32", shape=(12,), stype="numpy.ndarray", data=data[:-4])) == 44


HOSTILE = {
    "stype torch": Array(dtype="uint8", shape=(3,), stype="torch.Tensor", data=_npy(np.zeros(3, np.uint8))),
    "not npy": Array(dtype="uint8", shape=(3,), stype="numpy.ndarray", data=b"\x01\x02\x03"),
    "empty data": Array(dtype="uint8", shape=(0,), stype="numpy.ndarray", data=b""),
    "object npy": Array(dtype="object", shape=(2,), stype="numpy.ndarray", data=_npy(np.array([1, "a"], object))),
    "unknown dtype": Array(dtype="nonsense", shape=(3,), stype="numpy.ndarray", data=_npy(np.zeros(3, np.uint8))),
    "string npy": Array(dtype="<U2", shape=(1,), stype="numpy.ndarray", data=_npy(np.array(["ab"]))),
    "complex npy": Array(dtype="complex64", shape=(1,), stype="numpy.ndarray", data=_npy(np.zeros(1, np.complex64))),
    "huge shape": Array(dtype="uint8", shape=(2**30,), stype="numpy.ndarray",
                        data=_npy_declaring((2**30,), "|u1", b"\0" * 4000)),
    "shape lies": Array(dtype="uint8", shape=(2**30,), stype="numpy.ndarray", data=_npy(np.zeros(4000, np.uint8))),
    "dtype lies": Array(dtype="float64", shape=(4000,), stype="numpy.ndarray", data=_npy(np.zeros(4000, np.uint8))),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_checked_numpy_refuses_hostile_arrays_with_bad_array_only(name):
    array = HOSTILE[name]
    with pytest.raises(BadArray):
        checked_numpy(array)
    assert arrived_bytes(array) <= len(array.data)  # never the declared 2**30


# ---------------------------------------------------------------- the strategies


def _mask_strategy(method: str = "fedpm") -> MaskStrategy:
    config = resolve({**SMALL, "method": method})
    mode = task.mode_of(config, config.method_entry.mask_mode)
    model = task.make_model(config, task.splits_of(config), mode)
    aggregator = config.method_entry.make_aggregator(config)
    spec, state = task.ModelSpec.of(config, model, mode), aggregator.initial_state(get_scores(model))
    lossless = LosslessDownlink.create(spec.layout, spec.fingerprint, mode.vote_contexts, aggregator.replayable,
                                       aggregator.absorbing, state)  # the default downlink-codec, as build makes it
    strat = MaskStrategy(config, Ledger(), Start(state), aggregator, mode, spec, lossless)
    list(strat.configure_train(1, ArrayRecord(), ConfigRecord(), InProcessGrid(real_client_app, 4)))
    return strat


def _dense_strategy() -> DenseFedAvg:
    config = resolve({**SMALL, "method": "fedavg"})
    model = task.make_model(config, task.splits_of(config), None)
    return DenseFedAvg(config, Ledger(), Start(task.dense_state(model)), VoteRule.from_config(config))


def _reply(content: RecordDict, message_id: str = "m") -> Message:
    instruction = Message(RecordDict(), dst_node_id=1001, message_type=MessageType.TRAIN)
    instruction.metadata.__dict__["_message_id"] = message_id
    return Message(content, reply_to=instruction)


@pytest.fixture
def outside_a_grid(monkeypatch):
    """Messages built outside any grid (Flower stamps them with the running task's identity)."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _dense_replies(strategy: DenseFedAvg, claims: list[tuple[int, dict]], trained: dict[int, int] | None = None,
                   ) -> list[Message]:
    """Round-1 replies of partitions 0, 1, ... carrying the strategy's own weights and the
    metrics ``claims[pid]``; ``trained[pid]``: the partition its TRAINED record names."""
    replies = []
    for pid, metrics in enumerate(claims):
        content = RecordDict({"arrays": ArrayRecord({k: Array(v.copy()) for k, v in strategy.state.items()}),
                              "metrics": MetricRecord(metrics)})
        if trained is not None and pid in trained:
            content[TRAINED_RECORD] = ConfigRecord({"partition-id": trained[pid]})
        replies.append(_reply(content, f"r{pid}"))
        strategy.ledger.sent_to[f"r{pid}"] = (1, 1001 + pid, pid)
    return replies


def test_train_metrics_are_the_example_weighted_mean(outside_a_grid):
    """Clients reporting train-loss 1.0 on 10 examples and 5.0 on 30 make a round train-loss
    of (10 * 1 + 30 * 5) / 40 = 4.0 (the unweighted mean would be 3.0); accuracy 0.2 and
    0.6 make 0.5 (not 0.4). Both in what aggregate_train returns and in the round's outcome."""
    strategy = _dense_strategy()
    replies = _dense_replies(strategy, [{"num-examples": 10, "train-loss": 1.0, "train-accuracy": 0.2},
                                        {"num-examples": 30, "train-loss": 5.0, "train-accuracy": 0.6}])
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and strategy.outcome(1).aggregated == 2
    assert metrics["train-loss"] == pytest.approx(4.0) and metrics["train-accuracy"] == pytest.approx(0.5)
    assert strategy.outcome(1).train == {"train-loss": pytest.approx(4.0), "train-accuracy": pytest.approx(0.5)}


def test_a_reply_trained_on_another_partition_than_sent_is_rejected(outside_a_grid):
    """Partition 1's reply says (TRAINED record) it trained partition 2: it is rejected with
    both partitions named and not aggregated; a reply naming its own partition, and one
    without the record (simulation), are used."""
    strategy = _dense_strategy()
    ones = {k: np.ones_like(v) for k, v in strategy.state.items()}
    replies = _dense_replies(strategy, [{"num-examples": 10}] * 3, trained={0: 0, 1: 2})
    replies[1].content["arrays"] = ArrayRecord({k: Array(v) for k, v in ones.items()})  # would move the mean
    usable = strategy.usable_replies(1, replies)
    assert [strategy.ledger.partition_of(reply) for reply, _ in usable] == [0, 2]
    (failure,) = strategy.outcome(1).failures
    assert failure["kind"] == "rejected" and failure["partition_id"] == 1
    assert "partition-id" in failure["reason"] and "sent partition 1" in failure["reason"] and "2" in failure["reason"]
    before = {k: v.copy() for k, v in strategy.state.items()}
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None and strategy.outcome(1).aggregated == 2
    assert all(np.array_equal(strategy.state[k], before[k]) for k in before)  # partition 1's weights left out


names = st.sampled_from(["arrays", "mask", "weights", "fc1.weight", "x" * 300, ""])
stypes = st.one_of(st.sampled_from(["numpy.ndarray", "torch.Tensor", ""]), st.text(max_size=8))
dtypes = st.one_of(st.sampled_from(["uint8", "float32", "bool", "object", "<U3", "complex64", "V8", "nonsense",
                                    "", "float64", "|O", "int64"]), st.text(max_size=6))
shapes = st.lists(st.integers(-2**31, 2**31 - 1), max_size=4).map(tuple)
small_arrays = st.one_of(
    st.binary(max_size=48).map(lambda b: np.frombuffer(b, dtype=np.uint8).copy()),
    st.lists(st.floats(allow_nan=True, width=32), max_size=6).map(lambda v: np.asarray(v, dtype=np.float32)),
    st.just(np.array([1, "a", None], dtype=object)),
    st.just(np.array(["abc"])),
    st.just(np.zeros((2, 2), dtype=np.complex64)),
    st.just(np.ones(3, dtype=bool)),
)
datas = st.one_of(
    st.binary(max_size=80),
    small_arrays.map(_npy),
    st.tuples(shapes.filter(lambda s: all(n >= 0 for n in s)), st.sampled_from(["|u1", "<f4", "|O", "<U2"]),
              st.binary(max_size=40)).map(lambda t: _npy_declaring(*t)),
)
arrays = st.one_of(
    st.builds(lambda d, s, t, b: Array(dtype=d, shape=s, stype=t, data=b), dtypes, shapes, stypes, datas),
    small_arrays.filter(lambda a: a.dtype != object).map(Array),
)
metric_values = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 10**6),
                          st.sampled_from([1e308, 2**63 - 1, 1]), st.lists(st.floats(), max_size=3))
replies = st.builds(
    lambda records, metrics, configs: RecordDict({**records, **metrics, **configs}),
    st.dictionaries(names, st.dictionaries(names, arrays, max_size=3).map(ArrayRecord), max_size=2),
    st.dictionaries(st.sampled_from(["metrics", "other"]),
                    st.dictionaries(st.sampled_from(["num-examples", "train-loss", "x"]), metric_values,
                                    max_size=3).map(MetricRecord), max_size=2),
    st.dictionaries(st.sampled_from(["config", "fault-slow"]),
                    st.dictionaries(st.sampled_from(["delay", "k"]), st.one_of(st.floats(), st.binary(max_size=8),
                                                                              st.text(max_size=4)),
                                    max_size=2).map(ConfigRecord), max_size=1),
)


@pytest.fixture(scope="module")
def strategies():
    return {"fedpm": _mask_strategy("fedpm"), "edge-popup": _mask_strategy("edge-popup"),
            "fedavg": _dense_strategy()}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(content=replies, method=st.sampled_from(["fedpm", "edge-popup", "fedavg"]))
def test_no_reply_whatever_its_records_and_arrays_stops_the_server(strategies, content, method):
    """Whole replies fuzzed (records, Array metadata and bytes): the ledger weighs them
    without raising and from the bytes that arrived; the strategy records a rejection and
    never raises."""
    strategy = strategies[method]
    reply = _reply(content)
    arrived = sum(len(a.data) for record in content.array_records.values() for a in record.values())
    assert 0 <= payload_bytes(reply) <= arrived + sum(
        len(v) for r in content.config_records.values() for v in r.values() if isinstance(v, bytes))
    assert message_bytes(reply) >= 0
    before = len(strategy.outcome(1).failures)
    arrays, _ = strategy.aggregate_train(1, [reply])
    assert arrays is None  # nothing of this can be a valid upload
    failures = strategy.outcome(1).failures
    assert len(failures) == before + 1 and failures[-1]["kind"] == "rejected"


# ---------------------------------------------------------------- end to end


def _hostile_app(kinds: list[str], method_weights: float | None = None) -> ClientApp:
    """The real ClientApp, except that partition 1 sends ``kinds[round - 1]`` instead of its
    upload, and partitions 0 and 1 claim ``method_weights`` examples when given."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        reply = real_train(msg, context)
        instruction = TrainInstruction.from_flat(msg.content["config"])
        pid = instruction.partition_id
        if kinds and pid == 1:
            name = "mask" if instruction.mask_mode else next(iter(reply.content["arrays"].keys()))
            bad = HOSTILE[kinds[(instruction.server_round - 1) % len(kinds)]]
            arrays = dict(reply.content["arrays"].items())
            arrays[name] = bad
            reply.content["arrays"] = ArrayRecord(arrays)
        if method_weights is not None and pid in (0, 1):
            reply.content["metrics"]["num-examples"] = method_weights
        return reply

    return app


@pytest.mark.parametrize("method", ["fedpm", "fedavg"])
def test_a_client_sending_malformed_arrays_every_round_is_rejected_and_the_run_finishes(tmp_path, method):
    kinds = ["stype torch", "object npy", "huge shape"] if method == "fedpm" else ["unknown dtype", "not npy",
                                                                                     "shape lies"]
    config = resolve({**SMALL, "method": method})
    run_server(InProcessGrid(_hostile_app(kinds), 4), config, tmp_path / "run")
    rows = _rounds(tmp_path / "run")
    assert [r["round"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert [(f["partition_id"], f["kind"]) for f in row["failure_details"]] == [(1, "rejected")]
        assert row["clients"] == 3 and math.isfinite(row["accuracy"])
        bad = next(c for c in row["per_client"] if c["partition_id"] == 1)
        assert bad["uplink_payload_bytes"] < 10**6  # what arrived, not a declared 2**30 (item 3)
        honest = [c["uplink_payload_bytes"] for c in row["per_client"] if c["partition_id"] != 1]
        assert row["uplink_payload_bytes"] == sum(honest) + bad["uplink_payload_bytes"]


def test_huge_declared_shape_is_weighed_by_the_bytes_that_arrived():
    reply = _reply(RecordDict({"arrays": ArrayRecord({"mask": HOSTILE["shape lies"]})}))
    assert payload_bytes(reply) == 4000


# ---------------------------------------------------------------- client weights (item 2)


def test_weighted_vote_cannot_overflow():
    masks = [{"w": np.array([True, False])}, {"w": np.array([True, True])}]
    vote = weighted_vote(masks, [1e308, 1e308])["w"]
    assert np.array_equal(vote, [1.0, 0.5])


@pytest.mark.parametrize("method", ["edge-popup", "fedavg"])
def test_clients_claiming_1e308_examples_are_rejected_and_cannot_break_the_model(tmp_path, method):
    """Two clients claim 1e308 examples: they are recorded as rejected every round (the
    claim is above their partition's size), the others are aggregated, and the model learns."""
    dense = {"optimizer": "sgd", "lr": 0.05} if method == "fedavg" else {}
    config = resolve({**SMALL, "method": method, "num-rounds": 3, **dense})
    run_server(InProcessGrid(_hostile_app([], method_weights=1e308), 4), config, tmp_path / "run")
    rows = _rounds(tmp_path / "run")
    assert len(rows) == 3
    for row in rows:
        assert sorted((f["partition_id"], f["kind"]) for f in row["failure_details"]) == [(0, "rejected"),
                                                                                           (1, "rejected")]
        assert all("num-examples" in f["reason"] and "at most" in f["reason"] for f in row["failure_details"])
        assert row["clients"] == 2 and math.isfinite(row["loss"])
    assert rows[-1]["loss"] < math.log(10) - 0.3 and rows[-1]["accuracy"] > 0.3


def test_claims_above_the_partition_size_are_refused_below_accepted():
    strategy = _mask_strategy("fedpm")
    strategy.partition_sizes = (100, 100, 100, 100)
    strategy.ledger.sent_to["m"] = (1, 1001, 0)
    for claim, ok in ((100, True), (99, True), (101, False), (1e308, False)):
        reply = _reply(RecordDict({"metrics": MetricRecord({"num-examples": claim})}))
        assert bool(strategy.usable_replies(1, [reply])) == ok, claim


def test_fedpm_and_edge_popup_aggregators_take_huge_weights():
    state = {"w": np.full(4, 0.5, dtype=np.float32)}
    masks = [{"w": np.array([1, 0, 1, 0], bool)}, {"w": np.array([1, 1, 0, 0], bool)}]
    config = resolve({})
    assert np.isfinite(FedPMAggregator.from_config(config).aggregate(1, state, masks, [1e308, 1e308])["w"]).all()
    assert np.isfinite(EdgePopupAggregator.from_config(config).aggregate(1, state, masks, [1e308, 1e308])["w"]).all()


# ---------------------------------------------------------------- robust defaults (item 5)


def test_colluding_attackers_all_send_the_complement_of_the_global_mask():
    from fedmask.methods.edge_popup import TopK
    from fedmask.methods.fedpm import Bernoulli
    from fedmask.methods.slot_machines import Slots, planes_to_choices
    from fedmask.wire.frame import Layout

    theta = {"w": np.array([0.1, 0.6, 0.5, 0.9], np.float32)}
    assert Bernoulli().colluding_upload(theta)["w"].tolist() == [True, False, False, False]
    scores = {"w": np.array([3.0, -0.1, 2.0, 0.5], np.float32)}
    assert TopK(0.5).colluding_upload(scores)["w"].tolist() == [False, True, False, True]
    slots = {"w": np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32)}
    planes = Slots(slots=5).colluding_upload(slots)
    choices = planes_to_choices(planes, Layout((("w", (5, 7)),)))["w"]
    assert np.array_equal(choices, 4 - slots["w"].argmax(axis=0)) and choices.max() < 5


@pytest.mark.parametrize("method", ["fedpm", "edge-popup", "slot-machines"])
def test_colluding_attack_runs_and_every_attacker_sends_one_mask(tmp_path, method):
    overrides = {**SMALL, "num-rounds": 2, "method": method, "attack": "colluding", "attack-fraction": 0.5,
                 "uplink-codec": "packbits"}
    if method == "slot-machines":
        overrides["init"] = "kaiming-uniform"
    config = resolve(overrides)
    uploads: dict[int, bytes] = {}
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        reply = real_train(msg, context)
        blob = reply.content["arrays"]["mask"].numpy()
        crc = FRAME.slice("crc32")  # bound to the client: the rest of the upload is the crafted mask
        uploads[TrainInstruction.from_flat(msg.content["config"]).partition_id] = \
            blob[: crc.start].tobytes() + blob[crc.stop :].tobytes()
        return reply

    run_server(InProcessGrid(app, 4), config, tmp_path / "run")
    rows = _rounds(tmp_path / "run")
    assert all(r["failures"] == 0 and r["clients"] == 4 for r in rows)
    from fedmask.faults import attackers

    liars = sorted(attackers(config))
    assert len(liars) == 2 and uploads[liars[0]] == uploads[liars[1]]
    honest = [pid for pid in uploads if pid not in liars]
    assert uploads[honest[0]] != uploads[liars[0]]


def test_warning_when_the_robust_rule_cannot_hold_the_attackers(tmp_path, caplog):
    from fedmask.faults import robustness_warning

    base = {"attack": "colluding", "attack-fraction": 0.3}
    assert "trim-fraction" in robustness_warning(resolve({**base, "robust-aggregation": "trimmed"}))
    assert robustness_warning(resolve({**base, "robust-aggregation": "trimmed", "trim-fraction": 0.3})) is None
    assert robustness_warning(resolve({**base, "robust-aggregation": "median"})) is None
    assert "median" in robustness_warning(resolve({**base, "attack-fraction": 0.5, "robust-aggregation": "median"}))
    assert "'none'" in robustness_warning(resolve(base))
    assert robustness_warning(resolve({})) is None
    with caplog.at_level("WARNING", logger="fedmask"):
        config = resolve({**SMALL, "num-rounds": 1, **base, "robust-aggregation": "trimmed"})
        run_server(InProcessGrid(real_client_app, 4), config, tmp_path / "run")
    assert any("trim-fraction" in record.getMessage() for record in caplog.records)


def test_dense_robust_rules_ignore_an_outlier():
    from fedmask.methods.dense import dense_aggregate

    honest = [{"w": np.full(3, v, np.float32)} for v in (1.0, 1.1, 0.9)]
    states = [*honest, {"w": np.full(3, 1e30, np.float32)}]
    plain = dense_aggregate(states, [1.0] * 4, VoteRule.from_config(resolve({})))["w"]
    median = dense_aggregate(states, [1.0] * 4, VoteRule.from_config(resolve({"robust-aggregation": "median"})))["w"]
    trimmed = dense_aggregate(states, [1.0] * 4,
                              VoteRule.from_config(resolve({"robust-aggregation": "trimmed", "trim-fraction": 0.25})))
    assert plain.min() > 1e29
    assert np.allclose(median, 1.05) and median.dtype == np.float32
    assert np.allclose(trimmed["w"], 1.05)


def _scaling_app(factor: float) -> ClientApp:
    """Partition 1 uploads its dense weights times ``factor`` (finite, so they pass the checks)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        reply = real_train(msg, context)
        if TrainInstruction.from_flat(msg.content["config"]).partition_id == 1:
            arrays = {k: Array((v.numpy() * factor).astype(np.float32)) for k, v in reply.content["arrays"].items()}
            reply.content["arrays"] = ArrayRecord(arrays)
        return reply

    return app


def test_fedavg_median_holds_off_a_scaling_client(tmp_path):
    base = {**SMALL, "method": "fedavg", "optimizer": "sgd", "lr": 0.05}
    rows = {}
    for rule in ("none", "median"):
        config = resolve({**base, "robust-aggregation": rule})
        run_server(InProcessGrid(_scaling_app(1e4), 4), config, tmp_path / rule)
        rows[rule] = _rounds(tmp_path / rule)
    assert rows["median"][-1]["accuracy"] > 0.5
    assert rows["median"][-1]["accuracy"] > rows["none"][-1]["accuracy"] + 0.2
