"""Data sources (embedded digits, MNIST IDX files, image folders, datasets), conversion, and errors for bad data."""

import gzip
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

import hf_ddpm.data
from hf_ddpm.data import ImageData, ImageTensorDataset, LoadOptions, load_images, read_dataset, split_holdout
from hf_ddpm.data.embedded import MNIST_FILES, MNIST_FOLDER

#: The official IDX files, read as a folder of IDX files: the copy that ships in the package.
MNIST = MNIST_FOLDER
TRAIN_SOURCE = "MNIST train (60,000 official digits, embedded in hf_ddpm)"
TEST_SOURCE = "MNIST test (10,000 official t10k digits, embedded in hf_ddpm)"
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]  # the digits 0..9 of the official files
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def idx_bytes(magic: int, array: np.ndarray) -> bytes:
    """An IDX file's content: big-endian magic, one uint32 per dimension, the uint8 data."""
    header = magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def saved(tmp_path: Path, dataset: datasets.Dataset | datasets.DatasetDict) -> str:
    """Save ``dataset`` to disk under ``tmp_path`` and return the folder."""
    dataset.save_to_disk(str(tmp_path / "ds"))
    return str(tmp_path / "ds")


def parquet(tmp_path: Path, dataset: datasets.Dataset) -> str:
    """Write ``dataset`` as a parquet file under ``tmp_path`` and return its path."""
    dataset.to_parquet(str(tmp_path / "x.parquet"))
    return str(tmp_path / "x.parquet")


def folder_with(tmp_path: Path, files: dict[str, bytes]) -> str:
    """A folder under ``tmp_path`` holding ``files`` (name -> content)."""
    (tmp_path / "folder").mkdir()
    for name, content in files.items():
        (tmp_path / "folder" / name).write_bytes(content)
    return str(tmp_path / "folder")


def image_dataset(pixels: np.ndarray, column: str = "picture") -> datasets.Dataset:
    """A dataset with an ``Image`` column ``column`` holding ``pixels`` (N, H, W) and labels 0..N-1."""
    ds = datasets.Dataset.from_dict({column: [Image.fromarray(p) for p in pixels], "label": list(range(len(pixels)))})
    return ds.cast_column(column, datasets.Image())


def save_pngs(folder: Path, pixels: np.ndarray, names: list[str]) -> None:
    """Write each image of ``pixels`` as a PNG at ``folder / name``."""
    for name, image in zip(names, pixels):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / name)


@pytest.fixture(scope="module")
def embedded() -> ImageData:
    return load_images()


@pytest.fixture(scope="module")
def embedded_test() -> ImageData:
    return load_images(split="test")


@pytest.fixture(scope="module")
def mnist() -> dict[str, ImageData]:
    return {split: load_images(str(MNIST), split=split) for split in ("train", "test")}


# ---------------------------------------------------------------------------------------------- real MNIST
def test_embedded_default_is_the_60000_official_training_digits(embedded):
    assert embedded.images.shape == (60000, 1, 28, 28) and embedded.images.dtype == np.uint8
    assert embedded.labels.dtype == np.int64 and np.bincount(embedded.labels).tolist() == TRAIN_COUNTS
    assert embedded.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert embedded.images.max() == 255 and embedded.images.min() == 0
    assert embedded.source == TRAIN_SOURCE
    assert (embedded.dataset_id, embedded.split) == ("ylecun/mnist", "train")
    assert np.array_equal(load_images("embedded", max_images=7).images, embedded.images[:7])


