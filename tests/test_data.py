"""Tests for fedmask.core.data: loaders, IDX parsing, partitioners, client slices."""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmask.core import data
from fedmask.core.data import (
    DATASETS,
    FLOWER_PARTITIONERS,
    PARTITIONERS,
    DataError,
    Splits,
    client_split,
    load_dataset,
    partition,
)

OWN_PARTITIONERS = tuple(p for p in PARTITIONERS if p not in FLOWER_PARTITIONERS)  # Flower's: tested below
MNIST_T10K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist-t10k"
IMAGES_MAGIC, LABELS_MAGIC = 0x803, 0x801


# ---------------------------------------------------------------- helpers


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    """Serialise a uint8 array as an IDX file (big-endian header)."""
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, magic: int) -> Path:
    payload = idx_bytes(array, magic)
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)
    return path


def write_pair(folder: Path, prefix: str, num: int, gz: bool, seed: int = 0):
    """Write <prefix>-images/labels IDX files of random 6x5 images; return arrays."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(num, 6, 5), dtype=np.uint8)
    labels = (np.arange(num) % 3).astype(np.uint8)
    ext = ".gz" if gz else ""
    write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", images, IMAGES_MAGIC)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", labels, LABELS_MAGIC)
    return images, labels


def synthetic_labels(num: int = 2000, num_classes: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, num_classes, size=num)


def assert_disjoint_cover(parts: list[np.ndarray], num_samples: int) -> None:
    for part in parts:
        assert part.dtype == np.int64
        assert len(part) > 0
        assert np.all(np.diff(part) > 0), "indices must be sorted and unique"
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined)), "an index is used twice"
    np.testing.assert_array_equal(np.sort(joined), np.arange(num_samples))


def max_class_fraction(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean over clients of the share of the client's most common label."""
    return float(np.mean([np.bincount(labels[p]).max() / len(p) for p in parts]))


# ---------------------------------------------------------------- digits


def test_digits_shapes_dtypes_and_normalisation():
    splits = load_dataset("digits")
    assert splits.x_train.shape == (1438, 1, 8, 8)
    assert splits.x_test.shape == (359, 1, 8, 8)
    assert splits.x_train.dtype == splits.x_test.dtype == torch.float32
    assert splits.y_train.dtype == splits.y_test.dtype == torch.int64
    assert splits.y_train.shape == (1438,) and splits.y_test.shape == (359,)
    assert splits.num_classes == 10
    assert splits.input_shape == (1, 8, 8)
    assert abs(splits.x_train.mean().item()) < 1e-4
    assert abs(splits.x_train.std().item() - 1.0) < 1e-3
    assert abs(splits.x_test.mean().item()) < 0.2, "test uses train stats, should be close"
    assert set(splits.y_train.tolist()) == set(range(10))


def test_digits_split_is_deterministic_and_seeded():
    uncached = load_dataset.__wrapped__
    first, again = uncached("digits", seed=3), uncached("digits", seed=3)
    assert torch.equal(first.x_train, again.x_train) and torch.equal(first.y_test, again.y_test)
    other = uncached("digits", seed=4)
    assert not torch.equal(first.y_train, other.y_train)
    total = torch.cat([other.y_train, other.y_test]).bincount()
    assert torch.equal(total, torch.cat([first.y_train, first.y_test]).bincount())


def test_load_dataset_is_cached():
    assert load_dataset("digits", seed=1) is load_dataset("digits", seed=1)


def test_digits_test_fraction_and_bad_fraction():
    splits = load_dataset("digits", test_fraction=0.5)
    assert len(splits.y_test) == round(0.5 * 1797)
    assert len(splits.y_train) + len(splits.y_test) == 1797
    for bad in (0.0, 1.0, -0.1, 1e-6):
        with pytest.raises(DataError, match="test_fraction"):
            load_dataset("digits", test_fraction=bad)


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(DataError) as info:
        load_dataset("imagenet")
    for name in DATASETS:
        assert name in str(info.value)


# ---------------------------------------------------------------- partitioners


