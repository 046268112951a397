"""What a method is, as the rest of fedmask calls it: a mask mode and an aggregation rule.

A method has two halves, kept together in its module (:mod:`fedmask.methods.fedpm`, ...):

- its **mask mode** (:class:`MaskMode`): what every party derives from the seed and the
  broadcast state. The masked layer a client trains, what it uploads and how that is coded,
  what a state means to a client (its starting scores), and what the state implies: the
  prior the uplink coder codes against, the global mask, the contexts of the lossless
  downlink. Its parameters are the fields of the frozen dataclass itself, built from the
  config by :meth:`MaskMode.from_config`.
- its **aggregation rule** (:class:`MaskAggregator`): how the server turns the clients'
  decoded uploads into the next global state.

The aggregation rule is the plug-in point. A plug-in subclasses :class:`MaskAggregator`,
names the mask mode its clients train (``mask_mode``, one of :data:`fedmask.names.MASK_MODES`)
and implements :meth:`~MaskAggregator.aggregate`; Flower, the codecs, the ledger and
failures are handled around it (the strategies in ``server/``), so the same class runs in
a plain loop too. It is pure numpy: state and masks in, next state out.

The meaning of the state follows ``mask_mode`` (clients rely on it):

- ``bernoulli``: per-weight keep probabilities ``theta`` in (0, 1); clients start their
  scores at ``logit(theta)`` and upload one Bernoulli sample.
- ``topk`` (and ``biprop``): per-weight scores; clients keep the ``density`` fraction of
  largest ``|score|`` per tensor, start from these scores and upload their top-k mask.
- ``slots``: (K, *shape) scores per tensor, K candidates per connection; clients start
  from them and upload the index they choose per connection. ``aggregate`` then gets
  integer index arrays of the connection shape instead of bool masks.
- ``laperm``: per tensor, the rank of every weight in its row; clients upload their ranks.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar

import numpy as np
import torch
from torch import nn

from fedmask.core.masking import SeededTensor, set_scores
from fedmask.names import MASK_ATTACKS, MASK_DOWNLINK_CODECS
from fedmask.wire.frame import Layout
from fedmask.wire.masks import BINARY_CODECS, Prior, decode_masks, encode_masks

State = dict[str, np.ndarray]
Masks = dict[str, np.ndarray]
Contexts = dict[str, tuple[np.ndarray, int]]  # per tensor: (a small integer per entry, how many)


class Settings(Protocol):
    """What a method reads its parameters from: the run config's kebab-case keys
    (:class:`fedmask.config.RunConfig` is one; so is any mapping of them)."""

    def __getitem__(self, key: str) -> Any: ...


# ---------------------------------------------------------------- the aggregation rule


@dataclass(frozen=True)
class RoundResult:
    """What a round's aggregation made: the next ``state``; the round's aggregated ``votes``
    and the number of ``clients`` they count, when a node can replay the update from them
    (the lossless downlink sends them instead of the state); None otherwise."""

    state: State
    votes: State | None = None
    clients: float = 0.0


def make_params(params: type, given: tuple[tuple[str, Any], ...]) -> Any:
    """``params(**fields)`` from ``plugin.<field>`` pairs (kebab-case names; ints become floats
    for float fields, as config keys do)."""
    defaults = {f.name: f.default for f in dataclasses.fields(params)}
    values = {key.replace("-", "_"): value for key, value in given}
    return params(**{key: float(value) if isinstance(defaults.get(key), float) and not isinstance(value, bool)
                     else value for key, value in values.items()})


class MaskAggregator(ABC):
    """Base class of every aggregation rule; subclass it and name it as ``module:Class``.

    The server calls, per round: :meth:`fold` once per decoded upload, in partition order,
    then :meth:`finish`; or :meth:`discard` when the round is skipped. The default ``fold``
    keeps the uploads in :attr:`pending` and ``finish`` hands them to :meth:`aggregate`, so a
    plug-in implements ``aggregate`` alone. A rule that streams (never holds a round's
    masks) overrides ``fold``, ``finish`` and ``discard`` together. A subclass that defines
    ``aggregate`` and not ``fold``/``finish`` (also below a built-in rule) is aggregated from
    the list: its ``aggregate`` decides.
    """

    mask_mode: ClassVar[str] = "bernoulli"
    replayable: ClassVar[bool] = False  # whether nodes can replay the update from the round's votes
    # A plug-in's parameters: a frozen dataclass whose fields (defaults: numbers, booleans,
    # strings) the config sets as ``plugin.<field>`` keys; the instance is ``self.params``.
    Params: ClassVar[type | None] = None

    def __init__(self, config: Any = None):
        """``config``: the run's :class:`fedmask.config.RunConfig` (a plug-in reads what it needs);
        with a ``Params`` dataclass, ``self.params`` holds the config's ``plugin.<field>`` values."""
        self.config = config
        self.pending: list[tuple[Masks, float]] = []  # the round's uploads, for :meth:`aggregate`
        if self.Params is not None:  # not typed here: the built-in rules' ``params`` are their own
            vars(self)["params"] = make_params(self.Params, tuple(getattr(config, "plugin_params", ()) or ()))

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "aggregate" in cls.__dict__ and not {"fold", "finish"} & cls.__dict__.keys():
            cls.fold, cls.finish, cls.discard = (  # type: ignore[method-assign]
                MaskAggregator.fold, MaskAggregator.finish, MaskAggregator.discard)

    @classmethod
    def from_config(cls: type[_A], config: Settings) -> _A:
        """The rule for a run: a plug-in gets the run config; built-in rules their own parameters."""
        return cls(config)

    def initial_state(self, scores: State) -> State:
        """First broadcast, from the model's seeded initial scores (default: the mask mode's)."""
        return MODES[self.mask_mode].seed_state(scores)

    def state_dict(self) -> State:
        """Memory kept between rounds (saved in checkpoints); none by default."""
        return {}

    def load_state_dict(self, arrays: State) -> None:  # noqa: B027 - an optional hook, empty by default
        """Restore what :meth:`state_dict` returned, when a run resumes."""

    def state_diagnostics(self, state: State) -> dict[str, float]:
        """Figures of a new state for the round's line (FedPM: the share of theta at its clamp)."""
        return {}

    def fold(self, server_round: int, state: State, mask: Masks, weight: float) -> None:
        """Take one client's decoded mask (same keys and shapes as ``aggregate`` gets)."""
        if not hasattr(self, "pending"):
            raise TypeError(f"{type(self).__name__}.__init__ must call super().__init__(config)")
        self.pending.append((mask, weight))

    def finish(self, server_round: int, state: State) -> RoundResult:
        """The next state from everything folded since the last ``finish`` (or ``discard``)."""
        masks, weights = [m for m, _ in self.pending], [w for _, w in self.pending]
        self.discard()
        return RoundResult(self.aggregate(server_round, state, masks, weights))

    def discard(self) -> None:
        """Forget what was folded (a round skipped for too few uploads)."""
        self.pending = []

    @abstractmethod
    def aggregate(self, server_round: int, state: State, masks: list[Masks], weights: list[float]) -> State:
        """The next global state from this round's decoded masks (bool arrays).

        ``weights`` are the clients' ``num-examples``; ``masks[i]`` has the same keys and
        shapes as ``state``. Return float32 arrays of those shapes.
        """


