"""Datasets for training ViTs on small data: Fashion-MNIST, MNIST, any MNIST-format set, CIFAR-10/100, image
folders, sklearn digits.

Every dataset yields ``(image, label)``: ``image`` a normalised float tensor ``(in_chans, H, W)``, ``label`` an
int. The per-item pipeline is

    uint8 image -> grey <-> RGB -> fit to img_size (pad, resize or crop) -> augmentation -> normalise

Small datasets live in memory as uint8 ``(N, H, W, C)`` arrays (:class:`ArrayImageDataset`); the
``imagefolder`` dataset reads its files on access (:class:`ImageFileDataset`).

Nothing is downloaded. Data comes from a Debian package (Fashion-MNIST), from scikit-learn (digits) or from
files the user puts in ``data_dir``.
"""
from __future__ import annotations

import gzip
import os
import pickle
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageOps
from timm.data import create_transform
from timm.data.auto_augment import RandAugment
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.datasets.folder import IMG_EXTENSIONS

from .tokens import IntOrPair, to_pair

__all__ = [
    "DATASET_NAMES",
    "AUGMENTATIONS",
    "RESIZE_MODES",
    "DatasetInfo",
    "DatasetNotFoundError",
    "ArrayImageDataset",
    "ImageFileDataset",
    "dataset_info",
    "stratified_subset",
    "train_image_count",
    "describe_augmentation",
    "create_datasets",
    "create_loader",
]

DATASET_NAMES = ("fashion_mnist", "mnist", "idx", "cifar10", "cifar100", "imagefolder", "digits")
AUGMENTATIONS = ("none", "light", "deit")
RESIZE_MODES = ("pad", "resize", "crop")

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # where `apt-get install dataset-fashion-mnist` puts it
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"

# Published per-channel statistics of the training sets, for images scaled to [0, 1].
_KNOWN_STATS = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
# Statistics computed from data, keyed by (dataset name, data location, channels): computed once per process.
_STATS_CACHE: dict = {}

_IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_IDX_CLASSES = {
    "fashion_mnist": (
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ),
    "mnist": tuple(str(d) for d in range(10)),
    "idx": None,  # any other set in the MNIST format (KMNIST, EMNIST, your own): classes 0 .. max label
}
_TORCHVISION_FOLDER = {"fashion_mnist": "FashionMNIST", "mnist": "MNIST"}
# Whether a mirrored image keeps its label, which decides the default of the horizontal flip: a mirrored digit is
# another symbol (or none). An image folder can hold anything; flipping is the usual default, data.hflip overrides it.
# MNIST-format sets are mostly characters (MNIST, KMNIST, EMNIST), so a generic one is not flipped by default.
_HFLIP_KEEPS_LABEL = {"fashion_mnist": True, "mnist": False, "idx": False, "cifar10": True, "cifar100": True,
                      "imagefolder": True, "digits": False}
# for the generic sets that default is a guess about data we have not seen, and a run's summary says so
_HFLIP_GUESSED = {"imagefolder": "the default for an image folder, which can hold anything: data.hflip=false if a "
                                 "mirrored image changes its label",
                  "idx": "the default for an MNIST-format set, mostly characters: data.hflip=true if a mirrored "
                         "image keeps its label"}

# where a user gives a dataset's location, for the errors that ask for it
_DATA_DIR = "data.data_dir (`--set data.data_dir=PATH`; `cmhsa eval --data-dir PATH`)"

_STAT_SAMPLE = 2000  # image-folder statistics use this many evenly spaced training images, not all of them

Source = Union[np.ndarray, Sequence[str]]  # uint8 (N, H, W, C) images in memory, or image file paths


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are not where they were looked for; the message says how to provide them."""


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and a training report need to know about a dataset.

    ``mean``/``std`` are per channel, for pixel values scaled to [0, 1]; ``native_size`` is ``(H, W)`` of the
    stored images (for ``imagefolder``: of the first training image); ``hflip`` whether a horizontally mirrored
    image keeps its label (False for digits), the default of the training augmentation's flip.
    """

    name: str
    num_classes: int
    in_chans: int
    native_size: Tuple[int, int]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    classes: Tuple[str, ...]
    hflip: bool = True


@dataclass
class _Raw:
    """A dataset as loaded: uint8 image arrays (or file paths), int64 labels, class names, and where it came from."""

    train: Source
    train_labels: np.ndarray
    val: Source
    val_labels: np.ndarray
    classes: Tuple[str, ...]
    source: str  # the resolved location; keys the statistics cache


# --------------------------------------------------------------------------------------------------- datasets


