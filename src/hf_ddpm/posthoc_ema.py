"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", Sec. 3 and
App. C): choose the EMA length after training instead of before it.

An EMA with the power-function decay beta_t = (1 - 1/t)^(gamma+1) at update t gives the parameters of update tau the
weight (tau/t)^(gamma+1) - ((tau-1)/t)^(gamma+1), which is exactly the integral over (tau-1, tau] of the profile
p_{t,gamma}(x) = (gamma+1) x^gamma / t^(gamma+1) on [0, t]: the EMA at t is the integral of p_{t,gamma} against the
piecewise-constant trajectory. Its length is the profile's standard deviation relative to t, sigma_rel. Training
keeps two such EMAs (sigma_rel 0.05 and 0.10) and saves them every ``snapshot_every`` steps (:class:`PostHocEMA`); a
linear combination of these snapshots is the integral of the same combination of their profiles, so the least-squares
fit of the profiles to the profile of any other (step, sigma_rel) gives the weights that reconstruct that EMA
(:func:`posthoc_ema_coefficients`, :func:`reconstruct_posthoc_ema`), with an error of at most
||sum_i w_i p_i - p_target||_2 ||theta||_2 (Cauchy-Schwarz; :func:`posthoc_ema_residual_norm`).

Written from the paper's equations; none of EDM2's code is used.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from safetensors import safe_open
from safetensors.torch import save_file

#: The largest sigma_rel of a power-function EMA with gamma >= 0: gamma = 0 is the uniform average over [0, t],
#: whose standard deviation is t / sqrt(12).
MAX_SIGMA_REL = math.sqrt(1 / 12)
#: A snapshot's file name: its step (the EMA's update count) and sigma_rel to 3 decimals; the exact values are in
#: the file's metadata.
SNAPSHOT_NAME = "step-{step:06d}_sigma-{sigma_rel:.3f}.safetensors"
SNAPSHOT_PATTERN = re.compile(r"step-(\d+)_sigma-(\d+\.\d+)\.safetensors")


# ---------------------------------------------------------------------------------------------- the profiles
def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative standard deviation of the profile p(tau) = (gamma+1) tau^gamma / t^(gamma+1) on [0, t].

    Its moments are E[tau] = (gamma+1)/(gamma+2) t and E[tau^2] = (gamma+1)/(gamma+3) t^2, so
    Var[tau] / t^2 = (gamma+1)/(gamma+3) - (gamma+1)^2/(gamma+2)^2 = (gamma+1) / ((gamma+2)^2 (gamma+3)), using
    (gamma+2)^2 - (gamma+1)(gamma+3) = 1; sigma_rel = sqrt((gamma+1) / ((gamma+2)^2 (gamma+3))).
    """
    if not gamma > -1:
        raise ValueError(f"gamma must be > -1 (the profile (gamma+1) tau^gamma is not normalizable), got {gamma}")
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The gamma >= 0 whose profile has relative standard deviation ``sigma_rel``, 0 < sigma_rel < sqrt(1/12).

    Squaring sigma_rel = sqrt((gamma+1) / ((gamma+2)^2 (gamma+3))) gives the cubic
    s^2 gamma^3 + 7 s^2 gamma^2 + (16 s^2 - 1) gamma + (12 s^2 - 1) = 0 (s = sigma_rel). sigma_rel(gamma) decreases
    on gamma >= 0 from sqrt(1/12) (gamma = 0, the uniform average) to 0, so the cubic has exactly one root there, its
    largest real root; the other two are negative. For small sigma_rel, gamma ~ 1/sigma_rel - 3.
    """
    if not 0 < sigma_rel < MAX_SIGMA_REL:
        raise ValueError(f"sigma_rel must be in (0, sqrt(1/12) = {MAX_SIGMA_REL:.4f}), got {sigma_rel}")
    s2 = sigma_rel**2
    roots = np.roots([s2, 7 * s2, 16 * s2 - 1, 12 * s2 - 1])
    gamma = float(roots[np.argmax(roots.real)].real)
    for _ in range(2):  # Newton on (gamma+1) - s^2 (gamma+2)^2 (gamma+3): the eigenvalue solver's last bits
        residual = (gamma + 1) - s2 * (gamma + 2) ** 2 * (gamma + 3)
        slope = 1 - s2 * (gamma + 2) * (3 * gamma + 8)
        gamma -= residual / slope
    return gamma