_A = TypeVar("_A", bound=MaskAggregator)


# ---------------------------------------------------------------- the mask mode


@dataclass(frozen=True)
class Restriction:
    """A config key that must keep one of ``allowed`` values under a method, and why."""

    allowed: tuple[Any, ...]
    why: str


MODES: dict[str, type[MaskMode]] = {}  # by name: every mask mode, registered by its module (mask_mode)


def mask_mode(cls: type[_M]) -> type[_M]:
    """Class decorator: register a mask mode under its ``name``."""
    MODES[cls.name] = cls
    return cls


class MaskMode(ABC):
    """What one kind of mask is on every party (see the module doc); a frozen dataclass of
    its parameters in each method's module."""

    name: ClassVar[str]
    probabilistic: ClassVar[bool] = False  # uploads a sample of per-weight probabilities (relative-entropy coding)
    default_uplink: ClassVar[str] = "entropy"  # what uplink-codec = "auto" codes this mode's uploads with
    recyclable: ClassVar[bool] = False  # Iterative Weight Recycling applies (a top-k of scores)
    has_mask: ClassVar[bool] = True  # uploads are binary tensors (LaPerm's are ranks)
    batched: ClassVar[bool] = False  # the batched engine trains it (:meth:`batched_weight`)

    @classmethod
    @abstractmethod
    def from_config(cls: type[_M], config: Settings) -> _M:
        """The mode with its parameters read from the run config's keys."""

    @classmethod
    def restrictions(cls) -> dict[str, Restriction]:
        """What this mode cannot do, whichever rule (built-in or plug-in) aggregates it."""
        rules = {"attack": Restriction(MASK_ATTACKS, "a mask upload is bits: 'poison' scales dense updates"),
                 "downlink-codec": Restriction(MASK_DOWNLINK_CODECS, "'ef-qsgd' quantizes a dense model's update; "
                                               "a mask state goes exactly as 'lossless'")}
        if not cls.probabilistic:
            rules["uplink-codec"] = Restriction((*BINARY_CODECS, "auto"), "relative-entropy codes a sample of "
                                                "per-weight probabilities: FedPM's Bernoulli masks")
        if not cls.recyclable:
            rules["recycle-every"] = Restriction((0,), "weight recycling ranks top-k scores: edge-popup, biprop")
        return rules

    @classmethod
    def uplink_codec(cls, configured: str) -> str:
        """The codec uploads are coded with: ``uplink-codec``, or for ``"auto"`` the mode's own."""
        return cls.default_uplink if configured == "auto" else configured

    @staticmethod
    def seed_state(scores: State) -> State:
        """The state the seed's scores stand for (the first broadcast of the built-in rules)."""
        return {k: v.astype(np.float32) for k, v in scores.items()}

    # ------------------------------------------------------------ the model

    @abstractmethod
    def parametrize(self, tensor: SeededTensor) -> tuple[nn.Module, torch.Tensor]:
        """The parametrization of one tensor, and the values its ``original`` takes."""

    def scores_of_state(self, state: State) -> State:
        """The scores a client trains from after this broadcast state."""
        return state

    def load_scores(self, model: nn.Module, scores: State) -> None:
        """Put :meth:`scores_of_state`'s scores into the model."""
        set_scores(model, scores)

    def load_state(self, model: nn.Module, state: State) -> None:
        """Put a broadcast state into the model."""
        self.load_scores(model, self.scores_of_state(state))

    def optimizer(self) -> Callable[[list[torch.Tensor]], Any] | None:
        """The local optimizer of the scores (None: the run's ``optimizer`` and ``lr``)."""
        return None

    def after_step(self, model: nn.Module) -> Callable[[int], None] | None:
        """Called with the step count after each local step (None: nothing)."""
        return None

    def after_training(self, model: nn.Module) -> None:  # noqa: B027 - an optional hook
        """What a client does once its local epochs are over, before it uploads."""

    def batched_weight(self, frozen: torch.Tensor, scores: torch.Tensor,
                       generators: list[torch.Generator]) -> torch.Tensor:
        """Several clients' weights at once (the batched engine): ``scores`` (clients, *shape)
        over one ``frozen`` tensor, each client's samples from its own generator, as the
        parametrization computes each alone."""
        raise NotImplementedError(f"the batched engine does not train {self.name!r} masks")

    # ------------------------------------------------------------ uploads

    @abstractmethod
    def upload(self, model: nn.Module, probabilities: bool = False) -> Masks:
        """What a client sends, before coding: a mask, a choice or an arrangement per tensor
        (for a binary upload, the tensors of :meth:`upload_layout`); with ``probabilities``
        (a probabilistic mode, relative-entropy coding), the probabilities it samples from."""

    def upload_layout(self, layout: Layout) -> Layout:
        """The tensors an upload carries, given the state's layout (the same, by default)."""
        return layout

    def encode_upload(self, upload: Masks, layout: Layout, fingerprint: bytes, codec: str, prior: Prior | None,
                      rng: np.random.Generator, bind: tuple[int, int] | None = None) -> np.ndarray:
        """The coded upload (``layout``: :meth:`upload_layout`'s; ``bind``: its round and client)."""
        return encode_masks(upload, layout, fingerprint, codec=codec, prior=prior, bind=bind)

    def decode_upload(self, blob: np.ndarray, layout: Layout, fingerprint: bytes, prior: Prior | None,
                      codec: str, lengths: dict[str, float], bind: tuple[int, int] | None = None) -> Masks:
        """What the aggregation rule gets from a coded upload (``WireError`` when it is bad,
        or sent for another round or client than ``bind``), and in ``lengths`` its ideal and
        formula bits."""
        return decode_masks(blob, layout, fingerprint, prior, lengths, bind=bind)

    def votes(self, upload: Masks, state_layout: Layout) -> Masks:
        """What the aggregation rule gets from a decoded binary upload (the upload itself, by default)."""
        return upload

    # ------------------------------------------------------------ what the state implies

    @abstractmethod
    def prior(self, state: State) -> Prior:
        """What the uplink coder codes an upload against: P(bit = 1) per uploaded bit."""

    @abstractmethod
    def global_mask(self, state: State) -> Masks | None:
        """The mask the state stands for (None: the mode has none)."""

    def colluding_upload(self, state: State) -> Masks:
        """The one crafted upload colluding attackers send: the complement of the global mask."""
        mask = self.global_mask(state)
        if mask is None:
            raise ValueError(f"attack 'colluding': {self.name} uploads have no mask to invert")
        return {name: ~np.asarray(value, dtype=bool) for name, value in mask.items()}

    def vote_contexts(self, state: State) -> Contexts:
        """Per tensor, (a small integer per vote entry, how many): what the state tells of
        the next round's votes, for the lossless downlink (default: one context)."""
        return {name: (np.zeros(value.size, dtype=np.int64), 1) for name, value in state.items()}

    def state_diagnostics(self, state: State) -> dict[str, float]:
        """Figures of a new state for the round's line (FedPM: theta's entropy)."""
        return {}


_M = TypeVar("_M", bound=MaskMode)
