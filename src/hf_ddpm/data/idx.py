"""The IDX file format of MNIST: the array stored in an images or labels file, gzipped or not."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

IDX_IMAGE_MAGIC, IDX_LABEL_MAGIC = 2051, 2049  # 0x0803 / 0x0801: unsigned bytes, 3 / 1 dimensions


def read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """The uint8 array stored in an IDX file, gzipped or not.

    IDX: a big-endian uint32 magic (0x08 = unsigned bytes in its third byte, the number of dimensions in its fourth),
    one big-endian uint32 per dimension, then the values in row-major order. ``ValueError`` when the magic is not
    ``expected_magic`` or the data does not have the size the header promises.
    """
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as error:
            raise ValueError(f"{path} is a damaged or truncated gzip file ({error}).") from None
    kind = "images" if expected_magic == IDX_IMAGE_MAGIC else "labels"
    magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if magic != expected_magic:
        raise ValueError(
            f"{path} has IDX magic {magic}, expected {expected_magic} (uint8 MNIST {kind}): not an MNIST {kind} file."
        )
    ndim = magic & 0xFF
    offset = 4 + 4 * ndim
    if len(raw) < offset:
        raise ValueError(f"{path} ends inside its IDX header ({len(raw)} bytes): truncated or corrupt.")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape))
    if len(raw) - offset != expected:
        raise ValueError(
            f"{path} holds {len(raw) - offset} data bytes, but its header promises {expected} for shape {shape}: "
            "truncated or corrupt."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape).copy()
