"""A population: K networks of one shape, their parameters stacked, trained as one computation.

At the reference size one network leaves the hardware idle: on a CPU about half of a step is
per-operation overhead, on a GPU a step uses a few per cent of the device. K networks of the
same shape (architecture, width, depth, horizon constraint) step together with batched matrix
products, so each operation's overhead is paid once for all K. Everything a member may choose
on its own is a per-member tensor: ``T``, ``gamma``, ``tau_min`` here, the learning rate and the
penalty weights in the loss and the update.

Layer pruning masks a block of one member (its tau held at zero, so the block is an identity
map and its parameters get no gradient); a block masked in every member is dropped from the
stack (:meth:`TauPopulation.keep`), as are members that leave.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import nn
from torch.nn import functional as F

from tauopt.models._base import TauNetwork
from tauopt.models._fractional import FractionalDNN


def _l1_coefficients(t: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Memory coefficients ``a[k, l, j]`` of the L1 scheme for every member ``k`` (see
    :func:`tauopt.models._fractional.l1_memory_coefficients`), differentiable by autograd.
    The unused entries (``j >= l``) get spans of 1, so that no pow of a non-positive span
    makes a nan in the gradient there."""
    k, n = t.shape
    ends = torch.cat([t.new_zeros(k, 1), t.cumsum(1)], 1)
    lower = torch.ones(n, n, dtype=torch.bool, device=t.device).tril(-1)
    far = torch.where(lower, ends[:, 1:, None] - ends[:, None, :-1], 1.0)
    near = torch.where(lower, ends[:, 1:, None] - ends[:, None, 1:], 1.0)
    g = gamma[:, None, None]
    ratio = t[:, :, None].pow(g) / t[:, None, :]
    return torch.where(lower, ratio * (far.pow(1.0 - g) - near.pow(1.0 - g)), 0.0)


