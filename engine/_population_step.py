"""The population's stepper: the members of one group as a :class:`TauPopulation`, one batched
step for all (see :func:`tauopt.engine.train_population`). A lone run in bfloat16 uses it too,
as a population of one: the products' precision lives in the population's step only."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm import tqdm

from tauopt.engine._config import TrainConfig
from tauopt.engine._data import Splits
from tauopt.models import TauNetwork, TauPopulation

#: ``TrainConfig.precision`` -> the operand type of the population's matrix products.
PRODUCTS = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class PopulationStepper:
    """The members of one group as a :class:`TauPopulation`, one batched step for all. Each
    member's own network is updated from the population whenever it is looked at."""

    def __init__(
        self, configs: Sequence[TrainConfig], networks: list[TauNetwork], splits: Splits
    ) -> None:
        self.population = TauPopulation(networks, products=PRODUCTS[configs[0].precision])
        self.configs, self.networks, self.splits = list(configs), networks, splits
        self._taus: list[list[float]] = []

    @property
    def depth(self) -> int:
        return self.population.depth

    def _column(self, name: str) -> torch.Tensor:
        device = self.splits.train_x.device
        return torch.tensor([getattr(c, name) for c in self.configs], device=device)

    def train_epoch(self, generator: torch.Generator, bar: tqdm[Any]) -> tuple[list[float], ...]:
        """One pass over the shuffled training split, as the single engine batches it."""
        x, y = self.splits.train_x, self.splits.train_y
        lr, l1, horizon = self._column("lr"), self._column("l1"), self._column("horizon_weight")
        total = torch.zeros(len(self.configs), device=x.device)
        clean = torch.zeros_like(total)
        order = torch.randperm(x.shape[0], generator=generator).to(x.device)
        batches = 0
        for idx in order.split(self.configs[0].batch_size):
            # the members share the training split, so its standardisation too
            xb, yb = self.networks[0].standardized(x.index_select(0, idx)), y.index_select(0, idx)
            step = self.population.sgd_step_(
                xb, yb, lr=lr, l1=l1, horizon_weight=horizon, clean_sum=clean
            )
            total += step
            batches += 1
            if batches % 50 == 0:
                bar.update(50)
        bar.update(batches % 50)
        self._taus = self.population.taus().detach().cpu().tolist()
        return (total / batches).tolist(), (clean / batches).tolist()

    def taus(self, position: int) -> list[float]:
        active = self.population.active[position].tolist()
        return [t for t, on in zip(self._taus[position], active, strict=True) if on]

    def block_ids(self, position: int) -> list[int]:
        return self.population.member_block_ids(position)

    def network(self, position: int) -> TauNetwork:
        return self.population.export(position, self.networks[position])

    def prune(self, position: int, eps: float, rule: str) -> list[int]:
        slots = [p for p, on in enumerate(self.population.active[position].tolist()) if on]
        masked = self.population.prune(position, eps, rule)
        if masked:
            self._taus[position] = self.population.taus()[position].tolist()
        return [slots.index(slot) for slot in masked]

    def keep(self, positions: list[int]) -> None:
        """Repack: members that left and blocks that were pruned stop costing anything (the
        stack shrinks to the member with the most blocks left)."""
        pop = self.population
        if not positions:
            return
        if len(positions) < pop.size or pop.packed_depth(positions) < pop.depth:
            pop.keep(positions)
        self.configs = [self.configs[p] for p in positions]
        self.networks = [self.networks[p] for p in positions]
