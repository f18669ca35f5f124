"""ShuffledBatches: every process of a run takes its own share of each epoch's permutation, the same permutation in
every process, full batches only, and a resumed epoch takes exactly the batches the uninterrupted one would."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_ddpm.data import ShuffledBatches
from hf_ddpm.image_utils import uint8_to_model_range


def numbered_images(n: int) -> np.ndarray:
    """n 1x2x3 uint8 images, image i filled with i (so a batch names its images), the right half brighter, so a
    horizontal flip shows."""
    images = np.repeat(np.arange(n, dtype=np.uint8)[:, None, None, None], 6, axis=1).reshape(n, 1, 2, 3)
    images[..., 2] += 100
    return images


def image_ids(batch: torch.Tensor) -> list[int]:
    return [round(v) for v in ((batch[:, 0, 0, :].amin(-1) + 1) * 127.5).tolist()]


@pytest.mark.parametrize("num_processes", [1, 2, 3])
def test_processes_share_one_permutation_and_never_an_image_within_an_epoch(num_processes):
    n, batch = 50, 4
    shares = [
        [image_ids(b) for b in ShuffledBatches(numbered_images(n), batch, "cpu", 7, rank, num_processes).epoch(3)]
        for rank in range(num_processes)
    ]
    per_process = n // (batch * num_processes)
    assert all(len(share) == per_process and all(len(b) == batch for b in share) for share in shares)
    seen = [i for share in shares for b in share for i in b]
    assert len(seen) == len(set(seen)) == per_process * batch * num_processes
    # the batches of all processes, interleaved, are the first images of one permutation of the epoch
    interleaved = [i for step in zip(*shares) for b in step for i in b]
    order = ShuffledBatches(numbered_images(n), batch * num_processes, "cpu", 7).epoch_indices(3)[0].reshape(-1)
    assert interleaved == order[: len(interleaved)].tolist()


def test_each_epoch_and_seed_has_its_own_order_and_an_epoch_resumes_exactly():
    data = ShuffledBatches(numbered_images(40), 4, "cpu", seed=1)
    first, again = [image_ids(b) for b in data.epoch(0)], [image_ids(b) for b in data.epoch(0)]
    assert first == again and sorted(i for b in first for i in b) == list(range(40))
    assert first != [image_ids(b) for b in data.epoch(1)]
    assert first != [image_ids(b) for b in ShuffledBatches(numbered_images(40), 4, "cpu", seed=2).epoch(0)]
    assert [image_ids(b) for b in data.epoch(0, start=6)] == first[6:]


def test_batches_are_the_images_in_model_range_and_flips_are_per_image():
    images = numbered_images(64)
    plain = ShuffledBatches(images, 8, "cpu", seed=0)
    indices = plain.epoch_indices(0)[0]
    for batch, index in zip(plain.epoch(0), indices):
        assert torch.equal(batch, uint8_to_model_range(torch.from_numpy(images[index.numpy()])))
    flipped = [b for b in ShuffledBatches(images, 8, "cpu", seed=0, random_flip=True).epoch(0)]
    is_flipped = torch.cat([b[:, 0, 0, 0] > b[:, 0, 0, -1] for b in flipped])
    assert 0 < is_flipped.sum() < len(is_flipped)  # some images flipped, some not
    for batch, plain_batch in zip(flipped, plain.epoch(0)):
        for image, original in zip(batch, plain_batch):
            assert torch.equal(image, original) or torch.equal(image, original.flip(-1))
    assert np.array_equal(images, numbered_images(64))  # the source is never modified


def test_too_few_images_for_one_global_batch_is_one_line():
    with pytest.raises(ValueError, match=r"^10 training images are fewer than one global batch \(4 x 3 processes\)"):
        ShuffledBatches(numbered_images(10), 4, "cpu", 0, num_processes=3)
    with pytest.raises(ValueError, match=r"^ShuffledBatches needs uint8 images \(N, C, H, W\), got "):
        ShuffledBatches(numbered_images(10)[0], 4, "cpu", 0)
