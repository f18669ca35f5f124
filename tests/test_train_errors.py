"""train.py fails fast, in one line, and loses nothing (issue #14): every bad argument is refused before any work
starts, with the message a user sees; --overwrite_output_dir starts over; a resume checks the checkpoint's model;
the training log survives kills and resumes; resuming a finished run does nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import TINY_TRAIN  # first: it makes training/train.py importable
from hf_ddpm import training_args
from hf_ddpm.training_utils import list_checkpoints

REPO = Path(__file__).resolve().parents[1]
import train  # noqa: E402  (importable through helpers)


def run(output_dir: Path, *flags: str) -> Path:
    return train.main(["--output_dir", str(output_dir), *TINY_TRAIN, *flags])


def one_line_error(capsys, argv: list[str]) -> str:
    """What a user sees from ``python training/train.py ARGV``: exit code 2 and one stderr line."""
    assert training_args.run_cli(train.main, argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num_sample_images", "0"], "error: --num_sample_images must be >= 1, got 0."),
        (["--sample_steps", "0"], "error: --sample_steps must be >= 1, got 0."),
        (["--sample_steps", "51"], "error: --sample_steps must be in [1, 50] (--num_train_timesteps), got 51."),
        (["--eval_timesteps_per_image", "0"], "error: --eval_timesteps_per_image must be >= 1, got 0."),
        (["--eval_timesteps_per_image", "50"], "error: --eval_timesteps_per_image must be in [1, 49]"),
        (["--eval_batch_size", "0"], "error: --eval_batch_size must be >= 1, got 0."),
        (["--checkpoints_total_limit", "-1"], "error: --checkpoints_total_limit must be >= 1 or unset, got -1"),
        (["--max_train_steps", "0"], "error: --max_train_steps must be >= 1 or unset, got 0"),
        (["--resolution", "0"], "error: --resolution must be between 4 (the smallest image 2 levels can halve) and"),
        (["--resolution", "-5"], "error: --resolution must be between 4"),
        (["--resolution", "1000"], "(attention and memory grow with its 4th power), got 1000."),
        (["--learning_rate", "nan"], "error: --learning_rate must be a finite number > 0, got nan."),
        (["--learning_rate", "0"], "error: --learning_rate must be a finite number > 0, got 0.0."),
        (["--num_train_timesteps", "1", "--sample_steps", "1"], "error: --num_train_timesteps must be >= 2"),
        (["--overwrite_output_dir", "--resume_from_checkpoint", "l"], "error: --overwrite_output_dir starts over"),
        (["--schedule_interior", "variance"], "error: --schedule_interior variance trains a learned noise schedule"),
        (["--schedule_interior", "noise"], "error: --schedule_interior 'noise' is not one of: bound, variance."),
    ],
)
def test_bad_counts_are_refused_in_one_line_before_any_work(tmp_path, capsys, flags, message):
    line = one_line_error(capsys, ["--output_dir", str(tmp_path / "out"), *TINY_TRAIN, *flags])
    assert message in line
    assert not (tmp_path / "out").exists()  # nothing started


def test_wandb_without_wandb_installed_is_refused(tmp_path, capsys, monkeypatch):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    line = one_line_error(capsys, ["--output_dir", str(tmp_path / "o"), *TINY_TRAIN, "--logger", "wandb"])
    assert line == (
        "error: --logger wandb: wandb is not installed; pip install wandb, or pass --logger tensorboard or none."
    )


def test_an_output_dir_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    line = one_line_error(capsys, ["--output_dir", str(tmp_path / "file"), *TINY_TRAIN])
    assert "is a file, not a folder" in line
    line = one_line_error(capsys, ["--output_dir", str(tmp_path / "file" / "sub"), *TINY_TRAIN])
    assert "is a file, so the folder cannot be made there" in line


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("run.yaml", "max_train_steps: 2.7\n", "max_train_steps must be an integer, got 2.7."),
        ("run.yaml", "learning_rate: [0.1, 0.2]\n", "learning_rate must be a single value, got [0.1, 0.2]."),
        ("run.yaml", "seed: [1\n", "not valid YAML"),
        ("run.json", '{"seed": 1,', "not valid JSON"),
        ("run.yaml", "- seed\n", "expected a mapping of argument: value, got a list."),
        ("run.yaml", "use_ema: maybe\n", "use_ema must be true or false, got 'maybe'."),
        ("run.yaml", "block_out_channels: 8\n", "block_out_channels must be a list of integers, got 8."),
    ],
)
def test_a_bad_config_file_is_refused_in_one_line(tmp_path, capsys, name, text, message):
    config = tmp_path / name
    config.write_text(text)
    assert message in one_line_error(capsys, ["--config", str(config), "--output_dir", str(tmp_path / "o")])


def test_a_config_float_written_1e_3_in_yaml_still_reads_as_a_number(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("learning_rate: 1e-3\nmax_train_steps: 7\n")
    _, _, train_args = train.parse_arguments(["--config", str(config)])
    assert train_args.learning_rate == 1e-3 and train_args.max_train_steps == 7


def test_missing_training_data_is_one_line(tmp_path, capsys):
    argv = ["--output_dir", str(tmp_path / "o"), *TINY_TRAIN, "--train_data_dir", str(tmp_path / "nope")]
    line = one_line_error(capsys, argv)
    assert str(tmp_path / "nope") in line


def test_overwrite_output_dir_starts_over_so_latest_cannot_pick_the_old_run(tmp_path):
    out = tmp_path / "run"
    run(out, "--max_train_steps", "4", "--checkpointing_steps", "2", "--num_train_timesteps", "40")
    assert (out / "checkpoint-4").is_dir()
    (out / "notes.txt").write_text("mine")
    run(out, "--max_train_steps", "1", "--overwrite_output_dir")
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1"]
    assert (out / "notes.txt").read_text() == "mine"  # only what a run writes is removed
    assert [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()] == [1]
    assert json.loads((out / "training_args.json").read_text())["num_train_timesteps"] == 50


def test_resuming_a_checkpoint_of_another_model_names_the_differing_keys(tmp_path, capsys):
    out = tmp_path / "run"
    run(out, "--max_train_steps", "2", "--checkpointing_steps", "2")
    capsys.readouterr()
    other = tmp_path / "other"
    line = one_line_error(
        capsys,
        [
            "--output_dir",
            str(other),
            *TINY_TRAIN,
            "--num_train_timesteps",
            "40",
            "--max_train_steps",
            "4",
            "--resume_from_checkpoint",
            str(out / "checkpoint-2"),
        ],
    )
    assert "is of a different model (num_train_timesteps: 50 -> 40)" in line


def test_the_log_is_appended_on_resume_without_duplicate_steps_and_a_finished_run_does_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    run(out, "--max_train_steps", "3", "--checkpointing_steps", "2")
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    # resume from checkpoint-2 (as after a kill at step 3): step 3 is dropped, then trained again; 1 and 2 are kept
    subprocess.run(["rm", "-rf", str(out / "checkpoint-3"), str(out / "eval_results.json")], check=True)
    run(out, "--max_train_steps", "4", "--checkpointing_steps", "2", "--resume_from_checkpoint", "latest")
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    capsys.readouterr()
    before = (out / "checkpoint-4" / "model.safetensors").read_bytes()
    run(out, "--max_train_steps", "4", "--checkpointing_steps", "2", "--resume_from_checkpoint", "latest")
    said = capsys.readouterr().out.strip().splitlines()
    assert said == [
        f"checkpoint-4 is at step 4 >= --max_train_steps 4 and its outputs are in {out}: the run is finished, nothing "
        "to do (raise --max_train_steps to train further)."
    ]
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    assert (out / "checkpoint-4" / "model.safetensors").read_bytes() == before
    assert json.loads((out / "eval_results.json").read_text())["steps"] == 4
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 4


def test_the_script_prints_one_line_and_the_traceback_only_with_debug(tmp_path):
    command = [
        sys.executable,
        str(REPO / "training" / "train.py"),
        "--output_dir",
        str(tmp_path / "o"),
        "--checkpoints_total_limit",
        "-1",
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --checkpoints_total_limit must be >= 1 or unset, got -1"
    result = subprocess.run([*command, "--debug"], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "error: --checkpoints_total_limit must be >= 1 or unset, got -1"


def test_a_full_disk_names_the_path_and_the_cause_and_keeps_the_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"

    def full_disk(pipeline, folder, **kwargs):
        raise OSError(28, "No space left on device", str(folder / "unet" / "diffusion_pytorch_model.safetensors"))

    monkeypatch.setattr(train, "save_pipeline_repo", full_disk)
    assert training_args.run_cli(train.main, ["--output_dir", str(out), *TINY_TRAIN, "--max_train_steps", "2"]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == (
        f"error: could not write {out / 'unet' / 'diffusion_pytorch_model.safetensors'}: No space left on device; "
        "free space or choose another --output_dir."
    )
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
