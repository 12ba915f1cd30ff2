"""Fractional DNN: the L1 scheme with variable steps for a Caputo time-fractional ODE."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from tauopt.models._base import TauNetwork


@dataclass(frozen=True)
class _L1Tape:
    taus: list[float]
    pairs: list[tuple[int, int, float, float, float, float]]  # l, j, coeff, ratio, far, near
    gamma: float
    degenerate: bool = False


def host_arithmetic(device: torch.device) -> bool:
    """Whether the step's tau arithmetic runs as Python floats (CPU) or as device ops."""
    return device.type == "cpu"


# Python floats raise where tensor arithmetic gives inf or nan: a zero step, or a span that
# rounds to zero once the taus have blown up (a diverging run, seen with lr 0.29). Such a step
# yields nan, as the tensor version did, and the engine's finiteness check reports the
# divergence with its advice instead of a ZeroDivisionError.
def _nan_matrix(n: int) -> list[list[float]]:
    return [[math.nan] * n for _ in range(n)]


# The matrix is L x L with L(L-1)/2 nonzero entries (15 at the reference depth). As device ops
# with autograd it cost a quarter of a training step; as plain float64 arithmetic on the host,
# with the closed-form gradient below, it takes tens of microseconds. On a GPU that is one tiny
# copy each way per step.
def _l1_values(t: list[float], gamma: float) -> tuple[list[list[float]], _L1Tape]:
    """The coefficient matrix as nested lists, and the tape of its gradient."""
    try:
        return _l1_values_exact(t, gamma)
    except ZeroDivisionError:
        return _nan_matrix(len(t)), _L1Tape(t, [], gamma, degenerate=True)


def _l1_values_exact(t: list[float], gamma: float) -> tuple[list[list[float]], _L1Tape]:
    n = len(t)
    ends = [0.0]
    for tau in t:
        ends.append(ends[-1] + tau)
    power = 1.0 - gamma
    coeff = [[0.0] * n for _ in range(n)]
    pairs = []
    for row in range(1, n):
        scale = t[row] ** gamma
        for col in range(row):
            far = ends[row + 1] - ends[col]  # t_{l+1} - t_j
            near = ends[row + 1] - ends[col + 1]  # t_{l+1} - t_{j+1}
            ratio = scale / t[col]
            value = ratio * (far**power - near**power)
            coeff[row][col] = value
            pairs.append((row, col, value, ratio, far, near))
    return coeff, _L1Tape(t, pairs, gamma)


def _l1_forward(taus: torch.Tensor, gamma: float) -> tuple[torch.Tensor, _L1Tape]:
    coeff, tape = _l1_values(taus.detach().tolist(), gamma)
    return torch.tensor(coeff, dtype=taus.dtype, device=taus.device), tape


def _l1_grad_values(g: list[list[float]], tape: _L1Tape) -> list[float]:
    """``dL/dtau`` from ``dL/da`` (nested lists), by the closed form below."""
    if not tape.degenerate:
        try:
            return _l1_grad_values_exact(g, tape)
        except ZeroDivisionError:
            pass
    return [math.nan] * len(tape.taus)


def _l1_grad_values_exact(g: list[list[float]], tape: _L1Tape) -> list[float]:
    gamma, t = tape.gamma, tape.taus
    n = len(t)
    result = [0.0] * n
    spans = [0.0] * (n + 1)  # difference array: a span adds to every tau it contains
    for row, col, value, ratio, far, near in tape.pairs:
        weight = g[row][col]
        if weight == 0.0:
            continue
        # Product rule over tau_l^gamma, 1/tau_j and the spans: far contains tau_j..tau_l,
        # near contains tau_{j+1}..tau_l.
        scaled = weight * value
        result[row] += gamma * scaled / t[row]
        result[col] -= scaled / t[col]
        outer = weight * (1.0 - gamma) * ratio
        d_far, d_near = outer * far**-gamma, outer * near**-gamma
        spans[col] += d_far
        spans[col + 1] -= d_near
        spans[row + 1] += d_near - d_far
    running = 0.0
    for k in range(n):
        running += spans[k]
        result[k] += running
    return result


