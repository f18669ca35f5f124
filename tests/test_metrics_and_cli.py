"""The sample-quality metric (closed forms, real digits) and the hf_ddpm command line (numbers equal the library's)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_ddpm import DenoisingUNet, HFDDPMPipeline, VDMScheduler
from hf_ddpm.cli import main
from hf_ddpm.data import ImageTensorDataset, load_images
from hf_ddpm.evaluation import estimate_bound
from hf_ddpm.metrics import frechet_distance, mnist_classifier, sample_quality

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
needs_mnist = pytest.mark.skipif(not MNIST.is_dir(), reason=f"the MNIST IDX files are not at {MNIST}")


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


@needs_mnist
def test_classifier_recognises_real_digits_and_the_metric_separates_digits_from_noise():
    test = load_images(str(MNIST), split="test")
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


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    torch.manual_seed(0)
    unet = DenoisingUNet(block_out_channels=(8, 16), attention_resolutions=())
    with torch.no_grad():
        unet.conv_out.weight.normal_(0, 0.05)
    folder = tmp_path_factory.mktemp("model")
    HFDDPMPipeline(unet=unet, scheduler=VDMScheduler(num_train_timesteps=20, variance_type="learned_range")).save_pretrained(folder)
    return folder


def test_evaluate_reports_the_numbers_the_library_computes(tiny_model, tmp_path):
    out = tmp_path / "result.json"
    assert main(["evaluate", str(tiny_model), "--data", "embedded", "--split", "train", "--max_images", "12",
                 "--timesteps_per_image", "3", "--seed", "4", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    pipe = HFDDPMPipeline.from_pretrained(tiny_model)
    images = ImageTensorDataset(load_images(None, max_images=12).images)[:]
    direct = estimate_bound(VDMScheduler.from_config(pipe.scheduler.config), lambda x, t: pipe.unet(x.float(), t).sample, images,
                            timesteps_per_image=3, generator=torch.Generator().manual_seed(4))
    assert result["bits_per_dim"] == pytest.approx(direct.bits_per_dim, rel=1e-12)
    assert result["standard_error"] == pytest.approx(direct.standard_error, rel=1e-12)
    assert result["num_images"] == 12


def test_evaluate_a_vae_reports_elbo_and_iwae(tmp_path):
    from hf_ddpm import GaussianVAE, VAEPipeline

    torch.manual_seed(0)
    VAEPipeline(GaussianVAE(latent_dim=4, block_out_channels=(8, 8), hidden_dim=8)).save_pretrained(tmp_path / "vae")
    out = tmp_path / "vae.json"
    assert main(["evaluate", str(tmp_path / "vae"), "--data", "embedded", "--split", "train", "--max_images", "8",
                 "--iwae_samples", "4", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["bits_per_dim"] == pytest.approx(sum(result["terms"].values()), rel=1e-6)
    assert result["iwae_bits_per_dim"] > 0 and result["num_images"] == 8


def test_sample_writes_a_grid_of_the_requested_size(tiny_model, tmp_path):
    from PIL import Image

    out = tmp_path / "grid.png"
    assert main(["sample", str(tiny_model), "--num_images", "6", "--steps", "3", "--out", str(out)]) == 0
    assert Image.open(out).size == (3 * 28, 2 * 28)
    assert main(["sample", str(tiny_model), "--num_images", "2", "--steps", "3", "--scheduler", "ddim", "--out", str(tmp_path / "dir")]) == 0
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