def power_profile_inner_product(
    t_a: npt.ArrayLike, gamma_a: npt.ArrayLike, t_b: npt.ArrayLike, gamma_b: npt.ArrayLike
) -> np.ndarray:
    """<p_a, p_b> = integral over [0, inf) of p_{t_a,gamma_a}(tau) p_{t_b,gamma_b}(tau) dtau, broadcast over arrays.

    Both profiles vanish beyond their t, so with m = min(t_a, t_b) the integral is
    (gamma_a+1)(gamma_b+1) / (t_a^(gamma_a+1) t_b^(gamma_b+1)) * integral_0^m tau^(gamma_a+gamma_b) dtau
    = (gamma_a+1)(gamma_b+1) m^(gamma_a+gamma_b+1) / ((gamma_a+gamma_b+1) t_a^(gamma_a+1) t_b^(gamma_b+1)),
    computed as (gamma_a+1)(gamma_b+1)/(gamma_a+gamma_b+1) (m/t_a)^(gamma_a+1) (m/t_b)^(gamma_b+1) / m: ratios <= 1
    raised to the powers, never t^gamma (1e6^101 overflows float64). Needs gamma_a + gamma_b > -1.
    """
    t_a, gamma_a, t_b, gamma_b = (np.asarray(x, dtype=np.float64) for x in (t_a, gamma_a, t_b, gamma_b))
    m = np.minimum(t_a, t_b)
    normalization = (gamma_a + 1) * (gamma_b + 1) / (gamma_a + gamma_b + 1)
    return normalization * (m / t_a) ** (gamma_a + 1) * (m / t_b) ** (gamma_b + 1) / m


def check_snapshots_and_target(
    snapshot_steps: Sequence[int], snapshot_gammas: Sequence[float], target_step: int, target_gamma: float
) -> tuple[np.ndarray, np.ndarray]:
    """The snapshots' steps and gammas as float64 arrays, after the checks the least-squares fit needs."""
    steps = np.asarray(snapshot_steps, dtype=np.float64)
    gammas = np.asarray(snapshot_gammas, dtype=np.float64)
    if steps.size == 0:
        raise ValueError("no snapshots to reconstruct the EMA from: save some with PostHocEMA during training")
    if steps.shape != (steps.size,) or gammas.shape != steps.shape:
        raise ValueError(f"give one gamma per snapshot step: {steps.size} steps, {gammas.size} gammas")
    if np.any(steps <= 0) or target_step <= 0:
        raise ValueError("snapshot steps and target_step must be >= 1 (an EMA's update count)")
    if target_step > steps.max():
        last = int(steps.max())
        raise ValueError(
            f"target_step {target_step} is beyond the last snapshot (step {last}): reconstruct at a step <= {last}"
        )
    if np.any(gammas <= -0.5) or target_gamma <= -0.5:
        raise ValueError("every gamma must be > -1/2 (the profile's square is not integrable otherwise)")
    return steps, gammas


def posthoc_ema_coefficients(
    snapshot_steps: Sequence[int], snapshot_gammas: Sequence[float], target_step: int, target_gamma: float
) -> np.ndarray:
    """The weights w (one per snapshot) with sum_i w_i p_i closest in L2 to p_target: the solution of A w = b,
    A_ij = <p_i, p_j>, b_i = <p_i, p_target> (:func:`power_profile_inner_product`), in float64.

    A is a Gram matrix of nearly parallel profiles: its condition number grows fast with the number of snapshots
    (~1e5 for 80 snapshots, ~1e10 for 2,000) and it is singular when two snapshots coincide, so it is solved with
    ``np.linalg.lstsq`` (SVD, minimum-norm, singular values below eps x size dropped) rather than ``np.linalg.solve``,
    after scaling rows and columns to a unit diagonal (the profiles normalized in L2, whose norms go as 1/sqrt(t)).
    """
    steps, gammas = check_snapshots_and_target(snapshot_steps, snapshot_gammas, target_step, target_gamma)
    gram = power_profile_inner_product(steps[:, None], gammas[:, None], steps[None, :], gammas[None, :])
    target = power_profile_inner_product(steps, gammas, target_step, target_gamma)
    norms = np.sqrt(np.diag(gram))
    scaled = np.linalg.lstsq(gram / np.outer(norms, norms), target / norms, rcond=None)[0]
    return scaled / norms