class ArrayImageDataset(Dataset):
    """In-memory images: ``images`` uint8 (N, H, W, C), ``labels`` int64 (N,), class names ``classes``.

    ``transform`` maps one uint8 (H, W, C) array to the model's input tensor.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: Sequence[str], transform: Callable):
        if images.ndim != 4 or images.dtype != np.uint8 or len(images) != len(labels):
            raise ValueError(
                f"expected uint8 images (N, H, W, C) and N labels, got images {images.dtype}{tuple(images.shape)} "
                f"and {len(labels)} labels"
            )
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = tuple(classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.transform(self.images[index]), int(self.labels[index])


class ImageFileDataset(Dataset):
    """Images read from ``paths`` on access and converted to PIL ``mode`` ("L" or "RGB"); otherwise as
    :class:`ArrayImageDataset`."""

    def __init__(self, paths: Sequence[str], labels: np.ndarray, classes: Sequence[str], mode: str,
                 transform: Callable):
        if len(paths) != len(labels):
            raise ValueError(f"got {len(paths)} image paths but {len(labels)} labels")
        self.paths = list(paths)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = tuple(classes)
        self.mode = mode
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.transform(_read_image(self.paths[index], self.mode)), int(self.labels[index])


def _read_image(path: str, mode: str) -> np.ndarray:
    """An image file as a uint8 (H, W, C) array in PIL ``mode``."""
    with Image.open(path) as image:
        array = np.array(image.convert(mode))
    return array[..., None] if array.ndim == 2 else array


# ------------------------------------------------------------------------------------------------- transforms


def _pad_amounts(size: Tuple[int, int], target: Tuple[int, int]) -> Tuple[int, int, int, int]:
    """(top, bottom, left, right) zero padding that centres a ``size`` image in ``target``."""
    (h, w), (th, tw) = size, target
    if h > th or w > tw:
        raise ValueError(
            f"{h}x{w} images do not fit in img_size {th}x{tw}: padding cannot shrink them; "
            f"scale them instead (--set data.resize=resize, or data.resize=crop to keep their aspect ratio) or pad "
            f"to a larger data.img_size"
        )
    top, left = (th - h) // 2, (tw - w) // 2
    return top, th - h - top, left, tw - w - left


def _fit(x: torch.Tensor, size: Tuple[int, int], resize: str) -> torch.Tensor:
    """Fit a (C, H, W) image in [0, 1] to ``size``: pad (centred, zeros), resize (bicubic, antialiased) or crop
    (resize keeping the aspect ratio until the image covers ``size``, then its centre)."""
    if tuple(x.shape[-2:]) == size:
        return x
    if resize == "pad":
        top, bottom, left, right = _pad_amounts(tuple(x.shape[-2:]), size)
        return F.pad(x, (left, right, top, bottom))
    (h, w), (th, tw) = x.shape[-2:], size
    scale = max(th / h, tw / w) if resize == "crop" else None
    scaled = (max(th, round(h * scale)), max(tw, round(w * scale))) if scale is not None else size
    if scaled != (h, w):
        x = F.interpolate(x[None], size=scaled, mode="bicubic", align_corners=False, antialias=True)[0]
        x = x.clamp_(0, 1)  # bicubic overshoots at edges
    top, left = (scaled[0] - th) // 2, (scaled[1] - tw) // 2
    return x[:, top:top + th, left:left + tw]


def _random_crop_flip(x: torch.Tensor, padding: int, hflip: bool) -> torch.Tensor:
    """Random crop of the zero-padded image back to its size, then (if ``hflip``) a horizontal flip with
    probability 1/2."""
    h, w = x.shape[-2:]
    x = F.pad(x, (padding, padding, padding, padding))
    top, left = torch.randint(0, 2 * padding + 1, (2,)).tolist()
    x = x[:, top:top + h, left:left + w]
    return x.flip(-1) if hflip and torch.rand(()) < 0.5 else x


class _TensorTransform:
    """uint8 (H, W, C) array -> normalised float (in_chans, H', W') tensor, optionally with "light" augmentation.

    Torch ops only: for 28x28 or 32x32 images this is several times faster than a PIL pipeline.
    """

    def __init__(self, img_size: Tuple[int, int], in_chans: int, mean: Sequence[float], std: Sequence[float],
                 resize: str, light: bool, hflip: bool = False):
        self.img_size = img_size
        self.in_chans = in_chans
        self.resize = resize
        self.light = light
        self.hflip = hflip
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(image).permute(2, 0, 1).float().div_(255)
        if x.shape[0] != self.in_chans:  # grey -> RGB by repetition; RGB -> grey happened at load time
            x = x.expand(self.in_chans, -1, -1)
        x = _fit(x, self.img_size, self.resize)
        if self.light:
            # Padding of 1/8 of the side: the classic 4 pixels at 32x32.
            x = _random_crop_flip(x, padding=max(1, min(self.img_size) // 8), hflip=self.hflip)
        return (x - self.mean) / self.std


def _posterize(image: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize op, keeping 0 bits meaning a black image as in older Pillow.

    timm's PosterizeIncreasing asks for 0 bits at the top magnitude (m9 plus noise reaches 10), which newer
    Pillow rejects with "bits must be between or equal to 1 and 8": about one training image in 300 would crash.
    """
    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)
    return image if bits_to_keep >= 8 else ImageOps.posterize(image, bits_to_keep)


