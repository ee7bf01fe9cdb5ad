"""Tests for cmhsa.data: file formats (IDX, CIFAR pickles, image folders), subsets, transforms, loaders."""
from __future__ import annotations

import copy
import dataclasses
import gzip
import io
import random
import struct
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from sklearn.datasets import load_digits
from torch.utils.data import DistributedSampler

from cifar_fixture import make_cifar10, make_cifar100, to_tarball
from cmhsa.data import (
    DATASET_NAMES,
    DatasetNotFoundError,
    create_datasets,
    create_loader,
    dataset_info,
    describe_augmentation,
    stratified_subset,
)

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


# ------------------------------------------------------------------------------------------------ fixtures


def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    """Write ``array`` (uint8) in the IDX format: 00 00 08 ndim, big-endian uint32 dims, data."""
    payload = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    if gz:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


@pytest.fixture
def mnist_dir(tmp_path):
    """A tiny MNIST-format dataset: 30 train / 20 test random 28x28 images, 3 resp. 2 per class, mixed gz/plain."""
    rng = np.random.default_rng(123)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (30, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.repeat(np.arange(10, dtype=np.uint8), 3),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.tile(np.arange(10, dtype=np.uint8), 2),
    }
    for i, (stem, array) in enumerate(arrays.items()):
        write_idx(tmp_path / stem, array, gz=i % 2 == 0)
    return tmp_path, arrays


def planes_pixel(data: np.ndarray, i: int, c: int, y: int, x: int) -> int:
    """Pixel (c, y, x) of row ``i`` of an official CIFAR data array: R, G, B planes of 32x32, row-major."""
    return int(data[i, c * 1024 + y * 32 + x])


# ----------------------------------------------------------------------------------------------------- IDX


