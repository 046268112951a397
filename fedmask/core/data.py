"""Datasets and client partitions for the federated simulations.

Every simulated client calls `load_dataset` and `client_split` each round, so
both are cached per process: the first call pays for parsing and
normalising, later calls are dictionary look-ups.  The cached tensors are
shared, so callers must treat them as read-only.

Normalisation (all datasets): pixels are scaled to [0, 1] (8x8 digits by
/16, 8-bit images by /255), then each channel is standardised with the mean
and standard deviation of the *train* split only, and the same constants are
applied to the test split.  Using train statistics keeps test data out of
preprocessing; for the full MNIST train split they reproduce the familiar
0.1307 / 0.3081.

A dataset plug-in, `"module:function"`, is the user's own tensors: `function()`
returns `(x_train, y_train, x_test, y_test)` (torch tensors or numpy arrays; x of
any sample shape, y integer class labels 0..C-1), used as given (no scaling), as float32
and int64.

Every data problem raises `DataError`, whose message names the file or
setting at fault and what was expected, so a bad set-up fails at start-up
rather than as an obscure error inside a client several rounds later.
"""

from __future__ import annotations

import gzip
import math
import os
import socket
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from fedmask.names import DATASETS, FLOWER_PARTITIONERS, PARTITIONERS
from fedmask.plugins import PluginError, import_object, is_plugin_name

DEFAULT_DATA_DIR = Path("~/.cache/fedmask/data").expanduser()
DOWNLOAD_TIMEOUT_S = 20.0

_IDX_IMAGES_MAGIC = 0x00000803
_IDX_LABELS_MAGIC = 0x00000801
_MNIST_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_CIFAR_FOLDER = "cifar-10-batches-py"
_CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")
_TEST_PREFIXES = ("t10k", "test")


class DataError(ValueError):
    """A dataset, file or partition setting that cannot be used as given."""


@dataclass(frozen=True, eq=False)
class Splits:
    """Normalised train/test tensors of one dataset.

    `eq=False` makes equality and hashing identity-based: the object is a
    cache key for `client_split`, and comparing tensors element-wise there
    would be both slow and ambiguous.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    x_val: torch.Tensor | None = None  # held out of the train split by :func:`hold_out_validation`
    y_val: torch.Tensor | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample, (C, H, W), which models need to size layers."""
        return tuple(self.x_train.shape[1:])


def hold_out_validation(splits: Splits, fraction: float, seed: int) -> Splits:
    """The same data with a seeded ``fraction`` of the train split moved into a validation
    split, which no client trains on: every choice (learning rate, epochs, variant) is made on
    it, and the test split is read once, for the reported figure."""
    if fraction <= 0:
        return splits
    num_train = len(splits.y_train)
    num_val = int(round(fraction * num_train))
    if not 1 <= num_val <= num_train - 1:
        raise DataError(f"validation-fraction={fraction} leaves an empty train or validation split "
                        f"of {num_train} train samples")
    order = torch.from_numpy(np.random.default_rng([seed, 0x56414C]).permutation(num_train))
    val, train = order[:num_val], order[num_val:].sort().values
    return Splits(splits.x_train[train], splits.y_train[train], splits.x_test, splits.y_test,
                  splits.num_classes, splits.x_train[val], splits.y_train[val])


# ---------------------------------------------------------------- loading


@lru_cache(maxsize=4)
def load_dataset(name: str, data_dir: str = "", test_fraction: float = 0.2,
                 seed: int = 0) -> Splits:
    """Load, split and normalise a dataset by name (see `DATASETS`).

    `test_fraction` and `seed` only matter for datasets without an official
    test split (`digits`, and an `idx` folder holding one split); `mnist`,
    `fashion-mnist` and `cifar10` use their official train/test splits.
    `data_dir` is ignored by `digits`, required by `idx`, and for the
    torchvision datasets an empty value means `DEFAULT_DATA_DIR` with a
    download attempt.
    """
    if is_plugin_name(name):
        return _plugin_splits(name)
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)} or 'module:function'")
    if name == "digits":
        arrays = _seeded_split(*_digits_arrays(), test_fraction, seed, "digits")
    elif name == "idx":
        arrays = _idx_folder_arrays(data_dir, test_fraction, seed)
    else:
        arrays = _torchvision_arrays(name, data_dir)
    return _to_splits(*arrays)