def _l1_backward(grad: torch.Tensor, tape: _L1Tape) -> torch.Tensor:
    result = _l1_grad_values(grad.detach().tolist(), tape)
    return torch.tensor(result, dtype=grad.dtype, device=grad.device)


@dataclass(frozen=True)
class _L1DeviceTape:
    taus: torch.Tensor
    lower: torch.Tensor  # j < l: the entries the scheme uses
    far: torch.Tensor
    near: torch.Tensor
    ratio: torch.Tensor
    coeff: torch.Tensor
    gamma: float | torch.Tensor


# The same arithmetic as _l1_values / _l1_grad_values, as whole-matrix device ops: no host round
# trip, so a GPU step needs no synchronisation and can be captured in a CUDA graph. The unused
# entries (j >= l) get spans of 1, so that no pow of a non-positive span makes a nan there.
# Leading dimensions of ``t`` are batches of tau vectors (the members of a population, whose
# ``gamma`` is then a tensor of matching shape); the formulas are plain ops, so autograd can
# also differentiate them.
def _l1_device(t: torch.Tensor, gamma: float | torch.Tensor) -> tuple[torch.Tensor, _L1DeviceTape]:
    n = t.shape[-1]
    ends = torch.cat([t.new_zeros(*t.shape[:-1], 1), t.cumsum(-1)], -1)
    lower = torch.ones(n, n, dtype=torch.bool, device=t.device).tril(-1)
    far = torch.where(lower, ends[..., 1:, None] - ends[..., None, :-1], 1.0)  # t_{l+1} - t_j
    near = torch.where(lower, ends[..., 1:, None] - ends[..., None, 1:], 1.0)  # t_{l+1} - t_{j+1}
    ratio = t[..., :, None].pow(gamma) / t[..., None, :]
    power = 1.0 - gamma
    coeff = torch.where(lower, ratio * (far.pow(power) - near.pow(power)), 0.0)
    return coeff, _L1DeviceTape(t, lower, far, near, ratio, coeff, gamma)


def _l1_device_grad(g: torch.Tensor, tape: _L1DeviceTape) -> torch.Tensor:
    """``dL/dtau`` from ``dL/da``: the closed form of :func:`_l1_grad_values_exact`, where a
    span's derivative adds to every tau it contains (far: tau_j..tau_l, near: tau_{j+1}..tau_l).
    Leading dimensions as in :func:`_l1_device` (a tensor ``gamma`` shaped ``(..., 1, 1)``)."""
    gamma, t = tape.gamma, tape.taus
    row_gamma = gamma if isinstance(gamma, float) else gamma.squeeze(-1)  # (..., 1): per row
    weight = torch.where(tape.lower, g, 0.0)
    scaled = weight * tape.coeff
    result = row_gamma * scaled.sum(-1) / t - scaled.sum(-2) / t
    outer = weight * ((1.0 - gamma) * tape.ratio)
    # cumsum over j, then the rows l >= k: sum_{l >= k} sum_{j <= k} d[l, j] for every k
    far = (outer * tape.far.pow(-gamma)).cumsum(-1).tril().sum(-2)
    near_sums = (outer * tape.near.pow(-gamma)).cumsum(-1)
    near = torch.nn.functional.pad(near_sums, (1, 0))[..., :-1].tril().sum(-2)  # j <= k - 1
    return result + far - near