class _DeitTransform:
    """DeiT's training augmentation (timm's RandAugment, random erasing, random resized crop) on PIL images.

    With ``pad`` the image is first zero-padded to ``img_size`` as in evaluation; otherwise timm's random
    resized crop does the resizing, so the image is interpolated only once.
    """

    def __init__(self, img_size: Tuple[int, int], in_chans: int, mean: Sequence[float], std: Sequence[float],
                 pad: bool, hflip: bool):
        self.img_size = img_size
        self.mode = "L" if in_chans == 1 else "RGB"
        self.pad = pad
        self.timm_transform = create_transform(
            img_size, is_training=True, hflip=0.5 if hflip else 0.0, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25,
            re_mode="pixel",
            interpolation="bicubic", mean=tuple(mean), std=tuple(std),
        )
        for step in self.timm_transform.transforms:
            if isinstance(step, RandAugment):
                for op in step.ops:
                    if op.name == "PosterizeIncreasing":
                        op.aug_fn = _posterize

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        pil = Image.fromarray(image[..., 0] if image.shape[2] == 1 else image).convert(self.mode)
        if self.pad:
            top, bottom, left, right = _pad_amounts((pil.height, pil.width), self.img_size)
            pil = ImageOps.expand(pil, border=(left, top, right, bottom), fill=0)
        return self.timm_transform(pil)


def _to_grey(images: np.ndarray) -> np.ndarray:
    """RGB uint8 (N, H, W, 3) -> luminance (N, H, W, 1), bit-exact with PIL's ``convert("L")`` (ITU-R 601-2)."""
    grey = np.empty(images.shape[:3] + (1,), dtype=np.uint8)
    weights = np.array([19595, 38470, 7471], dtype=np.uint32)  # 0.299, 0.587, 0.114 in 16-bit fixed point
    for start in range(0, len(images), 4096):  # in chunks: the uint32 intermediate is 4x the images' size
        chunk = images[start:start + 4096].astype(np.uint32)
        grey[start:start + 4096, ..., 0] = (chunk @ weights + 0x8000) >> 16
    return grey


