"""fedmask: federated learning in which clients send masks over seeded random weights.

``fedmask.simulate(config_or_path, **overrides)`` runs an experiment and returns a
:class:`fedmask.api.Result`; ``fedmask.load_run(run_dir)`` reads one back. A plug-in
aggregation rule subclasses ``fedmask.MaskAggregator`` (:mod:`fedmask.methods.base`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Imported on first use: `import fedmask` stays light, and the command line can check a
# config before torch, Flower or Ray are loaded.
_EXPORTS = {
    "Result": "fedmask.api", "load_run": "fedmask.api", "simulate": "fedmask.api",
    "ConfigError": "fedmask.config", "RunConfig": "fedmask.config",
    "MaskAggregator": "fedmask.methods.base", "RoundResult": "fedmask.methods.base",
    "weighted_vote": "fedmask.methods.votes", "robust_vote": "fedmask.methods.votes",
}
__all__ = ["ConfigError", "MaskAggregator", "Result", "RoundResult", "RunConfig", "load_run", "robust_vote",
           "simulate", "weighted_vote"]

if TYPE_CHECKING:
    from fedmask.api import Result, load_run, simulate
    from fedmask.config import ConfigError, RunConfig
    from fedmask.methods.base import MaskAggregator, RoundResult
    from fedmask.methods.votes import robust_vote, weighted_vote


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fedmask' has no attribute {name!r}")
