"""hf_ddpm.objectives, what the training loop needs from a model kind: the loss of a batch, its logs and feedback,
the pipeline around the model being trained, and the objective's state."""

from __future__ import annotations

import pytest
import torch

from helpers import mnist_like_pixels, on_grid, tiny_vae
from hf_ddpm import DenoisingUNet, HFDDPMPipeline, HFDDPMScheduler, VAEPipeline
from hf_ddpm.ddpm.elbo import training_loss
from hf_ddpm.ddpm.timestep_sampling import LossSecondMomentSampler, UniformTimestepSampler
from hf_ddpm.evaluation import BoundOptions
from hf_ddpm.objectives import DiffusionObjective, ObjectiveOutput, VAEObjective, loss_by_quartile, read_logs

pytestmark = pytest.mark.usefixtures("one_thread")

T = 20


def tiny_unet() -> DenoisingUNet:
    torch.manual_seed(0)
    unet = DenoisingUNet(sample_size=8, block_out_channels=(8, 16), attention_resolutions=(), learn_variance=True)
    with torch.no_grad():
        unet.conv_out.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    return unet


def test_loss_by_quartile_averages_each_quarter_of_the_timesteps_present():
    timesteps = torch.tensor([0, 4, 5, 9, 19, 19])  # quarters 0, 0, 1, 1, 3, 3: none in the third
    losses = torch.tensor([1.0, 3.0, 10.0, 6.0, 2.0, 4.0])
    logs = loss_by_quartile(timesteps, losses, 20)
    assert torch.isnan(logs["loss_q2"])
    assert read_logs(logs) == {"loss_q0": 2.0, "loss_q1": 8.0, "loss_q3": 3.0}


@pytest.mark.parametrize("loss_type", ["hybrid", "vlb", "hybrid_decoder"])
def test_diffusion_objective_is_the_training_loss_at_the_samplers_timesteps(loss_type):
    scheduler = HFDDPMScheduler(num_train_timesteps=T, variance_type="learned_range")
    scheduler.set_timesteps(5)  # training reads only the frozen training chain
    sampler = LossSecondMomentSampler(T, history=1)
    objective = DiffusionObjective(
        scheduler, loss_type, sampler, snr_gamma=5.0, bound_options=BoundOptions(exact=True), sample_steps=7
    )
    assert objective.chain is scheduler.train_chain and objective.sampling_kwargs == {"num_inference_steps": 7}
    assert objective.bound_options == BoundOptions(exact=True)
    unet, images = tiny_unet(), on_grid(4, 1, 8, 8).float()
    torch.manual_seed(3)
    out = objective.loss(unet, images)
    assert isinstance(out, ObjectiveOutput)
    torch.manual_seed(3)  # the same timestep draws and noise
    timesteps, weights = UniformTimestepSampler(T).sample(4, "cpu")
    expected = training_loss(
        loss_type,
        scheduler.train_chain,
        lambda x, t: unet(x, t).sample,
        images,
        timesteps,
        timestep_weights=weights,
        snr_gamma=5.0,
    )
    torch.testing.assert_close(out.loss, expected.loss, rtol=0, atol=0)
    assert torch.equal(out.feedback["timesteps"], timesteps)
    torch.testing.assert_close(out.feedback["losses"], expected.per_timestep_loss, rtol=0, atol=0)
    assert not out.feedback["losses"].requires_grad and out.loss.requires_grad
    logged = read_logs(out.logs)
    assert logged["vlb_bits_per_dim"] == pytest.approx(expected.vlb_bits_per_dim.mean().item(), rel=1e-7)
    assert ("mse" in logged) == (loss_type != "vlb")
    assert {k: v for k, v in logged.items() if k.startswith("loss_q")} == pytest.approx(
        read_logs(loss_by_quartile(timesteps, expected.per_timestep_loss, T))
    )
    # the feedback of every process teaches the sampler; its state is the objective's
    objective.observe({"timesteps": torch.arange(T), "losses": torch.arange(T, dtype=torch.float64) + 1})
    assert sampler.warmed_up()
    restored = DiffusionObjective(scheduler, loss_type, LossSecondMomentSampler(T, history=1))
    restored.load_state_dict(objective.state_dict())
    assert torch.equal(restored.timestep_sampler.losses, sampler.losses)


def test_diffusion_objective_pipeline_wraps_the_model_being_trained():
    scheduler = HFDDPMScheduler(num_train_timesteps=T, variance_type="learned_range")
    objective = DiffusionObjective(scheduler, "hybrid", UniformTimestepSampler(T))
    unet = tiny_unet()
    pipeline = objective.pipeline(unet)
    assert isinstance(pipeline, HFDDPMPipeline) and pipeline.unet is unet and pipeline.scheduler is scheduler
    assert objective.state_dict() == {}


def test_vae_objective_is_the_one_sample_negative_elbo():
    vae = tiny_vae(num_latent_layers=2)
    images = mnist_like_pixels(3)[:, None].float() / 127.5 - 1
    objective = VAEObjective(BoundOptions(iwae_samples=4))
    assert objective.bound_options.iwae_samples == 4 and objective.sampling_kwargs == {}
    torch.manual_seed(5)
    out = objective.loss(vae, images)
    torch.manual_seed(5)
    expected = vae(images)
    torch.testing.assert_close(out.loss, expected.bits_per_dim, rtol=0, atol=0)
    assert read_logs(out.logs) == pytest.approx(
        {"kl_nats": expected.kl_nats.mean().item(), "reconstruction_nats": expected.reconstruction_nats.mean().item()}
    )
    assert out.feedback == {}
    objective.observe({})
    pipeline = objective.pipeline(vae)
    assert isinstance(pipeline, VAEPipeline) and pipeline.vae is vae
    assert objective.state_dict() == {}
    objective.load_state_dict({})
