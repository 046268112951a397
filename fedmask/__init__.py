"""fedmask: federated learning in which clients send masks over seeded random weights.

``fedmask.simulate(config_or_path, **overrides)`` runs an experiment and returns a
:class:`fedmask.api.Result`; ``fedmask.load_run(run_dir)`` reads one back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Result", "load_run", "simulate"]

if TYPE_CHECKING:
    from fedmask.api import Result, load_run, simulate


def __getattr__(name: str) -> Any:
    # Imported on first use: `import fedmask` stays light, and the command line can check a
    # config before torch, Flower or Ray are loaded.
    if name in __all__:
        from fedmask import api

        return getattr(api, name)
    raise AttributeError(f"module 'fedmask' has no attribute {name!r}")
