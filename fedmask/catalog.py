"""What fedmask offers, one line each: what ``fedmask list`` prints.

The names come from where each list is defined (the method registry, ``MODELS``,
``DATASETS``, ...); this module only adds a sentence to each, and a test checks that
every name has one.
"""

from __future__ import annotations

from fedmask.methods import BUILTIN
from fedmask.names import ATTACKS, DATASETS, DOWNLINK_CODECS, INITS, MODELS, PARTITIONERS, UPLINK_CODECS

_MODELS = {
    "mlp": "64-256-256-classes perceptron (digits-sized inputs; any input is flattened)",
    "lenet-300-100": "LeNet-300-100, the lottery-ticket and Slot Machines MLP for MNIST",
    "conv2": "two 64-channel 3x3 convs, a 2x2 max-pool, a 256-256 dense head",
    "conv4": "Conv2 plus a 128-channel block (FedPM's MNIST/EMNIST model)",
    "conv6": "Conv4 plus a 256-channel block (FedPM's CIFAR-10 model)",
    "resnet18": "torchvision's ResNet-18 with a CIFAR-style 3x3 stem, BatchNorm made stateless",
}
_DATASETS = {
    "digits": "scikit-learn's 1,797 real 8x8 digits, embedded (no files needed); seeded 80/20 split",
    "mnist": "MNIST from data-dir in torchvision's layout (MNIST/raw/...); '' downloads it into ~/.cache/fedmask/data",
    "fashion-mnist": "Fashion-MNIST from data-dir in torchvision's layout (FashionMNIST/raw/...); '' downloads it "
                     "into ~/.cache/fedmask/data",
    "cifar10": "CIFAR-10 from data-dir (cifar-10-batches-py/)",
    "idx": "any folder of IDX files (train-*/t10k-*; one split only is split by test-fraction)",
}
_PARTITIONERS = {
    "iid": "shuffled, equal shares",
    "dirichlet": "class shares per client drawn from Dirichlet(dirichlet-alpha): non-IID",
    "classes": "each client holds classes-per-client classes (FedPM's non-IID split)",
    "flwr-iid": "Flower Datasets' IidPartitioner after a seeded shuffle (the 'flwr-datasets' extra)",
    "flwr-dirichlet": "Flower Datasets' DirichletPartitioner by label, alpha = dirichlet-alpha (the extra)",
    "flwr-pathological": "Flower Datasets' PathologicalPartitioner, classes-per-client classes each (the extra)",
}
_UPLINK = {
    "auto": "the default: relative-entropy for FedPM (and any method uploading a sample of probabilities), entropy "
            "for the other mask methods",
    "packbits": "one bit per parameter plus a 28-byte header",
    "entropy": "range-coded against the broadcast state (or the mask's own frequency), packed when shorter",
    "relative-entropy": "FedPM: a sample's index among candidates both ends draw from theta, about KL(q||theta) bits",
}
_DOWNLINK = {
    "float32": "the global state as it is, 32 bits per value",
    "float16": "half precision, saturated at float16's range",
    "quantized": "2**downlink-bits uniform levels per tensor, entropy-coded with their histogram (lossy)",
    "lossless": "the exact state: each node gets the entropy-coded votes since the state it holds and "
                "replays the server's update (FedPM: the counts), or the float32 state (plug-ins)",
    "ef-qsgd": "dense baselines: the round's update QSGD-quantized (2**(downlink-bits-1) - 1 levels) and "
               "entropy-coded, server error feedback (DoubleSqueeze); nodes that missed rounds get the updates "
               "since the state they hold, or the float32 state",
}
_ATTACKS = {
    "none": "every client is honest",
    "invert": "Byzantine clients upload the complement of their mask",
    "all-ones": "Byzantine clients keep every weight",
    "random": "Byzantine clients upload a fair coin per weight",
    "colluding": "every Byzantine client uploads the same crafted mask: the complement of the global one",
    "poison": "dense baselines: Byzantine clients send weights or updates with one coordinate per tensor at 3e38",
}
_INITS = {
    "signed-kaiming-constant": "±sqrt(2/fan_in), edge-popup's frozen weights",
    "signed-constant-e": "±e*sqrt(1/fan_in), FedPM's reference weights",
    "kaiming-normal": "N(0, 2/fan_in)",
    "kaiming-uniform": "U(±sqrt(6/fan_in)) (He uniform): fedmask's Slot Machines and LaPerm configs",
    "glorot-uniform": "U(±sqrt(6/(fan_in+fan_out))): Slot Machines' reference candidates",
}


def catalog() -> dict[str, dict[str, str]]:
    """Section -> name -> one line, in each list's own order."""
    def section(names: object, text: dict[str, str]) -> dict[str, str]:
        return {name: text.get(name, "") for name in names}  # type: ignore[attr-defined]

    return {
        "methods": {name: method.summary for name, method in BUILTIN.items()},
        "models": section(MODELS, _MODELS),
        "datasets": section(DATASETS, _DATASETS),
        "partitioners": section(PARTITIONERS, _PARTITIONERS),
        "uplink codecs": section(UPLINK_CODECS, _UPLINK),
        "downlink codecs": section(DOWNLINK_CODECS, _DOWNLINK),
        "attacks": section(ATTACKS, _ATTACKS),
        "weight inits": section(INITS, _INITS),
    }


def format_catalog() -> str:
    lines = []
    for title, entries in catalog().items():
        lines.append(f"{title}:")
        width = max(len(name) for name in entries)
        lines += [f"  {name:<{width}}  {text}" for name, text in entries.items()]
    lines.append("  (a plug-in method is any 'module:Class' subclass of fedmask.MaskAggregator)")
    return "\n".join(lines)
