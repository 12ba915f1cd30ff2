"""ResNet as the explicit Euler scheme of ``y' = relu(W(t) y + b(t))`` with learnable steps."""

from __future__ import annotations

from typing import Any

import torch

from tauopt.models._base import TauNetwork


class TauResNet(TauNetwork):
    """``y_0 = tau_0 relu(W_0 x + b_0)``, ``y_l = y_{l-1} + tau_l relu(W_l y_{l-1} + b_l)``.

    The input block has no skip connection (dimensions differ). A block whose tau is 0 is an
    identity map, which is what :meth:`prune` exploits.
    """

    def __init__(
        self,
        in_features: int,
        width: int,
        depth: int,
        num_classes: int,
        *,
        T: float = 1.0,
        trainable_tau: bool = True,
        dependent_last_tau: bool = False,
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._hidden(x, self.taus, None)

    def _step_sizes(self, taus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
        return taus, None, None

    def _tau_grad(
        self,
        taus: torch.Tensor,
        grad_forcing: torch.Tensor,
        grad_coeff: torch.Tensor | None,
        saved: Any,
    ) -> torch.Tensor:
        return grad_forcing

    def prune(self, eps: float) -> list[int]:
        """Remove every block but the input one with ``|tau_l| / sum|tau| < eps``.

        Returns the removed positions (indices into ``taus`` before the call). With
        ``dependent_last_tau`` the last block is kept: it carries the horizon constraint.
        """
        if not 0.0 < eps < 1.0:
            raise ValueError(f"eps must lie in (0, 1), got {eps!r}")
        with torch.no_grad():
            size = self.taus.abs()
            total = float(size.sum())
        if total == 0.0:
            return []
        last_removable = self.depth - 1 if self.dependent_last_tau else self.depth
        removed = [p for p in range(1, last_removable) if float(size[p]) / total < eps]
        if removed:
            self.keep_blocks([p for p in range(self.depth) if p not in removed])
        return removed
