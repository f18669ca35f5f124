"""Any image dataset, not only 28x28 digits (issue #13, point 3): the default network's layout rule, RGB networks of
every model kind, and a train.py run on real colour artwork (the emoji of Debian's fonts-noto-color-emoji, rendered
at 32x32 by hf_ddpm.data.emoji) whose pipeline, bound (D = 3 x 32 x 32), sample grid and card are checked."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from helpers import TINY_TRAIN, randomized, without_flags  # first: it makes training/train.py importable
from hf_ddpm import DenoisingUNet, HFDDPMPipeline, default_unet_layout, training_args
from hf_ddpm.data import ImageTensorDataset, load_images
from hf_ddpm.data.emoji import EMOJI_CODE_POINTS, NOTO_COLOR_EMOJI, main, render_emoji_folder
from hf_ddpm.ddpm.chain import DECODER_MIN_STD
from hf_ddpm.ddpm.elbo import prior_term, term_at
from hf_ddpm.models.unet import SelfAttention
from hf_ddpm.objectives import build_model_and_objective

pytestmark = pytest.mark.usefixtures("one_thread")
import train  # noqa: E402  (importable through helpers)

needs_font = pytest.mark.skipif(
    not NOTO_COLOR_EMOJI.is_file(),
    reason=f"{NOTO_COLOR_EMOJI} is missing: apt-get install fonts-noto-color-emoji",
)
#: TINY_TRAIN with the network left to default_unet_layout.
TINY_DEFAULT_LAYOUT = without_flags(TINY_TRAIN, "--block_out_channels", "--attention_resolutions")


# ---------------------------------------------------------------------------------------------- the layout rule
@pytest.mark.parametrize(
    "resolution, grayscale, rgb",
    [
        (16, ((32, 64), (8,)), ((48, 96), (8,))),
        (28, ((32, 64, 64), (7,)), ((48, 96, 96), (7,))),
        (32, ((32, 64, 64), (8,)), ((48, 96, 96), (8,))),
        (48, ((32, 64, 64), (12,)), ((48, 96, 96), (12,))),
        (64, ((32, 64, 64, 64), (8,)), ((48, 96, 96, 96), (8,))),
    ],
)
def test_default_unet_layout_halves_to_seven_and_widens_for_rgb(resolution, grayscale, rgb):
    assert default_unet_layout(resolution, 1) == grayscale
    assert default_unet_layout(resolution, 3) == rgb
    widths, (attention,) = rgb
    assert resolution % 2 ** (len(widths) - 1) == 0 and attention == resolution // 2 ** (len(widths) - 1) >= 7
    assert attention // 2 < 7 or attention % 2  # halving once more would go below 7 or off the integers


def test_default_unet_layout_is_todays_mnist_default_and_refuses_what_it_cannot_size():
    assert default_unet_layout(28, 1) == ((32, 64, 64), (7,))
    defaults = DenoisingUNet().config
    assert (tuple(defaults.block_out_channels), tuple(defaults.attention_resolutions)) == ((32, 64, 64), (7,))
    with pytest.raises(ValueError, match="channels must be 1"):
        default_unet_layout(32, 2)
    with pytest.raises(ValueError, match="resolution must be a positive"):
        default_unet_layout(0, 1)
    assert default_unet_layout(28, 1, base_width=16) == ((16, 32, 32), (7,))
    assert default_unet_layout(64, 3, base_width=24) == ((24, 48, 48, 48), (8,))
    with pytest.raises(ValueError, match="base_width must be a positive"):
        default_unet_layout(28, 1, base_width=0)


@pytest.mark.parametrize("resolution", [32, 64])
def test_a_unet_from_the_rule_maps_rgb_images_to_a_prediction_and_a_variance(resolution):
    widths, attention = default_unet_layout(resolution, 3)
    torch.manual_seed(0)
    unet = DenoisingUNet(
        sample_size=resolution, in_channels=3, block_out_channels=widths, attention_resolutions=attention
    )
    randomized(unet, 0)  # its output layer starts at zero
    with torch.no_grad():
        out = unet(torch.randn(2, 3, resolution, resolution), torch.tensor([3, 700])).sample
    assert out.shape == (2, 6, resolution, resolution) and out.std() > 0
    downsamplings = [m for m in unet.modules() if isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2)]
    assert len(downsamplings) == len(widths) - 1
    # attention at the coarsest level only: its one down block, its two up blocks, and the middle block
    assert sum(isinstance(m, SelfAttention) for m in unet.modules()) == 4


# ---------------------------------------------------------------------------------------------- train.py's arguments
def parse(tmp_path: Path, *flags: str):
    """train.py's arguments on a CPU (the cpu recipe unless ``flags`` name another)."""
    recipe = [] if "--recipe" in flags else ["--recipe", "cpu"]
    return training_args.parse_arguments([*recipe, "--output_dir", str(tmp_path / "out"), "--logger", "none", *flags])


