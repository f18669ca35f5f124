"""Writing and pushing a pipeline repo (hf_ddpm.hub.push): the repo layout, one commit per push, never the token.

Pushes run hf_ddpm's own push code with huggingface_hub's write calls captured and committed to the git mirror of
a real Hub-compatible server (olah, tests/olah_server.py); the ``pushed`` fixture (tests/conftest.py) makes them.
"""

from __future__ import annotations

import io
import json

import PIL.Image
import pytest

from helpers import CHECKPOINT, CHECKPOINT_BRANCH, REPO, TOKEN, tiny_ddpm_pipeline
from hf_ddpm import save_pipeline_repo
from hf_ddpm.hub.remote_code import remote_code_files

pytestmark = pytest.mark.usefixtures("one_thread")

EXPECTED_FILES = {
    "model_index.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "scheduler/scheduler_config.json",
    "hf_ddpm.py",
    "unet/hf_ddpm.py",
    "scheduler/hf_ddpm.py",
    "README.md",
    "samples.png",
    "training_args.json",
}


def test_save_pipeline_repo_writes_the_repo_layout(tmp_path):
    pipeline = tiny_ddpm_pipeline(0)
    grid = PIL.Image.new("L", (64, 64), color=3)
    files = save_pipeline_repo(pipeline, tmp_path, sample_grid=grid, training_args={"seed": 0, "hub_token": TOKEN})
    assert set(files) == EXPECTED_FILES - {"README.md"}
    assert json.loads((tmp_path / "training_args.json").read_text()) == {"seed": 0}
    assert PIL.Image.open(tmp_path / "samples.png").size == (64, 64)
    code = remote_code_files(pipeline)
    for path, source in code.items():
        assert (tmp_path / path).read_text() == source, path
    bare = save_pipeline_repo(pipeline, tmp_path / "bare")
    assert set(bare) == EXPECTED_FILES - {"README.md", "samples.png", "training_args.json"}


def test_push_commits_exactly_the_repo_layout_and_never_the_token(pushed):
    commits = [c for c in pushed.commits if c["repo_id"] == REPO]
    assert len(commits) == 3  # the push that would have leaked the token committed nothing
    model, checkpoint, newer = ({path for _, path, _ in c["operations"]} for c in commits)
    assert model == EXPECTED_FILES and newer == EXPECTED_FILES
    assert checkpoint == {
        f"{CHECKPOINT}/{path}" for path in EXPECTED_FILES - {"README.md", "samples.png", "training_args.json"}
    }
    assert all(kind == "add" for c in commits for kind, _, _ in c["operations"])
    for commit in commits:
        for _, path, data in commit["operations"]:
            assert TOKEN.encode() not in data, path
    files = {path: data for _, path, data in commits[0]["operations"]}
    assert json.loads(files["training_args.json"]) == {
        "learning_rate": 0.001,
        "block_out_channels": [8, 16],
        "seed": 0,
    }
    assert files["README.md"].decode() == str(pushed.card)
    assert PIL.Image.open(io.BytesIO(files["samples.png"])).size == (64, 64)
    assert [c["branch"] for c in commits] == ["main", CHECKPOINT_BRANCH, "main"]
    assert [c["sha"] for c in commits][::2] == [pushed.first_sha, pushed.main_sha]
