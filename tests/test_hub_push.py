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


def test_save_pipeline_repo_writes_extra_images_as_png_at_the_root(tmp_path):
    pipeline = tiny_ddpm_pipeline(0)
    source = tmp_path / "curve.jpg"
    PIL.Image.new("RGB", (20, 10), color=(9, 9, 9)).save(source)
    images = {"loss_curve.png": PIL.Image.new("RGB", (30, 20)), "bound_by_time.png": source}
    files = save_pipeline_repo(pipeline, tmp_path / "repo", images=images)
    assert set(files) == EXPECTED_FILES - {"README.md", "samples.png", "training_args.json"} | set(images)
    for name, size in (("loss_curve.png", (30, 20)), ("bound_by_time.png", (20, 10))):
        with PIL.Image.open(tmp_path / "repo" / name) as image:
            assert image.format == "PNG" and image.size == size
    for bad in ("plots/loss.png", "loss.jpg", "samples.png", "README.md"):
        with pytest.raises(ValueError, match="plain file name"):
            save_pipeline_repo(pipeline, tmp_path / "bad", images={bad: PIL.Image.new("L", (4, 4))})


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


def test_push_uploads_the_extra_images_and_the_default_card_shows_them(tmp_path, monkeypatch):
    uploaded = {}

    class FakeApi:  # what push_pipeline_to_hub asks of the Hub, recorded instead of sent
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=False, exist_ok=False):
            pass

        def create_commit(self, repo_id, operations, commit_message, revision=None):
            uploaded.update({op.path_in_repo: open(op.path_or_fileobj, "rb").read() for op in operations})

    monkeypatch.setattr("hf_ddpm.hub.push.HfApi", FakeApi)
    curve = PIL.Image.new("RGB", (30, 20), color=(1, 2, 3))
    tiny_ddpm_pipeline(0).push_to_hub(REPO, images={"loss_curve.png": curve}, token=TOKEN)
    assert set(uploaded) == EXPECTED_FILES - {"samples.png", "training_args.json"} | {"loss_curve.png"}
    image = PIL.Image.open(io.BytesIO(uploaded["loss_curve.png"]))
    assert image.format == "PNG" and image.getpixel((0, 0)) == (1, 2, 3)
    assert b"![loss curve](loss_curve.png)" in uploaded["README.md"]
