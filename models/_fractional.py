"""Fractional DNN: the L1 scheme with variable steps for a Caputo time-fractional ODE."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from models._base import TauNetwork


def _spans(taus: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Strictly-lower mask and the spans ``t_{l+1} - t_j`` (far) and ``t_{l+1} - t_{j+1}`` (near).

    Masked entries get a harmless 1 (``pow`` at 0 has an infinite derivative).
    """
    n = taus.shape[0]
    t = np.concatenate(([0.0], np.cumsum(taus)))
    mask = np.tri(n, k=-1, dtype=bool)
    far = np.where(mask, t[1:, None] - t[None, :-1], 1.0)
    near = np.where(mask, t[1:, None] - t[None, 1:], 1.0)
    return mask, far, near


@dataclass(frozen=True)
class _L1Tape:
    t: np.ndarray
    coeff: np.ndarray
    mask: np.ndarray
    far: np.ndarray
    near: np.ndarray
    ratio: np.ndarray
    gamma: float


# The matrix is L x L (36 numbers at the reference depth): as ~40 device ops with autograd it
# cost a quarter of a training step, so it is computed on the host in float64 NumPy, which takes
# microseconds, with a closed-form gradient. On a GPU that is one tiny copy each way per step.
def _l1_forward(taus: torch.Tensor, gamma: float) -> tuple[torch.Tensor, _L1Tape]:
    t = taus.detach().to("cpu", torch.float64).numpy()
    mask, far, near = _spans(t)
    power = 1.0 - gamma
    ratio = t[:, None] ** gamma / t[None, :]
    coeff = np.where(mask, ratio * (far**power - near**power), 0.0)
    out = torch.from_numpy(coeff).to(device=taus.device, dtype=taus.dtype)
    return out, _L1Tape(t, coeff, mask, far, near, ratio, gamma)


def _l1_backward(grad: torch.Tensor, tape: _L1Tape) -> torch.Tensor:
    gamma = tape.gamma
    g = np.where(tape.mask, grad.detach().to("cpu", torch.float64).numpy(), 0.0)
    weighted = g * tape.coeff
    # Product rule over tau_l^gamma, 1/tau_j and the spans. A span far[l, j] contains tau_k for
    # j <= k <= l, near[l, j] for j < k <= l: sum rows l >= k with a reverse cumulative sum,
    # then columns j <= k (far) or j < k (near).
    result = gamma * weighted.sum(1) / tape.t - weighted.sum(0) / tape.t
    scale = g * (1.0 - gamma) * tape.ratio
    d_far = np.cumsum((scale * tape.far**-gamma)[::-1], axis=0)[::-1]
    d_near = np.cumsum((scale * tape.near**-gamma)[::-1], axis=0)[::-1]
    result += np.tril(d_far).sum(1) - np.tril(d_near, -1).sum(1)
    return torch.from_numpy(result).to(device=grad.device, dtype=grad.dtype)


class _L1Coefficients(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, taus: torch.Tensor, gamma: float) -> torch.Tensor:
        coeff, ctx.tape = _l1_forward(taus, gamma)
        return coeff

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _l1_backward(grad, ctx.tape), None


def l1_memory_coefficients(taus: torch.Tensor, gamma: float) -> torch.Tensor:
    """Coefficients ``a[l, j]`` (``j < l``, zero elsewhere) of the variable-step L1 scheme.

    ``a[l, j] = tau_l^gamma / tau_j * ((t_{l+1} - t_j)^(1-gamma) - (t_{l+1} - t_{j+1})^(1-gamma))``
    with ``t_k = tau_0 + ... + tau_{k-1}``. All pairs at once, differentiable in ``taus``.
    """
    out: torch.Tensor = _L1Coefficients.apply(taus, gamma)
    return out


class FractionalDNN(TauNetwork):
    """Fractional DNN of depth L (the variable-step L1 scheme)::

        u_{l+1} = u_l - sum_{j<l} a_{l,j} (u_{j+1} - u_j) + tau_l^g Gamma(2-g) relu(W_l u_l + b_l)


    ``u_0 = 0`` in the hidden space; the input block reads the input ``x`` instead of ``u_0``.
    ``detach_memory=True`` stops gradients through the memory coefficients ``a`` (as the
    authors' published code does); the forcing factor ``tau_l^g`` always stays differentiable.
    After each optimiser step :meth:`project_taus_` enforces ``tau >= tau_min``.
    """

    def __init__(
        self,
        in_features: int,
        width: int,
        depth: int,
        num_classes: int,
        *,
        T: float = 1.0,
        gamma: float = 0.5,
        trainable_tau: bool = True,
        dependent_last_tau: bool = False,
        tau_min: float = 1e-4,
        detach_memory: bool = False,
    ) -> None:
        super().__init__(
            in_features,
            width,
            depth,
            num_classes,
            T=T,
            trainable_tau=trainable_tau,
            dependent_last_tau=dependent_last_tau,
        )
        if not 0.0 < gamma < 1.0:
            raise ValueError(f"gamma (the fractional order) must lie in (0, 1), got {gamma!r}")
        if not 0.0 < tau_min <= T / depth:
            raise ValueError(
                f"tau_min must lie in (0, T/depth] = (0, {T / depth:g}], got {tau_min!r}"
            )
        self.gamma = float(gamma)
        self.tau_min = float(tau_min)
        self.detach_memory = detach_memory
        self._forcing_scale = math.gamma(2.0 - self.gamma)

    def _effective_taus(self, taus: torch.Tensor) -> torch.Tensor:
        # The derived last tau can undershoot when the others grow; tau^gamma needs tau > 0.
        return taus.clamp(min=self.tau_min) if self.dependent_last_tau else taus

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        taus = self._effective_taus(self.taus)
        coeff = l1_memory_coefficients(taus.detach() if self.detach_memory else taus, self.gamma)
        return self._hidden(x, taus.pow(self.gamma) * self._forcing_scale, coeff)

    def _step_sizes(self, taus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
        effective = self._effective_taus(taus)
        coeff, tape = _l1_forward(effective, self.gamma)
        return effective.pow(self.gamma) * self._forcing_scale, coeff, (effective, tape)

    def _tau_grad(
        self, taus: torch.Tensor, grad_forcing: torch.Tensor, grad_coeff: torch.Tensor | None, saved: Any
    ) -> torch.Tensor:
        effective, tape = saved
        scale = self.gamma * self._forcing_scale
        grad = grad_forcing * effective.pow(self.gamma - 1.0) * scale
        if grad_coeff is not None and not self.detach_memory:
            grad = grad + _l1_backward(grad_coeff, tape)
        if self.dependent_last_tau:
            grad = grad * (taus >= self.tau_min).to(grad.dtype)  # clamp(min) lets nothing through below
        return grad

    def project_taus_(self) -> None:
        with torch.no_grad():
            self.tau_free.clamp_(min=self.tau_min)
