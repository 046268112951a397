"""The experiment config: one flat table of kebab-case keys, read once into a typed value.

A TOML file (or Flower's run config) is a flat table of kebab-case keys, as Flower
requires. :func:`resolve` checks it key by key and returns a frozen :class:`RunConfig`
whose attributes are the keys in snake case (``num-rounds`` -> ``config.num_rounds``), so
a misspelt key fails where it is written, not inside a Ray worker. Every key has a
default, a type and a rule here; a typo or an impossible value is refused before Ray
starts (the CLI exits with code 2), with a message that names the key and what it accepts.

On the wire (inside a train message) the config travels as one JSON string of the same
kebab-case keys (:mod:`fedmask.protocol.instruction`), read back with :meth:`RunConfig.from_record`;
:meth:`RunConfig.to_record` gives the keys as a ConfigRecord of their own.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedmask.methods import (
    BUILTIN,
    METHOD_KEYS,
    Method,
    PluginError,
    get_method,
    is_plugin_name,
    keys_read,
    uplink_codec_named,
)
from fedmask.methods.base import make_params
from fedmask.names import (
    ATTACKS,
    BATCHNORMS,
    BIPROP_GRADIENTS,
    DATASETS,
    DEVICES,
    DOWNLINK_CODECS,
    EDGE_POPUP_SERVER_RULES,
    EVAL_MASKS,
    FAULTS,
    FEDPM_GRADIENTS,
    FEDPM_PRIOR_RESET_RULES,
    INITS,
    MODELS,
    OPTIMIZERS,
    PARTITIONERS,
    ROBUST_RULES,
    SLOT_SCORE_INITS,
    SLOT_SELECTIONS,
    TRACKERS,
    UPLINK_CODECS,
)

if TYPE_CHECKING:
    from flwr.app import ConfigRecord

MAX_SEED = 2**63 - 1  # seeds feed numpy and torch generators, which take 64-bit values


class ConfigError(ValueError):
    """A config the run cannot start with; the message names the key."""


@dataclass(frozen=True)
class Setting:
    """One key's default, help text and rule (what ``fedmask keys`` prints)."""

    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    check: Callable[[Any], bool] | None = None
    rule: str = ""


def _key(default: Any, help: str, choices: tuple[str, ...] | None = None,
         check: Callable[[Any], bool] | None = None, rule: str = "") -> Any:
    return field(default=default, metadata={"setting": Setting(default, help, choices, check, rule)})


def _between(lo: float, hi: float, open_lo: bool = False) -> Callable[[Any], bool]:
    if open_lo:
        return lambda v: math.isfinite(v) and lo < v <= hi
    return lambda v: math.isfinite(v) and lo <= v <= hi