@pytest.mark.parametrize("partitioner", OWN_PARTITIONERS)
def test_partition_is_deterministic_disjoint_and_covering(partitioner):
    labels = synthetic_labels()
    parts = partition(labels, 8, partitioner, seed=5, dirichlet_alpha=1.0)
    again = partition(labels, 8, partitioner, seed=5, dirichlet_alpha=1.0)
    other = partition(labels, 8, partitioner, seed=6, dirichlet_alpha=1.0)
    assert len(parts) == 8
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))
    assert_disjoint_cover(parts, len(labels))


def test_iid_parts_are_near_equal():
    sizes = [len(p) for p in partition(synthetic_labels(1003), 10, "iid")]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 1003


@pytest.mark.parametrize("num_clients, per_client", [(10, 2), (7, 3), (5, 2), (12, 1), (3, 10)])
def test_classes_gives_each_client_exact_distinct_labels(num_clients, per_client):
    labels = synthetic_labels()
    parts = partition(labels, num_clients, "classes", seed=2, classes_per_client=per_client)
    for part in parts:
        assert len(np.unique(labels[part])) == per_client
    assert_disjoint_cover(parts, len(labels))


def test_classes_splits_each_class_evenly_among_holders():
    labels = np.repeat(np.arange(4), 100)
    parts = partition(labels, 4, "classes", seed=0, classes_per_client=2)
    counts = [np.bincount(labels[p], minlength=4) for p in parts]
    assert all(sorted(c[c > 0].tolist()) == [50, 50] for c in counts)


def test_dirichlet_small_alpha_is_more_skewed_than_large():
    labels = synthetic_labels(5000)
    skewed = partition(labels, 5, "dirichlet", seed=0, dirichlet_alpha=0.1)
    balanced = partition(labels, 5, "dirichlet", seed=0, dirichlet_alpha=100.0)
    assert max_class_fraction(labels, skewed) > 0.4
    assert max_class_fraction(labels, balanced) < 0.15
    assert_disjoint_cover(skewed, len(labels))