def test_idx_round_trip_gz_and_plain(mnist_dir):
    folder, arrays = mnist_dir
    assert {p.suffix for p in folder.iterdir()} == {".gz", ""}  # the fixture mixes both encodings
    train, val, info = create_datasets("mnist", 28, 1, data_dir=str(folder), augment="none")
    np.testing.assert_array_equal(train.images[..., 0], arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(train.labels, arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(val.images[..., 0], arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(val.labels, arrays["t10k-labels-idx1-ubyte"])
    assert info.num_classes == 10 and info.native_size == (28, 28) and info.in_chans == 1
    x, y = train[4]
    expected = (torch.from_numpy(arrays["train-images-idx3-ubyte"][4]).float() / 255 - info.mean[0]) / info.std[0]
    torch.testing.assert_close(x[0], expected)
    assert y == int(arrays["train-labels-idx1-ubyte"][4]) and isinstance(y, int)


def test_idx_finds_torchvision_raw_folder(mnist_dir, tmp_path_factory):
    folder, arrays = mnist_dir
    root = tmp_path_factory.mktemp("tv")
    (root / "MNIST").mkdir()
    folder.rename(root / "MNIST" / "raw")
    train, _, _ = create_datasets("mnist", 28, 1, data_dir=str(root), augment="none")
    np.testing.assert_array_equal(train.images[..., 0], arrays["train-images-idx3-ubyte"])


def test_idx_corrupt_magic_raises(mnist_dir):
    folder, _ = mnist_dir
    path = folder / "train-labels-idx1-ubyte"  # stored plain by the fixture
    data = bytearray(path.read_bytes())
    data[2] = 0x0D  # claims float data
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="magic number"):
        create_datasets("mnist", 28, 1, data_dir=str(folder))


def test_idx_truncated_raises(mnist_dir):
    folder, _ = mnist_dir
    path = folder / "train-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated"):
        create_datasets("mnist", 28, 1, data_dir=str(folder))


@pytest.mark.skipif(not (FASHION_DIR / "train-images-idx3-ubyte.gz").exists(),
                    reason="apt package dataset-fashion-mnist not installed")
def test_fashion_mnist_from_debian_package():
    train, val, info = create_datasets("fashion_mnist", 32, 3, augment="none", resize="pad")
    assert (len(train), len(val)) == (60000, 10000)
    assert info.num_classes == 10 and len(info.classes) == 10 and info.classes[9] == "Ankle boot"
    assert info.in_chans == 3 and len(info.mean) == 3
    assert sorted(Counter(train.labels.tolist()).values()) == [6000] * 10
    x, y = train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= y < 10
    zero = torch.tensor([-m / s for m, s in zip(info.mean, info.std)]).view(3, 1, 1)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False  # 28 -> 32: two pixels of padding on each side
    torch.testing.assert_close(x[:, border], zero.expand(3, 32, 32)[:, border])
    inner = (torch.from_numpy(train.images[0, ..., 0]).float() / 255 - info.mean[0]) / info.std[0]
    torch.testing.assert_close(x[1, 2:30, 2:30], inner)


# --------------------------------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("layout", ["parent", "folder", "tarball"])
def test_cifar10_layouts_and_planes(tmp_path, layout):
    train_data, train_labels, test_data, test_labels, names = make_cifar10(tmp_path)
    data_dir = tmp_path
    if layout == "folder":
        data_dir = tmp_path / "cifar-10-batches-py"
    elif layout == "tarball":
        to_tarball(tmp_path, "cifar-10-batches-py", "cifar-10-python.tar.gz")
        assert not (tmp_path / "cifar-10-batches-py").exists()
    train, val, info = create_datasets("cifar10", 32, 3, data_dir=str(data_dir), augment="none")
    assert info.classes == tuple(names) and train.classes == tuple(names)
    np.testing.assert_array_equal(train.labels, train_labels)
    np.testing.assert_array_equal(val.labels, test_labels)
    assert train.images.shape == (20, 32, 32, 3) and val.images.shape == (6, 32, 32, 3)
    for i, c, y, x in [(0, 0, 0, 1), (5, 2, 3, 17), (19, 1, 31, 0), (13, 2, 30, 29)]:  # 5, 13: later batches
        value = planes_pixel(train_data, i, c, y, x)
        assert train.images[i, y, x, c] == value
        tensor, label = train[i]
        assert tensor[c, y, x].item() == pytest.approx((value / 255 - info.mean[c]) / info.std[c], abs=1e-5)
        assert label == train_labels[i]
    assert val.images[4, 7, 2, 1] == planes_pixel(test_data, 4, 1, 7, 2)
    if layout == "tarball":
        assert (tmp_path / "cifar-10-batches-py" / "data_batch_5").is_file()
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folder left


@pytest.mark.parametrize("as_tar", [False, True])
def test_cifar100_fine_labels(tmp_path, as_tar):
    splits, fine_names = make_cifar100(tmp_path)
    if as_tar:
        to_tarball(tmp_path, "cifar-100-python", "cifar-100-python.tar.gz")
    train, val, info = create_datasets("cifar100", 32, 3, data_dir=str(tmp_path), augment="none")
    assert info.num_classes == 100 and info.classes == tuple(fine_names)
    np.testing.assert_array_equal(train.labels, splits["train"][1])
    np.testing.assert_array_equal(val.labels, splits["test"][1])
    assert train.images[3, 9, 21, 2] == planes_pixel(splits["train"][0], 3, 2, 9, 21)
    assert dataset_info("cifar100", str(tmp_path)).classes == tuple(fine_names)


def _evil_tar(path: Path, kind: str) -> None:
    with tarfile.open(path, "w:gz") as tar:
        if kind == "symlink":
            member = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
            member.type, member.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(member)
        else:
            member = tarfile.TarInfo("../evil" if kind == "dotdot" else "/tmp/evil-absolute")
            member.size = 4
            tar.addfile(member, io.BytesIO(b"evil"))


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_cifar_tarball_with_unsafe_member_is_rejected(tmp_path, kind):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    _evil_tar(data_dir / "cifar-10-python.tar.gz", kind)
    with pytest.raises(ValueError, match="refusing to extract"):
        create_datasets("cifar10", 32, 3, data_dir=str(data_dir))
    assert not (tmp_path / "evil").exists()
    assert list(data_dir.iterdir()) == [data_dir / "cifar-10-python.tar.gz"]


# ------------------------------------------------------------------------------------------ stratified_subset


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=80), st.data())
def test_stratified_subset_proportional_and_exact(labels, data):
    labels = np.array(labels)
    n, k = len(labels), len(np.unique(labels))
    size = data.draw(st.integers(k, n))
    seed = data.draw(st.integers(0, 2**32 - 1))
    idx = stratified_subset(labels, size, seed=seed)
    assert len(idx) == size and len(np.unique(idx)) == size
    assert np.all(np.diff(idx) > 0) and idx.min() >= 0 and idx.max() < n
    for c in np.unique(labels):
        share = np.sum(labels == c) * size / n
        assert abs(np.sum(labels[idx] == c) - share) < 1
    np.testing.assert_array_equal(idx, stratified_subset(labels.tolist(), size, seed=seed))


