"""Loaded models are checked before use (issue #30): weights with NaN or inf, a scheduler config whose
num_train_timesteps is a string or beyond MAX_TRAIN_TIMESTEPS, and a network config too large for this machine's
memory are refused in one line by from_pretrained and by ``hf_ddpm sample|evaluate``, before any sampling; so
are malformed or oversized VAE and noise-schedule configs (the field named, the figures given), and a pipeline
beyond a CUDA device's free memory, before it is moved there (``torch.cuda.mem_get_info`` mocked)."""

from __future__ import annotations

import json
import math
import re
import shutil
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import TINY_TRAIN, tiny_ddpm_pipeline, tiny_vae_pipeline, tiny_vdm_pipeline
from hf_ddpm import (
    DenoisingUNet,
    GaussianVAE,
    HFDDPMPipeline,
    HFDDPMScheduler,
    NoiseSchedule,
    VAEPipeline,
    VDMPipeline,
    config_checks,
    training_args,
)
from hf_ddpm.cli import main
from hf_ddpm.ddpm.schedules import MAX_TRAIN_TIMESTEPS, cosine_betas
from hf_ddpm.models import unet as unet_module
from hf_ddpm.pipelines.auto import check_fits_on_device, open_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")
PIPELINES = {"vae": VAEPipeline, "vdm": VDMPipeline}

import train  # noqa: E402  (importable through helpers)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    tiny_ddpm_pipeline().save_pretrained(folder)
    return folder


def copy_with(saved, tmp_path, component: str, file: str, **changes):
    folder = tmp_path / "model"
    shutil.copytree(saved, folder)
    config = json.loads((folder / component / file).read_text())
    (folder / component / file).write_text(json.dumps({**config, **changes}))
    return folder


def one_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = re.findall(r"hf_ddpm: error: .*", err)  # after the progress bars of loading and of the bound
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_nan_weights_are_refused_by_from_pretrained_sample_and_evaluate(saved, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(saved, folder)
    weights = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    total = sum(v.numel() for v in weights.values())
    first = next(iter(weights))
    weights[first] = torch.full_like(weights[first], math.nan)
    weights[first].view(-1)[0] = math.inf
    save_file(weights, folder / "unet" / "diffusion_pytorch_model.safetensors")
    bad = weights[first].numel()
    message = (
        f"{folder / 'unet'}: {bad:,} of its {total:,} weights are NaN or inf (a training run that diverged); load a "
        "checkpoint saved before that, or retrain with a lower learning rate."
    )
    with pytest.raises(ValueError) as error:
        HFDDPMPipeline.from_pretrained(folder)
    assert str(error.value) == message
    out = tmp_path / "samples"
    assert (
        one_line(capsys, ["sample", str(folder), "--out", str(out)])
        == f"hf_ddpm: error: {message}"  # the message names the folder already
    )
    assert not out.exists()
    line = one_line(capsys, ["evaluate", str(folder), "--data", "embedded", "--json", str(tmp_path / "r.json")])
    assert line.endswith(message) and not (tmp_path / "r.json").exists()


@pytest.mark.parametrize(
    "value, shown",
    [("50", "'50' (a str)"), (1_000_000_000, "1000000000 (a int)"), (True, "True (a bool)"), (12.5, "12.5 (a float)")],
)
def test_a_malformed_or_huge_num_train_timesteps_is_refused_at_once(saved, tmp_path, capsys, value, shown):
    folder = copy_with(saved, tmp_path, "scheduler", "scheduler_config.json", num_train_timesteps=value)
    started = time.perf_counter()
    line = one_line(capsys, ["sample", str(folder), "--out", str(tmp_path / "s.png"), "--num_images", "1"])
    assert time.perf_counter() - started < 30  # the 10^9-step cosine schedule is never built
    assert line.endswith(f"num_train_timesteps must be an integer in [1, {MAX_TRAIN_TIMESTEPS:,}], got {shown}.")


@pytest.mark.parametrize(
    "changes, figures",
    [
        ({"block_out_channels": [100000, 200000]}, "1,350,000,000,000 parameters and 9,600,000 activation values"),
        ({"sample_size": 1_000_000}, "8,640 parameters and 12,000,000,000,000 activation values"),
    ],
)
def test_a_network_config_too_large_for_memory_is_refused_before_allocating(saved, tmp_path, capsys, changes, figures):
    folder = copy_with(saved, tmp_path, "unet", "config.json", **changes)
    line = one_line(capsys, ["sample", str(folder), "--out", str(tmp_path / "s.png")])
    assert "needs at least" in line and f"GB in float32 ({figures} at batch 1), more than the" in line
    assert line.endswith(
        "GB of memory available: use fewer or narrower levels or smaller images, or a machine with more memory."
    )


def test_the_memory_check_compares_with_what_is_available(monkeypatch):
    parameters, activations = unet_module.unet_size_lower_bounds(28, (8, 16), 1)
    assert (parameters, activations) == (3 * 9 * (8**2 + 16**2), 8 * 28**2 + 16 * 14**2)
    monkeypatch.setattr(config_checks, "available_memory_bytes", lambda: 4 * (parameters + activations) - 1)
    with pytest.raises(ValueError, match=r"needs at least 0\.0 GB in float32 \(8,640 parameters"):
        DenoisingUNet(block_out_channels=(8, 16), attention_resolutions=())
    monkeypatch.setattr(config_checks, "available_memory_bytes", lambda: 4 * (parameters + activations))
    DenoisingUNet(block_out_channels=(8, 16), attention_resolutions=())


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"sample_size": "28"}, "DenoisingUNet config: sample_size must be an integer >= 1, got '28'."),
        ({"block_out_channels": [8, -16]}, "block_out_channels must be a list of integers >= 1, got [8, -16]."),
        ({"layers_per_block": 0}, "layers_per_block must be an integer >= 1, got 0."),
        ({"dropout": 1.5}, "dropout must be a number in [0, 1), got 1.5."),
    ],
)
def test_a_malformed_network_config_is_one_line(saved, tmp_path, capsys, changes, message):
    folder = copy_with(saved, tmp_path, "unet", "config.json", **changes)
    assert one_line(capsys, ["sample", str(folder), "--out", str(tmp_path / "s.png")]).endswith(message)


