"""A burst of real training steps, timed: what ``ab/step_ab.py`` and ``frac_arithmetic.py``
alternate between the two sides they compare."""

from __future__ import annotations

import time
from typing import Any

import torch


def burst(run: tuple[Any, Any], batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Microseconds per step over ``batches``: the engine's loss_and_grad, the optimiser step
    and the projection of the taus, as a training epoch runs them."""
    model, optimizer = run
    start = time.perf_counter()
    for x, y in batches:
        model.loss_and_grad(x, y)
        optimizer.step()
        model.project_taus_()
    return (time.perf_counter() - start) / len(batches) * 1e6
