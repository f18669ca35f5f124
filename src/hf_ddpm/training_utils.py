"""The generic parts of a training run, kept out of ``training/train.py`` so they are tested here: checkpoints that
survive a kill, resuming, the output folder's guard and its one-run lock, the check that nothing non-finite is
saved (:class:`FiniteGuard`), EMA weights, sample grids, precision and hardware.

Nothing here knows the model kind (that is :mod:`hf_ddpm.objectives`).
"""

from __future__ import annotations

import atexit
import datetime
import itertools
import json
import logging
import math
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.training_utils import EMAModel
from diffusers.utils import make_image_grid

from .hub.loading import count_nonfinite
from .hub.registration import make_readable, write_failure
from .models.unet import DenoisingUNetOutput
from .sampling_speedup import cpu_has_native_bf16

if TYPE_CHECKING:  # accelerate is the training extra; the CLI uses this module's grids without it
    from accelerate import Accelerator

    from .evaluation import BoundResult

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_ARGS = "training_args.json"
PIPELINE_PREFIX = "pipeline-"  # train.py --save_pipeline_steps: output_dir/pipeline-STEP
#: :class:`FiniteGuard` reads its on-device flag every this many optimizer steps, besides before every save.
FINITE_CHECK_STEPS = 50
#: :class:`SkippedUpdates` stops a run once this many optimizer updates in a row had NaN or inf gradients.
MAX_SKIPPED_UPDATES_IN_A_ROW = 10
#: The lock file of the run training in an output_dir (:func:`acquire_run_lock`): its pid, host and start time.
RUN_LOCK = "train.lock"
_held_run_locks: dict[Path, int] = {}  # output_dir (resolved) -> the open, flock-ed lock file of this process
#: Where ``--posthoc_ema`` keeps its snapshots in the output_dir (hf_ddpm.posthoc_ema.PostHocEMA).
POSTHOC_EMA_FOLDER = "posthoc_ema"
#: What a training run writes into its output_dir (besides checkpoints): removed by :func:`clear_output_dir`.
RUN_OUTPUTS = (
    POSTHOC_EMA_FOLDER,
    "training_args.json",
    "train_log.jsonl",
    "eval_results.json",
    "model_index.json",
    "README.md",
    "samples.png",
    "loss_curve.png",
    "bound_by_time.png",
    "unet",
    "vae",
    "scheduler",
    "hf_ddpm.py",
    f"{PIPELINE_PREFIX}*",
)


