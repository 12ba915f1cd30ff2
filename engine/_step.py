"""One SGD step of the engine, run eagerly or replayed from a CUDA graph.

At the reference size a step is some sixty small kernels. A GPU runs each in a few
microseconds, but launching one from Python costs about as much again, and the launches
dominate: the eager step on an H200 took longer than on a 2-core CPU. A CUDA graph records
the step's kernels once and replays them with one launch per step.
"""

from __future__ import annotations

import threading
from typing import Protocol

import torch

from tauopt.models import TauNetwork

# PyTorch keeps a cuBLAS workspace (32 MiB on Hopper) for every stream a matrix product ran on,
# for the life of the process, and hands out streams round-robin from a pool of 32 per device:
# a new side stream per epoch grew a worker by about 1 GiB (measured on an H200). One side
# stream per thread and device keeps it at one workspace. Per thread, because a capture must
# not share its stream with another thread's work.
_streams = threading.local()


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    cache: dict[torch.device, torch.cuda.Stream] = _streams.__dict__.setdefault("by_device", {})
    if device not in cache:
        cache[device] = torch.cuda.Stream(device)
    return cache[device]


class Optimizer(Protocol):
    def step(self) -> None: ...


class TrainStep:
    """Gathers the batch at ``idx`` from the resident training tensors, computes loss and
    gradients, updates the parameters and projects the taus; the loss adds to ``total``, its
    cross-entropy alone to ``clean``."""

    def __init__(
        self,
        model: TauNetwork,
        optimizer: Optimizer,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        l1: float,
        horizon_weight: float,
    ) -> None:
        self.model, self.optimizer = model, optimizer
        self.x, self.y = x, y
        self.l1, self.horizon_weight = l1, horizon_weight
        self.total = torch.zeros((), device=x.device)
        self.clean = torch.zeros((), device=x.device)

    def __call__(self, idx: torch.Tensor) -> None:
        xb, yb = self.x.index_select(0, idx), self.y.index_select(0, idx)
        # The hand-written pass: same gradients as autograd through model(xb) (tested), at
        # about half the cost per step for these small layers.
        loss = self.model.loss_and_grad(
            xb, yb, l1=self.l1, horizon_weight=self.horizon_weight, clean_sum=self.clean
        )
        self.optimizer.step()
        self.model.project_taus_()
        self.total.add_(loss.detach())


class GraphedTrainStep(TrainStep):
    """:class:`TrainStep` on a CUDA device, replayed from a graph for batches of
    ``batch_size`` (a shorter last batch runs eagerly).

    The first ``warmup`` full batches run eagerly on a side stream, as CUDA graphs require
    (libraries initialise lazily, and the step's buffers must exist before capture); the next
    one is captured and replayed. The graph holds the addresses of the parameters, their
    gradients and the step's buffers: make a new instance whenever the model or the
    optimiser changes (the engine makes one per epoch, pruning happens between epochs).
    """

    def __init__(
        self,
        model: TauNetwork,
        optimizer: Optimizer,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        l1: float,
        horizon_weight: float,
        batch_size: int,
        warmup: int = 3,
    ) -> None:
        if x.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the data is on {x.device}")
        super().__init__(model, optimizer, x, y, l1=l1, horizon_weight=horizon_weight)
        self.static_idx = torch.zeros(batch_size, dtype=torch.long, device=x.device)
        self.warmup = warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self._side = _side_stream(x.device)
        self._kept: object = None

    def __call__(self, idx: torch.Tensor) -> None:
        if idx.shape != self.static_idx.shape:
            super().__call__(idx)
            return
        graph = self.graph
        if graph is None:
            if self.warmup > 0:
                self.warmup -= 1
                self._eager_on_side_stream(idx)
                return
            graph = self._capture()
        self.static_idx.copy_(idx)
        graph.replay()

    def _eager_on_side_stream(self, idx: torch.Tensor) -> None:
        self._side.wait_stream(torch.cuda.current_stream(idx.device))
        with torch.cuda.stream(self._side):
            super().__call__(idx)
        torch.cuda.current_stream(idx.device).wait_stream(self._side)

    def _capture(self) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        # Capture records kernels without running them; the caller replays for this batch.
        with torch.cuda.graph(graph, stream=self._side):  # the warmed-up stream: no new workspace
            super().__call__(self.static_idx)
        # The graph writes into the model's step buffers: keep them alive as long as the
        # graph, even if an eager step of another batch size replaces them on the model.
        self._kept = self.model.step_workspace
        self.graph = graph
        return graph