def test_embedded_test_split_is_the_10000_official_t10k_digits(embedded_test):
    assert embedded_test.images.shape == (10000, 1, 28, 28) and embedded_test.images.dtype == np.uint8
    assert embedded_test.labels.dtype == np.int64
    assert np.bincount(embedded_test.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert embedded_test.labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert embedded_test.source == TEST_SOURCE
    assert (embedded_test.dataset_id, embedded_test.split) == ("ylecun/mnist", "test")
    t10k = load_images("embedded", split="t10k", max_images=3)
    assert t10k.labels.tolist() == [7, 2, 1] and (t10k.source, t10k.split) == (TEST_SOURCE, "test")
    kept, held = split_holdout(embedded_test, 10)  # parts of a split keep its dataset id and name
    assert (kept.dataset_id, kept.split, held.dataset_id, held.split) == ("ylecun/mnist", "test") * 2


def test_embedded_images_are_fresh_copies_of_the_cached_digits():
    data = load_images(max_images=2)
    assert data.images.flags.writeable and data.labels.flags.writeable
    data.images[:] = 0
    assert load_images(max_images=2).images.any()  # what the process keeps decoded is never handed out


def test_embedded_sources_and_ids_name_no_local_path(embedded, embedded_test):
    for data in (embedded, embedded_test):
        assert "/" not in data.source and "\\" not in data.source and str(MNIST_FOLDER.parent) not in data.source
    by_path = load_images(str(MNIST_FOLDER), split="test", max_images=2)  # the shipped IDX files, given as a folder
    assert (by_path.dataset_id, by_path.split) == ("ylecun/mnist", "test")


def test_the_shipped_files_are_the_ones_its_license_lists():
    license_text = (MNIST_FOLDER / "LICENSE.md").read_text()
    assert "Yann LeCun, Corinna Cortes and Christopher J.C. Burges" in license_text
    assert "Creative Commons Attribution-Share Alike 3.0" in license_text
    for name, md5, _ in (file for files in MNIST_FILES.values() for file in files):
        assert f"| {name} | {(MNIST_FOLDER / name).stat().st_size} | {md5} |" in license_text
        assert hashlib.md5((MNIST_FOLDER / name).read_bytes()).hexdigest() == md5


def test_a_damaged_embedded_file_fails_in_one_line_naming_it_and_both_md5s(tmp_path, monkeypatch):
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(MNIST_FOLDER / name, tmp_path / name)
    damaged = tmp_path / "t10k-labels-idx1-ubyte.gz"
    content = bytearray(damaged.read_bytes())
    content[100] ^= 1
    damaged.write_bytes(bytes(content))
    actual = hashlib.md5(bytes(content)).hexdigest()
    monkeypatch.setattr("hf_ddpm.data.embedded.MNIST_FOLDER", tmp_path)
    with pytest.raises(ValueError) as error:
        load_images(split="test")
    assert str(error.value).startswith(f"{damaged} has MD5 {actual}, expected ec29112dd5afa0611ce80d1b7f02629c")
    assert "\n" not in str(error.value)


def test_the_embedded_digits_read_nothing_outside_the_package(tmp_path):
    """In a fresh process in which opening or listing anything under ../shared fails, both splits still load."""
    shared = Path(__file__).resolve().parents[2] / "shared"  # where a development checkout keeps data
    script = f"""
import json, os, sys
BLOCKED = {str(shared)!r}
def refuse(event, args):
    if event in ("open", "os.listdir", "os.scandir") and args and isinstance(args[0], (str, bytes, os.PathLike)):
        if os.path.abspath(os.fsdecode(args[0])).startswith(BLOCKED):
            raise PermissionError(f"read {{args[0]}}")
sys.addaudithook(refuse)
try:
    open(os.path.join(BLOCKED, "data", "mnist", "README.md"))
except PermissionError:
    pass
else:
    raise SystemExit("the audit hook does not block ../shared")
from hf_ddpm.data import load_images
print(json.dumps({{split: [len(data.images), data.source] for split in ("train", "test")
                  for data in [load_images(split=split)]}}))
"""
    env = {**os.environ, "PYTHONPATH": str(Path(hf_ddpm.data.__file__).parents[2])}
    command = [sys.executable, "-c", script]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {"train": [60000, TRAIN_SOURCE], "test": [10000, TEST_SOURCE]}


def test_idx_files_match_their_readme(mnist):
    train, test = mnist["train"], mnist["test"]
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.images.dtype == np.uint8 and train.labels.dtype == np.int64
    assert np.bincount(train.labels).tolist() == TRAIN_COUNTS and np.bincount(test.labels).tolist() == TEST_COUNTS
    assert train.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert test.labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert train.images.max() == 255 and train.images.min() == 0
    assert (train.source, test.source) == (f"MNIST IDX train ({MNIST})", f"MNIST IDX t10k ({MNIST})")
    assert (train.dataset_id, train.split) == ("ylecun/mnist", "train")
    assert (test.dataset_id, test.split) == ("ylecun/mnist", "test")


def test_embedded_splits_are_the_official_idx_files(mnist, embedded, embedded_test):
    for official, shipped in ((mnist["train"], embedded), (mnist["test"], embedded_test)):
        assert np.array_equal(shipped.images, official.images) and np.array_equal(shipped.labels, official.labels)


def test_official_idx_files_are_recognised_by_md5_not_by_name(tmp_path):
    for kind in ("images-idx3", "labels-idx1"):  # decompressed copies
        raw = gzip.decompress((MNIST_FOLDER / f"t10k-{kind}-ubyte.gz").read_bytes())
        (tmp_path / f"t10k-{kind}-ubyte").write_bytes(raw)
    raw_copy = load_images(str(tmp_path), split="test", max_images=3)
    assert (raw_copy.dataset_id, raw_copy.split, raw_copy.labels.tolist()) == ("ylecun/mnist", "test", [7, 2, 1])
    labels = bytearray((tmp_path / "t10k-labels-idx1-ubyte").read_bytes())
    labels[-1] = (labels[-1] + 1) % 10
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(bytes(labels))  # same name, one label changed
    changed = load_images(str(tmp_path), split="test", max_images=3)
    assert (changed.dataset_id, changed.split) == (None, None) and changed.source == f"MNIST IDX t10k ({tmp_path})"


def test_an_idx_images_file_path_finds_its_labels_and_t10k_names_the_test_split(mnist):
    data = load_images(str(MNIST / "t10k-images-idx3-ubyte.gz"), max_images=100)
    assert np.array_equal(data.images, mnist["test"].images[:100])
    assert np.array_equal(data.labels, mnist["test"].labels[:100])
    assert (data.dataset_id, data.split) == ("ylecun/mnist", "test")
    assert np.array_equal(load_images(str(MNIST), split="t10k", max_images=3).labels, [7, 2, 1])


def test_idx_gzipped_or_raw_with_and_without_labels(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (3, 4, 4), dtype=np.uint8)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(2051, pixels)))
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(2049, np.array([3, 1, 2]))))
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(2051, pixels[::-1]))
    train = load_images(str(tmp_path), resolution=4)
    assert np.array_equal(train.images[:, 0], pixels) and train.labels.tolist() == [3, 1, 2]
    test = load_images(str(tmp_path), split="test", resolution=4)
    assert np.array_equal(test.images[:, 0], pixels[::-1]) and test.labels is None
    assert (train.dataset_id, train.split, test.dataset_id, test.split) == (None, None, None, None)  # not MNIST's


