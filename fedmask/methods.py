"""The method registry: one table that says what each method is.

For every method it says the mask its clients train (``mask_mode``; None for the dense
baseline), the aggregation rule the server runs, the config keys that only it reads, and
the keys whose values it cannot work with. The config checks, the ClientApp, the
ServerApp, the benchmarks and ``fedmask keys`` all read this table; nothing else lists
the methods.

A plug-in, ``"module:Class"`` with ``Class`` a :class:`~fedmask.aggregators.MaskAggregator`,
gets an entry built from its class: its mask mode, and the rules of that mode.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from fedmask.aggregators import (
    BipropAggregator,
    EdgePopupAggregator,
    FedPMAggregator,
    MaskAggregator,
    SlotMachineAggregator,
)
from fedmask.laperm import LaPermAggregator
from fedmask.masking import MASK_MODES, TOPK_MODES


class PluginError(ValueError):
    """A ``module:Class`` method that cannot be used; the message names it."""


@dataclass(frozen=True)
class Restriction:
    """A key that must keep one of ``allowed`` values under a method, and why."""

    allowed: tuple[Any, ...]
    why: str


@dataclass(frozen=True)
class Method:
    """What one method is: its mask, its aggregation rule, the keys it reads and refuses."""

    name: str
    summary: str
    mask_mode: str | None  # None: the dense baseline (FedAvg), no masks
    aggregator: type[MaskAggregator] | None
    keys: tuple[str, ...] = ()  # keys that only this method (among the built-ins) reads
    restrictions: Mapping[str, Restriction] = field(default_factory=dict)
    secure_aggregation: bool = False  # runs under Flower's SecAgg+ (the server needs sums only)
    compressor: str | None = None  # dense baselines: how the update is compressed (fedmask.compression)
    error_feedback: bool = False  # dense baselines: the client keeps what compression left out

    @property
    def dense(self) -> bool:
        return self.mask_mode is None

    def make_aggregator(self, config: Any) -> MaskAggregator:
        """The server's aggregation rule for a run (not for the dense baseline)."""
        if self.aggregator is None:
            raise ValueError(f"method {self.name!r} aggregates dense weights with Flower's FedAvg, "
                             "not with a MaskAggregator")
        return self.aggregator(config)


_NO_RECYCLING = Restriction((0,), "weight recycling ranks top-k scores: edge-popup, biprop")
_SLOT_INITS = Restriction(("kaiming-uniform", "kaiming-normal"),
                          "a signed constant gives every connection only two distinct candidate values")


def mode_restrictions(mask_mode: str | None) -> dict[str, Restriction]:
    """What a mask mode cannot do, whichever method (built-in or plug-in) trains it."""
    rules: dict[str, Restriction] = {}
    if mask_mode not in TOPK_MODES:
        rules["recycle-every"] = _NO_RECYCLING
    if mask_mode == "slots":
        rules["init"] = _SLOT_INITS
    if mask_mode == "laperm":
        rules["attack"] = Restriction(("none",), "the attacks rewrite binary masks, LaPerm uploads ranks")
        rules["robust-aggregation"] = Restriction(("none",), "LaPerm merges ranks by a Borda count")
        rules["downlink-codec"] = Restriction(("float32", "lossless"), "the broadcast ranks must arrive exactly "
                                              "(lossless sends LaPerm's full float32 state)")
    if mask_mode is None:
        rules["attack"] = Restriction(("none",), "the attacks rewrite mask votes")
        rules["downlink-codec"] = Restriction(("float32", "lossless"),
                                              "the dense baseline sends its float32 weights as they are")
    return rules


_TOPK_KEYS = ("density", "edge-popup-server-lr", "edge-popup-server-rule", "edge-popup-vote-weight",
              "edge-popup-levels", "recycle-every", "recycle-fraction")