# ---------------------------------------------------------------------------------------------- checkpoints
def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints (``checkpoint-STEP``), oldest first. A save in progress is ``checkpoint-STEP.tmp``."""
    found = [p for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(path: Path) -> int | None:
    """STEP of a ``checkpoint-STEP`` folder, None for any other name."""
    suffix = path.name[len(CHECKPOINT_PREFIX) :]
    return int(suffix) if path.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else None


def acquire_run_lock(output_dir: Path) -> str | None:
    """Make this process the one run training in ``output_dir`` (which must exist): an exclusive ``flock`` on
    ``output_dir/train.lock``, which holds its pid, host and start time, kept until :func:`release_run_locks` (or
    the process's end, when the kernel drops it). A lock held by a live process is refused with ``ValueError`` in
    one line naming it; the lock of a process that died (killed, crashed) is no longer held and is taken over, and
    the sentence returned says whose it was (None when there was none). Taking the lock again in the process that
    holds it replaces its hold (a script run twice in one interpreter)."""
    import fcntl  # POSIX only: imported here, so the CLI (which uses this module's grids) imports everywhere

    path = Path(output_dir) / RUN_LOCK
    key = path.parent.resolve()
    if key in _held_run_locks:
        release_run_lock(key)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode("utf-8", "replace")
            os.close(fd)
            raise ValueError(
                f"--output_dir {output_dir} is in use by another training run ({describe_lock_holder(holder)}, lock "
                f"file {path}); wait for it to end or choose another --output_dir."
            ) from None
        try:
            same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:  # its holder removed it between our open and our lock
            same_file = False
        if same_file:
            break
        os.close(fd)
    previous = os.read(fd, 4096).decode("utf-8", "replace")
    holder = {"pid": os.getpid(), "host": socket.gethostname()}
    holder["started"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    _held_run_locks[key] = fd
    if previous.strip():
        return f"took over the lock of a run that is no longer running ({describe_lock_holder(previous)})"
    return None


def describe_lock_holder(text: str) -> str:
    """'pid 123 on host h, started 2026-01-01T00:00:00+00:00' from a :data:`RUN_LOCK` file's text."""
    try:
        holder = json.loads(text)
        return f"pid {holder['pid']} on host {holder['host']}, started {holder['started']}"
    except (ValueError, KeyError, TypeError):
        return "a process that left no details"


def release_run_lock(output_dir: Path) -> None:
    """Remove and release the run lock this process holds on ``output_dir`` (:func:`acquire_run_lock`)."""
    key = Path(output_dir).resolve()
    fd = _held_run_locks.pop(key)
    (key / RUN_LOCK).unlink(missing_ok=True)  # while still locked, so no other run holds the removed file
    os.close(fd)


def release_run_locks() -> None:
    """Release every run lock this process holds (:func:`release_run_lock`); also run at the interpreter's exit."""
    for key in list(_held_run_locks):
        release_run_lock(key)


atexit.register(release_run_locks)


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: Path,
    step: int,
    total_limit: int | None,
    arguments: dict[str, Any] | None = None,
) -> Path:
    """Save model, optimizer, LR schedule, RNG, EMA and objective state, atomically; returns the checkpoint.

    Everything is written into ``checkpoint-STEP.tmp`` and renamed to ``checkpoint-STEP`` only when complete, so
    a run killed mid-save leaves the previous checkpoint as the latest. Old checkpoints beyond ``total_limit`` are
    deleted only after the new one is in place. ``arguments`` (the run's resolved arguments) are saved with it as
    ``training_args.json``, so a resume can check that the checkpoint is of the same model
    (:func:`check_checkpoint_compatible`).
    """
    if total_limit is not None and total_limit < 1:
        raise ValueError(f"--checkpoints_total_limit must be >= 1 or unset, got {total_limit}")
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    staging = output_dir / f"{CHECKPOINT_PREFIX}{step}.tmp"
    if accelerator.is_main_process and staging.exists():
        shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(staging))
    except Exception as error:  # safetensors, torch and the OS each say "disk full" their own way
        failure = write_failure(error, staging)
        if failure is None:
            raise
        raise OSError(
            failure.errno, f"{failure.strerror}; the previous checkpoint is kept", failure.filename
        ) from error
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        make_readable(staging, [p.name for p in staging.glob("*.safetensors")])  # 0644, as any file written
        if arguments is not None:
            (staging / CHECKPOINT_ARGS).write_text(json.dumps(arguments, indent=2, default=str))
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        if total_limit is not None:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def remove_partial_checkpoints(output_dir: Path) -> None:
    """Delete ``checkpoint-STEP.tmp`` folders: saves that were killed half-way."""
    for stale in output_dir.glob(f"{CHECKPOINT_PREFIX}*.tmp"):
        shutil.rmtree(stale)


def resolve_resume_path(resume: str | None, output_dir: Path) -> Path | None:
    """The checkpoint to resume from: None (start fresh: ``resume`` is None, or 'latest' with no checkpoint yet),
    the newest complete one for 'latest', or the given folder (a path, or a name inside ``output_dir``)."""
    if resume is None:
        return None
    if resume == "latest":
        latest, skipped = latest_finite_checkpoint(output_dir)
        if skipped and latest is None:
            raise ValueError(
                f"--resume_from_checkpoint latest: every checkpoint in {output_dir} "
                f"({', '.join(p.name for p in skipped)}) has NaN or inf weights; start a new run with "
                "--overwrite_output_dir and a lower --learning_rate."
            )
        if skipped:
            logger.warning(
                f"--resume_from_checkpoint latest: skipped {', '.join(p.name for p in skipped)} (NaN or inf "
                f"weights); resuming from {latest.name}, the latest checkpoint whose weights are all finite."
            )
        return latest
    path = Path(resume)
    if not path.is_dir() and (output_dir / resume).is_dir():
        path = output_dir / resume
    if not path.is_dir() or checkpoint_step(path) is None:
        names = [p.name for p in list_checkpoints(output_dir)] or "the checkpoint-STEP folders a run writes"
        raise ValueError(
            f"--resume_from_checkpoint {resume}: no checkpoint folder there. Use 'latest' or one of {names}."
        )
    bad, total = count_nonfinite_checkpoint_weights(path)
    if bad:
        latest, _ = latest_finite_checkpoint(path.parent)
        instead = f"resume from {latest.name}" if latest is not None else "start a new run"
        raise ValueError(
            f"--resume_from_checkpoint {resume}: {bad:,} of its {total:,} weights are NaN or inf; {instead} with a "
            "lower --learning_rate."
        )
    return path


