"""The dense baselines the mask methods are judged against: FedAvg and compressed updates.

FedAvg's clients train the dense model from the broadcast float32 weights and send their
weights back; the server averages them (Flower's FedAvg mean; FedTrimmedAvg's or
FedMedian's rule with ``robust-aggregation``: :func:`dense_aggregate`).

The compressed baselines' clients train as FedAvg's and upload their update
``delta = local weights - broadcast weights``, compressed (:class:`Compressed`; the bytes
are :mod:`fedmask.wire.updates`):

- ``signsgd``, SignSGD with majority vote (Bernstein et al., ICML 2018): one bit per
  parameter; the server moves every weight by ``signsgd-server-lr`` towards the majority.
- ``ef-signsgd`` (Karimireddy et al., ICML 2019): the sign times the mean ``|p|`` of each
  tensor, with error feedback: ``p = delta + e``, the client keeps ``e = p - C(p)``.
- ``qsgd`` (Alistarh et al., NeurIPS 2017): the norm, and per parameter a sign and one of
  ``qsgd-levels`` levels by stochastic rounding (unbiased), range-coded.
- ``topk-ef`` (Stich et al., NeurIPS 2018): the ``topk-fraction`` largest ``|p|`` of each
  tensor, with error feedback.

Their downlink is the float32 state, or with ``downlink-codec = "ef-qsgd"`` the round's
update squeezed as DoubleSqueeze's server does (Tang et al., "DoubleSqueeze: Parallel
Stochastic Gradient Descent with Double-pass Error-Compensated Compression", ICML 2019):
the server QSGD-quantizes ``new - previous + e`` (:class:`SqueezedDownlink`), keeps the
residual ``e`` for the next round, and every party, the server included, moves its state
by the quantized update alone (:func:`apply_update`), so all hold the same model. The
update's values travel as the lossless downlink's steps (:mod:`fedmask.downlink`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedmask.core.weights import derive_seed
from fedmask.methods.base import Settings, State
from fedmask.methods.votes import VoteRule, relative
from fedmask.names import COMPRESSORS
from fedmask.wire.frame import Layout
from fedmask.wire.lossless import Contexts
from fedmask.wire.updates import Update, compress, decompress, qsgd_quantize

MEAN = VoteRule()  # the plain (weighted) mean: no robust rule


def dense_aggregate(states: list[State], weights: list[float], rule: VoteRule) -> State:
    """The dense baseline's next weights, as ``robust-aggregation`` says.

    ``none`` is Flower's FedAvg mean (``weight / total`` per client, accumulated in the
    tensors' dtype, clients in the order given). ``trimmed`` is Flower's FedTrimmedAvg rule,
    the unweighted coordinate-wise mean after cutting ``trim-fraction`` of the values at
    each end; ``median`` is FedMedian's coordinate-wise median.
    """
    out: State = {}
    if rule.rule == "none":
        weights = relative(weights)
        total = sum(weights)
        for state, factor in zip(states, [w / total for w in weights]):
            for name, value in state.items():
                if name in out:
                    out[name] += value * factor
                else:
                    out[name] = value * factor
        return {name: np.asarray(v) for name, v in out.items()}
    n = len(states)
    for name, first in states[0].items():
        stacked = np.stack([state[name] for state in states])
        if rule.rule == "median":
            merged = np.median(stacked, axis=0)
        else:
            cut = int(rule.trim_fraction * n)
            merged = np.sort(stacked, axis=0)[cut:n - cut].mean(axis=0)
        out[name] = merged.astype(first.dtype)
    return out


class ErrorFeedback:
    """A client's memory of what compression left out (``e = p - C(p)``), by tensor."""

    def __init__(self, memory: Mapping[str, np.ndarray] | None = None):
        self.memory = {k: np.asarray(v, dtype=np.float32) for k, v in (memory or {}).items()}

    def add(self, update: Mapping[str, np.ndarray]) -> Update:
        """``p = delta + e``."""
        return {k: (np.asarray(v, np.float32) + self.memory.get(k, np.float32(0))).astype(np.float32)
                for k, v in update.items()}

    def keep(self, corrected: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray]) -> None:
        """``e = p - C(p)``."""
        self.memory = {k: (corrected[k] - sent[k]).astype(np.float32) for k in corrected}


def aggregate_updates(kind: str, state: Mapping[str, np.ndarray], updates: list[Update], weights: list[float],
                      sign_lr: float, rule: VoteRule = MEAN) -> Update:
    """The next dense state from the clients' decoded updates.

    ``sign``: every weight moves by ``sign_lr`` towards the clients' majority sign (one vote
    per client, as in SignSGD with majority vote; a tie moves nothing). The others add the
    example-weighted mean of the updates, as FedAvg would with the full updates. With a
    robust ``rule`` the updates are combined coordinate-wise as FedAvg's weights are
    (:func:`dense_aggregate`: the median, or the trimmed mean), the signs too.
    """
    new_state = {}
    total = float(sum(weights))
    for name, value in state.items():
        base = np.asarray(value)
        if rule.rule != "none":
            combined = dense_aggregate([{name: np.sign(u[name]) if kind == "sign" else u[name]} for u in updates],
                                       weights, rule)[name].astype(np.float64)
            step = sign_lr * np.sign(combined) if kind == "sign" else combined
        elif kind == "sign":
            votes = np.asarray(sum(np.sign(u[name]).astype(np.float64) for u in updates))
            step = sign_lr * np.sign(votes)
        else:
            step = np.asarray(sum(w * u[name].astype(np.float64) for w, u in zip(weights, updates))) / total
        new_state[name] = (base.astype(np.float64) + step).astype(base.dtype)
    return new_state


STATE_GROWTH = 1e3  # a new dense state whose largest |weight| grows more than this is refused


