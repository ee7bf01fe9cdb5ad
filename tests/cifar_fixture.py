"""Small CIFAR-10/100 datasets written in the official python pickle format, for tests."""
import pickle
import tarfile
from pathlib import Path

import numpy as np


def _cifar_arrays(rng, n):
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8)


def make_cifar10(root: Path, per_batch: int = 4, n_test: int = 6):
    """The official CIFAR-10 python layout, with random content. Returns (train data, train labels, test data,
    test labels, class names) as stored in the pickles."""
    rng = np.random.default_rng(7)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"name{i}" for i in range(10)]
    train_data, train_labels = [], []
    for b in range(1, 6):
        data = _cifar_arrays(rng, per_batch)
        labels = rng.integers(0, 10, per_batch).tolist()
        batch = {b"batch_label": f"training batch {b} of 5".encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"img{b}_{i}.png".encode() for i in range(per_batch)]}
        (folder / f"data_batch_{b}").write_bytes(pickle.dumps(batch))
        train_data.append(data)
        train_labels += labels
    test_data = _cifar_arrays(rng, n_test)
    test_labels = rng.integers(0, 10, n_test).tolist()
    (folder / "test_batch").write_bytes(pickle.dumps(
        {b"batch_label": b"testing batch 1 of 1", b"labels": test_labels, b"data": test_data,
         b"filenames": [f"t{i}.png".encode() for i in range(n_test)]}))
    (folder / "batches.meta").write_bytes(pickle.dumps(
        {b"label_names": [n.encode() for n in names], b"num_cases_per_batch": per_batch, b"num_vis": 3072}))
    return np.concatenate(train_data), np.array(train_labels), test_data, np.array(test_labels), names


def make_cifar100(root: Path, n_train: int = 12, n_test: int = 5):
    rng = np.random.default_rng(8)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    fine_names = [f"fine{i}" for i in range(100)]
    splits = {}
    for split, n in (("train", n_train), ("test", n_test)):
        data = _cifar_arrays(rng, n)
        fine = rng.integers(0, 100, n).tolist()
        coarse = rng.integers(0, 20, n).tolist()
        (folder / split).write_bytes(pickle.dumps(
            {b"filenames": [f"{split}{i}.png".encode() for i in range(n)], b"batch_label": split.encode(),
             b"fine_labels": fine, b"coarse_labels": coarse, b"data": data}))
        splits[split] = (data, np.array(fine))
    (folder / "meta").write_bytes(pickle.dumps(
        {b"fine_label_names": [n.encode() for n in fine_names],
         b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}))
    return splits, fine_names


def to_tarball(root: Path, folder_name: str, tar_name: str) -> None:
    """Pack ``root/folder_name`` into ``root/tar_name`` and delete the folder, as the official download is."""
    with tarfile.open(root / tar_name, "w:gz") as tar:
        tar.add(root / folder_name, arcname=folder_name)
    for f in (root / folder_name).iterdir():
        f.unlink()
    (root / folder_name).rmdir()