def _plugin_splits(name: str) -> Splits:
    """The user's ``function()`` -> (x_train, y_train, x_test, y_test), checked; DataError naming the key."""
    where = f"config key 'dataset': {name!r}"
    try:
        load = import_object(name)
    except PluginError as err:
        raise DataError(f"config key 'dataset': {err}") from None
    if not callable(load):
        raise DataError(f"{where} is a {type(load).__name__}; expected a function returning "
                        "(x_train, y_train, x_test, y_test)")
    try:
        got = load()
    except Exception as err:  # the user's code may fail in any way; say where
        raise DataError(f"{where}() raised {type(err).__name__}: {err}") from None
    if not isinstance(got, (tuple, list)) or len(got) != 4:
        raise DataError(f"{where} returned {type(got).__name__}; expected a tuple (x_train, y_train, x_test, y_test)")
    x_train, y_train, x_test, y_test = (_as_array(value, part, where) for value, part in
                                        zip(got, ("x_train", "y_train", "x_test", "y_test")))
    for x, y, split in ((x_train, y_train, "train"), (x_test, y_test, "test")):
        if x.ndim < 2 or y.ndim != 1 or len(x) != len(y) or len(y) == 0:
            raise DataError(f"{where}: x_{split} must be (N, ...) and y_{split} (N,) with N > 0; got shapes "
                            f"{tuple(x.shape)} and {tuple(y.shape)}")
        if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
            raise DataError(f"{where}: y_{split} must hold class labels 0, 1, ... (integers); got {y.dtype} "
                            f"from {y.min()}")
        if not np.isfinite(x).all():
            raise DataError(f"{where}: x_{split} holds NaN or inf")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(f"{where}: train samples are {tuple(x_train.shape[1:])} but test samples "
                        f"{tuple(x_test.shape[1:])}; both splits need one sample shape")
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    return Splits(torch.from_numpy(np.ascontiguousarray(x_train, dtype=np.float32)),
                  torch.from_numpy(y_train.astype(np.int64)),
                  torch.from_numpy(np.ascontiguousarray(x_test, dtype=np.float32)),
                  torch.from_numpy(y_test.astype(np.int64)), num_classes)


def _as_array(value: object, part: str, where: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        return value
    raise DataError(f"{where}: {part} is a {type(value).__name__}; expected a torch tensor or a numeric numpy array")


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits: real images that need no download."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.float32)[:, None, :, :] / 16.0
    return images, bunch.target.astype(np.int64)


def _seeded_split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int,
                  source: str) -> tuple[np.ndarray, ...]:
    """Seeded shuffle split for data that ships without a test split."""
    num_samples = len(y)
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be in (0, 1) for {source}, got {test_fraction}")
    num_test = int(round(test_fraction * num_samples))
    if not 1 <= num_test <= num_samples - 1:
        raise DataError(f"test_fraction={test_fraction} leaves an empty train or test split "
                        f"for {source} ({num_samples} samples); choose a value nearer 0.5")
    order = np.random.default_rng(seed).permutation(num_samples)
    test_idx, train_idx = order[:num_test], order[num_test:]
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