# ---------------------------------------------------------------------------------------------- conversion
def test_conversion_to_channels_and_resolution_stays_uint8(tmp_path, embedded):
    gray3 = load_images(channels=3, max_images=4)
    assert gray3.images.shape == (4, 3, 28, 28)
    assert all(np.array_equal(gray3.images[:, c], embedded.images[:4, 0]) for c in range(3))
    resized = load_images(resolution=32, max_images=4)
    assert resized.images.shape == (4, 1, 32, 32) and resized.images.dtype == np.uint8
    save_pngs(tmp_path, [np.full((10, 20, 3), (255, 0, 0), np.uint8)], ["red.png"])
    red = load_images(str(tmp_path), resolution=8)
    # L = 0.299 R
    assert red.images.shape == (1, 1, 8, 8) and red.images.dtype == np.uint8 and (red.images == 76).all()
    assert (load_images(str(tmp_path), resolution=8, channels=3).images[0].reshape(3, -1).T == (255, 0, 0)).all()


def test_center_crop_keeps_the_middle_and_plain_resize_squashes(tmp_path):
    banded = np.zeros((10, 20), np.uint8)
    banded[:, :5] = banded[:, 15:] = 255
    save_pngs(tmp_path, [banded], ["banded.png"])
    cropped = load_images(str(tmp_path), resolution=10, center_crop=True).images
    squashed = load_images(str(tmp_path), resolution=10).images
    assert cropped.shape == squashed.shape == (1, 1, 10, 10)
    assert (cropped == 0).all()
    assert squashed[0, 0, :, 0].tolist() == [255] * 10 and squashed[0, 0, :, 5].tolist() == [0] * 10