# ---------------------------------------------------------------------------------------------------- loading


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes (the MNIST format), gzipped or plain, as a uint8 array.

    Layout: magic ``00 00 08 <ndim>``, then ``ndim`` big-endian uint32 dimensions, then the data row-major.
    """
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":  # gzip magic: decide by content, not by the file name
        data = gzip.decompress(data)
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise ValueError(
            f"{path} is not an IDX file of unsigned bytes: its magic number is 0x{data[:4].hex()}, expected "
            f"0x00000803 (images) or 0x00000801 (labels); the file is corrupt or not an MNIST-format file"
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = [int(d) for d in np.frombuffer(data[4:header], dtype=">u4")]
    if len(dims) != ndim or len(data) - header != int(np.prod(dims)):
        raise ValueError(
            f"{path} is truncated or corrupt: its header promises {ndim} dims {dims}, "
            f"but the file holds {len(data) - header} data bytes"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()  # copy: writable


def _idx_not_found(name: str, folder: Path | None, missing: Sequence[str] = ()) -> DatasetNotFoundError:
    files = ", ".join(f"{stem}.gz" for stem in _IDX_STEMS)
    fix = (
        f"set {_DATA_DIR} to a folder with the four idx files {files} (plain, un-gzipped "
        "files work too" + (f"; torchvision's {_TORCHVISION_FOLDER[name]}/raw folder has them)"
                            if name in _TORCHVISION_FOLDER else ")")
    )
    if name == "fashion_mnist":
        fix = f"`apt-get install dataset-fashion-mnist`, or {fix}"
    title = {"fashion_mnist": "Fashion-MNIST", "mnist": "MNIST"}.get(name, "An MNIST-format dataset")
    where = f"{title} has no default location" if folder is None else \
        f"{title} not found in {folder} (missing: {', '.join(missing)})"
    return DatasetNotFoundError(f"{where}. Fix: {fix}.")


def _idx_paths(folder: Path) -> list[Path | None]:
    """The four idx files in ``folder``, gzipped or plain; None for each one missing."""
    return [next((p for p in (folder / f"{s}.gz", folder / s) if p.is_file()), None) for s in _IDX_STEMS]


def _load_idx(name: str, data_dir: str | None) -> _Raw:
    if data_dir is None and name != "fashion_mnist":
        raise _idx_not_found(name, None)
    folder = Path(data_dir if data_dir is not None else FASHION_MNIST_DIR)
    candidates = [folder] + ([folder / _TORCHVISION_FOLDER[name] / "raw"] if name in _TORCHVISION_FOLDER else [])
    for candidate in candidates:
        paths = _idx_paths(candidate)
        if all(paths):
            break
    else:
        missing = [f"{s}[.gz]" for s, p in zip(_IDX_STEMS, _idx_paths(folder)) if p is None]
        raise _idx_not_found(name, folder, missing)
    train_x, train_y, val_x, val_y = (_read_idx(p) for p in paths)
    for images, labels, split in ((train_x, train_y, "train"), (val_x, val_y, "t10k")):
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"{name} {split} files in {paths[0].parent} do not match: images {images.shape} (expected N, H, W), "
                f"labels {labels.shape} (expected N,)"
            )
    classes = _IDX_CLASSES[name] or tuple(str(c) for c in range(int(max(train_y.max(), val_y.max())) + 1))
    return _Raw(train_x[..., None], train_y.astype(np.int64), val_x[..., None], val_y.astype(np.int64), classes,
                str(paths[0].parent.resolve()))


@dataclass(frozen=True)
class _CifarLayout:
    folder: str
    tarball: str
    train_files: Tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: bytes
    names_key: bytes

    @property
    def files(self) -> Tuple[str, ...]:
        return self.train_files + (self.test_file, self.meta_file)


_CIFAR = {
    "cifar10": _CifarLayout("cifar-10-batches-py", "cifar-10-python.tar.gz",
                            tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta",
                            b"labels", b"label_names"),
    "cifar100": _CifarLayout("cifar-100-python", "cifar-100-python.tar.gz", ("train",), "test", "meta",
                             b"fine_labels", b"fine_label_names"),
}


def _safe_extract(tarball: Path, dest: Path) -> None:
    """Extract the regular files of ``tarball`` into ``dest``; refuse members that could land outside it."""
    with tarfile.open(tarball) as tar:
        members = tar.getmembers()
        for member in members:
            if member.name.startswith("/") or ".." in PurePosixPath(member.name).parts \
                    or not (member.isfile() or member.isdir()):
                raise ValueError(
                    f"refusing to extract {tarball}: member {member.name!r} is an absolute path, climbs out with "
                    f"'..', or is a link or device; use the official archive from {CIFAR_URL}"
                )
        # Extract next to the destination and move each top-level entry in with one rename, so a concurrent
        # process (another DDP rank) never sees a half-extracted folder.
        with tempfile.TemporaryDirectory(dir=dest, prefix=".extracting-") as tmp:
            for member in members:
                if member.isfile():
                    target = Path(tmp, *PurePosixPath(member.name).parts)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with tar.extractfile(member) as src, open(target, "wb") as out:
                        shutil.copyfileobj(src, out)
            for entry in os.listdir(tmp):
                try:
                    os.rename(Path(tmp, entry), dest / entry)
                except OSError:
                    if not (dest / entry).exists():  # lost the race to another process: fine
                        raise


def _has_files(folder: Path, files: Sequence[str]) -> bool:
    return all((folder / f).is_file() for f in files)


def _find_cifar(name: str, data_dir: str | None) -> Path:
    """The folder holding the CIFAR pickles: ``data_dir`` itself, its ``cifar-*`` subfolder, or extracted from
    the tarball in ``data_dir``."""
    layout = _CIFAR[name]
    expected = (
        f"data_dir must hold {layout.folder}/ with {', '.join(layout.files)} (or be that folder), or the tarball "
        f"{layout.tarball} (extracted on first use). Download the \"python version\" from {CIFAR_URL}"
    )
    if data_dir is None:
        raise DatasetNotFoundError(f"{name} needs {_DATA_DIR}: {expected}.")
    base = Path(data_dir)
    for folder in (base, base / layout.folder):
        if _has_files(folder, layout.files):
            return folder
    if (base / layout.tarball).is_file():
        _safe_extract(base / layout.tarball, base)
        if _has_files(base / layout.folder, layout.files):
            return base / layout.folder
        raise DatasetNotFoundError(f"{base / layout.tarball} did not give a complete {layout.folder}/: {expected}.")
    raise DatasetNotFoundError(f"{name} not found in {base}: {expected}.")


def _unpickle(path: Path) -> dict:
    # The official CIFAR "python version" is pickled. Unpickling can run code, so this only ever reads files
    # the user put in data_dir; nothing is downloaded.
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def _load_cifar_split(folder: Path, files: Sequence[str], label_key: bytes) -> Tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for file in files:
        batch = _unpickle(folder / file)
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{folder / file}: expected b'data' of shape (N, 3072), got {data.shape}")
        # Each row is the red plane, then green, then blue, each 32x32 row-major.
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


def _load_cifar(name: str, data_dir: str | None) -> _Raw:
    layout = _CIFAR[name]
    folder = _find_cifar(name, data_dir)
    train_x, train_y = _load_cifar_split(folder, layout.train_files, layout.label_key)
    val_x, val_y = _load_cifar_split(folder, (layout.test_file,), layout.label_key)
    classes = tuple(n.decode("utf-8") for n in _unpickle(folder / layout.meta_file)[layout.names_key])
    return _Raw(train_x, train_y, val_x, val_y, classes, str(folder.resolve()))


def _load_digits() -> _Raw:
    from sklearn.datasets import load_digits  # imported here: only this dataset needs scikit-learn

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]  # pixel values 0..16
    labels = digits.target.astype(np.int64)
    # A fixed stratified 80/20 split, identical for every seed, so validation numbers stay comparable.
    is_train = np.zeros(len(labels), dtype=bool)
    is_train[stratified_subset(labels, 0.8, seed=0)] = True
    return _Raw(images[is_train], labels[is_train], images[~is_train], labels[~is_train],
                tuple(str(t) for t in digits.target_names), "sklearn.datasets.load_digits")


def _scan_folder(folder: Path, class_to_idx: dict, require_all: bool) -> Tuple[list, np.ndarray]:
    """Image paths and labels under ``folder/<class>/`` (recursively), in sorted order."""
    paths, labels = [], []
    for cls, index in class_to_idx.items():
        files = sorted(p for p in (folder / cls).rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())
        if require_all and not files:
            raise DatasetNotFoundError(
                f"{folder / cls} has no images; each class folder needs at least one {'/'.join(IMG_EXTENSIONS)} file"
            )
        paths += [str(p) for p in files]
        labels += [index] * len(files)
    return paths, np.array(labels, dtype=np.int64)


def _load_imagefolder(data_dir: str | None) -> _Raw:
    layout = "data_dir/train/<class>/*.png and data_dir/val/<class>/*.png (or test/ instead of val/)"
    if data_dir is None:
        raise DatasetNotFoundError(f"imagefolder needs {_DATA_DIR} with the layout {layout}.")
    root = Path(data_dir)
    train_dir = root / "train"
    val_dir = next((root / split for split in ("val", "test") if (root / split).is_dir()), None)
    if not train_dir.is_dir() or val_dir is None:
        raise DatasetNotFoundError(f"imagefolder: {root} lacks train/ or val/ (or test/); expected {layout}.")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not classes:
        raise DatasetNotFoundError(f"imagefolder: {train_dir} has no class folders; expected {layout}.")
    extra = sorted({p.name for p in val_dir.iterdir() if p.is_dir()} - set(classes))
    if extra:
        raise ValueError(
            f"imagefolder: {val_dir} has class folders that {train_dir} lacks: {extra}; "
            f"both splits must use the same class folder names"
        )
    # Labels follow the training folder names, so a class missing from val/ does not shift the others.
    class_to_idx = {cls: i for i, cls in enumerate(classes)}
    train_paths, train_labels = _scan_folder(train_dir, class_to_idx, require_all=True)
    val_paths, val_labels = _scan_folder(val_dir, class_to_idx, require_all=False)
    return _Raw(train_paths, train_labels, val_paths, val_labels, tuple(classes), str(root.resolve()))


def _check_name(name: str) -> str:
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    return name


def _load(name: str, data_dir: str | None) -> _Raw:
    if name in _IDX_CLASSES:
        raw = _load_idx(name, data_dir)
    elif name in _CIFAR:
        raw = _load_cifar(name, data_dir)
    elif name == "digits":
        raw = _load_digits()
    else:
        raw = _load_imagefolder(data_dir)
    for labels in (raw.train_labels, raw.val_labels):
        if labels.size and (labels.min() < 0 or labels.max() >= len(raw.classes)):
            raise ValueError(
                f"{name} labels in {raw.source} run from {labels.min()} to {labels.max()}, but there are "
                f"{len(raw.classes)} classes; are these files from a different dataset?"
            )
    return raw


# ------------------------------------------------------------------------------------------------- statistics


def _pixel_stats(chunks: Iterable[np.ndarray], chans: int) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Per-channel mean and std of uint8 (..., chans) arrays, scaled to [0, 1].

    Exact and memory-light: accumulates a 256-bin histogram per channel instead of converting to float.
    """
    hist = np.zeros((chans, 256), dtype=np.int64)
    for chunk in chunks:
        for c in range(chans):
            hist[c] += np.bincount(chunk[..., c].ravel(), minlength=256)
    values = np.arange(256) / 255
    count = hist.sum(axis=1)
    mean = hist @ values / count
    std = np.sqrt(np.maximum(hist @ values**2 / count - mean**2, 0))
    std = np.maximum(std, 1 / 255)  # a constant channel would otherwise divide by zero
    return tuple(mean.tolist()), tuple(std.tolist())