def _to_splits(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
               y_test: np.ndarray) -> Splits:
    """Scale 8-bit images to [0, 1], standardise with train stats, wrap as tensors."""
    if x_train.ndim != 4 or any(n == 0 for n in x_train.shape[1:]):
        raise DataError(f"images must be non-empty (C, H, W) arrays; got train images of shape "
                        f"{tuple(x_train.shape[1:])}")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(f"train images are {tuple(x_train.shape[1:])} (C, H, W) but test images are "
                        f"{tuple(x_test.shape[1:])}; both splits must have one image size")
    scaled_train = _unit_scale(x_train)
    axes = (0, 2, 3)
    mean = scaled_train.mean(axis=axes, keepdims=True, dtype=np.float64)
    std = scaled_train.std(axis=axes, keepdims=True, dtype=np.float64)
    std[std == 0] = 1.0  # a constant channel carries no information; avoid 0/0
    x_train, x_test = (_standardise(x, mean, std) for x in (x_train, x_test))
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    return Splits(torch.from_numpy(np.ascontiguousarray(x_train)),
                  torch.from_numpy(y_train.astype(np.int64)),
                  torch.from_numpy(np.ascontiguousarray(x_test)),
                  torch.from_numpy(y_test.astype(np.int64)),
                  num_classes)