# ---------------------------------------------------------------------------------------------- folders
def test_image_folder_round_trip_nested_sorted_hidden_ignored_corrupt_skipped(tmp_path, caplog):
    pixels = np.random.default_rng(1).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    save_pngs(tmp_path, pixels, ["a.png", "b/c.png", "b/d/e.PNG"])
    save_pngs(tmp_path, pixels[:1], [".cache/x.png"])
    (tmp_path / "b" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "notes.txt").write_text("not an image")
    with caplog.at_level(logging.WARNING, logger="hf_ddpm.data"):
        data = load_images(str(tmp_path))
    assert np.array_equal(data.images[:, 0], pixels) and data.labels is None
    assert data.source == f"image folder {tmp_path}"
    assert "broken.png" in caplog.text and "skipped 1 unreadable image(s), kept 3" in caplog.text
    assert np.array_equal(load_images(str(tmp_path), max_images=2).images[:, 0], pixels[:2])


def test_exif_orientation_is_applied_like_datasets_does(tmp_path):
    pixels = np.arange(16, dtype=np.uint8).reshape(4, 4) * 16
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the stored image must be turned 90 degrees clockwise to be upright
    Image.fromarray(pixels).save(tmp_path / "rotated.png", exif=exif)
    assert np.array_equal(load_images(str(tmp_path), resolution=4).images[0, 0], np.rot90(pixels, k=-1))


def test_image_folder_split_subfolders(tmp_path):
    pixels = np.random.default_rng(2).integers(0, 256, (3, 8, 8), dtype=np.uint8)
    save_pngs(tmp_path, pixels, ["train/0.png", "train/1.png", "test/0.png"])
    assert np.array_equal(load_images(str(tmp_path), resolution=8).images[:, 0], pixels[:2])
    assert np.array_equal(load_images(str(tmp_path), split="test", resolution=8).images[:, 0], pixels[2:])
    with pytest.raises(ValueError, match=r"has the split folders \['test', 'train'\], but no 'validation'"):
        load_images(str(tmp_path), split="validation")


# ---------------------------------------------------------------------------------------------- datasets
def test_saved_dataset_with_an_unusual_image_column_is_auto_detected(tmp_path):
    pixels = np.random.default_rng(3).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    ds = image_dataset(pixels)
    ds = ds.add_column("caption", ["a", "b", "c", "d"]).select_columns(["caption", "label", "picture"])
    ds.save_to_disk(str(tmp_path / "ds"))
    data = load_images(str(tmp_path / "ds"))
    assert np.array_equal(data.images[:, 0], pixels)
    assert data.labels.tolist() == [0, 1, 2, 3] and data.labels.dtype == np.int64
    datasets.DatasetDict({"train": ds, "test": ds.select([2, 3])}).save_to_disk(str(tmp_path / "dict"))
    assert np.array_equal(load_images(str(tmp_path / "dict"), split="test").images[:, 0], pixels[2:])


def test_parquet_file_and_folder_of_hub_style_shards(tmp_path):
    pixels = np.random.default_rng(4).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    image_dataset(pixels[:3], "image").to_parquet(str(tmp_path / "mnist" / "train-00000-of-00001.parquet"))
    image_dataset(pixels[3:], "image").to_parquet(str(tmp_path / "mnist" / "test-00000-of-00001.parquet"))
    single = load_images(str(tmp_path / "mnist" / "train-00000-of-00001.parquet"))
    assert np.array_equal(single.images[:, 0], pixels[:3]) and single.labels.tolist() == [0, 1, 2]
    test = load_images(str(tmp_path / "mnist"), split="test")
    assert np.array_equal(test.images[:, 0], pixels[3:]) and test.source == f"{tmp_path / 'mnist'}[test]"


