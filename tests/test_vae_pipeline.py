"""VAEPipeline (hf_ddpm.pipelines.vae): its inputs, its bound terms for evaluate_bound, sampling, save and load."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch

from helpers import mnist_like_pixels, tiny_vae
from hf_ddpm import GaussianVAE, VAEPipeline
from hf_ddpm.distributions import nats_to_bits_per_dim
from hf_ddpm.evaluation import BoundOptions

pytestmark = pytest.mark.usefixtures("one_thread")


def test_uint8_and_pil_inputs_give_the_float_input_bounds():
    pipe = VAEPipeline(tiny_vae(num_latent_layers=2))
    pixels = mnist_like_pixels(2)
    seeded = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    as_float = pipe.elbo(pixels[:, None].float() / 127.5 - 1, num_samples=2, generator=seeded())
    for images in (pixels.numpy(), pixels, [PIL.Image.fromarray(p) for p in pixels.numpy()]):
        elbo = pipe.elbo(images, num_samples=2, generator=seeded())
        assert torch.equal(elbo.negative_elbo_nats, as_float.negative_elbo_nats)
    assert torch.equal(
        pipe.iwae(pixels.numpy(), 3, generator=seeded()).bits_per_dim,
        pipe.iwae(pixels[:, None].float() / 127.5 - 1, 3, generator=seeded()).bits_per_dim,
    )


def test_bound_terms_are_the_models_elbo_and_iwae_in_bits_per_dim():
    pipe = VAEPipeline(tiny_vae(num_latent_layers=2))
    assert pipe.image_channels == 1
    x = mnist_like_pixels(3)[:, None].float() / 127.5 - 1
    batch = pipe.bound_terms(x, BoundOptions(elbo_samples=2, iwae_samples=4), torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(1)  # the same draws, in the same order: the ELBO's, then the IWAE's
    elbo = pipe.vae.elbo(x, num_samples=2, generator=generator)
    iwae = pipe.vae.iwae(x, num_samples=4, generator=generator)
    assert list(batch.terms) == ["reconstruction", "kl"]
    assert torch.equal(batch.terms["reconstruction"], nats_to_bits_per_dim(elbo.reconstruction_nats, 784))
    assert torch.equal(batch.terms["kl"], nats_to_bits_per_dim(elbo.kl_nats + elbo.layer_nats.sum(dim=1), 784))
    torch.testing.assert_close(batch.terms["reconstruction"] + batch.terms["kl"], elbo.bits_per_dim, rtol=1e-6, atol=0)
    assert torch.equal(batch.iwae, iwae.bits_per_dim)
    assert batch.estimator == "ELBO with 2 sample(s) of z; IWAE with K=4"
    without = pipe.bound_terms(x, BoundOptions(iwae_samples=0), torch.Generator().manual_seed(1))
    assert without.iwae is None and without.estimator == "ELBO with 1 sample(s) of z"


def test_save_load_round_trip_gives_identical_samples(tmp_path):
    pipe = VAEPipeline(tiny_vae(num_latent_layers=2))
    first = pipe(batch_size=3, generator=torch.Generator().manual_seed(5), output_type="pt").images
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["vae"] == ["hf_ddpm", "GaussianVAE"]
    assert (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = VAEPipeline.from_pretrained(tmp_path)
    assert type(loaded.vae) is GaussianVAE and loaded.vae.config.num_latent_layers == 2
    assert torch.equal(
        first, loaded(batch_size=3, generator=torch.Generator().manual_seed(5), output_type="pt").images
    )
    assert first.shape == (3, 1, 28, 28) and 0 <= first.min() and first.max() <= 1
    as_numpy = loaded(batch_size=3, generator=torch.Generator().manual_seed(5), output_type="np").images
    assert np.array_equal(as_numpy, first.permute(0, 2, 3, 1).numpy())
    assert loaded(batch_size=2, output_type="pil").images[0].size == (28, 28)
    (as_tuple,) = loaded(batch_size=3, generator=torch.Generator().manual_seed(5), output_type="pt", return_dict=False)
    assert torch.equal(as_tuple, first)
    with pytest.raises(ValueError, match="output_type must be 'pil', 'np' or 'pt', got 'latent'"):
        loaded(output_type="latent")


def test_an_unknown_output_type_is_rejected():
    with pytest.raises(ValueError, match="output_type"):
        VAEPipeline(tiny_vae())(output_type="latent")
