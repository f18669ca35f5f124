"""training/train.py end to end, on real MNIST digits with a tiny model: outputs, 2 processes, resume, failures."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hf_ddpm.data
from helpers import TINY_TRAIN  # first: it makes training/train.py importable
from hf_ddpm import HFDDPMPipeline, objectives
from hf_ddpm.training_utils import list_checkpoints, resolve_resume_path

REPO = Path(__file__).resolve().parents[1]
import train  # noqa: E402  (importable through helpers)


def run(output_dir: Path, *flags: str) -> Path:
    return train.main(["--output_dir", str(output_dir), *TINY_TRAIN, *flags])


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "unet" / "diffusion_pytorch_model.safetensors"))


def test_smoke_run_writes_a_loadable_pipeline_samples_nll_and_card(tmp_path):
    # eval at step 1 logs a sample grid to TensorBoard mid-run, and training must go on with the full chain
    out = run(
        tmp_path / "run",
        "--max_train_steps",
        "3",
        "--checkpointing_steps",
        "2",
        "--eval_steps",
        "1",
        "--logger",
        "tensorboard",
    )
    for name in (
        "model_index.json",
        "samples.png",
        "eval_results.json",
        "README.md",
        "training_args.json",
        "checkpoint-2",
        "checkpoint-3",
        "logs/hf_ddpm",
    ):
        assert (out / name).exists(), name
    results = json.loads((out / "eval_results.json").read_text())
    assert results["steps"] == 3 and results["images_seen"] == 3 * 16
    nll = results["nll"]
    assert 0 < nll["bits_per_dim"] < float("inf") and nll["standard_error"] > 0
    assert nll["bits_per_dim"] == pytest.approx(sum(nll["terms"].values()), rel=1e-9)
    saved_args = json.loads((out / "training_args.json").read_text())
    assert saved_args["num_train_timesteps"] == 50 and "hub_token" not in saved_args
    pipe = HFDDPMPipeline.from_pretrained(out)
    images = pipe(
        batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images
    assert images.shape == (2, 28, 28, 1) and 0 <= images.min() and images.max() <= 1
    card = (out / "README.md").read_text()
    assert f"{nll['bits_per_dim']:.4f}" in card


def test_vae_run_writes_a_loadable_vae_pipeline_with_its_bounds(tmp_path):
    from hf_ddpm import VAEPipeline

    out = run(
        tmp_path / "vae", "--model", "vae", "--max_train_steps", "2", "--iwae_samples", "4", "--num_latent_layers", "2"
    )
    nll = json.loads((out / "eval_results.json").read_text())["nll"]
    assert nll["bits_per_dim"] == pytest.approx(sum(nll["terms"].values()), rel=1e-6)
    assert nll["iwae_bits_per_dim"] > 0
    pipe = VAEPipeline.from_pretrained(out)
    assert pipe(batch_size=2, output_type="np").images.shape == (2, 28, 28, 1)
    assert f"{nll['bits_per_dim']:.4f}" in (out / "README.md").read_text()
    assert (out / "loss_curve.png").is_file() and not (out / "bound_by_time.png").exists()  # no time axis


def test_save_pipeline_steps_writes_the_ema_pipeline_of_those_steps_and_the_log_has_the_time(tmp_path):
    out = run(tmp_path / "run", "--max_train_steps", "4", "--save_pipeline_steps", "2", "--checkpointing_steps", "4")
    assert sorted(p.name for p in out.glob("pipeline-*")) == ["pipeline-2", "pipeline-4"]
    final, at_4, at_2 = weights(out), weights(out / "pipeline-4"), weights(out / "pipeline-2")
    assert all(torch.equal(final[k], at_4[k]) for k in final)  # the last step's is the final (EMA) pipeline
    assert not all(torch.equal(final[k], at_2[k]) for k in final)
    loaded = HFDDPMPipeline.from_pretrained(out / "pipeline-2").unet.state_dict()
    assert all(torch.equal(loaded[k], at_2[k]) for k in at_2)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    seconds = [row["train_seconds"] for row in log]
    assert [row["step"] for row in log] == [1, 2, 3, 4] and 0 < seconds[0] < seconds[1] < seconds[2] < seconds[3]
    run(out, "--max_train_steps", "2", "--overwrite_output_dir")  # starting over removes the old run's pipelines
    assert not list(out.glob("pipeline-*"))


def test_resumed_run_reaches_the_same_weights_bitwise(tmp_path):
    straight = run(tmp_path / "straight", "--max_train_steps", "4", "--checkpointing_steps", "2")
    interrupted = tmp_path / "interrupted"
    run(interrupted, "--max_train_steps", "4", "--checkpointing_steps", "2")
    # forget everything after step 2, as if the run had died there, then resume
    for name in ("checkpoint-4", "unet", "scheduler", "model_index.json"):
        path = interrupted / name
        subprocess.run(["rm", "-rf", str(path)], check=True)
    run(interrupted, "--max_train_steps", "4", "--checkpointing_steps", "2", "--resume_from_checkpoint", "latest")
    a, b = weights(straight), weights(interrupted)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_sigkill_keeps_the_log_line_by_line_and_resume_loses_at_most_the_steps_since_the_last_checkpoint(tmp_path):
    out = tmp_path / "killed"
    command = [
        sys.executable,
        str(REPO / "training" / "train.py"),
        "--output_dir",
        str(out),
        *TINY_TRAIN,
        "--max_train_steps",
        "400",
        "--checkpointing_steps",
        "3",
        "--checkpoints_total_limit",
        "1",
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not list(out.glob("checkpoint-6")) and time.time() < deadline:
            time.sleep(0.05)
        assert list(out.glob("checkpoint-6")), "the run never reached its second checkpoint"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    # each step's line was written whole, in order, before that step's checkpoint (a cut last line is not a step)
    log = (out / "train_log.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in log if line.endswith("}")]
    assert len(steps) >= 6 and steps == list(range(1, len(steps) + 1))
    latest = list_checkpoints(out)[-1]
    step = int(latest.name.split("-")[1])
    assert step >= 6
    run(out, "--max_train_steps", str(step + 1), "--checkpointing_steps", "3", "--resume_from_checkpoint", "latest")
    assert json.loads((out / "eval_results.json").read_text())["steps"] == step + 1


def test_a_save_killed_half_way_leaves_the_previous_checkpoint_as_latest(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save = train.Accelerator.save_state

    def dying_save(self, output_dir=None, **kwargs):
        if output_dir.endswith("checkpoint-4.tmp"):
            Path(output_dir).mkdir(parents=True)
            (Path(output_dir) / "model.safetensors").write_bytes(b"half a file")
            raise KeyboardInterrupt("killed during save")
        return real_save(self, output_dir, **kwargs)

    monkeypatch.setattr(train.Accelerator, "save_state", dying_save)
    with pytest.raises(KeyboardInterrupt):
        run(out, "--max_train_steps", "6", "--checkpointing_steps", "2")
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
    assert resolve_resume_path("latest", out).name == "checkpoint-2"
    monkeypatch.setattr(train.Accelerator, "save_state", real_save)
    run(out, "--max_train_steps", "6", "--checkpointing_steps", "2", "--resume_from_checkpoint", "latest")
    assert not list(out.glob("*.tmp"))
    assert json.loads((out / "eval_results.json").read_text())["steps"] == 6


def diverge_from_call(monkeypatch, first: int, last: int) -> None:
    """Make the training loss NaN at the loss calls first..last (1-based), one call per optimizer step here."""
    real_loss = objectives.training_loss  # what DiffusionObjective.loss calls
    calls = {"n": 0}

    def loss_that_diverges(*args, **kwargs):
        out = real_loss(*args, **kwargs)
        calls["n"] += 1
        if first <= calls["n"] <= last:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(objectives, "training_loss", loss_that_diverges)


def test_an_update_with_nan_gradients_is_skipped_and_counted_and_the_run_goes_on(tmp_path, monkeypatch):
    diverge_from_call(monkeypatch, 3, 3)
    out = run(tmp_path / "nan", "--max_train_steps", "5", "--checkpointing_steps", "2")
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [entry["skipped_updates"] for entry in log] == [0, 0, 1, 1, 1]
    assert json.loads((out / "eval_results.json").read_text())["skipped_updates"] == 1
    assert all(torch.isfinite(w).all() for w in weights(out).values())


def test_ten_skipped_updates_in_a_row_stop_the_run_naming_the_steps_and_the_last_checkpoint(tmp_path, monkeypatch):
    diverge_from_call(monkeypatch, 3, 10**9)
    out = tmp_path / "nan"
    with pytest.raises(SystemExit) as error:
        run(out, "--max_train_steps", "50", "--checkpointing_steps", "2")
    assert str(error.value) == (
        "The gradients were NaN or inf at every step from 3 to 12 (10 updates skipped in a row, 10 in all); stopping, "
        f"nothing non-finite saved. The last checkpoint with finite weights is {out / 'checkpoint-10'}: resume from "
        "it (--resume_from_checkpoint checkpoint-10) with a lower --learning_rate or --max_grad_norm, or "
        "--mixed_precision no."
    )
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-8", "checkpoint-10"]  # stopped before saving 12


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--loss_type", "l2"], "--loss_type 'l2' is not one of: simple, vlb, hybrid, hybrid_decoder"),
        (["--prediction_type", "noise"], "--prediction_type 'noise' is not one of: epsilon, sample, v_prediction"),
        (["--variance_type", "learned"], "--variance_type 'learned' is not one of"),
        (["--beta_schedule", "not_a_schedule"], "--beta_schedule 'not_a_schedule' is not one of"),
        (["--resolution", "27"], "--resolution 27 cannot be halved 1 times"),
        (["--resume_from_checkpoint", "checkpoint-99"], "no checkpoint folder there"),
        (["--loss_type", "simple"], "does not train a learned variance"),
        (["--push_to_hub"], "--push_to_hub needs --hub_model_id"),
        (["--save_pipeline_steps", "0"], "--save_pipeline_steps must be positive"),
    ],
)
def test_bad_arguments_fail_with_a_message(tmp_path, flags, message):
    with pytest.raises(SystemExit, match=message.replace("(", r"\(").replace(")", r"\)")):
        run(tmp_path / "bad", "--max_train_steps", "1", *flags)


def test_an_output_dir_holding_a_different_model_is_refused(tmp_path):
    out = tmp_path / "run"
    run(out, "--max_train_steps", "1")
    with pytest.raises(SystemExit, match=r"holds a different model \(beta_schedule: 'cosine' -> 'linear'\)"):
        run(out, "--max_train_steps", "1", "--beta_schedule", "linear")


def test_config_file_gives_defaults_that_flags_override(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("learning_rate: 0.0005\nbeta_schedule: linear\n")
    model_args, _, train_args = train.parse_arguments(["--config", str(config), "--beta_schedule", "cosine"])
    assert train_args.learning_rate == 0.0005 and model_args.beta_schedule == "cosine"
    config.write_text("learning_rat: 0.1\n")
    with pytest.raises(SystemExit, match=r"unknown argument\(s\) \['learning_rat'\]"):
        train.parse_arguments(["--config", str(config)])


def test_two_cpu_processes_train_on_different_data_and_save_a_loadable_pipeline(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "training/configs/cpu_2proc.yaml"),
        str(REPO / "training/train.py"),
        "--output_dir",
        str(out),
        *TINY_TRAIN,
        "--max_train_steps",
        "2",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stderr + result.stdout  # each takes its share (tests/test_batches.py)
    assert "32 per optimizer step" in result.stderr + result.stdout
    assert re.search(
        r"Start-up [0-9.]+ s: accelerate launch [0-9.]+ s, Python and imports [0-9.]+ s, .*, data [0-9.]+ s",
        result.stderr,
    )
    assert json.loads((out / "eval_results.json").read_text())["num_processes"] == 2
    pipe = HFDDPMPipeline.from_pretrained(out)
    assert pipe(batch_size=1, num_inference_steps=3, output_type="np").images.shape == (1, 28, 28, 1)


def test_push_to_hub_sends_checkpoints_and_the_final_pipeline_and_never_the_token(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(
        train, "push_pipeline_to_hub", lambda pipeline, repo_id, **kwargs: calls.append((repo_id, kwargs))
    )
    out = run(
        tmp_path / "push",
        "--max_train_steps",
        "2",
        "--checkpointing_steps",
        "1",
        "--push_to_hub",
        "--push_checkpoints",
        "--hub_model_id",
        "org/ddpm-mnist",
        "--hub_token",
        "hf_secret_value",
    )
    assert [c[1].get("path_in_repo", "") for c in calls] == ["checkpoints/step-1", "checkpoints/step-2", ""]
    assert all(repo == "org/ddpm-mnist" and kwargs["token"] == "hf_secret_value" for repo, kwargs in calls)
    assert all("hub_token" not in kwargs["training_args"] for _, kwargs in calls)
    for path in out.rglob("*"):
        if path.is_file():
            assert b"hf_secret_value" not in path.read_bytes(), path


def test_no_absolute_path_of_the_training_machine_reaches_the_pushed_repo(tmp_path, monkeypatch):
    """Data, evaluation data and output folder given as absolute paths: every file the push uploads (read at
    HfApi.create_commit) names at most the folders' last components; the run's own folder keeps the paths."""
    data = Path(hf_ddpm.data.__file__).parent / "mnist"  # the official IDX files, by an absolute path
    uploaded: dict[str, bytes] = {}

    class RecordingApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, *args, **kwargs):
            pass

        def create_commit(self, repo_id, operations, **kwargs):
            uploaded.update({op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations})

    monkeypatch.setattr(hf_ddpm.hub.push, "HfApi", RecordingApi)
    monkeypatch.setenv("HF_TOKEN", "hf_dummy_token")  # a push needs a token before training starts
    out = (tmp_path / "machine-specific-output").resolve()
    run(
        out,
        "--max_train_steps",
        "1",
        "--train_data_dir",
        str(data),
        "--eval_data",
        str(data),
        "--push_to_hub",
        "--hub_model_id",
        "org/ddpm-mnist",
    )
    assert {"README.md", "training_args.json", "model_index.json", "hf_ddpm.py"} <= set(uploaded)
    assert str(data) in (out / "training_args.json").read_text()  # the run's own record keeps the path
    for name, content in uploaded.items():
        for local in (str(data), str(out), str(tmp_path), str(Path.home()) + "/"):
            assert local.encode() not in content, (name, local)
    assert b"MNIST IDX train (mnist)" in uploaded["README.md"]
    assert json.loads(uploaded["training_args.json"])["train_data_dir"] == "mnist"


def test_a_run_writes_the_loss_curve_and_the_bound_by_time_plot_and_its_card_shows_them(tmp_path):
    import PIL.Image

    from helpers import one_thread
    from hf_ddpm.training_utils import read_train_log

    with one_thread():  # the T = 50 terms of bound_by_time.png: tiny batches, 10x faster on one thread of a busy CPU
        out = run(tmp_path / "plots", "--max_train_steps", "2")
    assert [row["step"] for row in read_train_log(out / "train_log.jsonl")] == [1, 2]
    card = (out / "README.md").read_text()
    for name in ("loss_curve.png", "bound_by_time.png"):
        with PIL.Image.open(out / name) as image:
            assert image.format == "PNG" and image.size[0] > 100
        assert f"]({name})" in card