# ---------------------------------------------------------------------------------------------- finite weights
def all_finite(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """A 0-dim bool tensor, on the tensors' device and not read back: True when no element of any tensor is NaN
    or +-inf. max_i |x_i| (the infinity norm of all of them, torch's foreach kernels) is finite iff every x_i is:
    NaN propagates through the maximum, and a finite maximum bounds every |x_i|."""
    tensors = [t.detach() for t in tensors]
    if not tensors:
        return torch.ones((), dtype=torch.bool)
    return torch.isfinite(torch.nn.utils.get_total_norm(tensors, norm_type=math.inf))


def count_nonfinite_checkpoint_weights(checkpoint: Path) -> tuple[int, int]:
    """(non-finite values, all values) of the weights a checkpoint holds, read from its files: the model's
    (``model*.safetensors``, as accelerate saves it) and the EMA's (the ``custom_checkpoint_*.pkl`` whose state
    has ``shadow_params``), so whether a checkpoint can be resumed is known, not assumed."""
    from safetensors.torch import load_file

    tensors: list[torch.Tensor] = []
    for weights in sorted(checkpoint.glob("model*.safetensors")):
        tensors += load_file(weights).values()
    for custom in sorted(checkpoint.glob("custom_checkpoint_*.pkl")):
        state = torch.load(custom, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "shadow_params" in state:
            tensors += state["shadow_params"]
    return count_nonfinite(tensors)


def latest_finite_checkpoint(output_dir: Path) -> tuple[Path | None, list[Path]]:
    """(the newest checkpoint in ``output_dir`` whose weights are all finite, read and checked; None if there is
    none) and the newer checkpoints passed over because theirs are not, newest first."""
    skipped = []
    for checkpoint in reversed(list_checkpoints(output_dir)):
        if count_nonfinite_checkpoint_weights(checkpoint)[0] == 0:
            return checkpoint, skipped
        skipped.append(checkpoint)
    return None, skipped


def nonfinite_stop_message(what: str, output_dir: Path) -> str:
    """The one line a run that went non-finite stops with: ``what`` happened, the last checkpoint whose weights
    are finite (read from disk) and how to go on from it."""
    latest, skipped = latest_finite_checkpoint(output_dir)
    passed = f" (passing over {', '.join(p.name for p in skipped)}: NaN or inf)" if skipped else ""
    remedy = "a lower --learning_rate or --max_grad_norm, or --mixed_precision no"
    if latest is None:
        go_on = f"No checkpoint with finite weights was saved{passed}: start again with {remedy}"
    else:
        go_on = (
            f"The last checkpoint with finite weights is {latest}{passed}: resume from it "
            f"(--resume_from_checkpoint {latest.name}) with {remedy}"
        )
    return f"{what}; stopping, nothing non-finite saved. {go_on}."


class FiniteGuard:
    """Stops a run whose weights or EMA weights became NaN or inf, before they are saved.

    :meth:`observe` after an optimizer step folds "all finite" into a flag that stays on the device (no host
    synchronisation) and remembers the first observed step that was not; :meth:`check` reads it: train.py observes
    the steps it saves at and every ``every``-th step (weights that went NaN or inf stay so, and the infinity norm
    costs 5 ms a step for the default network on 2 CPU cores), checks before every checkpoint, pipeline and final
    save, and :meth:`observe` itself checks every ``every`` steps. A run that went non-finite raises ``SystemExit``
    with one line naming that step and the last checkpoint whose weights are finite (:func:`nonfinite_stop_message`).
    """

    def __init__(self, output_dir: Path, every: int = FINITE_CHECK_STEPS):
        self.output_dir, self.every = Path(output_dir), every
        self._finite: torch.Tensor | None = None  # bool, on the device
        self._first_bad_step: torch.Tensor | None = None  # int64, on the device; -1 while all finite

    def observe(self, parameters: Iterable[torch.Tensor], ema: EMAModel | None, step: int) -> None:
        """Fold the finiteness of ``parameters`` and the EMA's weights after optimizer step ``step`` into the flag."""
        finite = all_finite([*parameters, *(ema.shadow_params if ema is not None else [])])
        if self._finite is None:
            self._finite = torch.ones((), dtype=torch.bool, device=finite.device)
            self._first_bad_step = torch.full((), -1, dtype=torch.int64, device=finite.device)
        self._first_bad_step = torch.where(self._finite & ~finite, step, self._first_bad_step)
        self._finite = self._finite & finite
        if step % self.every == 0:
            self.check(step)

    def check(self, step: int) -> None:
        """Raise ``SystemExit`` (one line) if the weights were NaN or inf after any step observed up to ``step``."""
        if self._finite is None or bool(self._finite):
            return
        first = int(self._first_bad_step)
        found = f" (found at step {step})" if step != first else ""
        raise SystemExit(
            nonfinite_stop_message(f"The weights became NaN or inf at step {first}{found}", self.output_dir)
        )

    def check_bound(self, bound: BoundResult, step: int) -> None:
        """Raise ``SystemExit`` (one line) when the held-out ``bound`` of the evaluation after step ``step`` is NaN
        or inf (weights whose outputs are not finite), naming the step and the last checkpoint whose weights are
        finite (:func:`nonfinite_stop_message`): a mid-run evaluation stops the run as the final one does."""
        figures = nonfinite_bound_figures(bound)
        if figures is not None:
            raise SystemExit(
                nonfinite_stop_message(f"The held-out bound became {figures} at step {step}", self.output_dir)
            )


def nonfinite_bound_figures(bound: BoundResult) -> str | None:
    """``nan bits/dim (2 of 16 images' bounds are NaN or inf)`` for a bound that is NaN or inf; None for a finite
    one."""
    bad, total = count_nonfinite([bound.per_image])
    if bad or not math.isfinite(bound.bits_per_dim):
        return f"{bound.bits_per_dim} bits/dim ({bad} of {total} images' bounds are NaN or inf)"
    return None


class SkippedUpdates:
    """Skips the optimizer updates whose gradients are NaN or inf, on the device, and stops a run that does nothing
    else.

    :meth:`before_step` (between gradient clipping and ``optimizer.step()``) hands the fused AdamW a ``found_inf``
    flag, as ``torch.amp.GradScaler`` does: where the gradients' norm is not finite, the kernel leaves the weights,
    the moments and the step count as they were. The counts (all skipped updates, and those in a row) stay on the
    device; :meth:`check` reads them where train.py reads its logs back and raises ``SystemExit`` (one line, naming
    the steps and the last checkpoint with finite weights) once ``limit`` updates in a row were skipped: the run has
    stopped learning. With a ``GradScaler`` (fp16), the scaler skips and this class only counts.
    """

    def __init__(self, output_dir: Path, device: torch.device, limit: int = MAX_SKIPPED_UPDATES_IN_A_ROW):
        self.output_dir, self.limit = Path(output_dir), limit
        self.total = torch.zeros((), dtype=torch.int64, device=device)
        self.in_a_row = torch.zeros((), dtype=torch.int64, device=device)

    def before_step(self, optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor, scaled: bool = False) -> None:
        """Count the update of ``grad_norm`` as skipped if it is NaN or inf, and (without a scaler: ``scaled`` False)
        tell ``optimizer`` (fused AdamW, or accelerate's wrapper of it) to skip it."""
        nonfinite = ~torch.isfinite(grad_norm.detach())
        self.total += nonfinite
        self.in_a_row = (self.in_a_row + 1) * nonfinite
        if not scaled:
            getattr(optimizer, "optimizer", optimizer).found_inf = nonfinite.float()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"total": self.total.clone(), "in_a_row": self.in_a_row.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.total, self.in_a_row = state["total"].clone(), state["in_a_row"].clone()

    def check(self, step: int) -> int:
        """The updates skipped so far (read back); raises ``SystemExit`` when the last ``limit`` or more were."""
        total, in_a_row = int(self.total), int(self.in_a_row)
        if in_a_row >= self.limit:
            what = (
                f"The gradients were NaN or inf at every step from {step - in_a_row + 1} to {step} ({in_a_row} "
                f"updates skipped in a row, {total} in all)"
            )
            raise SystemExit(nonfinite_stop_message(what, self.output_dir))
        return total


def require_finite_bound(bound: BoundResult, consequence: str) -> None:
    """Raise ``ValueError`` (one line) when the bound is NaN or inf, saying how many images' bounds are and what
    was therefore not done (``consequence``): a non-finite result is never reported or saved as one."""
    figures = nonfinite_bound_figures(bound)
    if figures is not None:
        raise ValueError(f"the bound is {figures}: the model's outputs are not finite; {consequence}.")


def check_output_dir(output_dir: Path, arguments: dict[str, Any], keys: Iterable[str], overwrite: bool) -> None:
    """Refuse an ``output_dir`` whose ``training_args.json`` differs from ``arguments`` in any of ``keys`` (another
    model) unless ``overwrite``: raises ``ValueError`` naming the differences."""
    saved = output_dir / "training_args.json"
    if overwrite or not saved.is_file():
        return
    changes = different_keys(json.loads(saved.read_text()), arguments, keys)
    if changes:
        raise ValueError(
            f"--output_dir {output_dir} holds a different model ({changes}). Choose a new --output_dir, or pass "
            "--overwrite_output_dir to replace it."
        )


def different_keys(previous: dict[str, Any], arguments: dict[str, Any], keys: Iterable[str]) -> str:
    """``"k: old -> new, ..."`` for the ``keys`` whose values differ ("" when none do). A key ``previous`` lacks (an
    argument added after it was saved) takes its default, so it does not count as a difference."""
    different = {k: (previous[k], arguments.get(k)) for k in keys if k in previous and previous[k] != arguments.get(k)}
    return ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in different.items())


def check_checkpoint_compatible(checkpoint: Path, arguments: dict[str, Any], keys: Iterable[str]) -> None:
    """Refuse to resume ``checkpoint`` when the arguments saved in it (``training_args.json``, see
    :func:`save_checkpoint`) differ from ``arguments`` in any of ``keys`` (the model and diffusion config): raises
    ``ValueError`` in one line naming the differing keys. A checkpoint without saved arguments is not checked."""
    saved = checkpoint / CHECKPOINT_ARGS
    if not saved.is_file():
        return
    changes = different_keys(json.loads(saved.read_text()), arguments, keys)
    if changes:
        raise ValueError(
            f"--resume_from_checkpoint {checkpoint} is of a different model ({changes}): resume with the arguments "
            "it was trained with, or start a new run without --resume_from_checkpoint."
        )


def clear_output_dir(output_dir: Path, logging_dir: str) -> list[str]:
    """Remove what a previous run wrote into ``output_dir`` (checkpoints, logs, the pipeline, card, samples,
    results): ``--overwrite_output_dir`` starts over, so ``latest`` cannot pick an old run's checkpoint and the
    rotation cannot count old checkpoints against the new run's. Other files are kept. Returns the names removed."""
    if not output_dir.is_dir():
        return []
    doomed = {p for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*")} | {output_dir / logging_dir}
    for pattern in RUN_OUTPUTS:
        doomed |= set(output_dir.glob(pattern))
    index = output_dir / "model_index.json"
    if index.is_file():  # the pipeline's component folders
        try:
            names = json.loads(index.read_text())
            doomed |= {output_dir / n for n in names if n.isidentifier() and not n.startswith("_")}
        except (json.JSONDecodeError, TypeError):
            pass
    removed = []
    for path in sorted(p for p in doomed if p.exists()):
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        removed.append(path.name)
    return removed


class TrainLog:
    """``train_log.jsonl``, one JSON line per optimizer step, appended and flushed as training goes, so a killed
    run keeps every step it logged. ``resume_step``: the step of the checkpoint a run resumes from; lines after it
    (steps that will be trained again) are dropped first, so the log has no duplicate steps. None: a new run, the
    log starts empty."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        kept = []
        if resume_step is not None and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill
                    continue
                if isinstance(entry, dict) and entry.get("step", 0) <= resume_step:
                    kept.append(line + "\n")
        self.path.write_text("".join(kept))
        self._file = self.path.open("a")

    def append(self, entry: dict[str, Any]) -> None:
        self._file.write(json.dumps(entry) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_train_log(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``train_log.jsonl`` (:class:`TrainLog`) in order: the whole run, a resumed run's earlier
    steps included; a line cut short by a kill is skipped. A missing file gives no rows."""
    rows = []
    if Path(path).is_file():
        for line in Path(path).read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict):
                rows.append(entry)
    return rows


def finished_run(resume_path: Path, output_dir: Path, max_train_steps: int | None) -> bool:
    """True when the checkpoint is at or past ``--max_train_steps`` and the outputs of that step were written:
    resuming it has nothing to do. (Past the steps but without outputs, the run writes them and trains no step.)"""
    if max_train_steps is None or checkpoint_step(resume_path) < max_train_steps:
        return False
    try:
        return json.loads((output_dir / "eval_results.json").read_text())["steps"] >= checkpoint_step(resume_path)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def prepare_output_dir(
    accelerator: Accelerator,
    output_dir: Path,
    arguments: dict[str, Any],
    keys: Iterable[str],
    overwrite: bool,
    logging_dir: str,
    resume: str | None,
) -> tuple[Path | None, list[str]]:
    """Make ``output_dir`` ready for a run and find the checkpoint to resume, before any work starts. On the main
    process: create it and take its run lock first (:func:`acquire_run_lock`), refuse a folder of another model
    (unless ``overwrite``, which removes the old run's outputs), remove half-written checkpoints. Then,
    everywhere: the checkpoint of ``resume`` (None for a new run), refused if it is of another model. Returns
    (checkpoint, what ``overwrite`` removed); raises ``ValueError``."""
    removed: list[str] = []
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        took_over = acquire_run_lock(output_dir)  # first: nothing below may touch another run's files
        if took_over:
            logger.warning(f"--output_dir {output_dir}: {took_over}.")
        check_output_dir(output_dir, arguments, keys, overwrite)
        if overwrite:
            removed = clear_output_dir(output_dir, logging_dir)
        remove_partial_checkpoints(output_dir)
    accelerator.wait_for_everyone()
    resume_path = resolve_resume_path(resume, output_dir)
    if resume_path is not None:
        check_checkpoint_compatible(resume_path, arguments, keys)
    return resume_path, removed


class ema_weights:
    """Context manager: the model holds the EMA weights inside, its own weights again after (no-op without EMA)."""

    def __init__(self, ema: EMAModel | None, model: torch.nn.Module):
        self.ema, self.model = ema, model

    def __enter__(self) -> torch.nn.Module:
        if self.ema is not None:
            self.ema.store(self.model.parameters())
            self.ema.copy_to(self.model.parameters())
        return self.model

    def __exit__(self, *exc: object) -> bool:
        if self.ema is not None:
            self.ema.restore(self.model.parameters())
        return False


# ---------------------------------------------------------------------------------------------- CUDA graphs
class _NetworkSample(torch.nn.Module):
    """``network(x, t).sample`` as a module of the network's parameters: what make_graphed_callables captures."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.network(x, t).sample


class CUDAGraphedNetwork(torch.nn.Module):
    """A denoising network's forward and backward replayed as two CUDA graphs (``torch.cuda.make_graphed_callables``)
    at one static batch shape: one launch each instead of hundreds of kernels, which at MNIST size is what a GPU
    step otherwise waits for. Called as the network is, ``graphed(x, t).sample``, with x of the captured shape; the
    parameters are the network's own (the graphs read them where they are, so optimizer steps, EMA swaps and
    checkpoint loads, all in place, are seen). Evaluate and sample with the network itself. Captured in the network's
    current autocast setting, which must not cache casts (``AutocastKwargs(cache_enabled=False)``)."""

    def __init__(self, network: torch.nn.Module, sample_x: torch.Tensor, sample_t: torch.Tensor):
        super().__init__()
        self.network = network
        self.graphed = torch.cuda.make_graphed_callables(_NetworkSample(network), (sample_x, sample_t))
        network.zero_grad(set_to_none=True)  # the capture's warm-up backward passes left gradients

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> DenoisingUNetOutput:
        return DenoisingUNetOutput(sample=self.graphed(x, t))


def cuda_graph_refusal(device: torch.device, num_processes: int, gradient_accumulation_steps: int, model: str) -> str:
    """Why the training step cannot be replayed as CUDA graphs here, in words, or "" where it can: a CUDA device,
    one process (DDP's gradient hooks are not captured), no gradient accumulation, a DDPM network (the VAE and the
    VDM train through other forwards)."""
    if device.type != "cuda":
        return f"the device is {device.type}, not CUDA"
    if num_processes > 1:
        return f"{num_processes} processes (DDP)"
    if gradient_accumulation_steps > 1:
        return "gradient accumulation"
    if model != "ddpm":
        return f"--model {model}"
    return ""


def training_forward(
    model: torch.nn.Module, train_args: Any, model_kind: str, accelerator: Accelerator, batch_shape: tuple[int, ...]
) -> tuple[torch.nn.Module, str]:
    """(what the training step calls for the network's forward and backward: the prepared ``model`` itself,
    ``torch.compile(model)`` with ``--compile``, or its :class:`CUDAGraphedNetwork` at ``batch_shape`` with
    ``--cuda_graphs`` where :func:`cuda_graph_refusal` allows; that choice in words, for the log). All share the
    model's parameters."""
    if train_args.compile:
        return torch.compile(model), "torch.compile"
    if not train_args.cuda_graphs:
        return model, "eager"
    device = accelerator.device
    refusal = cuda_graph_refusal(device, accelerator.num_processes, train_args.gradient_accumulation_steps, model_kind)
    if refusal:
        return model, f"eager (no CUDA graphs with {refusal})"
    sample_t = torch.zeros(batch_shape[0], dtype=torch.long, device=device)
    return CUDAGraphedNetwork(model, torch.zeros(batch_shape, device=device), sample_t), "CUDA graphs"


