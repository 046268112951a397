"""The methods, one module each, and the registry: one table that says what each method is.

=================  ===========================================  ======================
module             mask mode (what clients train and upload)    aggregation rule
=================  ===========================================  ======================
``fedpm``          :class:`~fedmask.methods.fedpm.Bernoulli`     ``FedPMAggregator``
``edge_popup``     :class:`~fedmask.methods.edge_popup.TopK`     ``EdgePopupAggregator``
``biprop``         :class:`~fedmask.methods.biprop.Biprop`       ``BipropAggregator``
``slot_machines``  :class:`~fedmask.methods.slot_machines.Slots` ``SlotMachineAggregator``
``laperm``         :class:`~fedmask.methods.laperm.LaPerm`       ``LaPermAggregator``
``dense``          (dense weights: FedAvg, compressed updates)  ``dense_aggregate``, ``Compressed``
=================  ===========================================  ======================

``base`` holds what they share with plug-ins (:class:`~fedmask.methods.base.MaskAggregator`,
:class:`~fedmask.methods.base.MaskMode`), ``votes`` the vote maths of the built-in rules.

For every method the registry says its mask mode (None for the dense baselines), its
aggregation rule, the config keys that only it reads, and the keys whose values it cannot
work with. The config checks, the ClientApp, the ServerApp, the benchmarks and ``fedmask
keys`` all read this table; nothing else lists the methods. A plug-in, ``"module:Class"``
with ``Class`` a :class:`~fedmask.methods.base.MaskAggregator`, gets an entry built from its
class: its mask mode, and the rules of that mode.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from fedmask.methods.base import MODES, MaskAggregator, MaskMode, Restriction, Settings
from fedmask.methods.biprop import Biprop, BipropAggregator
from fedmask.methods.dense import Compressed
from fedmask.methods.edge_popup import EdgePopupAggregator, TopK
from fedmask.methods.fedpm import Bernoulli, FedPMAggregator
from fedmask.methods.laperm import LaPerm, LaPermAggregator
from fedmask.methods.slot_machines import SlotMachineAggregator, Slots
from fedmask.names import DENSE_ATTACKS, DENSE_DOWNLINK_CODECS, MASK_MODES
from fedmask.plugins import PluginError, import_object, is_plugin_name

__all__ = ["BUILTIN", "MODES", "Method", "PluginError", "Restriction", "get_method", "is_plugin_name", "load_plugin",
           "mode_of"]


@dataclass(frozen=True)
class Method:
    """What one method is: its mask mode, its aggregation rule, the keys it reads and refuses."""

    name: str
    summary: str
    mode: type[MaskMode] | None  # None: a dense baseline, no masks
    aggregator: type[MaskAggregator] | None
    keys: tuple[str, ...] = ()  # keys that only this method (among the built-ins) reads
    restrictions: Mapping[str, Restriction] = field(default_factory=dict)
    secure_aggregation: bool = False  # runs under Flower's SecAgg+ (the server needs sums only)
    compressor: str | None = None  # compressed dense baselines: how the update is compressed
    error_feedback: bool = False  # compressed dense baselines: the client keeps what compression left out
    builtin: bool = True  # a built-in rule, which nodes can replay (a plug-in cannot be imported on a node)

    @property
    def mask_mode(self) -> str | None:
        return None if self.mode is None else self.mode.name

    @property
    def dense(self) -> bool:
        return self.mode is None

    def make_mode(self, config: Settings) -> MaskMode:
        """The mask mode with this run's parameters (not for the dense baselines)."""
        if self.mode is None:
            raise ValueError(f"method {self.name!r} trains dense weights: it has no mask mode")
        return self.mode.from_config(config)

    def make_aggregator(self, config: Settings) -> MaskAggregator:
        """The server's aggregation rule for a run (not for the dense baselines)."""
        if self.aggregator is None:
            raise ValueError(f"method {self.name!r} aggregates dense weights with Flower's FedAvg, "
                             "not with a MaskAggregator")
        return self.aggregator.from_config(config)

    def compression(self, config: Settings) -> Compressed | None:
        """A compressed dense baseline's coding (None for the others)."""
        if self.compressor is None:
            return None
        return Compressed.from_config(config, self.compressor, self.error_feedback)


def mode_of(name: str) -> type[MaskMode]:
    """The mask mode class of a mode name (one of :data:`fedmask.names.MASK_MODES`)."""
    if name not in MODES:
        raise ValueError(f"mask mode: expected one of {', '.join(MASK_MODES)}, got {name!r}")
    return MODES[name]


_DENSE_RULES = {
    "recycle-every": Restriction((0,), "weight recycling ranks top-k scores: edge-popup, biprop"),
    "attack": Restriction(DENSE_ATTACKS, "the other attacks rewrite mask votes"),
    "downlink-codec": Restriction(DENSE_DOWNLINK_CODECS, "the dense baselines send their float32 weights as they "
                                  "are, or with 'ef-qsgd' their round update quantized"),
}
_TOPK_KEYS = ("density", "edge-popup-server-lr", "edge-popup-server-rule", "edge-popup-vote-weight",
              "edge-popup-levels", "recycle-every", "recycle-fraction")


