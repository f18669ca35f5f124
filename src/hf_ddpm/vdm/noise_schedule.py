"""NoiseSchedule: the continuous-time noise schedule gamma(t) = -log SNR(t) of a variational diffusion model.

Kingma et al. 2021 ("Variational Diffusion Models", arXiv 2107.00630) write the forward process as
q(z_t | x) = N(alpha_t x, sigma_t^2 I) for t in [0, 1], with

    alpha_t^2 = sigmoid(-gamma(t)),  sigma_t^2 = sigmoid(gamma(t)),  SNR(t) = alpha_t^2 / sigma_t^2 = exp(-gamma(t)),

so the whole process is one monotone increasing function gamma from gamma(0) = gamma_0 (little noise) to
gamma(1) = gamma_1 (almost pure noise). Three kinds of gamma, chosen by ``schedule_type``:

* ``learned``: VDM's monotone network (``NoiseSchedule_NNet``), rescaled to span [gamma_0, gamma_1] exactly as in
  the paper's appendix, with gamma_0 and gamma_1 learned scalars.
* ``linear``: gamma(t) = gamma_0 + (gamma_1 - gamma_0) t (VDM's ``fixed`` and ``learnable_scalar`` schedules).
* ``cosine``: the log-SNR of the cosine schedule alpha_t^2 = cos^2(pi t / 2), restricted to the times where it lies
  in [gamma_0, gamma_1] and stretched back onto [0, 1].

Parameters are float32; every function computes in the dtype of ``t`` (use float64 for exact tests).
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..config_checks import check_finite_number, check_fits_in_memory, check_integer

VDM_SCHEDULE_TYPES = ("learned", "linear", "cosine")
#: What a learned schedule's interior is trained on: the bound itself, or the variance of its one-sample estimate.
VDM_SCHEDULE_INTERIOR_OBJECTIVES = ("bound", "variance")


class _ScaleGradientLater(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by ``rescaler.scale``, set after the forward."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, rescaler: DeferredGradientScale) -> torch.Tensor:
        ctx.rescaler = rescaler
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        scale = ctx.rescaler.scale
        if scale is None:
            raise RuntimeError("DeferredGradientScale.scale was never set: set it between the forward and backward.")
        return grad * scale.to(grad.dtype), None


class DeferredGradientScale:
    """A gradient multiplier known only after the forward pass: :meth:`apply` is the identity on values, and in the
    backward pass the gradient through it is multiplied by :attr:`scale` (a tensor broadcastable to the value, set
    between forward and backward).

    Used to train a learned schedule's interior on the variance of the diffusion loss (VDM, appendix): with the
    per-image loss L_i and ``scale = 2 L_i``, the gradient of mean_i L_i through the schedule's interior becomes
    mean_i 2 L_i dL_i/d eta = d/d eta mean_i L_i^2, while every other path keeps its ordinary gradient.
    """

    def __init__(self) -> None:
        self.scale: torch.Tensor | None = None

    def apply(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` itself, with its gradient to be multiplied by :attr:`scale`."""
        return _ScaleGradientLater.apply(value, self)


