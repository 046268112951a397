"""What a party builds from a run config: the data, the model, local training and the test.

As the ``task.py`` of Flower's quickstart: shared by the ClientApp, the ServerApp's
evaluation and the plain-PyTorch benchmark loop, so the three train and measure the same
thing. What differs between methods comes from their mask mode
(:class:`fedmask.methods.base.MaskMode`), which :func:`mode_of` builds once per config.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedmask.config import RunConfig
from fedmask.core.data import Splits, client_split, hold_out_validation, load_dataset
from fedmask.core.masking import get_scores, num_connections, to_masked
from fedmask.core.models import build_model
from fedmask.core.training import LocalTraining, seed_torch
from fedmask.core.training import evaluate as evaluate_model
from fedmask.core.training import train as train_model
from fedmask.methods import mode_of as mode_class
from fedmask.methods.base import MaskMode
from fedmask.wire.frame import Layout


def pick_device(config: RunConfig) -> torch.device:
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


_SPLITS: dict[tuple, Splits] = {}  # loaded splits by data key, oldest first
_SPLITS_KEPT = 4


def splits_of(config: RunConfig) -> Splits:
    """The run's data, loaded once per process for each (dataset, data-dir, test-fraction,
    seed, validation-fraction): the ServerApp and every ClientApp round share it. The last 4
    keys are kept."""
    key = (config.dataset, config.data_dir, config.test_fraction, config.seed, config.validation_fraction)
    if key not in _SPLITS:
        if len(_SPLITS) >= _SPLITS_KEPT:
            del _SPLITS[next(iter(_SPLITS))]
        _SPLITS[key] = hold_out_validation(load_dataset(*key[:4]), config.validation_fraction, config.seed)
    return _SPLITS[key]


def client_data(config: RunConfig, partition_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One client's partition of the training split."""
    return client_split(splits_of(config), partition_id, config.num_clients, config.partitioner, config.seed,
                        config.dirichlet_alpha, config.classes_per_client)


@functools.lru_cache(maxsize=16)
def mode_of(config: RunConfig, name: str | None) -> MaskMode | None:
    """The mask mode ``name`` (a client reads it from its instruction, so it never imports a
    plug-in) with this config's parameters; None for the dense baselines."""
    return None if name is None else mode_class(name).from_config(config)


def make_model(config: RunConfig, splits: Splits, mode: MaskMode | None) -> nn.Module:
    """The run's model on the CPU: masked and seeded by ``mode``, dense when it is None.

    Dense weights are seeded too (torch's default init under ``seed``), so FedAvg starts
    from the same point on every run with that seed.
    """
    seed_torch(config.seed)
    model = build_model(config.model, splits.input_shape, splits.num_classes, config.width)
    if mode is None:
        return model
    return to_masked(model, mode, seed=config.seed, init=config.init, batchnorm=config.batchnorm)


@dataclass(frozen=True)
class ModelSpec:
    """What every party derives from the config alone: layouts and fingerprint.

    ``layout`` is the global state's (what the server broadcasts), ``upload`` the tensors a
    client sends (the same but for Slot Machines' bit-planes), and ``num_connections`` the
    weights a bits-per-parameter figure divides by.
    """

    layout: Layout
    fingerprint: bytes
    upload: Layout
    num_connections: int

    @classmethod
    def of(cls, config: RunConfig, model: nn.Module, mode: MaskMode) -> ModelSpec:
        layout = Layout.from_arrays(get_scores(model))
        return cls(layout, layout.fingerprint(config.seed, config.model, config.init), mode.upload_layout(layout),
                   num_connections(model))


def local_training(config: RunConfig) -> LocalTraining:
    return LocalTraining(config.local_epochs, config.batch_size, config.optimizer, config.lr, config.momentum,
                         config.weight_decay)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: RunConfig, device: torch.device, seed: int,
          mode: MaskMode | None = None) -> dict[str, float]:
    """Local training of whatever is trainable (scores, or dense weights for FedAvg), with
    the mask mode's own optimizer and step hooks where it has them (LaPerm's)."""
    optimizer = after_step = None
    if mode is not None:
        optimizer, after_step = mode.optimizer(), mode.after_step(model)
    metrics = train_model(model, x, y, local_training(config), device, seed, optimizer, after_step)
    if mode is not None:
        mode.after_training(model)
    return metrics


evaluate = evaluate_model


def dense_state(model: nn.Module, copy: bool = True) -> dict[str, np.ndarray]:
    """The model's tensors as arrays; ``copy=False``: views of a CPU model's own memory, valid
    until it trains again (to be serialized at once)."""
    return {k: v.detach().cpu().numpy().copy() if copy else v.detach().cpu().numpy()
            for k, v in model.state_dict().items()}


def load_dense_state(model: nn.Module, state: dict[str, np.ndarray]) -> None:
    # a read-only array (a decoded broadcast shared by a process's clients) is copied, not shared with torch
    model.load_state_dict({k: torch.as_tensor(v if v.flags.writeable else np.array(v)) for k, v in state.items()},
                          strict=True)
