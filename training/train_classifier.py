#!/usr/bin/env python
"""Train the small MNIST classifier whose features hf_ddpm.metrics measures sample quality in.

    python training/train_classifier.py [--data FOLDER_OF_MNIST_IDX_FILES] [--epochs 2]

Trains on MNIST *training* digits (the full IDX training set when --data points at it, else the 60,000 embedded
digits), reports accuracy on t10k when available, and writes src/hf_ddpm/assets/mnist_classifier.safetensors with a
JSON note of how it was made.
"""

from __future__ import annotations

import argparse
import json

import torch
from safetensors.torch import save_file
from torch.nn import functional as F

from hf_ddpm.data import ImageTensorDataset, load_images
from hf_ddpm.metrics import WEIGHTS, MNISTClassifier


def accuracy(model: MNISTClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        predictions = torch.cat([model(b).argmax(1) for b in images.split(1000)])
    return float((predictions == labels).double().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data", default=None, help="folder with the MNIST IDX files; default: the 60,000 embedded training digits"
    )
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    train = load_images(args.data, split="train")
    images, labels = ImageTensorDataset(train.images)[:], torch.from_numpy(train.labels)
    model = MNISTClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for epoch in range(args.epochs):
        order = torch.randperm(len(images))
        for batch in order.split(128):
            optimizer.zero_grad()
            F.cross_entropy(model(images[batch]), labels[batch]).backward()
            optimizer.step()
        print(f"epoch {epoch}: train accuracy {accuracy(model.eval(), images, labels):.4f}")
        model.train()
    model.eval()
    note = {"trained_on": train.source, "num_train": len(images), "epochs": args.epochs, "seed": args.seed}
    if args.data is not None:
        test = load_images(args.data, split="test")
        note["t10k_accuracy"] = accuracy(model, ImageTensorDataset(test.images)[:], torch.from_numpy(test.labels))
        print(f"t10k accuracy {note['t10k_accuracy']:.4f}")
    WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(WEIGHTS))
    WEIGHTS.with_suffix(".json").write_text(json.dumps(note, indent=2))


if __name__ == "__main__":
    main()
