"""Training for a budget of wall-clock minutes: the optimizer steps that fit, from a calibration of the run's own step.

``--train_minutes M`` (the CPU recipe's default, 15) makes train.py measure its own training step on this machine,
in its own process, before training: it runs a few steps on the run's real model, optimizer, EMA and objective, times
them, and then puts every piece of state back (weights, optimizer and EMA state, the objective's history, the random
number generators), so the run that follows is exactly the run ``--max_train_steps N`` gives for the ``N`` chosen.
The learning-rate schedule is laid out over those ``N`` steps. Under ``--lr_scheduler warmup_stable_decay`` (warm-up,
a constant rate, then a decay over the last ``--lr_decay_fraction`` of the steps, 40% by default) N is decided late:
the loop re-times its own steps and re-estimates N until the decay would start (:class:`LateDecidedSteps`), so a
machine whose speed changes after the calibration (other work on its cores, its clock) still trains for the budget's
minutes, and the run is still exactly the one ``--max_train_steps N`` gives for the N it logs. Under a schedule that
decays from the start (cosine), N is fixed by the calibration. The EMA's warm-up depends on the step only.
The budget counts from the start of the calibration to the end of the last optimizer step: the calibration itself,
the compilation (``--compile``), the mid-run evaluations and the checkpoints are inside it; loading data before and
writing the outputs after (the held-out bound, samples, plots, card) are not.

With ``--compile`` unset, the budget also decides whether to ``torch.compile`` the training step
(:func:`compile_pays`): where the compiled step is known to be faster (:func:`compile_refusal` names where it is
not: everywhere but one CPU process, float32, AVX-512 kernels), the eager step is timed, and the run compiles when
the steps that the speed-up wins back outweigh the compilation's minute or more. A compilation that fails (no C++
compiler, say) leaves the run eager, with the reason in the log.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

#: The share of the budget the calibration's timed steps take (at least CALIBRATION_MIN_STEPS of them).
CALIBRATION_SHARE = 0.015
CALIBRATION_WARMUP_STEPS = 3  # untimed: lazily created optimizer state, compilation, allocator warm-up
CALIBRATION_MIN_STEPS = 5
CALIBRATION_MAX_STEPS = 200
#: The share of the budget left unplanned for what the calibration does not see (log read-backs, checkpoints).
BUDGET_MARGIN = 0.01
#: torch.compile of the default DDPM's CPU training step in float32 with AVX-512 kernels (2-core Zen 4, 2026-12-05,
#: ``benchmarks/throughput.py --cpu_compile``): 1.19x the eager step, its first 3 steps 82 s (285 eager steps). In
#: bf16 it was no faster (0.99x); with AVX2 kernels (``benchmarks/quality_per_minute.py --emulate_avx2``) train.py's
#: compiled step took 0.2978 s against 0.3004 s eager (1.01x) after 100 s of compiling: 8% fewer steps in 15 minutes.
COMPILE_SPEEDUP = 1.19
COMPILE_SECONDS_MIN = 60.0
COMPILE_SECONDS_IN_EAGER_STEPS = 300


class Stateful(Protocol):
    """What a calibration puts back after it: anything with ``state_dict`` and ``load_state_dict``."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class StepBudget:
    """The optimizer steps a run of ``minutes`` gets on this machine, and the measurements they come from."""

    minutes: float
    seconds_per_step: float  # measured over calibration_steps steps, after CALIBRATION_WARMUP_STEPS untimed ones
    calibration_steps: int
    seconds_per_evaluation: float  # one mid-run evaluation (held-out bound and, with a tracker, a sample grid)
    seconds_spent: float  # of the budget, before the first step: the calibration, compilation included
    steps: int
    compiled: bool = False  # the steps are torch.compile'd (--compile unset and compile_pays, or --compile)
    compile_decision: str = ""  # with --compile unset: what was decided, and why

    def describe(self) -> str:
        """One line for the log: the budget, what was measured, the steps chosen and how to get the same run."""
        evaluation = (
            f", {self.seconds_per_evaluation:.1f} s per mid-run evaluation" if self.seconds_per_evaluation else ""
        )
        decision = f" {self.compile_decision};" if self.compile_decision else ""
        same_run = f"--max_train_steps {self.steps}" + (" --compile true" if self.compiled else "")
        return (
            f"--train_minutes {self.minutes:g}:{decision} {self.seconds_per_step:.4f} s per step measured over "
            f"{self.calibration_steps} steps{evaluation}, {self.seconds_spent:.1f} s spent calibrating -> "
            f"{self.steps:,} steps (the same run: {same_run})"
        )

    def outcome(self, train_seconds: float, steps: int | None = None, decided_late: bool = False) -> str:
        """One line for the log once ``steps`` (the budget's unless given) are trained in ``train_seconds`` (the
        budget's clock): the minutes they took against the budget's, and where they ran over by more than
        BUDGET_MARGIN, why: with ``decided_late`` (a :class:`LateDecidedSteps` decided them from the loop's pace) the
        loop slowed after the decision; otherwise by how much the loop's step was slower than the one timed (the
        machine's speed changed after the calibration: other work on its cores, or its clock)."""
        budget_seconds = 60 * self.minutes
        steps = self.steps if steps is None else steps
        line = (
            f"--train_minutes {self.minutes:g}: {steps:,} steps trained in {train_seconds / 60:.1f} minutes "
            f"({train_seconds / budget_seconds:.0%} of the budget)"
        )
        if train_seconds <= (1 + BUDGET_MARGIN) * budget_seconds:
            return line
        if decided_late:  # from the loop's own pace: it slowed after that, within the decay
            return f"{line}: the loop slowed after its steps were decided (within the learning rate's decay)"
        planned = seconds_for_steps(budget_seconds, self.seconds_spent)  # what steps_within_budget filled
        if planned <= 0:  # the one step a run always trains
            return f"{line}: its calibration alone took {self.seconds_spent:.1f} s of the {budget_seconds:g} s"
        slower = (train_seconds - self.seconds_spent) / planned
        return (
            f"{line}: the loop ran {slower:.2f}x as long as the {self.seconds_per_step:.4f} s step timed predicted "
            "(the machine slowed after its calibration: other work on its cores, or its clock)"
        )