def test_unset_network_flags_follow_the_rule_and_explicit_ones_win(tmp_path):
    # the gpu recipe: default_unet_layout as it is
    model_args, _, _ = parse(tmp_path, "--recipe", "gpu")
    assert (model_args.block_out_channels, model_args.attention_resolutions) == ([32, 64, 64], [7])
    model_args, _, _ = parse(tmp_path, "--recipe", "gpu", "--resolution", "32", "--channels", "3")
    assert (model_args.block_out_channels, model_args.attention_resolutions) == ([48, 96, 96], [8])
    model_args, _, _ = parse(tmp_path, "--recipe", "gpu", "--resolution", "64", "--channels", "3")
    assert (model_args.block_out_channels, model_args.attention_resolutions) == ([48, 96, 96, 96], [8])
    # the cpu recipe's DDPM: half the base width, the same levels and attention; its VAE and VDM: the full width
    model_args, _, _ = parse(tmp_path, "--recipe", "cpu")
    assert (model_args.block_out_channels, model_args.attention_resolutions) == ([16, 32, 32], [7])
    model_args, _, _ = parse(tmp_path, "--recipe", "cpu", "--resolution", "64", "--channels", "3")
    assert (model_args.block_out_channels, model_args.attention_resolutions) == ([24, 48, 48, 48], [8])
    model_args, _, _ = parse(tmp_path, "--recipe", "cpu", "--model", "vdm")
    assert model_args.block_out_channels == [32, 64, 64]
    # explicit widths: attention at their coarsest level; explicit attention: kept
    model_args, _, _ = parse(tmp_path, "--resolution", "32", "--block_out_channels", "8", "16")
    assert (model_args.block_out_channels, model_args.attention_resolutions) == ([8, 16], [16])
    model_args, _, _ = parse(tmp_path, "--resolution", "32", "--channels", "3", "--attention_resolutions", "16", "8")
    assert (model_args.block_out_channels, model_args.attention_resolutions) == ([24, 48, 48], [16, 8])
    # the VAE halves twice: two widths even where the rule has one level, and a resolution divisible by 4
    model_args, _, _ = parse(tmp_path, "--model", "vae", "--resolution", "12")
    assert model_args.block_out_channels == [32, 64]
    with pytest.raises(SystemExit, match=r"--model vae halves the image twice.*--resolution 14"):
        parse(tmp_path, "--model", "vae", "--resolution", "14")
    # the checks run on the resolved values; a YAML null means the default too
    with pytest.raises(SystemExit, match=r"--resolution 30 cannot be halved 2 times"):
        parse(tmp_path, "--resolution", "30", "--block_out_channels", "8", "16", "16")
    (tmp_path / "run.yaml").write_text("block_out_channels: null\nresolution: 16\nchannels: 3\n")
    model_args, _, _ = parse(tmp_path, "--config", str(tmp_path / "run.yaml"))
    assert (model_args.block_out_channels, model_args.attention_resolutions) == ([24, 48], [8])
    model_args, _, _ = parse(tmp_path, "--config", str(tmp_path / "run.yaml"), "--recipe", "gpu")
    assert (model_args.block_out_channels, model_args.attention_resolutions) == ([48, 96], [8])
    # what the run's start log line says
    model_args, data_args, train_args = parse(tmp_path, "--model", "vae", "--resolution", "32", "--channels", "3")
    assert training_args.describe_network_layout(model_args, data_args, train_args.recipe) == (
        "VAE widths [48, 96] (the first two of [48, 96, 96], default_unet_layout(32, 3))"
    )
    model_args, data_args, _ = parse(tmp_path, "--recipe", "cpu")
    assert training_args.describe_network_layout(model_args, data_args, "cpu") == (
        "UNet levels [28, 14, 7] with widths [16, 32, 32], self-attention at [7] (default_unet_layout(28, 1, 16) of "
        "the cpu recipe)"
    )
    model_args, data_args, train_args = parse(tmp_path, "--block_out_channels", "8", "16")
    assert training_args.describe_network_layout(model_args, data_args, train_args.recipe) == (
        "UNet levels [28, 14] with widths [8, 16], self-attention at [14] (--block_out_channels / "
        "--attention_resolutions)"
    )
    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(training_args.ModelArguments)}
    assert "default_unet_layout" in helps["block_out_channels"] and "16 32 32" in helps["block_out_channels"]
    assert "coarsest level" in helps["attention_resolutions"]


