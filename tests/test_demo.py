"""The Gradio demo (hf_ddpm.demo): its API through gradio_client, its page in a headless Chromium, the Space export
and the one-line error without gradio. Every server binds 127.0.0.1 and analytics are off."""

from __future__ import annotations

import argparse
import json
import math
import shutil
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import gradio
import numpy as np
import PIL.Image
import PIL.ImageDraw
import pytest
import torch
import yaml
from diffusers import DDIMScheduler
from gradio_client import Client, handle_file

from helpers import tiny_vdm_pipeline
from hf_ddpm import (
    BoundOptions,
    DenoisingUNet,
    GaussianVAE,
    HFDDPMPipeline,
    HFDDPMScheduler,
    VAEPipeline,
    VDMContinuousScheduler,
    VDMPipeline,
    demo,
)
from hf_ddpm.image_utils import model_range_to_output
from hf_ddpm.pipelines.auto import with_scheduler

SIZE = 8
SCALE = demo.display_scale(SIZE)
T = 20
CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module", autouse=True)
def offline_gradio(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Iterator[None]:
    """No analytics or telemetry from gradio, gradio_client, huggingface_hub or selenium; uploads in a temp dir."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
        patch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        patch.setenv("SE_AVOID_STATS", "true")
        patch.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio")))
        yield


def _perturbed(module: torch.nn.Module) -> torch.nn.Module:
    """Untrained networks start with zero output layers; random weights make every output depend on the input."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return module


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny diffusion pipeline with a learned variance, a continuous-time VDM and a two-layer VAE, saved with
    save_pretrained."""
    root = tmp_path_factory.mktemp("models")
    unet = DenoisingUNet(sample_size=SIZE, in_channels=1, block_out_channels=(8, 16), attention_resolutions=())
    scheduler = HFDDPMScheduler(num_train_timesteps=T, variance_type="learned_range")
    HFDDPMPipeline(unet=_perturbed(unet), scheduler=scheduler).save_pretrained(root / "ddpm")
    vae = GaussianVAE(sample_size=SIZE, latent_dim=4, block_out_channels=(4, 8), hidden_dim=8, num_latent_layers=2)
    VAEPipeline(vae=_perturbed(vae)).save_pretrained(root / "vae")
    tiny_vdm_pipeline(seed=3).save_pretrained(root / "vdm")
    return {"ddpm": root / "ddpm", "vdm": root / "vdm", "vae": root / "vae"}


@pytest.fixture(scope="module")
def ddpm(model_dirs: dict[str, Path]) -> HFDDPMPipeline:
    pipeline = demo.load_for_demo(str(model_dirs["ddpm"]), None)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def vdm(model_dirs: dict[str, Path]) -> VDMPipeline:
    pipeline = demo.load_for_demo(str(model_dirs["vdm"]), None)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def vae(model_dirs: dict[str, Path]) -> VAEPipeline:
    return demo.load_for_demo(str(model_dirs["vae"]), None)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def serve(pipeline: HFDDPMPipeline | VAEPipeline) -> Iterator[tuple[str, Client]]:
    """The pipeline's app served on 127.0.0.1, and a client of it; both shut down afterwards."""
    app = demo.build_demo(pipeline)
    _, url, _ = app.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=_free_port(), quiet=True)
    try:
        client = Client(url, verbose=False)
        try:
            yield url, client
        finally:
            client.close()
    finally:
        app.close()


def _drawing(path: Path, alpha: bool = False) -> Path:
    """A dark-on-light '1' drawn off-centre on a 280x280 canvas (transparent paper with ``alpha``), as a PNG."""
    image = PIL.Image.new("RGBA" if alpha else "RGB", (280, 280), (0, 0, 0, 0) if alpha else "white")
    PIL.ImageDraw.Draw(image).line([(60, 30), (80, 150)], fill="black", width=20)
    image.save(path)
    return path


def _cells(path: str, columns: int, rows: int) -> np.ndarray:
    """A served image's pixels at model resolution, (rows, columns) cells of SIZE x SIZE each."""
    pixels = np.asarray(PIL.Image.open(path).convert("L"))
    assert pixels.shape == (rows * SIZE * SCALE, columns * SIZE * SCALE)
    return pixels[::SCALE, ::SCALE]


