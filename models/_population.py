"""A population: K networks of one shape, their parameters stacked, trained as one computation.

At the reference size one network leaves the hardware idle: on a CPU about half of a step is
per-operation overhead, on a GPU a step uses a few per cent of the device. K networks of the
same shape (architecture, width, depth) step together with batched matrix
products, so each operation's overhead is paid once for all K. Everything a member may choose
on its own is a per-member tensor: ``T``, ``gamma``, ``tau_min`` here, the learning rate and the
penalty weights in the loss and the update, and whether the last tau is ``T`` minus the others.

Layer pruning masks a block of one member (its tau held at zero, so the block is an identity
map and its parameters get no gradient). :meth:`TauPopulation.keep` repacks the stack: members
that leave are dropped, and every member's remaining blocks move together, in order, into the
first slots (a dependent last block into the last one), so the stack is only as deep as the
member with the most blocks. A slot a member does not fill is an empty block (zero weights,
tau held at zero): an exact identity map, so a pruned member's result does not change.

``products=torch.bfloat16`` runs the step's matrix products with bfloat16 operands (float32
accumulation inside the product, float32 results): the weights, biases, taus, activations
and the fractional memory stay float32 (master weights), and only the operands are rounded,
each once per step. The float32 default is the exact float32 step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import cast

import torch
from torch import nn
from torch.nn import functional as F

from tauopt.models._base import TauNetwork
from tauopt.models._fractional import FractionalDNN, _device_tau_grad, _l1_device, _L1DeviceTape
from tauopt.models._resnet import prunable

#: The operand types a step's matrix products may use.
PRODUCT_DTYPES = (torch.float32, torch.bfloat16)


class TauPopulation(nn.Module):
    """The networks ``members`` (all of one class and shape, unpruned) as one stacked model;
    ``products``, the operand type of :meth:`sgd_step_`'s matrix products (see the module).

    Parameters: ``w0`` (K, width, in), ``w_hidden`` (K, depth-1, width, width), ``bias``
    (K, depth, width), ``w_out`` (K, classes, width), ``tau_free`` (K, depth). ``active``
    (K, depth) marks the slots that hold a block of their member; ``block_ids[k][p]`` is the
    original number of member k's block in slot p (-1 for an empty slot). Which taus train is
    per member: ``frozen`` members keep every tau, ``input_fixed`` ones their input block's
    (slot 0, where the input block always stays), so that fixed and trainable networks of one
    shape train together.
    """

    T: torch.Tensor
    gamma: torch.Tensor
    tau_min: torch.Tensor
    active: torch.Tensor
    dependent: torch.Tensor
    projected: torch.Tensor
    fractional: torch.Tensor
    frozen: torch.Tensor
    input_fixed: torch.Tensor

    def __init__(
        self, members: Sequence[TauNetwork], *, products: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        if not members:
            raise ValueError("a population needs at least one member")
        if products not in PRODUCT_DTYPES:
            raise ValueError(f"products must be one of {PRODUCT_DTYPES}, got {products}")
        self.products = products
        first = members[0]
        shape = _shape(first)
        for net in members:
            if _shape(net) != shape:
                raise ValueError(f"members must share one shape: {shape} vs {_shape(net)}")
            if net.block_ids != list(range(len(net.block_ids))):
                raise ValueError("members must be unpruned networks")
        blocks = [[cast(nn.Linear, b) for b in net.blocks] for net in members]
        with torch.no_grad():
            self.w0 = nn.Parameter(torch.stack([b[0].weight for b in blocks]))
            hidden = [torch.stack([layer.weight for layer in b[1:]]) for b in blocks]
            width = self.w0.shape[1]
            empty = self.w0.new_empty(len(members), 0, width, width)
            self.w_hidden = nn.Parameter(torch.stack(hidden) if first.depth > 1 else empty)
            self.bias = nn.Parameter(
                torch.stack([torch.stack([layer.bias for layer in b]) for b in blocks])
            )
            self.w_out = nn.Parameter(torch.stack([net.output.weight for net in members]))
            # One column per block for every member; a member whose last tau is T minus the
            # others never reads its last column (it holds that tau's initial value).
            self.tau_free = nn.Parameter(
                torch.stack([net.taus.detach() for net in members]),
                requires_grad=any(net.tau_free.requires_grad for net in members),
            )
        device = first.tau_free.device

        def per_member(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=self.w0.dtype, device=device)

        self.register_buffer("T", per_member([net.T for net in members]))
        # A ResNet member is the stack with forcing tau and no memory: it can share a group
        # with fractional members (its gamma and tau_min are placeholders, never read).
        fractional = [isinstance(net, FractionalDNN) for net in members]
        self.register_buffer("fractional", torch.tensor(fractional, device=device))
        frac = [net for net in members if isinstance(net, FractionalDNN)]
        self.register_buffer("gamma", per_member([getattr(n, "gamma", 0.5) for n in members]))
        self.register_buffer("tau_min", per_member([getattr(n, "tau_min", 1.0) for n in members]))
        self.detach_memory = bool(frac and frac[0].detach_memory)
        if any(net.detach_memory != self.detach_memory for net in frac):
            raise ValueError("members must agree on detach_memory")
        self.register_buffer(
            "active", torch.ones(len(members), first.depth, dtype=torch.bool, device=device)
        )
        dependent = [net.dependent_last_tau for net in members]
        self.register_buffer("dependent", torch.tensor(dependent, device=device))
        projected = [net.projected_last_tau for net in members]
        self.register_buffer("projected", torch.tensor(projected, device=device))
        self._any_projected = any(projected)  # a host bool: no device sync per step
        frozen = [not net.tau_free.requires_grad for net in members]
        self.register_buffer("frozen", torch.tensor(frozen, device=device))
        input_fixed = [net.fixed_input_tau for net in members]
        self.register_buffer("input_fixed", torch.tensor(input_fixed, device=device))
        self.block_ids: list[list[int]] = [list(range(first.depth)) for _ in members]

    @property
    def size(self) -> int:
        return int(self.w0.shape[0])

    @property
    def depth(self) -> int:
        """Blocks in the stack (a member may have masked some of them)."""
        return int(self.bias.shape[1])

    def taus(self, tau_free: torch.Tensor | None = None) -> torch.Tensor:
        """(K, depth) step sizes (from ``tau_free``, default the parameter); masked blocks
        are exactly zero (differentiable)."""
        tau_free = self.tau_free if tau_free is None else tau_free
        taus = tau_free * self.active.to(tau_free.dtype)
        if not bool(self.dependent.any()):
            return taus
        head = taus[:, :-1]
        last = torch.where(self.dependent, self.T - head.sum(1), taus[:, -1])
        return torch.cat([head, last[:, None]], 1)

    def step_sizes(self, taus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Forcing factors (K, depth) and, where any member is fractional, memory coefficients
        (K, depth, depth) of the stack (see :mod:`tauopt.models._stack`) from ``taus``: a
        ResNet member's forcing is its taus and its coefficients are zero. Plain tensor ops:
        autograd can differentiate them."""
        forcing, coeff, _ = self._step_sizes(taus)
        return forcing, coeff

    def _step_sizes(
        self, taus: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, _L1DeviceTape] | None]:
        """:meth:`step_sizes`, and what :meth:`_tau_grad` needs of them (the effective taus and
        the coefficients' tape) where any member is fractional."""
        frac = self.fractional[:, None]
        if not bool(frac.any()):
            return taus, None, None
        # FractionalDNN clamps a dependent last tau: tau^gamma needs tau > 0. A ResNet member
        # takes the fractional formulas at tau = 1 (finite, gradient-free), then its own.
        clamped = torch.where(self.dependent[:, None], taus.clamp(min=self.tau_min[:, None]), taus)
        eff = torch.where(frac, clamped, 1.0)
        memory_taus = eff.detach() if self.detach_memory else eff
        coeff, tape = _l1_device(memory_taus, self.gamma[:, None, None])
        forcing = torch.where(frac, eff.pow(self.gamma[:, None]) * self._forcing_scale(), taus)
        return forcing, coeff * frac[:, :, None], (eff, tape)

    def _forcing_scale(self) -> torch.Tensor:
        """(K, 1): Gamma(2 - gamma), the fractional forcing's constant factor."""
        return torch.exp(torch.lgamma(2.0 - self.gamma))[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (K, N, classes) of every member for one batch ``x`` (N, in_features)."""
        k, width = self.size, self.w0.shape[1]
        forcing, coeff = self.step_sizes(self.taus())
        # The input block as one matrix product for all members (they share the batch).
        z0 = (x @ self.w0.reshape(k * width, -1).t()).view(x.shape[0], k, width).transpose(0, 1)
        d = forcing[:, 0, None, None] * F.relu(z0 + self.bias[:, 0, None, :])
        u, increments = d, [d]
        for layer in range(1, self.depth):
            z = torch.baddbmm(
                self.bias[:, layer, None, :], u, self.w_hidden[:, layer - 1].transpose(1, 2)
            )
            d = forcing[:, layer, None, None] * F.relu(z)
            if coeff is not None:
                history = torch.stack(increments, 1)  # (K, layer, N, width)
                d = d - torch.einsum("kj,kjnw->knw", coeff[:, layer, :layer], history)
                increments.append(d)
            u = u + d
        return torch.bmm(u, self.w_out.transpose(1, 2))

    def losses(
        self, x: torch.Tensor, target: torch.Tensor, l1: torch.Tensor, horizon_weight: torch.Tensor
    ) -> torch.Tensor:
        """(K,) per-member training losses: cross-entropy + ``l1 sum|tau|`` +
        ``horizon_weight (sum(tau) - T)^2``, as :meth:`TauNetwork.loss_and_grad`."""
        logits = self(x)
        k, n, classes = logits.shape
        ce = F.cross_entropy(
            logits.reshape(k * n, classes), target.repeat(k), reduction="none"
        ).view(k, n)
        taus = self.taus()
        return (
            ce.mean(1) + l1 * taus.abs().sum(1) + horizon_weight * (taus.sum(1) - self.T).square()
        )

    @torch.no_grad()
    def sgd_step_(
        self,
        x: torch.Tensor,
        target: torch.Tensor,
        *,
        lr: torch.Tensor,
        l1: torch.Tensor,
        horizon_weight: torch.Tensor,
        clean_sum: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One step of plain SGD for every member (``p -= lr_k * grad``, then the tau
        projection) on the batch ``(x, target)``; returns the (K,) losses before the step and
        adds their cross-entropy alone (the clean loss) to ``clean_sum`` where one is given.

        A hand-written pass, as the single networks' ``loss_and_grad``, with its matrix
        products batched over the members (the input layer's on the shared batch, no copy).
        The learning rates scale the loss's gradient where it starts, so that every weight's
        update is one in-place product (``w -= (lr g)^T h``) made right after the weight's last
        use: no gradient is stored, and no pass of its own updates the weights.
        """
        k, batch = self.size, x.shape[0]
        taus = self.taus()
        forcing, coeff, saved = self._step_sizes(taus)
        f = forcing[:, :, None, None]  # (K, depth, 1, 1): scales a member's (batch, width)
        xs = x.expand(k, *x.shape)  # the shared batch, no copy
        # rounded before the expansion (a cast of the expanded view would copy it K times)
        xs_low = self._low(x).expand_as(xs)
        acts, states, incr, operands = self._forward_pass(xs, xs_low, f, coeff)
        state, w_out = self._low(states[-1]), self._low(self.w_out)
        log_probs = torch.log_softmax(self._bmm(state, w_out.transpose(1, 2)), dim=2)
        picked = target[None, :, None].expand(k, batch, 1)
        losses = -log_probs.gather(2, picked).squeeze(2).mean(1)
        if clean_sum is not None:
            clean_sum.add_(losses)
        # lr * d(mean cross-entropy)/d logits = lr (softmax - onehot) / batch, per member
        grad_logits = log_probs.exp_()
        grad_logits.scatter_add_(2, picked, grad_logits.new_full((k, batch, 1), -1.0))
        grad_logits = self._low(grad_logits.mul_((lr / batch)[:, None, None]))
        grad_u = self._bmm(grad_logits, w_out)  # dL/du without the memory's paths
        self._sub_product_(self.w_out, grad_logits.transpose(1, 2), state)
        grad_forcing, grad_coeff = self._backward_pass_(f, coeff, acts, operands, incr, grad_u)
        penalties = l1 * taus.abs().sum(1) + horizon_weight * (taus.sum(1) - self.T).square()
        if self.tau_free.requires_grad:
            self.tau_free.sub_(
                self._tau_grad(taus, saved, grad_forcing, grad_coeff, l1 * lr, horizon_weight * lr)
            )
            self.project_taus_()
        return losses + penalties

    # The products' operands come rounded (``_low``), each once per step: a weight's rounded
    # copy serves its forward and backward products, a state its block's product and its
    # weight's update. In float32 these helpers are the exact float32 operations.

    def _low(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` as the products take it (itself in float32)."""
        return t if self.products == torch.float32 else t.to(self.products)

    def _bmm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``a @ b`` (batched) of rounded operands, as float32."""
        out = torch.bmm(a, b)
        return out if self.products == torch.float32 else out.float()

    def _addbmm(self, c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``c + a @ b`` (a new float32 tensor) of rounded operands ``a`` and ``b``."""
        if self.products == torch.float32:
            return torch.baddbmm(c, a, b)
        return torch.bmm(a, b).float().add_(c)

    def _sub_product_(self, target: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        """``target -= a @ b`` in place (a float32 master weight's update) of rounded operands."""
        if self.products == torch.float32:
            target.baddbmm_(a, b, alpha=-1.0)
        else:
            target.sub_(torch.bmm(a, b))

    def _forward_pass(
        self, xs: torch.Tensor, xs_low: torch.Tensor, f: torch.Tensor, coeff: torch.Tensor | None
    ) -> tuple[
        list[torch.Tensor],
        list[torch.Tensor],
        torch.Tensor | None,
        list[tuple[torch.Tensor, torch.Tensor]],
    ]:
        """Activations and states of every block; with memory, the increments ``d_l``
        (K, depth, batch, width) in one buffer that the memory reads; and every block's
        product operands (its input and its transposed weight) as the products take them.
        ``xs_low`` is the batch so."""
        k, batch, depth = xs.shape[0], xs.shape[1], self.depth
        incr = None if coeff is None else xs.new_empty(k, depth, batch, self.w0.shape[1])
        acts, states, operands = [], [], []
        state = xs
        for layer in range(depth):
            weight_t = (self.w0 if layer == 0 else self.w_hidden[:, layer - 1]).transpose(1, 2)
            below = (xs_low if layer == 0 else self._low(state), self._low(weight_t))
            act = self._addbmm(self.bias[:, layer, None, :], *below).relu_()
            if incr is None or coeff is None:
                step = f[:, layer]
                state = act * step if layer == 0 else torch.addcmul(state, act, step)
            else:
                d = torch.mul(act, f[:, layer], out=incr[:, layer])
                if layer:  # d_l -= sum_{j<l} c[l, j] d_j, in place in the buffer
                    history = incr[:, :layer].reshape(k, layer, -1)
                    d.view(k, 1, -1).baddbmm_(coeff[:, layer, None, :layer], history, alpha=-1.0)
                state = d if layer == 0 else state + d
            acts.append(act)
            states.append(state)
            operands.append(below)
        return acts, states, incr, operands

    def _backward_pass_(
        self,
        f: torch.Tensor,
        coeff: torch.Tensor | None,
        acts: list[torch.Tensor],
        operands: list[tuple[torch.Tensor, torch.Tensor]],
        incr: torch.Tensor | None,
        grad_u: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The pass of :func:`tauopt.models._stack.stack_backward`, batched over the members,
        from ``grad_u`` (lr-scaled dL/du at the top), updating every block's weights and bias
        in place once they are no longer needed; returns the (lr-scaled) gradients of the
        forcing factors and of the memory coefficients. ``operands``: every block's product
        operands, from the forward pass."""
        k, depth = grad_u.shape[0], self.depth
        grad_d = [grad_u] * depth  # dL/dd_l (the same as dL/du_{l+1} without memory)
        gd = None
        if incr is not None:  # one buffer: the memory reads every later block's dL/dd
            gd = torch.empty_like(incr)
            gd[:, -1] = grad_u
            grad_d = list(gd.unbind(1))
        grad_forcing = grad_u.new_empty(k, depth)
        for layer in reversed(range(depth)):
            act = acts[layer]
            grad_forcing[:, layer] = torch.linalg.vecdot(
                grad_d[layer].reshape(k, -1), act.reshape(k, -1)
            )
            # d(relu(z) f)/dz: f where the unit is active, else 0
            grad_z = torch.ops.aten.threshold_backward(grad_d[layer], act, 0).mul_(f[:, layer])
            self.bias[:, layer].sub_(grad_z.sum(1))
            below, weight_t = operands[layer]
            weight = self.w0 if layer == 0 else self.w_hidden[:, layer - 1]
            grad_z = self._low(grad_z)
            if layer:  # the weight's last use (dL/du below), then its update
                grad_u = self._addbmm(grad_u, grad_z, weight_t.transpose(1, 2))
                if coeff is not None and gd is not None:  # d_{l-1} also feeds later memories
                    later = gd[:, layer:].reshape(k, depth - layer, -1)
                    weights = coeff[:, layer:, layer - 1].unsqueeze(1)
                    flat = grad_d[layer - 1].copy_(grad_u).view(k, 1, -1)
                    flat.baddbmm_(weights, later, alpha=-1.0)
                else:
                    grad_d[layer - 1] = grad_u
            self._sub_product_(weight, grad_z.transpose(1, 2), below)
        if gd is None or incr is None:
            return grad_forcing, None
        grad_coeff = torch.bmm(gd.reshape(k, depth, -1), incr.reshape(k, depth, -1).transpose(1, 2))
        return grad_forcing, grad_coeff.tril_(-1).neg_()

    def _tau_grad(
        self,
        taus: torch.Tensor,
        saved: tuple[torch.Tensor, _L1DeviceTape] | None,
        grad_forcing: torch.Tensor,
        grad_coeff: torch.Tensor | None,
        l1: torch.Tensor,
        horizon: torch.Tensor,
    ) -> torch.Tensor:
        """``dL/dtau_free`` from ``dL/dforcing``, ``dL/dcoeff`` and the penalties' weights, in
        closed form (the fractional network's device step, per member). A pruned block's tau
        gets none (it stays at zero); a dependent last tau passes its gradient to the others."""
        grad = grad_forcing  # a ResNet member's forcing is its tau
        if saved is not None:
            eff, tape = saved
            fractional = _device_tau_grad(
                grad_forcing,
                None if self.detach_memory else grad_coeff,
                tape,
                taus=taus,
                effective=eff,
                gamma=self.gamma[:, None],
                scale=self._forcing_scale(),
                tau_min=self.tau_min[:, None],
                dependent=self.dependent[:, None],
            )
            grad = torch.where(self.fractional[:, None], fractional, grad_forcing)
        excess = (taus.sum(1) - self.T)[:, None]
        grad = grad + l1[:, None] * taus.sign() + 2.0 * horizon[:, None] * excess
        last = grad[:, -1:]
        dependent = self.dependent[:, None]
        head = torch.where(dependent, grad[:, :-1] - last, grad[:, :-1])
        # a projected last tau is overwritten after the step: it gets no gradient of its own
        grad = torch.cat([head, torch.where(dependent | self.projected[:, None], 0.0, last)], 1)
        first = torch.where(self.input_fixed, 0.0, grad[:, 0])[:, None]
        grad = torch.cat([first, grad[:, 1:]], 1)
        trains = self.active & ~self.frozen[:, None]
        return grad * trains.to(grad.dtype)

    @torch.no_grad()
    def project_taus_(self) -> None:
        """As the members' ``project_taus_``: fractional taus stay >= ``tau_min``, and a
        projected last tau becomes ``T`` minus the others (a masked or empty slot's tau is
        zero: it adds nothing)."""
        floor = torch.where(self.fractional, self.tau_min, -math.inf)[:, None]
        self.tau_free.copy_(torch.maximum(self.tau_free, floor))
        if self._any_projected:
            head = self.tau_free[:, :-1].sum(1)
            last = torch.where(self.projected, self.T - head, self.tau_free[:, -1])
            self.tau_free[:, -1] = torch.maximum(last, floor[:, 0])

    @torch.no_grad()
    def prune(self, member: int, eps: float, rule: str = "all") -> list[int]:
        """:meth:`TauResNet.prune` for one member: mask the blocks it removes (see
        :func:`tauopt.models._resnet.prunable`, which decides for both). Returns the stack
        positions masked now."""
        if bool(self.fractional[member]):
            raise ValueError("a fractional block is never an identity map: it cannot be pruned")
        positions = [p for p, on in enumerate(self.active[member].tolist()) if on]
        size = self.taus()[member].abs()[positions].tolist()
        fixed_last = bool(self.dependent[member] | self.projected[member])
        removed = [positions[i] for i in prunable(size, eps, rule, fixed_last=fixed_last)]
        for position in removed:
            self.active[member, position] = False
            self.tau_free[member, position] = 0.0
        return removed

    def packed_depth(self, members: Sequence[int]) -> int:
        """The stack's depth once :meth:`keep` has repacked ``members``: the most blocks any
        of them still has."""
        return int(self.active[list(members)].sum(1).max())

    @torch.no_grad()
    def keep(self, members: Sequence[int]) -> None:
        """Keep only ``members`` (indices) and repack their blocks into the fewest slots.

        Each member's blocks keep their order (a ResNet block's place in the stack does not
        matter, only the order of the blocks; a fractional member never has a pruned block,
        so its blocks stay where they are). The input block stays in slot 0 and a dependent
        last tau's block goes to the last slot, where :meth:`taus` computes it. A slot left
        over is an empty block: zero weights and bias, tau zero, masked.
        """
        index = torch.tensor(list(members), dtype=torch.long, device=self.active.device)
        depth = self.packed_depth(members)
        fixed_last = (self.dependent | self.projected).tolist()
        layout = [_packed(self.active[m].tolist(), depth, fixed_last[m]) for m in members]
        source = torch.tensor(layout, dtype=torch.long, device=index.device)  # old slot or -1
        filled = source >= 0
        slots = source.clamp(min=0)
        rows = index[:, None]

        def packed(data: torch.Tensor, cols: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            picked = data[rows, cols]  # (K', slots, ...)
            return picked * mask.view(*mask.shape, *[1] * (picked.dim() - 2)).to(picked.dtype)

        def param(data: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
            return nn.Parameter(data.contiguous(), requires_grad=like.requires_grad)

        self.w0 = param(self.w0.detach().index_select(0, index), self.w0)
        hidden = self.w_hidden.detach()
        if depth > 1:
            hidden = packed(hidden, (slots[:, 1:] - 1).clamp(min=0), filled[:, 1:])
        else:
            hidden = hidden.index_select(0, index)[:, :0]
        self.w_hidden = param(hidden, self.w_hidden)
        self.bias = param(packed(self.bias.detach(), slots, filled), self.bias)
        self.w_out = param(self.w_out.detach().index_select(0, index), self.w_out)
        self.tau_free = param(packed(self.tau_free.detach(), slots, filled), self.tau_free)
        for name in (
            "T",
            "gamma",
            "tau_min",
            "dependent",
            "projected",
            "fractional",
            "frozen",
            "input_fixed",
        ):
            buffer = getattr(self, name)
            setattr(self, name, buffer.index_select(0, index) if buffer.numel() else buffer)
        self.active = filled
        self._any_projected = bool(self.projected.any())
        self.block_ids = [
            [self.block_ids[m][p] if p >= 0 else -1 for p in row]
            for m, row in zip(members, layout, strict=True)
        ]

    def member_block_ids(self, member: int) -> list[int]:
        """The original numbers of ``member``'s blocks, in stack order."""
        active = self.active[member].tolist()
        return [b for b, on in zip(self.block_ids[member], active, strict=True) if on]

    def member_slots(self, member: int) -> dict[str, torch.Tensor]:
        """``member``'s part of the stack, as :meth:`load_slots_` takes it back: its slices of
        every parameter, which slots hold its blocks, and their original numbers (CPU)."""
        parts = {
            name: getattr(self, name)[member].detach().cpu().clone()
            for name in ("w0", "w_hidden", "bias", "w_out", "tau_free", "active")
        }
        parts["block_ids"] = torch.tensor(self.block_ids[member], dtype=torch.long)
        return parts

    @torch.no_grad()
    def load_slots_(self, slots: Sequence[Mapping[str, torch.Tensor]]) -> None:
        """Every member's part of the stack from ``slots`` (one per member, in order, all of
        one depth; from :meth:`member_slots` or :func:`network_slots`): the population goes on
        from there, as deep as they are. ``ValueError`` for slots of another shape."""
        if len(slots) != self.size:
            raise ValueError(f"{len(slots)} members' slots for a population of {self.size}")
        depth = int(slots[0]["active"].shape[0]) if slots and "active" in slots[0] else 0
        width, classes = self.w0.shape[1], self.w_out.shape[1]
        shapes = {
            "w0": tuple(self.w0.shape[1:]),
            "w_hidden": (depth - 1, width, width),
            "bias": (depth, width),
            "w_out": (classes, width),
            "tau_free": (depth,),
            "active": (depth,),
            "block_ids": (depth,),
        }
        if not 1 <= depth <= self.bias.shape[1]:
            raise ValueError(f"slots {depth} deep for a stack of at most {self.bias.shape[1]}")
        for member, parts in enumerate(slots):
            for name, shape in shapes.items():
                got = parts.get(name)
                if not isinstance(got, torch.Tensor) or tuple(got.shape) != shape:
                    seen = None if not isinstance(got, torch.Tensor) else tuple(got.shape)
                    raise ValueError(f"member {member}'s {name} is {seen}, not {shape}")
        device, dtype = self.w0.device, self.w0.dtype

        def stacked(name: str) -> torch.Tensor:
            return torch.stack([parts[name] for parts in slots]).to(device, dtype).contiguous()

        for name in ("w0", "w_hidden", "bias", "w_out", "tau_free"):
            like = getattr(self, name)
            setattr(self, name, nn.Parameter(stacked(name), requires_grad=like.requires_grad))
        self.active = torch.stack([parts["active"] for parts in slots]).to(device, torch.bool)
        self.block_ids = [parts["block_ids"].tolist() for parts in slots]

    @torch.no_grad()
    def export(self, member: int, into: TauNetwork) -> TauNetwork:
        """Write ``member``'s parameters into ``into``, a network of the same class and shape
        that has at least the member's blocks, pruning it to them; returns it."""
        active = self.active[member].tolist()
        ids = self.member_block_ids(member)
        into.keep_blocks([into.block_ids.index(b) for b in ids])  # into may be pruned already
        positions = [p for p, on in enumerate(active) if on]
        for block, position in zip(into.blocks, positions, strict=True):
            linear = cast(nn.Linear, block)
            weight = self.w0[member] if position == 0 else self.w_hidden[member, position - 1]
            linear.weight.copy_(weight)
            linear.bias.copy_(self.bias[member, position])
        into.output.weight.copy_(self.w_out[member])
        free = positions[:-1] if bool(self.dependent[member]) else positions
        into.tau_free.copy_(self.tau_free[member, free])
        return into


@torch.no_grad()
def network_slots(net: TauNetwork, depth: int) -> dict[str, torch.Tensor]:
    """A network, pruned or not, as one member's slots of a stack ``depth`` deep (at least its
    blocks), as :meth:`TauPopulation.keep` packs them: its blocks in order in the first slots
    (a last block that carries the horizon in the last slot), the others empty."""
    blocks = [cast(nn.Linear, b) for b in net.blocks]
    if depth < len(blocks):
        raise ValueError(f"a network of {len(blocks)} blocks does not fit {depth} slots")
    layout = _packed([True] * len(blocks), depth, net.fixed_last_block)
    first = blocks[0].weight
    width = first.shape[0]
    w_hidden = first.new_zeros(depth - 1, width, width)
    bias = first.new_zeros(depth, width)
    tau_free = first.new_zeros(depth)
    active = torch.zeros(depth, dtype=torch.bool)
    block_ids = torch.full((depth,), -1, dtype=torch.long)
    taus = net.taus.detach()
    for slot, source in enumerate(layout):
        if source < 0:
            continue
        if slot:
            w_hidden[slot - 1] = blocks[source].weight
        bias[slot] = blocks[source].bias
        tau_free[slot] = taus[source]
        active[slot] = True
        block_ids[slot] = net.block_ids[source]
    parts = {"w0": first, "w_hidden": w_hidden, "bias": bias, "w_out": net.output.weight}
    parts = {name: value.detach().cpu().clone() for name, value in parts.items()}
    return {**parts, "tau_free": tau_free.cpu(), "active": active, "block_ids": block_ids}


def _packed(active: list[bool], depth: int, dependent: bool) -> list[int]:
    """The old slots a member's ``depth`` new slots take their blocks from (-1: empty)."""
    slots = [p for p, on in enumerate(active) if on]
    gap = [-1] * (depth - len(slots))
    return [*slots[:-1], *gap, slots[-1]] if dependent else [*slots, *gap]


def _shape(net: TauNetwork) -> tuple[object, ...]:
    first = cast(nn.Linear, net.blocks[0])
    return (
        first.in_features,
        first.out_features,
        net.depth,
        net.output.out_features,
        str(net.tau_free.device),
    )