def draws_with_an_empty_client(labels: np.ndarray, num_clients: int, alpha: float,
                               seed: int, draws: int = 1) -> list[bool]:
    """Per draw from the seed's generator: whether it leaves a client empty (at most half)."""
    rng = np.random.default_rng(seed)
    empties = [sum(len(p) == 0 for p in data._one_dirichlet_draw(labels, num_clients, alpha, rng))
               for _ in range(draws)]
    return [0 < e <= num_clients // 2 for e in empties]


def test_empty_dirichlet_client_is_a_clear_error():
    """When the redraws leave a client empty every time, the error names the settings and
    the keys to change; a draw leaving most clients empty ends the search at once."""
    with pytest.raises(DataError) as info:
        partition(synthetic_labels(100), 50, "dirichlet", seed=0, dirichlet_alpha=0.01)
    message = str(info.value)
    assert "no samples in every draw (1 of at most" in message
    assert "dirichlet_alpha=0.01" in message and "50 clients" in message
    assert "fewer clients (num-clients)" in message and "larger dirichlet-alpha" in message


def test_a_dirichlet_setting_that_rarely_works_is_refused_after_every_draw(monkeypatch):
    """A setting where a few clients stay empty in most draws is searched to the last draw."""
    monkeypatch.setattr(data, "DIRICHLET_DRAWS", 3)
    labels = synthetic_labels(400)
    seed = next(s for s in range(200) if all(draws_with_an_empty_client(labels, 40, 0.05, s, draws=3)))
    with pytest.raises(DataError, match=r"no samples in every draw \(3 of at most 3;"):
        partition(labels, 40, "dirichlet", seed=seed, dirichlet_alpha=0.05)


def test_dirichlet_draws_again_where_a_client_would_be_empty():
    """A seed whose first Dirichlet draw leaves a client empty still partitions.

    The split is the same on every call (the redraws come from the seed's
    generator), and a seed whose first draw had no empty client keeps exactly
    that first draw, so splits that worked before are unchanged.
    """
    labels = synthetic_labels(2000)
    seeds = range(20)
    redrawn = [s for s in seeds if draws_with_an_empty_client(labels, 40, 0.1, s)[0]]
    kept = [s for s in seeds if s not in redrawn]
    assert redrawn and kept, "the sample should hold seeds of both kinds"
    for seed in redrawn:
        parts = partition(labels, 40, "dirichlet", seed=seed, dirichlet_alpha=0.1)
        assert all(len(part) > 0 for part in parts)
        assert_disjoint_cover(parts, len(labels))
        again = partition(labels, 40, "dirichlet", seed=seed, dirichlet_alpha=0.1)
        assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    for seed in kept:
        first = data._one_dirichlet_draw(labels, 40, 0.1, np.random.default_rng(seed))
        parts = partition(labels, 40, "dirichlet", seed=seed, dirichlet_alpha=0.1)
        assert all(np.array_equal(a, np.sort(b)) for a, b in zip(parts, first))


def test_empty_classes_client_is_a_clear_error():
    labels = np.array([0] * 10 + [1])  # class 1 has one sample but two holders
    with pytest.raises(DataError, match=r"client \d+ of 4 gets no samples.*classes_per_client=1"):
        partition(labels, 4, "classes", seed=0, classes_per_client=1)


@pytest.mark.parametrize("kwargs, pattern", [
    ({"num_clients": 0}, "num_clients"),
    ({"num_clients": 101}, "num_clients"),
    ({"num_clients": 2.5}, "num_clients"),
    ({"num_clients": 4, "partitioner": "dirichlet", "dirichlet_alpha": 0.0}, "dirichlet_alpha"),
    ({"num_clients": 4, "partitioner": "dirichlet", "dirichlet_alpha": -1}, "dirichlet_alpha"),
    ({"num_clients": 4, "partitioner": "classes", "classes_per_client": 0}, "classes_per_client"),
    ({"num_clients": 4, "partitioner": "classes", "classes_per_client": 11}, "classes_per_client"),
    ({"num_clients": 2, "partitioner": "classes", "classes_per_client": 2}, "all 10 classes"),
])
def test_invalid_partition_arguments(kwargs, pattern):
    with pytest.raises(DataError, match=pattern):
        partition(synthetic_labels(100), **kwargs)


def test_unknown_partitioner_lists_valid_names():
    with pytest.raises(DataError) as info:
        partition(synthetic_labels(100), 2, "shards")
    assert all(name in str(info.value) for name in PARTITIONERS)


def test_bad_labels_are_rejected():
    with pytest.raises(DataError, match="labels"):
        partition(np.zeros((3, 3), dtype=int), 2)
    with pytest.raises(DataError, match="labels"):
        partition(np.array([], dtype=int), 1)


@settings(max_examples=60, deadline=None)
@given(num_samples=st.integers(1, 300), num_classes=st.integers(1, 12),
       num_clients=st.integers(1, 30), partitioner=st.sampled_from(OWN_PARTITIONERS),
       alpha=st.floats(0.01, 50), per_client=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_partition_property(num_samples, num_classes, num_clients, partitioner, alpha,
                            per_client, seed):
    """Any setting either fails with DataError or gives a valid, covering partition."""
    labels = synthetic_labels(num_samples, num_classes, seed)
    try:
        parts = partition(labels, num_clients, partitioner, seed, alpha, per_client)
    except DataError:
        return
    assert len(parts) == num_clients
    assert_disjoint_cover(parts, num_samples)
    if partitioner == "classes":
        assert all(len(np.unique(labels[p])) <= per_client for p in parts)


# ---------------------------------------------------------------- client_split


def test_client_split_slices_train_split_and_is_cached():
    splits = load_dataset("digits")
    args = (5, "classes", 0, 0.3, 2)
    slices = [client_split(splits, cid, *args) for cid in range(5)]
    assert sum(len(y) for _, y in slices) == len(splits.y_train)
    for x, y in slices:
        assert x.shape[1:] == splits.input_shape and x.dtype == torch.float32
        assert len(torch.unique(y)) == 2
    assert client_split(splits, 0, *args) is slices[0]
    parts = partition(splits.y_train.numpy(), 5, "classes", 0, 0.3, 2)
    assert torch.equal(slices[1][1], splits.y_train[torch.from_numpy(parts[1])])


def test_client_split_rejects_bad_partition_id():
    splits = load_dataset("digits")
    for bad in (-1, 4):
        with pytest.raises(DataError, match="partition_id"):
            client_split(splits, bad, 4, "iid", 0, 0.3, 2)


# ---------------------------------------------------------------- idx folders


@pytest.mark.parametrize("gz", [True, False])
def test_idx_single_split_is_seeded_split(tmp_path, gz):
    images, labels = write_pair(tmp_path, "train", 50, gz)
    splits = load_dataset("idx", str(tmp_path), test_fraction=0.2, seed=1)
    assert splits.x_train.shape == (40, 1, 6, 5) and splits.x_test.shape == (10, 1, 6, 5)
    assert splits.num_classes == 3
    combined = torch.cat([splits.y_train, splits.y_test]).sort().values
    assert torch.equal(combined, torch.from_numpy(np.sort(labels).astype(np.int64)))
    assert abs(splits.x_train.mean().item()) < 1e-4


@pytest.mark.parametrize("gz", [True, False])
def test_idx_train_and_t10k_are_used_as_given(tmp_path, gz):
    train_images, train_labels = write_pair(tmp_path, "train", 30, gz, seed=1)
    _, test_labels = write_pair(tmp_path, "t10k", 12, gz, seed=2)
    splits = load_dataset("idx", str(tmp_path))
    assert len(splits.y_train) == 30 and len(splits.y_test) == 12
    assert torch.equal(splits.y_train, torch.from_numpy(train_labels.astype(np.int64)))
    assert torch.equal(splits.y_test, torch.from_numpy(test_labels.astype(np.int64)))
    pixels = train_images.astype(np.float64) / 255.0
    expected = (pixels - pixels.mean()) / pixels.std()
    np.testing.assert_allclose(splits.x_train[:, 0].numpy(), expected, atol=1e-5)


def test_idx_prefers_matching_labels_for_mixed_compression(tmp_path):
    images, labels = write_pair(tmp_path, "train", 20, gz=True)
    write_idx(tmp_path / "train-images-idx3-ubyte", images, IMAGES_MAGIC)
    splits = load_dataset("idx", str(tmp_path), test_fraction=0.25)
    assert len(splits.y_train) + len(splits.y_test) == 20


def corrupt_bad_magic(folder: Path) -> Path:
    write_pair(folder, "train", 10, gz=False)
    return write_idx(folder / "train-images-idx3-ubyte", np.zeros((10, 6, 5)), 0x802)


def corrupt_count_mismatch(folder: Path) -> Path:
    write_pair(folder, "train", 10, gz=True)
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.zeros(9), LABELS_MAGIC)
    return folder / "train-images-idx3-ubyte.gz"


def corrupt_truncated(folder: Path) -> Path:
    write_pair(folder, "train", 10, gz=False)
    path = folder / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-7])
    return path


