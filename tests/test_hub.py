"""Sharing on the Hub: the model card, the push, and loading by repo id through a real Hub-compatible server.

The server is olah in mirror mode (see tests/olah_server.py). Pushes run hf_ddpm's own push code with
huggingface_hub's write calls captured and committed to olah's git mirror; every load runs in a fresh interpreter
with ``HF_ENDPOINT`` and ``HF_HOME`` set before anything is imported, as a user's process would.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.utils import make_image_grid
from diffusers.utils.dynamic_modules_utils import check_imports, find_pipeline_class
from huggingface_hub import ModelCard, metadata_load
from huggingface_hub.repocard_data import model_index_to_eval_results

from hf_ddpm import DenoisingUNet, HFDDPMPipeline, VDMScheduler
from hf_ddpm.hub import NLLResult, TrainingReport, push_pipeline_to_hub, redact_secrets, render_model_card, save_pipeline_repo
from hf_ddpm.remote_code import RemoteCodeError, bundle_source, remote_code_files

from olah_server import CapturedHub, OlahServer, free_port, run_python

REPO = "org/ddpm-mnist"
PICKLED_REPO = "org/pickled"
CHECKPOINT = "checkpoints/step-5"
CHECKPOINT_BRANCH = "training"
TOKEN = "hf_testTOKENnotRealAbCdEfGhIjKlMnOpQrStUv"
SAMPLE_CALL = {"batch_size": 4, "num_inference_steps": 10}
EXPECTED_FILES = {
    "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
    "hf_ddpm.py", "unet/hf_ddpm.py", "scheduler/hf_ddpm.py", "README.md", "samples.png", "training_args.json",
}
# Run first in a subprocess: makes hf_ddpm unimportable, as in an environment where it is not installed.
BLOCK_HF_DDPM = """
import importlib.abc, sys
class BlockHfDdpm(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "hf_ddpm":
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
sys.meta_path.insert(0, BlockHfDdpm())
"""
SAMPLES = f"""
import numpy as np, torch
def samples(pipeline):
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(generator=torch.Generator().manual_seed(1), output_type="np", **{SAMPLE_CALL!r}).images
"""


def tiny_pipeline(seed: int) -> HFDDPMPipeline:
    """A DDPM small enough to sample in milliseconds, with random weights (the UNet's output layer starts at zero,
    which would make every seed sample alike)."""
    torch.manual_seed(seed)
    unet = DenoisingUNet(sample_size=8, block_out_channels=(8, 16), attention_resolutions=(), learn_variance=True)
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.normal_(0.0, 0.05)
    pipeline = HFDDPMPipeline(unet=unet, scheduler=VDMScheduler(num_train_timesteps=10, variance_type="learned_range"))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@contextlib.contextmanager
def one_thread():
    """Compute as the loading subprocesses do (OMP_NUM_THREADS=1): the thread count changes float rounding."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def samples(pipeline) -> np.ndarray:
    with one_thread():
        return pipeline(generator=torch.Generator().manual_seed(1), output_type="np", **SAMPLE_CALL).images


def snippet_images(pipeline) -> np.ndarray:
    """What the card's usage snippet computes (batch 16, seed 0), as uint8 arrays."""
    with one_thread():
        images = pipeline(batch_size=16, generator=torch.Generator().manual_seed(0), num_inference_steps=10).images
    return np.stack([np.asarray(image) for image in images])


def report_for(pipeline, **fields) -> TrainingReport:
    return TrainingReport.for_pipeline(
        pipeline, REPO, datasets=["ylecun/mnist"], train_data="5,000 MNIST training digits", sampling_kwargs={"num_inference_steps": 10},
        training_args={"learning_rate": 0.001, "block_out_channels": [8, 16], "hub_token": TOKEN, "seed": 0},
        nll=NLLResult(
            bits_per_dim=1.23456789, dataset_id="ylecun/mnist", dataset_name="MNIST", split="train[4500:5000]", num_images=500,
            standard_error=0.0123456, estimator="an unbiased estimate from 8 timesteps per image",
            terms={"prior": 3.1415e-05, "denoising": 1.0012345, "reconstruction": 0.23330195},
        ),
        steps=1500, images_seen=96000, wall_time_seconds=723.4, hardware="2 CPU cores, 1 process", **fields,
    )


def code_blocks(card_text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card_text, flags=re.S)


def table_rows(card_text: str) -> dict[str, str]:
    return dict(re.findall(r"^\| (.+?) \| (.+?) \|$", card_text, flags=re.M))


def assert_printed(printed: str, value: float) -> None:
    """``printed`` is ``value`` rounded to the digits shown."""
    decimals = len(printed.split("e")[0].split(".")[1]) - (int(printed.split("e")[1]) if "e" in printed else 0)
    assert abs(float(printed) - value) <= 0.5 * 10.0**-decimals


# ============================================================================================ the card
def test_card_metadata_validates_and_shows_the_measured_numbers(tmp_path):
    report = report_for(tiny_pipeline(0))
    card = render_model_card(report)
    card.save(tmp_path / "README.md")

    metadata = metadata_load(tmp_path / "README.md")
    assert metadata["library_name"] == "hf_ddpm" and metadata["pipeline_tag"] == "unconditional-image-generation"
    assert {"pytorch", "diffusers", "unconditional-image-generation", "ddpm", "hf_ddpm"} <= set(metadata["tags"])
    assert metadata["datasets"] == ["ylecun/mnist"] and metadata["license"] == "apache-2.0"
    model_name, results = model_index_to_eval_results(metadata["model-index"])
    assert model_name == "ddpm-mnist" and len(results) == 1
    result = results[0]
    assert (result.task_type, result.dataset_type, result.dataset_split, result.metric_type) == (
        "unconditional-image-generation", "ylecun/mnist", "train[4500:5000]", "nll")
    assert result.metric_value == report.nll.bits_per_dim  # exactly: the metadata keeps every digit
    assert ModelCard.load(tmp_path / "README.md").data.eval_results[0].metric_value == report.nll.bits_per_dim

    rows = table_rows(card.text)
    assert_printed(rows["NLL bound (bits/dim)"], report.nll.bits_per_dim)
    assert_printed(rows["standard error (bits/dim)"], report.nll.standard_error)
    for term, value in report.nll.terms.items():
        assert_printed(rows[term], value)
    assert rows["optimizer steps"] == "1,500" and rows["images seen"] == "96,000"
    assert re.search(r"\((\d+) s\)", rows["wall time"]).group(1) == "723"
    assert rows["hardware"] == report.hardware
    assert rows["`learning_rate`"] == "0.001" and rows["`block_out_channels`"] == "[8, 16]"
    assert "hub_token" not in card.content and TOKEN not in card.content
    assert "![Samples from the model](samples.png)" in card.text
    hf_ddpm_snippet, remote_snippet = code_blocks(card.text)
    assert f'HFDDPMPipeline.from_pretrained("{REPO}", revision="main")' in hf_ddpm_snippet
    assert 'custom_pipeline="hf_ddpm", trust_remote_code=True, revision="main"' in remote_snippet


def test_card_of_a_pipeline_alone_has_no_results_and_validates():
    card = render_model_card(TrainingReport.for_pipeline(tiny_pipeline(0), REPO, sample_grid=None))
    parsed = ModelCard(str(card))
    assert parsed.data.eval_results is None and "model-index" not in card.content
    assert "No likelihood was evaluated" in card.text and "![" not in card.text
    assert "`DenoisingUNet`" in card.text  # the description and components come from the pipeline


def test_secrets_are_dropped_by_key_and_by_value():
    arguments = {"hub_token": "x", "api_key": "y", "tokenizer_name": "t5", "max_tokens": 3, "url": f"https://u:{TOKEN}@h", "nested": {"password": "p", "lr": 1}}
    assert redact_secrets(arguments, TOKEN) == {"tokenizer_name": "t5", "max_tokens": 3, "nested": {"lr": 1}}


# ============================================================================================ remote code
def test_remote_code_is_one_self_contained_module_that_survives_reexecution(tmp_path):
    files = remote_code_files(tiny_pipeline(0))
    assert set(files) == {"hf_ddpm.py", "unet/hf_ddpm.py", "scheduler/hf_ddpm.py"}
    assert len(set(files.values())) == 1
    path = tmp_path / "hf_ddpm.py"
    path.write_text(files["hf_ddpm.py"])
    assert check_imports(str(path)) == []  # diffusers' own check: no relative imports to fetch
    assert not re.search(r"^\s*(from|import)\s+hf_ddpm\b", files["hf_ddpm.py"], flags=re.M)

    spec = importlib.util.spec_from_file_location("remote_test_modules.hf_ddpm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    first = module.DenoisingUNet, module.VDMScheduler
    spec.loader.exec_module(module)  # as diffusers does for the next component
    assert (module.DenoisingUNet, module.VDMScheduler) == first
    assert find_pipeline_class(module) is module.HFDDPMPipeline


def _fake_package(root: Path, name: str, modules: dict[str, str]) -> None:
    (root / name).mkdir()
    (root / name / "__init__.py").write_text("")
    for module, source in modules.items():
        (root / name / f"{module}.py").write_text(source)


@pytest.mark.parametrize(
    ("b_source", "message"),
    [
        ("from .a import helper\n\ndef helper():\n    return 2\n", "bound differently in"),
        ("from .a import helper as renamed\n", "with \\* or a new name"),
        ("from . import a\n", "imports from the package"),
        ("def f():\n    from .a import helper\n", "inside a block"),
        ("from .a import helper\nfrom diffusers import DiffusionPipeline\n\nclass Q(DiffusionPipeline):\n    pass\n", "define the pipelines"),
    ],
)
def test_modules_that_cannot_share_one_file_are_rejected(tmp_path, monkeypatch, b_source, message):
    name = f"bundlepkg_{abs(hash(b_source))}"
    a_source = "from diffusers import DiffusionPipeline\n\ndef helper():\n    return 1\n\nclass P(DiffusionPipeline):\n    pass\n"
    _fake_package(tmp_path, name, {"a": a_source, "b": b_source})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RemoteCodeError, match=message):
        bundle_source([f"{name}.b"], package=name)


# ============================================================================================ local folders
def test_a_repo_folder_with_remote_code_loads_with_the_installed_classes(tmp_path):
    pipeline = tiny_pipeline(0)
    save_pipeline_repo(pipeline, tmp_path)
    assert (tmp_path / "unet" / "hf_ddpm.py").is_file()  # diffusers alone would want trust_remote_code here
    loaded = HFDDPMPipeline.from_pretrained(tmp_path)
    assert type(loaded.unet) is DenoisingUNet
    np.testing.assert_array_equal(samples(loaded), samples(pipeline))


def test_pickle_weights_in_a_folder_are_refused(tmp_path):
    tiny_pipeline(0).save_pretrained(tmp_path, safe_serialization=False)
    with pytest.raises(ValueError, match=r"pickle weights \(unet/diffusion_pytorch_model.bin\).*safetensors only"):
        HFDDPMPipeline.from_pretrained(tmp_path)


# ============================================================================================ the Hub
@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with OlahServer.running(tmp_path_factory.mktemp("olah")) as server:
        yield server


@pytest.fixture(scope="module")
def pushed(hub, tmp_path_factory):
    """Three commits to REPO through hf_ddpm's push code (a model; a checkpoint in a subfolder of a new branch; a
    newer model, via ``push_to_hub``) and a repo of pickle weights, all committed to olah's mirror."""
    first, checkpoint, second = tiny_pipeline(0), tiny_pipeline(2), tiny_pipeline(1)
    grid = make_image_grid(first(batch_size=4, num_inference_steps=10).images, rows=2, cols=2).resize((64, 64))
    captured = CapturedHub(hub.mirrors, hub.endpoint)
    with pytest.MonkeyPatch.context() as monkeypatch, captured.installed(monkeypatch):
        card = render_model_card(report_for(first))
        first_sha = push_pipeline_to_hub(first, REPO, card=card, sample_grid=grid, training_args=report_for(first).training_args, token=TOKEN).oid
        push_pipeline_to_hub(checkpoint, REPO, path_in_repo=CHECKPOINT, revision=CHECKPOINT_BRANCH, token=TOKEN)
        main_sha = second.push_to_hub(
            REPO, card=render_model_card(report_for(second)), sample_grid=grid, training_args=report_for(second).training_args, token=TOKEN
        ).oid
        with pytest.raises(ValueError, match="contain\\(s\\) the Hub token"):
            push_pipeline_to_hub(second, REPO, card=ModelCard(str(card) + f"\nmy token: {TOKEN}\n"), token=TOKEN)
        pickled = tmp_path_factory.mktemp("pickled")
        first.save_pretrained(pickled, safe_serialization=False)
        captured.create_repo(PICKLED_REPO, exist_ok=True)
        captured.create_commit(PICKLED_REPO, [SimpleNamespace(path_in_repo=p.relative_to(pickled).as_posix(), path_or_fileobj=str(p)) for p in pickled.rglob("*") if p.is_file()], commit_message="pickle weights")
    return SimpleNamespace(
        first=first, checkpoint=checkpoint, second=second, first_sha=first_sha, main_sha=main_sha, commits=captured.commits,
        card=card, hf_home=tmp_path_factory.mktemp("hf_home"),
    )


def test_push_commits_exactly_the_repo_layout_and_never_the_token(pushed):
    commits = [c for c in pushed.commits if c["repo_id"] == REPO]
    assert len(commits) == 3  # the push that would have leaked the token committed nothing
    model, checkpoint, newer = ({path for _, path, _ in c["operations"]} for c in commits)
    assert model == EXPECTED_FILES and newer == EXPECTED_FILES
    assert checkpoint == {f"{CHECKPOINT}/{path}" for path in EXPECTED_FILES - {"README.md", "samples.png", "training_args.json"}}
    assert all(kind == "add" for c in commits for kind, _, _ in c["operations"])
    for commit in commits:
        for _, path, data in commit["operations"]:
            assert TOKEN.encode() not in data, path
    files = {path: data for _, path, data in commits[0]["operations"]}
    assert json.loads(files["training_args.json"]) == {"learning_rate": 0.001, "block_out_channels": [8, 16], "seed": 0}
    assert files["README.md"].decode() == str(pushed.card)
    assert PIL.Image.open(io.BytesIO(files["samples.png"])).size == (64, 64)
    assert [c["branch"] for c in commits] == ["main", CHECKPOINT_BRANCH, "main"]
    assert [c["sha"] for c in commits][::2] == [pushed.first_sha, pushed.main_sha]


@pytest.fixture(scope="module")
def loaded_online(hub, pushed, tmp_path_factory):
    """In a fresh interpreter with hf_ddpm: the card's snippet, a pinned older commit, the checkpoint subfolder
    and the pickle repo, all by repo id through olah."""
    work = tmp_path_factory.mktemp("online")
    hf_ddpm_snippet, _ = code_blocks(pushed.card.text)
    code = SAMPLES + hf_ddpm_snippet + f"""
np.save("snippet.npy", np.stack([np.asarray(image) for image in images]))
np.save("main.npy", samples(pipeline))
np.save("pinned.npy", samples(HFDDPMPipeline.from_pretrained({REPO!r}, revision={pushed.first_sha!r})))
np.save("checkpoint.npy", samples(HFDDPMPipeline.from_pretrained({REPO!r}, revision={CHECKPOINT_BRANCH!r}, subfolder={CHECKPOINT!r})))
try:
    HFDDPMPipeline.from_pretrained({PICKLED_REPO!r}, revision="main")
except ValueError as error:
    open("pickle_error.txt", "w").write(str(error))
"""
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
    code = SAMPLES + f"""
from hf_ddpm import HFDDPMPipeline
np.save("main.npy", samples(HFDDPMPipeline.from_pretrained({REPO!r}, revision="main")))
np.save("pinned.npy", samples(HFDDPMPipeline.from_pretrained({REPO!r}, revision={pushed.first_sha!r})))
"""
    run_python(code, {"HF_ENDPOINT": nobody, "HF_HOME": str(pushed.hf_home), "HF_HUB_OFFLINE": "1"}, cwd=tmp_path)
    np.testing.assert_array_equal(np.load(tmp_path / "main.npy"), samples(pushed.second))
    np.testing.assert_array_equal(np.load(tmp_path / "pinned.npy"), samples(pushed.first))


def test_stock_diffusers_without_hf_ddpm_loads_the_repo_with_trust_remote_code(hub, pushed, tmp_path):
    _, remote_snippet = code_blocks(pushed.card.text)
    code = BLOCK_HF_DDPM + SAMPLES + remote_snippet + """
import json, importlib.util
np.save("snippet.npy", np.stack([np.asarray(image) for image in images]))
np.save("main.npy", samples(pipeline))
try:
    importlib.util.find_spec("hf_ddpm")
    importable = True
except ModuleNotFoundError:
    importable = False
json.dump({"importable": importable, "loaded": sorted(m for m in sys.modules if m.split(".")[0] == "hf_ddpm"),
           "class": type(pipeline).__module__, "unet": list(pipeline.config["unet"])}, open("facts.json", "w"))
"""
    run_python(code, {"HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / "hf_home")}, cwd=tmp_path)
    facts = json.loads((tmp_path / "facts.json").read_text())
    assert facts["importable"] is False and facts["loaded"] == []
    assert facts["class"].startswith("diffusers_modules.") and facts["unet"] == ["hf_ddpm", "DenoisingUNet"]
    np.testing.assert_array_equal(np.load(tmp_path / "snippet.npy"), snippet_images(pushed.second))
    np.testing.assert_array_equal(np.load(tmp_path / "main.npy"), samples(pushed.second))