#: The learning-rate schedule whose length a budget may decide late (``--lr_scheduler warmup_stable_decay``).
WARMUP_STABLE_DECAY = "warmup_stable_decay"


def decay_start_step(total_steps: int, decay_fraction: float) -> int:
    """The step S at which a warm-up/stable/decay schedule of ``total_steps`` N starts its decay:

        S = N - ceil(decay_fraction * N),

    non-decreasing in N by 0 or 1 per step, so that every S >= 0 is the decay start of some N."""
    return total_steps - math.ceil(decay_fraction * total_steps)


def warmup_stable_decay_factor(step: float, warmup_steps: int, total_steps: int, decay_fraction: float) -> float:
    """The learning rate's factor at optimizer step ``step`` of a warm-up/stable/decay schedule (Hägele et al. 2024,
    "Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations", its 1 - sqrt cool-down):

        f(s) = min(1, s / W) * (1 if s < S else 1 - sqrt((s - S) / (N - S))),   S = decay_start_step(N, D),

    with W = ``warmup_steps``, N = ``total_steps`` and D = ``decay_fraction``; f is 0 from N on. Before S the factor
    does not depend on N: a run may choose N as late as its decay start (:class:`LateDecidedSteps`)."""
    warmup = min(1.0, step / warmup_steps) if warmup_steps > 0 else 1.0
    start = decay_start_step(total_steps, decay_fraction)
    if step < start:
        return warmup
    return warmup * (1.0 - math.sqrt(min(1.0, (step - start) / (total_steps - start))))


def compile_pays(
    budget_seconds: float,
    eager_seconds_per_step: float,
    speedup: float = COMPILE_SPEEDUP,
    compile_seconds_min: float = COMPILE_SECONDS_MIN,
    compile_eager_steps: int = COMPILE_SECONDS_IN_EAGER_STEPS,
) -> bool:
    """Whether compiling the training step trains more steps within ``budget_seconds`` than staying eager:

        (B - c) * speedup / s > B / s,   c = max(compile_seconds_min, compile_eager_steps * s),

    with ``s`` the eager step's seconds and ``c`` the compilation's estimated seconds; that is, B > c * speedup /
    (speedup - 1): about 6.3 compilations, 9 minutes for the default DDPM on a 2-core Zen 4 in float32."""
    compile_seconds = max(compile_seconds_min, compile_eager_steps * eager_seconds_per_step)
    return (budget_seconds - compile_seconds) * speedup > budget_seconds