def _stats(name: str, raw: _Raw, chans: int) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Mean/std of the training images with ``chans`` channels (3 -> 1 by luminance); published values when
    known, else computed once per process. Always the full training set, so subsets normalise identically."""
    known = _KNOWN_STATS.get(name)
    if known is not None and len(known[0]) == chans:
        return known
    key = (name, raw.source, chans)
    if key not in _STATS_CACHE:
        if isinstance(raw.train, np.ndarray):
            chunks = [raw.train if raw.train.shape[3] == chans else _to_grey(raw.train)]
        else:
            chunks = (_read_image(path, "L" if chans == 1 else "RGB") for path in _sample(raw.train))
        _STATS_CACHE[key] = _pixel_stats(chunks, chans)
    return _STATS_CACHE[key]


def _sample(paths: Sequence[str]) -> list[str]:
    """Up to ``_STAT_SAMPLE`` evenly spaced paths: what an image folder's statistics and channels are read from."""
    picks = np.linspace(0, len(paths) - 1, min(len(paths), _STAT_SAMPLE)).round().astype(int)
    return [paths[i] for i in picks]


def _info(name: str, raw: _Raw) -> DatasetInfo:
    if isinstance(raw.train, np.ndarray):
        native_size, chans = tuple(raw.train.shape[1:3]), raw.train.shape[3]
    else:
        # Colour if any sampled image is: a folder that mixes grey and colour files is a colour dataset,
        # whichever file sorts first. The native size is the first file's (the sample starts with it).
        sizes, modes = [], set()
        for path in _sample(raw.train):
            with Image.open(path) as image:
                sizes.append((image.height, image.width))
                modes.add(Image.getmodebase(image.mode))
        native_size, chans = sizes[0], 1 if modes == {"L"} else 3
    mean, std = _stats(name, raw, chans)
    return DatasetInfo(name, len(raw.classes), chans, native_size, mean, std, raw.classes, _HFLIP_KEEPS_LABEL[name])