def posthoc_ema_residual_norm(
    snapshot_steps: Sequence[int],
    snapshot_gammas: Sequence[float],
    target_step: int,
    target_gamma: float,
    weights: npt.ArrayLike,
) -> float:
    """||sum_i w_i p_i - p_target||_2 = sqrt(<p_t, p_t> - 2 w.b + w^T A w) (A, b as in
    :func:`posthoc_ema_coefficients`): the reconstructed EMA differs from the target one by at most this times
    ||theta||_2, the L2 norm over [0, target_step] of the piecewise-constant parameter trajectory (Cauchy-Schwarz)."""
    steps, gammas = check_snapshots_and_target(snapshot_steps, snapshot_gammas, target_step, target_gamma)
    w = np.asarray(weights, dtype=np.float64)
    gram = power_profile_inner_product(steps[:, None], gammas[:, None], steps[None, :], gammas[None, :])
    target = power_profile_inner_product(steps, gammas, target_step, target_gamma)
    squared = power_profile_inner_product(target_step, target_gamma, target_step, target_gamma) - 2 * w @ target
    return math.sqrt(max(float(squared + w @ gram @ w), 0.0))


# ---------------------------------------------------------------------------------------------- training time
def power_ema_decay(t: int, gamma: float) -> float:
    """beta_t = (1 - 1/t)^(gamma+1), the decay of update t = 1, 2, ...: beta_1 = 0 (the first update copies)."""
    return (1 - 1 / t) ** (gamma + 1)