def test_stratified_subset_seeds_fraction_and_tensor():
    labels = np.repeat(np.arange(4), [50, 30, 15, 5])
    a = stratified_subset(labels, 20, seed=1)
    np.testing.assert_array_equal(a, stratified_subset(torch.from_numpy(labels), 20, seed=1))
    assert not np.array_equal(a, stratified_subset(labels, 20, seed=2))
    assert Counter(labels[a].tolist()) == {0: 10, 1: 6, 2: 3, 3: 1}
    frac = stratified_subset(labels, 0.5, seed=0)
    assert Counter(labels[frac].tolist()) == {0: 25, 1: 15, 2: 8, 3: 2} or \
        Counter(labels[frac].tolist()) == {0: 25, 1: 15, 2: 7, 3: 3}
    np.testing.assert_array_equal(stratified_subset(labels, 1.0), np.arange(100))
    np.testing.assert_array_equal(stratified_subset(labels, 100), np.arange(100))


@pytest.mark.parametrize("size, match", [
    (0, "out of range"), (-3, "out of range"), (101, "out of range"), (3, "out of range"),
    (0.0, r"outside \(0, 1\]"), (-0.5, r"outside \(0, 1\]"), (1.5, r"outside \(0, 1\]"),
    (0.02, "fewer than the 4 classes"), (True, "int count or a float fraction"),
])
def test_stratified_subset_rejects_bad_sizes(size, match):
    labels = np.repeat(np.arange(4), 25)
    with pytest.raises(ValueError, match=match):
        stratified_subset(labels, size)


def test_subsets_through_create_datasets(mnist_dir):
    folder, arrays = mnist_dir
    train, val, _ = create_datasets("mnist", 28, 1, data_dir=str(folder), train_subset=20, val_subset=0.5,
                                    augment="none", seed=3)
    assert len(train) == 20 and len(val) == 10
    assert sorted(Counter(train.labels.tolist()).values()) == [2] * 10
    assert sorted(Counter(val.labels.tolist()).values()) == [1] * 10
    idx = stratified_subset(arrays["train-labels-idx1-ubyte"], 20, seed=3)
    np.testing.assert_array_equal(train.images[..., 0], arrays["train-images-idx3-ubyte"][idx])
    assert [train[i][1] for i in range(len(train))] == train.labels.tolist()
    # another seed draws other training images but scores on the same validation images
    train4, val4, _ = create_datasets("mnist", 28, 1, data_dir=str(folder), train_subset=20, val_subset=0.5,
                                      augment="none", seed=4)
    assert not np.array_equal(train4.images, train.images)
    np.testing.assert_array_equal(val4.images, val.images)