# ------------------------------------------------------------------------------------------------- public API


def dataset_info(name: str, data_dir: str | None = None) -> DatasetInfo:
    """Classes, channels, native size and normalisation statistics of dataset ``name`` (see ``DATASET_NAMES``).

    Reads the dataset (a second or two at most for the built-in sets), so it raises the same errors as
    :func:`create_datasets` when the files are missing. ``in_chans``, ``mean`` and ``std`` are the dataset's own
    (before any grey <-> RGB conversion).
    """
    name = _check_name(name)
    return _info(name, _load(name, data_dir))


def describe_augmentation(augment: str, hflip: Optional[bool], info: DatasetInfo) -> str:
    """What :func:`create_datasets` does to training images with these settings, in words, e.g. for a run's summary
    ("light: random crop, no flip (a mirrored image may change its label)")."""
    if augment == "none":
        return "none"
    flip = _flip(hflip, info)
    steps = {"light": ["random crop"], "deit": ["random resized crop", "RandAugment", "random erasing"]}[augment]
    why = ("" if hflip is not None else f" ({_HFLIP_GUESSED[info.name]})" if info.name in _HFLIP_GUESSED
           else " (a mirrored image keeps its label)" if flip else " (a mirrored image may change its label)")
    return f"{augment}: {', '.join(steps)}, {'horizontal flip' if flip else 'no flip'}{why}"


def _flip(hflip: Optional[bool], info: DatasetInfo) -> bool:
    """Whether training images are flipped: ``hflip`` if set, else where the dataset's mirrored images keep labels."""
    return info.hflip if hflip is None else hflip


def train_image_count(name: str, data_dir: str | None = None, train_subset: Union[int, float, None] = None) -> int:
    """How many images :func:`create_datasets` trains on for this dataset and ``train_subset``."""
    name = _check_name(name)
    labels = _load(name, data_dir).train_labels
    indices = _subset(labels, train_subset, 0, "train_subset", name)
    return len(labels) if indices is None else len(indices)


