"""Training for a budget of minutes (hf_ddpm.training_budget): the steps that fit, a calibration that leaves no trace,
and train.py's budgeted run equal bitwise to the ``--max_train_steps`` run it logs, resumed with its own steps."""

from __future__ import annotations

import json
import logging
import re
import subprocess

import pytest
import torch
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file

from helpers import TINY_TRAIN
from hf_ddpm import training_args
from hf_ddpm.training_budget import (
    CALIBRATION_MIN_STEPS,
    CALIBRATION_WARMUP_STEPS,
    PACE_SLACK,
    REPLAN_STEPS,
    LateDecidedSteps,
    StepBudget,
    budgeted_run,
    compile_pays,
    compile_refusal,
    decay_start_step,
    fewest_steps_decaying_after,
    measure_step_budget,
    steps_within_budget,
    time_steps_and_restore,
    warmup_stable_decay_factor,
    warmup_stable_decay_schedule,
)


def brute_force_steps(budget, spent, per_step, per_evaluation, eval_steps, margin, done=0):
    """The largest N whose time from step ``done`` on (N - done steps, an evaluation after every eval_steps-th step
    but the last) fits."""
    best = done + 1
    for n in range(done + 1, done + 10_000):
        evaluations = sum(1 for k in range(done + 1, n) if eval_steps and k % eval_steps == 0)
        if spent + (n - done) * per_step + evaluations * per_evaluation <= (1 - margin) * budget:
            best = n
    return best


import train  # noqa: E402  (importable once helpers put training/ on sys.path)


@pytest.mark.parametrize(
    "budget, spent, per_step, per_evaluation, eval_steps",
    [
        (900, 20, 0.21, 0, None),
        (900, 20, 0.21, 8.5, 1000),
        (900, 20, 0.21, 8.5, 100),
        (60, 3, 0.05, 2.0, 7),
        (60, 3, 0.05, 0.0, 7),
        (10, 9.95, 0.2, 1.0, 3),  # nothing fits: still one step
        (100, 1, 1.0, 1.0, 1),  # an evaluation after every step but the last
    ],
)
def test_the_steps_within_a_budget_are_the_most_that_fit(budget, spent, per_step, per_evaluation, eval_steps):
    steps = steps_within_budget(budget, spent, per_step, per_evaluation, eval_steps, margin=0.01)
    assert steps == brute_force_steps(budget, spent, per_step, per_evaluation, eval_steps, 0.01)


@pytest.mark.parametrize("done", [1, 99, 100, 101, 250])
def test_the_steps_within_a_budget_count_from_the_steps_already_trained(done):
    for per_evaluation, eval_steps in [(0.0, None), (3.0, 100), (0.7, 7)]:
        steps = steps_within_budget(300, 120, 0.21, per_evaluation, eval_steps, margin=0.01, steps_done=done)
        assert steps == brute_force_steps(300, 120, 0.21, per_evaluation, eval_steps, 0.01, done)


def test_the_warmup_stable_decay_factor_is_its_closed_form():
    # N = 100, D = 0.2: the decay starts at S = 80; W = 10 warm-up steps
    values = {s: warmup_stable_decay_factor(s, 10, 100, 0.2) for s in (0, 5, 10, 50, 79, 80, 85, 95, 99, 100, 120)}
    assert values == pytest.approx(
        {0: 0, 5: 0.5, 10: 1, 50: 1, 79: 1, 80: 1, 85: 1 - 0.5, 95: 1 - 0.75**0.5, 99: 1 - 0.95**0.5, 100: 0, 120: 0}
    )
    assert warmup_stable_decay_factor(3, 10, 5, 0.2) == pytest.approx(0.3)  # S = 4: still warming up at 3
    assert warmup_stable_decay_factor(4.5, 10, 5, 0.2) == pytest.approx(0.45 * (1 - 0.5**0.5))  # both at once
    assert warmup_stable_decay_factor(4, 0, 5, 1.0) == pytest.approx(1 - (4 / 5) ** 0.5)  # all decay, no warm-up


