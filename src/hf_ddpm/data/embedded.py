"""The official MNIST, shipped inside hf_ddpm as the default data: the four original IDX files in
``hf_ddpm/data/mnist/`` (source, license and MD5 sums in its LICENSE.md), checked against their MD5 sums before use.

Split "train" is all 60,000 official training digits, split "test" (or "t10k") the 10,000 official test digits, both
with their labels. Nothing is downloaded and nothing outside the installed package is read. Each file's MD5 is
computed once per process and the decoded digits are kept, so loading them again costs only a copy.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numpy as np

from .idx import IDX_IMAGE_MAGIC, IDX_LABEL_MAGIC, read_idx
from .images import ImageData

EMBEDDED = "embedded"
MNIST_DATASET_ID = "ylecun/mnist"
MNIST_FOLDER = Path(__file__).with_name("mnist")
#: split -> its (images, labels) files: (name, MD5 of the gzipped file as published, MD5 of the file decompressed)
MNIST_FILES = {
    "train": (
        ("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873", "6bbc9ace898e44ae57da46a324031adb"),
        ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432", "a25bea736e30d166cdddb491f175f624"),
    ),
    "test": (
        ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3", "2646ac647ad5339dbf082846283269ea"),
        ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c", "27ae3e4e09519cfbb04c329615203637"),
    ),
}
MNIST_SPLITS = {"train": "train", "test": "test", "t10k": "test"}
EMBEDDED_DESCRIPTIONS = {
    "train": "MNIST train (60,000 official digits, embedded in hf_ddpm)",
    "test": "MNIST test (10,000 official t10k digits, embedded in hf_ddpm)",
}


@functools.cache
def _md5_of_version(path: Path, size: int, mtime_ns: int) -> str:
    """The MD5 of ``path``; ``size`` and ``mtime_ns`` are in the cache key, so a rewritten file is hashed again."""
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def file_md5(path: Path) -> str:
    """The MD5 (hex) of a file's bytes, computed once per process for each version of the file."""
    stat = path.stat()
    return _md5_of_version(path, stat.st_size, stat.st_mtime_ns)


@functools.cache
def read_official_mnist(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 1, 28, 28), labels int64 (N,)), read-only, of the official IDX files of ``split`` ("train"
    or "test") in ``folder``, decoded once per process after each file's MD5 was checked.

    Raises ``FileNotFoundError`` for a missing file and a one-line ``ValueError`` naming the file and the expected
    and actual MD5 for a file that is not the official one.
    """
    for name, expected, _ in MNIST_FILES[split]:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: reinstall hf_ddpm, which ships the MNIST files.")
        if (actual := file_md5(path)) != expected:
            raise ValueError(f"{path} has MD5 {actual}, expected {expected}: the file is damaged; reinstall hf_ddpm.")
    (images_name, *_), (labels_name, *_) = MNIST_FILES[split]
    images = read_idx(folder / images_name, IDX_IMAGE_MAGIC)[:, None]
    labels = read_idx(folder / labels_name, IDX_LABEL_MAGIC).astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def read_embedded_mnist(split: str = "train") -> ImageData:
    """The embedded official MNIST split ``split``: "train" (60,000 digits) or "test"/"t10k" (10,000), as uint8
    (N, 1, 28, 28) with int64 labels, ``dataset_id`` "ylecun/mnist" and ``split`` "train" or "test".

    ``ValueError`` for another split, or when a file's MD5 is not the official one (see :func:`read_official_mnist`).
    """
    name = MNIST_SPLITS.get(split)
    if name is None:
        raise ValueError(
            f"The embedded MNIST has the splits 'train' and 'test' ('t10k'), not {split!r}: pass a dataset or files "
            "that have it."
        )
    images, labels = read_official_mnist(MNIST_FOLDER, name)
    return ImageData(images.copy(), labels.copy(), EMBEDDED_DESCRIPTIONS[name], MNIST_DATASET_ID, name)


def official_mnist_split(images_path: Path, labels_path: Path | None) -> str | None:
    """The split ("train" or "test") of which these are the official MNIST IDX images (and labels) files, gzipped or
    not, whatever their names (recognised by their MD5); None when they are not."""
    for split, ((_, *images_md5s), (_, *labels_md5s)) in MNIST_FILES.items():
        if file_md5(images_path) in images_md5s and (labels_path is None or file_md5(labels_path) in labels_md5s):
            return split
    return None