def test_any_mnist_format_set_loads_as_idx(tmp_path):
    """``idx``: an MNIST-format folder that is not MNIST (here 12 classes, like a subset of EMNIST letters): its
    own classes and statistics, no flip by default, and no torchvision layout assumed."""
    rng = np.random.default_rng(0)
    train = rng.integers(0, 64, (24, 28, 28), dtype=np.uint8)  # dark images: MNIST's statistics would be wrong
    for stem, array in zip(IDX_STEMS, (train, np.arange(24, dtype=np.uint8) % 12,
                                       rng.integers(0, 64, (12, 28, 28), dtype=np.uint8), np.arange(12, dtype=np.uint8))):
        write_idx(tmp_path / stem, array, gz=False)
    info = dataset_info("idx", str(tmp_path))
    assert info.num_classes == 12 and info.classes == tuple(str(c) for c in range(12)) and not info.hflip
    np.testing.assert_allclose(info.mean, [train.mean() / 255], rtol=1e-6)
    np.testing.assert_allclose(info.std, [train.std() / 255], rtol=1e-6)
    with pytest.raises(DatasetNotFoundError) as err:
        dataset_info("idx")
    assert "An MNIST-format dataset has no default location" in str(err.value) and "torchvision" not in str(err.value)
    assert "--set data.data_dir=PATH" in str(err.value)


# --------------------------------------------------------------------------------------------- missing data