class PowerFunctionEMA:
    """The EMA of a list of tensors with the power-function decay :func:`power_ema_decay`, in float32 on the
    tensors' device. After t updates it is sum_tau theta_tau ((tau/t)^(gamma+1) - ((tau-1)/t)^(gamma+1)), the
    average of theta under the profile (gamma+1) tau^gamma / t^(gamma+1)."""

    def __init__(self, parameters: Iterable[torch.Tensor], gamma: float) -> None:
        gamma_to_sigma_rel(gamma)  # gamma > -1
        self.gamma = float(gamma)
        self.num_updates = 0
        self.averaged: list[torch.Tensor] = [p.detach().to(torch.float32, copy=True) for p in parameters]

    @torch.no_grad()
    def step(self, parameters: Iterable[torch.Tensor]) -> None:
        """averaged <- beta_t averaged + (1 - beta_t) parameters, t the update's number: one fused _foreach_lerp_."""
        parameters = [p.detach() for p in parameters]
        if len(parameters) != len(self.averaged):
            raise ValueError(f"step got {len(parameters)} tensors; this EMA tracks {len(self.averaged)}")
        parameters = [p if p.dtype == torch.float32 else p.float() for p in parameters]
        self.num_updates += 1
        torch._foreach_lerp_(self.averaged, parameters, 1 - power_ema_decay(self.num_updates, self.gamma))

    def state_dict(self) -> dict[str, Any]:
        """gamma, num_updates and the averaged tensors (references, as nn.Module.state_dict gives): torch-saveable."""
        return {"gamma": self.gamma, "num_updates": self.num_updates, "averaged": list(self.averaged)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s values, copied into this EMA's tensors (their device stays)."""
        if not math.isclose(state["gamma"], self.gamma, rel_tol=1e-12):
            raise ValueError(f"the state is of an EMA with gamma {state['gamma']}; this one has gamma {self.gamma}")
        shapes = [tuple(t.shape) for t in state["averaged"]]
        if shapes != [tuple(t.shape) for t in self.averaged]:
            raise ValueError("the state's tensors are not the shapes of this EMA's: was it saved for another model?")
        for averaged, saved in zip(self.averaged, state["averaged"]):
            averaged.copy_(saved)
        self.num_updates = int(state["num_updates"])


class PostHocEMA:
    """The training-time half of post-hoc EMA: one :class:`PowerFunctionEMA` per sigma_rel, saved every
    ``snapshot_every`` updates to ``folder`` as ``step-000400_sigma-0.050.safetensors`` (tensors keyed by ``names``;
    step, gamma and sigma_rel in the metadata), for :func:`reconstruct_posthoc_ema` to combine after training.

    ``save=False`` on the processes that are not the main one: they update but do not write. The default
    snapshot_every (100) gives 20-30 snapshots per EMA in this project's runs of 2,000-3,000 steps.
    """

    def __init__(
        self,
        parameters: Iterable[torch.Tensor],
        names: list[str],
        folder: Path,
        sigma_rels: Sequence[float] = (0.05, 0.10),
        snapshot_every: int = 100,
        save: bool = True,
    ) -> None:
        parameters = list(parameters)
        if len(names) != len(parameters) or len(set(names)) != len(names):
            raise ValueError(f"give one distinct name per tensor: {len(parameters)} tensors, {len(set(names))} names")
        if not sigma_rels:
            raise ValueError("give at least one sigma_rel to track (EDM2's are 0.05 and 0.10)")
        if len({f"{s:.3f}" for s in sigma_rels}) != len(sigma_rels):
            raise ValueError(f"sigma_rels {list(sigma_rels)} must differ in their first 3 decimals (the file names)")
        if isinstance(snapshot_every, bool) or not isinstance(snapshot_every, int) or snapshot_every < 1:
            raise ValueError(f"snapshot_every must be a positive number of updates, got {snapshot_every!r}")
        self.names = list(names)
        self.folder = Path(folder)
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        self.snapshot_every = snapshot_every
        self.save = save
        self.emas = [PowerFunctionEMA(parameters, sigma_rel_to_gamma(s)) for s in self.sigma_rels]
        self.last_snapshot_step = 0

    @property
    def num_updates(self) -> int:
        """How many updates the EMAs have had (the step their snapshots are named after)."""
        return self.emas[0].num_updates

    def step(self, parameters: Iterable[torch.Tensor]) -> list[Path]:
        """Update every EMA; every ``snapshot_every`` updates, save them (:meth:`snapshot`). Returns the files
        written (none on most steps, and on processes with save=False)."""
        parameters = [p.detach() if p.dtype == torch.float32 else p.detach().float() for p in parameters]
        for ema in self.emas:
            ema.step(parameters)
        return self.snapshot() if self.num_updates % self.snapshot_every == 0 else []

    def snapshot(self, step: int | None = None) -> list[Path]:
        """Save every EMA now (the final step of training, say), one atomic write each; returns the files.

        ``step``, if given, must be :attr:`num_updates`: the profiles' t is the EMAs' update count, so a snapshot
        labelled with another step would be reconstructed wrongly. A step already saved is not written again.
        """
        if step is not None and step != self.num_updates:
            raise ValueError(f"snapshot(step={step}), but the EMAs have had {self.num_updates} updates: pass that")
        if self.num_updates == 0:
            raise ValueError("no EMA updates yet: call step(parameters) before snapshot()")
        paths = [self.folder / snapshot_filename(self.num_updates, s) for s in self.sigma_rels]
        if not self.save:
            return []
        if self.last_snapshot_step != self.num_updates:
            self.folder.mkdir(parents=True, exist_ok=True)
            for path, ema, sigma_rel in zip(paths, self.emas, self.sigma_rels):
                metadata = {"step": str(ema.num_updates), "gamma": repr(ema.gamma), "sigma_rel": repr(sigma_rel)}
                tensors = {name: t.detach().cpu().contiguous() for name, t in zip(self.names, ema.averaged)}
                save_file_atomically(tensors, path, metadata)
            self.last_snapshot_step = self.num_updates
        return paths

    def state_dict(self) -> dict[str, Any]:
        """The EMAs' states and the counters (torch-saveable; the snapshots on disk are not part of it)."""
        return {
            "sigma_rels": list(self.sigma_rels),
            "last_snapshot_step": self.last_snapshot_step,
            "emas": [ema.state_dict() for ema in self.emas],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s values (same sigma_rels and tensors)."""
        if len(state["sigma_rels"]) != len(self.sigma_rels) or not all(
            math.isclose(a, b, rel_tol=1e-12) for a, b in zip(state["sigma_rels"], self.sigma_rels)
        ):
            raise ValueError(f"the state tracks sigma_rels {state['sigma_rels']}; this one {list(self.sigma_rels)}")
        for ema, ema_state in zip(self.emas, state["emas"]):
            ema.load_state_dict(ema_state)
        self.last_snapshot_step = int(state["last_snapshot_step"])


def remove_snapshots_after(folder: Path, step: int) -> list[Path]:
    """Delete the snapshots of steps after ``step`` from ``folder``: a run resumed from its checkpoint at ``step``
    trains those steps again, and their old snapshots must not be mixed with the new ones. Returns the files
    removed."""
    doomed = []
    for path in sorted(Path(folder).glob("step-*_sigma-*.safetensors")):
        match = SNAPSHOT_PATTERN.fullmatch(path.name)
        if match and int(match.group(1)) > step:
            path.unlink()
            doomed.append(path)
    return doomed


def snapshot_filename(step: int, sigma_rel: float) -> str:
    """``step-000400_sigma-0.050.safetensors``: the EMA's update count and sigma_rel to 3 decimals."""
    return SNAPSHOT_NAME.format(step=step, sigma_rel=sigma_rel)


def save_file_atomically(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """save_file to ``path.tmp`` in the same folder, then os.replace: the file is complete or absent."""
    staging = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, staging, metadata=metadata)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- after training
@dataclass(frozen=True)
class PostHocSnapshot:
    """One saved EMA: its file, step (update count), gamma and sigma_rel (exact, from the file's metadata)."""

    path: Path
    step: int
    gamma: float
    sigma_rel: float


def list_posthoc_snapshots(folder: Path) -> list[PostHocSnapshot]:
    """The snapshots :class:`PostHocEMA` saved in ``folder``, sorted by step then sigma_rel."""
    folder = Path(folder)
    paths = sorted(p for p in folder.glob("step-*_sigma-*.safetensors") if SNAPSHOT_PATTERN.fullmatch(p.name))
    if not paths:
        raise ValueError(f"no post-hoc EMA snapshots (step-*_sigma-*.safetensors) in {folder}: is it PostHocEMA's?")
    snapshots = []
    for path in paths:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        if not {"step", "gamma", "sigma_rel"} <= metadata.keys():
            raise ValueError(f"{path} has no step, gamma and sigma_rel in its metadata: PostHocEMA did not write it")
        step, gamma, sigma_rel = int(metadata["step"]), float(metadata["gamma"]), float(metadata["sigma_rel"])
        snapshots.append(PostHocSnapshot(path, step, gamma, sigma_rel))
    return sorted(snapshots, key=lambda s: (s.step, s.sigma_rel))


def reconstruct_posthoc_ema(folder: Path, sigma_rel: float, step: int | None = None) -> dict[str, torch.Tensor]:
    """The weights of the EMA of length ``sigma_rel`` at ``step``, a snapshot step (default: the last), as
    sum_i w_i snapshot_i over the snapshots up to ``step``, w from :func:`posthoc_ema_coefficients`.

    Accumulated in float64, one tensor of one snapshot read at a time (memory: the float64 sum and one tensor);
    returned in float32, on the CPU. Steps between snapshots are refused: the updates since the last snapshot are in
    none of the snapshots up to ``step``, yet carry the target's largest weights (with snapshots every 100 steps, at
    step 910 the profile fitted from those up to 900 is 48% off in L2, at 950 85%: :func:`posthoc_ema_residual_norm`).
    """
    target_gamma = sigma_rel_to_gamma(sigma_rel)
    snapshots = list_posthoc_snapshots(folder)
    steps = sorted({s.step for s in snapshots})
    step = steps[-1] if step is None else step
    if steps[0] <= step < steps[-1] and step not in steps:
        before, after = max(s for s in steps if s < step), min(s for s in steps if s > step)
        raise ValueError(f"no snapshot at step {step} in {folder}: reconstruct at a snapshot step ({before}, {after})")
    if step < steps[0]:
        raise ValueError(f"no snapshot in {folder} at or before step {step}: the first is at step {steps[0]}")
    used = [s for s in snapshots if s.step <= step]
    weights = posthoc_ema_coefficients([s.step for s in used], [s.gamma for s in used], step, target_gamma)
    total: dict[str, torch.Tensor] = {}
    for snapshot, weight in zip(used, weights):
        with safe_open(snapshot.path, framework="pt") as f:
            names = list(f.keys())
            if total and set(names) != total.keys():
                raise ValueError(f"{snapshot.path} holds other tensors than {used[0].path}: two runs in one folder?")
            for name in names:
                tensor = f.get_tensor(name).to(torch.float64)
                if name in total:
                    total[name].add_(tensor, alpha=float(weight))
                else:
                    total[name] = tensor.mul_(float(weight))
    return {name: tensor.to(torch.float32) for name, tensor in total.items()}


@contextlib.contextmanager
def loaded_weights(module: torch.nn.Module, weights: Mapping[str, torch.Tensor]) -> Iterator[torch.nn.Module]:
    """Context: ``module``'s parameters hold ``weights`` (by parameter name, as :func:`reconstruct_posthoc_ema`
    returns them) inside the block, and their own values again after it, raising or not."""
    parameters = dict(module.named_parameters())
    if set(weights) != set(parameters):
        missing, extra = sorted(set(parameters) - set(weights)), sorted(set(weights) - set(parameters))
        raise ValueError(f"the weights do not fit the module: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        own = {name: p.detach().clone() for name, p in parameters.items()}
        for name, p in parameters.items():
            p.copy_(weights[name])
    try:
        yield module
    finally:
        with torch.no_grad():
            for name, p in parameters.items():
                p.copy_(own[name])