def corrupt_truncated_gzip(folder: Path) -> Path:
    write_pair(folder, "train", 10, gz=True)
    path = folder / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:15])
    return path


def corrupt_missing_labels(folder: Path) -> Path:
    write_pair(folder, "train", 10, gz=False)
    (folder / "train-labels-idx1-ubyte").unlink()
    return folder / "train-images-idx3-ubyte"


@pytest.mark.parametrize("corrupt", [corrupt_bad_magic, corrupt_count_mismatch,
                                     corrupt_truncated, corrupt_truncated_gzip,
                                     corrupt_missing_labels])
def test_corrupt_idx_names_the_file(tmp_path, corrupt):
    bad_file = corrupt(tmp_path)
    with pytest.raises(DataError) as info:
        load_dataset("idx", str(tmp_path))
    assert str(bad_file) in str(info.value)


def test_idx_needs_an_existing_folder_with_idx_files(tmp_path):
    with pytest.raises(DataError, match="data_dir"):
        load_dataset("idx", "")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("idx", str(tmp_path / "missing"))
    (tmp_path / "notes.txt").write_text("no data here")
    with pytest.raises(DataError, match="notes.txt"):
        load_dataset("idx", str(tmp_path))


def test_idx_two_unrelated_pairs_is_ambiguous(tmp_path):
    write_pair(tmp_path, "a", 10, gz=False)
    write_pair(tmp_path, "b", 10, gz=False)
    with pytest.raises(DataError, match="t10k"):
        load_dataset("idx", str(tmp_path))


