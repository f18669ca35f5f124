"""Where images come from: :func:`load_images` and the readers of its sources (the embedded MNIST, MNIST IDX files,
image folders, datasets).

Every source becomes an :class:`~hf_ddpm.data.images.ImageData`: uint8 images (N, C, H, W) on the 8-bit grid (what
the discretized decoder's likelihood is defined on), labels when the source has them, a phrase naming the source,
and the Hub dataset id and split when the images are those of a known dataset.

Sources, as :func:`load_images` resolves them (a folder is tried as ``save_to_disk`` output, MNIST IDX folder, image
folder, folder of data files, in this order):

* ``None`` or ``"embedded"``: the official MNIST, shipped inside hf_ddpm (see :mod:`hf_ddpm.data.embedded`): split
  ``"train"``, all 60,000 training digits, or ``"test"`` (``"t10k"``), the 10,000 test digits, with labels; dataset
  id ``"ylecun/mnist"``. Never downloaded; MD5-checked.
* a folder holding MNIST IDX files (``train-images-idx3-ubyte[.gz]``, ``t10k-images-idx3-ubyte[.gz]`` and the
  ``-labels-idx1-`` files; ``split`` ``"train"``, or ``"test"``/``"t10k"``), or the path of one
  ``*-images-idx3-ubyte[.gz]`` file (its labels are read from beside it when present). The official files,
  recognised by their MD5, get dataset id ``"ylecun/mnist"`` and their split.
* a folder written by ``datasets``' ``save_to_disk`` (a ``Dataset``, or a ``DatasetDict`` indexed by ``split``).
* a folder of image files (``--train_data_dir``), searched recursively, hidden files and folders ignored, in path
  order. When it has split subfolders (``train/``, ``test/``, ...), ``split`` picks one. Such images have no labels.
* a parquet/arrow/csv/json(l) file, or a folder of them with no image files (a local copy of a Hub dataset).
* anything else is a Hub dataset id for ``datasets.load_dataset(source, dataset_config, split=split)``; offline,
  only a copy already in the ``datasets`` cache loads (with ``HF_HUB_OFFLINE=1``).

Damaged image files (in a folder, or encoded images in a dataset) are skipped with a logged warning naming each one,
so one bad file among thousands does not stop a run; when none is left, loading fails. Everything else that is
wrong (no such path, no image column, an empty source, a malformed IDX file, pixel arrays that are not 8-bit)
raises ``ValueError`` saying what to fix.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import PIL.Image

from .embedded import EMBEDDED, MNIST_DATASET_ID, official_mnist_split, read_embedded_mnist
from .idx import IDX_IMAGE_MAGIC, IDX_LABEL_MAGIC, read_idx
from .images import (
    ImageData,
    LoadOptions,
    UnreadableImageError,
    array_to_pil,
    convert_arrays,
    convert_image,
    decode_image,
    split_holdout,
)

if TYPE_CHECKING:
    from ..training_args import DataArguments

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
DATA_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json"}
SPLIT_FOLDER_NAMES = ("train", "test", "validation", "valid", "val")
IDX_SPLIT_PREFIXES = {"train": "train", "test": "t10k", "t10k": "t10k"}
DECODE_BATCH_SIZE = 1024


# ---------------------------------------------------------------------------------------------- decoded images
def stack_readable(images: list[np.ndarray], skipped: list[str], where: str) -> np.ndarray:
    """The decoded images as one array (N, C, H, W); ``ValueError`` when every one of them was unreadable."""
    if not images:
        raise ValueError(
            f"{where}: none of its {len(skipped)} image(s) could be decoded (e.g. {skipped[0]}): nothing to train on."
        )
    if skipped:
        logger.warning(f"{where}: skipped {len(skipped)} unreadable image(s), kept {len(images)}.")
    return np.stack(images)


# ---------------------------------------------------------------------------------------------- MNIST IDX files
def is_idx_path(path: Path) -> bool:
    """True for names like ``train-images-idx3-ubyte.gz`` or ``t10k-labels.idx1-ubyte``."""
    return "ubyte" in path.name and "idx" in path.name


def find_idx_images(folder: Path, split: str) -> Path:
    """The IDX images file of ``split`` ("train", "test" or "t10k") in a folder of MNIST IDX files."""
    prefix = IDX_SPLIT_PREFIXES.get(split)
    if prefix is None:
        raise ValueError(f"{folder} holds MNIST IDX files, with splits 'train' and 'test' ('t10k'), not {split!r}.")
    names = (f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-images-idx3-ubyte", f"{prefix}-images.idx3-ubyte")
    for name in names:
        if (folder / name).is_file():
            return folder / name
    found = sorted(path.name for path in folder.iterdir() if is_idx_path(path))
    raise ValueError(f"{folder} has no {names[0]} (nor {names[1]}) for split {split!r}; its IDX files are {found}.")


def idx_labels_path(images_path: Path) -> Path:
    """Where the labels of an IDX images file are: ``t10k-labels-idx1-ubyte.gz`` for ``t10k-images-idx3-ubyte.gz``."""
    return images_path.with_name(images_path.name.replace("images", "labels").replace("idx3", "idx1"))


def read_mnist_idx(images_path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """(images uint8 (N, 1, H, W), labels int64 (N,) or None) of an IDX images file and the labels file beside it."""
    if "idx1" in images_path.name or "labels" in images_path.name:
        raise ValueError(f"{images_path} is an IDX labels file: pass the images file (*-images-idx3-ubyte) or folder.")
    images = read_idx(images_path, IDX_IMAGE_MAGIC)[:, None]
    labels_path = idx_labels_path(images_path)
    if not labels_path.is_file():
        return images, None
    labels = read_idx(labels_path, IDX_LABEL_MAGIC).astype(np.int64)
    if len(labels) != len(images):
        raise ValueError(f"{labels_path} has {len(labels)} labels for the {len(images)} images of {images_path}.")
    return images, labels


def idx_description(images_path: Path, folder: Path) -> str:
    """'MNIST IDX t10k (folder)' for t10k-images-idx3-ubyte.gz."""
    return f"MNIST IDX {images_path.name.split('-')[0]} ({folder})"


# ---------------------------------------------------------------------------------------------- image folders
def visible_files(folder: Path, suffixes: Iterable[str]) -> list[Path]:
    """The files below ``folder`` with one of ``suffixes`` (case-insensitive), sorted by path, leaving out hidden
    files and folders (.git, .ipynb_checkpoints, ._* resource forks)."""
    return sorted(
        path
        for path in folder.rglob("*")
        if path.suffix.lower() in suffixes
        and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )


def split_folder(folder: Path, split: str) -> Path:
    """``folder/split`` when it exists; ``folder`` itself when it has no split subfolders; else ``ValueError``."""
    if (folder / split).is_dir():
        return folder / split
    splits = sorted(name for name in SPLIT_FOLDER_NAMES if (folder / name).is_dir())
    if splits:
        raise ValueError(f"{folder} has the split folders {splits}, but no {split!r}: pass one of them as the split.")
    return folder


def read_image_files(files: list[Path], folder: Path, options: LoadOptions) -> np.ndarray:
    """The first ``max_images`` decodable ``files`` as uint8 (N, C, H, W); the others are skipped with a warning."""
    images, skipped = [], []
    for path in files:
        try:
            images.append(decode_image(path, options))
        except UnreadableImageError as error:
            skipped.append(str(path))
            logger.warning(f"Skipping {path}: not a readable image ({error}).")
        if len(images) == options.max_images:
            break
    return stack_readable(images, skipped, f"image folder {folder}")


# ---------------------------------------------------------------------------------------------- datasets
def is_saved_dataset(path: Path) -> bool:
    """True for a folder written by ``datasets``' ``save_to_disk`` (a Dataset or a DatasetDict)."""
    return path.is_dir() and any((path / name).is_file() for name in ("state.json", "dataset_dict.json"))