def test_missing_fashion_mnist_says_how_to_fix(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        create_datasets("fashion_mnist", 28, 1, data_dir=str(tmp_path))
    message = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in message and "--set data.data_dir=PATH" in message
    for stem in IDX_STEMS:
        assert stem in message


def test_missing_mnist_says_layout():
    with pytest.raises(DatasetNotFoundError, match="data_dir") as err:
        dataset_info("mnist")
    assert all(stem in str(err.value) for stem in IDX_STEMS)


@pytest.mark.parametrize("name, folder, tarball", [
    ("cifar10", "cifar-10-batches-py", "cifar-10-python.tar.gz"),
    ("cifar100", "cifar-100-python", "cifar-100-python.tar.gz"),
])
def test_missing_cifar_gives_url_and_layout(tmp_path, name, folder, tarball):
    for data_dir in (None, str(tmp_path)):
        with pytest.raises(FileNotFoundError) as err:
            create_datasets(name, 32, 3, data_dir=data_dir)
        message = str(err.value)
        assert "https://www.cs.toronto.edu/~kriz/cifar.html" in message
        assert folder in message and tarball in message


def test_missing_imagefolder_says_layout(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"train/<class>"):
        create_datasets("imagefolder", 8, 3, data_dir=str(tmp_path))  # no val/ or test/


def test_bad_names_and_options(mnist_dir):
    folder, _ = mnist_dir
    with pytest.raises(ValueError) as err:
        dataset_info("imagenet")
    assert all(name in str(err.value) for name in DATASET_NAMES)
    with pytest.raises(ValueError, match="light"):
        create_datasets("mnist", 28, 1, data_dir=str(folder), augment="heavy")
    with pytest.raises(ValueError, match="resize"):
        create_datasets("mnist", 28, 1, data_dir=str(folder), resize="stretch")


# ----------------------------------------------------------------------------------------- channels, resize


def test_grey_to_rgb_repeats(mnist_dir):
    folder, _ = mnist_dir
    train, _, info = create_datasets("mnist", 28, 3, data_dir=str(folder), augment="none")
    x, _ = train[7]
    assert x.shape == (3, 28, 28)
    torch.testing.assert_close(x[0], x[1])
    torch.testing.assert_close(x[0], x[2])
    assert info.in_chans == 3 and info.mean == (0.1307,) * 3 and info.std == (0.3081,) * 3
    assert dataset_info("mnist", str(folder)).in_chans == 1


def test_rgb_to_grey_is_pil_luminance(tmp_path):
    train_data, *_ = make_cifar10(tmp_path)
    train, val, info = create_datasets("cifar10", 32, 1, data_dir=str(tmp_path), augment="none")
    rgb = train_data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    expected = np.stack([np.asarray(Image.fromarray(img).convert("L")) for img in rgb])
    np.testing.assert_array_equal(train.images[..., 0], expected)
    assert info.in_chans == 1 and info.mean[0] == pytest.approx(expected.mean() / 255)
    assert info.std[0] == pytest.approx(expected.std() / 255)
    assert train[0][0].shape == (1, 32, 32) and val[0][0].shape == (1, 32, 32)


def test_unsupported_channel_count(mnist_dir):
    folder, _ = mnist_dir
    with pytest.raises(ValueError, match="in_chans must be 1"):
        create_datasets("mnist", 28, 2, data_dir=str(folder))


def test_resize_and_pad(mnist_dir):
    folder, arrays = mnist_dir
    train, val, _ = create_datasets("mnist", (40, 36), 1, data_dir=str(folder), resize="resize")
    assert train[0][0].shape == (1, 40, 36) and val[0][0].shape == (1, 40, 36)
    small, _, _ = create_datasets("mnist", 14, 1, data_dir=str(folder), resize="resize", augment="none")
    assert small[0][0].shape == (1, 14, 14)
    with pytest.raises(ValueError, match="--set data.resize=resize"):
        create_datasets("mnist", 16, 1, data_dir=str(folder), resize="pad")
    padded, _, info = create_datasets("mnist", (30, 33), 1, data_dir=str(folder), resize="pad", augment="none")
    x = padded[1][0]
    assert x.shape == (1, 30, 33)
    expected = (torch.from_numpy(arrays["train-images-idx3-ubyte"][1]).float() / 255 - info.mean[0]) / info.std[0]
    torch.testing.assert_close(x[0, 1:29, 2:30], expected)  # extra row goes below, extra column right
    zero = torch.full_like(x[0, 0], -info.mean[0] / info.std[0])
    torch.testing.assert_close(x[0, 0], zero)  # top padding row
    torch.testing.assert_close(x[0, :, 30:], zero[:30, None].expand(30, 3))  # right padding columns
    for resize in ("pad", "resize"):  # native size: untouched
        same, _, _ = create_datasets("mnist", 28, 1, data_dir=str(folder), resize=resize, augment="none")
        torch.testing.assert_close(same[1][0][0], expected)


@pytest.mark.parametrize("hflip", [None, True, False])
def test_light_augmentation_is_a_shift_and_flip_where_labels_allow(mnist_dir, hflip):
    """A padded random crop, mirrored half the time only when asked: by default a digit is never mirrored."""
    folder, _ = mnist_dir
    aug, _, info = create_datasets("mnist", 32, 1, data_dir=str(folder), augment="light", hflip=hflip)
    plain, _, _ = create_datasets("mnist", 32, 1, data_dir=str(folder), augment="none")
    assert info.hflip is bool(hflip)
    zero = -info.mean[0] / info.std[0]
    torch.manual_seed(0)
    flips = 0
    for i in range(12):
        y = aug[i][0][0]
        base = torch.nn.functional.pad(plain[i][0][0], (4, 4, 4, 4), value=zero)
        candidates = [base[t:t + 32, s:s + 32] for t in range(9) for s in range(9)]
        matches = [torch.allclose(y, c) for c in candidates]
        flipped = [torch.allclose(y, c.flip(-1)) for c in candidates]
        assert any(matches) or any(flipped), f"item {i} is not a padded crop (or its mirror) of the image"
        flips += not any(matches)
    assert (0 < flips < 12) if hflip else flips == 0


def test_flip_default_follows_the_dataset(tmp_path, mnist_dir):
    """Mirrored clothes and objects keep their labels, mirrored digits do not; DeiT's recipe follows the same rule."""
    from torchvision.transforms import RandomHorizontalFlip
    assert dataset_info("digits").hflip is False and dataset_info("mnist", str(mnist_dir[0])).hflip is False
    make_cifar10(tmp_path / "cifar")
    assert dataset_info("cifar10", str(tmp_path / "cifar")).hflip is True

    def flips(name, folder, **kw):
        train, _, _ = create_datasets(name, 32, 3, data_dir=folder, augment="deit", **kw)
        return any(isinstance(t, RandomHorizontalFlip) and t.p > 0 for t in train.transform.timm_transform.transforms)
    assert flips("cifar10", str(tmp_path / "cifar")) and not flips("mnist", str(mnist_dir[0]))
    assert flips("mnist", str(mnist_dir[0]), hflip=True) and not flips("cifar10", str(tmp_path / "cifar"), hflip=False)
    with pytest.raises(ValueError, match="hflip must be True, False or None"):
        create_datasets("digits", 8, 1, hflip="no")


def test_deit_augmentation_shapes(tmp_path, mnist_dir):
    make_cifar10(tmp_path / "cifar")
    train, val, info = create_datasets("cifar10", 32, 3, data_dir=str(tmp_path / "cifar"), augment="deit")
    torch.manual_seed(0)
    xs = [train[i][0] for i in range(len(train))]
    assert all(x.shape == (3, 32, 32) and x.dtype == torch.float32 for x in xs)
    assert len({x.sum().item() for x in xs}) == len(xs)
    assert val[2][0].shape == (3, 32, 32)
    folder, _ = mnist_dir
    grey, grey_val, _ = create_datasets("mnist", 32, 1, data_dir=str(folder), augment="deit", resize="pad")
    assert grey[0][0].shape == (1, 32, 32) and grey_val[0][0].shape == (1, 32, 32)
    resized, _, _ = create_datasets("mnist", 40, 3, data_dir=str(folder), augment="deit", resize="resize")
    assert resized[0][0].shape == (3, 40, 40)


def test_deit_survives_strongest_posterize(mnist_dir):
    """timm's PosterizeIncreasing keeps 0 bits at magnitude 10, which newer Pillow rejects; it must give black."""
    folder, _ = mnist_dir
    train, _, _ = create_datasets("mnist", 28, 3, data_dir=str(folder), augment="deit")
    ops = [op for step in train.transform.timm_transform.transforms for op in getattr(step, "ops", ())
           if op.name == "PosterizeIncreasing"]
    assert len(ops) == 1
    op = copy.copy(ops[0])
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0
    image = Image.fromarray(np.full((28, 28, 3), 200, dtype=np.uint8))
    assert np.asarray(op(image)).max() == 0
    op.magnitude = 5  # 2 bits kept: 200 = 0b11001000 -> 0b11000000
    assert np.asarray(op(image)).max() == 192
    random.seed(0)
    torch.manual_seed(0)
    np.random.seed(0)
    for _ in range(400):  # without the fix, about one call in 300 raises
        assert train[0][0].shape == (3, 28, 28)


def test_validation_never_augments(mnist_dir):
    folder, _ = mnist_dir
    _, plain_val, _ = create_datasets("mnist", 32, 1, data_dir=str(folder), augment="none")
    for augment in ("light", "deit"):
        _, val, _ = create_datasets("mnist", 32, 1, data_dir=str(folder), augment=augment)
        for i in range(5):
            assert torch.equal(val[i][0], plain_val[i][0])


# -------------------------------------------------------------------------------------- imagefolder, digits


def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.mark.parametrize("val_name", ["val", "test"])
def test_imagefolder(tmp_path, val_name):
    rng = np.random.default_rng(0)
    images = {}
    for split, classes in (("train", ("ant", "bee", "cat")), (val_name, ("bee", "cat"))):  # val lacks "ant"
        for cls in classes:
            for j in range(2):
                array = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
                path = tmp_path / split / cls / f"{j}.png"
                _write_png(path, array)
                images[path] = array
    train, val, info = create_datasets("imagefolder", 8, 3, data_dir=str(tmp_path), augment="none")
    assert info.classes == ("ant", "bee", "cat") and info.native_size == (6, 5) and info.in_chans == 3
    assert train.labels.tolist() == [0, 0, 1, 1, 2, 2] and val.labels.tolist() == [1, 1, 2, 2]
    all_pixels = np.stack([a for p, a in images.items() if p.parts[-3] == "train"])
    np.testing.assert_allclose(info.mean, all_pixels.reshape(-1, 3).mean(0) / 255)
    x, y = val[2]  # cat/0.png: padded from 6x5 into 8x8, one row on top, one column on the left
    source = images[tmp_path / val_name / "cat" / "0.png"]
    expected = (torch.from_numpy(source).permute(2, 0, 1).float() / 255 - torch.tensor(info.mean).view(3, 1, 1)) \
        / torch.tensor(info.std).view(3, 1, 1)
    assert y == 2 and x.shape == (3, 8, 8)
    torch.testing.assert_close(x[:, 1:7, 1:6], expected)
    grey, _, grey_info = create_datasets("imagefolder", 6, 1, data_dir=str(tmp_path), resize="resize")
    assert grey[0][0].shape == (1, 6, 6) and grey_info.in_chans == 1
    (tmp_path / val_name / "dog").mkdir()
    with pytest.raises(ValueError, match="dog"):
        create_datasets("imagefolder", 8, 3, data_dir=str(tmp_path))


def test_crop_keeps_the_aspect_ratio_and_takes_the_centre(tmp_path):
    """resize=crop: a 6x10 image into 6x6 is its centre columns, untouched; a 12x20 one is first halved (resize
    squashes it instead); a 9x4 one is scaled up until it covers 8x8."""
    rng = np.random.default_rng(0)

    def fitted(array, size, resize):
        folder = tmp_path / f"{array.shape[0]}x{array.shape[1]}"
        for split in ("train", "val"):
            _write_png(folder / split / "a" / "0.png", array)
        _, val, info = create_datasets("imagefolder", size, 3, data_dir=str(folder), resize=resize, augment="none")
        return val[0][0] * torch.tensor(info.std)[:, None, None] + torch.tensor(info.mean)[:, None, None]

    wide = rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)
    pixels = torch.from_numpy(wide).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(fitted(wide, 6, "crop"), pixels[:, :, 2:8])
    big = rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)
    pixels = torch.from_numpy(big).permute(2, 0, 1).float() / 255
    halved = F.interpolate(pixels[None], size=(6, 10), mode="bicubic", antialias=True)[0].clamp(0, 1)
    torch.testing.assert_close(fitted(big, 6, "crop"), halved[:, :, 2:8])
    squashed = F.interpolate(pixels[None], size=(6, 6), mode="bicubic", antialias=True)[0].clamp(0, 1)
    torch.testing.assert_close(fitted(big, 6, "resize"), squashed)
    assert fitted(rng.integers(0, 256, (9, 4, 3), dtype=np.uint8), 8, "crop").shape == (3, 8, 8)