def test_fourier_features_default_to_the_vdms_and_reach_the_ddpms_unet_when_asked(tmp_path):
    model_args, data_args, train_args = parse(tmp_path, "--model", "vdm")
    assert model_args.fourier_features == [7, 8]
    assert build_model_and_objective(model_args, data_args, train_args)[0].unet.config.fourier_features == (7, 8)
    model_args, data_args, train_args = parse(tmp_path)
    assert model_args.fourier_features == []
    assert build_model_and_objective(model_args, data_args, train_args)[0].conv_in.in_channels == 1
    model_args, data_args, train_args = parse(tmp_path, "--fourier_features", "7", "8")
    unet = build_model_and_objective(model_args, data_args, train_args)[0]
    assert unet.config.fourier_features == (7, 8) and unet.conv_in.in_channels == 1 + 2 * 2  # x, 2 sines, 2 cosines
    assert training_args.describe_network_layout(model_args, data_args, "cpu") == (
        "UNet levels [28, 14, 7] with widths [16, 32, 32], self-attention at [7], Fourier features [7, 8] "
        "(default_unet_layout(28, 1, 16) of the cpu recipe)"
    )
    with pytest.raises(SystemExit, match=r"^--fourier_features feeds a DenoisingUNet .*diffusers_unet2d"):
        parse(tmp_path, "--fourier_features", "8", "--architecture", "diffusers_unet2d")
    with pytest.raises(SystemExit, match=r"^--fourier_features must be exponents >= 0, got \[-1\]"):
        parse(tmp_path, "--fourier_features", "-1")


def test_decoder_share_reaches_the_oversampler_and_is_refused_where_nothing_oversamples_the_decoder(tmp_path):
    objective = build_model_and_objective(*parse(tmp_path))[1]  # the cpu recipe: hybrid_decoder, auto
    assert objective.timestep_sampler.probabilities()[0] == pytest.approx(1 / 32 + (31 / 32) / 1000)
    objective = build_model_and_objective(*parse(tmp_path, "--decoder_share", "0.125"))[1]
    assert objective.timestep_sampler.probabilities()[0] == pytest.approx(1 / 8 + (7 / 8) / 1000)
    with pytest.raises(SystemExit, match=r"^--decoder_share is the share of .* draws timesteps 'uniform' for"):
        parse(tmp_path, "--decoder_share", "0.125", "--loss_type", "hybrid")
    with pytest.raises(SystemExit, match=r"^--decoder_share must be in \[0, 1\), got 1.0\.$"):
        parse(tmp_path, "--decoder_share", "1")


