"""Model shapes from the papers, built from plain Linear/Conv2d so that masking composes.

``build_model`` returns an ordinary dense PyTorch model; :func:`fedmask.core.masking.to_masked`
turns it into a masked one. The dense form is what the FedAvg baseline trains. A model plug-in, ``"module:function"``,
is the user's own: ``function(input_shape, num_classes)`` returns a ``torch.nn.Module``
built from layers fedmask masks (Linear, Conv2d; BatchNorm, made non-affine), with any
parameter-free layers between them.
"""

from __future__ import annotations

import torch
from torch import nn

from fedmask.names import MODELS
from fedmask.plugins import PluginError, import_object, is_plugin_name

# Conv widths per block (two convs then a 2x2 max-pool per block), as in the lottery-ticket
# and FedPM papers; each is followed by a 256-256-classes dense head.
_CONV_BLOCKS = {"conv2": (64,), "conv4": (64, 128), "conv6": (64, 128, 256)}


def _dense_head(in_features: int, hidden: tuple[int, ...], num_classes: int) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_features, width), nn.ReLU()]
        in_features = width
    return layers + [nn.Linear(in_features, num_classes)]


def _flat_size(features: nn.Module, input_shape: tuple[int, ...]) -> int:
    with torch.no_grad():
        return features(torch.zeros(1, *input_shape)).flatten(1).shape[1]


def _conv_net(blocks: tuple[int, ...], input_shape: tuple[int, ...], num_classes: int,
              head: tuple[int, ...] = (256, 256)) -> nn.Module:
    layers: list[nn.Module] = []
    channels = input_shape[0]
    for width in blocks:
        layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
        layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        channels = width
    features = nn.Sequential(*layers)
    flat = _flat_size(features, input_shape)
    return nn.Sequential(features, nn.Flatten(), *_dense_head(flat, head, num_classes))


def _resnet18(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """torchvision's ResNet-18 with a CIFAR-style stem (3x3 conv, no max-pool)."""
    import torchvision  # here, not at the top: it adds ~2 s to every process start (a ClientApp per message)

    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(input_shape[0], 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def _wider(widths: tuple[int, ...], factor: float) -> tuple[int, ...]:
    return tuple(max(1, round(w * factor)) for w in widths)


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, width: float = 1.0) -> nn.Module:
    """A dense model for inputs of ``input_shape`` (C, H, W) and ``num_classes`` outputs, its
    hidden layers (and conv channels) ``width`` times as wide as the paper's."""
    if is_plugin_name(name):
        if width != 1.0:
            raise ValueError("width: a plug-in model takes width = 1 only (build it as wide as you like)")
        return _plugin_model(name, input_shape, num_classes)
    flat = int(torch.tensor(input_shape).prod())
    if name == "mlp":
        return nn.Sequential(nn.Flatten(), *_dense_head(flat, _wider((256, 256), width), num_classes))
    if name == "lenet-300-100":
        return nn.Sequential(nn.Flatten(), *_dense_head(flat, _wider((300, 100), width), num_classes))
    if name in _CONV_BLOCKS:
        return _conv_net(_wider(_CONV_BLOCKS[name], width), input_shape, num_classes, _wider((256, 256), width))
    if name == "resnet18":
        if width != 1.0:
            raise ValueError("model: resnet18 takes width = 1 only")
        return _resnet18(input_shape, num_classes)
    raise ValueError(f"model: expected one of {', '.join(MODELS)} or 'module:function', got {name!r}")


def _plugin_model(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The user's ``function(input_shape, num_classes)``, checked to be a module with something to mask."""
    build = import_object(name)
    if not callable(build):
        raise PluginError(f"{name!r} is a {type(build).__name__}; expected a function (input_shape, num_classes) "
                          "returning a torch.nn.Module")
    try:
        model = build(tuple(input_shape), num_classes)
    except Exception as err:  # the user's code may fail in any way; say where
        raise PluginError(f"{name!r}({tuple(input_shape)}, {num_classes}) raised {type(err).__name__}: {err}") from None
    if not isinstance(model, nn.Module):
        raise PluginError(f"{name!r} returned a {type(model).__name__}; expected a torch.nn.Module")
    if not any(isinstance(m, (nn.Linear, nn.Conv2d)) for m in model.modules()):
        raise PluginError(f"{name!r} returned a model without Linear or Conv2d layers: nothing fedmask can mask")
    return model