def alpha_sigma_from_gamma(gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, sigma) of gamma = -log SNR: alpha = sqrt(sigmoid(-gamma)), sigma = sqrt(sigmoid(gamma)).

    alpha^2 + sigma^2 = 1 (variance preserving) and alpha^2 / sigma^2 = exp(-gamma).
    """
    return torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()


def epsilon_of_clipped_estimate(z_t: torch.Tensor, eps_hat: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """The noise prediction whose data estimate is clipped to the data's range [-1, 1]:

        x_hat = (z_t - sigma_t eps_hat) / alpha_t,   eps~ = (z_t - alpha_t clip(x_hat, -1, 1)) / sigma_t,

    so that (z_t - sigma_t eps~) / alpha_t = clip(x_hat). ``gamma`` = gamma(t), broadcastable against ``z_t``.
    eps~ is ``eps_hat`` itself wherever x_hat lies in [-1, 1] (no precision lost to a small sigma_t there). Data x
    lie in [-1, 1], so |x - clip(x_hat)| <= |x - x_hat| in every pixel: a bound computed with eps~ is never larger.
    """
    alpha, sigma = alpha_sigma_from_gamma(gamma)
    x_hat = (z_t - sigma * eps_hat) / alpha
    clipped = x_hat.clamp(-1.0, 1.0)
    return torch.where(clipped == x_hat, eps_hat, (z_t - alpha * clipped) / sigma)


def noise_schedule_size_lower_bounds(schedule_type: str, n_features: int) -> tuple[int, int]:
    """(parameters, activation values of one time t) of a :class:`NoiseSchedule` from its config alone: the
    ``learned`` network has 3 n_features + 1 weights (w_1; W_2 and b_2; W_3) and n_features hidden values, and
    the endpoints gamma_0, gamma_1 are 2 more values; ``linear`` and ``cosine`` have only the endpoints."""
    if schedule_type != "learned":
        return 2, 0
    return 3 * n_features + 3, n_features


def check_noise_schedule_config(
    schedule_type: object, gamma_min: object, gamma_max: object, learn_endpoints: object, n_features: object
) -> None:
    """Refuse, in one line (``ValueError``), a :class:`NoiseSchedule` config of wrong types or ranges (a hand-edited
    or hostile config.json): an unknown ``schedule_type``, endpoints that are not finite numbers with gamma_min <
    gamma_max, ``learn_endpoints`` neither a bool nor null, ``n_features`` not a positive integer, and a learned
    network whose weights (float32, :func:`noise_schedule_size_lower_bounds`) would not fit in the memory available,
    before anything is allocated."""
    if schedule_type not in VDM_SCHEDULE_TYPES:
        choices = ", ".join(VDM_SCHEDULE_TYPES)
        raise ValueError(f"NoiseSchedule config: schedule_type must be one of {choices}, got {schedule_type!r}.")
    check_finite_number("NoiseSchedule", "gamma_min", gamma_min)
    check_finite_number("NoiseSchedule", "gamma_max", gamma_max)
    if not gamma_min < gamma_max:
        raise ValueError(f"NoiseSchedule config: gamma_min={gamma_min} must be below gamma_max={gamma_max}.")
    if learn_endpoints is not None and not isinstance(learn_endpoints, bool):
        raise ValueError(
            f"NoiseSchedule config: learn_endpoints must be true, false or null, got {learn_endpoints!r}."
        )
    check_integer("NoiseSchedule", "n_features", n_features)
    check_fits_in_memory(
        f"NoiseSchedule config (schedule_type {schedule_type!r}, n_features {n_features})",
        *noise_schedule_size_lower_bounds(schedule_type, n_features),
        "use a smaller n_features",
    )


class NoiseSchedule(ModelMixin, ConfigMixin):
    r"""gamma(t) = -log SNR(t) on t in [0, 1], monotone increasing from gamma_0 = gamma(0) to gamma_1 = gamma(1).

    ``learned`` (VDM's ``NoiseSchedule_NNet`` with the paper's normalisation): with |W| the elementwise absolute
    value (positive weights make every layer monotone) and phi(u) = 2 sigmoid(u) - 1,

        gamma~(t) = |w_1| t + |W_3| phi(|W_2| (2t - 1) + b_2) / n_features,
        gamma(t)  = gamma_0 + (gamma_1 - gamma_0) (gamma~(t) - gamma~(0)) / (gamma~(1) - gamma~(0)).

    w_1 starts at gamma_1 - gamma_0 and W_2, W_3 at N(0, 0.01^2) as in VDM, so the schedule starts almost linear.
    (VDM's first layer also has a bias; the normalisation cancels it, so it is left out.) gamma is increasing as
    long as gamma_1 > gamma_0.

    ``linear``: gamma(t) = gamma_0 + (gamma_1 - gamma_0) t.

    ``cosine``: with u_j = atan(exp(gamma_j / 2)) for j = 0, 1 and u(t) = u_0 + (u_1 - u_0) t,

        gamma(t) = 2 log tan(u(t)),  so  alpha_t^2 = cos^2(u(t)) = cos^2(pi t' / 2),  t' = 2 u(t) / pi:

    the cosine schedule's -log SNR = 2 log tan(pi t' / 2), which spans (-inf, inf) on t' in (0, 1), restricted to
    t' in [2 u_0 / pi, 2 u_1 / pi] (where it spans [gamma_0, gamma_1]) and stretched linearly onto t in [0, 1].

    Args:
        schedule_type (`str`): ``learned``, ``linear`` or ``cosine``.
        gamma_min (`float`): gamma_0 = gamma(0) (its initial value when learned); VDM's -13.3.
        gamma_max (`float`): gamma_1 = gamma(1) (its initial value when learned); VDM's 5.0.
        learn_endpoints (`bool`, *optional*): learn gamma_0 and gamma_1 (parameters ``gamma_0``, ``gamma_1``) or
            keep them fixed (buffers). Defaults to True for ``learned`` and False for ``linear`` and ``cosine``.
        n_features (`int`): width of the hidden layer of the ``learned`` network (VDM's 1024).
    """

    @register_to_config
    def __init__(
        self,
        schedule_type: str = "learned",
        gamma_min: float = -13.3,
        gamma_max: float = 5.0,
        learn_endpoints: bool | None = None,
        n_features: int = 1024,
    ):
        super().__init__()
        check_noise_schedule_config(schedule_type, gamma_min, gamma_max, learn_endpoints, n_features)
        learn = schedule_type == "learned" if learn_endpoints is None else learn_endpoints
        for name, value in (("gamma_0", gamma_min), ("gamma_1", gamma_max)):
            tensor = torch.tensor(float(value), dtype=torch.float32)
            if learn:
                self.register_parameter(name, nn.Parameter(tensor))
            else:
                self.register_buffer(name, tensor)
        if schedule_type == "learned":
            self.l1_weight = nn.Parameter(torch.full((1, 1), float(gamma_max - gamma_min)))
            self.l2 = nn.Linear(1, n_features)
            self.l3 = nn.Linear(n_features, 1, bias=False)
            nn.init.normal_(self.l2.weight, std=0.01)
            nn.init.zeros_(self.l2.bias)
            nn.init.normal_(self.l3.weight, std=0.01)

    def size_lower_bounds(self) -> tuple[int, int]:
        """(parameters, activation values of one time t) of this schedule from its config alone
        (:func:`noise_schedule_size_lower_bounds`): what is checked against a device's memory before moving it
        there."""
        return noise_schedule_size_lower_bounds(self.config.schedule_type, self.config.n_features)

    def _endpoints(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gamma_0.to(like.dtype), self.gamma_1.to(like.dtype)

    def _unnormalised_network(self, t: torch.Tensor) -> torch.Tensor:
        """gamma~(t) = |w_1| t + |W_3| phi(|W_2| (2t - 1) + b_2) / n_features for t of shape (N,) -> (N,)."""
        dtype = t.dtype
        t = t.reshape(-1, 1)
        linear = t @ self.l1_weight.abs().to(dtype).T
        hidden = (2.0 * t - 1.0) @ self.l2.weight.abs().to(dtype).T + self.l2.bias.to(dtype)
        hidden = 2.0 * (torch.sigmoid(hidden) - 0.5)
        nonlinear = hidden @ self.l3.weight.abs().to(dtype).T / self.config.n_features
        return (linear + nonlinear).reshape(-1)

    def _normalised_network(self, t: torch.Tensor) -> torch.Tensor:
        """The learned schedule's shape n(t) = (gamma~(t) - gamma~(0)) / (gamma~(1) - gamma~(0)), 0 at t = 0 and 1
        at t = 1, in t's shape: gamma(t) = gamma_0 + (gamma_1 - gamma_0) n(t)."""
        ends = torch.tensor([0.0, 1.0], dtype=t.dtype, device=t.device)
        values = self._unnormalised_network(torch.cat([t.reshape(-1), ends]))
        at_t, at_0, at_1 = values[:-2], values[-2], values[-1]
        return ((at_t - at_0) / (at_1 - at_0)).reshape(t.shape)

    def _cosine_angles(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(u(t), du/dt) with u(t) = u_0 + (u_1 - u_0) t and u_j = atan(exp(gamma_j / 2))."""
        gamma_0, gamma_1 = self._endpoints(t)
        u_0, u_1 = torch.atan(torch.exp(0.5 * gamma_0)), torch.atan(torch.exp(0.5 * gamma_1))
        return u_0 + (u_1 - u_0) * t, (u_1 - u_0).expand_as(t)

    def gamma(self, t: torch.Tensor) -> torch.Tensor:
        """gamma(t) = -log SNR(t) elementwise, in t's dtype: (B,) -> (B,) (any shape works).

        learned: gamma_0 + (gamma_1 - gamma_0) (gamma~(t) - gamma~(0)) / (gamma~(1) - gamma~(0));
        linear: gamma_0 + (gamma_1 - gamma_0) t; cosine: 2 log tan(u_0 + (u_1 - u_0) t), u_j = atan(e^(gamma_j/2)).
        """
        gamma_0, gamma_1 = self._endpoints(t)
        schedule_type = self.config.schedule_type
        if schedule_type == "linear":
            return gamma_0 + (gamma_1 - gamma_0) * t
        if schedule_type == "cosine":
            return 2.0 * torch.log(torch.tan(self._cosine_angles(t)[0]))
        return gamma_0 + (gamma_1 - gamma_0) * self._normalised_network(t)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """gamma(t); see :meth:`gamma`."""
        return self.gamma(t)

    def gamma_and_derivative(
        self, t: torch.Tensor, interior_gradient: DeferredGradientScale | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(gamma(t), gamma'(t)) elementwise, for the continuous-time loss 1/2 gamma'(t) ||eps - eps_hat||^2.

        linear: gamma'(t) = gamma_1 - gamma_0; cosine: gamma'(t) = 4 (u_1 - u_0) / sin(2 u(t)) (closed forms);
        learned: gamma = gamma_0 + (gamma_1 - gamma_0) n(t) and gamma' = (gamma_1 - gamma_0) n'(t), with n'(t) by
        autograd on a detached copy of t. Under grad mode the derivative stays differentiable in the schedule's
        parameters (create_graph); under ``torch.no_grad`` both outputs are detached. Gradients never flow into
        ``t`` itself.

        ``interior_gradient`` (learned only; the fixed schedules have no interior): the gradients that reach the
        interior's parameters through n(t) and n'(t) are multiplied by its ``scale``; those of the endpoints
        gamma_0, gamma_1 are not.
        """
        schedule_type = self.config.schedule_type
        if schedule_type == "linear":
            gamma_0, gamma_1 = self._endpoints(t)
            return self.gamma(t), (gamma_1 - gamma_0).expand_as(t)
        if schedule_type == "cosine":
            angle, angle_rate = self._cosine_angles(t)
            return 2.0 * torch.log(torch.tan(angle)), 4.0 * angle_rate / torch.sin(2.0 * angle)
        keep_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            leaf = t.detach().requires_grad_(True)
            shape = self._normalised_network(leaf)
            (slope,) = torch.autograd.grad(shape.sum(), leaf, create_graph=keep_graph)
        if interior_gradient is not None:
            shape, slope = interior_gradient.apply(shape), interior_gradient.apply(slope)
        gamma_0, gamma_1 = self._endpoints(t)
        gamma, derivative = gamma_0 + (gamma_1 - gamma_0) * shape, (gamma_1 - gamma_0) * slope
        if not keep_graph:
            return gamma.detach(), derivative.detach()
        return gamma, derivative

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) with alpha_t^2 = sigmoid(-gamma(t)) and sigma_t^2 = sigmoid(gamma(t))."""
        return alpha_sigma_from_gamma(self.gamma(t))

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """SNR(t) = alpha_t^2 / sigma_t^2 = exp(-gamma(t))."""
        return torch.exp(-self.gamma(t))