def state_problem(new: State, old: State) -> str | None:
    """Why a new dense state must not be broadcast (NaN or inf; a largest magnitude that grew
    more than :data:`STATE_GROWTH` times, and past 1), or None. A poisoned update can be
    finite and well-formed, so the state it makes is checked, not just the uploads."""
    for name, value in new.items():
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            return f"the new state's '{name}' holds NaN or inf"
    new_max, old_max = _largest(new), _largest(old)
    if new_max > max(1.0, STATE_GROWTH * old_max):
        return (f"the new state's largest |weight| is {new_max:.3g}, more than {STATE_GROWTH:g}x the last "
                f"state's {old_max:.3g}")
    return None


def _largest(state: State) -> float:
    return max((float(np.abs(v).max()) for v in state.values() if v.dtype.kind == "f" and v.size), default=0.0)


@dataclass(frozen=True)
class Compressed:
    """A compressed dense baseline: how a client codes its update, how the server applies them."""

    compressor: str  # one of fedmask.names.COMPRESSORS
    error_feedback: bool = False
    levels: int = 4  # qsgd-levels
    fraction: float = 0.01  # topk-fraction
    sign_lr: float = 0.002  # signsgd-server-lr

    def __post_init__(self) -> None:
        if self.compressor not in COMPRESSORS:
            raise ValueError(f"compressor: expected one of {', '.join(COMPRESSORS)}, got {self.compressor!r}")

    @classmethod
    def from_config(cls, config: Settings, compressor: str, error_feedback: bool) -> Compressed:
        return cls(compressor, error_feedback, config["qsgd-levels"], config["topk-fraction"],
                   config["signsgd-server-lr"])

    def upload(self, local: State, broadcast: State, memory: State | None, layout: Layout, fingerprint: bytes,
               rng: np.random.Generator, bind: tuple[int, int] | None = None) -> tuple[np.ndarray, State | None]:
        """The coded update ``local - broadcast`` (plus the error ``memory`` with error
        feedback), bound to ``bind`` (round, client), and the memory to keep (None without
        error feedback)."""
        delta = {k: local[k].astype(np.float32) - np.asarray(broadcast[k], dtype=np.float32) for k in local}
        feedback = ErrorFeedback(memory if self.error_feedback else None)
        corrected = feedback.add(delta)
        blob, sent = compress(corrected, layout, fingerprint, self.compressor, rng, self.levels, self.fraction, bind)
        if not self.error_feedback:
            return blob, None
        feedback.keep(corrected, sent)
        return blob, feedback.memory

    def decode(self, blob: np.ndarray, layout: Layout, fingerprint: bytes,
               bind: tuple[int, int] | None = None) -> Update:
        return decompress(blob, layout, fingerprint, self.compressor, self.levels, bind)

    def aggregate(self, state: State, updates: list[Update], weights: list[float], rule: VoteRule = MEAN) -> State:
        return aggregate_updates(self.compressor, state, updates, weights, self.sign_lr, rule)


# ---------------------------------------------------------------- the ef-qsgd downlink


def dense_fingerprint(layout: Layout, seed: int, model: str) -> bytes:
    """The fingerprint of a dense model's bytes, uploads and broadcasts alike."""
    return layout.fingerprint(seed, model, "dense")


def downlink_levels(bits: int) -> int:
    """QSGD's ``s`` for ``downlink-bits``: ``2**(bits - 1) - 1`` magnitudes and a sign, so a
    tensor's update takes at most ``2**bits - 1`` values (before entropy coding)."""
    return 2 ** (bits - 1) - 1


def apply_update(state: State, update: State, clients: float = 0.0) -> State:
    """A dense state moved by a broadcast update, in float32: the server's step and every
    node's replay of it (``clients`` is unused; the lossless downlink's replay signature)."""
    return {name: (np.asarray(value, np.float32) + np.asarray(update[name], np.float32)).astype(value.dtype)
            for name, value in state.items()}


def update_contexts(state: State) -> Contexts:
    """One context for every entry: nothing in the previous state predicts a QSGD level."""
    return {name: (np.zeros(np.asarray(value).size, dtype=np.int64), 1) for name, value in state.items()}


class SqueezedDownlink:
    """The server's half of DoubleSqueeze (Tang et al., ICML 2019) with QSGD's quantizer
    (Alistarh et al., NeurIPS 2017): per round, ``p = (new - previous) + e``, the sent update
    ``C(p)`` QSGD-quantized with ``levels`` per tensor (seeded by ``(seed, round)``) and
    shrunk by its least-squares factor, which makes it a contraction
    (:func:`~fedmask.wire.updates.qsgd_quantize`), and the residual ``e = p - C(p)`` kept for
    the next round. Over rounds the updates sent add up to the true ones less the last
    residual: nothing the quantizer drops is lost, and the residual stays bounded."""

    def __init__(self, levels: int, seed: int, residual: State | None = None):
        self.levels, self.seed = levels, seed
        self.feedback = ErrorFeedback(residual)

    @property
    def residual(self) -> State:
        return self.feedback.memory

    def step(self, server_round: int, previous: State, new: State, layout: Layout) -> State:
        """The update to broadcast for the move ``previous -> new``; the residual is kept."""
        true = {name: np.asarray(new[name], np.float32) - np.asarray(previous[name], np.float32)
                for name, _ in layout.shapes}
        corrected = self.feedback.add(true)
        rng = np.random.default_rng(derive_seed(self.seed, "downlink", server_round))
        sent = qsgd_quantize(corrected, layout, self.levels, rng, shrink=True)
        sent = {name: value + np.float32(0) for name, value in sent.items()}  # -0.0 -> 0.0: one zero on the wire
        self.feedback.keep(corrected, sent)
        return sent
