"""fedmask: federated learning in which clients send masks over seeded random weights."""

__version__ = "0.1.0"
