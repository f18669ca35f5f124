"""Data sources: the embedded digits, MNIST IDX files, image folders, datasets; and the errors bad data gets."""

import gzip
import logging
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from hf_ddpm.data import ImageTensorDataset, load_images, split_holdout

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
needs_mnist = pytest.mark.skipif(not MNIST.is_dir(), reason=f"the MNIST IDX files are not at {MNIST}")


def test_embedded_digits_are_500_of_each_class():
    data = load_images()
    assert data.images.shape == (5000, 1, 28, 28) and data.images.dtype == np.uint8
    assert np.bincount(data.labels).tolist() == [500] * 10


@needs_mnist
def test_idx_files_match_their_readme_and_the_embedded_rows_are_training_images():
    train, test = load_images(str(MNIST), split="train"), load_images(str(MNIST), split="test")
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert np.bincount(train.labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(test.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert train.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    rows = np.concatenate([np.where(train.labels == c)[0][:500] for c in range(10)])
    assert np.array_equal(load_images().images, train.images[rows])


def test_image_folder_round_trip_resize_and_a_corrupt_file_is_skipped_with_a_warning(tmp_path, caplog):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    for i, p in enumerate(pixels):
        Image.fromarray(p).save(tmp_path / f"{i}.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with caplog.at_level(logging.WARNING):
        data = load_images(str(tmp_path))
    assert np.array_equal(data.images[:, 0], pixels)
    assert "broken.png" in caplog.text
    Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(tmp_path / "rgb.png")
    resized = load_images(str(tmp_path), resolution=16, channels=3, center_crop=True)
    assert resized.images.shape == (4, 3, 16, 16) and resized.images.dtype == np.uint8


def test_a_saved_dataset_with_an_unusual_image_column_is_auto_detected(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    ds = datasets.Dataset.from_dict({"picture": [Image.fromarray(p) for p in pixels], "label": [0, 1, 2, 3]})
    ds = ds.cast_column("picture", datasets.Image())
    ds.save_to_disk(str(tmp_path / "ds"))
    data = load_images(str(tmp_path / "ds"))
    assert np.array_equal(data.images[:, 0], pixels) and data.labels.tolist() == [0, 1, 2, 3]


def test_tensor_dataset_values_and_holdout_split():
    images = np.arange(2 * 4, dtype=np.uint8).reshape(2, 1, 2, 2) * 30
    ds = ImageTensorDataset(images)
    assert np.allclose(ds[1].numpy(), images[1] / 127.5 - 1)
    flipped = ImageTensorDataset(images, random_flip=True)
    seen = {tuple(flipped[0].flatten().tolist()) for _ in range(40)}
    assert len(seen) == 2
    data = load_images(max_images=100)
    train, held = split_holdout(data, 10)
    assert len(train.images) == 90 and len(held.images) == 10
    with pytest.raises(ValueError, match="Cannot hold out 100 of 100"):
        split_holdout(data, 100)


@pytest.mark.parametrize("case", ["no_image_column", "empty_dataset", "empty_folder", "only_corrupt", "bad_magic", "truncated", "bad_channels", "bad_resolution"])
def test_bad_data_fails_with_a_message(tmp_path, case):
    if case == "no_image_column":
        datasets.Dataset.from_dict({"text": ["a"], "label": [0]}).save_to_disk(str(tmp_path / "ds"))
        call, message = (str(tmp_path / "ds"),), r"no image column \(columns: \['text', 'label'\]\); name it with --image_column"
    elif case == "empty_dataset":
        datasets.Dataset.from_dict({"image": []}).save_to_disk(str(tmp_path / "ds"))
        call, message = (str(tmp_path / "ds"),), "empty saved dataset"
    elif case == "empty_folder":
        (tmp_path / "empty").mkdir()
        call, message = (str(tmp_path / "empty"),), "holds no image files"
    elif case == "only_corrupt":
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "a.jpg").write_bytes(b"xx")
        call, message = (str(tmp_path / "bad"),), "1 image file\\(s\\), none readable"
    elif case in ("bad_magic", "truncated"):
        header = (2051 if case == "truncated" else 1234).to_bytes(4, "big") + (3).to_bytes(4, "big") + (2).to_bytes(4, "big") * 2
        (tmp_path / "x-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + bytes(5)))
        call = (str(tmp_path / "x-images-idx3-ubyte.gz"),)
        message = "has IDX magic 1234, expected 2051" if case == "bad_magic" else "truncated or corrupt"
    elif case == "bad_channels":
        call, message = (None,), "channels must be 1 \\(grayscale\\) or 3"
    else:
        call, message = (None,), "resolution must be positive"
    kwargs = {"channels": 2} if case == "bad_channels" else {"resolution": 0} if case == "bad_resolution" else {}
    with pytest.raises(ValueError, match=message):
        load_images(*call, **kwargs)