def _bits_of(terms: dict[str, float]) -> float:
    return math.fsum(value for name, value in terms.items() if name != "bits_per_dim")


def test_load_for_demo_picks_the_saved_class(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    assert type(demo.load_for_demo(str(model_dirs["ddpm"]), None)) is HFDDPMPipeline
    assert type(demo.load_for_demo(str(model_dirs["vae"]), None)) is VAEPipeline
    assert type(demo.load_for_demo(str(model_dirs["vdm"]), None)) is VDMPipeline
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match="StableDiffusionPipeline"):
        demo.load_for_demo(str(tmp_path), None)
    with pytest.raises(ValueError, match="no such model folder"):
        demo.load_for_demo("no-such-model", None)


def test_sample_and_trajectory_follow_the_pipeline(ddpm: HFDDPMPipeline) -> None:
    generator = torch.Generator().manual_seed(5)
    own = ddpm(batch_size=3, generator=generator, num_inference_steps=10, output_type="np").images
    np.testing.assert_array_equal(demo.sample_images(ddpm, 3, 5, "vdm", 10), own)
    ddim = demo.sample_images(ddpm, 3, 5, "ddim", 10)
    np.testing.assert_array_equal(demo.sample_images(ddpm, 3, 5, "ddim", 10), ddim)
    assert not np.allclose(ddim, own)
    frames = demo.denoising_trajectory(ddpm, "vdm", 10, 5)
    assert [f.timestep for f in frames] == [19, 17, 13, 11, 8, 6, 2, 0]  # positions 0, 1, 3, 4, 5, 6, 8, 9 of 10
    # the last step of the VDM chain returns its predicted x_0: the sample that __call__ draws with the same seed
    np.testing.assert_allclose(frames[-1].predicted_original, demo.sample_images(ddpm, 1, 5, "vdm", 10)[0], atol=1e-6)
    assert len(demo.denoising_trajectory(ddpm, "ddpm", 3, 0)) == 3
    copy = with_scheduler(ddpm, "ddim")
    assert copy.unet is ddpm.unet and type(copy.scheduler) is DDIMScheduler and copy.scheduler is not ddpm.scheduler
    assert copy._progress_bar_config == {"disable": True}
    with pytest.raises(ValueError, match="scheduler must be one of"):
        demo.sample_images(ddpm, 1, 0, "euler", 10)


def test_vdm_sample_and_trajectory_follow_the_pipeline(vdm: VDMPipeline) -> None:
    assert list(vdm.scheduler_choices) == ["ancestral", "ddim"] and demo.max_steps(vdm) == demo.VDM_MAX_STEPS
    own = vdm(batch_size=3, generator=torch.Generator().manual_seed(5), num_inference_steps=7, output_type="np")
    np.testing.assert_array_equal(demo.sample_images(vdm, 3, 5, num_inference_steps=7), own.images)
    ddim = demo.sample_images(vdm, 3, 5, "ddim", 7)
    ddim_pipeline = with_scheduler(vdm, "ddim")
    assert ddim_pipeline.unet is vdm.unet and ddim_pipeline.noise_schedule is vdm.noise_schedule
    assert type(ddim_pipeline.scheduler) is VDMContinuousScheduler and ddim_pipeline.scheduler is not vdm.scheduler
    assert ddim_pipeline.scheduler.config.step_type == "ddim" and vdm.scheduler.config.step_type == "ancestral"
    own_ddim = ddim_pipeline(
        batch_size=3, generator=torch.Generator().manual_seed(5), num_inference_steps=7, output_type="np"
    )
    np.testing.assert_array_equal(ddim, own_ddim.images)
    assert not np.allclose(ddim, own.images)
    frames = demo.denoising_trajectory(vdm, "ancestral", 10, 5)
    # the grid t_i = i / 10 from t = 1 down, at positions 0, 1, 3, 4, 5, 6, 8, 9 of 10
    assert [f.timestep for f in frames] == pytest.approx([1.0, 0.9, 0.7, 0.6, 0.5, 0.4, 0.2, 0.1])
    # the last step returns the clipped x_hat: the sample that __call__ draws with the same seed
    np.testing.assert_allclose(frames[-1].predicted_original, demo.sample_images(vdm, 1, 5, None, 10)[0], atol=1e-6)
    np.testing.assert_allclose(frames[0].noisy, demo.denoising_trajectory(vdm, "ddim", 10, 5)[0].noisy)  # same z_1
    with pytest.raises(ValueError, match="scheduler must be one of ancestral, ddim"):
        demo.sample_images(vdm, 1, 0, "vdm", 10)
    assert list(ddim_pipeline.scheduler_choices) == ["ddim", "ancestral"]  # a model saved with DDIM steps samples so
    np.testing.assert_array_equal(demo.sample_images(ddim_pipeline, 3, 5, num_inference_steps=7), ddim)