def _standardise(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``(_unit_scale(images) - mean) / std`` in float64, rounded to float32.

    8-bit images take only 256 values per channel, so the formula is applied to those 256
    values (the same operations, so the same bits) and the images are looked up in that
    table: several times faster on Fashion-MNIST's 55M pixels than computing every pixel in
    float64, where it was half of loading the dataset (and each Ray worker loads it)."""
    if images.dtype != np.uint8:
        return ((_unit_scale(images) - mean) / std).astype(np.float32)
    levels = _unit_scale(np.arange(256, dtype=np.uint8))  # what _unit_scale makes of each value
    table = ((levels[None, :] - mean.reshape(-1, 1)) / std.reshape(-1, 1)).astype(np.float32)  # (C, 256)
    channels = np.arange(images.shape[1])[None, :, None, None]
    return table[channels, images]


def _unit_scale(images: np.ndarray) -> np.ndarray:
    """uint8 pixels -> [0, 1]; float input is assumed already scaled."""
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    return images.astype(np.float32)


# ---------------------------------------------------------------- IDX files


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse one IDX file (raw or .gz) and check its header against its size.

    Written by hand rather than through torchvision so that a wrong, short or
    corrupt file is reported by name instead of surfacing as a reshape error.
    """
    raw = _read_bytes(path)
    if len(raw) < 4 or int.from_bytes(raw[:4], "big") != magic:
        found = raw[:4].hex() if len(raw) >= 4 else f"only {len(raw)} bytes"
        raise DataError(f"{path}: bad IDX magic number (expected {magic:#010x}, found {found}); "
                        "is this the right file, and is it intact?")
    ndim = magic & 0xFF
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes, expected {header_len})")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected_len = header_len + math.prod(dims)
    if len(raw) != expected_len:
        raise DataError(f"{path}: header declares shape {tuple(dims)} = {expected_len} bytes "
                        f"with header, but the file holds {len(raw)} bytes (truncated or corrupt)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims)


def _read_bytes(path: Path) -> bytes:
    """Whole file contents, gunzipped when the name ends in .gz."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as error:  # zlib.error: a corrupt .gz stream
        raise DataError(f"{path}: cannot read ({type(error).__name__}: {error})") from None


def _read_idx_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images as (N, 1, H, W) uint8 plus int64 labels, with matching counts."""
    images = read_idx(images_path, _IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, _IDX_LABELS_MAGIC)
    if len(images) != len(labels):
        raise DataError(f"{images_path} holds {len(images)} images but {labels_path} holds "
                        f"{len(labels)} labels; the counts must match")
    if len(labels) == 0:
        raise DataError(f"{images_path}: holds no samples")
    return images[:, None, :, :], labels.astype(np.int64)


def _find_idx_pairs(folder: Path) -> dict[str, tuple[Path, Path]]:
    """Map split prefix ('train', 't10k', ...) to its (images, labels) files."""
    pairs: dict[str, tuple[Path, Path]] = {}
    for images_path in sorted(folder.iterdir(), key=_prefer_uncompressed):
        prefix, marker, suffix = images_path.name.partition("images-idx3-ubyte")
        if not marker or suffix not in ("", ".gz") or prefix.rstrip("-_.") in pairs:
            continue
        labels_path = _labels_for(images_path, prefix, suffix)
        pairs[prefix.rstrip("-_.")] = (images_path, labels_path)
    return pairs


def _prefer_uncompressed(path: Path) -> tuple[bool, str]:
    """Sort key: raw files before .gz, so an extracted copy wins (faster to read)."""
    return path.suffix == ".gz", path.name


def _labels_for(images_path: Path, prefix: str, suffix: str) -> Path:
    """The labels file that belongs to an images file, raw or gzipped."""
    candidates = [images_path.parent / f"{prefix}labels-idx1-ubyte{ext}"
                  for ext in dict.fromkeys((suffix, "", ".gz"))]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DataError(f"{images_path} has no labels file; expected "
                    f"{' or '.join(str(c) for c in candidates)}")


def _idx_folder_arrays(data_dir: str, test_fraction: float,
                       seed: int) -> tuple[np.ndarray, ...]:
    """Arrays from a folder of IDX files: train+t10k pairs, or one pair to split."""
    if not data_dir:
        raise DataError("dataset 'idx' needs data_dir: a folder holding "
                        "*images-idx3-ubyte(.gz) and *labels-idx1-ubyte(.gz) files")
    folder = Path(data_dir).expanduser()
    if not folder.is_dir():
        raise DataError(f"idx data_dir {folder} does not exist or is not a folder")
    pairs = _find_idx_pairs(folder)
    test_key = next((key for key in _TEST_PREFIXES if key in pairs), None)
    if "train" in pairs and test_key is not None:
        return (*_read_idx_pair(*pairs["train"]), *_read_idx_pair(*pairs[test_key]))
    if len(pairs) == 1:
        (only_pair,) = pairs.values()
        return _seeded_split(*_read_idx_pair(*only_pair), test_fraction, seed, str(folder))
    found = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
    raise DataError(f"{folder}: expected either one pair <prefix>images-idx3-ubyte(.gz) + "
                    "<prefix>labels-idx1-ubyte(.gz), or train-* and t10k-* pairs; found: "
                    f"{found}")


# ---------------------------------------------------------------- torchvision


def _torchvision_arrays(name: str, data_dir: str) -> tuple[np.ndarray, ...]:
    """Official train/test arrays, downloading first only for the default folder.

    Downloads are tried only when `data_dir` is empty, so an explicit folder
    never touches the network and offline failures are immediate.
    """
    root = Path(data_dir).expanduser() if data_dir else DEFAULT_DATA_DIR
    try:
        return _read_torchvision_files(name, root)
    except DataError as missing:
        if data_dir:
            raise
        download_error = _download(name, root)
        if download_error is None:
            return _read_torchvision_files(name, root)
        raise DataError(f"{missing}\nDownload into {root} failed: {download_error}") from None


def _read_torchvision_files(name: str, root: Path) -> tuple[np.ndarray, ...]:
    """Read the files torchvision keeps under `root`; DataError lists what is missing."""
    if name == "cifar10":
        return _read_cifar10(root)
    folder = root / _MNIST_FOLDERS[name] / "raw"
    expected = [folder / stem for stem in _MNIST_FILES]
    if not all(_existing(path) for path in expected):
        raise _missing_files_error(name, folder, [f"{p.name}(.gz)" for p in expected],
                                   layout=f"DIR/{folder.parent.name}/raw/")
    train_images, train_labels, test_images, test_labels = (cast(Path, _existing(p)) for p in expected)
    return (*_read_idx_pair(train_images, train_labels),
            *_read_idx_pair(test_images, test_labels))


def _existing(stem_path: Path) -> Path | None:
    """The raw file if present, else its .gz, else None."""
    for path in (stem_path, stem_path.with_name(stem_path.name + ".gz")):
        if path.is_file():
            return path
    return None


def _read_cifar10(root: Path) -> tuple[np.ndarray, ...]:
    """CIFAR-10 through torchvision (which verifies checksums), as NCHW uint8."""
    from torchvision.datasets import CIFAR10

    folder = root / _CIFAR_FOLDER
    try:
        train, test = (CIFAR10(str(root), train=flag, download=False) for flag in (True, False))
    except RuntimeError as error:
        raise _missing_files_error("cifar10", folder, list(_CIFAR_FILES), str(error),
                                   layout=f"DIR/{_CIFAR_FOLDER}/") from None
    return tuple(array for ds in (train, test)
                 for array in (ds.data.transpose(0, 3, 1, 2), np.asarray(ds.targets, np.int64)))


def _missing_files_error(name: str, folder: Path, files: list[str], detail: str = "", layout: str = "") -> DataError:
    """One message format for every missing-download case; ``layout``: where the files go under
    a data-dir (``DIR/MNIST/raw/``)."""
    listing = "\n".join(f"  {folder / item}" for item in files)
    note = f" ({detail})" if detail else ""
    return DataError(f"dataset {name!r}: files not found or corrupt in {folder}{note}; expected:\n"
                     f"{listing}\nPut them there, or in {layout} of another folder DIR and set data-dir = \"DIR\" "
                     f"(an empty data-dir downloads them into {DEFAULT_DATA_DIR} when online).")


def _download(name: str, root: Path) -> str | None:
    """Let torchvision download into `root`; return the error text, or None on success.

    A socket timeout is set for the duration so that an offline machine with
    a hanging resolver fails in seconds instead of minutes.
    """
    from torchvision import datasets

    dataset_class = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST,
                     "cifar10": datasets.CIFAR10}[name]
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        os.makedirs(root, exist_ok=True)
        for train in (True, False):
            dataset_class(str(root), train=train, download=True)
    except Exception as error:  # network errors come in many types; report any of them
        return f"{type(error).__name__}: {error}"
    finally:
        socket.setdefaulttimeout(previous_timeout)
    return None


