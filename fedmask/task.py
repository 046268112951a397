"""What a party does with a config: build the model, load the global state, train, test.

Shared by the ClientApp, the ServerApp's evaluation and the plain-PyTorch benchmark loop,
so the three train and measure the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from fedmask.aggregators import standardised
from fedmask.codec import MaskLayout, upload_layout
from fedmask.data import Splits, load_dataset
from fedmask.masking import get_scores, num_connections, set_scores, to_masked
from fedmask.models import build_model
from fedmask.optimizers import FusedAdam, FusedSGD, fusable

if TYPE_CHECKING:
    from fedmask.config import RunConfig


def pick_device(config: RunConfig) -> torch.device:
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


_SPLITS: dict[tuple, Splits] = {}  # loaded splits by data key, oldest first
_SPLITS_KEPT = 4


def splits_of(config: RunConfig) -> Splits:
    """The run's data, loaded once per process for each (dataset, data-dir, test-fraction,
    seed): the ServerApp and every ClientApp round share it. The last 4 keys are kept."""
    key = (config.dataset, config.data_dir, config.test_fraction, config.seed)
    if key not in _SPLITS:
        if len(_SPLITS) >= _SPLITS_KEPT:
            del _SPLITS[next(iter(_SPLITS))]
        _SPLITS[key] = load_dataset(*key)
    return _SPLITS[key]


def make_model(config: RunConfig, splits: Splits, mode: str | None) -> nn.Module:
    """The run's model on the CPU: masked and seeded for a ``mode``, dense when it is None.

    ``mode`` is the method's mask mode (``config.method_entry.mask_mode`` on the server; a
    client reads it from its instruction, so it never has to import a plug-in).

    Dense weights are seeded too (torch's default init under ``seed``), so FedAvg starts
    from the same point on every run with that seed.
    """
    torch.manual_seed(config.seed)
    model = build_model(config.model, splits.input_shape, splits.num_classes)
    if mode is None:
        return model
    return to_masked(
        model,
        mode,
        seed=config.seed,
        init=config.init,
        density=config.density,
        eval_mask=config.eval_mask,
        slots=config.slots,
        slot_selection=config.slot_selection,
        fedpm_gradient=config.fedpm_gradient,
        biprop_gradient=config.biprop_gradient,
        biprop_scale_fan=config.biprop_scale_fan,
        slot_score_init=config.slot_score_init,
        batchnorm=config.batchnorm,
    )


@dataclass(frozen=True)
class ModelSpec:
    """What every party derives from the config alone: layouts and fingerprint.

    ``layout`` is the global state's (what the server broadcasts), ``upload`` the binary
    tensors a client sends (the same but for Slot Machines' bit-planes), and
    ``num_connections`` the weights a bits-per-parameter figure divides by.
    """

    layout: MaskLayout
    fingerprint: bytes
    upload: MaskLayout
    num_connections: int

    @classmethod
    def of(cls, config: RunConfig, model: nn.Module, mode: str) -> ModelSpec:
        layout = MaskLayout.from_arrays(get_scores(model))
        return cls(layout, layout.fingerprint(config.seed, config.model, config.init),
                   upload_layout(layout, mode), num_connections(model))


def load_state(model: nn.Module, state: dict[str, np.ndarray], mode: str) -> None:
    """Scores from a broadcast state: scores as is (topk), logit(theta) (bernoulli), or
    LaPerm's arrangement (ranks -> the seeded values in that order)."""
    if mode == "laperm":
        from fedmask.laperm import load_ranks

        load_ranks(model, state)
        return
    set_scores(model, scores_of_state(state, mode))


def training_scores(config: RunConfig, state: dict[str, np.ndarray], mode: str) -> dict[str, np.ndarray]:
    """The scores a client trains from after this broadcast ``state``: standardised under
    edge-popup's ``vote-levels`` rule (shared by the ClientApp and ``bench/plain_loop.py``)."""
    return scores_of_state(state, mode, standardise=config.edge_popup_server_rule == "vote-levels")


def scores_of_state(state: dict[str, np.ndarray], mode: str, standardise: bool = False) -> dict[str, np.ndarray]:
    """The scores a client starts from: the state as is (topk, slots; LaPerm's ranks, which
    :func:`load_state` applies instead) or logit(theta) (bernoulli). ``standardise``
    (edge-popup's ``vote-levels``, whose state is integer levels): top-k scores divided by
    their spread per tensor, as the other edge-popup rules keep them; top-k is unchanged."""
    if mode == "bernoulli":
        return {k: _logit(v) for k, v in state.items()}
    if standardise and mode in ("topk", "biprop"):
        return {k: standardised(v.astype(np.float64)) for k, v in state.items()}
    return state


def _logit(theta: np.ndarray) -> np.ndarray:
    p = np.clip(theta.astype(np.float64), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p)).astype(np.float32)


def dense_state(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def load_dense_state(model: nn.Module, state: dict[str, np.ndarray]) -> None:
    model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=True)


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: RunConfig,
    device: torch.device,
    seed: int,
) -> dict[str, float]:
    """Local training of whatever is trainable (scores, or dense weights for FedAvg).

    ``seed`` fixes the batch order and the Bernoulli samples, so one client's round is
    reproducible wherever it runs. A LaPerm model trains the paper's way instead (inner Adam
    at ``laperm-lr``, a rewire every ``laperm-sync`` steps and at the end; fedmask.laperm).
    """
    from fedmask import laperm

    if laperm.is_laperm(model):
        return laperm.train(model, x, y, config, device, seed)
    torch.manual_seed(seed)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt: FusedAdam | FusedSGD | torch.optim.Optimizer
    if not fusable(params):  # torch.optim, whose first use imports torch._dynamo (fedmask.optimizers)
        opt = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay) if config.optimizer == "adam" \
            else torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    elif config.optimizer == "adam":
        opt = FusedAdam(params, lr=config.lr, weight_decay=config.weight_decay)
    else:
        opt = FusedSGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    total_loss, correct, seen = 0.0, 0, 0
    for _ in range(config.local_epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), config.batch_size):
            idx = order[start : start + config.batch_size]
            xb, yb = x[idx].to(device), y[idx].to(device)
            opt.zero_grad()
            out = model(xb)
            loss = nn.functional.cross_entropy(out, yb)
            loss.backward()
            opt.step()
            total_loss += loss.item() * len(idx)
            correct += int((out.argmax(1) == yb).sum())
            seen += len(idx)
    return {"train-loss": total_loss / max(seen, 1), "train-accuracy": correct / max(seen, 1)}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    device: torch.device,
    seed: int = 0,
) -> tuple[float, float]:
    """(mean loss, accuracy) on ``x, y`` in eval mode; ``seed`` fixes sampled eval masks."""
    torch.manual_seed(seed)
    model.to(device).eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        xb, yb = x[start : start + batch_size].to(device), y[start : start + batch_size].to(device)
        out = model(xb)
        total_loss += float(nn.functional.cross_entropy(out, yb, reduction="sum"))
        correct += int((out.argmax(1) == yb).sum())
    return total_loss / len(x), correct / len(x)