def _method(v: str) -> bool:
    return v in BUILTIN or is_plugin_name(v)


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a run, checked. Build it with :func:`resolve` or :func:`load`."""

    method: str = _key("fedpm", "a mask method (fedpm, edge-popup, biprop, slot-machines, laperm), the dense baseline "
                       "fedavg, a compressed dense baseline (signsgd, ef-signsgd, qsgd, topk-ef), or a plug-in "
                       "'module:Class'", check=_method, rule=f"one of {', '.join(BUILTIN)} or 'module:Class'")
    seed: int = _key(0, "seed of the frozen weights, scores, data split and sampling",
                     check=_between(0, MAX_SEED), rule=f"in 0..{MAX_SEED} (64-bit)")
    dataset: str = _key("digits", "dataset name, or a plug-in 'module:function' returning (x_train, y_train, "
                        "x_test, y_test) tensors", check=lambda v: v in DATASETS or is_plugin_name(v),
                        rule=f"one of {', '.join(DATASETS)} or 'module:function'")
    data_dir: str = _key("", "folder with local dataset files ('' = default cache)")
    test_fraction: float = _key(0.2, "held-out fraction when a dataset has one split only",
                                check=lambda v: 0 < v < 1, rule="in (0, 1)")
    validation_fraction: float = _key(0.0, "share of the train split the server holds out as a validation split "
                                      "(seeded, trained on by no client): every round is evaluated on it and the "
                                      "test split once, after the last round; 0 evaluates every round on the test "
                                      "split", check=lambda v: 0 <= v < 1, rule="in [0, 1)")
    model: str = _key("mlp", "model shape, or a plug-in 'module:function' (input_shape, num_classes) -> "
                      "torch.nn.Module of Linear/Conv2d layers", check=lambda v: v in MODELS or is_plugin_name(v),
                      rule=f"one of {', '.join(MODELS)} or 'module:function'")
    width: float = _key(1.0, "hidden layers and conv channels this many times as wide as the model's paper (masks "
                        "are paid per weight, so a wider random network may close a gap at few bytes)",
                        check=_between(0, 64, open_lo=True), rule="in (0, 64]")
    init: str = _key("signed-kaiming-constant", "frozen weight init", choices=INITS)
    density: float = _key(0.5, "edge-popup, biprop: fraction of weights kept per tensor",
                          check=_between(0, 1, open_lo=True), rule="in (0, 1]")
    eval_mask: str = _key("sample", "FedPM (and probabilistic slots) evaluation: 'sample' a mask "
                          "(as the reference code does) or 'threshold' theta at 0.5 (slots: argmax)",
                          choices=EVAL_MASKS)
    num_clients: int = _key(10, "number of simulated clients (data partitions)",
                            check=_between(1, 10_000_000), rule="in 1..10^7")
    clients_per_round: int = _key(10, "clients sampled each round", check=_between(1, 10_000_000),
                                  rule="in 1..10^7")
    num_rounds: int = _key(20, "federated rounds", check=_between(1, 1_000_000), rule="in 1..10^6")
    local_epochs: int = _key(1, "local epochs per round", check=_between(1, 10_000), rule="in 1..10^4")
    batch_size: int = _key(32, "local batch size", check=_between(1, 1_000_000), rule="in 1..10^6")
    optimizer: str = _key("adam", "local optimizer", choices=OPTIMIZERS)
    lr: float = _key(0.1, "local learning rate", check=_between(0, 1e6, open_lo=True), rule="in (0, 1e6]")
    momentum: float = _key(0.9, "SGD momentum", check=lambda v: 0 <= v < 1, rule="in [0, 1)")
    weight_decay: float = _key(0.0, "local weight decay", check=_between(0, 1e6), rule="in [0, 1e6]")
    partitioner: str = _key("iid", "how the training split is divided; flwr-iid, flwr-dirichlet (alpha = "
                            "dirichlet-alpha) and flwr-pathological (classes-per-client) are Flower Datasets' "
                            "partitioners, seeded by seed: the 'flwr-datasets' extra", choices=PARTITIONERS)
    dirichlet_alpha: float = _key(0.3, "Dirichlet concentration", check=_between(0, 1e6, open_lo=True),
                                  rule="in (0, 1e6]")
    classes_per_client: int = _key(2, "classes held by each client ('classes')", check=_between(1, 100_000),
                                   rule="in 1..10^5")
    fedpm_eps: float = _key(0.01, "FedPM: theta is clamped to [eps, 1-eps]",
                            check=lambda v: 0 < v < 0.5, rule="in (0, 0.5)")
    fedpm_prior_reset: int = _key(1, "FedPM: reset the Beta prior every N rounds "
                                  "(1 = every round, as the reference; 0 = never)",
                                  check=_between(0, 1_000_000), rule="in 0..10^6")
    fedpm_prior_reset_rule: str = _key("fedmask", "FedPM: which rounds reset the prior with fedpm-prior-reset = N: "
                                       "'fedmask' when (round - 1) % N == 0 (rounds 1, N+1, ...), 'fl4health' "
                                       "when (round + 1) % N == 0, as FL4Health's FedPm; they differ for N >= 3",
                                       choices=FEDPM_PRIOR_RESET_RULES)
    fedpm_gradient: str = _key("straight-through", "FedPM: the gradient through the Bernoulli sample: "
                               "'straight-through' passes g (fedmask's default), 'reference' passes theta * g "
                               "as FedPM's reference code", choices=FEDPM_GRADIENTS)
    biprop_gradient: str = _key("fedmask", "Biprop: the scores' gradient: 'fedmask' g * sign(w) * alpha, "
                                "'reference' g * w as chrundle/biprop", choices=BIPROP_GRADIENTS)
    biprop_scale_fan: bool = _key(False, "Biprop: divide the frozen weights by sqrt(1 - density), as the "
                                  "reference code's scale_fan does (fan * (1 - prune_rate), prune_rate "
                                  "being the fraction kept); needs density < 1")
    slot_score_init: str = _key("kaiming-uniform", "Slot Machines: initial scores: 'kaiming-uniform' "
                                "U(+-1/sqrt(fan_in)) (fedmask's default) or 'reference' U(0, "
                                "sqrt(6/(fan_in+fan_out))); the reference's candidates are init = "
                                "'glorot-uniform'", choices=SLOT_SCORE_INITS)
    batchnorm: str = _key("stateless", "BatchNorm (non-affine): 'stateless' uses batch statistics also in "
                          "evaluation; 'running' keeps running statistics as edge-popup's reference, refused "
                          "for federated runs of models with BatchNorm", choices=BATCHNORMS)
    edge_popup_server_lr: float = _key(2.0, "edge-popup, biprop: how far one unanimous vote moves a "
                                       "score, in units of the score spread",
                                       check=_between(0, 1e6, open_lo=True), rule="in (0, 1e6]")
    edge_popup_server_rule: str = _key("pseudo-gradient", "edge-popup, biprop: how votes move the global "
                                       "scores: 'pseudo-gradient' |s| += lr * (vote - kept), 'vote-average' "
                                       "|s| = (1 - m) * |s| + m * lr * vote (a running average of the votes, "
                                       "m = edge-popup-vote-weight), 'vote-levels' the same average kept on "
                                       "edge-popup-levels integer levels (rounded each round, so a weight moves "
                                       "only when the votes pull it a level away; the lossless downlink sends the "
                                       "levels coded against those a client holds)",
                                       choices=EDGE_POPUP_SERVER_RULES)
    edge_popup_vote_weight: float = _key(0.3, "edge-popup, biprop with edge-popup-server-rule = 'vote-average' "
                                         "or 'vote-levels': weight m of this round's votes in the running average",
                                         check=lambda v: 0 < v <= 1, rule="in (0, 1]")
    edge_popup_levels: int = _key(64, "edge-popup, biprop with edge-popup-server-rule = 'vote-levels': number "
                                  "of score levels (vote share 0 maps to level 0, 1 to the top level)",
                                  check=_between(2, 256), rule="in 2..256")
    slots: int = _key(8, "Slot Machines: candidate values per connection (K); the upload is "
                      "ceil(log2 K) bits per connection before entropy coding",
                      check=lambda v: 2 <= v <= 64, rule="in 2..64")
    slot_selection: str = _key("greedy", "Slot Machines: 'greedy' uses the best-scored candidate, "
                               "'probabilistic' samples the softmax of the scores", choices=SLOT_SELECTIONS)
    slot_server_lr: float = _key(2.0, "Slot Machines: how far the clients' choices move the global "
                                 "scores, in units of the score spread",
                                 check=_between(0, 1e6, open_lo=True), rule="in (0, 1e6]")
    laperm_sync: int = _key(20, "LaPerm: rewire every k inner-optimizer steps (the paper's sync period k)",
                            check=_between(1, 1_000_000), rule="in 1..10^6")
    laperm_lr: float = _key(0.001, "LaPerm: learning rate of the inner Adam on the shadow weights",
                            check=_between(0, 1e6, open_lo=True), rule="in (0, 1e6]")
    laperm_rank_step: int = _key(1, "LaPerm upload: rank displacements are sent divided by this step, "
                                 "stochastically rounded (1 = exact ranks, lossless; 4 saves about 2 bits "
                                 "per weight)", check=_between(1, 65535), rule="in 1..65535")
    signsgd_server_lr: float = _key(0.002, "SignSGD: how far the majority sign moves each weight per round",
                                    check=_between(0, 1e3, open_lo=True), rule="in (0, 1000]")
    qsgd_levels: int = _key(4, "QSGD: quantization levels s per sign (0..s)", check=lambda v: 1 <= v <= 1024,
                            rule="in 1..1024")
    topk_fraction: float = _key(0.01, "top-k: share of each tensor's update entries sent",
                                check=_between(0, 1, open_lo=True), rule="in (0, 1]")
    recycle_every: int = _key(0, "Iterative Weight Recycling (edge-popup, biprop): recycle after "
                              "every N-th round's aggregation (0 = never)",
                              check=_between(0, 1_000_000), rule="in 0..10^6")
    recycle_fraction: float = _key(0.1, "Iterative Weight Recycling: share of each tensor's weights, "
                                   "lowest global scores first, that take the values of the highest",
                                   check=lambda v: 0 < v < 0.5, rule="in (0, 0.5)")
    uplink_codec: str = _key("auto", "how clients code their uploads: 'auto' (relative-entropy for FedPM, entropy for "
                             "the other mask methods), 'packbits' (1 bit per parameter), "
                             "'entropy' (range-coded against the broadcast state, packed bits when that is shorter) "
                             "or, for FedPM, 'relative-entropy' (the index of a sample among candidates both ends "
                             "draw from the broadcast theta: about KL(q || theta) bits, not the sample's entropy)",
                             choices=UPLINK_CODECS)
    rec_block_bits: int = _key(8, "relative-entropy: bits of KL per block of weights (C); a block's candidates "
                               "number 2**(C + t), the encoder's CPU grows with them",
                               check=lambda v: 1 <= v <= 16, rule="in 1..16")
    rec_extra_bits: int = _key(0, "relative-entropy: extra index bits per block (t, oversampling): a less biased "
                               "sample for (C + t) / C times the bits and 2**t times the CPU",
                               check=lambda v: 0 <= v <= 8, rule="in 0..8")
    rec_debias: bool = _key(True, "relative-entropy: code theta + (q - theta) / gamma(C, t) so that each weight's "
                            "mean lands on q (gamma measured per (C, t)); false: cheaper, each mean moves only "
                            "gamma of the way")
    downlink_codec: str = _key("lossless", "how the server codes the broadcast state: 'lossless' sends each node "
                               "the coded votes since the state it holds (exact); float32, float16, quantized "
                               "send the state; for the dense baselines, 'ef-qsgd' sends each node the "
                               "QSGD-quantized round updates since the state it holds, with server error feedback "
                               "(DoubleSqueeze)", choices=DOWNLINK_CODECS)
    downlink_bits: int = _key(8, "levels (2**bits) per tensor for downlink-codec = 'quantized'; 'ef-qsgd': "
                              "2**(bits-1) - 1 QSGD levels and a sign",
                              check=lambda v: 2 <= v <= 16, rule="in 2..16")
    min_clients: int = _key(1, "usable uploads a round needs; with fewer it is skipped and "
                            "the global state stays", check=_between(1, 10_000_000), rule="in 1..10^7")
    fault_drop_rate: float = _key(0.0, "share of sampled clients that never answer (seeded)",
                                  check=_between(0, 1), rule="in [0, 1]")
    fault_crash_rate: float = _key(0.0, "share of sampled clients whose ClientApp raises",
                                   check=_between(0, 1), rule="in [0, 1]")
    fault_corrupt_rate: float = _key(0.0, "share of uploads truncated, bit-flipped or carrying "
                                     "another model's fingerprint", check=_between(0, 1), rule="in [0, 1]")
    fault_slow_rate: float = _key(0.0, "share of sampled clients that answer late",
                                  check=_between(0, 1), rule="in [0, 1]")
    fault_slow_delay: float = _key(1.0, "seconds a slow client's reply is late "
                                   "(past round-timeout it is lost)", check=_between(0, 86_400),
                                   rule="in [0, 86400]")
    attack: str = _key("none", "what Byzantine clients upload instead of their own: a mask lie (invert, "
                       "all-ones, random, colluding) or, for the dense baselines, 'poison' (weights or updates "
                       "with one coordinate per tensor at 3e38, still a valid upload)", choices=ATTACKS)
    attack_fraction: float = _key(0.0, "share of partitions that are Byzantine (a seeded subset)",
                                  check=_between(0, 1), rule="in [0, 1]")
    robust_aggregation: str = _key("none", "how votes (the dense baselines: weights or updates) are combined: "
                                   "'none' (mean), 'trimmed' (coordinate-wise trimmed mean), 'median' (majority; "
                                   "dense: the coordinate-wise median)", choices=ROBUST_RULES)
    trim_fraction: float = _key(0.1, "'trimmed': share of votes cut at each end per weight",
                                check=lambda v: 0 <= v < 0.5, rule="in [0, 0.5)")
    secure_aggregation: bool = _key(False, "FedPM under Flower's SecAgg+: the server learns only the "
                                    "per-weight sums of the masks")
    eval_batch_size: int = _key(512, "server evaluation batch size", check=_between(1, 1_000_000),
                                rule="in 1..10^6")
    num_cpus: int = _key(1, "CPU cores per simulated client", check=_between(1, 4096), rule="in 1..4096")
    num_gpus: float = _key(0.0, "GPU share per client (0.25 = four clients per GPU)",
                           check=_between(0, 1024), rule="in [0, 1024]")
    device: str = _key("auto", "where tensors live: auto uses CUDA when present", choices=DEVICES)
    round_timeout: float = _key(600.0, "seconds the server waits for replies in a round",
                                check=_between(0, 86_400 * 7, open_lo=True), rule="in (0, 604800]")
    tracker: str = _key("none", "mirror every round's numbers to an experiment tracker: 'tensorboard' "
                        "(RUN_DIR/tensorboard) or 'mlflow' (RUN_DIR/mlflow.db); needs the 'track' extra",
                        choices=TRACKERS)
    per_client: bool = _key(True, "write each client's bytes as the per_client list of every rounds.jsonl line; "
                            "false keeps the file small when thousands of clients train a round")
    # A plug-in method's own parameters (its ``Params`` dataclass), as ``plugin.<field>`` keys:
    # (kebab-case field name, value) pairs, sorted; with the plug-in checked, every field.
    plugin_params: tuple[tuple[str, Any], ...] = field(default=())

    # ------------------------------------------------------------------ views

    def __getitem__(self, key: str) -> Any:
        """The value of a kebab-case key (``config["num-rounds"]``, ``config["plugin.server-lr"]``),
        for code that loops over keys."""
        if key.startswith(PLUGIN_PREFIX):
            return dict(self.plugin_params)[key.removeprefix(PLUGIN_PREFIX)]
        if key not in SCHEMA:
            raise KeyError(key)
        return getattr(self, _attr(key))

    @property
    def method_entry(self) -> Method:
        """This run's entry in the method registry (a plug-in is imported on first use)."""
        return get_method(self.method)

    def to_dict(self) -> dict[str, Any]:
        """Every key, kebab-case, in schema order, then the plug-in's ``plugin.<field>`` keys
        (what config.toml holds)."""
        return {**{key: getattr(self, _attr(key)) for key in SCHEMA},
                **{PLUGIN_PREFIX + name: value for name, value in self.plugin_params}}

    def to_record(self) -> ConfigRecord:
        """The config as a Flower ConfigRecord of kebab-case keys (instructions carry it as JSON instead)."""
        from flwr.app import ConfigRecord

        return ConfigRecord(self.to_dict())

    @classmethod
    def from_record(cls, record: Mapping[str, Any], check_plugin: bool = False) -> RunConfig:
        """The config a message carries: every key must be there and pass its check.

        A plug-in method is not imported by default: the receiving party (a client) is
        told the mask mode in the instruction, and the server checked the plug-in.
        """
        missing = [key for key in SCHEMA if key not in record]
        if missing:
            raise ConfigError(f"config record: expected every config key, missing {', '.join(missing)}")
        return resolve({key: record[key] for key in record if key in SCHEMA or key.startswith(PLUGIN_PREFIX)},
                       check_plugin=check_plugin)

    def replace(self, **values: Any) -> RunConfig:
        """A copy with some keys changed (kebab- or snake-case names), checked again."""
        return resolve({**self.to_dict(), **{k.replace("_", "-"): v for k, v in values.items()}})