def test_pixel_array_column_is_auto_detected_and_rgb_arrays_convert(tmp_path):
    gray = np.random.default_rng(5).integers(0, 256, (3, 6, 6), dtype=np.uint8)
    datasets.Dataset.from_dict({"id": ["x", "y", "z"], "pixels": list(gray)}).save_to_disk(str(tmp_path / "gray"))
    data = load_images(str(tmp_path / "gray"), resolution=6)
    assert np.array_equal(data.images[:, 0], gray) and data.labels is None
    rgb = np.stack([gray, gray, gray], axis=-1)  # (N, H, W, 3): converting to gray gives the gray values back
    datasets.Dataset.from_dict({"pixels": list(rgb)}).save_to_disk(str(tmp_path / "rgb"))
    assert np.array_equal(load_images(str(tmp_path / "rgb"), resolution=6).images[:, 0], gray)


def test_a_damaged_image_in_a_dataset_is_skipped_and_labels_stay_aligned(tmp_path, caplog):
    pixels = np.random.default_rng(6).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    ds = image_dataset(pixels).cast_column("picture", datasets.Image(decode=False))
    rows = ds.to_list()
    rows[1]["picture"] = {"bytes": b"\x89PNG garbage", "path": "broken.png"}
    datasets.Dataset.from_list(rows, features=ds.features).save_to_disk(str(tmp_path / "ds"))
    with caplog.at_level(logging.WARNING, logger="hf_ddpm.data"):
        data = load_images(str(tmp_path / "ds"))
    assert np.array_equal(data.images[:, 0], pixels[[0, 2]]) and data.labels.tolist() == [0, 2]
    assert "row 1 (broken.png)" in caplog.text


# ---------------------------------------------------------------------------------------------- tensors and splits
def test_tensor_dataset_values_and_batches():
    images = np.arange(256, dtype=np.uint8).reshape(4, 1, 8, 8)
    ds = ImageTensorDataset(images)
    assert len(ds) == 4 and ds[1].shape == (1, 8, 8) and ds[1].dtype == torch.float32
    assert torch.equal(ds[:].flatten(), torch.arange(256, dtype=torch.float32) / 127.5 - 1)
    assert ds[:].min() == -1 and ds[:].max() == 1
    assert np.array_equal(images, np.arange(256, dtype=np.uint8).reshape(4, 1, 8, 8))  # the source is never modified
    with pytest.raises(ValueError, match=r"^ImageTensorDataset needs uint8 images \(N, C, H, W\), got "):
        ImageTensorDataset(images.astype(np.float32))


def test_split_holdout_is_a_deterministic_partition():
    ids = np.arange(100)
    data = ImageData(np.broadcast_to(ids[:, None, None, None], (100, 1, 2, 2)).astype(np.uint8), ids * 7, "digits")
    train, held = split_holdout(data, 10, seed=3)
    train_ids, held_ids = train.images[:, 0, 0, 0].astype(np.int64), held.images[:, 0, 0, 0].astype(np.int64)
    assert len(train_ids) == 90 and len(held_ids) == 10  # (each image holds its own index)
    assert sorted(np.concatenate([train_ids, held_ids]).tolist()) == ids.tolist()  # disjoint, and together all
    assert np.all(np.diff(held_ids) > 0) and np.all(np.diff(train_ids) > 0)  # original order kept
    assert np.array_equal(held.labels, held_ids * 7) and np.array_equal(train.labels, train_ids * 7)
    assert np.array_equal(split_holdout(data, 10, seed=3)[1].images, held.images)
    assert not np.array_equal(split_holdout(data, 10, seed=4)[1].images, held.images)
    assert (train.source, held.source) == ("digits", "digits, 10 held out (seed 3)")
    with pytest.raises(ValueError, match="Cannot hold out 100 of 100 images: hold out between 1 and 99"):
        split_holdout(data, 100)
    with pytest.raises(ValueError, match="Cannot hold out 0 of 100"):
        split_holdout(data, 0)