# ---------------------------------------------------------------- partitions


def partition(labels: np.ndarray, num_clients: int, partitioner: str = "iid", seed: int = 0,
              dirichlet_alpha: float = 0.3, classes_per_client: int = 2) -> list[np.ndarray]:
    """Split sample indices among clients; one sorted int64 index array per client.

    Deterministic for a given seed, disjoint, and never hands a client an
    empty array (a client without data would crash or silently skew the
    simulation later, so it is a set-up error instead).  `dirichlet_alpha`
    is only checked for 'dirichlet', `classes_per_client` only for 'classes'.
    """
    labels = _check_partition_args(labels, num_clients, partitioner)
    rng = np.random.default_rng(seed)
    if partitioner == "iid":
        parts = np.array_split(rng.permutation(len(labels)), num_clients)
        _check_no_empty_client(parts, f"partitioner='iid', seed={seed}", "use fewer clients", len(labels))
    elif partitioner == "dirichlet":  # draws again where a client would be empty
        parts = _dirichlet_partition(labels, num_clients, dirichlet_alpha, seed, rng)
    elif partitioner in FLOWER_PARTITIONERS:
        parts = _flower_parts(labels, num_clients, partitioner, seed, dirichlet_alpha, classes_per_client)
        _check_no_empty_client(parts, f"partitioner={partitioner!r}, seed={seed}", "use fewer clients", len(labels))
    else:
        parts = _classes_parts(labels, num_clients, classes_per_client, rng)
        _check_no_empty_client(parts, f"partitioner='classes', classes_per_client={classes_per_client}, seed={seed}",
                               "use fewer clients or a larger classes_per_client", len(labels))
    return [np.sort(part).astype(np.int64) for part in parts]


def _check_partition_args(labels: np.ndarray, num_clients: int, partitioner: str) -> np.ndarray:
    """Reject settings that cannot give every client data, before any work."""
    if partitioner not in PARTITIONERS:
        raise DataError(f"unknown partitioner {partitioner!r}; valid names: "
                        f"{', '.join(PARTITIONERS)}")
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"labels must be a non-empty 1-D integer array, got shape "
                        f"{labels.shape} and dtype {labels.dtype}")
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)):
        raise DataError(f"num_clients must be an integer, got {num_clients!r}")
    if not 1 <= num_clients <= len(labels):
        raise DataError(f"num_clients must be between 1 and the number of train samples "
                        f"({len(labels)}), got {num_clients}")
    return labels


