"""The generic pieces of issue #14 in hf_ddpm.training_utils: the training log that survives kills and resumes,
the checkpoint compatibility check, --overwrite_output_dir's clean start, and the rotation's limit."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from hf_ddpm.training_utils import TrainLog, check_checkpoint_compatible, clear_output_dir, save_checkpoint


def steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_the_log_is_flushed_line_by_line_so_a_killed_run_keeps_it(tmp_path):
    log = TrainLog(tmp_path / "train_log.jsonl")
    log.append({"step": 1, "loss": 0.5})
    log.append({"step": 2, "loss": 0.4})
    assert steps(tmp_path / "train_log.jsonl") == [1, 2]  # on disk before close: what a SIGKILL leaves
    log.close()


def test_a_resumed_log_keeps_the_history_and_drops_the_steps_after_the_checkpoint(tmp_path):
    path = tmp_path / "train_log.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')  # cut by a kill
    log = TrainLog(path, resume_step=3)
    log.append({"step": 4})
    log.close()
    assert steps(path) == [1, 2, 3, 4]


def test_a_new_run_starts_an_empty_log(tmp_path):
    path = tmp_path / "train_log.jsonl"
    path.write_text(json.dumps({"step": 9}) + "\n")
    TrainLog(path).close()
    assert path.read_text() == ""


def test_a_checkpoint_of_another_model_is_refused_naming_the_keys(tmp_path):
    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    check_checkpoint_compatible(checkpoint, {"num_train_timesteps": 50}, ["num_train_timesteps"])  # no saved args: ok
    saved = {"num_train_timesteps": 50, "beta_schedule": "cosine", "seed": 1}
    (checkpoint / "training_args.json").write_text(json.dumps(saved))
    check_checkpoint_compatible(
        checkpoint,
        {"num_train_timesteps": 50, "beta_schedule": "cosine", "seed": 2},
        ["num_train_timesteps", "beta_schedule"],
    )
    with pytest.raises(ValueError) as error:
        check_checkpoint_compatible(
            checkpoint,
            {"num_train_timesteps": 40, "beta_schedule": "linear"},
            ["num_train_timesteps", "beta_schedule"],
        )
    assert str(error.value) == (
        f"--resume_from_checkpoint {checkpoint} is of a different model (num_train_timesteps: 50 -> 40, "
        "beta_schedule: 'cosine' -> 'linear'): resume with the arguments it was trained with, or start a new run "
        "without --resume_from_checkpoint."
    )
    assert "\n" not in str(error.value)


def test_clear_output_dir_removes_only_what_a_run_writes(tmp_path):
    out = tmp_path / "run"
    for name in ("checkpoint-2", "checkpoint-4", "checkpoint-6.tmp", "logs", "unet", "scheduler", "mine"):
        (out / name).mkdir(parents=True)
    for name in ("train_log.jsonl", "eval_results.json", "training_args.json", "README.md", "samples.png", "notes"):
        (out / name).write_text("x")
    (out / "model_index.json").write_text(json.dumps({"_class_name": "HFDDPMPipeline", "unet": [], "scheduler": []}))
    removed = clear_output_dir(out, "logs")
    assert sorted(p.name for p in out.iterdir()) == ["mine", "notes"]
    assert "checkpoint-4" in removed and "logs" in removed
    assert clear_output_dir(tmp_path / "absent", "logs") == []


def test_a_rotation_limit_below_one_is_refused_before_anything_is_deleted(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    accelerator = SimpleNamespace(is_main_process=True)
    with pytest.raises(ValueError, match=r"^--checkpoints_total_limit must be >= 1 or unset, got -1$"):
        save_checkpoint(accelerator, tmp_path, 4, -1)
    assert (tmp_path / "checkpoint-2").is_dir()
