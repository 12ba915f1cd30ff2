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
        projected_last_tau: bool = False,
        fixed_input_tau: bool = False,
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

    def prune(self, eps: float, rule: str = "all") -> list[int]:
        """Remove blocks with ``|tau_l| / sum|tau| < eps``: every such block (``rule="all"``),
        or only the one with the smallest share (``"smallest"``, the papers' published code:
        at most one block per call).

        Returns the removed positions (indices into ``taus`` before the call). The input block
        is never removed, nor a dependent or projected last block: it carries the horizon.
        """
        with torch.no_grad():
            size = self.taus.abs().tolist()
        removed = prunable(size, eps, rule, fixed_last=self.fixed_last_block)
        if removed:
            self.keep_blocks([p for p in range(self.depth) if p not in removed])
        return removed


PRUNE_RULES: tuple[str, ...] = ("all", "smallest")


def prunable(size: list[float], eps: float, rule: str, *, fixed_last: bool) -> list[int]:
    """The positions pruning removes, from the active blocks' ``|tau|`` (see
    :meth:`TauResNet.prune`); shared with the population, so both decide alike."""
    if not 0.0 < eps < 1.0:
        raise ValueError(f"eps must lie in (0, 1), got {eps!r}")
    if rule not in PRUNE_RULES:
        raise ValueError(f"rule must be one of {PRUNE_RULES}, got {rule!r}")
    total = sum(size)
    if total == 0.0:
        return []
    last_removable = len(size) - 1 if fixed_last else len(size)
    shares = [(size[p] / total, p) for p in range(1, last_removable)]
    below = [p for share, p in shares if share < eps]
    if rule == "smallest" and below:
        return [min(shares)[1]]
    return below
