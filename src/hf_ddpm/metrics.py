"""Sample quality without Inception weights: a Fréchet distance in the feature space of a small MNIST classifier.

This is NOT Inception-FID: the features come from :class:`MNISTClassifier`, trained by
``training/train_classifier.py`` on MNIST training digits, so the numbers are comparable only with other numbers of
this same metric (same classifier weights). Besides the distance, :func:`sample_quality` reports the classifier's
mean confidence on the samples and the KL divergence of the predicted-class histogram from uniform (mode coverage).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

WEIGHTS = Path(__file__).parent / "assets" / "mnist_classifier.safetensors"
#: (C, H, W) of the images the classifier, and so every metric here, is defined for: MNIST's grayscale 28x28.
MNIST_SHAPE = (1, 28, 28)


class MNISTClassifier(nn.Module):
    """conv(32) -> pool -> conv(64) -> pool -> linear(128) features -> linear(10) logits, on (N, 1, 28, 28) in
    [-1, 1]."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.features = nn.Linear(64 * 7 * 7, 128)
        self.head = nn.Linear(128, 10)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The 128-dimensional penultimate features the Fréchet distance is computed in, (N, 128)."""
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return F.relu(self.features(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def mnist_classifier() -> MNISTClassifier:
    """The classifier with the weights shipped in the package (see training/train_classifier.py)."""
    from safetensors.torch import load_file

    if not WEIGHTS.is_file():
        raise FileNotFoundError(f"{WEIGHTS} is missing: run `python training/train_classifier.py` to train it.")
    model = MNISTClassifier()
    model.load_state_dict(load_file(str(WEIGHTS)))
    return model.eval()


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance of N(mu1, sigma1) and N(mu2, sigma2):
    ||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1^(1/2) sigma2 sigma1^(1/2))^(1/2)), in float64 via symmetric
    eigen-decompositions (so no complex square roots)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    values, vectors = np.linalg.eigh(sigma1)
    root1 = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    middle = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    return float(
        ((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(np.clip(middle, 0, None)).sum()
    )


@dataclass
class SampleQuality:
    """Sample-quality numbers of a set of generated digits against reference digits.

    Attributes:
        frechet_distance: in the MNIST classifier's 128-d feature space (not Inception-FID).
        mean_confidence: mean max-softmax probability of the classifier on the samples (1 = every sample is a
            confidently recognised digit).
        class_kl_from_uniform: KL(histogram of predicted classes || uniform over 10), nats; 0 = every digit equally
            often.
        num_samples: how many generated images were scored.
    """

    frechet_distance: float
    mean_confidence: float
    class_kl_from_uniform: float
    num_samples: int


@torch.no_grad()
def sample_quality(
    samples: torch.Tensor, reference: torch.Tensor, classifier: MNISTClassifier | None = None
) -> SampleQuality:
    """Score ``samples`` against ``reference``; both float (N, 1, 28, 28) in [-1, 1], N >= 2 (a covariance each).
    Raises ``ValueError`` for fewer images and for images of another shape (RGB, another size): an MNIST
    classifier's features say nothing about them."""
    for name, images in (("samples", samples), ("reference", reference)):
        if tuple(images.shape[1:]) != MNIST_SHAPE:
            raise ValueError(
                f"sample_quality scores 1x28x28 digits with an MNIST classifier; the {name} have shape "
                f"{tuple(images.shape)}: there is no such metric for other images."
            )
        if len(images) < 2:
            raise ValueError(
                f"sample_quality needs at least 2 {name} for a covariance, got {len(images)}: score more images."
            )
    classifier = classifier or mnist_classifier()
    features = [
        torch.cat([classifier.embed(b) for b in x.float().split(500)]).double().numpy() for x in (samples, reference)
    ]
    stats = [(f.mean(axis=0), np.cov(f, rowvar=False)) for f in features]
    probabilities = torch.cat([F.softmax(classifier(b), dim=1) for b in samples.float().split(500)])
    histogram = torch.bincount(probabilities.argmax(1), minlength=10).double() / len(samples)
    present = histogram > 0
    kl = float((histogram[present] * (histogram[present] * 10).log()).sum())
    return SampleQuality(
        frechet_distance=frechet_distance(*stats[0], *stats[1]),
        mean_confidence=float(probabilities.max(1).values.mean()),
        class_kl_from_uniform=kl,
        num_samples=len(samples),
    )