def test_imagefolder_mixing_grey_and_colour_files_is_colour(tmp_path):
    """The channels come from the files, not from whichever sorts first (here a grey one)."""
    rng = np.random.default_rng(0)
    for j, shape in enumerate([(6, 6), (6, 6, 3), (6, 6, 4)]):
        _write_png(tmp_path / "train" / "a" / f"{j}.png", rng.integers(0, 256, shape, dtype=np.uint8))
    _write_png(tmp_path / "val" / "a" / "0.png", rng.integers(0, 256, (6, 6), dtype=np.uint8))
    assert dataset_info("imagefolder", str(tmp_path)).in_chans == 3
    for j in (1, 2):
        (tmp_path / "train" / "a" / f"{j}.png").unlink()
    assert dataset_info("imagefolder", str(tmp_path)).in_chans == 1


def test_augmentation_is_described_as_applied():
    """What a run's summary says its training images went through: the flip follows the dataset unless set."""
    digits, fashion = dataset_info("digits"), dataset_info("fashion_mnist")
    assert describe_augmentation("light", None, digits) == \
        "light: random crop, no flip (a mirrored image may change its label)"
    assert describe_augmentation("light", True, digits) == "light: random crop, horizontal flip"
    assert describe_augmentation("deit", None, fashion) == \
        "deit: random resized crop, RandAugment, random erasing, horizontal flip (a mirrored image keeps its label)"
    assert describe_augmentation("none", True, fashion) == "none"
    folder = dataclasses.replace(fashion, name="imagefolder")  # a flip there is a guess, and says so
    assert describe_augmentation("light", None, folder) == "light: random crop, horizontal flip (the default for an " \
        "image folder, which can hold anything: data.hflip=false if a mirrored image changes its label)"


