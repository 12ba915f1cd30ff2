"""The hidden stack shared by both networks, with a hand-written backward pass.

Both networks advance a hidden state by the same recursion over their blocks ``l = 0..L-1``::

    z_l = W_l u_l + b_l          (u_0 is the input x for the input block)
    d_l = f_l relu(z_l) - sum_{j<l} c_{l,j} d_j
    u_{l+1} = u_l + d_l          (u_1 = d_0: the input block has no skip)

The ResNet is the case ``f = tau`` with no memory (``c = None``); the fractional network has
``f_l = tau_l^gamma Gamma(2-gamma)`` and the L1 memory coefficients ``c``. Autograd would record
some twenty small operations per block; at the reference size (batch 100, width 100) their
bookkeeping costs more than the arithmetic. One fused function with preallocated buffers and a
hand-derived backward halves the time of a training step on a CPU. ``f`` and ``c`` are inputs,
so the tau-dependence of the coefficients stays with autograd (a handful of ops on L x L).

At this size even making a view (``t[l]``, ``t[:, :l]``) costs about a microsecond, a tenth
of an elementwise op, and there are some hundred of them per step. :class:`StackWorkspace`
therefore makes every buffer and every view the loops touch once per shape; a training loop
keeps one workspace and reuses it, step after step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.function import once_differentiable


class StackWorkspace:
    """Buffers and views of one stack shape (batch, input width, width, depth, memory or not).

    Everything a pass writes lives here, the parameter gradients included, so a workspace
    reused by the next step overwrites what the previous step returned. Make a new one (or
    let :func:`stack_forward` make one) where results must outlive the next step.
    """

    def __init__(
        self,
        *,
        batch: int,
        in_features: int,
        width: int,
        depth: int,
        memory: bool,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.key = (batch, in_features, width, depth, memory, dtype, device)
        shape = (depth, batch, width)

        def empty(*size: int) -> torch.Tensor:
            return torch.empty(size, dtype=dtype, device=device)

        self.forcing = empty(depth)
        self.f_views = self.forcing.unbind()
        self.gate_scale = self.forcing[:, None, None]
        self.states, self.activations = empty(*shape), empty(*shape)
        self.s_views, self.a_views = self.states.unbind(), self.activations.unbind()
        self.grad_incr, self.grad_z, self.gate = empty(*shape), empty(*shape), empty(*shape)
        self.gd_views, self.gz_views = self.grad_incr.unbind(), self.grad_z.unbind()
        self.gate_views = self.gate.unbind()
        self.gz0_t = self.grad_z[0].t()
        self.gz_tail_t = self.grad_z[1:].transpose(1, 2)
        self.states_head = self.states[:-1]
        self.grad_w0 = empty(width, in_features)
        self.grad_w_hidden = empty(depth - 1, width, width)
        self.grad_b = empty(depth, width)
        self.grad_w = [self.grad_w0, *self.grad_w_hidden.unbind()]
        self.grad_b_views = list(self.grad_b.unbind())
        # sum over batch and width of grad_d * relu(z), per layer: one vecdot (a bmm of
        # (1 x n) by (n x 1) matrices is ten times slower, mul + sum twice as slow)
        self.grad_forcing = empty(depth)
        self.gd_flat = self.grad_incr.view(depth, -1)
        self.act_flat = self.activations.view(depth, -1)
        self.memory = memory
        self._weight_ptrs: list[int] = []
        self._weights_t: list[torch.Tensor] = []
        if memory:
            self._init_memory(empty(*shape), empty(depth, depth))

    def _init_memory(self, increments: torch.Tensor, coeff: torch.Tensor) -> None:
        depth = increments.shape[0]
        self.increments, self.coeff = increments, coeff
        self.d_views = increments.unbind()
        d_flat = increments.view(depth, -1)
        self.d_rows = d_flat.unbind()
        history = d_flat.t()  # column j: d_j flattened
        rows, cols = coeff.unbind(), coeff.t().unbind()
        # forward: d_l -= d_{<l} @ c[l, <l];  backward: gd_{l-1} -= gd_{>=l} @ c[>=l, l-1]
        self.history = [history[:, :layer] for layer in range(depth)]
        self.c_rows = [rows[layer][:layer] for layer in range(depth)]
        self.gd_rows = self.gd_flat.unbind()
        gd_cols = self.gd_flat.t()
        self.gd_later = [gd_cols[:, layer:] for layer in range(depth)]
        # entry 0 is never read (the input block has no predecessor); it only keeps indices
        self.c_later = [cols[layer - 1][layer:] if layer else cols[0] for layer in range(depth)]
        self.grad_u = torch.empty_like(increments[0])
        self.grad_u_flat = self.grad_u.view(-1)
        self.d_flat_t = history
        self.grad_coeff = torch.empty_like(coeff)

    @classmethod
    def for_inputs(
        cls, x: torch.Tensor, weights: Sequence[torch.Tensor], memory: bool
    ) -> StackWorkspace:
        return cls(
            batch=x.shape[0],
            in_features=x.shape[1],
            width=weights[0].shape[0],
            depth=len(weights),
            memory=memory,
            dtype=x.dtype,
            device=x.device,
        )

    def transposed(self, weights: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``W.t()`` of every weight, made once: the optimiser updates weights in place. A
        weight whose storage was swapped (``param.data = ...``) gets a new view."""
        ptrs = [w.data_ptr() for w in weights]
        if ptrs != self._weight_ptrs:
            self._weight_ptrs = ptrs
            self._weights_t = [w.t() for w in weights]
        return self._weights_t

    def fits(self, x: torch.Tensor, weights: Sequence[torch.Tensor], memory: bool) -> bool:
        """Whether this workspace has the shape of a pass over ``x`` with ``weights``."""
        key = (x.shape[0], x.shape[1], weights[0].shape[0], len(weights), memory)
        return self.key == (*key, x.dtype, x.device)