@pytest.mark.parametrize("fraction", [0.05, 0.2, 0.37, 0.9])
def test_every_step_is_some_length_s_decay_start_and_the_fewest_steps_still_stable_there_are_found(fraction):
    starts = [decay_start_step(n, fraction) for n in range(1, 3000)]
    assert all(0 <= b - a <= 1 for a, b in zip(starts, starts[1:]))  # non-decreasing by 0 or 1: every S is reached
    for step in range(0, 1500):
        fewest = fewest_steps_decaying_after(step, fraction)
        assert decay_start_step(fewest, fraction) > step >= decay_start_step(fewest - 1, fraction)
        # before its decay, the factor does not depend on N
        stable = warmup_stable_decay_factor(step, 7, 10**6, fraction)
        assert warmup_stable_decay_factor(step, 7, fewest, fraction) == stable


def test_the_warmup_stable_decay_scheduler_reads_its_length_at_every_call_and_counts_calls_per_step():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    length = [40]
    scheduler = warmup_stable_decay_schedule(optimizer, 4, lambda: length[0], 0.25, calls_per_step=2)
    rates = [scheduler.get_last_lr()[0]]
    for call in range(1, 80):
        if call == 20:
            length[0] = 30
        optimizer.step()
        scheduler.step()
        rates.append(scheduler.get_last_lr()[0])
    expected = [0.5 * warmup_stable_decay_factor(c / 2, 4, 40 if c < 20 else 30, 0.25) for c in range(80)]
    assert rates == pytest.approx(expected)


def run_late_decided(seconds_of_step, steps_planned=8000, eval_steps=1000, evaluation_seconds=4.0):
    """A --train_minutes 15 run's loop simulated on a clock: the budget planned ``steps_planned`` steps after 20 s of
    calibration; ``seconds_of_step(s)`` is what step s takes. (steps trained, seconds, learning-rate factors used)."""
    budget = StepBudget(15, 880 / steps_planned, 100, evaluation_seconds, 20.0, steps_planned)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    late = LateDecidedSteps(budget, 0.2, started=0.0, eval_steps=eval_steps)
    scheduler = warmup_stable_decay_schedule(optimizer, 100, lambda: late.steps, 0.2)
    now, step, factors = 20.0, 0, []
    late.start(now)
    while step < late.steps:
        factors.append(scheduler.get_last_lr()[0])  # the rate step + 1 trains with
        optimizer.step()
        scheduler.step()
        step += 1
        now += seconds_of_step(step)
        if step % eval_steps == 0 and step < late.steps:
            now += evaluation_seconds
            late.evaluated(evaluation_seconds)
        late.observe(step, now)
    return late, now, factors


@pytest.mark.parametrize("slower_after, slowdown", [(500, 1.25), (3000, 1.5), (100, 0.8), (0, 1.0)])
def test_late_decided_steps_keep_the_budget_when_the_machine_changes_speed_and_equal_a_fixed_length_run(
    slower_after, slowdown
):
    planned = 0.11  # the calibration's seconds per step: 8,000 steps planned
    late, seconds, factors = run_late_decided(lambda s: planned * (slowdown if s > slower_after else 1.0))
    assert late.decided_at is not None and late.decided_at < late.steps
    assert seconds <= 900 * 0.99 + REPLAN_STEPS * planned * slowdown  # within one re-estimate of the plan
    assert seconds >= 900 * 0.97
    if slowdown != 1.0:
        assert (late.steps < 8000) == (slowdown > 1)
    # the rates it trained with are those of --max_train_steps late.steps from the start
    assert factors == [warmup_stable_decay_factor(s, 100, late.steps, 0.2) for s in range(late.steps)]


def test_a_stall_of_the_machine_shorter_than_the_pace_window_before_the_decay_costs_little_of_the_budget():
    # 200 steps at 3x (44 s lost) around step 4,000 of a 15-minute run: its 90 s window dilutes the stall
    late, seconds, _ = run_late_decided(lambda s: 0.11 * (3 if 4000 < s <= 4200 else 1))
    assert 900 * 0.97 <= seconds <= 900 * 0.99 + REPLAN_STEPS * 0.11
    assert late.decided_at > 4200


