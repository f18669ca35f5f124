"""Library edge cases of issue #14: clear ValueErrors for NaN pixels, empty batches and [0, 1] images; a missing
local folder is "no such folder"; saved weights are readable by others; 16-bit PNGs are scaled, not clipped."""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
import PIL.Image
import pytest
import torch

from helpers import tiny_ddpm_pipeline, tiny_vdm_pipeline
from hf_ddpm import BoundOptions, DenoisingUNet, HFDDPMPipeline, HFDDPMScheduler, evaluate_bound
from hf_ddpm.data.images import LoadOptions, decode_image
from hf_ddpm.hub.push import save_pipeline_repo
from hf_ddpm.image_utils import check_image_size

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    unet = DenoisingUNet(block_out_channels=(8, 16), attention_resolutions=())
    return HFDDPMPipeline(unet=unet, scheduler=HFDDPMScheduler(num_train_timesteps=10, variance_type="learned_range"))


def test_elbo_of_a_nan_pixel_is_a_clear_error(pipe):
    images = torch.zeros(2, 1, 28, 28)
    images[1, 0, 3, 4] = float("nan")
    message = r"^1 pixel value\(s\) are NaN or infinite; images must be finite values in \[-1, 1\]\.$"
    with pytest.raises(ValueError, match=message):
        pipe.elbo(images)


@pytest.mark.parametrize("images", [torch.zeros(0, 1, 28, 28), torch.zeros(0, 28, 28, dtype=torch.uint8)])
def test_elbo_of_an_empty_batch_is_a_clear_error(pipe, images):
    with pytest.raises(ValueError, match=r"^No images given \(an empty batch of shape"):
        pipe.elbo(images)


def test_elbo_of_0_1_images_suggests_the_fix_that_scores_the_same_images(pipe):
    x = torch.randint(0, 256, (2, 1, 28, 28)).float() / 255  # ToTensor()-style images
    with pytest.raises(ValueError) as error:
        pipe.elbo(x)
    message = str(error.value)
    assert "look like images in [0, 1]" in message and "x = torch.round(x * 255) / 255 * 2 - 1" in message
    fixed = torch.round(x * 255) / 255 * 2 - 1  # the suggested fix maps k / 255 to k / 127.5 - 1: the same pixels
    assert torch.allclose((fixed + 1) * 127.5, x * 255, atol=1e-3)
    pipe.elbo(fixed, generator=torch.Generator().manual_seed(0))


def test_images_of_the_wrong_size_get_the_same_one_line_error_everywhere() -> None:
    """The DDPM's and the VDM's bound and the bound along time all check the size with check_image_size."""
    wrong = torch.full((2, 1, 12, 12), -1.0)  # black, on the 8-bit grid
    message = r"^Images must be 8x8, got \(12, 12\)\.$"
    for pipeline in (tiny_ddpm_pipeline(), tiny_vdm_pipeline()):
        with pytest.raises(ValueError, match=message):
            evaluate_bound(pipeline, wrong, BoundOptions(timesteps_per_image=1))
        with pytest.raises(ValueError, match=message):
            pipeline.bound_by_time(wrong)
    with pytest.raises(ValueError, match=message):
        check_image_size(wrong, 8)
    check_image_size(torch.zeros(2, 3, 8, 8), 8)  # any batch and channels of the right size pass


def test_from_pretrained_on_a_missing_local_folder_says_no_such_folder(tmp_path):
    for missing in (str(tmp_path / "nope"), "./nope", "a/b/c"):
        with pytest.raises(FileNotFoundError, match="no such folder") as error:
            HFDDPMPipeline.from_pretrained(missing)
        assert "Repo id must be" not in str(error.value)


def test_saved_weight_files_are_readable_by_others(pipe, tmp_path):
    old = os.umask(0o022)
    try:
        files = save_pipeline_repo(pipe, tmp_path / "repo")
    finally:
        os.umask(old)
    weights = [name for name in files if name.endswith(".safetensors")]
    assert weights
    for name in files:
        assert (tmp_path / "repo" / name).stat().st_mode & 0o777 == 0o644, name


def test_a_16_bit_png_is_scaled_to_8_bits_with_one_warning():
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16).repeat(4, axis=0)
    buffer = io.BytesIO()
    PIL.Image.fromarray(values).save(buffer, format="PNG")
    options = LoadOptions(channels=1, resolution=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        first = decode_image(buffer.getvalue(), options)
        decode_image(buffer.getvalue(), options)
    assert first[0, 0].tolist() == [0, 1, 128, 255]  # not clipped to 0 / 255
    assert len([w for w in caught if "scaled to 8 bits" in str(w.message)]) == 1