@dataclass(frozen=True)
class StackTape:
    """What the backward pass needs from a forward pass."""

    x: torch.Tensor
    weights: tuple[torch.Tensor, ...]
    workspace: StackWorkspace


@dataclass(frozen=True)
class StackGrads:
    x: torch.Tensor | None
    forcing: torch.Tensor
    coeff: torch.Tensor | None
    weights: list[torch.Tensor]
    biases: list[torch.Tensor]


def stack_forward(
    x: torch.Tensor,
    forcing: torch.Tensor,
    coeff: torch.Tensor | None,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    workspace: StackWorkspace | None = None,
) -> tuple[torch.Tensor, StackTape]:
    """The final state ``u_L`` (a view into the workspace) and the tape for
    :func:`stack_backward`.

    Plain tensor arithmetic: call it without autograd (under ``torch.no_grad``) or through
    :func:`hidden_stack`. Without ``workspace`` a fresh one is made.
    """
    memory = coeff is not None
    ws = workspace
    if ws is None or not ws.fits(x, weights, memory):
        ws = StackWorkspace.for_inputs(x, weights, memory)
    ws.forcing.copy_(forcing)
    if coeff is not None:
        ws.coeff.copy_(coeff)
    s_views, a_views, f_views = ws.s_views, ws.a_views, ws.f_views
    weights_t = ws.transposed(weights)
    inp = x
    for layer in range(len(weights)):
        # mm + add_ rather than addmm with the bias: an earlier machine ran that addmm ~40%
        # slower; on the current one the two tie (benchmarks/ab/step_ab.py).
        act = torch.mm(inp, weights_t[layer], out=a_views[layer])
        act.add_(biases[layer]).relu_()
        if not memory:
            if layer == 0:
                torch.mul(act, f_views[0], out=s_views[0])
            else:
                torch.addcmul(s_views[layer - 1], act, f_views[layer], out=s_views[layer])
        else:
            d = torch.mul(act, f_views[layer], out=ws.d_views[layer])
            if layer == 0:
                s_views[0].copy_(d)
            else:
                ws.d_rows[layer].addmv_(ws.history[layer], ws.c_rows[layer], alpha=-1.0)
                torch.add(s_views[layer - 1], d, out=s_views[layer])
        inp = s_views[layer]
    return inp, StackTape(x, tuple(weights), ws)