def test_the_vectorised_cosine_schedule_is_the_closed_form_and_fast():
    T, offset = 4000, 0.008

    def alpha_bar(s: float) -> float:
        return math.cos((s + offset) / (1 + offset) * math.pi / 2) ** 2

    expected = [min(1 - alpha_bar(t / T) / alpha_bar((t - 1) / T), 0.999) for t in range(1, T + 1)]
    # numpy's and Python's cosines differ by an ulp at most, which 1 - ratio turns into at most one ulp of 1
    np.testing.assert_allclose(cosine_betas(T), expected, rtol=0, atol=np.finfo(np.float64).eps)
    started = time.perf_counter()
    HFDDPMScheduler(num_train_timesteps=MAX_TRAIN_TIMESTEPS, beta_schedule="cosine")
    assert time.perf_counter() - started < 5  # 24 ms measured on a 2-core machine; the Python loop took seconds


def test_train_refuses_a_network_config_too_large_for_memory_naming_the_flag(saved, tmp_path, capsys):
    config = json.loads((saved / "unet" / "config.json").read_text())
    config.update(sample_size=28, learn_variance=True, out_channels=None, block_out_channels=[100000, 200000])
    (tmp_path / "config.json").write_text(json.dumps(config))
    argv = ["--output_dir", str(tmp_path / "out"), *TINY_TRAIN, "--model_config_name_or_path", str(tmp_path)]
    assert training_args.run_cli(train.main, argv) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(
        f"error: --model_config_name_or_path {tmp_path}: DenoisingUNet config (sample_size 28, block_out_channels "
        "[100000, 200000]) needs at least 5,400.5 GB in float32 (1,350,000,000,000 parameters and 117,600,000 "
        "activation values at batch 1), more than the"
    )


def test_evaluate_refuses_a_non_finite_bound_of_finite_weights_and_writes_nothing(tmp_path, capsys):
    pipeline = tiny_ddpm_pipeline()
    with torch.no_grad():
        for parameter in pipeline.unet.parameters():
            parameter.fill_(1e30)  # finite weights whose outputs overflow
    pipeline.save_pretrained(tmp_path / "model")
    argv = ["evaluate", str(tmp_path / "model"), "--data", "embedded", "--max_images", "2", "--json"]
    line = one_line(capsys, [*argv, str(tmp_path / "r.json"), "--timesteps_per_image", "2"])
    assert line == (
        "hf_ddpm: error: the bound is nan bits/dim (2 of 2 images' bounds are NaN or inf): the model's outputs are "
        "not finite; no result was written."
    )
    assert not (tmp_path / "r.json").exists()