def _attr(key: str) -> str:
    return key.replace("-", "_")


SCHEMA: dict[str, Setting] = {f.name.replace("_", "-"): f.metadata["setting"] for f in fields(RunConfig)
                               if "setting" in f.metadata}
PLUGIN_PREFIX = "plugin."  # plugin.<field> keys set a plug-in method's Params


def is_key(key: str) -> bool:
    """A config key: one of :data:`SCHEMA`, or a plug-in parameter ``plugin.<field>``."""
    return key in SCHEMA or (key.startswith(PLUGIN_PREFIX) and len(key) > len(PLUGIN_PREFIX))


def _type_ok(default: Any, value: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


def _check_value(key: str, value: Any) -> Any:
    """One key's value, type-checked and normalised (ints become floats for float keys)."""
    setting = SCHEMA[key]
    if not _type_ok(setting.default, value):
        raise ConfigError(f"config key '{key}': expected {type(setting.default).__name__}, "
                          f"got {type(value).__name__} {value!r}")
    if isinstance(setting.default, float):
        try:
            value = float(value)
        except OverflowError:
            raise ConfigError(f"config key '{key}': expected {setting.rule}, got {value!r}") from None
    if setting.choices is not None and value not in setting.choices:
        raise ConfigError(f"config key '{key}': expected one of {', '.join(setting.choices)}, got {value!r}")
    if setting.check is not None and not setting.check(value):
        raise ConfigError(f"config key '{key}': expected {setting.rule}, got {value!r}")
    return value


def resolve(values: Mapping[str, Any], check_plugin: bool = True) -> RunConfig:
    """Defaults overlaid with ``values``, checked key by key and across keys; raises ConfigError.

    With ``check_plugin``, a ``module:Class`` method is imported now and its rules checked.
    """
    unknown = sorted(key for key in values if not is_key(key))
    if unknown:
        key = unknown[0]
        near = difflib.get_close_matches(key, SCHEMA, n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise ConfigError(f"unknown config key '{key}'{hint}; valid keys: {', '.join(sorted(SCHEMA))}, "
                          f"and {PLUGIN_PREFIX}<field> for a plug-in method's Params")
    checked = {_attr(key): _check_value(key, value) for key, value in values.items() if key in SCHEMA}
    config = RunConfig(**checked, plugin_params=_given_params(values, checked.get("method", "fedpm")))
    _check_across_keys(config)
    if config.method in BUILTIN or check_plugin:
        try:
            method = config.method_entry
        except PluginError as err:
            raise ConfigError(f"config key 'method': {err}") from None
        _check_method_rules(config, method)
        if method.aggregator is not None and not method.builtin:
            config = dataclasses.replace(config, plugin_params=plugin_params(method.aggregator, config.plugin_params))
    return config


def _given_params(values: Mapping[str, Any], method: str) -> tuple[tuple[str, Any], ...]:
    """The ``plugin.<field>`` keys given, as sorted (field, value) pairs; only scalars, only for a plug-in."""
    given = {key.removeprefix(PLUGIN_PREFIX): value for key, value in values.items() if key.startswith(PLUGIN_PREFIX)}
    for name, value in given.items():
        if method in BUILTIN:
            raise ConfigError(f"config key '{PLUGIN_PREFIX}{name}': plug-in parameters need method = "
                              f"'module:Class', got method = {method!r}")
        if not isinstance(value, (bool, int, float, str)):
            raise ConfigError(f"config key '{PLUGIN_PREFIX}{name}': expected a number, boolean or string, "
                              f"got {type(value).__name__} {value!r}")
    return tuple(sorted(given.items()))


def plugin_params(cls: type, given: tuple[tuple[str, Any], ...]) -> tuple[tuple[str, Any], ...]:
    """Every field of ``cls.Params`` (a plug-in's frozen dataclass) with its value: the given
    ``plugin.<field>`` values, type-checked against the field's default, or the default."""
    params = getattr(cls, "Params", None)
    name = cls.__name__
    if params is None:
        if given:
            raise ConfigError(f"config key '{PLUGIN_PREFIX}{given[0][0]}': {name} declares no Params dataclass, "
                              "so it takes no plug-in parameters")
        return ()
    defaults = {f.name.replace("_", "-"): f.default for f in fields(params)}
    odd = [key for key, default in defaults.items() if not isinstance(default, (bool, int, float, str))]
    if odd:
        raise ConfigError(f"config key 'method': {name}.Params field {odd[0]!r} needs a default that is a number, "
                          "boolean or string (a plug-in parameter is one config key)")
    for key, value in given:
        if key not in defaults:
            raise ConfigError(f"config key '{PLUGIN_PREFIX}{key}': {name}.Params has no field {key!r}; its fields: "
                              f"{', '.join(defaults) or 'none'}")
        if defaults[key] is not dataclasses.MISSING and not _type_ok(defaults[key], value):
            raise ConfigError(f"config key '{PLUGIN_PREFIX}{key}': expected {type(defaults[key]).__name__} "
                              f"({name}.Params), got {type(value).__name__} {value!r}")
    try:
        made = make_params(params, given)
    except Exception as err:  # the plug-in's own checks (__post_init__) may raise anything
        raise ConfigError(f"config keys '{PLUGIN_PREFIX}*': {name}.Params refused {dict(given)}: "
                          f"{type(err).__name__}: {err}") from None
    return tuple(sorted((key, getattr(made, key.replace("-", "_"))) for key in defaults))



def _check_across_keys(config: RunConfig) -> None:
    if config.clients_per_round > config.num_clients:
        raise ConfigError(f"config key 'clients-per-round': expected <= num-clients "
                          f"({config.num_clients}), got {config.clients_per_round}")
    fault_total = sum(config[f"fault-{fault}-rate"] for fault in FAULTS)
    if fault_total > 1:
        raise ConfigError(f"config keys 'fault-*-rate': expected a sum <= 1 (one fault per client "
                          f"and round at most), got {fault_total:g}")
    if config.biprop_scale_fan and config.recycle_every:
        raise ConfigError("config key 'biprop-scale-fan': expected false with recycle-every > 0 (recycling "
                          "regenerates unscaled weights)")
    if config.biprop_scale_fan and config.density >= 1:
        raise ConfigError("config key 'biprop-scale-fan': expected false with density 1 (the reference's "
                          f"scale divides by sqrt(1 - density)), got true with density {config.density:g}")
    if _codes_relative(config) and config.rec_debias:
        from fedmask.wire.relative import GAMMA

        if (config.rec_block_bits, config.rec_extra_bits) not in GAMMA:
            raise ConfigError(f"config keys 'rec-block-bits', 'rec-extra-bits': expected a pair whose bias was "
                              f"measured, {sorted(GAMMA)}, with rec-debias = true; got "
                              f"{(config.rec_block_bits, config.rec_extra_bits)}")
    if config.width != 1 and (config.model == "resnet18" or is_plugin_name(config.model)):
        raise ConfigError(f"config key 'width': expected 1 with model = {config.model!r} (only the built-in "
                          f"mlp, lenet and conv models widen), got {config.width:g}")
    if config.min_clients > config.clients_per_round:
        raise ConfigError(f"config key 'min-clients': expected <= clients-per-round "
                          f"({config.clients_per_round}), got {config.min_clients}")


def _check_method_rules(config: RunConfig, method: Method) -> None:
    """The registry's restrictions of the method, and secure aggregation's own."""
    for key, restriction in method.restrictions.items():
        if config[key] not in restriction.allowed:
            allowed = " or ".join(repr(v) for v in restriction.allowed)
            raise ConfigError(f"config key '{key}': expected {allowed} with method = {config.method!r} "
                              f"({restriction.why}), got {config[key]!r}")
    if not config.secure_aggregation:
        return
    defaults = RunConfig()
    clashes = [] if method.secure_aggregation else ["method"]
    clashes += [k for k in ("attack", "robust-aggregation") if config[k] != defaults[k]]
    # SecAgg+'s workflow broadcasts the float32 state; that is lossless, so both names allow it
    clashes += ["downlink-codec"] if config.downlink_codec not in ("float32", "lossless") else []
    clashes += [f"fault-{f}-rate" for f in FAULTS if config[f"fault-{f}-rate"] > 0]
    if clashes:
        raise ConfigError(f"config key 'secure-aggregation': expected false unless method = 'fedpm' with no "
                          f"attack, fault, robust aggregation or downlink codec; got {', '.join(clashes)} set")
    if config.clients_per_round < 3:
        raise ConfigError("config key 'secure-aggregation': expected clients-per-round >= 3 "
                          f"(SecAgg+ shares keys among them), got {config.clients_per_round}")


def _codes_relative(c: RunConfig) -> bool:
    """Whether uploads are relative-entropy coded (a plug-in's 'auto' is not known without importing it)."""
    return uplink_codec_named(c.method, c.uplink_codec) in ("relative-entropy", "auto")


# Keys read only when another key has some value (the registry, fedmask.methods, says which
# keys only some methods read): set away from their default otherwise, they change nothing.
READ_ONLY_WITH: dict[str, tuple[str, Callable[[RunConfig], bool]]] = {
    "momentum": ("optimizer = 'sgd'", lambda c: c.optimizer == "sgd"),
    "dirichlet-alpha": ("partitioner = 'dirichlet' or 'flwr-dirichlet'",
                        lambda c: c.partitioner in ("dirichlet", "flwr-dirichlet")),
    "classes-per-client": ("partitioner = 'classes' or 'flwr-pathological'",
                           lambda c: c.partitioner in ("classes", "flwr-pathological")),
    "downlink-bits": ("downlink-codec = 'quantized'", lambda c: c.downlink_codec == "quantized"),
    "rec-block-bits": ("uplink-codec = 'relative-entropy' (FedPM's 'auto')", _codes_relative),
    "rec-extra-bits": ("uplink-codec = 'relative-entropy' (FedPM's 'auto')", _codes_relative),
    "rec-debias": ("uplink-codec = 'relative-entropy' (FedPM's 'auto')", _codes_relative),
    "trim-fraction": ("robust-aggregation = 'trimmed'", lambda c: c.robust_aggregation == "trimmed"),
    "attack-fraction": ("an attack", lambda c: c.attack != "none"),
    "edge-popup-vote-weight": ("edge-popup-server-rule = 'vote-average' or 'vote-levels'",
                               lambda c: c.edge_popup_server_rule != "pseudo-gradient"),
    "edge-popup-levels": ("edge-popup-server-rule = 'vote-levels'",
                          lambda c: c.edge_popup_server_rule == "vote-levels"),
    "recycle-fraction": ("recycle-every > 0", lambda c: c.recycle_every > 0),
    "fault-slow-delay": ("fault-slow-rate > 0", lambda c: c.fault_slow_rate > 0),
    "test-fraction": ("dataset = 'digits' or 'idx'", lambda c: c.dataset in ("digits", "idx")),
    "data-dir": ("a dataset read from files", lambda c: c.dataset in DATASETS and c.dataset != "digits"),
}


def ignored_keys(config: RunConfig) -> dict[str, str]:
    """Keys set away from their default that this run never reads, each with what reads it
    (a plug-in method is imported to know its mask mode)."""
    method = config.method_entry
    mine = keys_read(method)
    ignored = {}
    for key, setting in SCHEMA.items():
        if config[key] == setting.default:
            continue
        if key in METHOD_KEYS and key not in mine:
            readers = [name for name, other in BUILTIN.items() if key in other.keys]
            ignored[key] = f"read by {', '.join(readers)} only"
        elif key in READ_ONLY_WITH and not READ_ONLY_WITH[key][1](config):
            ignored[key] = f"read with {READ_ONLY_WITH[key][0]} only"
    return ignored


def ignored_keys_warning(config: RunConfig) -> str | None:
    """One line naming the keys :func:`ignored_keys` finds, or None."""
    ignored = ignored_keys(config)
    if not ignored:
        return None
    listed = "; ".join(f"{key} ({why})" for key, why in ignored.items())
    return f"config keys set but not read with method = {config.method!r}, so they change nothing: {listed}"


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` from the command line; the value is read as TOML, else as a string."""
    key, sep, raw = text.partition("=")
    raw = raw.strip()
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value, got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


def read_toml(path: str | Path) -> dict[str, Any]:
    """The flat table of a TOML config file, unchecked; errors name the file."""
    path = Path(path)
    try:
        values = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config file {path}: {err}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
    table = values.pop("plugin", None)  # [plugin] or plugin.<field> = ...: a plug-in's parameters
    if isinstance(table, dict):
        values |= {PLUGIN_PREFIX + key: value for key, value in table.items()}
    elif table is not None:
        values["plugin"] = table  # refused as an unknown key
    nested = [k for k, v in values.items() if isinstance(v, dict)]
    if nested:
        raise ConfigError(f"config must be one flat table of keys (and a [plugin] table of scalars); found "
                          f"table(s) {nested}")
    return values


def load(path: str | Path, overrides: list[str] | None = None, check_plugin: bool = True) -> RunConfig:
    """Read a TOML config, apply ``--set`` overrides, resolve and check it.

    ``check_plugin=False`` reads a config without importing its plug-ins: what reading a
    finished run needs (its results never need the plug-in's code)."""
    values = read_toml(path)
    for text in overrides or []:
        key, value = parse_override(text)
        values[key] = value
    return resolve(values, check_plugin=check_plugin)
