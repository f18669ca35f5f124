"""The training images as shuffled batches drawn on the training device: no DataLoader, no per-step host work."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from ..image_utils import uint8_to_model_range
from .images import check_uint8_images


class ShuffledBatches:
    """uint8 training images (N, C, H, W) held once on ``device`` (MNIST: 47 MB), served as batches of float32
    images in [-1, 1] (x = k / 127.5 - 1).

    Each epoch draws one permutation of the N images from a generator seeded by (``seed``, epoch), the same in every
    process, and cuts it into ``len(self) * num_processes`` batches of ``batch_size`` (the remainder is dropped:
    every batch is full and every process takes as many); process r takes batches r, r + P, r + 2P, ... of it, so the
    processes of one run never share an image within an epoch. Random horizontal flips, if asked, are drawn from the
    same generator, one per image and epoch. :meth:`epoch` can start at any batch: a resumed run takes exactly the
    batches the uninterrupted run would have taken.

    Args:
        images: uint8 (N, C, H, W).
        batch_size: images per batch (per process).
        device: where the images live and the batches are made.
        seed: the run's seed.
        process_index, num_processes: this process and how many share the data (``accelerator.process_index`` and
            ``accelerator.num_processes``).
        random_flip: flip each image horizontally with probability 1/2.
    """

    def __init__(
        self,
        images: np.ndarray,
        batch_size: int,
        device: torch.device | str,
        seed: int,
        process_index: int = 0,
        num_processes: int = 1,
        random_flip: bool = False,
    ):
        check_uint8_images(images, "ShuffledBatches")
        if len(images) < batch_size * num_processes:
            raise ValueError(
                f"{len(images)} training images are fewer than one global batch ({batch_size} x {num_processes} "
                "processes): lower --train_batch_size."
            )
        self.images = torch.from_numpy(np.ascontiguousarray(images)).to(device)
        self.batch_size, self.seed, self.random_flip = batch_size, seed, random_flip
        self.process_index, self.num_processes = process_index, num_processes

    def __len__(self) -> int:
        """Batches per process per epoch."""
        return len(self.images) // (self.batch_size * self.num_processes)

    def epoch_indices(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(this process's image indices of ``epoch``, (len(self), batch_size) on the device; the flip of every
        image of the data set in that epoch, or None without ``random_flip``)."""
        state = np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0]
        generator = torch.Generator().manual_seed(int(state))
        order = torch.randperm(len(self.images), generator=generator)
        flips = torch.rand(len(self.images), generator=generator) < 0.5 if self.random_flip else None
        batches = order[: len(self) * self.num_processes * self.batch_size]
        mine = batches.view(len(self), self.num_processes, self.batch_size)[:, self.process_index]
        device = self.images.device
        return mine.to(device), None if flips is None else flips.to(device)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[torch.Tensor]:
        """This process's batches of ``epoch`` from batch ``start`` on, each (batch_size, C, H, W) float32."""
        indices, flips = self.epoch_indices(epoch)
        for batch in indices[start:]:
            images = uint8_to_model_range(self.images[batch])
            if flips is not None:
                images = torch.where(flips[batch].view(-1, 1, 1, 1), images.flip(-1), images)
            yield images
