"""Fractional DNN: the L1 scheme with variable steps for a Caputo time-fractional ODE."""

from __future__ import annotations

import math

from typing import Any

import torch
from torch.autograd.function import once_differentiable

from models._base import TauNetwork


def _l1_terms(taus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Strictly-lower mask and the spans ``t_{l+1} - t_j`` (far) and ``t_{l+1} - t_{j+1}`` (near).

    Masked entries get a harmless 1: ``pow`` at 0 has an infinite derivative.
    """
    n = taus.shape[0]
    t = torch.cat([taus.new_zeros(1), taus.cumsum(0)])
    rows = torch.arange(n, device=taus.device)
    mask = rows[None, :] < rows[:, None]
    one = taus.new_ones(())
    far = torch.where(mask, t[1:, None] - t[None, :-1], one)
    near = torch.where(mask, t[1:, None] - t[None, 1:], one)
    return mask, far, near


class _L1Coefficients(torch.autograd.Function):
    """The L1 memory coefficients with an analytic gradient in the taus.

    Autograd through the ~15 tiny L x L operations costs more per training step than the
    arithmetic; the closed-form backward below needs a few reductions instead.
    """

    @staticmethod
    def forward(ctx: Any, taus: torch.Tensor, gamma: float) -> torch.Tensor:
        mask, far, near = _l1_terms(taus)
        power = 1.0 - gamma
        coeff = (taus[:, None].pow(gamma) / taus[None, :] * (far.pow(power) - near.pow(power)))
        coeff = coeff.masked_fill_(~mask, 0.0)
        ctx.save_for_backward(taus, coeff, mask, far, near)
        ctx.gamma = gamma
        return coeff

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        taus, coeff, mask, far, near = ctx.saved_tensors
        gamma = ctx.gamma
        power = 1.0 - gamma
        grad = grad * mask
        weighted = grad * coeff
        # c = tau_l^gamma / tau_j * (far^p - near^p): product rule over the three factors.
        result = gamma * weighted.sum(1) / taus - weighted.sum(0) / taus
        scale = grad * (power * taus[:, None].pow(gamma) / taus[None, :])
        # far spans tau_j..tau_l, near spans tau_{j+1}..tau_l: sum over rows l >= k (reverse
        # cumulative sum), then over the columns j <= k (far) or j < k (near).
        d_far = (scale * far.pow(-gamma)).flip(0).cumsum(0).flip(0)
        d_near = (scale * near.pow(-gamma)).flip(0).cumsum(0).flip(0)
        result = result + d_far.tril().sum(1) - d_near.tril(-1).sum(1)
        return result, None


def l1_memory_coefficients(taus: torch.Tensor, gamma: float) -> torch.Tensor:
    """Coefficients ``a[l, j]`` (``j < l``, zero elsewhere) of the variable-step L1 scheme.

    ``a[l, j] = tau_l^gamma / tau_j * ((t_{l+1} - t_j)^(1-gamma) - (t_{l+1} - t_{j+1})^(1-gamma))``
    with ``t_k = tau_0 + ... + tau_{k-1}``. All pairs at once, differentiable in ``taus``.
    """
    out: torch.Tensor = _L1Coefficients.apply(taus, gamma)
    return out


class FractionalDNN(TauNetwork):
    """``u_{l+1} = u_l - sum_{j<l} a_{l,j} (u_{j+1} - u_j) + tau_l^g Gamma(2-g) relu(W_l u_l + b_l)``.

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        taus = self.taus
        if self.dependent_last_tau:
            # The derived last tau can undershoot when the others grow; tau^gamma needs tau > 0.
            taus = taus.clamp(min=self.tau_min)
        coeff = l1_memory_coefficients(taus.detach() if self.detach_memory else taus, self.gamma)
        return self._hidden(x, taus.pow(self.gamma) * self._forcing_scale, coeff)

    def project_taus_(self) -> None:
        with torch.no_grad():
            self.tau_free.clamp_(min=self.tau_min)