def test_digits_split_is_a_stratified_partition():
    train, val, info = create_datasets("digits", 8, 1, augment="none")
    digits = load_digits()
    assert info.num_classes == 10 and info.native_size == (8, 8) and info.in_chans == 1
    assert len(train) + len(val) == len(digits.target) and len(val) == pytest.approx(0.2 * len(digits.target), abs=1)
    expected_images = np.round(digits.images * 255 / 16).astype(np.uint8)
    def key(image, label):
        return image.tobytes(), int(label)

    whole = Counter(key(i, t) for i, t in zip(expected_images, digits.target))
    parts = Counter(key(i[..., 0], t) for i, t in zip(train.images, train.labels))
    parts.update(key(i[..., 0], t) for i, t in zip(val.images, val.labels))
    assert parts == whole  # train and val together are exactly the dataset, nothing shared or lost
    for c in range(10):
        assert abs(np.sum(val.labels == c) - 0.2 * np.sum(digits.target == c)) < 1
    again, _, _ = create_datasets("digits", 8, 1, seed=5)
    np.testing.assert_array_equal(again.images, train.images)
    assert info.mean[0] == pytest.approx(train.images.mean() / 255)


# ------------------------------------------------------------------------------------------------- loaders


class _Indices(torch.utils.data.Dataset):
    def __len__(self):
        return 37

    def __getitem__(self, i):
        return i


