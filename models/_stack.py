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

from typing import Any

import torch
from torch.autograd.function import FunctionCtx, once_differentiable


class _StackFunction(torch.autograd.Function):
    # Per-layer work is kept to the unavoidable sequential ops; everything that can be done for
    # all layers at once (weight, bias, forcing and memory gradients) is one batched op after
    # the loop. Buffers are unbound once: indexing a tensor in the loop costs an op each time.
    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: torch.Tensor,
        forcing: torch.Tensor,
        coeff: torch.Tensor | None,
        *params: torch.Tensor,
    ) -> torch.Tensor:
        weights, biases = params[0::2], params[1::2]
        depth = len(weights)
        batch, width = x.shape[0], weights[0].shape[0]
        increments = x.new_empty((depth, batch, width))
        states = x.new_empty((depth, batch, width))
        activations = x.new_empty((depth, batch, width))
        d_views, s_views, a_views = increments.unbind(), states.unbind(), activations.unbind()
        f_views = forcing.unbind()
        flat = increments.view(depth, -1)
        inp = x
        for layer in range(depth):
            # mm + add_ rather than addmm: the CPU addmm with a broadcast bias is ~40% slower.
            act = torch.mm(inp, weights[layer].t(), out=a_views[layer])
            act.add_(biases[layer]).relu_()
            d = torch.mul(act, f_views[layer], out=d_views[layer])
            if coeff is not None and layer > 0:
                d.view(-1).addmv_(flat[:layer].t(), coeff[layer, :layer], alpha=-1.0)
            if layer > 0:
                torch.add(s_views[layer - 1], d, out=s_views[layer])
            else:
                s_views[0].copy_(d)
            inp = s_views[layer]
        ctx.save_for_backward(x, forcing, coeff, increments, states, activations, *weights)
        return s_views[depth - 1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, forcing, coeff, increments, states, activations, *weights = ctx.saved_tensors
        depth = len(weights)
        need = ctx.needs_input_grad
        grad_incr = torch.empty_like(increments)
        grad_z = torch.empty_like(increments)
        gd_views, gz_views, a_views = grad_incr.unbind(), grad_z.unbind(), activations.unbind()
        f_views = forcing.unbind()
        gd_flat = grad_incr.view(depth, -1)
        grad_u = grad_out.contiguous()
        grad_x = None
        for layer in reversed(range(depth)):
            grad_d = gd_views[layer]
            later = depth - 1 - layer
            if coeff is not None and later > 0:
                # d_layer enters the memory of every later block k with weight -c[k, layer].
                torch.addmv(
                    grad_u.view(-1), gd_flat[layer + 1 :].t(), coeff[layer + 1 :, layer],
                    alpha=-1.0, out=grad_d.view(-1),
                )
            else:
                grad_d.copy_(grad_u)
            torch.mul(grad_d, f_views[layer], out=gz_views[layer])
            gz = torch.ops.aten.threshold_backward(gz_views[layer], a_views[layer], 0)
            gz_views[layer].copy_(gz)
            if layer > 0:
                grad_u = torch.addmm(grad_u, gz, weights[layer])
            elif need[0]:
                grad_x = gz.mm(weights[0])
        grads: list[torch.Tensor | None] = [None] * (2 * depth)
        if any(need[3::2]):
            grads[0] = grad_z[0].t().mm(x)
            if depth > 1:
                hidden = torch.bmm(grad_z[1:].transpose(1, 2), states[:-1])
                grads[2::2] = list(hidden.unbind())
        if any(need[4::2]):
            grads[1::2] = list(grad_z.sum(1).unbind())
        grad_forcing = (grad_incr * activations).sum((1, 2)) if need[1] else None
        grad_coeff = None
        if coeff is not None and need[2]:
            grad_coeff = torch.mm(gd_flat, increments.view(depth, -1).t()).tril_(-1).neg_()
        return (grad_x, grad_forcing, grad_coeff, *grads)


def hidden_stack(
    x: torch.Tensor,
    forcing: torch.Tensor,
    coeff: torch.Tensor | None,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
) -> torch.Tensor:
    """Final hidden state ``u_L`` of the recursion above, differentiable in every argument."""
    params = [t for pair in zip(weights, biases) for t in pair]
    out: torch.Tensor = _StackFunction.apply(x, forcing, coeff, *params)
    return out