def _device_tau_grad(
    grad_forcing: torch.Tensor,
    grad_coeff: torch.Tensor | None,
    tape: _L1DeviceTape,
    *,
    taus: torch.Tensor,
    effective: torch.Tensor,
    gamma: float | torch.Tensor,
    scale: float | torch.Tensor,
    tau_min: float | torch.Tensor,
    dependent: bool | torch.Tensor,
) -> torch.Tensor:
    """``dL/dtau`` of the fractional step sizes (forcing ``effective^gamma * scale``, memory
    coefficients from ``tape``) from ``dL/dforcing`` and ``dL/dcoeff`` (None: the memory is
    detached), where ``effective`` is ``taus`` clamped to ``tau_min`` for a dependent last tau.
    ``gamma``, ``scale``, ``tau_min`` and ``dependent`` are one network's, or per-row (K, 1)
    tensors for the members of a population."""
    grad = grad_forcing * (effective.pow(gamma - 1.0) * (gamma * scale))
    if grad_coeff is not None:
        grad = grad + _l1_device_grad(grad_coeff, tape)
    # clamp(min) passes no gradient below tau_min
    return torch.where(dependent & (taus < tau_min), 0.0, grad)


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
    After each optimiser step :meth:`project_taus_` enforces ``tau >= tau_min`` (and sets a
    projected last tau).
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
        projected_last_tau: bool = False,
        fixed_input_tau: bool = False,
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
            projected_last_tau=projected_last_tau,
            fixed_input_tau=fixed_input_tau,
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

    # The training step works on a handful of floats per tau. On the CPU plain Python
    # arithmetic, one tensor each way, is cheaper than a dozen tiny tensor ops; on a GPU the
    # round trip would stall the device every step and rule out CUDA graphs, so the same
    # formulas run there as device ops.
    def _step_sizes(self, taus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
        if not host_arithmetic(taus.device):
            return self._device_step_sizes(taus)
        values = taus.detach().tolist()
        effective = [max(t, self.tau_min) for t in values] if self.dependent_last_tau else values
        forcing = [t**self.gamma * self._forcing_scale for t in effective]
        coeff, tape = _l1_values(effective, self.gamma)
        saved = (values, effective, tape)
        return (
            torch.tensor(forcing, dtype=taus.dtype, device=taus.device),
            torch.tensor(coeff, dtype=taus.dtype, device=taus.device),
            saved,
        )

    def _tau_grad(
        self,
        taus: torch.Tensor,
        grad_forcing: torch.Tensor,
        grad_coeff: torch.Tensor | None,
        saved: Any,
    ) -> torch.Tensor:
        if not host_arithmetic(taus.device):
            return self._device_tau_grad(grad_forcing, grad_coeff, saved)
        values, effective, tape = saved
        scale, power = self.gamma * self._forcing_scale, self.gamma - 1.0
        try:
            rates = [t**power * scale for t in effective]
        except ZeroDivisionError:  # a zero step: see _nan_matrix
            rates = [math.nan] * len(effective)
        grad = [g * r for g, r in zip(grad_forcing.tolist(), rates, strict=True)]
        if grad_coeff is not None and not self.detach_memory:
            memory = _l1_grad_values(grad_coeff.tolist(), tape)
            grad = [a + b for a, b in zip(grad, memory, strict=True)]
        if self.dependent_last_tau:  # clamp(min) passes no gradient below tau_min
            grad = [g if t >= self.tau_min else 0.0 for g, t in zip(grad, values, strict=True)]
        return torch.tensor(grad, dtype=taus.dtype, device=taus.device)

    def _device_step_sizes(
        self, taus: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
        effective = self._effective_taus(taus)
        coeff, tape = _l1_device(effective, self.gamma)
        return effective.pow(self.gamma) * self._forcing_scale, coeff, (taus, effective, tape)

    def _device_tau_grad(
        self, grad_forcing: torch.Tensor, grad_coeff: torch.Tensor | None, saved: Any
    ) -> torch.Tensor:
        taus, effective, tape = saved
        return _device_tau_grad(
            grad_forcing,
            None if self.detach_memory else grad_coeff,
            tape,
            taus=taus,
            effective=effective,
            gamma=self.gamma,
            scale=self._forcing_scale,
            tau_min=self.tau_min,
            dependent=self.dependent_last_tau,
        )

    def project_taus_(self) -> None:
        """Every tau at least ``tau_min``; a projected last tau is ``T`` minus the others, then
        held at ``tau_min`` too (the papers' code clamps every tau before each forward pass)."""
        with torch.no_grad():
            self.tau_free.clamp_(min=self.tau_min)
            if self.projected_last_tau:
                last = self.T - self.tau_free[:-1].sum()
                self.tau_free[-1] = last.clamp(min=self.tau_min)
