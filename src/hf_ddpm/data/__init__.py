"""Image data for training and evaluation: the embedded official MNIST, MNIST IDX files, image folders, datasets.

:func:`load_images` turns any of them into an :class:`ImageData`. The modules: :mod:`.images` (ImageData, pixel
conversion, held-out splits, the torch dataset), :mod:`.idx` (the IDX file format), :mod:`.embedded` (the official
MNIST shipped in ``data/mnist/``, MD5-checked), :mod:`.sources` (:func:`load_images` and the readers of MNIST IDX
folders, image folders, data files and datasets). This package re-exports their public names, except those of
:mod:`.emoji` (``render_emoji_folder``: the colour emoji of Debian's fonts-noto-color-emoji as an image folder to train
on), which runs as ``python -m hf_ddpm.data.emoji`` and so is imported only where it is used.
"""

from .batches import ShuffledBatches
from .embedded import EMBEDDED, read_embedded_mnist
from .idx import IDX_IMAGE_MAGIC, IDX_LABEL_MAGIC, read_idx
from .images import (
    PIL_MODES,
    ImageData,
    ImageTensorDataset,
    LoadOptions,
    UnreadableImageError,
    array_to_pil,
    convert_arrays,
    convert_image,
    decode_image,
    describe_array,
    split_holdout,
)
from .sources import (
    DATA_FILE_BUILDERS,
    DECODE_BATCH_SIZE,
    IDX_SPLIT_PREFIXES,
    IMAGE_SUFFIXES,
    SPLIT_FOLDER_NAMES,
    decode_value,
    find_idx_images,
    find_image_column,
    find_label_column,
    idx_description,
    is_idx_path,
    is_pixel_column,
    is_saved_dataset,
    load_file,
    load_folder,
    load_hub_dataset,
    load_images,
    load_local_dataset,
    load_saved_dataset,
    looks_like_path,
    read_dataset,
    read_dataset_images,
    read_image_files,
    read_labels,
    read_mnist_idx,
    split_folder,
    stack_readable,
    visible_files,
)

__all__ = [
    "DATA_FILE_BUILDERS",
    "DECODE_BATCH_SIZE",
    "EMBEDDED",
    "IDX_IMAGE_MAGIC",
    "IDX_LABEL_MAGIC",
    "IDX_SPLIT_PREFIXES",
    "IMAGE_SUFFIXES",
    "PIL_MODES",
    "SPLIT_FOLDER_NAMES",
    "ShuffledBatches",
    "ImageData",
    "ImageTensorDataset",
    "LoadOptions",
    "UnreadableImageError",
    "array_to_pil",
    "convert_arrays",
    "convert_image",
    "decode_image",
    "decode_value",
    "describe_array",
    "find_idx_images",
    "find_image_column",
    "find_label_column",
    "idx_description",
    "is_idx_path",
    "is_pixel_column",
    "is_saved_dataset",
    "load_file",
    "load_folder",
    "load_hub_dataset",
    "load_images",
    "load_local_dataset",
    "load_saved_dataset",
    "looks_like_path",
    "read_dataset",
    "read_dataset_images",
    "read_embedded_mnist",
    "read_idx",
    "read_image_files",
    "read_labels",
    "read_mnist_idx",
    "split_folder",
    "split_holdout",
    "stack_readable",
    "visible_files",
]