def _flower_parts(labels: np.ndarray, num_clients: int, partitioner: str, seed: int, alpha: float,
                  classes_per_client: int) -> list[np.ndarray]:
    """Flower Datasets' own partitioner over the labels, as a Flower baseline splits its data:
    the samples shuffled with ``seed`` (as ``FederatedDataset`` does), then ``IidPartitioner``,
    ``DirichletPartitioner`` (by label, ``alpha``, Flower's defaults otherwise) or
    ``PathologicalPartitioner`` (by label, ``classes_per_client`` classes each)."""
    try:
        from datasets import Dataset
        from flwr_datasets import partitioner as flower
    except ImportError:
        raise DataError(f"partitioner {partitioner!r} needs Flower Datasets, an optional extra: "
                        "pip install -e \".[flwr-datasets]\" (or choose iid, dirichlet or classes)") from None
    table = Dataset.from_dict({"label": labels.tolist(), "index": list(range(len(labels)))}).shuffle(seed=seed)
    split: Any
    if partitioner == "flwr-iid":
        split = flower.IidPartitioner(num_partitions=num_clients)
    elif partitioner == "flwr-dirichlet":
        split = flower.DirichletPartitioner(num_partitions=num_clients, partition_by="label", alpha=alpha, seed=seed)
    else:
        split = flower.PathologicalPartitioner(num_partitions=num_clients, partition_by="label",
                                               num_classes_per_partition=classes_per_client, seed=seed)
    split.dataset = table
    try:
        return [np.asarray(split.load_partition(i)["index"], dtype=np.int64) for i in range(num_clients)]
    except ValueError as err:  # e.g. Dirichlet draws that never give every client its minimum
        raise DataError(f"partitioner {partitioner!r} (Flower Datasets) refused {num_clients} clients "
                        f"(num-clients, dirichlet-alpha, classes-per-client): {err}") from None


DIRICHLET_DRAWS = 100
"""How many Dirichlet splits `partition` draws, one after another from the seed's
generator, before it gives up on one where every client holds a sample."""


def _dirichlet_partition(labels: np.ndarray, num_clients: int, alpha: float, seed: int,
                         rng: np.random.Generator) -> list[np.ndarray]:
    """Label skew: each class is shared among clients in Dir(alpha) proportions.

    A small alpha over many clients can leave a client with nothing (MNIST-10k's
    8,000 images over 100 clients at alpha 0.1, seeds 0 and 1). Then draw again from
    the same generator until no client is empty: the seed still fixes the split, and
    a first draw without an empty client is kept as it was. Flower Datasets'
    DirichletPartitioner redraws too, for at least `min_partition_size` samples (10 by
    default); here the floor is one sample, so a redrawn split can hold clients of one
    or two samples (MNIST-10k at alpha 0.1 does). A draw that leaves more than half
    the clients empty ends the search early: the setting cannot work.
    """
    if not alpha > 0:
        raise DataError(f"dirichlet_alpha must be > 0, got {alpha}")
    draws = 0
    while draws < DIRICHLET_DRAWS:
        parts = _one_dirichlet_draw(labels, num_clients, alpha, rng)
        draws += 1
        empty = [client for client, part in enumerate(parts) if len(part) == 0]
        if not empty:
            return parts
        if 2 * len(empty) > num_clients:
            break
    raise DataError(f"partitioner='dirichlet' left some client with no samples in every draw ({draws} "
                    f"of at most {DIRICHLET_DRAWS}; dirichlet_alpha={alpha}, seed={seed}, {num_clients} "
                    f"clients, {len(labels)} train samples; the last draw left {len(empty)} clients "
                    f"empty, client {empty[0]} first); "
                    "use fewer clients (num-clients) or a larger dirichlet-alpha")