@pytest.mark.parametrize("kind, scheduler", [("ddpm", "vdm"), ("ddpm", "dpm"), ("vdm", "ancestral"), ("vdm", "ddim")])
def test_trajectory_frames_are_the_steps_of_the_seeded_call(kind: str, scheduler: str, request) -> None:
    pipeline = request.getfixturevalue(kind)
    seen = []

    def keep(pipe, step_index: int, timestep: torch.Tensor, callback_kwargs: dict) -> dict:
        seen.append((timestep.item(), *(model_range_to_output(x, "np")[0] for x in callback_kwargs.values())))
        return {}

    images = with_scheduler(pipeline, scheduler)(
        generator=torch.Generator().manual_seed(6),
        num_inference_steps=7,
        output_type="np",
        callback_on_step_end=keep,
        callback_on_step_end_tensor_inputs=["sample", "pred_original_sample", "latents"],
    ).images
    frames = demo.denoising_trajectory(pipeline, scheduler, 7, 6, num_frames=7)
    assert len(frames) == len(seen) == 7
    for frame, (timestep, noisy, predicted, _) in zip(frames, seen):
        assert frame.timestep == timestep
        np.testing.assert_array_equal(frame.noisy, noisy)
        np.testing.assert_array_equal(frame.predicted_original, predicted)
    np.testing.assert_array_equal(seen[-1][3], images[0])  # the chain the frames show ends at the call's image
    x_T = torch.randn((1, 1, SIZE, SIZE), generator=torch.Generator().manual_seed(6))
    np.testing.assert_array_equal(frames[0].noisy, model_range_to_output(x_T, "np")[0])  # and starts at the seed's


def test_vdm_app_api(vdm: VDMPipeline, tmp_path: Path) -> None:
    with serve(vdm) as (_, client):
        endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
        assert set(endpoints) == {"/sample", "/trajectory", "/score"}
        for scheduler in list(vdm.scheduler_choices):
            grid = _cells(client.predict(6, scheduler, 2, 4, api_name="/sample"), columns=2, rows=2)
            expected = (demo.sample_images(vdm, 4, 2, scheduler, 6)[..., 0] * 255).round()
            np.testing.assert_array_equal(grid[SIZE:, :SIZE], expected[2])
        frames = client.predict(4, "ancestral", 1, api_name="/trajectory")
        assert [f["caption"] for f in frames] == ["t = 1", "t = 0.75", "t = 0.5", "t = 0.25"]
        final = (demo.sample_images(vdm, 1, 1, "ancestral", 4)[0, ..., 0] * 255).round()
        np.testing.assert_array_equal(_cells(frames[-1]["image"], columns=2, rows=1)[:, SIZE:], final)
        drawing = _drawing(tmp_path / "one.png")
        upload = {"background": handle_file(str(drawing)), "layers": [], "composite": None}
        _, terms = client.predict(upload, api_name="/score")
        assert set(terms) == {"bits_per_dim", "prior_term", "diffusion_term", "reconstruction_term"}
        assert all(math.isfinite(value) and value > 0 for value in terms.values())
        assert abs(_bits_of(terms) - terms["bits_per_dim"]) < 1e-6
        assert terms == pytest.approx(demo.score_image(vdm, demo.to_model_image(PIL.Image.open(drawing), SIZE, 1)))


