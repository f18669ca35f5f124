"""Fixtures shared by the test modules."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Run a module's torch ops on one thread, restoring the thread count after it.

    Small tensors (tiny U-Nets, scalar chains) run 10-100x slower on two OpenMP threads of a busy 2-core machine
    than on one, because the threads wait on each other.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- the Hub
@pytest.fixture(scope="session")
def hub(tmp_path_factory):
    """A Hub-compatible server (olah over local git mirrors, tests/olah_server.py), shared by the Hub tests."""
    from olah_server import OlahServer

    with OlahServer.running(tmp_path_factory.mktemp("olah")) as server:
        yield server


@pytest.fixture(scope="session")
def pushed(hub, tmp_path_factory):
    """Three commits to REPO through hf_ddpm's push code (a model; a checkpoint in a subfolder of a new branch; a
    newer model, via ``push_to_hub``), a refused push that would have leaked the token, and a repo of pickle
    weights, all committed to olah's mirror. Shared by tests/test_hub_push.py, test_hub_loading.py and
    test_hub_remote_code.py."""
    from diffusers.utils import make_image_grid
    from huggingface_hub import ModelCard

    from helpers import CHECKPOINT, CHECKPOINT_BRANCH, PICKLED_REPO, REPO, TOKEN, report_for, tiny_ddpm_pipeline
    from hf_ddpm.hub.card import render_model_card
    from hf_ddpm.hub.push import push_pipeline_to_hub
    from olah_server import CapturedHub

    first, checkpoint, second = tiny_ddpm_pipeline(0), tiny_ddpm_pipeline(2), tiny_ddpm_pipeline(1)
    grid = make_image_grid(first(batch_size=4, num_inference_steps=10).images, rows=2, cols=2).resize((64, 64))
    captured = CapturedHub(hub.mirrors, hub.endpoint)
    with pytest.MonkeyPatch.context() as monkeypatch, captured.installed(monkeypatch):
        card = render_model_card(report_for(first))
        first_sha = push_pipeline_to_hub(
            first, REPO, card=card, sample_grid=grid, training_args=report_for(first).training_args, token=TOKEN
        ).oid
        push_pipeline_to_hub(checkpoint, REPO, path_in_repo=CHECKPOINT, revision=CHECKPOINT_BRANCH, token=TOKEN)
        main_sha = second.push_to_hub(
            REPO,
            card=render_model_card(report_for(second)),
            sample_grid=grid,
            training_args=report_for(second).training_args,
            token=TOKEN,
        ).oid
        with pytest.raises(ValueError, match="contain\\(s\\) the Hub token"):
            push_pipeline_to_hub(second, REPO, card=ModelCard(str(card) + f"\nmy token: {TOKEN}\n"), token=TOKEN)
        pickled = tmp_path_factory.mktemp("pickled")
        first.save_pretrained(pickled, safe_serialization=False)
        captured.create_repo(PICKLED_REPO, exist_ok=True)
        operations = [
            SimpleNamespace(path_in_repo=p.relative_to(pickled).as_posix(), path_or_fileobj=str(p))
            for p in pickled.rglob("*")
            if p.is_file()
        ]
        captured.create_commit(PICKLED_REPO, operations, commit_message="pickle weights")
    return SimpleNamespace(
        first=first,
        checkpoint=checkpoint,
        second=second,
        first_sha=first_sha,
        main_sha=main_sha,
        commits=captured.commits,
        card=card,
        hf_home=tmp_path_factory.mktemp("hf_home"),
    )