def test_a_drift_within_the_pace_slack_after_the_decision_keeps_the_budget():
    # 4% slower from step 6,500 on, after the steps were decided: within PACE_SLACK, so within the budget
    late, seconds, _ = run_late_decided(lambda s: 0.11 * (1 + (PACE_SLACK - 0.01) * (s > 6500)))
    assert late.decided_at < 6500
    assert 900 * 0.97 <= seconds <= 900
    steady, steady_seconds, _ = run_late_decided(lambda s: 0.11)
    assert steady_seconds < seconds and steady.steps == late.steps  # the same steps, decided before the drift


def test_late_decided_steps_stop_re_estimating_where_the_decay_starts_and_say_so():
    # the machine halves its speed in the decay: the steps stay those decided, the budget is overrun and it says so
    late, seconds, _ = run_late_decided(lambda s: 0.11 if s < 6400 else 0.22)
    decided_at = late.decided_at
    assert late.steps - decided_at <= 0.2 * late.steps + REPLAN_STEPS
    assert decay_start_step(late.steps, 0.2) > decided_at
    assert late.describe() == (
        f"--train_minutes 15: {late.steps:,} steps decided at step {decided_at:,} from the loop's pace, where the "
        f"learning rate's decay starts (the calibration planned 8,000; the same run: --max_train_steps {late.steps})"
    )
    assert late.budget.outcome(seconds, late.steps, decided_late=True).endswith(
        "of the budget): the loop slowed after its steps were decided (within the learning rate's decay)"
    )


def test_a_non_positive_step_time_is_refused():
    with pytest.raises(ValueError, match="seconds_per_step must be a finite number > 0, got 0.0"):
        steps_within_budget(60, 0, 0.0)


def test_the_calibration_times_the_real_step_and_puts_every_state_and_random_generator_back():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    ema = EMAModel(model.parameters(), use_ema_warmup=True, foreach=True)

    def step(i):
        loss = model(torch.randn(8, 4)).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.step(model.parameters())

    weights = {k: v.clone() for k, v in model.state_dict().items()}
    shadow = [p.clone() for p in ema.shadow_params]
    rng = torch.get_rng_state()
    agreed = []
    seconds, count = time_steps_and_restore(
        step, [model, optimizer, ema], calibration_seconds=0.0, agree=lambda s: agreed.append(s) or 2 * s
    )
    assert count == CALIBRATION_MIN_STEPS and len(agreed) == 2  # every estimate passes through agree
    assert seconds == 2 * agreed[1] > 0  # what agree returns is what counts
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert optimizer.state_dict()["state"] == {} and ema.optimization_step == 0
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow_params, shadow))
    assert torch.equal(torch.get_rng_state(), rng)
    step(0)  # the state works after it: a first optimizer step from scratch
    assert optimizer.state_dict()["state"][0]["step"] == 1


def test_the_calibration_runs_the_steps_that_fill_its_share_within_limits():
    calls = []
    seconds, count = time_steps_and_restore(lambda i: calls.append(i), [], calibration_seconds=1e9)
    assert count == 200 and calls == list(range(CALIBRATION_WARMUP_STEPS + CALIBRATION_MIN_STEPS + 200))


def test_the_budget_says_what_it_measured_and_how_to_get_the_same_run():
    budget = StepBudget(15, 0.2123, 71, 8.46, 19.5, 4042)
    assert budget.describe() == (
        "--train_minutes 15: 0.2123 s per step measured over 71 steps, 8.5 s per mid-run evaluation, 19.5 s spent "
        "calibrating -> 4,042 steps (the same run: --max_train_steps 4042)"
    )


