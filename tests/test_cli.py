"""The hf_ddpm command line (hf_ddpm.cli): its numbers equal the library's, its outputs, its bad-input messages."""

import json

import pytest
import torch

from hf_ddpm import (
    BoundOptions,
    DenoisingUNet,
    GaussianVAE,
    HFDDPMPipeline,
    HFDDPMScheduler,
    VAEPipeline,
    evaluate_bound,
)
from hf_ddpm.cli import main
from hf_ddpm.data import ImageTensorDataset, load_images

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    torch.manual_seed(0)
    unet = DenoisingUNet(block_out_channels=(8, 16), attention_resolutions=())
    with torch.no_grad():
        unet.conv_out.weight.normal_(0, 0.05)
    folder = tmp_path_factory.mktemp("model")
    HFDDPMPipeline(
        unet=unet, scheduler=HFDDPMScheduler(num_train_timesteps=20, variance_type="learned_range")
    ).save_pretrained(folder)
    return folder


def test_evaluate_reports_the_numbers_the_library_computes(tiny_model, tmp_path):
    out = tmp_path / "result.json"
    assert (
        main(
            [
                "evaluate",
                str(tiny_model),
                "--data",
                "embedded",
                "--split",
                "train",
                "--max_images",
                "12",
                "--timesteps_per_image",
                "3",
                "--seed",
                "4",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    pipe = HFDDPMPipeline.from_pretrained(tiny_model)
    pipe.set_progress_bar_config(disable=True)
    images = ImageTensorDataset(load_images(None, max_images=12).images)[:]
    direct = evaluate_bound(
        pipe, images, BoundOptions(timesteps_per_image=3), generator=torch.Generator().manual_seed(4)
    )
    assert result["bits_per_dim"] == pytest.approx(direct.bits_per_dim, rel=1e-12)
    assert result["standard_error"] == pytest.approx(direct.standard_error, rel=1e-12)
    assert result["terms"] == pytest.approx(direct.terms, rel=1e-12)
    assert result["estimator"] == direct.estimator and result["num_images"] == 12


def test_evaluate_a_vae_reports_elbo_and_iwae(tmp_path):
    torch.manual_seed(0)
    VAEPipeline(GaussianVAE(latent_dim=4, block_out_channels=(8, 8), hidden_dim=8)).save_pretrained(tmp_path / "vae")
    out = tmp_path / "vae.json"
    assert (
        main(
            [
                "evaluate",
                str(tmp_path / "vae"),
                "--data",
                "embedded",
                "--split",
                "train",
                "--max_images",
                "8",
                "--iwae_samples",
                "4",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert result["bits_per_dim"] == pytest.approx(sum(result["terms"].values()), rel=1e-6)
    assert result["iwae_bits_per_dim"] > 0 and result["num_images"] == 8
    images = ImageTensorDataset(load_images(None, max_images=8).images)[:]
    options = BoundOptions(iwae_samples=4)
    direct = evaluate_bound(
        VAEPipeline.from_pretrained(tmp_path / "vae"), images, options, generator=torch.Generator().manual_seed(0)
    )
    expected = direct.to_dict()
    assert set(result) - {"model", "data"} == set(expected) and result["estimator"] == expected["estimator"]
    assert result["terms"] == pytest.approx(expected["terms"], rel=1e-12)
    for key in ("bits_per_dim", "standard_error", "iwae_bits_per_dim", "iwae_standard_error"):
        assert result[key] == pytest.approx(expected[key], rel=1e-12), key


def test_sample_writes_a_grid_of_the_requested_size(tiny_model, tmp_path):
    from PIL import Image

    out = tmp_path / "grid.png"
    assert main(["sample", str(tiny_model), "--num_images", "6", "--steps", "3", "--out", str(out)]) == 0
    assert Image.open(out).size == (3 * 28, 2 * 28)
    assert (
        main(
            [
                "sample",
                str(tiny_model),
                "--num_images",
                "2",
                "--steps",
                "3",
                "--scheduler",
                "ddim",
                "--out",
                str(tmp_path / "dir"),
            ]
        )
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "dir").iterdir()) == ["00000.png", "00001.png"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sample", "no-such-folder"], "no-such-folder: no such model folder"),
        (["sample", "{model}", "--scheduler", "euler"], "--scheduler 'euler' is not one of: vdm, ddpm, ddim, dpm"),
        (["evaluate", "{model}", "--data", "/no/such/data"], "--data /no/such/data"),
    ],
)
def test_bad_input_exits_2_with_a_message(tiny_model, capsys, argv, message):
    assert main([a.format(model=tiny_model) for a in argv]) == 2
    assert message in capsys.readouterr().err
