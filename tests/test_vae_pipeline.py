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
    options = BoundOptions(elbo_samples=2, iwae_samples=3)
    as_float = pipe.elbo(pixels[:, None].float() / 127.5 - 1, options=options, generator=seeded())
    for images in (pixels.numpy(), pixels, [PIL.Image.fromarray(p) for p in pixels.numpy()]):
        bound = pipe.elbo(images, options=options, generator=seeded())
        for name, values in as_float.per_image_terms.items():
            assert torch.equal(bound.per_image_terms[name], values), name
        assert torch.equal(bound.per_image_iwae, as_float.per_image_iwae)


def test_elbo_is_the_models_elbo_with_one_draw_of_z_by_default():
    pipe = VAEPipeline(tiny_vae(num_latent_layers=2))
    pipe.set_progress_bar_config(disable=True)
    x = mnist_like_pixels(3)[:, None].float() / 127.5 - 1
    bound = pipe.elbo(x, generator=torch.Generator().manual_seed(2))
    elbo = pipe.vae.elbo(x, num_samples=1, generator=torch.Generator().manual_seed(2))
    assert bound.per_image_iwae is None and bound.iwae_bits_per_dim is None
    assert bound.estimator == "ELBO with 1 sample(s) of z"
    assert torch.equal(
        bound.per_image_terms["reconstruction"], nats_to_bits_per_dim(elbo.reconstruction_nats, 784).double()
    )
    kl = nats_to_bits_per_dim(elbo.kl_nats + elbo.layer_nats.sum(dim=1), 784)
    assert torch.equal(bound.per_image_terms["kl"], kl.double())
    torch.testing.assert_close(bound.per_image, elbo.bits_per_dim.double(), rtol=1e-6, atol=0)
    with_iwae = pipe.elbo(x, options=BoundOptions(iwae_samples=4), generator=torch.Generator().manual_seed(2))
    generator = torch.Generator().manual_seed(2)  # the ELBO's draws first, then the IWAE's
    pipe.vae.elbo(x, num_samples=1, generator=generator)
    iwae = pipe.vae.iwae(x, num_samples=4, generator=generator).bits_per_dim.double()
    assert torch.equal(with_iwae.per_image_iwae, iwae)
    assert with_iwae.iwae_bits_per_dim == iwae.mean().item()
    assert with_iwae.iwae_standard_error == pytest.approx(iwae.std().item() / 3**0.5, rel=1e-12)


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