def load_saved_dataset(path: Path, split: str):
    """The ``split`` of a ``save_to_disk`` folder (the Dataset itself if it is not a DatasetDict)."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except IndexError:  # what datasets raises for a saved dataset (or a split of one) with 0 rows: no data file
        raise ValueError(
            f"{path} is an empty saved dataset, or has an empty split (saved with 0 rows, no data files): nothing to "
            "train on."
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"The saved dataset {path} has the splits {list(loaded)}, not {split!r}: pass one.")
        return loaded[split]
    return loaded


def load_local_dataset(path: Path, split: str, dataset_config: str | None):
    """A ``datasets.Dataset`` from one data file (whatever ``split``) or a folder of them (its ``split``)."""
    import datasets

    try:
        if path.is_file():
            return datasets.load_dataset(DATA_FILE_BUILDERS[path.suffix.lower()], data_files=str(path), split="train")
        return datasets.load_dataset(str(path), dataset_config, split=split)
    except Exception as error:  # datasets raises many types for unreadable or empty files and unknown splits
        reason = f"{type(error).__name__}: {error}"
        raise ValueError(f"Could not load {path} as a dataset (split {split!r}): {reason}") from None


def load_hub_dataset(name: str, split: str, dataset_config: str | None, cache_dir: str | None = None):
    """``datasets.load_dataset(name, dataset_config, split=split, cache_dir=cache_dir)``, its failures turned into a
    ``ValueError``."""
    import datasets

    try:
        return datasets.load_dataset(name, dataset_config, split=split, cache_dir=cache_dir)
    except Exception as error:  # ConnectionError, FileNotFoundError, DatasetNotFoundError, ValueError (split), ...
        raise ValueError(
            f"Could not load {name!r} (config {dataset_config!r}, split {split!r}), which is not a local path, as a "
            f"Hub dataset: {type(error).__name__}: {error}. Loading from the Hub needs network access; offline, only "
            "a dataset downloaded before loads, from the datasets cache (HF_DATASETS_CACHE, ~/.cache/huggingface/"
            "datasets) with HF_HUB_OFFLINE=1. Or pass a local source: MNIST IDX files, a folder of images, a "
            "save_to_disk folder, or parquet/arrow/csv/json files."
        ) from None


def is_pixel_column(feature) -> bool:
    """True for ``datasets`` features holding images: ``Image``, ``{"bytes", "path"}`` structs (encoded images
    without the ``Image`` type), ``Array2D``/``Array3D``, or 2-3 nested lists of numbers (what ``Dataset.from_dict``
    makes of numpy arrays)."""
    import datasets

    if isinstance(feature, (datasets.Image, datasets.Array2D, datasets.Array3D)):
        return True
    if isinstance(feature, dict):
        return "bytes" in feature
    depth = 0
    while isinstance(feature, (datasets.List, datasets.LargeList)):
        feature, depth = feature.feature, depth + 1
    numeric = isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint", "float"))
    return depth in (2, 3) and numeric


def find_image_column(dataset, wanted: str | None) -> str:
    """``wanted`` if given (it must hold images), else the first ``Image`` column, else the first pixel column."""
    import datasets

    columns, features = list(dataset.column_names), dataset.features
    if wanted is not None:
        if wanted not in columns:
            raise ValueError(f"The dataset has no column {wanted!r}; its columns are {columns}.")
        if not is_pixel_column(features[wanted]):
            raise ValueError(f"The column {wanted!r} holds {features[wanted]}, not images (datasets.Image or pixels).")
        return wanted
    typed = [column for column in columns if isinstance(features[column], datasets.Image)]
    pixels = [column for column in columns if is_pixel_column(features[column])]
    if typed or pixels:
        return (typed or pixels)[0]
    raise ValueError(
        f"The dataset has no image column (columns: {columns}; an image column holds datasets.Image values or 2-D/3-D "
        "pixel arrays): name it with image_column (--image_column)."
    )


def find_label_column(dataset, wanted: str | None) -> str | None:
    """``wanted`` if given (it must exist), else "label" or "labels" if present, else None."""
    columns = list(dataset.column_names)
    if wanted is not None and wanted not in columns:
        raise ValueError(f"The dataset has no column {wanted!r} for labels; its columns are {columns}.")
    return wanted or next((name for name in ("label", "labels") if name in columns), None)


def decode_value(value: object, options: LoadOptions) -> np.ndarray:
    """One value of an image column as uint8 (C, H, W): an encoded image (``{"bytes", "path"}``, what
    ``datasets.Image(decode=False)`` yields), a PIL image, or a pixel array. ``UnreadableImageError`` for a
    missing or undecodable image, ``ValueError`` for a pixel array that is not 8-bit."""
    if value is None:
        raise UnreadableImageError("no image (None)")
    if isinstance(value, dict):
        encoded = value.get("bytes") or value.get("path")
        if encoded is None:
            raise UnreadableImageError("no image (neither bytes nor path)")
        return decode_image(encoded if isinstance(encoded, bytes) else Path(encoded), options)
    image = value if isinstance(value, PIL.Image.Image) else array_to_pil(np.asarray(value))
    return convert_image(image, options)


def read_dataset_images(dataset, column: str, options: LoadOptions, where: str) -> tuple[np.ndarray, list[int]]:
    """(uint8 images (N, C, H, W), the row of each): the first ``max_images`` decodable images of ``column``.

    Encoded images are decoded here, not by ``datasets``, so that a damaged one is skipped with a warning naming its
    row (and file); a pixel array that is not 8-bit fails with its row number.
    """
    import datasets

    if isinstance(dataset.features[column], datasets.Image):
        dataset = dataset.cast_column(column, datasets.Image(decode=False))
    images, rows, skipped = [], [], []
    values = (value for batch in dataset.select_columns([column]).iter(DECODE_BATCH_SIZE) for value in batch[column])
    for row, value in enumerate(values):
        try:
            images.append(decode_value(value, options))
            rows.append(row)
        except UnreadableImageError as error:
            name = f"row {row}" + (f" ({value['path']})" if isinstance(value, dict) and value.get("path") else "")
            skipped.append(name)
            logger.warning(f"Skipping {name} of {where}: not a readable image ({error}).")
        except ValueError as error:
            raise ValueError(f"Row {row} of column {column!r} of {where} holds {error}") from None
        if len(images) == options.max_images:
            break
    return stack_readable(images, skipped, where), rows


def read_labels(dataset, column: str, explicit: bool) -> np.ndarray | None:
    """The integer labels (int64, one per row) of ``column``. Non-integer values: ``ValueError`` when the column was
    asked for, else a logged note and None (an auto-detected "label" may be a caption)."""
    values = dataset.with_format("arrow")[column].to_numpy()
    if np.issubdtype(values.dtype, np.integer):
        return values.astype(np.int64)
    message = f"The label column {column!r} holds {values.dtype} values, not integer class ids"
    if explicit:
        raise ValueError(f"{message}: pass a column of integers as label_column.")
    logger.info(f"{message}: the images are loaded without labels.")
    return None


def read_dataset(dataset, options: LoadOptions, where: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(uint8 images (N, C, H, W), int64 labels (N,) or None) of a ``datasets.Dataset``."""
    if len(dataset) == 0:
        raise ValueError(f"{where} is empty (0 rows): nothing to train on.")
    column = find_image_column(dataset, options.image_column)
    label_column = find_label_column(dataset, options.label_column)
    images, rows = read_dataset_images(dataset, column, options, where)
    labels = read_labels(dataset, label_column, options.label_column is not None) if label_column else None
    return images, None if labels is None else labels[rows]