def _mask(name: str, summary: str, mode: type[MaskMode], aggregator: type[MaskAggregator], keys: tuple[str, ...],
          secure_aggregation: bool = False) -> Method:
    return Method(name, summary, mode, aggregator, keys, mode.restrictions(), secure_aggregation)


def _dense(name: str, summary: str, keys: tuple[str, ...] = (), compressor: str | None = None,
           error_feedback: bool = False) -> Method:
    return Method(name, summary, None, None, keys, _DENSE_RULES, compressor=compressor, error_feedback=error_feedback)


BUILTIN: Mapping[str, Method] = MappingProxyType({
    "fedpm": _mask("fedpm", "FedPM: Bernoulli masks, Bayesian (Beta posterior) aggregation; broadcasts theta",
                   Bernoulli, FedPMAggregator, ("fedpm-eps", "fedpm-prior-reset", "fedpm-prior-reset-rule",
                                                "fedpm-gradient", "eval-mask", "secure-aggregation", "rec-block-bits",
                                                "rec-extra-bits", "rec-debias"),
                   secure_aggregation=True),
    "edge-popup": _mask("edge-popup", "edge-popup: top-k masks over scores; votes move the global scores",
                        TopK, EdgePopupAggregator, _TOPK_KEYS),
    "biprop": _mask("biprop", "Biprop: top-k masks, weights sign(w) * alpha; aggregated as edge-popup",
                    Biprop, BipropAggregator, (*_TOPK_KEYS, "biprop-gradient", "biprop-scale-fan")),
    "slot-machines": _mask("slot-machines", "Slot Machines: K seeded candidates per connection; clients upload their "
                           "choice", Slots, SlotMachineAggregator,
                           ("slots", "slot-selection", "slot-server-lr", "slot-score-init", "eval-mask")),
    "laperm": _mask("laperm", "LaPerm: clients permute each row's seeded weight values; ranks up, Borda-merged "
                    "ranks down", LaPerm, LaPermAggregator, ("laperm-sync", "laperm-lr", "laperm-rank-step")),
    "fedavg": _dense("fedavg", "FedAvg: the dense float32 baseline (Flower's FedAvg aggregation)"),
    "signsgd": _dense("signsgd", "SignSGD with majority vote: 1 bit per parameter up, the server steps by the "
                      "majority sign", ("signsgd-server-lr",), "sign"),
    "ef-signsgd": _dense("ef-signsgd", "EF-SignSGD: scaled signs (1 bit per parameter + a scale per tensor) with "
                         "error feedback", (), "scaled-sign", True),
    "qsgd": _dense("qsgd", "QSGD: norm, signs and qsgd-levels stochastic levels per parameter, range-coded",
                   ("qsgd-levels",), "qsgd"),
    "topk-ef": _dense("topk-ef", "top-k sparsification with error feedback: topk-fraction of each tensor, positions "
                      "coded", ("topk-fraction",), "topk", True),
})


def keys_read(method: Method) -> frozenset[str]:
    """The registry's method-only keys (any built-in's ``keys``) that ``method`` reads: its own;
    for a plug-in, those of the built-in methods of its mask mode (which its clients train)."""
    if method.builtin:
        return frozenset(method.keys)
    return frozenset(key for other in BUILTIN.values() if other.mode is method.mode for key in other.keys)


METHOD_KEYS = frozenset(key for method in BUILTIN.values() for key in method.keys)  # read by some methods only


def uplink_codec_named(method: str, configured: str) -> str:
    """The uplink codec a run's mask uploads are coded with, read from its config without
    importing a plug-in: ``configured``, or for ``"auto"`` a built-in mask method's own
    (a plug-in's stays ``"auto"``; a dense baseline has its own update codec)."""
    entry = BUILTIN.get(method)
    return entry.mode.uplink_codec(configured) if entry is not None and entry.mode is not None else configured


def get_method(name: str) -> Method:
    """The registry entry for a built-in name, or for a plug-in ``module:Class`` (imported now)."""
    if name in BUILTIN:
        return BUILTIN[name]
    if not is_plugin_name(name):
        raise PluginError(f"method: expected one of {', '.join(BUILTIN)} or 'module:Class', got {name!r}")
    cls = load_plugin(name)
    summary = (inspect.getdoc(cls) or cls.__name__).splitlines()[0]
    mode = MODES[cls.mask_mode]
    return Method(name, summary, mode, cls, (), mode.restrictions(), builtin=False)


def load_plugin(name: str) -> type[MaskAggregator]:
    """Import ``module:Class`` and check that it is a usable :class:`MaskAggregator`."""
    try:
        cls = import_object(name)
    except PluginError as err:
        raise PluginError(f"method: {err}") from None
    if not (isinstance(cls, type) and issubclass(cls, MaskAggregator)):
        raise PluginError(f"method: {name!r} must be a subclass of fedmask.methods.base.MaskAggregator "
                          "(fedmask.MaskAggregator)")
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(cls.__abstractmethods__))
        raise PluginError(f"method: {name!r} does not implement {missing}")
    if cls.mask_mode not in MASK_MODES:
        raise PluginError(f"method: {name!r} has mask_mode {cls.mask_mode!r}; expected one of {', '.join(MASK_MODES)}")
    return cls