# ---------------------------------------------------------------------------------------------- bad input
SMALL = np.zeros((3, 2, 2), np.uint8)
TINY_IMAGES = np.zeros((2, 4, 4), np.uint8)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"channels": 2}, r"channels must be 1 \(grayscale\) or 3 \(RGB\), got 2"),
        ({"resolution": 0}, "resolution must be a positive number of pixels, got 0"),
        ({"max_images": 0}, r"max_images must be positive \(or None for all images\), got 0"),
        (
            {"split": "validation"},
            r"The embedded MNIST has the splits 'train' and 'test' \('t10k'\), not 'validation'",
        ),
    ],
)
def test_bad_options_fail_with_a_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_images(**kwargs)


@pytest.mark.parametrize(
    "content, message",
    [
        (gzip.compress(idx_bytes(1234, SMALL)), "has IDX magic 1234, expected 2051 .*not an MNIST images file"),
        (
            gzip.compress(idx_bytes(2051, SMALL)[:-1]),
            r"holds 11 data bytes, but its header promises 12 for shape \(3, 2,",
        ),
        (gzip.compress(idx_bytes(2051, SMALL))[:-10], "is a damaged or truncated gzip file"),
        (idx_bytes(2051, SMALL)[:10], r"ends inside its IDX header \(10 bytes\): truncated or corrupt"),
    ],
    ids=["wrong_magic", "truncated_data", "truncated_gzip", "truncated_header"],
)
def test_malformed_idx_files_fail_with_a_message(tmp_path, content, message):
    (tmp_path / "x-images-idx3-ubyte.gz").write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load_images(str(tmp_path / "x-images-idx3-ubyte.gz"))