def compile_refusal(
    device_type: str,
    mixed_precision: str,
    model_kind: str,
    num_processes: int,
    budgeted: bool = True,
    cpu_capability: str | None = None,
) -> str:
    """Why a run with ``--compile`` unset stays eager, or "" where its budget in minutes decides
    (:func:`compile_pays`): one CPU process training the DDPM in float32 with AVX-512 kernels, the only step measured
    faster compiled. ``cpu_capability``: ``torch.backends.cpu.get_cpu_capability()`` unless given."""
    if not budgeted:
        return "no --train_minutes budget to pay for compiling"
    if device_type != "cpu":
        return f"on {device_type}"
    if mixed_precision != "no":
        return f"{mixed_precision} autocast, where the compiled step measured no faster"
    capability = cpu_capability or torch.backends.cpu.get_cpu_capability()
    if capability != "AVX512":
        return f"{capability} kernels, where the compiled step measured no faster"
    if model_kind != "ddpm":
        return f"--model {model_kind}, not measured compiled"
    if num_processes > 1:
        return f"{num_processes} processes, not measured compiled"
    return ""


def seconds_for_steps(budget_seconds: float, seconds_spent: float, margin: float = BUDGET_MARGIN) -> float:
    """The seconds of a budget left for its optimizer steps and mid-run evaluations:

        (1 - margin) * budget_seconds - seconds_spent,

    ``seconds_spent`` being what the budget's clock counted before the first step (the calibration)."""
    return (1 - margin) * budget_seconds - seconds_spent