def test_decoder_min_std_reaches_the_scheduler_and_is_refused_where_no_decoder_learns_its_variance(tmp_path):
    scheduler = build_model_and_objective(*parse(tmp_path))[1].scheduler  # learned_range: hf_ddpm's floor
    assert scheduler.config.decoder_min_std == DECODER_MIN_STD == 1 / 1020
    scheduler = build_model_and_objective(*parse(tmp_path, "--decoder_min_std", "0.002"))[1].scheduler
    assert scheduler.train_chain.learned_range_min_log_variance[0] == 2 * math.log(0.002)
    fixed = build_model_and_objective(*parse(tmp_path, "--variance_type", "fixed_small", "--loss_type", "simple"))
    assert fixed[1].scheduler.config.decoder_min_std is None
    with pytest.raises(SystemExit, match=r"^--decoder_min_std is the .* --model ddpm --variance_type fixed_small:"):
        parse(tmp_path, "--decoder_min_std", "0.002", "--variance_type", "fixed_small", "--loss_type", "simple")
    with pytest.raises(SystemExit, match=r"^--decoder_min_std is the .* --model vdm --variance_type learned_range:"):
        parse(tmp_path, "--decoder_min_std", "0.002", "--model", "vdm")
    with pytest.raises(
        SystemExit, match=r"^--decoder_min_std must lie in \(0, sqrt\(beta_1\) = 0.006425\), got 0.01\.$"
    ):
        parse(tmp_path, "--decoder_min_std", "0.01")


@pytest.mark.parametrize("model", ["ddpm", "diffusers_unet2d", "vdm", "vae"])
def test_every_model_kind_builds_trains_and_samples_rgb_at_32(tmp_path, model):
    architecture = ["--architecture", "diffusers_unet2d"] if model == "diffusers_unet2d" else []
    kind = "ddpm" if model == "diffusers_unet2d" else model
    flags = ["--model", kind, *architecture, "--resolution", "32", "--channels", "3", "--num_train_timesteps", "50"]
    args = parse(tmp_path, *flags, "--sample_steps", "2")
    torch.manual_seed(0)
    network, objective = build_model_and_objective(*args)
    config = network.unet.config if kind == "vdm" else network.config
    assert (config.in_channels, config.sample_size) == (3, 32)
    if kind == "vae":
        assert tuple(config.block_out_channels) == (48, 96)
    else:  # the cpu recipe's DDPM at half the width (the tests run the cpu recipe)
        assert tuple(config.block_out_channels) == ((24, 48, 48) if kind == "ddpm" else (48, 96, 96))
    images = torch.randint(0, 256, (2, 3, 32, 32), generator=torch.Generator().manual_seed(0)) / 127.5 - 1
    assert torch.isfinite(objective.loss(network, images).loss).all()
    pipeline = objective.pipeline(network)
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    samples = pipeline(batch_size=2, generator=generator, output_type="np", **objective.sampling_kwargs).images
    assert samples.shape == (2, 32, 32, 3)


# ---------------------------------------------------------------------------------------------- the emoji
@pytest.fixture(scope="module")
def emoji(tmp_path_factory) -> Path:
    if not NOTO_COLOR_EMOJI.is_file():
        pytest.skip(f"{NOTO_COLOR_EMOJI} is missing: apt-get install fonts-noto-color-emoji")
    folder = tmp_path_factory.mktemp("noto") / "emoji32"
    render_emoji_folder(folder, resolution=32)
    return folder