# ---------------------------------------------------------------------------------------------- the entry point
def looks_like_path(source: str) -> bool:
    """True when ``source`` cannot be a Hub dataset id ("name" or "owner/name") and so must be a local path."""
    return (
        source.startswith(("/", ".", "~"))
        or source.count("/") > 1
        or "\\" in source
        or Path(source).suffix.lower() in DATA_FILE_BUILDERS
        or "ubyte" in source
    )


def load_idx(images_path: Path, folder: Path) -> ImageData:
    """An MNIST IDX images file with the labels beside it; the official files as ``ylecun/mnist`` and their split."""
    images, labels = read_mnist_idx(images_path)
    split = official_mnist_split(images_path, None if labels is None else idx_labels_path(images_path))
    dataset_id = None if split is None else MNIST_DATASET_ID
    return ImageData(images, labels, idx_description(images_path, folder), dataset_id, split)


def load_file(path: Path, options: LoadOptions) -> ImageData:
    """The images (unconverted) of an MNIST IDX images file or a data file."""
    if is_idx_path(path):
        return load_idx(path, path.parent)
    if path.suffix.lower() in DATA_FILE_BUILDERS:
        return ImageData(*read_dataset(load_local_dataset(path, options.split, None), options, str(path)), str(path))
    raise ValueError(
        f"{path} is neither an MNIST IDX images file (*-images-idx3-ubyte[.gz]) nor a data file "
        f"({', '.join(DATA_FILE_BUILDERS)})."
    )


