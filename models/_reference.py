"""The networks' formulas written out with plain autograd, one term at a time.

This is how the papers' published code computes the forward pass (the fractional memory as a
loop over pairs). It is the oracle the fused stack is tested against and the model of the
straightforward baseline loop in ``benchmarks/``; it is not meant for training speed.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from tauopt.models._base import TauNetwork
from tauopt.models._fractional import FractionalDNN


def reference_forward(model: TauNetwork, x: torch.Tensor) -> torch.Tensor:
    """Logits of ``model`` for ``x``, computed formula by formula with the model's parameters."""
    x = model.standardized(x)
    taus = model.taus
    blocks = list(model.blocks)
    if not isinstance(model, FractionalDNN):
        y = taus[0] * F.relu(blocks[0](x))
        for layer in range(1, len(blocks)):
            y = y + taus[layer] * F.relu(blocks[layer](y))
        out: torch.Tensor = model.output(y)
        return out
    g = model.gamma
    if model.dependent_last_tau:
        taus = taus.clamp(min=model.tau_min)
    memory_taus = taus.detach() if model.detach_memory else taus
    u = [x.new_zeros(x.shape[0], model.output.in_features)]
    for layer in range(len(blocks)):
        inp = x if layer == 0 else u[layer]
        memory = torch.zeros_like(u[0])
        for j in range(layer):
            span = memory_taus[j : layer + 1].sum()
            a = (
                memory_taus[layer] ** g
                / memory_taus[j]
                * (span ** (1 - g) - (span - memory_taus[j]) ** (1 - g))
            )
            memory = memory + a * (u[j + 1] - u[j])
        forcing = taus[layer] ** g * math.gamma(2 - g)
        u.append(u[layer] - memory + forcing * F.relu(blocks[layer](inp)))
    out = model.output(u[-1])
    return out
