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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.function import once_differentiable


@dataclass(frozen=True)
class StackTape:
    """What the backward pass needs from a forward pass (one tensor of all layers each)."""

    x: torch.Tensor
    forcing: torch.Tensor
    coeff: torch.Tensor | None
    weights: tuple[torch.Tensor, ...]
    increments: torch.Tensor
    states: torch.Tensor
    activations: torch.Tensor


@dataclass(frozen=True)
class StackGrads:
    x: torch.Tensor | None
    forcing: torch.Tensor
    coeff: torch.Tensor | None
    weights: list[torch.Tensor]
    biases: list[torch.Tensor]


# Per-layer work is kept to the unavoidable sequential ops; everything that can be done for all
# layers at once (weight, bias, forcing and memory gradients) is one batched op after the loop.
# Buffers are unbound once: indexing a tensor in the loop costs an op each time.
def stack_forward(
    x: torch.Tensor,
    forcing: torch.Tensor,
    coeff: torch.Tensor | None,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, StackTape]:
    """The final state ``u_L`` (a view into the tape) and the tape for :func:`stack_backward`.

    Plain tensor arithmetic: call it without autograd (under ``torch.no_grad``) or through
    :func:`hidden_stack`.
    """
    depth = len(weights)
    batch, width = x.shape[0], weights[0].shape[0]
    increments = x.new_empty((depth, batch, width))
    states = x.new_empty((depth, batch, width))
    activations = x.new_empty((depth, batch, width))
    d_views, s_views, a_views = increments.unbind(), states.unbind(), activations.unbind()
    f_views = forcing.unbind()
    # Views made once: every indexing op in the loop below costs a dispatch.
    history = increments.view(depth, -1).t()  # column j: d_j flattened
    d_flat = increments.view(depth, -1).unbind()
    c_rows = coeff.unbind() if coeff is not None else ()
    inp = x
    for layer in range(depth):
        # mm + add_ rather than addmm: the CPU addmm with a broadcast bias is ~40% slower.
        act = torch.mm(inp, weights[layer].t(), out=a_views[layer])
        act.add_(biases[layer]).relu_()
        torch.mul(act, f_views[layer], out=d_views[layer])
        if c_rows and layer > 0:
            d_flat[layer].addmv_(history[:, :layer], c_rows[layer][:layer], alpha=-1.0)
        d = d_views[layer]
        if layer > 0:
            torch.add(s_views[layer - 1], d, out=s_views[layer])
        else:
            s_views[0].copy_(d)
        inp = s_views[layer]
    tape = StackTape(x, forcing, coeff, tuple(weights), increments, states, activations)
    return s_views[depth - 1], tape


def stack_backward(
    grad_out: torch.Tensor, tape: StackTape, *, need_x: bool = False, need_params: bool = True
) -> StackGrads:
    """Gradients of every input of :func:`stack_forward` given ``dL/du_L``."""
    increments, states, activations, weights = (
        tape.increments,
        tape.states,
        tape.activations,
        tape.weights,
    )
    coeff = tape.coeff
    depth = len(weights)
    grad_incr = torch.empty_like(increments)
    grad_z = torch.empty_like(increments)
    # d(relu(z) * f)/dz for all layers at once: f where the unit is active, else 0. sign() of
    # the (non-negative) activations gives that 0/1 pattern ~10x faster than a comparison.
    gate = activations.sign().mul_(tape.forcing[:, None, None])
    gd_views, gz_views, gate_views = grad_incr.unbind(), grad_z.unbind(), gate.unbind()
    gd_flat = grad_incr.view(depth, -1)
    gd_rows, gd_cols = gd_flat.unbind(), gd_flat.t()
    c_cols = coeff.t().unbind() if coeff is not None else ()
    grad_d = gd_views[depth - 1]
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
        if coeff is None:
            grad_u = torch.addmm(grad_u, gz, weights[layer], out=gd_views[layer - 1])
        else:
            grad_u = torch.addmm(grad_u, gz, weights[layer])
            torch.addmv(
                grad_u.view(-1),
                gd_cols[:, layer:],
                c_cols[layer - 1][layer:],
                alpha=-1.0,
                out=gd_rows[layer - 1],
            )
        grad_d = gd_views[layer - 1]
    grad_w: list[torch.Tensor] = []
    grad_b: list[torch.Tensor] = []
    if need_params:
        grad_w.append(grad_z[0].t().mm(tape.x))
        if depth > 1:
            grad_w += torch.bmm(grad_z[1:].transpose(1, 2), states[:-1]).unbind()
        grad_b = list(grad_z.sum(1).unbind())
    grad_coeff = None
    if coeff is not None:
        grad_coeff = torch.mm(gd_flat, increments.view(depth, -1).t()).tril_(-1).neg_()
    return StackGrads(
        x=grad_x,
        forcing=(grad_incr * activations).sum((1, 2)),
        coeff=grad_coeff,
        weights=grad_w,
        biases=grad_b,
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
