"""Images in memory: :class:`ImageData` (what every source becomes), the options of loading, the conversion of
pixels to the channels and resolution asked for, held-out splits, and the torch dataset that feeds training."""

from __future__ import annotations

import dataclasses
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.ExifTags
import PIL.Image
import PIL.ImageOps
import torch

from ..image_utils import uint8_to_model_range

PIL_MODES = {1: "L", 3: "RGB"}


@dataclass
class ImageData:
    """Images of one source.

    Attributes:
        images: uint8 array (N, C, H, W).
        labels: int64 array (N,) when the source has labels, else None.
        source: where they come from, in words (for logs and model cards).
        dataset_id: the Hub id of the dataset the images are from, for model cards: ``"ylecun/mnist"`` for the
            embedded digits and for the official MNIST IDX files, the id itself for a Hub dataset; None for other
            local data (never a local path).
        split: the split of that dataset the images are from (``"train"``, ``"test"``, ...); None when
            ``dataset_id`` is. A part of it (``max_images``, :func:`split_holdout`) keeps the split's name.
    """

    images: np.ndarray
    labels: np.ndarray | None
    source: str
    dataset_id: str | None = None
    split: str | None = None

    def __post_init__(self):
        if not isinstance(self.images, np.ndarray) or self.images.dtype != np.uint8 or self.images.ndim != 4:
            found = describe_array(self.images)
            raise ValueError(f"ImageData.images must be a uint8 array (N, C, H, W), got {found}.")
        if self.labels is not None and self.labels.shape != (len(self.images),):
            raise ValueError(f"ImageData.labels must have shape ({len(self.images)},), got {self.labels.shape}.")

    def subset(self, indices: np.ndarray | slice, source: str) -> ImageData:
        """The images (and labels) at ``indices``, described as ``source``, from the same dataset and split."""
        labels = None if self.labels is None else self.labels[indices]
        return dataclasses.replace(self, images=self.images[indices], labels=labels, source=source)


class UnreadableImageError(ValueError):
    """An encoded image (file or bytes) that PIL cannot decode."""


@dataclass(frozen=True)
class LoadOptions:
    """The options of :func:`~hf_ddpm.data.sources.load_images` (see there), checked once and passed to every
    reader."""

    split: str = "train"
    dataset_config: str | None = None
    image_column: str | None = None
    label_column: str | None = None
    channels: int = 1
    resolution: int = 28
    center_crop: bool = False
    max_images: int | None = None

    def __post_init__(self):
        if self.channels not in PIL_MODES:
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {self.channels}.")
        if self.resolution <= 0:
            raise ValueError(f"resolution must be a positive number of pixels, got {self.resolution}.")
        if self.max_images is not None and self.max_images <= 0:
            raise ValueError(f"max_images must be positive (or None for all images), got {self.max_images}.")


def describe_array(value: object) -> str:
    """'uint8 array of shape (2, 3)' or the type name, for error messages."""
    return f"{value.dtype} array of shape {value.shape}" if isinstance(value, np.ndarray) else type(value).__name__


# ---------------------------------------------------------------------------------------------- pixel conversion
HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_8_bits(image: PIL.Image.Image) -> PIL.Image.Image:
    """A 16-bit (or 32-bit integer) grayscale image scaled to 8 bits, k = round(v / 257) (65535 -> 255), with one
    warning; PIL's own ``convert("L")`` would clip every value above 255 to white. Other images are returned as is.
    A 32-bit image whose values all lie in 0..255 is taken to hold 8-bit values and is not scaled."""
    if image.mode not in HIGH_DEPTH_MODES:
        return image
    values = np.asarray(image).astype(np.int64)
    if image.mode == "I" and values.size and 0 <= values.min() and values.max() <= 255:
        return PIL.Image.fromarray(values.astype(np.uint8), "L")
    warnings.warn(
        f"hf_ddpm: {image.mode} images (16-bit) are scaled to 8 bits (k = round(v / 257)); the models see 256 levels.",
        stacklevel=2,
    )
    return PIL.Image.fromarray(np.clip(np.round(values / 257), 0, 255).astype(np.uint8), "L")