@pytest.mark.parametrize(
    "make_source, kwargs, message",
    [
        (
            lambda d: folder_with(
                d,
                {
                    "train-images-idx3-ubyte.gz": gzip.compress(idx_bytes(2051, SMALL)),
                    "train-labels-idx1-ubyte.gz": gzip.compress(idx_bytes(2049, np.zeros(2))),
                },
            ),
            {},
            "has 2 labels for the 3 images",
        ),
        (
            lambda d: folder_with(d, {"train-images-idx3-ubyte.gz": gzip.compress(idx_bytes(2051, SMALL))}),
            {"split": "validation"},
            r"holds MNIST IDX files, with splits 'train' and 'test' \('t10k'\), not 'validation'",
        ),
        (
            lambda d: folder_with(d, {"train-images-idx3-ubyte.gz": gzip.compress(idx_bytes(2051, SMALL))}),
            {"split": "test"},
            r"has no t10k-images-idx3-ubyte.gz .*its IDX files are \['train-images-idx3-ubyte.gz'\]",
        ),
        (
            lambda d: (
                folder_with(d, {"train-labels-idx1-ubyte.gz": gzip.compress(idx_bytes(2049, np.zeros(2)))})
                + "/train-labels-idx1-ubyte.gz"
            ),
            {},
            "is an IDX labels file: pass the images file",
        ),
        (
            lambda d: folder_with(d, {}),
            {},
            "holds no image files .*, MNIST IDX files or data files: nothing to train on",
        ),
        (
            lambda d: folder_with(d, {"a.jpg": b"xx", "b.png": b"\x89PNG"}),
            {},
            r"none of its 2 image\(s\) could be decoded \(e.g. .*a.jpg\): nothing to train on",
        ),
        (
            lambda d: folder_with(d, {"notes.txt": b"hello"}) + "/notes.txt",
            {},
            "is neither an MNIST IDX images file .* nor a data file",
        ),
        (
            lambda d: str(d / "nowhere"),
            {},
            "nowhere does not exist. Pass an existing folder or file, 'embedded' or a Hub",
        ),
    ],
    ids=[
        "idx_label_count",
        "idx_unknown_split",
        "idx_missing_split",
        "idx_labels_file",
        "empty_folder",
        "only_corrupt_images",
        "unsupported_file",
        "unknown_path",
    ],
)
def test_bad_files_and_folders_fail_with_a_message(tmp_path, make_source, kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_images(make_source(tmp_path), **kwargs)


@pytest.mark.parametrize(
    "make_source, kwargs, message",
    [
        (
            lambda d: saved(d, datasets.Dataset.from_dict({"text": ["a"], "label": [0]})),
            {},
            r"no image column \(columns: \['text', 'label'\];.*name it with image_column \(--image_column\)",
        ),
        (
            lambda d: saved(d, image_dataset(TINY_IMAGES)),
            {"image_column": "img"},
            r"no column 'img'; its columns are \['picture', 'label'\]",
        ),
        (
            lambda d: saved(d, image_dataset(TINY_IMAGES)),
            {"image_column": "label"},
            r"column 'label' holds Value\('int64'\), not images",
        ),
        (
            lambda d: saved(d, image_dataset(TINY_IMAGES).add_column("name", ["a", "b"])),
            {"label_column": "name"},
            r"label column 'name' holds object values, not integer class ids: pass a column of integers",
        ),
        (
            lambda d: saved(d, datasets.Dataset.from_dict({"pixels": [np.full((4, 4), 0.5)]})),
            {},
            r"Row 0 of column 'pixels' .* holds float64 values in \[0.5, 0.5\]; pixel arrays must hold 8-bit values",
        ),
        (
            lambda d: saved(d, datasets.DatasetDict({"train": image_dataset(TINY_IMAGES)})),
            {"split": "test"},
            r"has the splits \['train'\], not 'test'",
        ),
        (lambda d: saved(d, datasets.Dataset.from_dict({"image": []})), {}, "is an empty saved dataset"),
        (
            lambda d: saved(
                d,
                datasets.DatasetDict(
                    {"train": image_dataset(TINY_IMAGES), "test": image_dataset(TINY_IMAGES).select([])}
                ),
            ),
            {},
            "or has an empty split",
        ),
        (
            lambda d: parquet(d, image_dataset(TINY_IMAGES).select([])),
            {},
            r"Could not load .*x.parquet as a dataset .*corresponds to no data",
        ),
    ],
    ids=[
        "no_image_column",
        "image_column_missing",
        "image_column_not_images",
        "label_column_not_integers",
        "not_8_bit_arrays",
        "missing_split",
        "empty_saved_dataset",
        "empty_saved_split",
        "empty_data_file",
    ],
)
def test_bad_datasets_fail_with_a_message(tmp_path, make_source, kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_images(make_source(tmp_path), **kwargs)


def test_an_unreachable_hub_dataset_says_how_to_work_offline(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # fail at once instead of retrying the network
    with pytest.raises(
        ValueError,
        match=r"Could not load 'hf-ddpm-tests/no-such-dataset' .*as a Hub dataset: "
        r"ConnectionError.*HF_HUB_OFFLINE=1",
    ):
        load_images("hf-ddpm-tests/no-such-dataset")


def test_a_dataset_with_no_rows_is_refused_before_looking_for_columns():
    empty = datasets.Dataset.from_dict({"image": []})  # datasets refuses to load empty files; this guards the rest
    with pytest.raises(ValueError, match=r"in memory is empty \(0 rows\): nothing to train on"):
        read_dataset(empty, LoadOptions(), "in memory")


def test_bad_arrays_for_the_tensor_dataset_and_image_data():
    with pytest.raises(ValueError, match=r"needs uint8 images \(N, C, H, W\), got float32 array of shape \(2, 1, 4,"):
        ImageTensorDataset(np.zeros((2, 1, 4, 4), np.float32))
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\), got \(3,\)"):
        ImageData(np.zeros((2, 1, 4, 4), np.uint8), np.zeros(3, np.int64), "x")