def steps_within_budget(
    budget_seconds: float,
    seconds_spent: float,
    seconds_per_step: float,
    seconds_per_evaluation: float = 0.0,
    eval_steps: int | None = None,
    margin: float = BUDGET_MARGIN,
    steps_done: int = 0,
) -> int:
    """The most optimizer steps ``N`` (at least ``steps_done`` + 1) with

        seconds_spent + (N - d) * seconds_per_step
            + (floor((N - 1) / eval_steps) - floor(d / eval_steps)) * seconds_per_evaluation
            <= (1 - margin) * budget_seconds,

    ``d`` = ``steps_done`` being the steps trained when ``seconds_spent`` were counted, and the evaluations the
    mid-run ones still to come (every ``eval_steps`` steps after ``d``, none at the last step)."""
    if seconds_per_step <= 0 or not math.isfinite(seconds_per_step):
        raise ValueError(f"seconds_per_step must be a finite number > 0, got {seconds_per_step}")
    left = seconds_for_steps(budget_seconds, seconds_spent, margin)
    evaluation = seconds_per_evaluation if eval_steps and seconds_per_evaluation > 0 else 0.0

    def cost(n: int) -> float:  # of the n steps after steps_done
        evaluations = (steps_done + n - 1) // eval_steps - steps_done // eval_steps if evaluation else 0
        return n * seconds_per_step + evaluations * evaluation

    low, high = 1, max(1, int(left // seconds_per_step))  # cost(high) <= left without evaluations
    while low < high:  # the largest n in [low, high] with cost(n) <= left (cost grows with n), else 1
        middle = (low + high + 1) // 2
        low, high = (middle, high) if cost(middle) <= left else (low, middle - 1)
    return steps_done + low


def time_steps_and_restore(
    step: Callable[[int], None],
    state: Sequence[Stateful],
    calibration_seconds: float,
    *,
    agree: Callable[[float], float] = lambda seconds: seconds,
    synchronize: Callable[[], None] = lambda: None,
    rng_devices: Sequence[torch.device] = (),
) -> tuple[float, int]:
    """(seconds per call of ``step(i)``, the number of calls timed): CALIBRATION_WARMUP_STEPS untimed calls,
    CALIBRATION_MIN_STEPS timed ones, then as many more as fill about ``calibration_seconds`` (between
    CALIBRATION_MIN_STEPS and CALIBRATION_MAX_STEPS), timed again. Every object of ``state`` (and the random number
    generators of the CPU and of ``rng_devices``) is put back as it was before the first call.

    ``agree`` makes the processes of one run take the same decisions: it receives this process's estimate of the
    seconds per step and returns the value all processes use (e.g. the maximum over them), so that all run the same
    number of steps (each step may hold a collective operation). ``synchronize`` waits for the device's queued work
    (``torch.cuda.synchronize`` on a GPU)."""
    saved = [copy.deepcopy(s.state_dict()) for s in state]
    with torch.random.fork_rng(devices=list(rng_devices)), restored(state, saved):
        calls = 0

        def run(count: int) -> float:
            nonlocal calls
            synchronize()
            start = time.perf_counter()
            for _ in range(count):
                step(calls)
                calls += 1
            synchronize()
            return time.perf_counter() - start

        run(CALIBRATION_WARMUP_STEPS)
        first = agree(run(CALIBRATION_MIN_STEPS) / CALIBRATION_MIN_STEPS)
        count = int(min(CALIBRATION_MAX_STEPS, max(CALIBRATION_MIN_STEPS, calibration_seconds // first)))
        seconds_per_step = agree(run(count) / count)
    return seconds_per_step, count


@contextlib.contextmanager
def restored(state: Sequence[Stateful], saved: Sequence[dict[str, Any]]) -> Iterator[None]:
    """Puts every object of ``state`` back to its ``saved`` state dict when the block ends, raising or not."""
    try:
        yield
    finally:
        for s, values in zip(state, saved):
            s.load_state_dict(values)


def timed(work: Callable[[], Any], synchronize: Callable[[], None] = lambda: None) -> float:
    """Wall-clock seconds of one call of ``work`` (its queued device work included)."""
    synchronize()
    start = time.perf_counter()
    work()
    synchronize()
    return time.perf_counter() - start


def measure_step_budget(
    minutes: float,
    step: Callable[[int], None],
    state: Sequence[Stateful],
    started: float,
    *,
    evaluation: Callable[[], Any] | None = None,
    eval_steps: int | None = None,
    agree: Callable[[float], float] = lambda seconds: seconds,
    synchronize: Callable[[], None] = lambda: None,
    rng_devices: Sequence[torch.device] = (),
    use_compiled: Callable[[bool], None] | None = None,
) -> StepBudget:
    """The :class:`StepBudget` of a run of ``minutes`` whose clock started at ``started`` (``time.time()``): its
    optimizer step ``step`` timed on the run's own ``state`` and put back (:func:`time_steps_and_restore`), one
    mid-run ``evaluation`` timed where the budget holds one (every ``eval_steps`` steps), and the steps that fit
    (:func:`steps_within_budget`). ``agree``, ``synchronize`` and ``rng_devices`` as in
    :func:`time_steps_and_restore`; every process of a run gets the same steps.

    ``use_compiled(True)`` (given where ``--compile`` is unset and :func:`compile_refusal` has no objection) makes
    ``step`` run the compiled network, ``use_compiled(False)`` the eager one: where the budget can pay for a
    compilation, the eager step is timed first and the run compiles if :func:`compile_pays`; if the compiled step
    raises, the run goes back to eager and the decision says why."""
    budget_seconds = 60 * minutes
    timing = {"agree": agree, "synchronize": synchronize, "rng_devices": rng_devices}
    compiled, decision = False, ""
    if use_compiled is not None:
        compiled, decision = decide_compile(step, state, budget_seconds, use_compiled, timing)
    seconds_per_step, count = time_steps_and_restore(step, state, CALIBRATION_SHARE * budget_seconds, **timing)
    seconds_per_evaluation = 0.0
    if evaluation is not None and eval_steps is not None:
        without = steps_within_budget(budget_seconds, agree(time.time() - started), seconds_per_step)
        if eval_steps < without:
            seconds_per_evaluation = agree(timed(evaluation, synchronize))
    spent = agree(time.time() - started)
    steps = steps_within_budget(budget_seconds, spent, seconds_per_step, seconds_per_evaluation, eval_steps)
    return StepBudget(minutes, seconds_per_step, count, seconds_per_evaluation, spent, steps, compiled, decision)


def decide_compile(
    step: Callable[[int], None],
    state: Sequence[Stateful],
    budget_seconds: float,
    use_compiled: Callable[[bool], None],
    timing: dict[str, Any],
) -> tuple[bool, str]:
    """(whether the run compiles, the decision in words) for :func:`measure_step_budget`: the eager step timed
    (a few steps, put back) where the budget can pay for a compilation at all, then :func:`compile_pays`; the
    compiled step tried (compilation included, put back) and abandoned for eager if it raises."""
    if not compile_pays(budget_seconds, 0.0):
        return False, f"torch.compile off (--compile unset: {budget_seconds / 60:g} minutes cannot pay for compiling)"
    eager, _ = time_steps_and_restore(step, state, 0.0, **timing)
    if not compile_pays(budget_seconds, eager):
        return False, f"torch.compile off (--compile unset: at {eager:.4f} s per eager step, compiling does not pay)"
    use_compiled(True)
    try:
        time_steps_and_restore(step, state, 0.0, **timing)  # compiles within the budget's clock, as it must
    except Exception as error:  # any backend failure (no C++ compiler, an unsupported op): the eager step stays
        use_compiled(False)
        first_line = (str(error).strip().splitlines() or [""])[0][:200]
        return False, f"torch.compile failed, eager ({type(error).__name__}: {first_line})"
    return True, f"torch.compile on (--compile unset: at {eager:.4f} s per eager step, compiling pays)"


def budgeted_run(checkpoint: Path, compile_requested: bool | None = None) -> tuple[int, bool | None]:
    """(the optimizer steps, whether it compiled) of the budgeted run that saved ``checkpoint`` (its
    ``training_args.json``), so that a resumed run keeps the learning-rate schedule it started with and, with
    ``--compile`` unset (``compile_requested`` None), the training step it chose; an explicit ``--compile`` wins."""
    arguments = json.loads((checkpoint / "training_args.json").read_text())
    steps = arguments.get("max_train_steps")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(
            f"{checkpoint / 'training_args.json'} does not record the steps its run chose (max_train_steps): resume "
            "with the --max_train_steps the run logged."
        )
    return steps, arguments.get("compile") if compile_requested is None else compile_requested


#: A --train_minutes run under warmup_stable_decay re-estimates its steps every REPLAN_STEPS optimizer steps from
#: its loop's pace over the last PACE_WINDOW_SHARE of the budget's seconds (the mid-run evaluations timed apart):
#: long enough that a pause of a few seconds does not decide the run, short enough to follow a lasting change.
REPLAN_STEPS = 25
PACE_WINDOW_SHARE = 0.1
#: The steps still to come are planned at the window's pace taken PACE_SLACK slower: once decided they run through
#: the decay with no re-estimate, and a 2-core host's step drifted by up to 10% over minutes (2026-12-07, Zen 4, the
#: README's command on AVX2 kernels: 0.18 s a step at the decision, 0.19-0.22 s within the decay, 102% of the budget
#: with no slack; the same loop's step time measured in 200-step spans, nothing else running: 0.19-0.23 s, no trend).
PACE_SLACK = 0.05


def fewest_steps_decaying_after(step: int, decay_fraction: float) -> int:
    """The fewest total steps N whose warm-up/stable/decay schedule is still stable at ``step``:

    min {N : decay_start_step(N, D) > step},   D = decay_fraction < 1."""
    if not 0 < decay_fraction < 1:
        raise ValueError(f"decay_fraction must be in (0, 1) for the decay to start after step {step}")
    steps = max(step + 1, math.floor((step + 1) / (1 - decay_fraction)) - 2)  # decay_start_step(N) <= N (1 - D)
    while decay_start_step(steps, decay_fraction) <= step:
        steps += 1
    return steps


class LateDecidedSteps:
    """The optimizer steps of a ``--train_minutes`` run under ``warmup_stable_decay``, decided as late as the
    schedule allows: the calibration's :class:`StepBudget` first, then re-estimated every REPLAN_STEPS steps from the
    loop's own pace (over the last PACE_WINDOW_SHARE of the budget, mid-run evaluations timed apart, PACE_SLACK
    slower for the steps to come) until the decay would start before the next re-estimate, and fixed from there.
    Every learning rate used before that is the stable phase's, which does not depend on N
    (:func:`warmup_stable_decay_factor`), so the run is exactly the one ``--max_train_steps N`` gives for the N
    decided. A machine that slows down or speeds up after the calibration changes N instead of the run's minutes;
    only a change within the decay (its last ``decay_fraction`` of the steps) by more than PACE_SLACK still does.
    ``agree`` as in :func:`time_steps_and_restore`: every process decides the same steps."""

    def __init__(
        self,
        budget: StepBudget,
        decay_fraction: float,
        started: float,
        eval_steps: int | None = None,
        agree: Callable[[float], float] = lambda seconds: seconds,
    ) -> None:
        self.budget, self.decay_fraction, self.started = budget, decay_fraction, started
        self.eval_steps, self.agree = eval_steps, agree
        self.steps = budget.steps
        stable = decay_fraction < 1 and decay_start_step(budget.steps, decay_fraction) > REPLAN_STEPS
        self.decided_at: int | None = None if stable else 0  # the step at which self.steps was fixed
        self.marks: collections.deque[tuple[int, float]] = collections.deque()  # (step, clock without evaluations)
        self.evaluations: list[float] = []  # seconds of each mid-run evaluation

    def start(self, now: float) -> None:
        """The loop's first step starts at ``now`` (``time.time()``)."""
        self.marks.append((0, now))

    def evaluated(self, seconds: float) -> None:
        """A mid-run evaluation took ``seconds``: kept out of the step's pace, and its cost of those to come. Every
        process passes the same seconds (the main one evaluates, the others wait for it), ``agree``'d."""
        self.evaluations.append(seconds)

    def observe(self, step: int, now: float) -> int:
        """The run's steps after its optimizer step ``step`` ended at ``now`` (``time.time()``): every REPLAN_STEPS
        steps until decided, the most that fit in the budget's seconds left at the loop's pace (as
        :func:`steps_within_budget` with ``steps_done=step``); decided once their decay would start before the next
        re-estimate, at no fewer than :func:`fewest_steps_decaying_after` ``step``."""
        if self.decided_at is not None or step % REPLAN_STEPS or not self.marks:
            return self.steps
        clock = now - sum(self.evaluations)
        window = PACE_WINDOW_SHARE * 60 * self.budget.minutes
        while len(self.marks) > 1 and self.marks[1][1] <= clock - window:  # the last mark at or before the window
            self.marks.popleft()
        first_step, first_clock = self.marks[0]
        self.marks.append((step, clock))
        pace = self.agree((clock - first_clock) / (step - first_step)) * (1 + PACE_SLACK)
        evaluation = sum(self.evaluations) / len(self.evaluations) if self.evaluations else None
        estimate = steps_within_budget(
            60 * self.budget.minutes,
            self.agree(now - self.started),
            pace,
            self.budget.seconds_per_evaluation if evaluation is None else evaluation,  # both agreed already
            self.eval_steps,
            steps_done=step,
        )
        if decay_start_step(estimate, self.decay_fraction) > step + REPLAN_STEPS:
            self.steps = estimate
        else:
            self.steps = max(estimate, fewest_steps_decaying_after(step, self.decay_fraction))
            self.decided_at = step
        return self.steps

    def describe(self) -> str:
        """One line for the log once decided: the steps, and against the calibration's."""
        return (
            f"--train_minutes {self.budget.minutes:g}: {self.steps:,} steps decided at step {self.decided_at:,} from "
            f"the loop's pace, where the learning rate's decay starts (the calibration planned "
            f"{self.budget.steps:,}; the same run: --max_train_steps {self.steps})"
        )


def warmup_stable_decay_schedule(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    total_steps: Callable[[], int],
    decay_fraction: float,
    calls_per_step: int = 1,
) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate scheduler of :func:`warmup_stable_decay_factor`, its N read from ``total_steps()`` at every
    call (a :class:`LateDecidedSteps` may change it until the decay starts). ``calls_per_step``: the scheduler's
    calls per optimizer step (accelerate steps a prepared scheduler once per process)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda call: warmup_stable_decay_factor(call / calls_per_step, warmup_steps, total_steps(), decay_fraction),
    )