# ---------------------------------------------------------------------------------------------- the VAE and the VDM
@pytest.fixture(scope="module")
def saved_vae_and_vdm(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tiny_vae_pipeline().save_pretrained(root / "vae")
    tiny_vdm_pipeline().save_pretrained(root / "vdm")
    return root


VAE = ("vae", "vae", "GaussianVAE config: ")
SCHEDULE = ("vdm", "noise_schedule", "NoiseSchedule config: ")


@pytest.mark.parametrize(
    "where, changes, message",
    [
        (VAE, {"latent_dim": "4"}, "latent_dim must be an integer >= 1, got '4'."),
        (VAE, {"hidden_dim": -8}, "hidden_dim must be an integer >= 1, got -8."),
        (VAE, {"num_latent_layers": True}, "num_latent_layers must be an integer >= 1, got True."),
        (VAE, {"block_out_channels": [4, -8]}, "block_out_channels must be a list of integers >= 1, got [4, -8]."),
        (
            VAE,
            {"block_out_channels": [4, 8, 16]},
            "block_out_channels gives the channels at H/2 and H/4: two numbers, got [4, 8, 16].",
        ),
        (SCHEDULE, {"n_features": "8"}, "n_features must be an integer >= 1, got '8'."),
        (SCHEDULE, {"n_features": -8}, "n_features must be an integer >= 1, got -8."),
        (SCHEDULE, {"n_features": 8.0}, "n_features must be an integer >= 1, got 8.0."),
        (SCHEDULE, {"gamma_min": "-13.3"}, "gamma_min must be a finite number, got '-13.3'."),
        (SCHEDULE, {"gamma_max": math.inf}, "gamma_max must be a finite number, got inf."),
        (SCHEDULE, {"gamma_min": 6.0}, "gamma_min=6.0 must be below gamma_max=5.0."),
        (SCHEDULE, {"learn_endpoints": "yes"}, "learn_endpoints must be true, false or null, got 'yes'."),
        (SCHEDULE, {"schedule_type": 1}, "schedule_type must be one of learned, linear, cosine, got 1."),
    ],
)
def test_a_malformed_vae_or_noise_schedule_config_fails_in_one_line_naming_the_field(
    saved_vae_and_vdm, tmp_path, capsys, where, changes, message
):
    kind, component, prefix = where
    folder = copy_with(saved_vae_and_vdm / kind, tmp_path, component, "config.json", **changes)
    with pytest.raises(ValueError) as error:
        PIPELINES[kind].from_pretrained(folder)
    assert str(error.value) == prefix + message
    assert one_line(capsys, ["sample", str(folder), "--out", str(tmp_path / "s.png")]).endswith(prefix + message)


@pytest.mark.parametrize(
    "where, changes, subject, figures",
    [
        (
            VAE,
            {"block_out_channels": [10**6, 10**6]},
            "(sample_size 8, block_out_channels [1000000, 1000000], latent_dim 4)",
            "72,000.7 GB in float32 (18,000,082,000,234 parameters and 84,000,128 activation values",
        ),
        (
            VAE,
            {"sample_size": 10**6},
            "(sample_size 1000000, block_out_channels [4, 8], latent_dim 4)",
            "56,000.0 GB in float32 (6,500,000,000,934 parameters and 7,500,000,000,000 activation values",
        ),
        (
            SCHEDULE,
            {"n_features": 10**12},
            "(schedule_type 'learned', n_features 1000000000000)",
            "16,000.0 GB in float32 (3,000,000,000,003 parameters and 1,000,000,000,000 activation values",
        ),
    ],
)
def test_a_vae_or_noise_schedule_too_large_for_memory_is_refused_with_the_figures(
    saved_vae_and_vdm, tmp_path, capsys, where, changes, subject, figures
):
    kind, component, prefix = where
    folder = copy_with(saved_vae_and_vdm / kind, tmp_path, component, "config.json", **changes)
    line = one_line(capsys, ["sample", str(folder), "--out", str(tmp_path / "s.png")])
    network = prefix.removesuffix(": ")
    assert f"{network} {subject} needs at least {figures} at batch 1), more than the " in line
    advice = "use a smaller n_features" if kind == "vdm" else "use narrower layers, fewer latent dimensions or smaller"
    assert re.search(f"GB of memory available: {advice}.*, or a machine with more memory.$", line)
    with pytest.raises(ValueError, match="needs at least"):
        PIPELINES[kind].from_pretrained(folder)


def test_the_vae_and_noise_schedule_estimates_count_every_parameter_and_meet_the_memory_available(monkeypatch):
    for layers in (1, 3):
        vae = GaussianVAE(
            sample_size=8, in_channels=3, latent_dim=4, block_out_channels=(4, 8), num_latent_layers=layers
        )
        assert vae.size_lower_bounds()[0] == sum(p.numel() for p in vae.parameters())
    assert GaussianVAE().size_lower_bounds()[0] == 342_114  # the default of the docstring
    for schedule_type, learn_endpoints in (("learned", None), ("linear", True)):
        schedule = NoiseSchedule(schedule_type, learn_endpoints=learn_endpoints, n_features=16)
        stored = [*schedule.parameters(), *schedule.buffers()]
        assert schedule.size_lower_bounds()[0] == sum(t.numel() for t in stored)
    parameters, activations = GaussianVAE().size_lower_bounds()
    monkeypatch.setattr(config_checks, "available_memory_bytes", lambda: 4 * (parameters + activations) - 1)
    with pytest.raises(ValueError, match=r"needs at least 0\.0 GB in float32 \(342,114 parameters and 36,064 act"):
        GaussianVAE()
    monkeypatch.setattr(config_checks, "available_memory_bytes", lambda: 4 * (parameters + activations))
    GaussianVAE()


# ---------------------------------------------------------------------------------------------- accelerator memory
def test_a_pipeline_beyond_the_free_accelerator_memory_is_refused_before_the_move(
    saved_vae_and_vdm, tmp_path, capsys, monkeypatch
):
    folder = saved_vae_and_vdm / "vdm"
    unet, schedule = (VDMPipeline.from_pretrained(folder).components[name] for name in ("unet", "noise_schedule"))
    parameters, activations = (a + b for a, b in zip(unet.size_lower_bounds(), schedule.size_lower_bounds()))
    needed = 4 * (parameters + activations)
    asked, moved = [], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: asked.append(device) or (free, 80 * 10**9))
    monkeypatch.setattr(VDMPipeline, "to", lambda self, device: moved.append(device) or self)
    free = math.ceil(needed / config_checks.ACCELERATOR_MEMORY_SHARE) - 1  # 90% of it is 1 byte short
    line = one_line(capsys, ["sample", str(folder), "--out", str(tmp_path / "s.png"), "--device", "cuda:1"])
    assert line == (
        f"hf_ddpm: error: {folder} (VDMPipeline) needs at least 0.0 GB in float32 ({parameters:,} parameters and "
        f"{activations:,} activation values at batch 1), more than 90% of the 0.0 GB free on cuda:1 (the rest is left "
        "to CUDA's workspaces): free memory on that GPU (other processes hold it), or choose another --device."
    )
    assert asked == [torch.device("cuda:1")] and moved == [] and not (tmp_path / "s.png").exists()
    free += 1
    assert open_pipeline(str(folder), None, "cuda:1").device.type == "cpu" and moved == ["cuda:1"]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: pytest.fail("asked on the CPU path"))
    open_pipeline(str(folder), None, "cpu")
    assert moved == ["cuda:1", "cpu"]


def test_a_network_without_a_size_estimate_counts_its_parameters_on_the_accelerator(monkeypatch):
    from diffusers import UNet2DModel

    unet = UNet2DModel(
        sample_size=8,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        layers_per_block=1,
    )
    pipeline = HFDDPMPipeline(unet=unet, scheduler=HFDDPMScheduler(num_train_timesteps=10))
    parameters = sum(p.numel() for p in unet.parameters())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (4 * parameters, 80 * 10**9))
    with pytest.raises(ValueError, match=rf"^model \(HFDDPMPipeline\) needs .*\({parameters:,} parameters and 0 act"):
        check_fits_on_device(pipeline, "model", "cuda")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (math.ceil(4 * parameters / 0.9), 80 * 10**9))
    check_fits_on_device(pipeline, "model", "cuda")
