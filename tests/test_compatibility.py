"""Folders saved by hf_ddpm 0.1.0 (tests/fixtures/saved_by_0.1.0.tar.gz, written by that version's save_pipeline_repo
from the tiny pipelines of tests/helpers.py, with the samples each gave: seed 1, one thread; kept as an archive, as
written) load and sample identically, with hf_ddpm installed and through the remote code they carry; the renamed
public names still resolve, warning."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import hf_ddpm
from helpers import BLOCK_HF_DDPM, one_thread
from hf_ddpm.pipelines.auto import load_pipeline

ARCHIVE = Path(__file__).parent / "fixtures" / "saved_by_0.1.0.tar.gz"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """The folders saved by 0.1.0, unpacked: ddpm/, vae/, vdm/."""
    folder = tmp_path_factory.mktemp("saved")
    with tarfile.open(ARCHIVE) as archive:
        archive.extractall(folder, filter="data")
    return folder / "saved_by_0.1.0"


CALLS = {"ddpm": {"num_inference_steps": 10}, "vae": {}, "vdm": {"num_inference_steps": 5}}


def samples_of(pipeline, call: dict) -> np.ndarray:
    pipeline.set_progress_bar_config(disable=True)
    with one_thread():
        return pipeline(batch_size=2, generator=torch.Generator().manual_seed(1), output_type="np", **call).images


@pytest.mark.parametrize("kind", sorted(CALLS))
def test_a_folder_saved_by_0_1_0_loads_and_samples_identically(kind, saved, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        pipeline = load_pipeline(saved / kind)
    # to float32 rounding: CPUs with other kernels (AVX-512, AMX) differ from the saving machine's in the last bit
    expected = np.load(saved / kind / "samples_seed1.npy")
    np.testing.assert_allclose(samples_of(pipeline, CALLS[kind]), expected, rtol=0, atol=1e-6)
    # saved again, it records today's names
    pipeline.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert "VDMScheduler" not in json.dumps(index)
    if kind == "ddpm":
        assert index["scheduler"] == ["hf_ddpm", "HFDDPMScheduler"]


def test_the_0_1_0_ddpm_folder_names_the_old_scheduler_and_warns_once(saved):
    assert json.loads((saved / "ddpm" / "model_index.json").read_text())["scheduler"] == ["hf_ddpm", "VDMScheduler"]
    hf_ddpm._warned.discard("VDMScheduler")
    with pytest.warns(FutureWarning, match=r"hf_ddpm.VDMScheduler is now hf_ddpm.HFDDPMScheduler"):
        assert hf_ddpm.VDMScheduler is hf_ddpm.HFDDPMScheduler
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hf_ddpm.VDMScheduler is hf_ddpm.HFDDPMScheduler  # once only
    with pytest.raises(AttributeError, match="no attribute 'NoSuchName'"):
        hf_ddpm.NoSuchName  # noqa: B018


@pytest.mark.parametrize("kind", sorted(CALLS))
def test_a_folder_saved_by_0_1_0_loads_without_hf_ddpm_through_its_remote_code(kind, saved):
    script = BLOCK_HF_DDPM + (
        "import numpy as np, torch\n"
        "from diffusers import DiffusionPipeline\n"
        "torch.set_num_threads(1)\n"
        f"pipe = DiffusionPipeline.from_pretrained({str(saved / kind)!r}, trust_remote_code=True)\n"
        "pipe.set_progress_bar_config(disable=True)\n"
        f"images = pipe(batch_size=2, generator=torch.Generator().manual_seed(1), output_type='np', **{CALLS[kind]!r})"
        ".images\n"
        f"np.testing.assert_allclose(images, np.load({str(saved / kind / 'samples_seed1.npy')!r}), 0, 1e-6)\n"
        "print(type(pipe).__module__, type(pipe).__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[0].endswith("hf_ddpm")