# ---------------------------------------------------------------------------------------------- outputs
def image_grid(images: list[PIL.Image.Image]) -> PIL.Image.Image:
    """The images in the squarest grid whose rows are all full."""
    rows = int(math.sqrt(len(images)))
    while len(images) % rows:
        rows -= 1
    return make_image_grid(images, rows=rows, cols=len(images) // rows)


def sample_grid(pipeline: DiffusionPipeline, num_images: int, seed: int, **call: Any) -> PIL.Image.Image:
    """A grid of ``num_images`` samples of ``pipeline`` drawn with a CPU generator seeded with ``seed``; ``call``
    goes to the pipeline's ``__call__`` (e.g. ``num_inference_steps``)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(batch_size=num_images, generator=generator, output_type="pil", **call).images
    return image_grid(images)


# ---------------------------------------------------------------------------------------------- the machine
class StartupTimes:
    """Where a run's start-up goes: the seconds from the process's start (as the OS recorded it) to the first
    :meth:`mark` (Python and the imports), then between marks, in the order marked. ``now`` is the clock
    (``time.time``, which the OS's start time is on)."""

    def __init__(self, process_start: float, now: Callable[[], float], launcher_start: float | None = None) -> None:
        self.now = now
        self.points = [("", process_start)]
        if launcher_start is not None:  # the launcher's own start-up before it started this process
            self.points = [("", launcher_start), ("accelerate launch", process_start)]

    @classmethod
    def of_this_process(cls) -> StartupTimes:
        """From this process's start (``psutil.Process().create_time()``; psutil comes with accelerate), or from its
        parent's where that is ``accelerate launch`` (or ``python -m accelerate.commands.launch``)."""
        import psutil

        process = psutil.Process()
        parent, launcher_start = process.parent(), None
        try:
            command = parent.cmdline() if parent is not None else []
            if "accelerate" in " ".join(command) and any(a.split(".")[-1] == "launch" for a in command):
                launcher_start = parent.create_time()
        except psutil.Error:  # a parent that has gone, or that we may not read
            pass
        return cls(process.create_time(), time.time, launcher_start)

    def mark(self, what: str) -> None:
        """``what`` has just finished."""
        self.points.append((what, self.now()))

    def describe(self) -> str:
        """'Start-up 9.1 s: Python and imports 6.0 s, data 1.1 s, ...' (each part's seconds since the one before)."""
        parts = [f"{what} {end - begin:.1f} s" for (_, begin), (what, end) in itertools.pairwise(self.points)]
        return f"Start-up {self.points[-1][1] - self.points[0][1]:.1f} s: {', '.join(parts)}."


def has_accelerator_device() -> bool:
    """True when torch sees a GPU-like device (CUDA/ROCm, XPU or Apple MPS) to train on."""
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or bool(xpu and xpu.is_available()) or torch.backends.mps.is_available()


def resolve_mixed_precision(requested: str) -> str:
    """'auto' -> bf16 or fp16 if ``accelerate launch`` was configured with it, else bf16 where the hardware computes
    it natively (CUDA with bf16, CPUs with AVX512-BF16 or AMX), else 'no'. ``accelerate launch`` reports 'no' when
    nothing was configured, so only an explicit ``--mixed_precision no`` forces full precision."""
    if requested != "auto":
        return requested
    from_launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if from_launcher != "no":
        return from_launcher
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if cpu_has_native_bf16() else "no"


def hardware_description(accelerator: Accelerator) -> str:
    """E.g. '1 x cpu (2 cores)' or '8 x NVIDIA A100-SXM4-80GB'."""
    device = accelerator.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device.type} ({os.cpu_count()} cores)"
    return f"{accelerator.num_processes} x {name}"


def log_sample_grid(accelerator: Accelerator, grid: PIL.Image.Image, step: int) -> None:
    """Send a sample grid to every tracker of ``accelerator`` that logs images, through accelerate's own
    ``log_images`` (TensorBoard takes an (N, H, W, C) array, the others a list of images); accelerate's trackio
    tracker has no ``log_images``, so the grid goes to it as a ``trackio.Image`` through its ``log``."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"samples": np.asarray(grid.convert("RGB"))[None]}, step=step, dataformats="NHWC")
        elif tracker.name == "trackio" and not hasattr(tracker, "log_images"):
            import trackio

            tracker.log({"samples": trackio.Image(grid)}, step=step)
        elif hasattr(tracker, "log_images"):
            tracker.log_images({"samples": [grid]}, step=step)


def _launcher_chose_one_thread() -> bool:
    """True when ``OMP_NUM_THREADS=1`` in this process is ``accelerate launch``'s default rather than the user's
    choice: the nearest ancestor that is ``accelerate launch`` (read from /proc on Linux) had no ``OMP_NUM_THREADS``
    of its own and was not given ``--num_cpu_threads_per_process``."""
    if os.environ.get("OMP_NUM_THREADS") != "1":
        return False
    pid = os.getppid()
    for _ in range(8):  # accelerate launch -> (torchrun ->) this process
        try:
            proc = Path("/proc") / str(pid)
            command = proc.joinpath("cmdline").read_bytes().split(b"\0")
            environment = proc.joinpath("environ").read_bytes().split(b"\0")
            parent = int(proc.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
        text = b" ".join(command)
        if b"accelerate" in text and b"launch" in text:
            user_set = any(entry.startswith(b"OMP_NUM_THREADS=") for entry in environment)
            return not user_set and b"--num_cpu_threads_per_process" not in text
        if pid <= 1:
            return False
        pid = parent
    return False


def flush_denormals() -> bool:
    """Treat subnormal floats (|x| < 1.2e-38 in float32) as zero in this process's CPU arithmetic, as GPUs do by
    default in mixed precision. Without it, the optimizer's and the EMA's updates of near-zero values (zero-initialised
    residual branches, vanishing moments) fall onto the CPU's slow subnormal path: an AdamW step of the default
    network measured 8x slower. Returns whether the CPU supports it (x86 with SSE3); a no-op elsewhere."""
    return torch.set_flush_denormal(True)


def use_all_cores() -> int:
    """On a CPU-only machine, give torch all cores (``os.cpu_count()`` divided by the processes on this machine,
    ``LOCAL_WORLD_SIZE``, threads per process)
    when ``accelerate launch`` narrowed it to one thread by default (it does so whenever it was not told the run is a
    CPU run); a thread count the user set (``OMP_NUM_THREADS``, ``--num_cpu_threads_per_process``) is kept. Returns
    the threads per process now in use."""
    if not has_accelerator_device() and _launcher_chose_one_thread():
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        threads = max(1, (os.cpu_count() or 1) // max(1, local_processes))
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)
    return torch.get_num_threads()
