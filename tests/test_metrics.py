"""The sample-quality metric (hf_ddpm.metrics): the Fréchet distance's closed forms, and the embedded MNIST
classifier on real digits."""

import numpy as np
import pytest
import torch

from hf_ddpm.data import ImageTensorDataset, load_images
from hf_ddpm.metrics import frechet_distance, mnist_classifier, sample_quality

pytestmark = pytest.mark.usefixtures("one_thread")


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 5))
    sigma = a @ a.T + np.eye(5)
    mu = rng.normal(size=5)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)
    s1, s2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 1.0, 0.25])
    m1, m2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    closed = ((m1 - m2) ** 2).sum() + ((np.sqrt(np.diag(s1)) - np.sqrt(np.diag(s2))) ** 2).sum()
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(closed, rel=1e-10)


def test_classifier_recognises_real_digits_and_the_metric_separates_digits_from_noise():
    test = load_images(split="test")  # the official t10k digits embedded in hf_ddpm
    images = ImageTensorDataset(test.images)[:]
    classifier = mnist_classifier()
    with torch.no_grad():
        accuracy = (classifier(images[:1000]).argmax(1).numpy() == test.labels[:1000]).mean()
    assert accuracy >= 0.97
    real = sample_quality(images[:1000], images[-2000:], classifier)
    noise = sample_quality(torch.rand(1000, 1, 28, 28) * 2 - 1, images[-2000:], classifier)
    assert real.frechet_distance < 0.1 * noise.frechet_distance
    assert real.mean_confidence > 0.9 and real.class_kl_from_uniform < 0.02
    assert 0 <= noise.mean_confidence <= 1


@pytest.mark.parametrize("samples, reference, name", [(1, 4, "samples"), (4, 1, "reference")])
def test_sample_quality_refuses_a_single_image_whose_covariance_is_undefined(samples, reference, name):
    """One reference image made np.cov divide by zero and the eigen-solver fail ("Eigenvalues did not converge")."""
    with pytest.raises(ValueError, match=f"needs at least 2 {name} for a covariance, got 1: score more images."):
        sample_quality(torch.zeros(samples, 1, 28, 28), torch.zeros(reference, 1, 28, 28))
