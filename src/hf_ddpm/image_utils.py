"""Conversions between user images (PIL, uint8 arrays, tensors) and model tensors in [-1, 1] on the 8-bit grid."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import PIL.Image
import torch
from diffusers.utils import numpy_to_pil

OUTPUT_TYPES = ("pil", "np", "pt")
ImageInput = torch.Tensor | np.ndarray | PIL.Image.Image | Sequence[PIL.Image.Image] | Sequence[np.ndarray]


def uint8_to_model_range(pixels: torch.Tensor | np.ndarray) -> torch.Tensor:
    """k in {0..255} -> k / 127.5 - 1 in [-1, 1] (float32): the grid the discretized decoder's bins are centred on."""
    pixels = pixels if isinstance(pixels, torch.Tensor) else torch.as_tensor(np.asarray(pixels))
    return pixels.to(torch.float32) / 127.5 - 1.0


def images_to_tensor(images: ImageInput, channels: int) -> torch.Tensor:
    """Turn ``images`` into a float tensor (N, C, H, W) in [-1, 1] on the 256-level grid of 8-bit data.

    Accepts a float tensor already in that form, a uint8 array/tensor (N, H, W) or (N, H, W, C), one PIL image or a
    list of them (converted to ``channels`` = 1 -> "L", 3 -> "RGB"). Raises ``ValueError`` with what to fix when a
    float tensor is outside [-1, 1] or off the 8-bit grid (likelihoods of 8-bit data are only defined there).
    """
    if isinstance(images, PIL.Image.Image):
        images = [images]
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("No images given.")
        if isinstance(images[0], PIL.Image.Image):
            mode = {1: "L", 3: "RGB"}.get(channels)
            if mode is None:
                raise ValueError(f"PIL images can be converted to 1 or 3 channels, the model has {channels}.")
            images = np.stack([np.asarray(image.convert(mode)) for image in images])
        else:
            images = np.stack([np.asarray(image) for image in images])
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"Expected a tensor, numpy array or PIL image(s), got {type(images).__name__}.")
    if images.numel() == 0:
        raise ValueError(f"No images given (an empty batch of shape {tuple(images.shape)}).")
    if images.dtype == torch.uint8:
        if images.dim() == 3:
            images = images[:, None]
        elif images.dim() == 4 and images.shape[-1] == channels and images.shape[1] != channels:
            images = images.permute(0, 3, 1, 2)
        tensor = uint8_to_model_range(images.numpy(force=True))
    elif images.is_floating_point():
        tensor = images
        if not torch.isfinite(tensor).all():
            bad = (~torch.isfinite(tensor)).sum().item()
            raise ValueError(f"{bad} pixel value(s) are NaN or infinite; images must be finite values in [-1, 1].")
        if tensor.min() < -1.0 - 1e-6 or tensor.max() > 1.0 + 1e-6:
            raise ValueError("Float images must lie in [-1, 1] (x = k / 127.5 - 1 for 8-bit values k).")
        levels = (tensor.double() + 1.0) * 127.5
        if (levels - levels.round()).abs().max() > 1e-3:
            if tensor.min() >= 0:  # looks like [0, 1] images (e.g. ToTensor()): quantize to k / 255, then to [-1, 1]
                raise ValueError(
                    "Float images must lie on the 256-level grid of 8-bit data (x = k / 127.5 - 1, k = 0..255). These "
                    "look like images in [0, 1]: quantize them to k / 255 and map them to [-1, 1], "
                    "x = torch.round(x * 255) / 255 * 2 - 1 (or pass uint8 pixels)."
                )
            raise ValueError(
                "Float images must lie on the 256-level grid of 8-bit data (x = k / 127.5 - 1, k = 0..255): the "
                "discretized likelihood is defined only there. Quantize them first, e.g. "
                "x = torch.round((x + 1) * 127.5) / 127.5 - 1."
            )
    else:
        raise ValueError(f"Images of dtype {images.dtype} are neither uint8 nor float.")
    if tensor.dim() != 4 or tensor.shape[1] != channels:
        raise ValueError(f"Expected images of shape (N, {channels}, H, W), got {tuple(tensor.shape)}.")
    return tensor


def check_image_size(images: torch.Tensor, size: int) -> None:
    """Raise ``ValueError`` unless ``images`` (..., H, W) are ``size`` pixels a side, the size a model was made for."""
    if tuple(images.shape[-2:]) != (size, size):
        raise ValueError(f"Images must be {size}x{size}, got {tuple(images.shape[-2:])}.")


def check_output_type(output_type: str) -> None:
    """Raise ``ValueError`` unless ``output_type`` is one a pipeline returns: "pil", "np" or "pt"."""
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}.")


def model_range_to_output(images: torch.Tensor, output_type: str) -> torch.Tensor | np.ndarray | list[PIL.Image.Image]:
    """Model images (N, C, H, W) in [-1, 1] (clipped) -> a pipeline's output: "pt" (N, C, H, W) float32 in [0, 1],
    "np" (N, H, W, C) float32 in [0, 1], or "pil" (a list of N PIL images)."""
    check_output_type(output_type)
    images = (images.float().clamp(-1, 1) + 1) / 2
    if output_type == "pt":
        return images
    array = images.cpu().permute(0, 2, 3, 1).numpy()
    return array if output_type == "np" else numpy_to_pil(array)