def stack_backward(
    grad_out: torch.Tensor, tape: StackTape, *, need_x: bool = False, need_params: bool = True
) -> StackGrads:
    """Gradients of every input of :func:`stack_forward` given ``dL/du_L`` (views into the
    workspace; ``grad_out`` may already be its last ``gd_views`` entry, which saves a copy)."""
    ws, weights = tape.workspace, tape.weights
    depth = len(weights)
    # d(relu(z) * f)/dz for all layers at once: f where the unit is active, else 0. sign() of
    # the (non-negative) activations gives that 0/1 pattern ~10x faster than a comparison.
    torch.sign(ws.activations, out=ws.gate).mul_(ws.gate_scale)
    gd_views, gz_views, gate_views = ws.gd_views, ws.gz_views, ws.gate_views
    grad_d = gd_views[depth - 1]
    if grad_out is not grad_d:
        grad_d.copy_(grad_out)
    grad_u = grad_d  # gradient w.r.t. the state u_{layer+1}, without memory terms
    grad_x = None
    for layer in reversed(range(depth)):
        gz = torch.mul(grad_d, gate_views[layer], out=gz_views[layer])
        if layer == 0:
            if need_x:
                grad_x = gz.mm(weights[0])
            break
        # u_layer feeds u_{layer+1} directly and z_layer through W_layer; d_{layer-1} feeds
        # u_layer and, with weight -c[k, layer-1], the memory of every later block k.
        if not ws.memory:
            grad_u = torch.addmm(grad_u, gz, weights[layer], out=gd_views[layer - 1])
        else:
            grad_u = torch.addmm(grad_u, gz, weights[layer], out=ws.grad_u)
            torch.addmv(
                ws.grad_u_flat,
                ws.gd_later[layer],
                ws.c_later[layer],
                alpha=-1.0,
                out=ws.gd_rows[layer - 1],
            )
        grad_d = gd_views[layer - 1]
    if need_params:
        torch.mm(ws.gz0_t, tape.x, out=ws.grad_w0)
        if depth > 1:
            torch.bmm(ws.gz_tail_t, ws.states_head, out=ws.grad_w_hidden)
        torch.sum(ws.grad_z, 1, out=ws.grad_b)
    torch.linalg.vecdot(ws.gd_flat, ws.act_flat, out=ws.grad_forcing)
    grad_coeff = None
    if ws.memory:
        grad_coeff = torch.mm(ws.gd_flat, ws.d_flat_t, out=ws.grad_coeff).tril_(-1).neg_()
    return StackGrads(
        x=grad_x,
        forcing=ws.grad_forcing,
        coeff=grad_coeff,
        weights=ws.grad_w if need_params else [],
        biases=ws.grad_b_views if need_params else [],
    )


class _StackFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        forcing: torch.Tensor,
        coeff: torch.Tensor | None,
        *params: torch.Tensor,
    ) -> torch.Tensor:
        # A fresh workspace per call: the tape must survive until backward.
        out, ctx.tape = stack_forward(x, forcing, coeff, params[0::2], params[1::2])
        return out.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        need = ctx.needs_input_grad
        grads = stack_backward(grad_out, ctx.tape, need_x=need[0], need_params=any(need[3:]))
        params: list[torch.Tensor | None] = [None] * (len(need) - 3)
        if grads.weights:
            params[0::2], params[1::2] = grads.weights, grads.biases
        return (grads.x, grads.forcing, grads.coeff, *params)


def hidden_stack(
    x: torch.Tensor,
    forcing: torch.Tensor,
    coeff: torch.Tensor | None,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
) -> torch.Tensor:
    """Final hidden state ``u_L`` of the recursion above, differentiable in every argument."""
    params = [t for pair in zip(weights, biases, strict=True) for t in pair]
    out: torch.Tensor = _StackFunction.apply(x, forcing, coeff, *params)
    return out