def load_folder(path: Path, options: LoadOptions) -> ImageData:
    """The images (unconverted) of a save_to_disk folder, an MNIST IDX folder, an image folder, or a folder of data
    files, tried in this order."""
    if is_saved_dataset(path):
        where = f"saved dataset {path}"
        dataset = load_saved_dataset(path, options.split)
        return ImageData(*read_dataset(dataset, options, where), f"{where}[{options.split}]")
    if any(is_idx_path(child) for child in path.iterdir()):
        return load_idx(find_idx_images(path, options.split), path)
    folder = split_folder(path, options.split)
    files = visible_files(folder, IMAGE_SUFFIXES)
    if files:
        return ImageData(read_image_files(files, folder, options), None, f"image folder {folder}")
    if visible_files(path, DATA_FILE_BUILDERS):
        where = f"{path}[{options.split}]"
        dataset = load_local_dataset(path, options.split, options.dataset_config)
        return ImageData(*read_dataset(dataset, options, where), where)
    raise ValueError(
        f"{folder} holds no image files ({', '.join(IMAGE_SUFFIXES)}), MNIST IDX files or data files: nothing to "
        "train on."
    )


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
    cache_dir: str | None = None,
) -> ImageData:
    """Load the first ``max_images`` (default: all) images of ``source`` (see the module docstring for the sources)
    as uint8 (N, channels, resolution, resolution), with int64 labels (N,) when the source has them.

    ``channels``: 1 (converted to grayscale, "L") or 3 ("RGB"). Images that are not ``resolution`` x ``resolution``
    are resized (see :func:`~hf_ddpm.data.images.convert_image`); ones that are stay untouched, on the 8-bit grid.
    ``dataset_config``, ``image_column`` (auto-detected: the first ``datasets.Image`` column, else the first column
    of pixel arrays) and ``label_column`` (auto: "label" or "labels") apply to datasets; ``cache_dir`` is the
    ``datasets`` cache for Hub datasets (default: its own). The result's ``dataset_id`` and ``split`` name the
    dataset and split for the embedded MNIST, the official MNIST IDX files and Hub datasets, and are None for other
    local data.

    Raises ``ValueError`` saying what to fix for bad options, paths that do not exist, empty or unreadable sources
    and missing columns; damaged image files are skipped with a logged warning.
    """
    options = LoadOptions(
        split, dataset_config, image_column, label_column, channels, resolution, center_crop, max_images
    )
    if source is None or source == EMBEDDED:
        data = read_embedded_mnist(split)
    elif (path := Path(source).expanduser()).is_file():
        data = load_file(path, options)
    elif path.is_dir():
        data = load_folder(path, options)
    elif looks_like_path(source):
        raise ValueError(
            f"{source} does not exist. Pass an existing folder or file, {EMBEDDED!r} or a Hub dataset id such as "
            "ylecun/mnist."
        )
    else:
        images, labels = read_dataset(load_hub_dataset(source, split, dataset_config, cache_dir), options, source)
        description = f"{source}[{split}]" if dataset_config is None else f"{source}:{dataset_config}[{split}]"
        data = ImageData(images, labels, description, source, split)
    data = data.subset(slice(max_images), data.source)
    if len(data.images) == 0:
        raise ValueError(f"{data.source} holds no images: nothing to train on.")
    return dataclasses.replace(data, images=convert_arrays(data.images, options))


def load_training_data(data_args: DataArguments) -> tuple[ImageData, ImageData, str]:
    """(training images, held-out images, a sentence saying where the held-out set comes from). The held-out set is
    ``--eval_data``, else the official test split of the embedded MNIST when training on it, else images held out
    at random from the training data (train.py's data; ``data_args`` are its flags)."""
    common = dict(channels=data_args.channels, resolution=data_args.resolution, center_crop=data_args.center_crop)
    source = data_args.dataset_name or data_args.train_data_dir
    train = load_images(
        source,
        split="train",
        dataset_config=data_args.dataset_config,
        image_column=data_args.image_column,
        max_images=data_args.max_train_images,
        cache_dir=data_args.cache_dir,
        **common,
    )
    if data_args.eval_data is not None or source is None:
        held_out = load_images(
            data_args.eval_data, split=data_args.eval_split, max_images=data_args.num_eval_images, **common
        )
        return train, held_out, f"the first {len(held_out.images)} images of {held_out.source}"
    train, held_out = split_holdout(train, data_args.num_eval_images)
    return train, held_out, f"{len(held_out.images)} images held out at random from {train.source} (not trained on)"