class TauPopulation(nn.Module):
    """The networks ``members`` (all of one class and shape, unpruned) as one stacked model.

    Parameters: ``w0`` (K, width, in), ``w_hidden`` (K, depth-1, width, width), ``bias``
    (K, depth, width), ``w_out`` (K, classes, width), ``tau_free`` (K, free taus). ``active``
    (K, depth) marks the blocks each member still has; ``block_ids`` are the original numbers
    of the stacked blocks (the same for every member).
    """

    T: torch.Tensor
    gamma: torch.Tensor
    tau_min: torch.Tensor
    active: torch.Tensor

    def __init__(self, members: Sequence[TauNetwork]) -> None:
        super().__init__()
        if not members:
            raise ValueError("a population needs at least one member")
        first = members[0]
        shape = _shape(first)
        for net in members:
            if type(net) is not type(first) or _shape(net) != shape:
                raise ValueError(
                    f"members must share class and shape: {type(first).__name__}{shape} vs "
                    f"{type(net).__name__}{_shape(net)}"
                )
            if net.block_ids != list(range(len(net.block_ids))):
                raise ValueError("members must be unpruned networks")
        self.fractional = isinstance(first, FractionalDNN)
        self.dependent_last_tau = first.dependent_last_tau
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
            self.tau_free = nn.Parameter(
                torch.stack([net.tau_free for net in members]),
                requires_grad=first.tau_free.requires_grad,
            )
        device = first.tau_free.device

        def per_member(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=self.w0.dtype, device=device)

        self.register_buffer("T", per_member([net.T for net in members]))
        fractional = [cast(FractionalDNN, net) for net in members] if self.fractional else []
        self.register_buffer("gamma", per_member([net.gamma for net in fractional]))
        self.register_buffer("tau_min", per_member([net.tau_min for net in fractional]))
        self.detach_memory = bool(fractional and fractional[0].detach_memory)
        if any(net.detach_memory != self.detach_memory for net in fractional):
            raise ValueError("members must agree on detach_memory")
        self.register_buffer(
            "active", torch.ones(len(members), first.depth, dtype=torch.bool, device=device)
        )
        self.block_ids: list[int] = list(range(first.depth))

    @property
    def size(self) -> int:
        return int(self.w0.shape[0])

    @property
    def depth(self) -> int:
        """Blocks in the stack (a member may have masked some of them)."""
        return int(self.bias.shape[1])

    def taus(self) -> torch.Tensor:
        """(K, depth) step sizes; masked blocks are exactly zero (differentiable)."""
        mask = self.active.to(self.tau_free.dtype)
        if not self.dependent_last_tau:
            return self.tau_free * mask
        free = self.tau_free * mask[:, :-1]
        last = (self.T - free.sum(1))[:, None]
        return torch.cat([free, last], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (K, N, classes) of every member for one batch ``x`` (N, in_features)."""
        k, width = self.size, self.w0.shape[1]
        taus = self.taus()
        coeff = None
        if self.fractional:
            if self.dependent_last_tau:  # as FractionalDNN: tau^gamma needs tau > 0
                taus = torch.maximum(taus, self.tau_min[:, None])
            memory_taus = taus.detach() if self.detach_memory else taus
            coeff = _l1_coefficients(memory_taus, self.gamma)
            scale = torch.exp(torch.lgamma(2.0 - self.gamma))[:, None]
            forcing = taus.pow(self.gamma[:, None]) * scale
        else:
            forcing = taus
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
    def project_taus_(self) -> None:
        """As the members' ``project_taus_``: fractional taus stay >= ``tau_min``."""
        if self.fractional:
            self.tau_free.copy_(torch.maximum(self.tau_free, self.tau_min[:, None]))

    @torch.no_grad()
    def prune(self, member: int, eps: float) -> list[int]:
        """:meth:`TauResNet.prune` for one member: mask every block but the input one (and a
        dependent last one) with ``|tau_l| / sum|tau| < eps``. Returns the stack positions
        masked now. The same float arithmetic as the single network, so the same decisions."""
        if self.fractional:
            raise ValueError("a fractional block is never an identity map: it cannot be pruned")
        size = self.taus()[member].abs()
        total = float(size.sum())
        if total == 0.0:
            return []
        active = self.active[member].tolist()
        last_removable = self.depth - 1 if self.dependent_last_tau else self.depth
        removed = [
            p for p in range(1, last_removable) if active[p] and float(size[p]) / total < eps
        ]
        for position in removed:
            self.active[member, position] = False
            if position < self.tau_free.shape[1]:
                self.tau_free[member, position] = 0.0
        return removed

    @torch.no_grad()
    def keep(self, members: Sequence[int]) -> None:
        """Keep only ``members`` (indices), and drop the blocks none of them still has."""
        index = torch.tensor(list(members), dtype=torch.long, device=self.active.device)
        active = self.active.index_select(0, index)
        blocks = [p for p in range(self.depth) if bool(active[:, p].any())]
        hidden = torch.tensor([p - 1 for p in blocks[1:]], dtype=torch.long, device=index.device)
        cols = torch.tensor(blocks, dtype=torch.long, device=index.device)
        free_cols = torch.tensor(
            [p for p in blocks if p < self.tau_free.shape[1]], dtype=torch.long, device=index.device
        )

        def take(param: nn.Parameter, *dims: tuple[int, torch.Tensor]) -> nn.Parameter:
            data = param.detach().index_select(0, index)
            for dim, which in dims:
                data = data.index_select(dim, which)
            return nn.Parameter(data.clone(), requires_grad=param.requires_grad)

        self.w0 = take(self.w0)
        self.w_hidden = take(self.w_hidden, (1, hidden))
        self.bias = take(self.bias, (1, cols))
        self.w_out = take(self.w_out)
        self.tau_free = take(self.tau_free, (1, free_cols))
        for name in ("T", "gamma", "tau_min"):
            buffer = getattr(self, name)
            setattr(self, name, buffer.index_select(0, index) if buffer.numel() else buffer)
        self.active = active.index_select(1, cols)
        self.block_ids = [self.block_ids[p] for p in blocks]

    @torch.no_grad()
    def export(self, member: int, into: TauNetwork) -> TauNetwork:
        """Write ``member``'s parameters into ``into``, a network of the same class and shape
        that has at least the member's blocks, pruning it to them; returns it."""
        active = self.active[member].tolist()
        ids = [b for b, on in zip(self.block_ids, active, strict=True) if on]
        into.keep_blocks([into.block_ids.index(b) for b in ids])  # into may be pruned already
        positions = [p for p, on in enumerate(active) if on]
        for block, position in zip(into.blocks, positions, strict=True):
            linear = cast(nn.Linear, block)
            weight = self.w0[member] if position == 0 else self.w_hidden[member, position - 1]
            linear.weight.copy_(weight)
            linear.bias.copy_(self.bias[member, position])
        into.output.weight.copy_(self.w_out[member])
        free = [p for p in positions if p < self.tau_free.shape[1]]
        into.tau_free.copy_(self.tau_free[member, free])
        return into


def _shape(net: TauNetwork) -> tuple[object, ...]:
    first = cast(nn.Linear, net.blocks[0])
    extra: tuple[object, ...] = ()
    if isinstance(net, FractionalDNN):
        extra = (net.detach_memory,)
    return (
        first.in_features,
        first.out_features,
        net.depth,
        net.output.out_features,
        net.dependent_last_tau,
        net.tau_free.requires_grad,
        str(net.tau_free.device),
        *extra,
    )
