"""The population's stepper: the members of one group as a :class:`TauPopulation`, one batched
step for all (see :func:`tauopt.engine.train_population`). A lone run in bfloat16 uses it too,
as a population of one: the products' precision lives in the population's step only."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm import tqdm

from tauopt.engine._config import TrainConfig
from tauopt.engine._data import Splits
from tauopt.engine._loop import EpochPass
from tauopt.engine._state import RunState, network_state, restore_network
from tauopt.models import TauNetwork, TauPopulation, network_slots

#: ``TrainConfig.precision`` -> the operand type of the population's matrix products.
PRODUCTS = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class PopulationStepper:
    """The members of one group as a :class:`TauPopulation`, one batched step for all. Each
    member's own network is updated from the population whenever it is looked at.

    ``networks`` are the members' networks as built, unpruned; with ``states`` (one per
    member) the members go on from there: from their slots where all come from one training
    of one group (the same stack again: the same arithmetic), else from their networks,
    packed into a stack as deep as the deepest.
    """

    def __init__(
        self,
        configs: Sequence[TrainConfig],
        networks: list[TauNetwork],
        splits: Splits,
        *,
        states: Sequence[RunState] | None = None,
    ) -> None:
        self.population = TauPopulation(networks, products=PRODUCTS[configs[0].precision])
        self.configs, self.networks, self.splits = list(configs), networks, splits
        self._taus: list[list[float]] = []
        if states is not None:
            self.population.load_slots_(_slots(states, networks))

    @property
    def depth(self) -> int:
        return self.population.depth

    def _column(self, name: str) -> torch.Tensor:
        device = self.splits.train_x.device
        return torch.tensor([getattr(c, name) for c in self.configs], device=device)

    def train_epoch(
        self,
        order: torch.Tensor,
        bar: tqdm[Any],
        *,
        start: int = 0,
        sums: Sequence[tuple[float, float]] | None = None,
        pause: Callable[[int], bool] = lambda done: False,
    ) -> EpochPass:
        """One pass over the shuffled training split, as the single engine batches it."""
        x, y = self.splits.train_x, self.splits.train_y
        lr, l1, horizon = self._column("lr"), self._column("l1"), self._column("horizon_weight")
        total = torch.zeros(len(self.configs), device=x.device)
        clean = torch.zeros_like(total)
        if sums is not None:  # float32 sums, exact as Python floats
            total.copy_(torch.tensor([s[0] for s in sums], dtype=total.dtype))
            clean.copy_(torch.tensor([s[1] for s in sums], dtype=total.dtype))
        batches = order.to(x.device).split(self.configs[0].batch_size)
        done = start
        for idx in batches[start:]:
            # the members share the training split, so its standardisation too
            xb, yb = self.networks[0].standardized(x.index_select(0, idx)), y.index_select(0, idx)
            step = self.population.sgd_step_(
                xb, yb, lr=lr, l1=l1, horizon_weight=horizon, clean_sum=clean
            )
            total += step
            done += 1
            if (done - start) % 50 == 0:
                bar.update(50)
            if done < len(batches) and pause(done):
                pairs = zip(total.tolist(), clean.tolist(), strict=True)
                return EpochPass(done, sums=[(t, c) for t, c in pairs])
        bar.update((done - start) % 50)
        self._taus = self.population.taus().detach().cpu().tolist()
        return EpochPass(done, (total / done).tolist(), (clean / done).tolist())

    def state(self, position: int) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
        network = self.network(position)
        slots = self.population.member_slots(position)
        return network_state(network, network.block_ids), slots

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


def _slots(states: Sequence[RunState], networks: Sequence[TauNetwork]) -> list[dict[str, Any]]:
    """Each member's slots to go on from: the saved ones where every member has them from one
    group's training, else its saved network packed anew (see the class)."""
    groups = {state.group for state in states}
    if None not in groups and len(groups) == 1:
        return [dict(state.slots or {}) for state in states]
    rebuilt = []
    for state, built in zip(states, networks, strict=True):
        rebuilt.append(restore_network(copy.deepcopy(built), state.network))
    depth = max(net.depth for net in rebuilt)
    return [network_slots(net, depth) for net in rebuilt]