def convert_image(image: PIL.Image.Image, options: LoadOptions) -> np.ndarray:
    """One PIL image as uint8 (channels, resolution, resolution).

    Converted to "L" (channels=1) or "RGB" (channels=3); then, unless already resolution x resolution, resized with
    PIL's bilinear filter (antialiased when shrinking): with ``center_crop`` the shorter side goes to ``resolution``
    (aspect ratio kept) and the center square is cut out, otherwise the image is squashed to the square.
    """
    image, size = to_8_bits(image).convert(PIL_MODES[options.channels]), options.resolution
    if image.size != (size, size):
        if options.center_crop:
            scale = size / min(image.size)
            scaled = (max(size, round(image.width * scale)), max(size, round(image.height * scale)))
            image = image.resize(scaled, PIL.Image.Resampling.BILINEAR)
            left, top = (image.width - size) // 2, (image.height - size) // 2
            image = image.crop((left, top, left + size, top + size))
        else:
            image = image.resize((size, size), PIL.Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if options.channels == 1 else array.transpose(2, 0, 1)


def convert_arrays(images: np.ndarray, options: LoadOptions) -> np.ndarray:
    """uint8 (N, C0, H, W) with C0 in (1, 3) -> uint8 (N, channels, resolution, resolution).

    Returned unchanged when already so; gray -> RGB at the right size is a numpy repeat; anything else goes image by
    image through :func:`convert_image`.
    """
    if images.shape[2:] == (options.resolution, options.resolution):
        if images.shape[1] == options.channels:
            return images
        if images.shape[1] == 1:
            return np.repeat(images, options.channels, axis=1)
    pil_images = (PIL.Image.fromarray(image[0] if len(image) == 1 else image.transpose(1, 2, 0)) for image in images)
    return np.stack([convert_image(image, options) for image in pil_images])


def array_to_pil(array: np.ndarray) -> PIL.Image.Image:
    """Pixel values 0..255 shaped (H, W), (H, W, C) or (C, H, W) with C in (1, 3, 4) -> a PIL image."""
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)) or array.size == 0:
        raise ValueError(
            f"a pixel array of shape {array.shape}; expected (H, W), (H, W, C) or (C, H, W), C = 1, 3, 4."
        )
    if array.dtype != np.uint8:
        numeric = np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
        if not numeric or array.min() < 0 or array.max() > 255 or not np.array_equal(array, np.round(array)):
            found = f"{array.dtype} values" + (f" in [{array.min()}, {array.max()}]" if numeric else "")
            raise ValueError(f"{found}; pixel arrays must hold 8-bit values, integers 0..255 (scale them first).")
        array = array.astype(np.uint8)
    return PIL.Image.fromarray(np.ascontiguousarray(array))


def decode_image(encoded: Path | bytes, options: LoadOptions) -> np.ndarray:
    """An image file or its bytes as uint8 (C, H, W) (see :func:`convert_image`), turned upright by its EXIF
    orientation as ``datasets.Image`` does.

    Raises :class:`UnreadableImageError` when PIL cannot decode it (PIL raises OSError, SyntaxError, struct.error,
    DecompressionBombError, ... for damaged or hostile files, so every exception counts as "unreadable").
    """
    try:
        with PIL.Image.open(io.BytesIO(encoded) if isinstance(encoded, bytes) else encoded) as image:
            if image.getexif().get(PIL.ExifTags.Base.Orientation) is not None:
                return convert_image(PIL.ImageOps.exif_transpose(image), options)
            return convert_image(image, options)
    except Exception as error:
        raise UnreadableImageError(f"{type(error).__name__}: {error}") from None


# ---------------------------------------------------------------------------------------------- splits and tensors
def split_holdout(data: ImageData, num_holdout: int, seed: int = 0) -> tuple[ImageData, ImageData]:
    """(train, held out): ``num_holdout`` images drawn at random without replacement (the same ones for the same
    ``seed``), the rest to train on; both keep the original order. ``ValueError`` unless 0 < num_holdout < N."""
    total = len(data.images)
    if not 0 < num_holdout < total:
        raise ValueError(
            f"Cannot hold out {num_holdout} of {total} images: hold out between 1 and {total - 1}, or evaluate on "
            "separate data."
        )
    order = np.random.default_rng(seed).permutation(total)
    held, kept = np.sort(order[:num_holdout]), np.sort(order[num_holdout:])
    return data.subset(kept, data.source), data.subset(held, f"{data.source}, {num_holdout} held out (seed {seed})")


def check_uint8_images(images: np.ndarray, user: str) -> None:
    """Raise ``ValueError`` naming ``user`` unless ``images`` is a uint8 array (N, C, H, W)."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"{user} needs uint8 images (N, C, H, W), got {describe_array(images)}.")


class ImageTensorDataset(torch.utils.data.Dataset):
    """uint8 (N, C, H, W) images -> float32 tensors in [-1, 1] (x = k/127.5 - 1).

    ``dataset[i]`` is one image (C, H, W); ``dataset[a:b]`` (or an index array) is a batch (n, C, H, W). Training
    draws its shuffled (and optionally flipped) batches from :class:`hf_ddpm.data.ShuffledBatches` instead.
    """

    def __init__(self, images: np.ndarray):
        check_uint8_images(images, "ImageTensorDataset")
        self.images = torch.from_numpy(np.ascontiguousarray(images))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int | slice | np.ndarray) -> torch.Tensor:
        return uint8_to_model_range(self.images[index])