def test_the_budget_says_how_long_its_steps_took_and_by_how_much_the_loop_ran_slower():
    budget = StepBudget(15, 0.0821, 155, 1.9, 15.4, 10437)
    assert budget.outcome(880.0) == "--train_minutes 15: 10,437 steps trained in 14.7 minutes (98% of the budget)"
    # 1112.6 s: the loop's steps and evaluations took (1112.6 - 15.4) / (0.99 * 900 - 15.4) = 1.25x their plan
    assert budget.outcome(1112.6) == (
        "--train_minutes 15: 10,437 steps trained in 18.5 minutes (124% of the budget): the loop ran 1.25x as long "
        "as the 0.0821 s step timed predicted (the machine slowed after its calibration: other work on its cores, "
        "or its clock)"
    )
    # a budget its calibration used up: the one step every run trains
    assert StepBudget(0.2, 0.5382, 5, 0.0, 16.4, 1).outcome(17.0) == (
        "--train_minutes 0.2: 1 steps trained in 0.3 minutes (142% of the budget): its calibration alone took 16.4 s "
        "of the 12 s"
    )


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], (None, None, 15.0)),  # the cpu recipe: 15 minutes
        (["--max_train_steps", "7"], (7, None, None)),  # a length given replaces the recipe's
        (["--num_epochs", "2"], (None, 2, None)),
        (["--train_minutes", "2.5"], (None, None, 2.5)),
        (["--recipe", "gpu"], (2000, None, None)),
        (["--recipe", "gpu", "--train_minutes", "1"], (None, None, 1.0)),
        (["--recipe", "gpu", "--recipe", "cpu"], (None, None, 15.0)),  # the last one given, as argparse reads it
        (["--recipe", "cpu", "--recipe", "gpu"], (2000, None, None)),
    ],
)
def test_how_long_a_run_is_comes_from_the_first_length_given_else_the_recipe(argv, expected):
    recipe = [] if "--recipe" in argv else ["--recipe", "cpu"]
    *_, args = training_args.parse_arguments(["--output_dir", "x", *recipe, *argv])
    assert (args.max_train_steps, args.num_epochs, args.train_minutes) == expected


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--recipe", "cpu"], ("warmup_stable_decay", 0.4)),  # its steps decided as late as the decay allows
        (["--recipe", "gpu"], ("cosine", 0.4)),  # the schedule its H200 figures were measured with
        (["--recipe", "cpu", "--lr_scheduler", "linear", "--lr_decay_fraction", "1"], ("linear", 1.0)),
    ],
)
def test_each_recipe_has_its_learning_rate_schedule_and_flags_override_it(argv, expected):
    *_, args = training_args.parse_arguments(["--output_dir", "x", *argv])
    assert (args.lr_scheduler, args.lr_decay_fraction) == expected


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lr_scheduler", "wsd"], "--lr_scheduler must be one of warmup_stable_decay, linear, cosine, "),
        (["--lr_decay_fraction", "0"], "--lr_decay_fraction must be in (0, 1], got 0.0."),
        (["--lr_decay_fraction", "1.5"], "--lr_decay_fraction must be in (0, 1], got 1.5."),
    ],
)
def test_an_unknown_schedule_or_a_decay_fraction_outside_0_1_is_refused_in_one_line(flags, message):
    with pytest.raises(SystemExit) as error:
        training_args.parse_arguments(["--output_dir", "x", *flags])
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_a_budget_that_is_not_a_positive_number_of_minutes_is_refused(value):
    with pytest.raises(SystemExit) as error:
        training_args.parse_arguments(["--output_dir", "x", "--train_minutes", value])
    assert str(error.value) == f"--train_minutes must be a finite number > 0 or unset, got {float(value)}."


def unet(folder):
    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