def stratified_subset(labels: Union[Sequence[int], np.ndarray, torch.Tensor], size: Union[int, float],
                      seed: int = 0) -> np.ndarray:
    """Sorted indices of a class-stratified random subset of ``labels``.

    ``size`` is a sample count (an int, at least the number of classes) or a fraction in (0, 1] (a float).
    Each class contributes in proportion to its frequency: its count is within 1 of its exact share, and the
    leftover samples go to the classes with the largest fractional shares, so the total is exactly the requested
    count. The same ``seed`` always gives the same indices.
    """
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels).reshape(-1)
    n = len(labels)
    if n == 0:
        raise ValueError("cannot draw a subset from an empty label list")
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    k = len(classes)
    if isinstance(size, (bool, np.bool_)) or not isinstance(size, (int, float, np.integer, np.floating)):
        raise ValueError(f"subset size must be an int count or a float fraction, got {size!r}")
    if isinstance(size, (float, np.floating)):
        if not 0 < size <= 1:
            raise ValueError(f"subset fraction {size} is outside (0, 1]; pass a float in (0, 1] or an int count")
        count = round(float(size) * n)
        if count < k:
            raise ValueError(
                f"subset fraction {size} of {n} samples is {count} samples, fewer than the {k} classes; "
                f"ask for at least {k} samples so every class can appear"
            )
    else:
        count = int(size)
        if not k <= count <= n:
            raise ValueError(
                f"subset size {count} is out of range: ask for between {k} (one per class) and {n} (all samples), "
                f"or pass a float fraction in (0, 1]"
            )
    # Largest-remainder apportionment in integer arithmetic: floors, then +1 for the largest remainders.
    take, remainder = np.divmod(counts * count, n)
    take[np.argsort(-remainder, kind="stable")[: count - take.sum()]] += 1
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(inverse == c), size=t, replace=False) for c, t in enumerate(take)]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def _subset(labels: np.ndarray, size: Union[int, float, None], seed: int, key: str, name: str) -> np.ndarray | None:
    """:func:`stratified_subset`, or None for the whole split; an error names the setting."""
    try:
        return None if size is None else stratified_subset(labels, size, seed)
    except ValueError as e:
        raise ValueError(f"data.{key} of {name}: {e}; or data.{key}=null for the whole split") from None


def _make_dataset(source: Source, labels: np.ndarray, indices: np.ndarray | None, classes: Tuple[str, ...],
                  in_chans: int, transform: Callable) -> Dataset:
    if indices is not None:
        labels = labels[indices]
        source = source[indices] if isinstance(source, np.ndarray) else [source[i] for i in indices]
    if isinstance(source, np.ndarray):
        if source.shape[3] == 3 and in_chans == 1:
            source = _to_grey(source)  # once here rather than per item
        return ArrayImageDataset(source, labels, classes, transform)
    return ImageFileDataset(source, labels, classes, "L" if in_chans == 1 else "RGB", transform)


