"""hf_ddpm.training_utils, the generic parts of a training run: checkpoints, resuming, the output folder's guard,
EMA weights, sample grids, precision and hardware (train.py end to end: tests/test_train.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel

from helpers import tiny_vae
from hf_ddpm import VAEPipeline, training_utils
from hf_ddpm.training_utils import (
    check_output_dir,
    checkpoint_step,
    cpu_has_native_bf16,
    ema_weights,
    hardware_description,
    has_accelerator_device,
    image_grid,
    list_checkpoints,
    log_sample_grid,
    remove_partial_checkpoints,
    resolve_mixed_precision,
    resolve_resume_path,
    sample_grid,
    save_checkpoint,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def make_folders(root: Path, *names: str) -> None:
    for name in names:
        (root / name).mkdir(parents=True)


# ---------------------------------------------------------------------------------------------- checkpoints
def test_checkpoints_are_the_complete_step_folders_oldest_first(tmp_path):
    make_folders(
        tmp_path, "checkpoint-10", "checkpoint-9", "checkpoint-200", "checkpoint-300.tmp", "checkpoint-x", "logs"
    )
    (tmp_path / "checkpoint-5").write_text("a file, not a checkpoint")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-9", "checkpoint-10", "checkpoint-200"]
    assert checkpoint_step(tmp_path / "checkpoint-200") == 200
    for name in ("checkpoint-300.tmp", "checkpoint-", "checkpoint-x", "step-3"):
        assert checkpoint_step(tmp_path / name) is None, name
    remove_partial_checkpoints(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-10",
        "checkpoint-200",
        "checkpoint-5",
        "checkpoint-9",
        "checkpoint-x",
        "logs",
    ]
    assert list_checkpoints(tmp_path / "missing") == []


def test_save_checkpoint_writes_atomically_and_keeps_the_newest(tmp_path):
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(2, 1))
    (tmp_path / "checkpoint-3.tmp").mkdir()  # a save killed half-way
    (tmp_path / "checkpoint-3.tmp" / "junk").write_text("x")
    for step in (1, 2, 3):
        with torch.no_grad():
            model.weight.fill_(step)
        saved = save_checkpoint(accelerator, tmp_path, step, total_limit=2)
        assert saved == tmp_path / f"checkpoint-{step}" and saved.is_dir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / "checkpoint-3" / "junk").exists()
    with torch.no_grad():
        model.weight.zero_()
    accelerator.load_state(str(tmp_path / "checkpoint-3"))
    assert torch.equal(model.weight, torch.full((1, 2), 3.0))
    save_checkpoint(accelerator, tmp_path, 3, total_limit=None)  # saving a step again replaces it
    save_checkpoint(accelerator, tmp_path, 4, total_limit=None)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3", "checkpoint-4"]


def test_resolve_resume_path(tmp_path):
    assert resolve_resume_path(None, tmp_path) is None
    assert resolve_resume_path("latest", tmp_path) is None  # nothing to resume: a new run
    make_folders(tmp_path, "checkpoint-4", "checkpoint-12", "checkpoint-20.tmp")
    assert resolve_resume_path("latest", tmp_path) == tmp_path / "checkpoint-12"
    assert resolve_resume_path("checkpoint-4", tmp_path) == tmp_path / "checkpoint-4"
    assert resolve_resume_path(str(tmp_path / "checkpoint-4"), tmp_path / "elsewhere") == tmp_path / "checkpoint-4"
    message = (
        r"--resume_from_checkpoint checkpoint-99: no checkpoint folder there\. "
        r"Use 'latest' or one of \['checkpoint-4', 'checkpoint-12'\]\."
    )
    with pytest.raises(ValueError, match=message):
        resolve_resume_path("checkpoint-99", tmp_path)
    with pytest.raises(ValueError, match="Use 'latest' or one of the checkpoint-STEP folders a run writes"):
        resolve_resume_path("checkpoint-1", tmp_path / "empty")
    with pytest.raises(ValueError, match="no checkpoint folder there"):
        resolve_resume_path("checkpoint-20.tmp", tmp_path)  # a partial save is not a checkpoint


def test_check_output_dir_refuses_another_model_unless_overwriting(tmp_path):
    arguments = {"beta_schedule": "linear", "num_train_timesteps": 50, "learning_rate": 1e-3}
    keys = ["beta_schedule", "num_train_timesteps"]
    check_output_dir(tmp_path, arguments, keys, overwrite=False)  # no training_args.json yet
    (tmp_path / "training_args.json").write_text(
        json.dumps({**arguments, "beta_schedule": "cosine", "learning_rate": 1})
    )
    message = (
        r"--output_dir .* holds a different model \(beta_schedule: 'cosine' -> 'linear'\)\. Choose a new --output_dir"
    )
    with pytest.raises(ValueError, match=message):
        check_output_dir(tmp_path, arguments, keys, overwrite=False)
    check_output_dir(tmp_path, arguments, keys, overwrite=True)
    check_output_dir(tmp_path, arguments, ["num_train_timesteps", "learning_rate"][:1], overwrite=False)  # same model


def test_ema_weights_swaps_the_ema_weights_in_and_out():
    model = torch.nn.Linear(3, 1)
    ema = EMAModel(model.parameters(), decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.step(model.parameters())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    trained = [p.detach().clone() for p in model.parameters()]
    averaged = [p.detach().clone() for p in ema.shadow_params]
    assert all((a - t).abs().min() > 0.5 for a, t in zip(averaged, trained))
    with ema_weights(ema, model) as inside:
        assert inside is model
        assert all(torch.equal(p, a) for p, a in zip(model.parameters(), averaged))
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), trained))
    with ema_weights(None, model) as inside:  # without EMA: nothing happens
        assert all(torch.equal(p, t) for p, t in zip(inside.parameters(), trained))


# ---------------------------------------------------------------------------------------------- outputs
@pytest.mark.parametrize("count, rows, cols", [(6, 2, 3), (16, 4, 4), (7, 1, 7), (1, 1, 1), (12, 3, 4)])
def test_image_grid_is_the_squarest_grid_with_full_rows(count, rows, cols):
    images = [PIL.Image.new("L", (5, 4), color=10 * i) for i in range(count)]
    grid = image_grid(images)
    assert grid.size == (5 * cols, 4 * rows)
    assert np.asarray(grid.convert("L"))[4 * (rows - 1), 5 * (cols - 1)] == 10 * (count - 1)  # the last, bottom right


def test_sample_grid_draws_with_a_seeded_cpu_generator():
    pipeline = VAEPipeline(tiny_vae())
    grid = sample_grid(pipeline, 4, seed=3)
    images = pipeline(batch_size=4, generator=torch.Generator().manual_seed(3), output_type="pil").images
    assert grid.size == (56, 56)
    np.testing.assert_array_equal(np.asarray(grid), np.asarray(image_grid(images)))
    np.testing.assert_array_equal(np.asarray(sample_grid(pipeline, 4, seed=3)), np.asarray(grid))


# ---------------------------------------------------------------------------------------------- the machine
def test_cpu_has_native_bf16_reads_the_cpu_flags(monkeypatch):
    real_read_text = Path.read_text

    def cpuinfo(flags: str):
        def read_text(self, *args, **kwargs):
            return (
                f"processor : 0\nflags : fpu sse2 {flags}\n"
                if str(self) == "/proc/cpuinfo"
                else real_read_text(self, *args, **kwargs)
            )

        return read_text

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    for flags, expected in (("avx2 avx512f", False), ("avx512f avx512_bf16", True), ("amx_bf16 amx_tile", True)):
        monkeypatch.setattr(Path, "read_text", cpuinfo(flags))
        assert cpu_has_native_bf16() is expected, flags
    # the same CPU with torch's kernels restricted to AVX2 (ATEN_CPU_CAPABILITY=avx2): bf16 only by conversions
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert cpu_has_native_bf16() is False
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")

    def unreadable(self, *args, **kwargs):
        raise OSError("no /proc here")

    monkeypatch.setattr(Path, "read_text", unreadable)
    assert cpu_has_native_bf16() is False


def test_resolve_mixed_precision(monkeypatch):
    for explicit in ("no", "bf16", "fp16"):
        assert resolve_mixed_precision(explicit) == explicit
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    assert resolve_mixed_precision("auto") == "fp16"  # as accelerate launch was configured
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # what accelerate launch reports when nothing was set
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for native, expected in ((True, "bf16"), (False, "no")):
        monkeypatch.setattr(training_utils, "cpu_has_native_bf16", lambda native=native: native)
        assert resolve_mixed_precision("auto") == expected
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for supported, expected in ((True, "bf16"), (False, "no")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda supported=supported: supported)
        assert resolve_mixed_precision("auto") == expected


def test_has_accelerator_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    if hasattr(torch, "xpu"):
        monkeypatch.setattr(torch.xpu, "is_available", lambda: False)
    assert has_accelerator_device() is False
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert has_accelerator_device() is True
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert has_accelerator_device() is True


def test_hardware_description():
    accelerator = SimpleNamespace(device=torch.device("cpu"), num_processes=2)
    assert hardware_description(accelerator) == f"2 x cpu ({os.cpu_count()} cores)"


def test_log_sample_grid_sends_the_grid_to_every_tracker_that_logs_images():
    calls = []

    class Tracker:
        def __init__(self, name):
            self.name = name

        def log_images(self, values, step, **kwargs):
            calls.append((self.name, values, step, kwargs))

    class NoImages:
        name = "csv"

    grid = PIL.Image.new("L", (6, 4), color=7)
    log_sample_grid(SimpleNamespace(trackers=[Tracker("tensorboard"), NoImages(), Tracker("wandb")]), grid, step=12)
    assert [(name, step) for name, _, step, _ in calls] == [("tensorboard", 12), ("wandb", 12)]
    (_, board, _, board_kwargs), (_, other, _, other_kwargs) = calls
    assert board_kwargs == {"dataformats": "NHWC"} and board["samples"].shape == (1, 4, 6, 3)
    assert (board["samples"] == 7).all() and board["samples"].dtype == np.uint8
    assert other_kwargs == {} and other["samples"] == [grid]


def test_flush_denormals_reaches_the_threads_torch_starts_after_it():
    """Subnormal products become exact zeros on every one of torch's threads when flush_denormals runs first (train.py
    calls it first thing); without it they stay subnormal. A fresh interpreter each, with 2 threads."""
    program = (
        "import sys, torch\n"
        "from hf_ddpm.training_utils import flush_denormals\n"
        "flushed = flush_denormals() if sys.argv[1] == 'flush' else False\n"
        "torch.set_num_threads(2)\n"
        "x = torch.full((1_000_000,), 1e-39) * torch.full((1_000_000,), 0.5)\n"
        "print(flushed, int((x != 0).sum()))\n"
    )
    outputs = {
        mode: subprocess.run(
            [sys.executable, "-c", program, mode], capture_output=True, text=True, check=True
        ).stdout.split()
        for mode in ("flush", "keep")
    }
    if outputs["flush"][0] != "True":
        pytest.skip("this CPU cannot flush subnormals (not x86 with SSE3)")
    assert outputs["flush"][1] == "0"
    assert outputs["keep"][1] == "1000000"


def test_startup_times_are_the_seconds_between_marks_from_the_process_start():
    clock = iter([12.0, 13.5, 13.75])
    startup = training_utils.StartupTimes(process_start=5.0, now=lambda: next(clock))
    for what in ("Python and imports", "accelerator", "data"):
        startup.mark(what)
    assert startup.describe() == "Start-up 8.8 s: Python and imports 7.0 s, accelerator 1.5 s, data 0.2 s."


def test_startup_times_of_a_process_count_from_its_start():
    """A process that sleeps 1.5 s before it reads its start finds at least that much before its first mark."""
    script = (
        "import time; time.sleep(1.5); from hf_ddpm.training_utils import StartupTimes; "
        "s = StartupTimes.of_this_process(); s.mark('x'); print(s.points[1][1] - s.points[0][1])"
    )
    seconds = float(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout)
    assert 1.5 <= seconds < 60


def test_startup_times_under_accelerate_launch_begin_with_the_launchers_part():
    startup = training_utils.StartupTimes(process_start=5.0, now=lambda: 9.0, launcher_start=3.0)
    startup.mark("Python and imports")
    assert startup.describe() == "Start-up 6.0 s: accelerate launch 2.0 s, Python and imports 4.0 s."