def test_a_budgeted_run_fits_its_minutes_and_equals_the_run_of_the_steps_it_logs_even_resumed(tmp_path, caplog):
    # a schedule that decays from the first step: the calibration's steps are the run's (warmup_stable_decay: below)
    flags = [*TINY_TRAIN, "--lr_scheduler", "cosine", "--eval_steps", "4", "--checkpointing_steps", "4"]
    budgeted = tmp_path / "budgeted"
    with caplog.at_level(logging.INFO):
        train.main(["--output_dir", str(budgeted), *flags, "--train_minutes", "0.2"])
    line = next(m for m in caplog.messages if "--train_minutes 0.2: " in m)
    steps = int(re.search(r"the same run: --max_train_steps (\d+)\)", line).group(1))
    results = json.loads((budgeted / "eval_results.json").read_text())
    assert results["steps"] == steps > 4 and results["skipped_updates"] == 0
    # calibration included; the steps' time varies on a machine shared with other work, so the bound is loose here
    # (benchmarks/README.md measures the main job's minutes on a quiet machine)
    assert results["train_seconds_this_run"] <= 0.2 * 60 * 1.5
    assert budgeted_run(budgeted / f"checkpoint-{steps}") == (steps, False)  # 0.2 minutes cannot pay to compile
    assert "torch.compile off (--compile unset: 0.2 minutes cannot pay for compiling)" in line
    assert any(f"--train_minutes 0.2: {steps:,} steps trained in " in m for m in caplog.messages)

    fixed = train.main(["--output_dir", str(tmp_path / "fixed"), *flags, "--max_train_steps", str(steps)])
    a, b = unet(budgeted), unet(fixed)
    assert all(torch.equal(a[k], b[k]) for k in a)

    # killed before its last checkpoint: resumed with the same command, it keeps its steps, not a new budget
    for name in (f"checkpoint-{steps}", "unet", "eval_results.json"):
        subprocess.run(["rm", "-rf", str(budgeted / name)], check=True)
    train.main(["--output_dir", str(budgeted), *flags, "--train_minutes", "0.2", "--resume_from_checkpoint", "latest"])
    assert json.loads((budgeted / "eval_results.json").read_text())["steps"] == steps
    c = unet(budgeted)
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_a_budget_decided_late_trains_exactly_the_run_of_the_steps_it_logs(tmp_path, caplog):
    flags = [*TINY_TRAIN, "--eval_steps", "60", "--checkpointing_steps", "1000"]  # the cpu recipe's schedule
    budgeted = tmp_path / "budgeted"
    with caplog.at_level(logging.INFO):
        train.main(["--output_dir", str(budgeted), *flags, "--train_minutes", "0.25"])
    line = next(m for m in caplog.messages if " steps decided at step " in m)
    steps = int(re.search(r"the same run: --max_train_steps (\d+)\)", line).group(1))
    assert json.loads((budgeted / "eval_results.json").read_text())["steps"] == steps > 60
    assert json.loads((budgeted / "training_args.json").read_text())["max_train_steps"] == steps
    logged = [json.loads(row) for row in (budgeted / "train_log.jsonl").read_text().splitlines()]
    assert [row["lr"] for row in logged] == pytest.approx(
        [1e-3 * warmup_stable_decay_factor(row["step"], 1, steps, 0.4) for row in logged]
    )
    fixed = train.main(["--output_dir", str(tmp_path / "fixed"), *flags, "--max_train_steps", str(steps)])
    a, b = unet(budgeted), unet(fixed)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "budget, seconds_per_step, pays",
    [
        (900, 0.2875, True),  # the default DDPM, float32, 2-core Zen 4: 86 s to compile, 15 minutes
        (500, 0.2875, False),
        (900, 1.18, False),  # a 2.0 GHz Zen 1 (27 images/s): 354 s to compile does not pay in 15 minutes
        (375, 0.0, False),  # a minute to compile at 1.19x: B > 60 * 1.19 / 0.19 = 375.8 s
        (376, 0.0, True),
    ],
)
def test_compiling_pays_where_the_steps_won_back_outweigh_the_compilation(budget, seconds_per_step, pays):
    compile_seconds = max(60.0, 300 * seconds_per_step)
    assert compile_pays(budget, seconds_per_step) is pays
    assert pays == (budget > compile_seconds * 1.19 / 0.19)