def test_diffusion_app_api(ddpm: HFDDPMPipeline, tmp_path: Path) -> None:
    with serve(ddpm) as (_, client):
        endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
        assert set(endpoints) == {"/sample", "/trajectory", "/score"}
        for scheduler in ddpm.scheduler_choices:  # vdm, ddpm, ddim, dpm: the CLI's --scheduler choices
            grid = _cells(client.predict(10, scheduler, 3, 3, api_name="/sample"), columns=2, rows=2)
            expected = (demo.sample_images(ddpm, 3, 3, scheduler, 10)[..., 0] * 255).round()
            for index in range(3):
                top, left = (SIZE * position for position in divmod(index, 2))
                np.testing.assert_array_equal(grid[top : top + SIZE, left : left + SIZE], expected[index])
            assert not grid[SIZE:, SIZE:].any()  # the fourth cell pads the grid

        for scheduler in ("vdm", "ddim"):  # ddim gets the first C of the 2C output channels
            frames = client.predict(T, scheduler, 1, api_name="/trajectory")
            assert len(frames) == demo.TRAJECTORY_FRAMES
            for frame in frames:
                _cells(frame["image"], columns=2, rows=1)
        frames = client.predict(5, "vdm", 1, api_name="/trajectory")
        assert [f["caption"] for f in frames] == ["t = 19", "t = 14", "t = 10", "t = 5", "t = 0"]
        final = (demo.sample_images(ddpm, 1, 1, "vdm", 5)[0, ..., 0] * 255).round()
        np.testing.assert_array_equal(_cells(frames[-1]["image"], columns=2, rows=1)[:, SIZE:], final)

        drawing = _drawing(tmp_path / "one.png")
        upload = {"background": handle_file(str(drawing)), "layers": [], "composite": None}
        shown, terms = client.predict(upload, api_name="/score")
        model_image = demo.to_model_image(PIL.Image.open(drawing), SIZE, 1)
        np.testing.assert_array_equal(_cells(shown, columns=1, rows=1), model_image)
        assert set(terms) == {"bits_per_dim", "prior_term", "denoising_terms", "reconstruction_term"}
        assert all(math.isfinite(value) and value > 0 for value in terms.values())
        assert abs(_bits_of(terms) - terms["bits_per_dim"]) < 1e-6
        assert terms == pytest.approx(demo.score_image(ddpm, model_image), abs=1e-12)
        drawn = {"background": None, "layers": [], "composite": handle_file(str(drawing))}
        assert client.predict(drawn, api_name="/score")[1] == pytest.approx(terms, abs=1e-12)


def test_score_image_is_the_pipeline_elbo(ddpm: HFDDPMPipeline, vdm: VDMPipeline, vae: VAEPipeline) -> None:
    digit = np.zeros((SIZE, SIZE), dtype=np.uint8)
    digit[1:7, 3:5] = 255
    terms = demo.score_image(ddpm, digit, seed=4)
    bound = ddpm.elbo(digit[None], generator=torch.Generator().manual_seed(4))
    assert terms["bits_per_dim"] == pytest.approx(float(bound.per_image[0]), abs=1e-12)
    assert abs(_bits_of(terms) - terms["bits_per_dim"]) < 1e-6
    terms = demo.score_image(vdm, digit, seed=4)
    bound = vdm.elbo(digit[None], generator=torch.Generator().manual_seed(4))
    assert terms == {
        "bits_per_dim": float(bound.per_image[0]),
        "prior_term": float(bound.per_image_terms["prior"][0]),
        "diffusion_term": float(bound.per_image_terms["diffusion"][0]),
        "reconstruction_term": float(bound.per_image_terms["reconstruction"][0]),
    }
    assert abs(_bits_of(terms) - terms["bits_per_dim"]) < 1e-9
    terms = demo.score_image(vae, digit, seed=4)
    assert set(terms) == {"bits_per_dim", "reconstruction_term", "kl_term", "layer_1_term"}
    options = BoundOptions(elbo_samples=demo.VAE_ELBO_SAMPLES, iwae_samples=0)
    elbo = vae.elbo(digit[None], options=options, generator=torch.Generator().manual_seed(4))
    assert terms["bits_per_dim"] == pytest.approx(float(elbo.per_image[0]), rel=1e-6)
    # each term is the model's own ELBO term in nats, over D ln 2, D = 1 x 8 x 8
    with torch.no_grad():
        model_elbo = vae.vae.elbo(
            torch.from_numpy(digit[None, None] / 127.5 - 1).float(),
            num_samples=demo.VAE_ELBO_SAMPLES,
            generator=torch.Generator().manual_seed(4),
        )
    nats = {
        "reconstruction_term": model_elbo.reconstruction_nats[0],
        "kl_term": model_elbo.kl_nats[0],
        "layer_1_term": model_elbo.layer_nats[0, 0],
    }
    for name, value in nats.items():
        assert terms[name] == pytest.approx(float(value) / (SIZE * SIZE * math.log(2)), rel=1e-12), name