@needs_font
def test_the_emoji_are_real_varied_colour_images(emoji):
    files = sorted(emoji.glob("*.png"))
    assert 1000 <= len(files) < len(EMOJI_CODE_POINTS)  # ~1,200 drawn, the code points without a glyph skipped
    assert files[0].name == "emoji_u1f300.png"
    with PIL.Image.open(files[0]) as first:
        assert (first.mode, first.size) == ("RGB", (32, 32))
    data = load_images(str(emoji), channels=3, resolution=32)
    images = data.images.astype(np.float64)  # (N, 3, 32, 32), as --train_data_dir reads them
    assert images.shape == (len(files), 3, 32, 32)
    assert len({image.tobytes() for image in data.images}) >= 0.99 * len(files)  # distinct
    assert (images.reshape(len(files), -1).std(axis=1) > 10).all()  # none constant
    assert ((images < 250).reshape(len(files), -1).mean(axis=1) > 0.02).all()  # none all white
    colourful = (images.max(axis=1) - images.min(axis=1) > 60).reshape(len(files), -1).mean(axis=1) > 0.05
    assert colourful.mean() > 0.75  # colour, not gray (86% in Debian 12's font; clocks, hats are gray)
    mean_image_distance = np.abs(images[:64, None] - images[None, :64]).mean(axis=(2, 3, 4))
    assert np.median(mean_image_distance[np.triu_indices(64, 1)]) > 20  # far apart on the 0..255 scale


