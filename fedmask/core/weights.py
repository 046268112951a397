"""Frozen random weights that every party regenerates from the shared seed.

The weights are never sent: a client and the server each rebuild them bit for bit from
``(seed, tensor name)`` with a CPU ``torch.Generator`` (CPU so that a GPU party draws the
same numbers as a CPU party), then move them to their own device.
"""

from __future__ import annotations

import hashlib
import math

import torch

from fedmask.names import INITS


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any tuple of values; stable across processes and machines.

    Python's ``hash`` is salted per process, so it cannot be used to agree on seeds
    between a Ray worker and the server.
    """
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def fan_in(shape: tuple[int, ...]) -> int:
    """Inputs feeding one output unit: ``in`` for Linear, ``in * kh * kw`` for Conv."""
    if len(shape) < 2:
        raise ValueError(f"fan_in needs the weight's shape (2-D or more), got {shape}")
    return math.prod(shape[1:])


def fan_out(shape: tuple[int, ...]) -> int:
    """Outputs one input unit feeds: ``out`` for Linear, ``out * kh * kw`` for Conv."""
    if len(shape) < 2:
        raise ValueError(f"fan_out needs the weight's shape (2-D or more), got {shape}")
    return shape[0] * math.prod(shape[2:])


def frozen_tensor(
    seed: int, name: str, shape: tuple[int, ...], layer_fan_in: int, init: str, layer_fan_out: int | None = None
) -> torch.Tensor:
    """The frozen values of one tensor, identical on every party for the same arguments.

    ``signed-kaiming-constant`` is edge-popup's default (``±sqrt(2/fan_in)``, the ReLU
    gain); ``signed-constant-e`` is FedPM's reference init (``±e*sqrt(1/fan_in)``);
    ``kaiming-normal`` draws ``N(0, 2/fan_in)``; ``kaiming-uniform`` draws
    ``U(-sqrt(6/fan_in), sqrt(6/fan_in))``, the same variance, bounded (He uniform; fedmask's
    Slot Machines default, not the reference's); ``glorot-uniform`` draws
    ``U(-b, b)`` with ``b = sqrt(6/(fan_in + fan_out))``, Slot Machines' reference candidates
    (``layer_fan_out`` is then required).
    """
    generator = torch.Generator(device="cpu").manual_seed(derive_seed(seed, name))
    if init == "kaiming-normal":
        return torch.randn(shape, generator=generator) * math.sqrt(2.0 / layer_fan_in)
    if init == "kaiming-uniform":
        bound = math.sqrt(6.0 / layer_fan_in)
        return torch.rand(shape, generator=generator) * (2 * bound) - bound
    if init == "glorot-uniform":
        if layer_fan_out is None:
            raise ValueError("init 'glorot-uniform' needs the layer's fan_out")
        bound = math.sqrt(6.0 / (layer_fan_in + layer_fan_out))
        return torch.rand(shape, generator=generator) * (2 * bound) - bound
    signs = torch.randint(0, 2, shape, generator=generator).float() * 2.0 - 1.0
    if init == "signed-kaiming-constant":
        return signs * math.sqrt(2.0 / layer_fan_in)
    if init == "signed-constant-e":
        return signs * (math.e * math.sqrt(1.0 / layer_fan_in))
    raise ValueError(f"init: expected one of {', '.join(INITS)}, got {init!r}")
