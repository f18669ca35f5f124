"""hf_ddpm.posthoc_ema: the profiles' sigma_rel and inner products against numerical quadrature, the power-function
EMA against its explicit weighted sum, and post-hoc reconstruction through the saved files against EMAs tracked
directly, to the error bound the least-squares fit proves; resuming, file names and the error messages."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open

from hf_ddpm.posthoc_ema import (
    MAX_SIGMA_REL,
    PostHocEMA,
    PostHocSnapshot,
    PowerFunctionEMA,
    gamma_to_sigma_rel,
    list_posthoc_snapshots,
    loaded_weights,
    posthoc_ema_coefficients,
    posthoc_ema_residual_norm,
    power_ema_decay,
    power_profile_inner_product,
    reconstruct_posthoc_ema,
    remove_snapshots_after,
    sigma_rel_to_gamma,
)

pytestmark = pytest.mark.usefixtures("one_thread")

#: float32's unit roundoff.
EPS32 = 2.0**-24


def profile(x: np.ndarray, t: float, gamma: float) -> np.ndarray:
    """p_{t,gamma}(x) = (gamma+1) x^gamma / t^(gamma+1) on [0, t], 0 beyond."""
    return np.where(x <= t, (gamma + 1) / t * (x / t) ** gamma, 0.0)


def exact_ema_weights(t: int, gamma: float) -> np.ndarray:
    """The weight of theta_tau, tau = 1..t, in the EMA after t updates: (1 - beta_tau) prod_{s=tau+1}^t beta_s,
    multiplied out in float64 (no closed form)."""
    betas = np.array([power_ema_decay(s, gamma) for s in range(1, t + 1)])
    later = np.append(np.cumprod(betas[::-1])[::-1][1:], 1.0)  # prod_{s > tau} beta_s
    return (1 - betas) * later


def float32_ema_error_bound(t: int, gamma: float, largest: float) -> float:
    """A bound on a float32 PowerFunctionEMA's rounding error after t updates of values |theta| <= largest.

    Update tau, a + w (theta - a) with w = 1 - beta_tau, rounds the weight, the difference and the product (each
    <= EPS32 w 2 largest) and the sum (<= EPS32 largest); an error made at update tau reaches update t multiplied by
    prod_{s > tau} beta_s = (tau/t)^(gamma+1). Summed: EPS32 largest (sum_tau (tau/t)^(gamma+1) + 6 sum_tau w_tau
    (tau/t)^(gamma+1)) <= EPS32 largest (t/(gamma+2) + 1 + 6), the last sum being the EMA's weights, which add to 1.
    """
    return EPS32 * largest * (t / (gamma + 2) + 7)


# ---------------------------------------------------------------------------------------------- sigma_rel <-> gamma
def test_sigma_rel_and_gamma_invert_each_other():
    for sigma_rel in np.geomspace(1e-4, MAX_SIGMA_REL * (1 - 1e-9), 60):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(sigma_rel)) == pytest.approx(sigma_rel, rel=1e-12)
    for gamma in (1e-6, 0.1, 1.0, 6.94, 16.97, 100.0, 1e4):
        assert sigma_rel_to_gamma(gamma_to_sigma_rel(gamma)) == pytest.approx(gamma, rel=1e-9)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 3.0, 6.94, 16.97, 50.0])
def test_sigma_rel_is_the_profiles_standard_deviation_over_t(gamma):
    t = 7.0  # any t: sigma / t does not depend on it
    x = np.linspace(0.0, t, 2_000_001)
    p = profile(x, t, gamma)
    mass = np.trapezoid(p, x)
    mean = np.trapezoid(x * p, x)
    variance = np.trapezoid((x - mean) ** 2 * p, x)
    assert mass == pytest.approx(1.0, rel=1e-9)
    assert math.sqrt(variance) / t == pytest.approx(gamma_to_sigma_rel(gamma), rel=1e-7)


def test_edm2s_sigma_rels_have_their_published_gammas():
    # Karras et al. 2024: sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94 (checked above against quadrature)
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)


# ---------------------------------------------------------------------------------------------- inner products
@pytest.mark.parametrize(
    "t_a, gamma_a, t_b, gamma_b",
    [
        (2.0, 3.0, 5.0, 7.0),  # t_a < t_b
        (5.0, 7.0, 2.0, 3.0),  # t_a > t_b
        (4.0, 6.94, 4.0, 16.97),  # equal t
        (1000.0, 0.0, 700.0, 0.5),  # a uniform average
        (300.0, 16.97, 300.0, 16.97),  # a profile's squared norm
    ],
)
def test_the_inner_product_matches_quadrature(t_a, gamma_a, t_b, gamma_b):
    x = np.linspace(0.0, min(t_a, t_b), 2_000_001)  # the product is 0 beyond the shorter profile
    quadrature = np.trapezoid(profile(x, t_a, gamma_a) * profile(x, t_b, gamma_b), x)
    assert power_profile_inner_product(t_a, gamma_a, t_b, gamma_b) == pytest.approx(quadrature, rel=1e-7)
    assert power_profile_inner_product(t_b, gamma_b, t_a, gamma_a) == pytest.approx(quadrature, rel=1e-7)


def test_the_inner_product_stays_finite_for_long_runs_and_broadcasts():
    t_a = np.array([[1e6], [5e5], [1e3]])
    gamma_a = np.array([[100.0], [16.97], [0.0]])
    t_b = np.array([1e6, 9.99e5, 2e5, 1.0])
    gamma_b = np.array([100.0, 6.94, 50.0, 3.0])
    product = power_profile_inner_product(t_a, gamma_a, t_b, gamma_b)
    assert product.shape == (3, 4)
    m = np.minimum(t_a, t_b)
    logs = (  # the closed form in logarithms: 1e6^201 would overflow float64
        np.log((gamma_a + 1) * (gamma_b + 1) / (gamma_a + gamma_b + 1))
        + (gamma_a + gamma_b + 1) * np.log(m)
        - (gamma_a + 1) * np.log(t_a)
        - (gamma_b + 1) * np.log(t_b)
    )
    np.testing.assert_allclose(product, np.exp(logs), rtol=1e-10, atol=0)


# ---------------------------------------------------------------------------------------------- the EMA itself
def test_the_power_function_ema_is_its_explicit_weighted_sum():
    gamma = sigma_rel_to_gamma(0.10)
    generator = np.random.default_rng(0)
    trajectory = generator.uniform(-1, 1, size=(300, 7))  # theta_tau for tau = 1..300, as a (3,) and a (2, 2)
    as_tensors = [[torch.tensor(row[:3]), torch.tensor(row[3:]).reshape(2, 2)] for row in trajectory]
    ema = PowerFunctionEMA([torch.zeros(3), torch.zeros(2, 2)], gamma)
    for t, parameters in enumerate(as_tensors, start=1):
        ema.step(parameters)
        assert ema.num_updates == t
        if t == 1:
            assert torch.equal(ema.averaged[0], parameters[0].float())  # beta_1 = 0: the first update copies
        if t in (2, 10, 299, 300):
            weights = exact_ema_weights(t, gamma)
            # the telescoping product: the weights are the profile's integral over (tau-1, tau]
            tau = np.arange(1, t + 1)
            np.testing.assert_allclose(weights, (tau / t) ** (gamma + 1) - ((tau - 1) / t) ** (gamma + 1), rtol=1e-9)
            expected = weights @ trajectory[:t]
            got = torch.cat([a.flatten() for a in ema.averaged]).double().numpy()
            np.testing.assert_allclose(got, expected, rtol=0, atol=float32_ema_error_bound(t, gamma, 1.0))


def test_the_ema_of_a_linear_trajectory_approaches_the_profiles_mean():
    gamma = sigma_rel_to_gamma(0.10)
    ema = PowerFunctionEMA([torch.zeros(())], gamma)
    for t in range(1, 1001):
        ema.step([torch.tensor(float(t))])
        if t in (30, 300, 1000):
            value = ema.averaged[0].item()
            mean = (gamma + 1) / (gamma + 2) * t
            # sum_tau tau ((tau/t)^(gamma+1) - ((tau-1)/t)^(gamma+1)) = t - sum_{tau<t} (tau/t)^(gamma+1), which by
            # Euler-Maclaurin is the profile's mean + 1/2 (the step trajectory lags x by 1/2 on average)
            # - (gamma+1)/(12 t) + O(gamma^3/t^3) (<= 2e-5 here); plus float32 rounding
            expected = mean + 0.5 - (gamma + 1) / (12 * t)
            assert value == pytest.approx(expected, abs=1e-3 + float32_ema_error_bound(t, gamma, t))
            assert abs(value / mean - 1) < 1 / t


def test_the_ema_state_dict_restores_it_exactly():
    ema = PowerFunctionEMA([torch.zeros(4)], gamma=6.94)
    for t in range(1, 6):
        ema.step([torch.full((4,), float(t))])
    buffer = io.BytesIO()
    torch.save(ema.state_dict(), buffer)
    restored = PowerFunctionEMA([torch.ones(4)], gamma=6.94)
    restored.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert restored.num_updates == 5 and torch.equal(restored.averaged[0], ema.averaged[0])
    ema.step([torch.ones(4)])
    restored.step([torch.ones(4)])
    assert torch.equal(restored.averaged[0], ema.averaged[0])
    with pytest.raises(ValueError, match="an EMA with gamma 6.94; this one has gamma 16.97"):
        PowerFunctionEMA([torch.zeros(4)], gamma=16.97).load_state_dict(ema.state_dict())


# ---------------------------------------------------------------------------------------------- the least-squares fit
def test_a_target_equal_to_a_snapshot_gets_all_the_weight():
    steps = [*range(100, 1001, 100)] * 2
    gammas = [sigma_rel_to_gamma(0.05)] * 10 + [sigma_rel_to_gamma(0.10)] * 10
    for j in (5, 9, 13, 19):
        weights = posthoc_ema_coefficients(steps, gammas, steps[j], gammas[j])
        np.testing.assert_allclose(weights, np.eye(20)[j], rtol=0, atol=1e-8)
        assert posthoc_ema_residual_norm(steps, gammas, steps[j], gammas[j], weights) < 1e-8


@pytest.mark.parametrize("target_step", [1000, 950])
def test_the_residual_norm_matches_quadrature(target_step):
    steps = [*range(100, 1001, 100)] * 2
    gammas = [sigma_rel_to_gamma(0.05)] * 10 + [sigma_rel_to_gamma(0.10)] * 10
    target_gamma = sigma_rel_to_gamma(0.07)
    weights = posthoc_ema_coefficients(steps, gammas, target_step, target_gamma)
    # Gauss-Legendre between consecutive ends of profiles, where the residual is smooth (a sum of powers of x)
    nodes, node_weights = np.polynomial.legendre.leggauss(64)
    squared = 0.0
    ends = np.unique([0, *steps, target_step])
    for lo, hi in zip(ends[:-1], ends[1:]):
        x = lo + (hi - lo) * (nodes + 1) / 2
        fitted = sum(w * profile(x, t, g) for w, t, g in zip(weights, steps, gammas))
        squared += (hi - lo) / 2 * node_weights @ (fitted - profile(x, target_step, target_gamma)) ** 2
    residual = posthoc_ema_residual_norm(steps, gammas, target_step, target_gamma, weights)
    assert residual == pytest.approx(math.sqrt(squared), rel=1e-4)
    # relative to the target profile's norm: a good fit at a snapshot step, a poor one between two (the profiles of
    # step 1000 extend past 950, those of step 900 miss its last 50 updates, which carry the most weight)
    relative = residual / math.sqrt(power_profile_inner_product(target_step, target_gamma, target_step, target_gamma))
    assert relative < 1e-2 if target_step == 1000 else relative > 0.1


# ---------------------------------------------------------------------------------------------- reconstruction
STEPS = 4000
PHASES = np.arange(5) * 0.7  # five parameters, as a (2,) and a (3,) tensor


def trajectory(tau: np.ndarray) -> np.ndarray:
    """theta_tau = sin(tau/300 + phase) + tau/1000, one column per parameter."""
    return np.sin(np.asarray(tau, dtype=np.float64)[:, None] / 300 + PHASES) + np.asarray(tau)[:, None] / 1000


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """4,000 updates of PostHocEMA (sigma_rel 0.05 and 0.10, snapshots every 100) and of EMAs at 0.07 and 0.15
    tracked directly, whose values at steps 2,500 and 4,000 are kept."""
    folder = tmp_path_factory.mktemp("posthoc")
    thetas = torch.tensor(trajectory(np.arange(1, STEPS + 1)), dtype=torch.float32)
    start = [torch.zeros(2), torch.zeros(3)]
    posthoc = PostHocEMA(start, ["a", "b"], folder, sigma_rels=(0.05, 0.10), snapshot_every=100)
    direct = {s: PowerFunctionEMA(start, sigma_rel_to_gamma(s)) for s in (0.07, 0.15)}
    kept = {}
    for t in range(1, STEPS + 1):
        parameters = [thetas[t - 1, :2], thetas[t - 1, 2:]]
        posthoc.step(parameters)
        for sigma_rel, ema in direct.items():
            ema.step(parameters)
            if t in (2500, STEPS):
                kept[sigma_rel, t] = torch.cat(ema.averaged).double().numpy()
    return folder, kept


@pytest.mark.parametrize("sigma_rel", [0.07, 0.15])
@pytest.mark.parametrize("step", [None, 2500])
def test_reconstruction_from_the_files_matches_an_ema_tracked_directly(trained, sigma_rel, step):
    folder, kept = trained
    reconstructed = reconstruct_posthoc_ema(folder, sigma_rel, step=step)
    got = torch.cat([reconstructed["a"], reconstructed["b"]]).double().numpy()
    target = STEPS if step is None else step
    target_gamma = sigma_rel_to_gamma(sigma_rel)
    used = [s for s in list_posthoc_snapshots(folder) if s.step <= target]
    assert len(used) == 2 * target // 100
    steps, gammas = [s.step for s in used], [s.gamma for s in used]
    weights = posthoc_ema_coefficients(steps, gammas, target, target_gamma)
    thetas = trajectory(np.arange(1, target + 1))
    largest = np.abs(thetas).max()

    # 1. the files combined = the same combination of the snapshots' exact (float64) EMAs, to float32 rounding
    exact = sum(w * (exact_ema_weights(s, g) @ thetas[:s]) for w, s, g in zip(weights, steps, gammas))
    rounding = sum(abs(w) * float32_ema_error_bound(s, g, largest) for w, s, g in zip(weights, steps, gammas))
    np.testing.assert_allclose(got, exact, rtol=0, atol=rounding + EPS32 * np.abs(exact).max())

    # 2. = the EMA tracked directly, to the fit's error: |sum_i w_i EMA_i - EMA_target| = |integral r theta|
    # <= ||r||_2 ||theta||_2 (Cauchy-Schwarz, theta piecewise constant on (tau-1, tau]), plus both sides' rounding
    residual = posthoc_ema_residual_norm(steps, gammas, target, target_gamma, weights)
    fit = residual * np.sqrt((thetas**2).sum(axis=0))
    tolerance = fit + rounding + float32_ema_error_bound(target, target_gamma, largest)
    direct = kept[sigma_rel, target]
    assert np.all(np.abs(got - direct) <= tolerance)
    # the bound is tight enough to matter: the saved EMA of the nearest sigma_rel is 10x further from the target
    nearest = min(used, key=lambda s: (s.step != target, abs(s.sigma_rel - sigma_rel)))
    with safe_open(nearest.path, framework="pt") as f:
        saved = torch.cat([f.get_tensor("a"), f.get_tensor("b")]).double().numpy()
    assert np.linalg.norm(saved - direct) > 10 * np.linalg.norm(tolerance)


# ---------------------------------------------------------------------------------------------- saving and resuming
def parameters_at(t: int) -> list[torch.Tensor]:
    """Deterministic 'training' parameters of update t: a (3,) and a (2, 2) tensor."""
    generator = torch.Generator().manual_seed(t)
    return [torch.randn(3, generator=generator), torch.randn(2, 2, generator=generator)]


def run(posthoc: PostHocEMA, first: int, last: int) -> None:
    for t in range(first, last + 1):
        posthoc.step(parameters_at(t))


def test_a_resumed_run_writes_the_snapshots_of_an_uninterrupted_one(tmp_path):
    whole = PostHocEMA(parameters_at(0), ["w", "b"], tmp_path / "whole", snapshot_every=5)
    run(whole, 1, 23)
    whole.snapshot(23)

    interrupted = PostHocEMA(parameters_at(0), ["w", "b"], tmp_path / "resumed", snapshot_every=5)
    run(interrupted, 1, 12)
    buffer = io.BytesIO()
    torch.save(interrupted.state_dict(), buffer)  # what accelerate's register_for_checkpointing saves
    del interrupted
    resumed = PostHocEMA(parameters_at(99), ["w", "b"], tmp_path / "resumed", snapshot_every=5)
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert resumed.num_updates == 12
    run(resumed, 13, 23)
    resumed.snapshot()

    names = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "resumed").iterdir())
    assert len(names) == 2 * 5  # steps 5, 10, 15, 20 and the final 23, for two sigma_rels
    for name in names:
        with (
            safe_open(tmp_path / "whole" / name, framework="pt") as a,
            safe_open(tmp_path / "resumed" / name, framework="pt") as b,
        ):
            assert a.metadata() == b.metadata()
            assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in ("w", "b"))


def test_save_false_updates_but_writes_nothing(tmp_path):
    main = PostHocEMA(parameters_at(0), ["w", "b"], tmp_path / "main", snapshot_every=2)
    other = PostHocEMA(parameters_at(0), ["w", "b"], tmp_path / "other", snapshot_every=2, save=False)
    for t in range(1, 7):
        main.step(parameters_at(t))
        assert other.step(parameters_at(t)) == []
    assert other.snapshot() == []
    assert not (tmp_path / "other").exists()
    assert len(list((tmp_path / "main").iterdir())) == 2 * 3
    for a, b in zip(main.emas, other.emas):
        assert all(torch.equal(x, y) for x, y in zip(a.averaged, b.averaged))


def test_file_names_round_trip_through_list_posthoc_snapshots(tmp_path):
    posthoc = PostHocEMA(parameters_at(0), ["w", "b"], tmp_path, sigma_rels=(0.10, 0.05, 0.125), snapshot_every=3)
    written = [path for t in range(1, 8) for path in posthoc.step(parameters_at(t))]
    written += posthoc.snapshot()
    assert posthoc.snapshot() == written[-3:]  # the same step again: the same files, not rewritten
    assert [p.name for p in written[:3]] == [
        "step-000003_sigma-0.100.safetensors",
        "step-000003_sigma-0.050.safetensors",
        "step-000003_sigma-0.125.safetensors",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written)  # no .tmp left
    expected = [
        PostHocSnapshot(tmp_path / f"step-{step:06d}_sigma-{s:.3f}.safetensors", step, sigma_rel_to_gamma(s), s)
        for step in (3, 6, 7)
        for s in (0.05, 0.10, 0.125)
    ]
    assert list_posthoc_snapshots(tmp_path) == expected  # exact gamma and sigma_rel, from the metadata
    with pytest.raises(ValueError, match="snapshot\\(step=6\\), but the EMAs have had 7 updates"):
        posthoc.snapshot(6)


def test_error_messages_say_what_to_fix(tmp_path):
    with pytest.raises(ValueError, match=f"no post-hoc EMA snapshots .* in {tmp_path}"):
        list_posthoc_snapshots(tmp_path)
    with pytest.raises(ValueError, match="no post-hoc EMA snapshots"):
        reconstruct_posthoc_ema(tmp_path / "missing", 0.10)
    posthoc = PostHocEMA(parameters_at(0), ["w", "b"], tmp_path, snapshot_every=5)
    run(posthoc, 1, 12)
    with pytest.raises(ValueError, match="target_step 11 is beyond the last snapshot \\(step 10\\)"):
        reconstruct_posthoc_ema(tmp_path, 0.10, step=11)
    with pytest.raises(ValueError, match="no snapshot in .* at or before step 4: the first is at step 5"):
        reconstruct_posthoc_ema(tmp_path, 0.10, step=4)
    with pytest.raises(ValueError, match="no snapshot at step 7 in .*: reconstruct at a snapshot step \\(5, 10\\)"):
        reconstruct_posthoc_ema(tmp_path, 0.10, step=7)
    for sigma_rel in (0.0, -0.1, MAX_SIGMA_REL, 0.3):
        with pytest.raises(ValueError, match="sigma_rel must be in \\(0, sqrt\\(1/12\\) = 0.2887\\)"):
            reconstruct_posthoc_ema(tmp_path, sigma_rel)
    with pytest.raises(ValueError, match="no snapshots to reconstruct the EMA from"):
        posthoc_ema_coefficients([], [], 1, 6.94)
    with pytest.raises(ValueError, match="gamma must be > -1"):
        gamma_to_sigma_rel(-1.0)
    with pytest.raises(ValueError, match="give one distinct name per tensor: 2 tensors, 1 names"):
        PostHocEMA(parameters_at(0), ["w"], tmp_path)
    with pytest.raises(ValueError, match="must differ in their first 3 decimals"):
        PostHocEMA(parameters_at(0), ["w", "b"], tmp_path, sigma_rels=(0.1, 0.1001))


def test_remove_snapshots_after_keeps_those_up_to_the_step_and_other_files(tmp_path):
    tracker = PostHocEMA([torch.zeros(3)], ["w"], tmp_path, snapshot_every=2)
    for _ in range(6):
        tracker.step([torch.ones(3)])
    (tmp_path / "notes.txt").write_text("kept")
    removed = remove_snapshots_after(tmp_path, 3)
    assert sorted(p.name for p in removed) == [
        "step-000004_sigma-0.050.safetensors",
        "step-000004_sigma-0.100.safetensors",
        "step-000006_sigma-0.050.safetensors",
        "step-000006_sigma-0.100.safetensors",
    ]
    assert [s.step for s in list_posthoc_snapshots(tmp_path)] == [2, 2] and (tmp_path / "notes.txt").is_file()
    assert remove_snapshots_after(tmp_path / "absent", 0) == []


def test_loaded_weights_puts_them_in_and_the_module_own_back_even_on_error():
    module = torch.nn.Linear(2, 2)
    own = {name: p.detach().clone() for name, p in module.named_parameters()}
    weights = {name: torch.full_like(p, 7.0) for name, p in own.items()}
    with pytest.raises(RuntimeError, match="inside"):
        with loaded_weights(module, weights):
            assert all(torch.equal(p, weights[n]) for n, p in module.named_parameters())
            raise RuntimeError("inside")
    assert all(torch.equal(p, own[n]) for n, p in module.named_parameters())
    with pytest.raises(ValueError, match=r"missing \['weight'\], unexpected \['w'\]"):
        with loaded_weights(module, {"bias": weights["bias"], "w": weights["weight"]}):
            pass