def test_a_missing_font_says_what_to_install(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="apt-get install fonts-noto-color-emoji"):
        render_emoji_folder(tmp_path / "out", font_path=tmp_path / "NotoColorEmoji.ttf")
    assert main([str(tmp_path / "out"), "--font", str(tmp_path / "nope.ttf")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "apt-get install fonts-noto-color-emoji" in lines[0]


@needs_font
def test_the_module_command_writes_a_folder_train_py_reads(tmp_path, capsys):
    assert main([str(tmp_path / "e16"), "--resolution", "16", "--limit", "5"]) == 0
    assert "--train_data_dir" in capsys.readouterr().out
    assert load_images(str(tmp_path / "e16"), channels=3, resolution=16).images.shape == (5, 3, 16, 16)


@needs_font
def test_the_emoji_as_a_dataset_read_as_the_folder_reads(emoji, tmp_path):
    import datasets

    files = sorted(emoji.glob("*.png"))[:8]
    datasets.Dataset.from_dict({"image": [str(f) for f in files]}).cast_column("image", datasets.Image()).save_to_disk(
        str(tmp_path / "emoji_dataset")
    )
    from_dataset = load_images(str(tmp_path / "emoji_dataset"), channels=3, resolution=32)  # as --dataset_name
    from_folder = load_images(str(emoji), channels=3, resolution=32, max_images=8)  # as --train_data_dir
    np.testing.assert_array_equal(from_dataset.images, from_folder.images)


# ---------------------------------------------------------------------------------------------- train.py end to end
@needs_font
def test_a_train_py_run_on_rgb_emoji_writes_an_rgb_pipeline_bound_grid_and_card(emoji, tmp_path, caplog):
    out = tmp_path / "ddpm-emoji"
    flags = [*TINY_DEFAULT_LAYOUT, "--train_data_dir", str(emoji), "--channels", "3", "--resolution", "32"]
    flags += ["--max_train_steps", "2"]
    with caplog.at_level(logging.INFO):
        # 64 emoji: 4 held out (also the bound-by-time plot's images: its T = 50 evaluations cost most of the run)
        train.main(["--output_dir", str(out), *flags, "--max_train_images", "64", "--num_eval_images", "4"])
    layout = "UNet levels [32, 16, 8] with widths [24, 48, 48], self-attention at [8] (default_unet_layout(32, 3, 24)"
    assert f"{layout} of the cpu recipe)" in caplog.text  # on a CPU: the cpu recipe's DDPM, half the width
    arguments = json.loads((out / "training_args.json").read_text())
    assert (arguments["block_out_channels"], arguments["attention_resolutions"]) == ([24, 48, 48], [8])
    repeated, _, _ = training_args.parse_arguments(["--config", str(out / "training_args.json"), "--recipe", "gpu"])
    assert (repeated.block_out_channels, repeated.attention_resolutions) == ([24, 48, 48], [8])

    pipeline = HFDDPMPipeline.from_pretrained(out)
    pipeline.set_progress_bar_config(disable=True)
    config = pipeline.unet.config
    assert (config.in_channels, config.sample_size, config.learn_variance) == (3, 32, True)
    assert (tuple(config.block_out_channels), tuple(config.attention_resolutions)) == default_unet_layout(32, 3, 24)
    generator = torch.Generator().manual_seed(0)
    samples = pipeline(batch_size=2, num_inference_steps=3, generator=generator, output_type="np").images
    assert samples.shape == (2, 32, 32, 3)
    assert pipeline(batch_size=1, num_inference_steps=2).images[0].mode == "RGB"
    with PIL.Image.open(out / "samples.png") as grid:  # --num_sample_images 4: 2 x 2 emoji-sized samples
        assert (grid.mode, grid.size) == ("RGB", (64, 64))

    nll = json.loads((out / "eval_results.json").read_text())["nll"]
    assert math.isfinite(nll["bits_per_dim"]) and nll["bits_per_dim"] > 0 and nll["num_images"] == 4
    assert sum(nll["terms"].values()) == pytest.approx(nll["bits_per_dim"], rel=1e-9)
    # the bound by hand, in nats, on two emoji: every term of the chain (x_0 estimate clipped as the pipeline's
    # default), summed, over D = 3 x 32 x 32
    x0 = ImageTensorDataset(load_images(str(emoji), channels=3, resolution=32, max_images=2).images)[:].double()
    bound = pipeline.elbo(x0, generator=torch.Generator().manual_seed(5))
    chain, generator = pipeline.train_chain, torch.Generator().manual_seed(5)

    def model_fn(x_t, t):
        return pipeline.unet(x_t.to(pipeline.unet.dtype), t).sample

    with torch.no_grad():
        nats = prior_term(chain, x0) + sum(
            term_at(chain, model_fn, x0, torch.full((2,), int(t)), generator, clip_denoised=True)
            for t in chain.timesteps
        )
    torch.testing.assert_close(bound.per_image, nats / (3 * 32 * 32 * math.log(2)), rtol=1e-9, atol=0)
    assert (bound.per_image > 0).all()

    card = (out / "README.md").read_text()
    assert "mnist" not in card.lower()
    assert "Training data: image folder emoji32" in card and "local images" in card


# ---------------------------------------------------------------------------------------------- the other paths
def test_the_demo_scores_colour_images_of_an_rgb_model():
    import gradio

    from hf_ddpm import HFDDPMScheduler, demo

    unet = DenoisingUNet(sample_size=8, in_channels=3, block_out_channels=(8, 16), attention_resolutions=())
    pipeline = HFDDPMPipeline(
        unet=unet, scheduler=HFDDPMScheduler(num_train_timesteps=10, variance_type="learned_range")
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
        app = demo.build_demo(pipeline)
    (pad,) = [block for block in app.blocks.values() if isinstance(block, gradio.ImageEditor)]
    assert (pad.image_mode, pad.label) == ("RGB", "image")  # a grayscale pad would score the gray of an upload
    texts = " ".join(str(block.value) for block in app.blocks.values() if isinstance(block, gradio.Markdown))
    assert "MNIST" not in texts and "8x8, 3 channel(s)" in texts
    red = PIL.Image.new("RGB", (40, 30), (200, 30, 10))
    assert (demo.to_model_image(red, 8, 3) == np.array([200, 30, 10], dtype=np.uint8)).all()


def test_the_mnist_classifier_metrics_refuse_other_images():
    from hf_ddpm.metrics import MNIST_SHAPE, sample_quality

    assert MNIST_SHAPE == (1, 28, 28)
    with pytest.raises(ValueError, match=r"1x28x28 digits.*the samples have shape \(4, 3, 32, 32\)"):
        sample_quality(torch.zeros(4, 3, 32, 32), torch.zeros(4, 1, 28, 28))