def _one_dirichlet_draw(labels: np.ndarray, num_clients: int, alpha: float,
                        rng: np.random.Generator) -> list[np.ndarray]:
    shares: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for label in np.unique(labels):
        class_idx = rng.permutation(np.flatnonzero(labels == label))
        proportions = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(proportions)[:-1] * len(class_idx)).astype(int)
        for client, piece in enumerate(np.split(class_idx, cuts)):
            shares[client].append(piece)
    return [np.concatenate(pieces) for pieces in shares]


def _classes_parts(labels: np.ndarray, num_clients: int, classes_per_client: int,
                   rng: np.random.Generator) -> list[np.ndarray]:
    """FedPM-style split: each client holds `classes_per_client` classes.

    Clients take consecutive windows of a seeded cyclic class order, so each
    client's classes are distinct and every class is held by nearly the same
    number of clients; each class is then split evenly among its holders.
    """
    classes = np.unique(labels)
    if not 1 <= classes_per_client <= len(classes):
        raise DataError(f"classes_per_client must be between 1 and the number of classes "
                        f"({len(classes)}), got {classes_per_client}")
    if num_clients * classes_per_client < len(classes):
        raise DataError(f"partitioner='classes' with {num_clients} clients x "
                        f"{classes_per_client} classes cannot use all {len(classes)} classes; "
                        "use more clients or a larger classes_per_client")
    order = rng.permutation(classes)
    holders: dict[int, list[int]] = {int(c): [] for c in classes}
    for client in range(num_clients):
        for slot in range(classes_per_client):
            holders[int(order[(client * classes_per_client + slot) % len(order)])].append(client)
    shares: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for label, clients in holders.items():
        class_idx = rng.permutation(np.flatnonzero(labels == label))
        for client, piece in zip(clients, np.array_split(class_idx, len(clients))):
            shares[client].append(piece)
    return [np.concatenate(pieces) for pieces in shares]


def _check_no_empty_client(parts: list[np.ndarray], settings: str, advice: str,
                           num_samples: int) -> None:
    """Fail at set-up, naming the client, rather than train on nothing later."""
    for client, part in enumerate(parts):
        if len(part) == 0:
            raise DataError(f"client {client} of {len(parts)} gets no samples with {settings} "
                            f"({num_samples} train samples); {advice}")


@lru_cache(maxsize=16)
def _cached_partition(splits: Splits, num_clients: int, partitioner: str, seed: int,
                      dirichlet_alpha: float, classes_per_client: int) -> tuple[np.ndarray, ...]:
    """All clients' indices at once, so clients sharing a process partition once."""
    parts = partition(splits.y_train.numpy(), num_clients, partitioner, seed,
                      dirichlet_alpha, classes_per_client)
    for part in parts:
        part.setflags(write=False)  # shared through the cache
    return tuple(parts)


@lru_cache(maxsize=64)
def client_split(splits: Splits, partition_id: int, num_clients: int, partitioner: str,
                 seed: int, dirichlet_alpha: float,
                 classes_per_client: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One client's (x, y) slice of the train split, cached per process."""
    if not 0 <= partition_id < num_clients:
        raise DataError(f"partition_id must be in [0, {num_clients}), got {partition_id}")
    parts = _cached_partition(splits, num_clients, partitioner, seed,
                              dirichlet_alpha, classes_per_client)
    index = torch.from_numpy(parts[partition_id].copy())
    return splits.x_train[index], splits.y_train[index]


def partition_sizes(splits: Splits, num_clients: int, partitioner: str, seed: int,
                    dirichlet_alpha: float, classes_per_client: int) -> tuple[int, ...]:
    """Every client's number of train samples: the most ``num-examples`` it can honestly claim."""
    parts = _cached_partition(splits, num_clients, partitioner, seed, dirichlet_alpha, classes_per_client)
    return tuple(len(part) for part in parts)
