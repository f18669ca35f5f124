"""Loading hf_ddpm pipelines (hf_ddpm.hub.loading, hf_ddpm.hub.registration): from local folders and by repo id
through a real Hub-compatible server (olah, tests/olah_server.py), pinned, from subfolders, offline; safetensors only.

Every load by repo id runs in a fresh interpreter with ``HF_ENDPOINT`` and ``HF_HOME`` set before anything is
imported, as a user's process would.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from helpers import (
    CHECKPOINT,
    CHECKPOINT_BRANCH,
    PICKLED_REPO,
    REPO,
    SAMPLES,
    code_blocks,
    public_pipeline_classes,
    samples,
    snippet_images,
    tiny_ddpm_pipeline,
    tiny_pipeline_of,
)
from hf_ddpm import DenoisingUNet, HFDDPMPipeline, save_pipeline_repo
from hf_ddpm.hub.loading import component_entries, read_model_index, refuse_pickle_weights
from hf_ddpm.pipelines.auto import PIPELINE_CLASSES, load_pipeline
from olah_server import free_port, run_python

pytestmark = pytest.mark.usefixtures("one_thread")
PIPELINES = list(PIPELINE_CLASSES)


# ============================================================================================ local folders
def test_a_repo_folder_with_remote_code_loads_with_the_installed_classes(tmp_path):
    pipeline = tiny_ddpm_pipeline(0)
    save_pipeline_repo(pipeline, tmp_path)
    assert (tmp_path / "unet" / "hf_ddpm.py").is_file()  # diffusers alone would want trust_remote_code here
    loaded = HFDDPMPipeline.from_pretrained(tmp_path)
    assert type(loaded.unet) is DenoisingUNet
    np.testing.assert_array_equal(samples(loaded), samples(pipeline))


@pytest.mark.parametrize("name", PIPELINES)
def test_every_pipeline_loads_by_its_recorded_class_and_through_diffusers_with_trust_remote_code(name, tmp_path):
    """A repo folder names its pipeline as ["hf_ddpm", ClassName]: hf_ddpm's auto loader and the class itself use
    the installed code; diffusers' DiffusionPipeline needs trust_remote_code=True (a clear refusal without) and then
    runs the repo's copy, which samples alike."""
    pipeline, call = tiny_pipeline_of(name)
    save_pipeline_repo(pipeline, tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == ["hf_ddpm", name]
    auto = load_pipeline(tmp_path)
    assert type(auto) is type(pipeline) and type(auto).__module__.startswith("hf_ddpm.")
    assert type(type(pipeline).from_pretrained(tmp_path)) is type(pipeline)
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        DiffusionPipeline.from_pretrained(tmp_path)
    remote = DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(remote).__name__ == name and type(remote).__module__.startswith("diffusers_modules.")
    generator = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    expected = auto(batch_size=2, generator=generator(), output_type="np", **call).images
    np.testing.assert_allclose(
        remote(batch_size=2, generator=generator(), output_type="np", **call).images, expected, atol=1e-5
    )


def test_the_auto_loader_refuses_a_pipeline_that_is_not_ours(tmp_path):
    assert set(PIPELINE_CLASSES) == set(public_pipeline_classes())  # it knows every public pipeline class
    save_pipeline_repo(tiny_ddpm_pipeline(0), tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    (tmp_path / "model_index.json").write_text(json.dumps({**index, "_class_name": "DDPMPipeline"}))
    with pytest.raises(ValueError, match="holds a DDPMPipeline, not an hf_ddpm pipeline"):
        load_pipeline(tmp_path)


def test_pickle_weights_in_a_folder_are_refused(tmp_path):
    tiny_ddpm_pipeline(0).save_pretrained(tmp_path, safe_serialization=False)
    with pytest.raises(ValueError, match=r"pickle weights \(unet/diffusion_pytorch_model.bin\).*safetensors only"):
        HFDDPMPipeline.from_pretrained(tmp_path)


def test_the_model_index_names_the_components_and_a_folder_without_one_is_refused(tmp_path):
    tiny_ddpm_pipeline(0).save_pretrained(tmp_path / "pipe")
    index = read_model_index(tmp_path / "pipe")
    assert index["guide_unet"] == [None, None]  # the optional guide, absent: no component
    assert component_entries(index) == {
        "unet": ("hf_ddpm", "DenoisingUNet"),
        "scheduler": ("hf_ddpm", "HFDDPMScheduler"),
    }
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        FileNotFoundError, match="has no model_index.json, so it is not a pipeline saved with save_pretrained"
    ):
        HFDDPMPipeline.from_pretrained(tmp_path / "empty")
    refuse_pickle_weights(["unet/model.safetensors", "other/model.bin"], ["unet"], "here")  # outside the components
    with pytest.raises(ValueError, match=r"here holds pickle weights \(unet/a.pt, unet/b.ckpt\)"):
        refuse_pickle_weights(["unet/b.ckpt", "unet/a.pt", "unet/config.json"], ["unet"], "here")


# ============================================================================================ the Hub
@pytest.fixture(scope="module")
def loaded_online(hub, pushed, tmp_path_factory):
    """In a fresh interpreter with hf_ddpm: the card's snippet, a pinned older commit, the checkpoint subfolder
    and the pickle repo, all by repo id through olah."""
    work = tmp_path_factory.mktemp("online")
    hf_ddpm_snippet, _ = code_blocks(pushed.card.text)
    code = (
        SAMPLES
        + hf_ddpm_snippet
        + f"""
np.save("snippet.npy", np.stack([np.asarray(image) for image in images]))
np.save("main.npy", samples(pipeline))
np.save("pinned.npy", samples(HFDDPMPipeline.from_pretrained({REPO!r}, revision={pushed.first_sha!r})))
from hf_ddpm.pipelines.auto import load_pipeline
np.save("auto.npy", samples(load_pipeline({REPO!r}, revision="main")))
checkpoint = HFDDPMPipeline.from_pretrained({REPO!r}, revision={CHECKPOINT_BRANCH!r}, subfolder={CHECKPOINT!r})
np.save("checkpoint.npy", samples(checkpoint))
try:
    HFDDPMPipeline.from_pretrained({PICKLED_REPO!r}, revision="main")
except ValueError as error:
    open("pickle_error.txt", "w").write(str(error))
"""
    )
    run_python(code, {"HF_ENDPOINT": hub.endpoint, "HF_HOME": str(pushed.hf_home)}, cwd=work)
    return work


def test_load_by_repo_id_gives_the_pushed_pipelines_samples(pushed, loaded_online):
    np.testing.assert_array_equal(np.load(loaded_online / "snippet.npy"), snippet_images(pushed.second))
    np.testing.assert_array_equal(np.load(loaded_online / "main.npy"), samples(pushed.second))
    np.testing.assert_array_equal(np.load(loaded_online / "auto.npy"), samples(pushed.second))  # class from the repo


def test_a_pinned_commit_loads_the_older_version(pushed, loaded_online):
    older = np.load(loaded_online / "pinned.npy")
    np.testing.assert_array_equal(older, samples(pushed.first))
    assert not np.array_equal(older, samples(pushed.second))


def test_a_checkpoint_pushed_to_a_subfolder_of_a_branch_loads(pushed, loaded_online):
    np.testing.assert_array_equal(np.load(loaded_online / "checkpoint.npy"), samples(pushed.checkpoint))


def test_a_repo_with_pickle_weights_is_refused_before_download(pushed, loaded_online):
    message = (loaded_online / "pickle_error.txt").read_text()
    assert "pickle weights (unet/diffusion_pytorch_model.bin)" in message and "safetensors only" in message
    blobs = list((pushed.hf_home / "hub" / "models--org--pickled").rglob("*.bin"))
    assert blobs == []  # refused from the repo listing, nothing downloaded


def test_offline_loads_come_from_the_cache(pushed, loaded_online, tmp_path):
    nobody = f"http://127.0.0.1:{free_port()}"  # any request would fail: nothing listens there
    code = (
        SAMPLES
        + f"""
from hf_ddpm import HFDDPMPipeline
np.save("main.npy", samples(HFDDPMPipeline.from_pretrained({REPO!r}, revision="main")))
np.save("pinned.npy", samples(HFDDPMPipeline.from_pretrained({REPO!r}, revision={pushed.first_sha!r})))
"""
    )
    run_python(code, {"HF_ENDPOINT": nobody, "HF_HOME": str(pushed.hf_home), "HF_HUB_OFFLINE": "1"}, cwd=tmp_path)
    np.testing.assert_array_equal(np.load(tmp_path / "main.npy"), samples(pushed.second))
    np.testing.assert_array_equal(np.load(tmp_path / "pinned.npy"), samples(pushed.first))
