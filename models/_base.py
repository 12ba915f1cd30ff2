"""Shared base of the variable-time-step networks: tau storage and the horizon constraint."""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import nn

from tauopt.models._stack import StackWorkspace, hidden_stack, stack_backward, stack_forward


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


class TauNetwork(nn.Module):
    """A network of ``depth`` tau-blocks of width ``width`` and a bias-free linear output layer.

    Every block ``l`` owns a step size ``tau_l``; all start at ``T / depth``. Subclasses define how
    a block advances the hidden state. Contract shared by every subclass:

    * ``taus`` is a 1-D tensor of the step sizes of the active blocks, in forward order.
    * Every weight layer is a :class:`torch.nn.Linear`, registered in forward order: the blocks'
      layers (``blocks``), then the output layer (``output``).
    * ``tau_free`` holds the trained step sizes. With ``dependent_last_tau`` the last tau is not a
      parameter but ``T - sum(other taus)``, computed in the forward pass so that the gradient of
      the other taus sees the constraint ``sum(tau) = T``. With ``projected_last_tau`` (the
      papers' published code) the last tau is stored but gets no gradient: after every step
      ``project_taus_()`` overwrites it with ``T - sum(other taus)``, and the other taus'
      gradients do not see the constraint.
    * ``project_taus_()`` restores the admissible set after an optimiser step.
    * ``fixed_input_tau`` keeps the input block's tau at ``T / depth`` while the others train:
      the ResNet that the papers' published code builds with ``tau_is_trainable=False``
      (``experiments.py`` fixes only the first block's tau; its hidden blocks' taus stay
      trainable). ``trainable_tau=False`` fixes every tau.
    """

    def __init__(
        self,
        in_features: int,
        width: int,
        depth: int,
        num_classes: int,
        *,
        T: float,
        trainable_tau: bool,
        dependent_last_tau: bool,
        projected_last_tau: bool = False,
        fixed_input_tau: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_features", in_features),
            ("width", width),
            ("depth", depth),
            ("num_classes", num_classes),
        ):
            _check_positive_int(name, value)
        if not math.isfinite(T) or T <= 0:
            raise ValueError(f"T must be a positive finite time horizon, got {T!r}")
        for name, on in (
            ("dependent_last_tau", dependent_last_tau),
            ("projected_last_tau", projected_last_tau),
        ):
            if on and depth < 2:
                raise ValueError(
                    f"{name} needs depth >= 2 (the last tau is T minus the others), "
                    f"got depth={depth}"
                )
        if dependent_last_tau and projected_last_tau:
            raise ValueError(
                "choose one of dependent_last_tau (gradient through the constraint) and "
                "projected_last_tau (overwritten after each step), not both"
            )
        if fixed_input_tau and not trainable_tau:
            raise ValueError(
                "fixed_input_tau fixes the input block's tau while the others train: it needs "
                "trainable_tau=True (trainable_tau=False fixes every tau already)"
            )
        self.T = float(T)
        self.fixed_input_tau = fixed_input_tau
        self.dependent_last_tau = dependent_last_tau
        self.projected_last_tau = projected_last_tau
        n_free = depth - 1 if dependent_last_tau else depth
        self.tau_free = nn.Parameter(
            torch.full((n_free,), self.T / depth), requires_grad=trainable_tau
        )
        self.blocks = nn.ModuleList(
            [nn.Linear(in_features, width)] + [nn.Linear(width, width) for _ in range(depth - 1)]
        )
        self.output = nn.Linear(width, num_classes, bias=False)
        # Original position of every active block, so a pruned network can be rebuilt and its
        # history reported in the numbering the user configured.
        self.block_ids: list[int] = list(range(depth))
        # Buffers of loss_and_grad, kept between steps (see models._stack.StackWorkspace).
        self._workspace: StackWorkspace | None = None
        # Standardisation of the inputs (see standardize_inputs), saved with the weights.
        self.input_mean: torch.Tensor | None
        self.input_std: torch.Tensor | None
        self.register_buffer("input_mean", None)
        self.register_buffer("input_std", None)

    @property
    def depth(self) -> int:
        """Number of active tau-blocks."""
        return len(self.blocks)

    @property
    def step_workspace(self) -> StackWorkspace | None:
        """The buffers :meth:`loss_and_grad` reuses from step to step (None before the first
        step); the gradients it returns live in them."""
        return self._workspace

    @property
    def taus(self) -> torch.Tensor:
        """Step sizes of the active blocks, in order (differentiable, but for a fixed input
        tau)."""
        free: torch.Tensor = self.tau_free
        if self.fixed_input_tau:
            free = torch.cat([free[:1].detach(), free[1:]])
        if not self.dependent_last_tau:
            return free
        last = (self.T - free.sum()).reshape(1)
        return torch.cat([free, last])

    @property
    def fixed_last_block(self) -> bool:
        """Whether the last block carries ``sum(tau) = T`` (dependent or projected): it is
        never pruned."""
        return self.dependent_last_tau or self.projected_last_tau

    def standardize_inputs(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """From now on every input is ``(x - mean) / std`` per feature before the first block
        (the training split's statistics, stored with the model)."""
        weight = cast(nn.Linear, self.blocks[0]).weight
        self.input_mean = mean.detach().to(weight).reshape(-1).clone()
        self.input_std = std.detach().to(weight).reshape(-1).clone()

    def standardized(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (rows of features) standardised, if the model standardises its inputs."""
        if self.input_mean is None or self.input_std is None:
            return x
        return (x - self.input_mean) / self.input_std

    def as_features(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as the ``(N, in_features)`` floats the blocks take.

        Accepts flattened rows ``(N, in_features)`` and batches of images ``(N, ...)`` of any
        shape with ``in_features`` values each, such as ``(N, H, W)`` or ``(N, C, H, W)`` as
        torchvision gives them (channels first). Floats are taken as they are (the networks
        are trained on pixels in [0, 1]); uint8 pixels (0..255) are scaled to [0, 1]. A model
        trained with standardisation applies it here.
        """
        first = cast(nn.Linear, self.blocks[0])
        shape = tuple(x.shape)
        if x.ndim >= 2:
            x = x.flatten(1)
        if x.ndim != 2 or x.shape[1] != first.in_features:
            raise ValueError(
                f"expected a batch of shape (N, {first.in_features}) or of images (N, ...) "
                f"with {first.in_features} values each, got {shape}; "
                "for one image use x.unsqueeze(0)"
            )
        if x.dtype == torch.uint8:
            return self.standardized(x.to(first.weight.dtype).div_(255.0))
        return self.standardized(x.to(first.weight.dtype))

    def _hidden(
        self, x: torch.Tensor, forcing: torch.Tensor, coeff: torch.Tensor | None
    ) -> torch.Tensor:
        """Run the blocks (see :mod:`models._stack`) and the output layer."""
        x = self.as_features(x)
        linears = [cast(nn.Linear, block) for block in self.blocks]
        weights = [layer.weight for layer in linears]
        biases = [layer.bias for layer in linears]
        out: torch.Tensor = self.output(hidden_stack(x, forcing, coeff, weights, biases))
        return out

    def _step_sizes(self, taus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
        """Forcing factors ``f`` and memory coefficients ``c`` of the stack (no autograd), and
        whatever :meth:`_tau_grad` needs to map their gradients back to the taus."""
        raise NotImplementedError

    def _tau_grad(
        self,
        taus: torch.Tensor,
        grad_forcing: torch.Tensor,
        grad_coeff: torch.Tensor | None,
        saved: Any,
    ) -> torch.Tensor:
        """``dL/dtaus`` from ``dL/df`` and ``dL/dc``."""
        raise NotImplementedError

    @torch.no_grad()
    def loss_and_grad(
        self,
        x: torch.Tensor,
        target: torch.Tensor,
        *,
        l1: float = 0.0,
        horizon_weight: float = 0.0,
        clean_sum: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Cross-entropy + ``l1 sum|tau|`` + ``horizon_weight (sum(tau) - T)^2`` for a batch, with
        its gradient written to every trainable parameter's ``.grad`` (replacing it). The
        cross-entropy alone (the clean loss) is added to ``clean_sum`` where one is given.

        The same numbers as autograd through :meth:`forward` (the tests check this), without
        autograd's per-op bookkeeping: the whole step is the hand-written pass of
        :mod:`models._stack` plus a softmax and a few L-sized vectors. The gradients of the
        blocks live in buffers that the next call overwrites.
        """
        linears = [cast(nn.Linear, block) for block in self.blocks]
        x = self.standardized(x)
        taus = self.taus
        forcing, coeff, saved = self._step_sizes(taus)
        hidden, tape = stack_forward(
            x,
            forcing,
            coeff,
            [m.weight for m in linears],
            [m.bias for m in linears],
            self._workspace,
        )
        self._workspace = tape.workspace
        w_out = self.output.weight
        log_probs = torch.log_softmax(hidden.mm(w_out.t()), dim=1)
        loss = torch.nn.functional.nll_loss(log_probs, target)
        if clean_sum is not None:
            clean_sum.add_(loss)
        # d(mean cross-entropy)/d logits = (softmax - onehot) / batch
        grad_logits = log_probs.exp_()
        grad_logits.scatter_add_(
            1, target[:, None], grad_logits.new_full((target.shape[0], 1), -1.0)
        )
        grad_logits.div_(target.shape[0])
        grad_hidden = torch.mm(grad_logits, w_out, out=tape.workspace.gd_views[-1])
        grads = stack_backward(grad_hidden, tape)
        for layer, grad_w, grad_b in zip(linears, grads.weights, grads.biases, strict=True):
            layer.weight.grad, layer.bias.grad = grad_w, grad_b
        w_out.grad = grad_logits.t().mm(hidden)
        grad_taus = self._tau_grad(taus, grads.forcing, grads.coeff, saved)
        if l1 > 0:
            loss += l1 * taus.abs().sum()
            grad_taus = grad_taus + l1 * taus.sign()
        if horizon_weight > 0:
            excess = taus.sum() - self.T
            loss += horizon_weight * excess.square()
            grad_taus = grad_taus + 2.0 * horizon_weight * excess
        if self.tau_free.requires_grad:
            if self.dependent_last_tau:  # tau_last = T - sum(free): chain rule
                grad_taus = grad_taus[:-1] - grad_taus[-1]
            elif self.projected_last_tau:  # overwritten after the step: no gradient of its own
                grad_taus = torch.cat([grad_taus[:-1], grad_taus.new_zeros(1)])
            if self.fixed_input_tau:
                grad_taus = torch.cat([grad_taus.new_zeros(1), grad_taus[1:]])
            self.tau_free.grad = grad_taus
        return loss

    def project_taus_(self) -> None:
        """Project the taus onto the admissible set after an optimiser step: a projected last
        tau becomes ``T`` minus the others."""
        if self.projected_last_tau:
            with torch.no_grad():
                self.tau_free[-1] = self.T - self.tau_free[:-1].sum()

    def num_active_params(self) -> int:
        """Parameters of the active network: weights and biases of active blocks, output, taus."""
        return sum(p.numel() for p in self.parameters())

    def keep_blocks(self, positions: list[int]) -> None:
        """Keep only the active blocks at ``positions`` (indices into ``taus``), dropping the rest.

        Used by pruning and to rebuild a pruned network from a checkpoint. The input block
        (position 0) and, with a dependent or projected last tau, the last block must be kept.
        """
        n = self.depth
        if sorted(set(positions)) != list(positions) or not positions:
            raise ValueError(f"positions must be strictly increasing and non-empty: {positions}")
        if positions[0] != 0 or positions[-1] >= n:
            raise ValueError(f"positions must start at the input block 0 and be < {n}: {positions}")
        if self.fixed_last_block and positions[-1] != n - 1:
            raise ValueError("the dependent last block carries sum(tau) = T and cannot be removed")
        n_free = self.tau_free.numel()
        free = [p for p in positions if p < n_free]
        kept = self.tau_free.detach()[free].clone()
        self.tau_free = nn.Parameter(kept, requires_grad=self.tau_free.requires_grad)
        self.blocks = nn.ModuleList([self.blocks[p] for p in positions])
        self.block_ids = [self.block_ids[p] for p in positions]