@pytest.mark.skipif(not MNIST_T10K.is_dir(), reason=f"shared MNIST test split not at {MNIST_T10K}")
def test_real_mnist_t10k_folder():
    splits = load_dataset("idx", str(MNIST_T10K))
    assert splits.x_train.shape == (8000, 1, 28, 28)
    assert splits.x_test.shape == (2000, 1, 28, 28)
    assert splits.num_classes == 10
    assert set(splits.y_test.tolist()) == set(range(10))
    assert abs(splits.x_test.mean().item()) < 0.05


# ---------------------------------------------------------------- torchvision


@pytest.mark.parametrize("name, expected", [
    ("mnist", ["MNIST/raw/train-images-idx3-ubyte", "MNIST/raw/t10k-labels-idx1-ubyte"]),
    ("fashion-mnist", ["FashionMNIST/raw/train-labels-idx1-ubyte"]),
    ("cifar10", [f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)]
     + ["cifar-10-batches-py/test_batch"]),
])
def test_missing_torchvision_files_fail_listing_them_without_downloading(tmp_path, monkeypatch, name, expected):
    def no_download(*args):
        raise AssertionError("must not try to download into an explicit folder")

    monkeypatch.setattr(data, "_download", no_download)
    with pytest.raises(DataError) as info:
        load_dataset.__wrapped__(name, str(tmp_path))
    for relative in expected:
        assert str(tmp_path / relative) in str(info.value)


def test_mnist_reads_gz_files_in_torchvision_layout(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_pair(raw, "train", 20, gz=True)
    write_pair(raw, "t10k", 8, gz=False)
    splits = load_dataset("mnist", str(tmp_path))
    assert len(splits.y_train) == 20 and len(splits.y_test) == 8


def test_default_folder_reports_download_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEFAULT_DATA_DIR", tmp_path)
    monkeypatch.setattr(data, "_download", lambda name, root: "URLError: offline")
    with pytest.raises(DataError) as info:
        load_dataset.__wrapped__("mnist")
    assert "offline" in str(info.value) and str(tmp_path / "MNIST" / "raw") in str(info.value)
    assert 'DIR/MNIST/raw/ of another folder DIR and set data-dir = "DIR"' in str(info.value)


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml")),
                         ids=lambda p: p.name)
def test_shipped_configs_need_no_folder_outside_the_repository(path):
    """A shipped config works for a user anywhere: its data is embedded (digits) or a torchvision
    dataset downloaded into the default folder (data-dir empty), never a path of this workspace."""
    from fedmask.config import load

    config = load(path)
    assert config.dataset in ("digits", "mnist", "fashion-mnist", "cifar10"), config.dataset
    assert config.data_dir == "" and "../" not in path.read_text()


@pytest.mark.skipif(not MNIST_T10K.is_dir(), reason=f"shared MNIST test split not at {MNIST_T10K}")
def test_benchmarks_run_the_mnist_configs_on_mnist_10k_named_explicitly(monkeypatch):
    """bench.common.shared_data names this workspace's MNIST-10k for configs/mnist-*.toml (the
    benchmarks' figures), and the config with it loads the 8k/2k split from that folder."""
    from bench.common import ROOT, shared_data, shared_sets
    from fedmask import task
    from fedmask.config import load

    monkeypatch.chdir(ROOT)
    assert shared_data("configs/mnist-fedpm.toml")["data-dir"] == "../shared/data/mnist-t10k"
    assert shared_data("configs/fmnist-fedpm.toml")["data-dir"] == "../shared/data/fashion-mnist"
    assert shared_data("configs/quickstart.toml") == {}
    config = load(ROOT / "configs" / "mnist-fedpm.toml", shared_sets("configs/mnist-fedpm.toml"))
    assert config.dataset == "idx" and len(task.splits_of(config).y_train) == 8000


def test_splits_is_hashable_by_identity():
    tensor = torch.zeros(2, 1, 2, 2)
    labels = torch.zeros(2, dtype=torch.int64)
    first = Splits(tensor, labels, tensor, labels, 1)
    second = Splits(tensor, labels, tensor, labels, 1)
    assert first != second and len({first, second}) == 2


