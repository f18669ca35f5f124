"""The continuous-time VDM as a model kind: VDMPipeline (sampling, bound, save/load, remote code), VDMObjective and
a train.py run. The equations themselves are tested in test_vdm.py; here, the wiring."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from hf_ddpm import DenoisingUNet, NoiseSchedule, VDMContinuousScheduler, VDMPipeline, evaluate_bound
from hf_ddpm.cli import main as cli_main
from hf_ddpm.distributions import nats_to_bits_per_dim
from hf_ddpm.evaluation import BoundOptions
from hf_ddpm.hub.remote_code import remote_code_files
from hf_ddpm.objectives import VDMObjective, read_logs
from hf_ddpm.pipelines import vdm as vdm_pipeline_module
from hf_ddpm.pipelines.vdm import VDMModel, vdm_epsilon
from hf_ddpm.vdm.elbo import (
    VDMLossTerms,
    clipped_estimate_model,
    continuous_time_bound_estimate,
    discrete_time_bound,
    vdm_loss_terms,
)
from hf_ddpm.vdm.noise_schedule import DeferredGradientScale

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "training"))
import train  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 8


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_model(seed: int = 0) -> VDMModel:
    torch.manual_seed(seed)
    unet = DenoisingUNet(
        sample_size=SIZE,
        in_channels=1,
        learn_variance=False,
        block_out_channels=(8, 16),
        attention_resolutions=(4,),
        fourier_features=(7, 8),
    )
    return VDMModel(unet, NoiseSchedule(schedule_type="learned", n_features=8))


def tiny_pipeline(seed: int = 0) -> VDMPipeline:
    model = tiny_model(seed)
    pipe = VDMPipeline(unet=model.unet, noise_schedule=model.noise_schedule, scheduler=VDMContinuousScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def digits(n: int, seed: int = 0) -> torch.Tensor:
    """(n, 1, 8, 8) float32 images on the 8-bit grid."""
    return torch.randint(0, 256, (n, 1, SIZE, SIZE), generator=seeded(seed)).float() / 127.5 - 1.0


def model_fn_of(pipe: VDMPipeline, clip: bool = False):
    model_fn = lambda z_t, t: vdm_epsilon(pipe.unet, z_t, t)  # noqa: E731
    return clipped_estimate_model(pipe.noise_schedule, model_fn) if clip else model_fn


def sample(pipe: VDMPipeline, seed: int = 0, steps: int = 4) -> torch.Tensor:
    return pipe(batch_size=3, generator=seeded(seed), num_inference_steps=steps, output_type="pt").images


def test_sampling_has_the_image_shape_and_is_deterministic_given_a_seed():
    pipe = tiny_pipeline()
    images = sample(pipe)
    assert images.shape == (3, 1, SIZE, SIZE) and 0 <= images.min() and images.max() <= 1
    assert torch.equal(images, sample(pipe)) and not torch.equal(images, sample(pipe, seed=1))
    arrays = pipe(batch_size=2, generator=seeded(), num_inference_steps=2, output_type="np").images
    assert arrays.shape == (2, SIZE, SIZE, 1)
    assert pipe.image_channels == 1


@pytest.mark.parametrize("clip", [True, False])
def test_the_bound_estimate_is_the_continuous_elbo_in_bits_per_dim(clip):
    pipe, x = tiny_pipeline(), digits(4)
    options = BoundOptions(timesteps_per_image=3, clip_denoised=clip)
    bound = evaluate_bound(pipe, x, options, batch_size=2, generator=seeded(5))
    generator = seeded(5)
    with torch.no_grad():
        direct = [
            continuous_time_bound_estimate(pipe.noise_schedule, model_fn_of(pipe, clip), part.double(), 3, generator)
            for part in x.split(2)
        ]
    dims = SIZE * SIZE
    for name in ("prior", "diffusion", "reconstruction"):
        expected = torch.cat([nats_to_bits_per_dim(getattr(d.terms, name), dims) for d in direct])
        torch.testing.assert_close(bound.per_image_terms[name], expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(bound.per_image, sum(bound.per_image_terms.values()))
    assert set(bound.per_image_terms) == {"prior", "diffusion", "reconstruction"}
    assert "continuous-time" in bound.estimator and "3 low-discrepancy times" in bound.estimator
    assert ("x estimate clipped to [-1, 1] in the diffusion term" in bound.estimator) == clip


def test_the_clipped_bound_is_never_above_the_unclipped_one_and_lower_for_an_untrained_network():
    pipe, x = tiny_pipeline(), digits(6)
    clipped, unclipped = (
        evaluate_bound(pipe, x, BoundOptions(timesteps_per_image=4, clip_denoised=clip), generator=seeded(3))
        for clip in (True, False)
    )
    for name in ("prior", "reconstruction"):  # the same draws: only the diffusion term changes
        torch.testing.assert_close(clipped.per_image_terms[name], unclipped.per_image_terms[name], rtol=0, atol=0)
    difference = unclipped.per_image_terms["diffusion"] - clipped.per_image_terms["diffusion"]
    assert (difference >= 0).all() and (difference > 0).any()
    assert BoundOptions().clip_denoised  # the default


def test_the_exact_bound_and_elbo_are_the_discrete_bound_with_every_step_summed(monkeypatch):
    monkeypatch.setattr(vdm_pipeline_module, "VDM_EXACT_BOUND_STEPS", 20)  # T = 1000 in use; fewer steps here
    pipe, x = tiny_pipeline(), digits(3)
    exact = evaluate_bound(pipe, x, BoundOptions(exact=True), generator=seeded(1))
    with torch.no_grad():
        direct = discrete_time_bound(pipe.noise_schedule, model_fn_of(pipe, True), x.double(), 20, seeded(1))
    for name in ("prior", "diffusion", "reconstruction"):
        expected = nats_to_bits_per_dim(getattr(direct, name), SIZE * SIZE)
        torch.testing.assert_close(exact.per_image_terms[name], expected, rtol=1e-12, atol=0)
    assert "T=20" in exact.estimator
    torch.testing.assert_close(pipe.elbo(x, generator=seeded(1)).per_image, exact.per_image, rtol=0, atol=0)


def test_bounds_evaluated_several_draws_a_call_are_the_same(monkeypatch):
    """With several steps, draws or times per network call (what ``draws_per_forward`` gives on a CUDA device),
    the exact bound, the estimate and bound_by_time are the same: the same noise in the same order (float32
    network outputs at another batch size)."""
    monkeypatch.setattr(vdm_pipeline_module, "VDM_EXACT_BOUND_STEPS", 20)
    pipe, x = tiny_pipeline(), digits(3)

    def bounds():
        exact = evaluate_bound(pipe, x, BoundOptions(exact=True), generator=seeded(1)).per_image
        estimate = evaluate_bound(pipe, x, BoundOptions(timesteps_per_image=5), generator=seeded(2)).per_image
        return exact, estimate, pipe.bound_by_time(x, generator=seeded(3), num_times=7, draws_per_time=2).bits_per_dim

    one = bounds()
    widths = []
    forward = pipe.unet.forward
    monkeypatch.setattr(vdm_pipeline_module, "draws_per_forward", lambda device, batch: 3)
    monkeypatch.setattr(pipe.unet, "forward", lambda z, t: widths.append(len(z)) or forward(z, t))
    many = bounds()
    # 20 steps of 3 images, 3 at a time; 5 draws; bound_by_time: 7 times of 2 draws of 3 images
    assert widths == [9] * 6 + [6] + [9, 6] + [18, 18, 6]
    for a, b in zip(many, one):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def test_the_t1000_bound_agrees_with_the_continuous_estimate():
    # L_1000 exceeds L_inf by about (gamma_1 - gamma_0) / (2 T) = 0.9% relative, inside the estimate's noise
    torch.manual_seed(0)
    unet = DenoisingUNet(sample_size=4, block_out_channels=(8,), attention_resolutions=(), fourier_features=(7, 8))
    schedule = NoiseSchedule(n_features=8)
    pipe = VDMPipeline(unet=unet, noise_schedule=schedule, scheduler=VDMContinuousScheduler())
    x = digits(2)[..., :4, :4]
    exact = evaluate_bound(pipe, x, BoundOptions(exact=True), generator=seeded(1)).per_image
    with torch.no_grad():
        estimate = continuous_time_bound_estimate(schedule, model_fn_of(pipe, True), x.double(), 32, seeded(2))
    continuous = estimate.terms.in_bits_per_dim(16).total
    error = nats_to_bits_per_dim(estimate.standard_error, 16)
    assert ((exact - continuous).abs() < 4 * error + 0.02 * continuous).all()


def test_save_and_load_round_trip_gives_identical_samples_and_bounds(tmp_path):
    pipe = tiny_pipeline()
    with torch.no_grad():  # a schedule away from its initial values, to see that the weights travel
        pipe.noise_schedule.gamma_0.fill_(-10.0)
        pipe.noise_schedule.l3.weight.mul_(50.0)
    pipe.save_pretrained(tmp_path / "vdm")
    index = json.loads((tmp_path / "vdm" / "model_index.json").read_text())
    assert index["_class_name"] == "VDMPipeline" and index["noise_schedule"] == ["hf_ddpm", "NoiseSchedule"]
    loaded = VDMPipeline.from_pretrained(tmp_path / "vdm")
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(sample(pipe), sample(loaded))
    options, x = BoundOptions(timesteps_per_image=2), digits(2)
    a = evaluate_bound(pipe, x, options, generator=seeded())
    b = evaluate_bound(loaded, x, options, generator=seeded())
    torch.testing.assert_close(a.per_image, b.per_image, rtol=0, atol=0)


def test_the_remote_code_bundles_the_pipeline_and_its_components():
    files = remote_code_files(tiny_pipeline())
    assert set(files) == {"hf_ddpm.py", "unet/hf_ddpm.py", "noise_schedule/hf_ddpm.py", "scheduler/hf_ddpm.py"}
    source = files["hf_ddpm.py"]
    assert "class VDMPipeline(" in source and "class NoiseSchedule(" in source
    assert "class VDMContinuousScheduler(" in source


def test_the_objective_loss_is_vdm_loss_terms_and_trains_the_schedule():
    model, objective, x = tiny_model(), VDMObjective(BoundOptions(timesteps_per_image=2), sample_steps=3), digits(4)
    torch.manual_seed(7)
    out = objective.loss(model, x)
    torch.manual_seed(7)
    terms = vdm_loss_terms(model.noise_schedule, lambda z, t: vdm_epsilon(model.unet, z, t), x)
    expected = terms.in_bits_per_dim(SIZE * SIZE)
    torch.testing.assert_close(out.loss, expected.total)
    assert read_logs(out.logs)["diffusion_bits_per_dim"] == pytest.approx(expected.diffusion.mean().item())
    out.loss.mean().backward()
    schedule = model.noise_schedule
    for name, parameter in [*schedule.named_parameters(), ("unet.conv_out.weight", model.unet.conv_out.weight)]:
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        # the normalisation of the learned gamma cancels w_1 up to the tiny initial nonlinear part
        assert name == "l1_weight" or parameter.grad.abs().sum() > 0, name
    pipe = objective.pipeline(model)
    assert pipe.unet is model.unet and pipe.noise_schedule is schedule
    assert objective.sampling_kwargs == {"num_inference_steps": 3} and objective.state_dict() == {}


def test_the_objective_loss_estimates_the_continuous_bound():
    model, x = tiny_model(), digits(8)
    model.eval()
    objective = VDMObjective()
    with torch.no_grad():
        torch.manual_seed(0)
        losses = torch.stack([objective.loss(model, x).loss for _ in range(24)])
        estimate = continuous_time_bound_estimate(
            model.noise_schedule, lambda z, t: vdm_epsilon(model.unet, z, t), x, 24, seeded(3)
        )
    bound = estimate.terms.in_bits_per_dim(SIZE * SIZE).total.mean()
    error = math.hypot(
        losses.mean(1).std().item() / math.sqrt(24),
        nats_to_bits_per_dim(estimate.standard_error, SIZE * SIZE).pow(2).mean().sqrt().item() / math.sqrt(8),
    )
    assert abs(losses.mean().item() - bound.item()) < 4 * error


def test_variance_mode_trains_the_interior_on_the_mean_squared_diffusion_term_and_nothing_else_changes():
    """schedule_interior="variance": the learned schedule's interior gets d/d eta mean_i L_i^2 (L_i the diffusion
    term in bits/dim, by autograd on the squares: an independent computation), the endpoints and the network keep
    the bound's gradient, and the loss values are those of the bound mode."""
    bound_model = tiny_model()
    variance_model = VDMModel(bound_model.unet, bound_model.noise_schedule, schedule_interior="variance")
    schedule, x = bound_model.noise_schedule, digits(6)
    with torch.no_grad():  # a clearly curved schedule: at VDM's init the interior's gradients are float32 noise
        for weight in (schedule.l2.weight, schedule.l2.bias, schedule.l3.weight):
            weight.copy_(3.0 * torch.randn(weight.shape, generator=seeded(4)))
    interior = [name for name, _ in schedule.named_parameters() if name not in ("gamma_0", "gamma_1")]
    assert interior == ["l1_weight", "l2.weight", "l2.bias", "l3.weight"]

    def gradients(model: VDMModel) -> tuple[VDMLossTerms, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        terms = model(x, generator=seeded(1))
        terms.total.mean().backward()
        return terms, {name: p.grad.clone() for name, p in model.named_parameters()}

    bound_terms, bound_grads = gradients(bound_model)
    variance_terms, variance_grads = gradients(variance_model)
    torch.testing.assert_close(variance_terms.total, bound_terms.total, rtol=0, atol=0)
    bound_model.zero_grad(set_to_none=True)
    squares = bound_model(x, generator=seeded(1)).diffusion.pow(2).mean()
    parameters = dict(schedule.named_parameters())
    expected = dict(zip(interior, torch.autograd.grad(squares, [parameters[name] for name in interior])))
    for name in interior:
        scale = expected[name].abs().max().item()  # float32: entries near cancellation carry absolute error only
        grad = variance_grads[f"noise_schedule.{name}"]
        torch.testing.assert_close(grad, expected[name], rtol=1e-3, atol=1e-4 * scale)
        assert not torch.allclose(variance_grads[f"noise_schedule.{name}"], bound_grads[f"noise_schedule.{name}"])
    for name, grad in bound_grads.items():
        if name.removeprefix("noise_schedule.") not in interior:
            torch.testing.assert_close(variance_grads[name], grad, rtol=1e-6, atol=0, msg=name)


def test_variance_mode_needs_its_scale_and_the_continuous_loss():
    schedule, t = NoiseSchedule(n_features=8), torch.rand(4)
    rescaler = DeferredGradientScale()
    gamma, _ = schedule.gamma_and_derivative(t, rescaler)
    with pytest.raises(RuntimeError, match="DeferredGradientScale.scale was never set"):
        gamma.sum().backward()
    rescaler = DeferredGradientScale()
    with pytest.raises(ValueError, match="continuous-time loss"):
        vdm_loss_terms(schedule, lambda z, t: torch.zeros_like(z), digits(2), num_steps=10, interior_gradient=rescaler)
    with pytest.raises(ValueError, match="schedule_interior must be bound or variance"):
        VDMModel(tiny_model().unet, schedule, schedule_interior="noise")


def test_a_vdm_model_predicts_the_noise_only():
    unet = DenoisingUNet(sample_size=SIZE, block_out_channels=(8, 16), attention_resolutions=(4,), learn_variance=True)
    with pytest.raises(ValueError, match="learn_variance=False"):
        VDMModel(unet, NoiseSchedule())


def test_a_train_py_run_writes_a_vdm_pipeline_that_loads_samples_and_the_cli_reads(tmp_path, capsys):
    out = train.main(
        [
            "--output_dir",
            str(tmp_path / "vdm"),
            "--model",
            "vdm",
            "--block_out_channels",
            "8",
            "16",
            "--attention_resolutions",
            "7",
            "--num_sample_images",
            "4",
            "--sample_steps",
            "5",
            "--num_eval_images",
            "8",
            "--eval_timesteps_per_image",
            "2",
            "--logger",
            "none",
            "--max_train_steps",
            "3",
            "--max_train_images",
            "64",
            "--train_batch_size",
            "16",
            "--eval_batch_size",
            "8",
            "--lr_warmup_steps",
            "1",
            "--mixed_precision",
            "no",
        ]
    )
    nll = json.loads((out / "eval_results.json").read_text())["nll"]
    assert set(nll["terms"]) == {"prior", "diffusion", "reconstruction"}
    assert nll["bits_per_dim"] == pytest.approx(sum(nll["terms"].values()), rel=1e-9)
    assert "continuous-time" in nll["estimator"]
    assert json.loads((out / "training_args.json").read_text())["noise_schedule"] == "learned"
    pipe = VDMPipeline.from_pretrained(out)
    assert pipe.unet.config.fourier_features == [7, 8] or tuple(pipe.unet.config.fourier_features) == (7, 8)
    images = pipe(batch_size=2, num_inference_steps=3, generator=seeded(), output_type="np").images
    assert images.shape == (2, 28, 28, 1)
    assert "VDMPipeline" in (out / "README.md").read_text()
    grid = tmp_path / "grid.png"
    sample_args = ["sample", str(out), "--num_images", "2", "--steps", "3", "--device", "cpu", "--out", str(grid)]
    assert cli_main(sample_args) == 0
    assert grid.is_file()
    first = grid.read_bytes()
    # the VDM's DDIM steps, as the demo offers them; the grid is replaced only when asked
    assert cli_main([*sample_args, "--scheduler", "ddim", "--overwrite"]) == 0
    assert grid.read_bytes() != first
    capsys.readouterr()
    dpm = ["sample", str(out), "--scheduler", "dpm", "--device", "cpu", "--out", str(tmp_path / "dpm.png")]
    assert cli_main(dpm) == 2
    assert (
        capsys.readouterr().err.splitlines()[-1]
        == "hf_ddpm: error: --scheduler must be one of ancestral, ddim, got 'dpm'."
    )
    bounds = {}
    for flags in ([], ["--no_clip_denoised"]):  # the same seed and draws: only the diffusion term may differ
        report = tmp_path / f"evaluate{len(flags)}.json"
        evaluate = ["evaluate", str(out), "--data", "embedded", "--max_images", "4", "--json", str(report), *flags]
        assert cli_main(evaluate) == 0
        bounds[bool(flags)] = json.loads(report.read_text())
    clipped, unclipped = bounds[False], bounds[True]
    assert "clipped to [-1, 1]" in clipped["estimator"] and "clipped" not in unclipped["estimator"]
    assert clipped["terms"]["reconstruction"] == unclipped["terms"]["reconstruction"]
    assert clipped["terms"]["diffusion"] <= unclipped["terms"]["diffusion"]
