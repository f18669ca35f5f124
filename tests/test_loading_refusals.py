"""Loaded models are checked before use (issue #30): weights with NaN or inf, a scheduler config whose
num_train_timesteps is a string or beyond MAX_TRAIN_TIMESTEPS, and a network config too large for this machine's
memory are refused in one line by from_pretrained and by ``hf_ddpm sample|evaluate``, before any sampling."""

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

from helpers import TINY_TRAIN, tiny_ddpm_pipeline
from hf_ddpm import DenoisingUNet, HFDDPMPipeline, HFDDPMScheduler, training_args
from hf_ddpm.cli import main
from hf_ddpm.ddpm.schedules import MAX_TRAIN_TIMESTEPS, cosine_betas
from hf_ddpm.models import unet as unet_module

pytestmark = pytest.mark.usefixtures("one_thread")

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
    monkeypatch.setattr(unet_module, "available_memory_bytes", lambda: 4 * (parameters + activations) - 1)
    with pytest.raises(ValueError, match=r"needs at least 0\.0 GB in float32 \(8,640 parameters"):
        DenoisingUNet(block_out_channels=(8, 16), attention_resolutions=())
    monkeypatch.setattr(unet_module, "available_memory_bytes", lambda: 4 * (parameters + activations))
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