@pytest.mark.parametrize(
    "where, refusal",
    [
        (("cpu", "no", "ddpm", 1, True, "AVX512"), ""),
        (("cpu", "no", "ddpm", 1, True, "AVX2"), "AVX2 kernels, where the compiled step measured no faster"),
        (("cpu", "bf16", "ddpm", 1, True, "AVX512"), "bf16 autocast, where the compiled step measured no faster"),
        (("cuda", "no", "ddpm", 1, True, "AVX512"), "on cuda"),
        (("cpu", "no", "vdm", 1, True, "AVX512"), "--model vdm, not measured compiled"),
        (("cpu", "no", "ddpm", 2, True, "AVX512"), "2 processes, not measured compiled"),
        (("cpu", "no", "ddpm", 1, False, "AVX512"), "no --train_minutes budget to pay for compiling"),
    ],
)
def test_an_unset_compile_is_left_to_the_budget_only_where_the_compiled_step_was_measured_faster(where, refusal):
    assert compile_refusal(*where) == refusal


class FakeClock:
    """time.time and time.perf_counter of hf_ddpm.training_budget, advanced by the fake steps only."""

    def __init__(self):
        self.now = 1000.0

    def time(self):
        return self.now

    perf_counter = time


@pytest.mark.parametrize(
    "eager, compiled, fails, decision",
    [
        (0.02, 0.01, False, "torch.compile on (--compile unset: at 0.0200 s per eager step, compiling pays)"),
        (0.25, 0.01, False, "torch.compile off (--compile unset: at 0.2500 s per eager step, compiling does not pay)"),
        (0.02, 0.01, True, "torch.compile failed, eager (RuntimeError: no C++ compiler found)"),
    ],
)
def test_the_budget_compiles_where_it_pays_and_falls_back_to_eager_leaving_no_trace(
    monkeypatch, eager, compiled, fails, decision
):
    clock = FakeClock()
    monkeypatch.setattr("hf_ddpm.training_budget.time", clock)
    network = torch.nn.Linear(3, 3)
    before = {k: v.clone() for k, v in network.state_dict().items()}
    switches = []

    def step(_):
        with torch.no_grad():
            network.weight.add_(1.0)  # a step changes the weights: the calibration must put them back
        if switches and switches[-1] and fails:
            raise RuntimeError("no C++ compiler found\n(the backend's traceback)")
        clock.now += compiled if switches and switches[-1] else eager

    started = clock.time()
    budget = measure_step_budget(7.0, step, [network], started, use_compiled=switches.append)
    assert budget.compile_decision == decision and decision in budget.describe()
    assert budget.compiled is (decision.startswith("torch.compile on"))
    assert switches == ([True, False] if fails else [True] if budget.compiled else [])
    assert budget.seconds_per_step == pytest.approx(compiled if budget.compiled else eager)
    same_run = f"--max_train_steps {budget.steps}" + (" --compile true" if budget.compiled else "")
    assert budget.describe().endswith(f"(the same run: {same_run})")
    assert all(torch.equal(network.state_dict()[k], before[k]) for k in before)


def test_a_compilation_that_fails_in_train_py_leaves_the_run_eager_and_equal_to_the_eager_run(tmp_path, monkeypatch):
    """train.py with --compile unset, a budget that is told compiling pays on AVX-512 kernels, and a torch.compile
    whose network raises (as without a C++ compiler): the run says so, trains eager, and equals --compile false
    bitwise."""
    monkeypatch.setattr("hf_ddpm.training_budget.compile_pays", lambda *args: True)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")  # on an AVX2 machine too

    class Uncompilable(torch.nn.Module):
        def forward(self, *args, **kwargs):
            raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(train.torch, "compile", lambda model: Uncompilable())
    budgeted = tmp_path / "budgeted"
    train.main(["--output_dir", str(budgeted), *TINY_TRAIN, "--train_minutes", "0.1"])
    arguments = json.loads((budgeted / "training_args.json").read_text())
    assert arguments["compile"] is False
    log = (budgeted / "train_log.jsonl").read_text()
    assert log.count('"step"') == arguments["max_train_steps"]
    flags = ["--max_train_steps", str(arguments["max_train_steps"]), "--compile", "false"]
    eager = train.main(["--output_dir", str(tmp_path / "eager"), *TINY_TRAIN, *flags])
    a, b = unet(budgeted), unet(eager)
    assert all(torch.equal(a[k], b[k]) for k in a)
