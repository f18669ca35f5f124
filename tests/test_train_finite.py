"""Finite or nothing (issue #30): a run whose weights become NaN or inf stops in one line naming the step and the
last checkpoint whose weights were read and found finite, and saves nothing non-finite (no checkpoint, pipeline,
card or eval_results.json); ``--resume_from_checkpoint latest`` passes over non-finite checkpoints and says so.
The divergence is real: ``--learning_rate 1e38`` with the tiny flags of the tests."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import REPO_ROOT, TINY_TRAIN  # first: it makes training/train.py importable
from hf_ddpm import training_args
from hf_ddpm.evaluation import BoundResult
from hf_ddpm.training_utils import (
    FiniteGuard,
    count_nonfinite_checkpoint_weights,
    latest_finite_checkpoint,
    list_checkpoints,
    require_finite_bound,
    resolve_resume_path,
)

DIVERGING = ["--learning_rate", "1e38"]
import train  # noqa: E402  (importable through helpers)

PIPELINE_FILES = ("model_index.json", "README.md", "eval_results.json", "unet", "samples.png")


def one_line_error(capsys, argv: list[str]) -> str:
    assert training_args.run_cli(train.main, argv) == 2
    lines = re.findall(r"error: .*", capsys.readouterr().err)  # after tqdm's progress bar on stderr
    assert len(lines) == 1, lines
    return lines[0]


def test_a_diverging_run_stops_at_the_step_and_names_the_last_finite_checkpoint_then_resumes(tmp_path, capsys, caplog):
    out = tmp_path / "run"
    argv = ["--output_dir", str(out), *TINY_TRAIN, "--checkpointing_steps", "1", "--max_train_steps", "4"]
    line = one_line_error(capsys, [*argv, *DIVERGING])
    # step 1 moves every weight by ~1e38 (still finite); step 2 overflows them: checkpoint-2 is never written
    assert line == (
        f"error: The weights became NaN or inf at step 2; stopping, nothing non-finite saved. The last checkpoint "
        f"with finite weights is {out / 'checkpoint-1'}: resume from it (--resume_from_checkpoint checkpoint-1) with "
        "a lower --learning_rate or --max_grad_norm, or --mixed_precision no."
    )
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1"]
    assert count_nonfinite_checkpoint_weights(out / "checkpoint-1") == (0, 2 * 48474)  # the weights and the EMA's
    assert not any((out / name).exists() for name in PIPELINE_FILES)


def test_a_non_finite_held_out_bound_mid_run_stops_the_run_naming_the_step_and_the_last_finite_checkpoint(
    tmp_path, capsys, monkeypatch
):
    real_evaluate_bound, bounds = train.evaluate_bound, []

    def one_image_nan(*args, **kwargs):  # finite weights whose outputs are not: one image's bound is NaN
        bound = real_evaluate_bound(*args, **kwargs)
        bound.per_image_terms["prior"][3] = math.nan
        bounds.append(bound)
        return bound

    monkeypatch.setattr(train, "evaluate_bound", one_image_nan)
    out = tmp_path / "run"
    argv = ["--output_dir", str(out), *TINY_TRAIN, "--max_train_steps", "4", "--checkpointing_steps", "2"]
    line = one_line_error(capsys, [*argv, "--eval_steps", "3"])
    assert line == (
        "error: The held-out bound became nan bits/dim (1 of 16 images' bounds are NaN or inf) at step 3; stopping, "
        f"nothing non-finite saved. The last checkpoint with finite weights is {out / 'checkpoint-2'}: resume from it "
        "(--resume_from_checkpoint checkpoint-2) with a lower --learning_rate or --max_grad_norm, or "
        "--mixed_precision no."
    )
    assert len(bounds) == 1  # the mid-run evaluation at step 3; the run never reached step 4
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
    assert not any((out / name).exists() for name in PIPELINE_FILES)


def test_resuming_latest_passes_over_a_non_finite_checkpoint_and_says_so(tmp_path, caplog):
    out = tmp_path / "run"
    argv = ["--output_dir", str(out), *TINY_TRAIN, "--checkpointing_steps", "1", "--max_train_steps", "2"]
    train.main(argv)
    (out / "eval_results.json").unlink()  # as if killed after checkpoint-2 was saved
    weights = load_file(out / "checkpoint-2" / "model.safetensors")
    save_file(
        {k: torch.full_like(v, math.nan) for k, v in weights.items()}, out / "checkpoint-2" / "model.safetensors"
    )
    with caplog.at_level(logging.WARNING, logger="hf_ddpm.training_utils"):
        train.main([*argv, "--resume_from_checkpoint", "latest"])
    assert (
        "--resume_from_checkpoint latest: skipped checkpoint-2 (NaN or inf weights); resuming from checkpoint-1, the "
        "latest checkpoint whose weights are all finite."
    ) in caplog.messages
    assert count_nonfinite_checkpoint_weights(out / "checkpoint-2") == (0, 2 * 48474)  # step 2 trained again
    results = json.loads((out / "eval_results.json").read_text())
    assert math.isfinite(results["nll"]["bits_per_dim"]) and results["steps"] == 2


def test_a_run_diverging_before_any_checkpoint_saves_nothing_and_exits_non_zero(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "--output_dir",
        str(out),
        *TINY_TRAIN,
        *DIVERGING,
        "--max_train_steps",
        "2",
        "--checkpointing_steps",
        "100",
    ]
    line = one_line_error(capsys, argv)
    assert line == (
        "error: The weights became NaN or inf at step 2; stopping, nothing non-finite saved. No checkpoint with "
        "finite weights was saved: start again with a lower --learning_rate or --max_grad_norm, or "
        "--mixed_precision no."
    )
    assert list_checkpoints(out) == []
    assert not any((out / name).exists() for name in PIPELINE_FILES)


def make_checkpoint(folder, value: float):
    folder.mkdir(parents=True)
    save_file({"w": torch.full((3,), value)}, folder / "model.safetensors")
    torch.save({"shadow_params": [torch.zeros(2)], "decay": 0.9}, folder / "custom_checkpoint_0.pkl")


def test_latest_and_a_named_checkpoint_are_refused_when_their_weights_are_not_finite(tmp_path):
    make_checkpoint(tmp_path / "checkpoint-5", 1.0)
    make_checkpoint(tmp_path / "checkpoint-7", math.inf)
    make_checkpoint(tmp_path / "checkpoint-9", math.nan)
    assert latest_finite_checkpoint(tmp_path) == (
        tmp_path / "checkpoint-5",
        [tmp_path / f"checkpoint-{s}" for s in (9, 7)],
    )
    assert count_nonfinite_checkpoint_weights(tmp_path / "checkpoint-7") == (3, 5)
    with pytest.raises(ValueError) as error:
        resolve_resume_path("checkpoint-9", tmp_path)
    assert str(error.value) == (
        "--resume_from_checkpoint checkpoint-9: 3 of its 5 weights are NaN or inf; resume from checkpoint-5 with a "
        "lower --learning_rate."
    )
    shutil.rmtree(tmp_path / "checkpoint-5")
    with pytest.raises(ValueError) as error:
        resolve_resume_path("latest", tmp_path)
    assert str(error.value) == (
        f"--resume_from_checkpoint latest: every checkpoint in {tmp_path} (checkpoint-9, checkpoint-7) has NaN or inf "
        "weights; start a new run with --overwrite_output_dir and a lower --learning_rate."
    )


def test_the_guard_names_the_first_non_finite_step_and_reads_its_flag_only_when_asked(tmp_path):
    guard = FiniteGuard(tmp_path, every=10)
    weights = [torch.ones(4), torch.zeros(2, 2)]
    for step in (1, 2):
        guard.observe(weights, None, step)
    weights[1][0, 1] = -math.inf
    for step in (3, 4, 5):  # non-finite from step 3 on: not read back until step 10 or a check
        guard.observe(weights, None, step)
    weights[1][0, 1] = 0.0
    guard.observe(weights, None, 6)  # finite again: the flag stays down
    with pytest.raises(SystemExit) as error:
        guard.check(6)
    assert str(error.value).startswith("The weights became NaN or inf at step 3 (found at step 6); stopping")
    with pytest.raises(SystemExit):
        guard.observe(weights, None, 10)


def test_the_guard_watches_the_ema_weights_too(tmp_path):
    from diffusers.training_utils import EMAModel

    weights = [torch.nn.Parameter(torch.ones(3))]
    ema = EMAModel(weights)
    ema.shadow_params[0][1] = math.nan
    guard = FiniteGuard(tmp_path)
    guard.observe(weights, ema, 1)
    with pytest.raises(SystemExit, match="at step 1;"):
        guard.check(1)


def test_a_non_finite_bound_is_an_error_saying_what_was_not_written():
    bound = BoundResult({"prior": torch.tensor([0.5, math.nan, 0.25]), "denoising": torch.ones(3)}, "exact")
    with pytest.raises(ValueError) as error:
        require_finite_bound(bound, "nothing was written")
    assert str(error.value) == (
        "the bound is nan bits/dim (1 of 3 images' bounds are NaN or inf): the model's outputs are not finite; "
        "nothing was written."
    )
    require_finite_bound(BoundResult({"prior": torch.ones(2)}, "exact"), "unused")


def test_num_train_timesteps_beyond_its_bound_is_refused_before_any_work(tmp_path, capsys):
    argv = ["--output_dir", str(tmp_path / "out"), *TINY_TRAIN, "--num_train_timesteps", "1000000000"]
    assert one_line_error(capsys, argv) == (
        "error: --num_train_timesteps must be <= 100,000 (T diffusion steps), got 1,000,000,000."
    )
    assert not (tmp_path / "out").exists()


def limit_file_size(limit: int = 100_000) -> None:
    """In a child process: writing a file past ``limit`` bytes fails with EFBIG, as a full disk fails a write."""
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_a_checkpoint_write_that_fails_names_the_folder_in_words(tmp_path):
    out = tmp_path / "run"
    argv = [sys.executable, str(REPO_ROOT / "training" / "train.py"), "--output_dir", str(out), *TINY_TRAIN]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src"), "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run(
        [*argv, "--max_train_steps", "1"], env=env, capture_output=True, text=True, preexec_fn=limit_file_size
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert re.findall(r"error: .*", result.stderr) == [
        f"error: could not write {out / 'checkpoint-1.tmp'}: File too large; the previous checkpoint is kept; free "
        "space or choose another --output_dir."
    ]
    assert list_checkpoints(out) == []


def test_save_pretrained_that_fails_to_write_names_the_folder_in_words(tmp_path):
    script = (
        "import sys; sys.path.insert(0, 'tests'); from helpers import tiny_ddpm_pipeline\n"
        "from test_train_finite import limit_file_size\n"
        "pipeline = tiny_ddpm_pipeline(); limit_file_size(10_000)\n"
        f"try:\n    pipeline.save_pretrained({str(tmp_path / 'saved')!r})\n"
        "except OSError as error:\n    print(error.filename, '|', error.strerror)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src"), "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert result.stdout.strip() == f"{tmp_path / 'saved'} | File too large", result.stderr


def test_the_guard_reads_nothing_back_between_its_checks(tmp_path, monkeypatch):
    """observe() only queues device work: no tensor is turned into a Python value (which would wait for the device)
    except at a check."""
    weights = [torch.ones(4), torch.zeros(2, 2)]
    guard = FiniteGuard(tmp_path, every=10)

    def read_back(*args):
        raise AssertionError("a tensor was read back to the host")

    for name in ("__bool__", "__int__", "__float__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, read_back)
    for step in range(1, 10):
        guard.observe(weights, None, step)
    with pytest.raises(AssertionError, match="read back"):
        guard.observe(weights, None, 10)  # the check every 10 steps reads the flag


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_guard_adds_no_cuda_synchronisation_per_step(tmp_path):
    weights = [torch.ones(1000, device="cuda"), torch.zeros(30, 30, device="cuda")]
    guard = FiniteGuard(tmp_path, every=100)
    guard.observe(weights, None, 1)
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
    try:
        for step in range(2, 10):
            guard.observe(weights, None, step)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    guard.check(9)  # reads the flag: all finite
