"""Everything that can be checked before a run starts, so that errors come before Ray.

``fedmask run`` and the ServerApp under ``flwr run`` call :func:`check_before_start`; a
problem raises :class:`~fedmask.config.ConfigError` (or ``DataError``) with a message that
names the key, and the command exits with code 2 before any round.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import torch

from fedmask import task
from fedmask.config import ConfigError, RunConfig
from fedmask.core.data import Splits, partition_sizes
from fedmask.core.masking import check_batchnorm, get_scores
from fedmask.plugins import PluginError, is_plugin_name


def _checked_model(config: RunConfig, splits: Splits, mask_mode: str | None) -> torch.nn.Module:
    """The run's model, built; a plug-in model must also map two test samples to (2, classes) outputs."""
    try:
        model = task.make_model(config, splits, task.mode_of(config, mask_mode))
    except PluginError as err:
        raise ConfigError(f"config key 'model': {err}") from None
    except (RuntimeError, ValueError) as err:  # e.g. images too small for a conv model
        why = str(err).splitlines()[0] if str(err) else type(err).__name__
        if is_plugin_name(config.model):
            raise ConfigError(f"config key 'model': {config.model!r}: {why}") from None
        raise ConfigError(f"config key 'model': {config.model!r} cannot take {splits.input_shape} inputs: "
                          f"{why}") from None
    if is_plugin_name(config.model):
        try:
            with torch.no_grad(), torch.random.fork_rng():  # a sampled mask must not move torch's stream
                out = model(splits.x_test[:2])
        except Exception as err:  # the user's forward may fail in any way
            raise ConfigError(f"config key 'model': {config.model!r} cannot take {splits.input_shape} inputs: "
                              f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
        expected = (min(2, len(splits.x_test)), splits.num_classes)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
            raise ConfigError(f"config key 'model': {config.model!r} must map a batch of inputs to (batch, "
                              f"{splits.num_classes}) class scores; two test samples gave "
                              f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
    return model


def check_before_start(config: RunConfig) -> dict[str, np.ndarray]:
    """Load data, partition it, build the model and the aggregator's first state, check
    resources; returns the first global state (what a checkpoint's state must look like)."""
    if (config.num_gpus > 0 or config.device == "cuda") and not torch.cuda.is_available():
        raise ConfigError("config key 'num-gpus'/'device': expected num-gpus = 0 and device != 'cuda' on a "
                          "machine without CUDA (Ray would wait forever for a GPU)")
    cores = os.cpu_count() or 1
    if config.num_cpus > cores:
        raise ConfigError(f"config key 'num-cpus': expected at most this machine's {cores} cores (Ray would "
                          f"wait forever for a worker), got {config.num_cpus}")
    if config.tracker != "none":
        module = {"tensorboard": "tensorboard", "mlflow": "mlflow"}[config.tracker]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"config key 'tracker': {config.tracker!r} needs the {module} package, which is not "
                              "installed: pip install -e \".[track]\"")
    try:
        check_batchnorm(config.batchnorm, config.model)
    except ValueError as err:
        raise ConfigError(f"config key {err}") from None
    splits = task.splits_of(config)
    # partitions every client at once and refuses an empty partition by client (DataError);
    # slicing each client's images here cost 10 s at 10,000 clients
    partition_sizes(splits, config.num_clients, config.partitioner, config.seed, config.dirichlet_alpha,
                    config.classes_per_client)
    method = config.method_entry
    model = _checked_model(config, splits, method.mask_mode)
    if method.dense:
        return task.dense_state(model)
    name = method.name
    try:
        aggregator = method.make_aggregator(config)
        initial = aggregator.initial_state(get_scores(model))
    except Exception as err:  # a plug-in may fail in any way; say which class
        raise ConfigError(f"config key 'method': {name!r} failed to start: {type(err).__name__}: {err}") from None
    scores = get_scores(model)
    for tensor, value in scores.items():
        got = initial.get(tensor) if isinstance(initial, dict) else None
        if not isinstance(got, np.ndarray) or got.dtype.kind != "f" or got.shape != value.shape:
            raise ConfigError(f"config key 'method': {name!r}.initial_state must return float arrays of the "
                              f"model's shapes; '{tensor}' is {type(got).__name__} "
                              f"{getattr(got, 'dtype', '')} {getattr(got, 'shape', '')}")
        if not np.isfinite(got).all():
            raise ConfigError(f"config key 'method': {name!r}.initial_state returned NaN or inf in '{tensor}'")
    return initial