def _order(loader):
    return torch.cat([b for b in loader]).tolist()


def test_loader_seeded_shuffle_is_repeatable():
    a, b = (create_loader(_Indices(), 8, training=True, seed=4) for _ in range(2))
    first, second = _order(a), _order(a)
    assert a.drop_last and len(first) == 32
    assert first != second  # each epoch reshuffles ...
    assert [first, second] == [_order(b), _order(b)]  # ... in the same way for the same seed
    assert first != _order(create_loader(_Indices(), 8, training=True, seed=5))
    assert sorted(_order(create_loader(_Indices(), 8, training=True, drop_last=False))) == list(range(37))
    val = create_loader(_Indices(), 8, training=False)
    assert not val.drop_last and _order(val) == list(range(37))


def test_loader_distributed_shards():
    shards = []
    for rank in (0, 1):
        loader = create_loader(_Indices(), 4, training=True, seed=1, distributed=True, num_replicas=2, rank=rank,
                               drop_last=False)
        assert isinstance(loader.sampler, DistributedSampler) and loader.sampler.shuffle
        shards.append(_order(loader))
    assert len(set(shards[0]) & set(shards[1])) <= 1  # 37 -> 2 x 19: one index is repeated to even out
    assert set(shards[0]) | set(shards[1]) == set(range(37))
    assert shards[0] != sorted(shards[0])
    with pytest.raises(RuntimeError, match="init_process_group"):
        create_loader(_Indices(), 4, training=True, distributed=True)


def test_loader_with_workers_keeps_them():
    loader = create_loader(_Indices(), 8, training=False, num_workers=1)
    assert loader.persistent_workers and _order(loader) == list(range(37))
