"""One run per output folder (issue #30), with real processes: the run training in a folder holds its
``train.lock`` (pid, host, start time); a second run there is refused at once in one line naming the holder; the
lock of a killed run is taken over; a finished or failed run leaves no lock behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO_ROOT, TINY_TRAIN
from hf_ddpm.training_utils import RUN_LOCK, acquire_run_lock, release_run_locks

ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src"), "OMP_NUM_THREADS": "1"}


def train(out: Path, *flags: str, **popen) -> subprocess.Popen:
    argv = [sys.executable, str(REPO_ROOT / "training" / "train.py"), "--output_dir", str(out), *TINY_TRAIN, *flags]
    return subprocess.Popen(argv, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def wait_for_lock(out: Path, process: subprocess.Popen) -> dict:
    deadline = time.time() + 120
    while time.time() < deadline:
        assert process.poll() is None, process.communicate()
        try:
            return json.loads((out / RUN_LOCK).read_text())
        except (OSError, ValueError):
            time.sleep(0.2)
    raise AssertionError("the first run never took its lock")


def test_a_second_run_is_refused_naming_the_first_and_a_killed_runs_lock_is_taken_over(tmp_path):
    out = tmp_path / "run"
    first = train(out, "--max_train_steps", "100000")
    try:
        holder = wait_for_lock(out, first)
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
        started = time.time()
        second = train(out, "--max_train_steps", "1")
        _, err = second.communicate(timeout=300)
        assert second.returncode == 2 and time.time() - started < 120
        assert err.strip().splitlines() == [
            f"error: --output_dir {out} is in use by another training run (pid {first.pid} on host "
            f"{holder['host']}, started {holder['started']}, lock file {out / RUN_LOCK}); wait for it to end or "
            "choose another --output_dir."
        ]
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert json.loads((out / RUN_LOCK).read_text())["pid"] == first.pid  # a killed run cannot clean up
    third = train(out, "--max_train_steps", "1")
    _, err = third.communicate(timeout=600)
    assert third.returncode == 0, err
    assert (
        f"--output_dir {out}: took over the lock of a run that is no longer running (pid {first.pid} on host "
        f"{holder['host']}, started {holder['started']})."
    ) in err
    assert not (out / RUN_LOCK).exists()  # released at the end
    assert json.loads((out / "eval_results.json").read_text())["steps"] == 1


def test_the_lock_is_released_when_a_run_fails_and_is_reentrant_in_one_process(tmp_path):
    out = tmp_path / "run"
    failing = train(out, "--max_train_steps", "2", "--learning_rate", "1e38", "--checkpointing_steps", "100")
    _, err = failing.communicate(timeout=300)
    assert failing.returncode == 2 and "The weights became NaN or inf at step 2" in err
    assert not (out / RUN_LOCK).exists()
    assert acquire_run_lock(out) is None
    assert acquire_run_lock(out) is None  # this process again: its own hold is replaced, not refused
    child = subprocess.run(
        [sys.executable, "-c", f"from hf_ddpm.training_utils import acquire_run_lock; acquire_run_lock({str(out)!r})"],
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert f"is in use by another training run (pid {os.getpid()} on host" in child.stderr
    release_run_locks()
    assert not (out / RUN_LOCK).exists()
    with pytest.raises(FileNotFoundError):
        acquire_run_lock(tmp_path / "missing")