def test_splits_of_is_the_one_cached_loader(monkeypatch, tmp_path):
    """``task.splits_of`` loads a (dataset, data-dir, test-fraction, seed) once and keeps it
    (configs differing in other keys share it); it is the only loader, no ``dataset_for``."""
    from fedmask import task
    from fedmask.config import resolve

    calls = []
    monkeypatch.setattr(task, "load_dataset", lambda *key: calls.append(key) or object())
    base = resolve({"data-dir": str(tmp_path)})  # a data key no other test has cached
    first = task.splits_of(base)
    assert task.splits_of(base.replace(lr=0.5, num_rounds=7)) is first
    other_seed = task.splits_of(base.replace(seed=base.seed + 1))
    assert other_seed is not first and task.splits_of(base.replace(seed=base.seed + 1)) is other_seed
    assert calls == [(base.dataset, str(tmp_path), base.test_fraction, base.seed),
                     (base.dataset, str(tmp_path), base.test_fraction, base.seed + 1)]
    assert not hasattr(task, "dataset_for")


@pytest.mark.parametrize("channels", [1, 3])
def test_8bit_images_are_standardised_to_the_same_bits_as_the_float64_formula(channels):
    """The table lookup for uint8 images gives exactly float32((x/255 - mean) / std) computed
    in float64 per pixel, train and test, a constant channel (std 0 -> 1) included."""
    from fedmask.core.data import _to_splits, _unit_scale

    rng = np.random.default_rng(channels)
    x_train = rng.integers(0, 256, (40, channels, 6, 5), dtype=np.uint8)
    x_test = rng.integers(0, 256, (15, channels, 6, 5), dtype=np.uint8)
    x_train[:, 0], x_test[:, 0] = 7, 9  # channel 0 constant in train
    splits = _to_splits(x_train, np.arange(40) % 3, x_test, np.arange(15) % 3)
    scaled_train, scaled_test = _unit_scale(x_train), _unit_scale(x_test)
    mean = scaled_train.mean(axis=(0, 2, 3), keepdims=True, dtype=np.float64)
    std = scaled_train.std(axis=(0, 2, 3), keepdims=True, dtype=np.float64)
    std[std == 0] = 1.0
    for got, scaled in ((splits.x_train, scaled_train), (splits.x_test, scaled_test)):
        expected = ((scaled - mean) / std).astype(np.float32)
        assert got.dtype == torch.float32 and got.is_contiguous()
        assert np.array_equal(got.numpy().view(np.uint32), expected.view(np.uint32))


# ---------------------------------------------------------------- Flower Datasets' partitioners


@pytest.mark.parametrize("name", ["flwr-iid", "flwr-dirichlet", "flwr-pathological"])
def test_flower_datasets_partitioners_split_as_flower_does(name):
    """With the 'flwr-datasets' extra: Flower's own partitioner over the labels, seeded, disjoint,
    every client non-empty; the pathological split gives each client classes-per-client classes."""
    pytest.importorskip("flwr_datasets")
    labels = np.random.default_rng(0).integers(0, 10, 2000)
    parts = partition(labels, 10, name, seed=3, dirichlet_alpha=0.5, classes_per_client=2)
    again = partition(labels, 10, name, seed=3, dirichlet_alpha=0.5, classes_per_client=2)
    other = partition(labels, 10, name, seed=4, dirichlet_alpha=0.5, classes_per_client=2)
    joined = np.concatenate(parts)
    assert len(joined) == len(set(joined.tolist())) and all(len(p) for p in parts)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))
    if name == "flwr-iid":
        assert [len(p) for p in parts] == [200] * 10
    if name == "flwr-pathological":
        assert all(len(set(labels[p].tolist())) == 2 for p in parts)


def test_flower_partitioner_without_the_extra_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "flwr_datasets", None)  # as if not installed: import raises ImportError
    with pytest.raises(DataError, match=r'optional extra: pip install -e "\.\[flwr-datasets\]"'):
        partition(np.arange(100) % 10, 4, "flwr-dirichlet")
