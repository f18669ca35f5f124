"""Loading hf_ddpm pipelines (hf_ddpm.hub.loading, hf_ddpm.hub.registration): from local folders and by repo id
through a real Hub-compatible server (olah, tests/olah_server.py), pinned, from subfolders, offline; safetensors only.

Every load by repo id runs in a fresh interpreter with ``HF_ENDPOINT`` and ``HF_HOME`` set before anything is
imported, as a user's process would.
"""

from __future__ import annotations

import numpy as np
import pytest

from helpers import (
    CHECKPOINT,
    CHECKPOINT_BRANCH,
    PICKLED_REPO,
    REPO,
    SAMPLES,
    code_blocks,
    samples,
    snippet_images,
    tiny_ddpm_pipeline,
)
from hf_ddpm import DenoisingUNet, HFDDPMPipeline, save_pipeline_repo
from hf_ddpm.hub.loading import component_entries, read_model_index, refuse_pickle_weights
from olah_server import free_port, run_python

pytestmark = pytest.mark.usefixtures("one_thread")


# ============================================================================================ local folders
def test_a_repo_folder_with_remote_code_loads_with_the_installed_classes(tmp_path):
    pipeline = tiny_ddpm_pipeline(0)
    save_pipeline_repo(pipeline, tmp_path)
    assert (tmp_path / "unet" / "hf_ddpm.py").is_file()  # diffusers alone would want trust_remote_code here
    loaded = HFDDPMPipeline.from_pretrained(tmp_path)
    assert type(loaded.unet) is DenoisingUNet
    np.testing.assert_array_equal(samples(loaded), samples(pipeline))


def test_pickle_weights_in_a_folder_are_refused(tmp_path):
    tiny_ddpm_pipeline(0).save_pretrained(tmp_path, safe_serialization=False)
    with pytest.raises(ValueError, match=r"pickle weights \(unet/diffusion_pytorch_model.bin\).*safetensors only"):
        HFDDPMPipeline.from_pretrained(tmp_path)


def test_the_model_index_names_the_components_and_a_folder_without_one_is_refused(tmp_path):
    tiny_ddpm_pipeline(0).save_pretrained(tmp_path / "pipe")
    index = read_model_index(tmp_path / "pipe")
    assert component_entries(index) == {"unet": ("hf_ddpm", "DenoisingUNet"), "scheduler": ("hf_ddpm", "VDMScheduler")}
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
