"""train.py accepts diffusers' ``train_unconditional.py`` flag names where they mean the same thing, every tracker
accelerate supports (trackio among them), and passes ``--cache_dir`` to datasets (issue #12, point 6)."""

from __future__ import annotations

import types

import numpy as np
import PIL.Image
import pytest

import hf_ddpm.training_args as training_args
from hf_ddpm.data import load_images
from hf_ddpm.training_utils import log_sample_grid


def parse(tmp_path, *flags: str):
    return training_args.parse_arguments(["--output_dir", str(tmp_path / "out"), "--logger", "none", *flags])


@pytest.mark.parametrize(
    "alias, canonical, value",
    [
        ("--dataset_config_name", "--dataset_config", "mnist"),
        ("--ddpm_num_steps", "--num_train_timesteps", "200"),
        ("--ddpm_num_inference_steps", "--sample_steps", "20"),
        ("--ddpm_beta_schedule", "--beta_schedule", "linear"),
    ],
)
def test_a_diffusers_flag_name_parses_as_ours(tmp_path, alias, canonical, value):
    assert parse(tmp_path, alias, value) == parse(tmp_path, canonical, value)
    assert parse(tmp_path, alias, value) != parse(tmp_path)


def test_cache_dir_and_model_config_name_or_path_are_read(tmp_path):
    (tmp_path / "unet").mkdir()
    model_args, data_args, _ = parse(
        tmp_path, "--cache_dir", str(tmp_path / "cache"), "--model_config_name_or_path", str(tmp_path / "unet")
    )
    assert data_args.cache_dir == str(tmp_path / "cache")
    assert model_args.model_config_name_or_path == str(tmp_path / "unet")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model", "vae"], "builds the DenoisingUNet of --model ddpm --architecture hf_ddpm; for --model vae"),
        (["--architecture", "diffusers_unet2d"], "for --model ddpm --architecture diffusers_unet2d use the network"),
    ],
)
def test_model_config_name_or_path_is_refused_for_other_networks(tmp_path, flags, message):
    (tmp_path / "unet").mkdir()
    with pytest.raises(SystemExit, match=message):
        parse(tmp_path, "--model_config_name_or_path", str(tmp_path / "unet"), *flags)


def test_a_missing_model_config_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match=r"no such folder or config.json\.$"):
        parse(tmp_path, "--model_config_name_or_path", str(tmp_path / "nope"))


def test_build_model_builds_the_unet_from_a_saved_config(tmp_path):
    from hf_ddpm import DenoisingUNet
    from hf_ddpm.objectives import build_model_and_objective

    DenoisingUNet(block_out_channels=(8, 16), attention_resolutions=(14,)).save_config(tmp_path / "unet")
    args = parse(tmp_path, "--model_config_name_or_path", str(tmp_path / "unet" / "config.json"))
    unet, _ = build_model_and_objective(*args)
    assert tuple(unet.config.block_out_channels) == (8, 16)
    args = parse(tmp_path, "--model_config_name_or_path", str(tmp_path / "unet"), "--resolution", "32")
    with pytest.raises(SystemExit, match=r"\(28, 1, True\) do not fit --resolution, --channels"):
        build_model_and_objective(*args)


def test_trackio_and_accelerates_other_trackers_are_accepted_names(tmp_path):
    assert {"tensorboard", "wandb", "trackio", "mlflow", "comet_ml", "none"} <= set(training_args.LOGGERS)
    import accelerate.tracking

    assert set(training_args.LOGGER_PACKAGES) <= set(accelerate.tracking.LOGGER_TYPE_TO_CLASS)
    with pytest.raises(SystemExit, match=r"^--logger 'neptune' is not one of: tensorboard, trackio, wandb"):
        parse(tmp_path, "--logger", "neptune")


@pytest.mark.parametrize("name", ["trackio", "wandb", "mlflow", "swanlab"])
def test_a_tracker_that_is_not_installed_names_the_package(tmp_path, monkeypatch, name):
    monkeypatch.setattr(training_args.accelerate.utils, f"is_{name}_available", lambda: False)
    with pytest.raises(SystemExit) as error:
        training_args.parse_arguments(["--output_dir", str(tmp_path / "out"), "--logger", name])
    assert str(error.value.code) == (
        f"--logger {name}: {name} is not installed; pip install {name}, or pass --logger tensorboard or none."
    )


def test_the_sample_grid_reaches_trackio_as_an_image():
    trackio = pytest.importorskip("trackio")
    logged = []
    tracker = types.SimpleNamespace(name="trackio", log=lambda values, step: logged.append((values, step)))
    grid = PIL.Image.fromarray(np.zeros((8, 8), dtype=np.uint8))
    log_sample_grid(types.SimpleNamespace(trackers=[tracker]), grid, step=7)
    [(values, step)] = logged
    assert step == 7 and isinstance(values["samples"], trackio.Image)


def test_cache_dir_goes_to_datasets_load_dataset(tmp_path, monkeypatch):
    import datasets

    calls = []

    def load_dataset(*args, **kwargs):
        calls.append(kwargs)
        raise FileNotFoundError("offline in this test")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(ValueError, match="Could not load 'org/digits'"):
        load_images("org/digits", cache_dir=str(tmp_path / "cache"))
    assert calls == [{"split": "train", "cache_dir": str(tmp_path / "cache")}]