BUILTIN: Mapping[str, Method] = MappingProxyType({
    "fedpm": Method(
        "fedpm", "FedPM: Bernoulli masks, Bayesian (Beta posterior) aggregation; broadcasts theta",
        "bernoulli", FedPMAggregator, ("fedpm-eps", "fedpm-prior-reset", "fedpm-prior-reset-rule", "fedpm-gradient",
                                        "eval-mask", "secure-aggregation"),
        mode_restrictions("bernoulli"), secure_aggregation=True),
    "edge-popup": Method(
        "edge-popup", "edge-popup: top-k masks over scores; votes move the global scores",
        "topk", EdgePopupAggregator, _TOPK_KEYS, mode_restrictions("topk")),
    "biprop": Method(
        "biprop", "Biprop: top-k masks, weights sign(w) * alpha; aggregated as edge-popup",
        "biprop", BipropAggregator, (*_TOPK_KEYS, "biprop-gradient", "biprop-scale-fan"),
        mode_restrictions("biprop")),
    "slot-machines": Method(
        "slot-machines", "Slot Machines: K seeded candidates per connection; clients upload their choice",
        "slots", SlotMachineAggregator, ("slots", "slot-selection", "slot-server-lr", "slot-score-init", "eval-mask"),
        mode_restrictions("slots")),
    "laperm": Method(
        "laperm", "LaPerm: clients permute each row's seeded weight values; ranks up, Borda-merged ranks down",
        "laperm", LaPermAggregator, ("laperm-sync", "laperm-lr", "laperm-rank-step"), mode_restrictions("laperm")),
    "fedavg": Method(
        "fedavg", "FedAvg: the dense float32 baseline (Flower's FedAvg aggregation)",
        None, None, ("momentum",), mode_restrictions(None)),
    "signsgd": Method(
        "signsgd", "SignSGD with majority vote: 1 bit per parameter up, the server steps by the majority sign",
        None, None, ("signsgd-server-lr",), mode_restrictions(None), compressor="sign"),
    "ef-signsgd": Method(
        "ef-signsgd", "EF-SignSGD: scaled signs (1 bit per parameter + a scale per tensor) with error feedback",
        None, None, (), mode_restrictions(None), compressor="scaled-sign", error_feedback=True),
    "qsgd": Method(
        "qsgd", "QSGD: norm, signs and qsgd-levels stochastic levels per parameter, range-coded",
        None, None, ("qsgd-levels",), mode_restrictions(None), compressor="qsgd"),
    "topk-ef": Method(
        "topk-ef", "top-k sparsification with error feedback: topk-fraction of each tensor, positions coded",
        None, None, ("topk-fraction",), mode_restrictions(None), compressor="topk", error_feedback=True),
})


def is_plugin_name(name: str) -> bool:
    """``module:Class`` with both parts non-empty."""
    module, sep, cls = name.partition(":")
    return bool(sep and module and cls)


def get_method(name: str) -> Method:
    """The registry entry for a built-in name, or for a plug-in ``module:Class`` (imported now)."""
    if name in BUILTIN:
        return BUILTIN[name]
    if not is_plugin_name(name):
        raise PluginError(f"method: expected one of {', '.join(BUILTIN)} or 'module:Class', got {name!r}")
    cls = load_plugin(name)
    summary = (inspect.getdoc(cls) or cls.__name__).splitlines()[0]
    return Method(name, summary, cls.mask_mode, cls, (), mode_restrictions(cls.mask_mode))


def load_plugin(name: str) -> type[MaskAggregator]:
    """Import ``module:Class`` and check that it is a usable :class:`MaskAggregator`."""
    module_name, _, class_name = name.partition(":")
    if os.getcwd() not in sys.path:  # plug-ins live in the user's project, beside the config
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - a plug-in may fail to import in any way
        raise PluginError(f"method: cannot load plug-in {name!r}: {type(err).__name__}: {err}") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise PluginError(f"method: cannot load plug-in {name!r}: module {module_name!r} has no {class_name!r}")
    if not (isinstance(cls, type) and issubclass(cls, MaskAggregator)):
        raise PluginError(f"method: {name!r} must be a subclass of fedmask.aggregators.MaskAggregator")
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(cls.__abstractmethods__))
        raise PluginError(f"method: {name!r} does not implement {missing}")
    if cls.mask_mode not in MASK_MODES:
        raise PluginError(f"method: {name!r} has mask_mode {cls.mask_mode!r}; expected one of {', '.join(MASK_MODES)}")
    return cls