def create_datasets(name: str, img_size: IntOrPair, in_chans: int, data_dir: str | None = None,
                    train_subset: Union[int, float, None] = None, val_subset: Union[int, float, None] = None,
                    augment: str = "light", resize: str = "pad", seed: int = 0,
                    hflip: Optional[bool] = None) -> Tuple[Dataset, Dataset, DatasetInfo]:
    """Training and validation datasets of ``name``, plus their :class:`DatasetInfo`.

    Items are ``(image, label)``: ``image`` a float tensor ``(in_chans, H, W)`` with ``(H, W) = img_size``,
    normalised with the training set's mean/std; ``label`` an int. Both datasets expose ``.labels``
    (np.ndarray) and ``.classes``.

    - ``data_dir``: where the files are (Fashion-MNIST defaults to the Debian package's folder; digits needs none).
    - ``train_subset`` / ``val_subset``: a count or fraction, drawn with :func:`stratified_subset`. ``seed`` picks
      the training subset only: the validation subset is the same for every seed, so runs are scored on the same
      images. Augmentation randomness comes from the loader (see :func:`create_loader`).
    - ``augment`` (training only; validation never augments): ``"none"``; ``"light"``: random crop of the
      image zero-padded by 1/8 of its side, plus horizontal flip; ``"deit"``: DeiT's recipe through timm
      (RandAugment rand-m9-mstd0.5-inc1, random resized crop, horizontal flip, bicubic, random erasing 0.25 in
      pixel mode). Mixup/cutmix belong to the training loop, not here.
    - ``hflip``: whether the augmentations flip horizontally; None (default) flips only datasets whose mirrored
      images keep their labels (:attr:`DatasetInfo.hflip`: not ``mnist`` or ``digits``).
    - ``resize``: ``"pad"`` centres the image in a zero border (an error if it is larger than ``img_size``);
      ``"resize"`` resizes bicubically to ``img_size`` (changing the aspect ratio if it differs); ``"crop"``
      resizes keeping the aspect ratio until the image covers ``img_size`` and takes its centre (timm's eval
      transform; "deit" training still uses a random resized crop). Images already at ``img_size`` are left
      alone.
    - ``in_chans``: 1 or 3. Grey images become RGB by repetition (mean/std repeated); RGB images become grey by
      luminance (mean/std computed on the converted training set).

    The returned info describes the tensors produced: its ``in_chans``, ``mean`` and ``std`` are after channel
    conversion, so they are what to use to undo the normalisation.
    """
    name = _check_name(name)
    if augment not in AUGMENTATIONS:
        raise ValueError(f"unknown augment {augment!r}; choose one of {', '.join(AUGMENTATIONS)}")
    if resize not in RESIZE_MODES:
        raise ValueError(f"unknown resize {resize!r}; choose one of {', '.join(RESIZE_MODES)}")
    size = to_pair(img_size, "img_size")
    if min(size) < 1:
        raise ValueError(f"img_size must be positive, got {img_size!r}")

    raw = _load(name, data_dir)
    info = _info(name, raw)
    if in_chans not in (1, 3):
        raise ValueError(
            f"in_chans must be 1 (grey) or 3 (RGB), got {in_chans!r}; {name} images have {info.in_chans} "
            f"channel(s) and are converted to either"
        )
    if in_chans == info.in_chans:
        mean, std = info.mean, info.std
    elif in_chans == 3:
        mean, std = info.mean * 3, info.std * 3
    else:
        mean, std = _stats(name, raw, 1)
    if resize == "pad":
        _pad_amounts(info.native_size, size)  # fail now, not at the first batch

    train_indices = _subset(raw.train_labels, train_subset, seed, "train_subset", name)
    val_indices = _subset(raw.val_labels, val_subset, 0, "val_subset", name)
    if hflip is not None and not isinstance(hflip, bool):
        raise ValueError(f"hflip must be True, False or None (the dataset's default), got {hflip!r}")
    flip = _flip(hflip, info)
    if augment == "deit":
        train_transform = _DeitTransform(size, in_chans, mean, std, pad=resize == "pad", hflip=flip)
    else:
        train_transform = _TensorTransform(size, in_chans, mean, std, resize, light=augment == "light", hflip=flip)
    val_transform = _TensorTransform(size, in_chans, mean, std, resize, light=False)

    train = _make_dataset(raw.train, raw.train_labels, train_indices, info.classes, in_chans, train_transform)
    val = _make_dataset(raw.val, raw.val_labels, val_indices, info.classes, in_chans, val_transform)
    return train, val, replace(info, in_chans=in_chans, mean=tuple(mean), std=tuple(std), hflip=flip)


def create_loader(dataset: Dataset, batch_size: int, training: bool, num_workers: int = 0, seed: int = 0,
                  distributed: bool = False, drop_last: bool | None = None, num_replicas: int | None = None,
                  rank: int | None = None) -> DataLoader:
    """A DataLoader: shuffled with a seeded generator when ``training``, in order otherwise.

    ``drop_last`` defaults to ``training``. With ``distributed`` each process reads its own shard through a
    :class:`DistributedSampler` (shuffled when training, seeded with ``seed``); ``num_replicas`` and ``rank``
    default to torch.distributed's. Call ``loader.sampler.set_epoch(epoch)`` every epoch, or every epoch
    replays the same order. The sampler pads the last shard with repeated samples so every rank gets as many;
    exact distributed evaluation has to account for that. Validation workers persist across epochs; training
    workers start afresh every epoch, seeded from the loader's generator, so re-seeding it per epoch (as
    :func:`cmhsa.engine.fit` does) makes each epoch's augmentations the same after a restart.
    """
    sampler = None
    generator_seed = seed
    if distributed:
        if num_replicas is None or rank is None:
            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError(
                    "distributed=True needs torch.distributed initialised (torch.distributed.init_process_group) "
                    "or explicit num_replicas and rank"
                )
            num_replicas = dist.get_world_size() if num_replicas is None else num_replicas
            rank = dist.get_rank() if rank is None else rank
        sampler = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=training, seed=seed)
        # The sampler's seed must match across ranks (disjoint shards); the generator seeds the workers'
        # augmentation RNGs, which should differ between ranks.
        generator_seed = seed + rank
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=training and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=training if drop_last is None else drop_last,
        generator=torch.Generator().manual_seed(generator_seed),
        persistent_workers=num_workers > 0 and not training,  # persistent workers would carry RNG across epochs
    )