def test_vae_app_api(vae: VAEPipeline, tmp_path: Path) -> None:
    with serve(vae) as (_, client):
        endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
        assert set(endpoints) == {"/sample", "/score"}
        grid = _cells(client.predict(2, 4, api_name="/sample"), columns=2, rows=2)
        np.testing.assert_array_equal(grid[SIZE:, :SIZE], (demo.sample_images(vae, 4, 2)[2, ..., 0] * 255).round())
        drawing = _drawing(tmp_path / "one.png")
        upload = {"background": handle_file(str(drawing)), "layers": [], "composite": None}
        _, terms = client.predict(upload, api_name="/score")
        assert set(terms) == {"bits_per_dim", "reconstruction_term", "kl_term", "layer_1_term"}
        assert all(math.isfinite(value) for value in terms.values())
        assert abs(_bits_of(terms) - terms["bits_per_dim"]) < 1e-6


def test_to_model_image_inverts_and_frames_drawings(tmp_path: Path) -> None:
    framed = demo.to_model_image(PIL.Image.open(_drawing(tmp_path / "one.png")), SIZE, 1)
    assert framed.shape == (SIZE, SIZE) and framed.dtype == np.uint8
    assert framed[0].max() == 0 and framed[:, 0].max() == 0 and framed.max() > 200  # white strokes on black
    rows, columns = np.indices(framed.shape)
    weights = framed / framed.sum()
    assert abs((rows * weights).sum() - SIZE / 2) <= 1 and abs((columns * weights).sum() - SIZE / 2) <= 1
    ink_rows = np.nonzero(framed.max(axis=1) >= demo.INK_THRESHOLD)[0]
    assert ink_rows.max() - ink_rows.min() + 1 == round(SIZE * demo.DIGIT_BOX_FRACTION)
    # transparent paper counts as white; a white-on-black image is not inverted
    transparent = PIL.Image.open(_drawing(tmp_path / "transparent.png", alpha=True))
    np.testing.assert_array_equal(demo.to_model_image(transparent, SIZE, 1), framed)
    inverted = PIL.Image.fromarray(255 - np.asarray(PIL.Image.open(tmp_path / "one.png").convert("L")))
    np.testing.assert_array_equal(demo.to_model_image(inverted, SIZE, 1), framed)
    # an image of the model's size is scored as it is
    digit = np.zeros((SIZE, SIZE), dtype=np.uint8)
    digit[2:5, 1:3] = [[30, 200], [255, 90], [7, 120]]
    np.testing.assert_array_equal(demo.to_model_image(PIL.Image.fromarray(digit), SIZE, 1), digit)
    assert demo.to_model_image(PIL.Image.new("RGB", (40, 30), "red"), SIZE, 3).shape == (SIZE, SIZE, 3)
    with pytest.raises(ValueError, match="blank"):
        demo.to_model_image(PIL.Image.new("L", (280, 280), 255), SIZE, 1)


@pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs chromium and chromedriver on PATH (apt-get install chromium chromium-driver)",
)
def test_page_samples_in_a_browser(ddpm: HFDDPMPipeline, tmp_path: Path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    with serve(ddpm) as (url, _):
        driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
        try:
            driver.get(url)
            button = (By.ID, "sample-button")
            WebDriverWait(driver, 30).until(expected_conditions.element_to_be_clickable(button)).click()
            loaded = "const i = document.querySelector('#samples img'); return i && i.complete ? i.naturalWidth : 0;"
            width = WebDriverWait(driver, 60).until(lambda d: d.execute_script(loaded))
            assert width == 4 * SIZE * SCALE  # the default 16 images, 4 x 4
            requests = [json.loads(entry["message"])["message"] for entry in driver.get_log("performance")]
            requested = {m["params"]["request"]["url"] for m in requests if m["method"] == "Network.requestWillBeSent"}
            network = {u for u in requested if u.startswith(("http:", "https:", "ws:", "wss:"))}
            assert network and all(u.startswith(url) for u in network), network  # the page reaches only the app
        finally:
            driver.quit()


def _demo_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    demo.add_demo_arguments(parser)
    return parser.parse_args(argv)


def test_demo_arguments_reach_launch(model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    args = _demo_args("org/model")
    assert vars(args) == {
        "model": "org/model",
        "revision": None,
        "host": "127.0.0.1",
        "port": 7860,
        "share": False,
        "export_space": None,
        "overwrite": False,
    }
    launched = []
    monkeypatch.setattr(gradio.Blocks, "launch", lambda app, **options: launched.append((app, options)))
    assert demo.run_demo(_demo_args(str(model_dirs["vae"]), "--host", "0.0.0.0", "--port", "7999", "--share")) == 0
    [(app, options)] = launched
    assert isinstance(app, gradio.Blocks) and options == {"server_name": "0.0.0.0", "server_port": 7999, "share": True}


def test_export_space(
    tmp_path: Path, ddpm: HFDDPMPipeline, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    space = tmp_path / "space"
    assert demo.run_demo(_demo_args("org/ddpm-mnist", "--revision", "v1", "--export_space", str(space))) == 0
    assert sorted(p.name for p in space.iterdir()) == ["README.md", "app.py", "requirements.txt"]
    app = (space / "app.py").read_text()
    code = compile(app, str(space / "app.py"), "exec")
    assert "'org/ddpm-mnist'" in app
    front, _, body = (space / "README.md").read_text().removeprefix("---\n").partition("\n---\n")
    meta = yaml.safe_load(front)
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py" and meta["sdk_version"] == gradio.__version__
    assert meta["models"] == ["org/ddpm-mnist"] and "org/ddpm-mnist" in body
    requirements = (space / "requirements.txt").read_text().split()
    assert [line.split("==")[0] for line in requirements] == ["hf_ddpm", "gradio", "torch"]
    # app.py loads that model id at that revision and builds the app
    loaded = []
    monkeypatch.setattr(demo, "load_for_demo", lambda model, revision: loaded.append((model, revision)) or ddpm)
    namespace = {"__name__": "space_app"}
    exec(code, namespace)
    assert loaded == [("org/ddpm-mnist", "v1")] and isinstance(namespace["demo"], gradio.Blocks)
    capsys.readouterr()
    assert demo.run_demo(_demo_args(str(space), "--export_space", str(tmp_path / "other"))) == 2
    assert "pass a repo id ORG/NAME" in capsys.readouterr().err


def test_missing_gradio_is_one_line(
    ddpm: HFDDPMPipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "gradio", None)
    with pytest.raises(ImportError, match=r"^the demo needs gradio: pip install 'hf_ddpm\[demo\]'$"):
        demo.build_demo(ddpm)
    assert demo.run_demo(_demo_args("org/model", "--export_space", str(tmp_path))) == 2
    assert demo.run_demo(_demo_args("org/model")) == 2
    assert capsys.readouterr().err == "hf_ddpm: error: the demo needs gradio: pip install 'hf_ddpm[demo]'\n" * 2
    assert not any(tmp_path.iterdir())
